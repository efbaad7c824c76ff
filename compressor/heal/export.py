"""Writing a healed checkpoint: a plain Hugging Face checkpoint of the pruned shape, verified.

The folder holds what a `prune` folder holds — weights (LoRA already merged: no adapter files),
config, tokenizer/processor files byte for byte from PRUNED, its plan.json / recipe.yaml /
calibration.json (the lineage) — plus ``loss_curve.json`` (and ``loss_curve.png`` where
matplotlib is installed), a model card and, last, the manifest with a ``healing`` record: the
method, what trained, the teacher, the data by name and SHA-256 (never a local path), steps,
tokens, options, the loss curve (sampled) and the held-out KL before and after.

It is written into a staging folder and takes its name only after the written weights were
reloaded with ``from_pretrained`` (no missing or unexpected keys, the plan's block count) and
gave the in-memory healed model's logits (`export.verify_reload`).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..card import facts_from_folder, render_card
from ..data import Sample
from ..equivalence import verification_samples
from ..export import verify_reload
from ..manifest import Check, write_manifest
from ..provenance import copy_tokenizer_files, environment, strip_remote_code
from ..staging import staged_dir
from .inputs import Pair
from .loop import Curve

log = logging.getLogger(__name__)

LINEAGE = ("plan.json", "recipe.yaml", "calibration.json")
CURVE_FILE = "loss_curve.json"
CURVE_PLOT = "loss_curve.png"
# The manifest carries the curve sampled to at most this many points; loss_curve.json has all.
MANIFEST_CURVE_POINTS = 50


def write_healed(
    model: Any,
    processor: Any,
    out: Path,
    *,
    pair: Pair,
    healing: dict[str, Any],
    curve: Curve,
    samples: list[Sample],
    checks: list[Check],
    overwrite: bool,
    sources: list[Path | None],
) -> list[Check]:
    """Write, verify and name ``out``; returns every check the manifest records."""
    from ..surgery import count_parameters

    with staged_dir(out, overwrite=overwrite, sources=sources) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None and not (staging / "generation_config.json").exists():
            model.generation_config.save_pretrained(staging)
        copy_tokenizer_files(pair.student.path, staging)
        strip_remote_code(staging, trusted=pair.student.trust_remote_code)
        for name in LINEAGE:
            if (pair.student.path / name).is_file():
                shutil.copyfile(pair.student.path / name, staging / name)
        healing = {**healing, "loss_curve": CURVE_FILE, "curve": _sampled(curve)}
        (staging / CURVE_FILE).write_text(json.dumps(_curve_record(curve), indent=1) + "\n")
        if _plot(curve, staging / CURVE_PLOT):
            healing["loss_plot"] = CURVE_PLOT
        with tempfile.TemporaryDirectory() as scratch:  # verification_samples' image: not part of the checkpoint
            check_samples = samples[:2] or verification_samples(processor, Path(scratch))
            reload = verify_reload(model, processor, pair.adapter, staging, check_samples)
        reload = replace(
            reload,
            detail="The healed weights were reloaded from the written files (no missing or unexpected keys) and their logits "
            f"compared with the in-memory healed model before this folder was written: max |Δlogits| = {reload.max_abs_diff:.3g}.",
        )
        checks = [*checks, reload]
        facts = {
            "source": pair.manifest.get("source") or {},
            "versions": environment(),
            "family": pair.adapter.family,
            "multimodal": pair.adapter.multimodal,
            "blocks": pair.manifest.get("blocks")
            or {"before": pair.plan.num_blocks, "after": len(pair.plan.kept), "removed": pair.plan.removed_indices},
            "params": {"before": (pair.manifest.get("params") or {}).get("before"), "after": count_parameters(model)},
            "healing": healing,
        }
        if pair.manifest.get("replacement"):  # PRUNED's stand-in block (op replace) is part of what was healed
            facts["replacement"] = pair.manifest["replacement"]
        write_manifest(staging, checks=checks, facts=facts)
        (staging / "README.md").write_text(render_card(facts_from_folder(staging, name=out.name)))
    return checks


def _curve_record(curve: Curve) -> dict[str, Any]:
    return {
        "format": "compressor.heal-curve/1",
        "steps": list(range(1, len(curve.loss) + 1)),
        "tokens": curve.tokens,
        "loss": curve.loss,
        "kl": curve.kl,
        "held_out_kl": [{"step": step, "kl": kl} for step, kl in curve.held_out],
    }


def _sampled(curve: Curve) -> dict[str, Any]:
    """The curve at most `MANIFEST_CURVE_POINTS` steps apart-evenly, the last step always in."""
    n = len(curve.loss)
    stride = max(1, -(-n // MANIFEST_CURVE_POINTS))
    steps = sorted({*range(stride, n + 1, stride), n} - {0})
    return {
        "steps": steps,
        "loss": [round(curve.loss[s - 1], 6) for s in steps],
        "held_out_kl": [[step, round(kl, 6)] for step, kl in curve.held_out],
    }


def _plot(curve: Curve, path: Path) -> bool:
    """A small PNG of the curve, when matplotlib is installed (it is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(5, 3), dpi=100)
    axis.plot(range(1, len(curve.loss) + 1), curve.loss, label="training loss")
    if curve.held_out:
        axis.plot([s for s, _ in curve.held_out], [k for _, k in curve.held_out], "o-", label="held-out KL")
    axis.set_xlabel("step")
    axis.set_yscale("log" if min([*curve.loss, *(k for _, k in curve.held_out)] or [0]) > 0 else "linear")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)
    return True
