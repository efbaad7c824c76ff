"""The proof at export time: the pruned checkpoint, reloaded from its own files, computes what
the original model computes with the same blocks skipped at run time.

Why: surgery follows per-family rules (renumbering, per-layer config lists, index fields, fixed
blocks: `architectures`, `reindex`). A rule nobody wrote down — features added after the k-th
block *by position* (Qwen3-VL's DeepStack), KV shared between blocks, per-layer inputs indexed
by block (Gemma 4) — gives a checkpoint that loads and runs, with other logits and no warning
anywhere. Compared with the original itself, the check needs no knowledge of the family.

The reference (`record_reference`): the original model, each removed block turned into the
identity on its hidden-state input by a forward hook (`surgery.skip_blocks`). The block list is
left alone, so code that keys on a block's position or index sees the original list, and a
skipped block's output keeps its structure (a tensor, or a tuple led by one: it differs between
families and between transformers 4.57 and 5.x). It is recorded *before* surgery, which mutates
the model in place, so the original is never held twice: the inputs, the logits, and the hidden
states entering and leaving every kept block.

The comparison (`compare`): the pruned model's logits on the same inputs, within
`LOGITS_TOLERANCE` of the reference's scale. When they differ, the recorded states name the
first block where the two runs part: kept block j of the pruned model against original block
``kept[j]``, its input first (then something between blocks moved), then its output (then the
block itself computes differently).

Cost: one forward pass of the original (its removed blocks still compute; their output is
dropped) and one of the pruned model, with the KV cache on as users run them (a missed
renumbering only shows with a cache). Held besides the models: the logits and 2 × kept blocks ×
tokens × hidden size of states, for `VERIFY_SAMPLES` samples.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .architectures import Adapter, adapter_for_config
from .data import Sample, build_batch, is_multimodal
from .errors import VerificationError
from .manifest import Check
from .surgery import skip_blocks

# float32 save/load is bit-exact on one device, and the pruned model runs exactly the kernels the
# original runs on its kept blocks; the slack covers kernels that reorder sums. Relative to
# max(1, max |reference|), for logits and hidden states alike.
LOGITS_TOLERANCE = 1e-5
# Few, since the reference's hidden states are held until the pruned model is compared.
VERIFY_SAMPLES = 2


def verification_samples(processor: Any, folder: Path) -> list[Sample]:
    """Inputs for the checks when no calibration data is at hand: fixed and seeded; for a
    multimodal processor the first has a random 64×64 image (written to ``folder``), so the
    vision path and what it feeds the decoder are exercised."""
    sample = Sample(prompt="Describe what you see in one word.")
    if is_multimodal(processor):
        from PIL import Image

        pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        image_path = folder / "verify.png"
        Image.fromarray(pixels).save(image_path)
        sample = Sample(prompt=sample.prompt, image=image_path)
    return [sample, Sample(prompt="Count to three.")]


def choose_samples(processor: Any, samples: Sequence[Sample] | None, folder: Path) -> list[Sample]:
    """Up to `VERIFY_SAMPLES` of the calibration ``samples`` — one with an image and one without
    first, when there are such — else `verification_samples` (written to ``folder``)."""
    if not samples:
        return verification_samples(processor, folder)
    leading = [s for s in samples if s.image is not None][:1] + [s for s in samples if s.image is None][:1]
    rest = [s for s in samples if s not in leading]
    return (leading + rest)[:VERIFY_SAMPLES]


def describe_samples(chosen: Sequence[Sample], *, built_in: bool) -> str:
    """What the checks ran on, as the manifest, card and messages state it."""
    images = sum(s.image is not None for s in chosen)
    kind = "built-in" if built_in else "calibration"
    return f"{len(chosen)} {kind} sample{'s' * (len(chosen) != 1)} ({images} with an image)"


@dataclass
class Reference:
    """The original model's run with ``removed`` skipped, as far as the comparison needs it (CPU)."""

    removed: tuple[int, ...]
    kept: tuple[int, ...]
    inputs: dict[str, torch.Tensor]
    logits: torch.Tensor  # float32
    entering: list[torch.Tensor]  # per kept block j: the hidden state entering original block kept[j]
    leaving: list[torch.Tensor]  # ... and leaving it
    samples: str  # `describe_samples`, for messages and the manifest


def record_reference(
    model: nn.Module, processor: Any, adapter: Adapter, removed: Sequence[int], samples: Sequence[Sample] | None
) -> Reference:
    """Run ``model`` (the original) with blocks ``removed`` skipped on `choose_samples` of
    ``samples`` and keep what `compare` needs. Call it before surgery: afterwards the original
    is gone."""
    with tempfile.TemporaryDirectory() as scratch:  # the fixed samples' image; read into the batch here
        chosen = choose_samples(processor, samples, Path(scratch))
        inputs = build_batch(processor, chosen, with_answer=False).inputs
    blocks = adapter.blocks(model)
    kept = tuple(i for i in range(len(blocks)) if i not in set(removed))
    with skip_blocks(model, adapter, list(removed)), _boundaries(blocks, kept) as (entering, leaving):
        logits = logits_of(model, inputs)
    return Reference(
        removed=tuple(sorted(removed)),
        kept=kept,
        inputs={k: v.cpu() for k, v in inputs.items()},
        logits=logits,
        entering=[entering[i] for i in kept],
        leaving=[leaving[i] for i in kept],
        samples=describe_samples(chosen, built_in=not samples),
    )


def compare(model: nn.Module, adapter: Adapter, reference: Reference, *, tolerance: float = LOGITS_TOLERANCE) -> Check:
    """Compare the pruned ``model`` with ``reference``; raise VerificationError naming the first
    diverging block (original numbering) when the logits differ beyond ``tolerance``."""
    mask = _valid_positions(reference.inputs)
    got = logits_of(model, reference.inputs)
    diff = _max_diff(got, reference.logits, mask)
    bound = _bound(reference.logits, mask, tolerance)
    if diff <= bound:
        return Check(
            check="skip-equivalence",
            max_abs_diff=diff,
            tolerance=bound,
            samples=reference.samples,
            detail=(
                f"Before this folder was written, the pruned checkpoint was reloaded from its files and its logits compared with "
                f"the original model run with blocks {list(reference.removed)} skipped at run time, on {reference.samples}: "
                f"max |Δlogits| = {diff:.3g} (tolerance {bound:.3g})."
            ),
        )
    block, where = _first_divergence(model, adapter, reference, tolerance)
    before = [i for i in reference.removed if block is not None and i < block]
    raise VerificationError(
        f"The pruned checkpoint does not compute what the original does with blocks {list(reference.removed)} skipped: "
        f"max |Δlogits| = {diff:.3g} (tolerance {bound:.3g}) on {reference.samples}. {where}",
        fix=f"nothing was written. This is a bug in compressor's rules for the '{adapter.family}' family "
        "(compressor/architectures.py); please report it with the model's config.json"
        + (f". Until then, keeping block{'s' * (len(before) > 1)} {before} (removed before it) may avoid it." if before else "."),
    )


def _first_divergence(model: nn.Module, adapter: Adapter, reference: Reference, tolerance: float) -> tuple[int | None, str]:
    """Where the pruned run parts from the reference: the original block, and a sentence."""
    blocks = adapter.blocks(model)
    if len(blocks) != len(reference.kept):
        return None, f"The pruned model has {len(blocks)} blocks; the plan keeps {len(reference.kept)}."
    mask = _valid_positions(reference.inputs)
    with _boundaries(blocks, range(len(blocks))) as (entering, leaving):
        logits_of(model, reference.inputs)
    for j, original in enumerate(reference.kept):
        diff = _max_diff(entering[j], reference.entering[j], mask)
        if not diff <= _bound(reference.entering[j], mask, tolerance):  # NaN included
            before = [i for i in reference.removed if i < original]
            return original, (
                f"First divergence: block {original} (original numbering): the hidden state entering it already differs "
                f"(max |Δ| = {diff:.3g}) though every kept block before it agrees, so something the model does between blocks "
                "depends on block positions the removal shifted (e.g. features added after a given block, per-layer inputs, "
                f"KV shared between blocks){f'; removed before it: {before}' if before else ''}."
            )
        diff = _max_diff(leaving[j], reference.leaving[j], mask)
        if not diff <= _bound(reference.leaving[j], mask, tolerance):
            return original, (
                f"First divergence: block {original} (original numbering): same input, different output (max |Δ| = {diff:.3g}), "
                "so the block is not configured as it was in the original (its index attributes, attention type or "
                "per-layer config)."
            )
    return None, "Every kept block agrees with the original; the logits differ after the last block (final norm or LM head)."


def reload(model_class: type, folder: Path, adapter: Adapter, *, blocks: int, dtype: torch.dtype | str, device: Any) -> nn.Module:
    """``folder`` loaded with ``model_class``; VerificationError unless it loads cleanly (no
    missing, unexpected or mismatched keys) with ``blocks`` blocks."""
    reloaded, info = model_class.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    reloaded.to(device).eval()
    problems = [f"{kind}: {sorted(info[kind])[:5]}" for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)]
    declared, found = adapter.num_blocks(reloaded.config), len(adapter.blocks(reloaded))
    if declared != blocks or found != blocks:
        problems.append(f"the reloaded config declares {declared} blocks and the model has {found}; the plan keeps {blocks}")
    if problems:
        raise VerificationError(
            f"The checkpoint written in '{folder}' does not reload cleanly: " + "; ".join(problems) + ".",
            fix="this is a bug in compressor's export; nothing was written.",
        )
    return reloaded


def prove_from_folders(mode: str, source: Any, folder: Path, removed: Sequence[int], samples: Sequence[Sample] | None) -> Check:
    """The check of a checkpoint written out of core, where no model is in memory.

    ``skip-equivalence``: load the original from ``source`` (a `hub.ModelSource`) on CPU in its
    checkpoint dtype, record the reference, free it, then load the pruned checkpoint from
    ``folder`` and compare: one model in memory at a time. ``reload``: load only the pruned
    checkpoint and run it (`check_runs`)."""
    import transformers

    from .loading import load_config, load_model, load_processor

    if mode == "reload":
        config = load_config(folder, trust_remote_code=source.trust_remote_code)
        adapter = adapter_for_config(config)
        named = [name for name in getattr(config, "architectures", None) or [] if name in adapter.architectures]
        model_class = getattr(transformers, (named or [adapter.architectures[0]])[0])
        processor = load_processor(folder, adapter, trust_remote_code=source.trust_remote_code)
        pruned = reload(model_class, folder, adapter, blocks=adapter.num_blocks(config), dtype="auto", device="cpu")
        return check_runs(pruned, processor, samples)
    original = load_model(source, device="cpu", dtype="auto")
    model_class, adapter = type(original.model), original.adapter
    dtype = next(original.model.parameters()).dtype
    reference = record_reference(original.model, original.processor, adapter, removed, samples)
    del original
    gc.collect()
    pruned = reload(model_class, folder, adapter, blocks=len(reference.kept), dtype=dtype, device="cpu")
    return compare(pruned, adapter, reference)


def check_runs(model: nn.Module, processor: Any, samples: Sequence[Sample] | None) -> Check:
    """A reloaded checkpoint with nothing to compare it with (``--verify reload`` out of core):
    one forward pass gives finite logits."""
    with tempfile.TemporaryDirectory() as scratch:
        chosen = choose_samples(processor, samples, Path(scratch))
        inputs = build_batch(processor, chosen, with_answer=False).inputs
    logits = logits_of(model, inputs)
    if not bool(torch.isfinite(_select(logits, _valid_positions(inputs))).all()):
        raise VerificationError(
            "The reloaded checkpoint gives non-finite logits.", fix="this is a bug in compressor's export; nothing was written."
        )
    return Check(
        check="hf-reload",
        samples=describe_samples(chosen, built_in=not samples),
        detail=f"The pruned checkpoint was reloaded from its files (no missing or unexpected keys) and ran on "
        f"{describe_samples(chosen, built_in=not samples)} with finite logits; it was not compared with any other model.",
    )


# -- helpers ------------------------------------------------------------------------------------


@torch.no_grad()
def logits_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()


def _hidden(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


@contextmanager
def _boundaries(blocks: nn.ModuleList, indices: Sequence[int]) -> Iterator[tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]]:
    """Copies (float32, CPU) of the hidden state entering and leaving each block of ``indices``:
    copies, since the model's loop may add to a block's output in place (DeepStack)."""
    entering: dict[int, torch.Tensor] = {}
    leaving: dict[int, torch.Tensor] = {}

    def before(index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        entering[index] = (args[0] if args else kwargs["hidden_states"]).detach().float().cpu().clone()

    def after(index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        leaving[index] = _hidden(output).detach().float().cpu().clone()

    handles = []
    try:
        for index in indices:
            handles.append(blocks[index].register_forward_pre_hook(partial(before, index), with_kwargs=True))
            handles.append(blocks[index].register_forward_hook(partial(after, index), with_kwargs=True))
        yield entering, leaving
    finally:
        for handle in handles:
            handle.remove()


def _valid_positions(inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The real tokens (not padding): only they are compared."""
    mask = inputs.get("attention_mask")
    return mask.bool() if mask is not None and mask.dim() == 2 else None


def _select(tensor: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return tensor[mask] if mask is not None and tensor.shape[:2] == mask.shape else tensor


def _max_diff(got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor | None) -> float:
    if got.shape != expected.shape:
        return float("inf")
    diff = (_select(got, mask) - _select(expected, mask)).abs()
    return float(diff.max()) if diff.numel() else 0.0  # NaN stays NaN: it fails every bound


def _bound(expected: torch.Tensor, mask: torch.Tensor | None, tolerance: float) -> float:
    values = _select(expected, mask).abs()
    return tolerance * max(1.0, float(values.max()) if values.numel() else 0.0)
