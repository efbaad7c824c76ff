"""Healing: training a pruned model to recover what block removal cost, shipped as a plain,
verified Hugging Face checkpoint of the pruned shape.

The teacher is the original model; the student is its prune (`compressor prune`'s folder, whose
plan.json says which original block each kept block was). The loss is the distillation
objective — KL(teacher || student) of the next-token distributions, optionally plus per-block
hidden-state distances and cross-entropy on answers; the method says which parameters train.

Modules, one concept each:
- `options`: the methods and every training knob (`HealOptions`), checked at once; the resume key;
- `inputs`: is PRUNED a prune of BASE; the data, its held-out split, what the method needs of it;
- `losses`: the objective, with the LM heads run on the scored positions only;
- `methods`: which parameters train; LoRA in (peft) and merged out;
- `loop`: the deterministic, resumable training loop with held-out early stopping;
- `export`: the checkpoint, its loss curve, card and manifest, verified by reload;
- `run`: `heal`, the library call the CLI maps onto;
- `replace`: the `replace` op's training of one block in place of a span (`replace_span`);
- `parallel`: data-parallel training under torchrun/accelerate (sample slices, summed gradients);
- `sharding`: `--fsdp`, both models split over the processes (FSDP2) and what that changes.
"""

from __future__ import annotations

from typing import Any

from .options import METHODS, HealOptions

__all__ = ["METHODS", "HealOptions", "HealResult", "heal", "resume_folder"]


def __getattr__(name: str) -> Any:
    # `run` imports torch and transformers: only when a run is asked for, so that reading a
    # recipe's heal: section (`HealOptions`) costs nothing.
    if name in ("HealResult", "heal", "resume_folder"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
