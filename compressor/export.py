"""Hugging Face export of a pruned model, verified before it is reported done.

The folder gets safetensors weights, config, generation config, processor/tokenizer files,
the recipe, the plan, the calibration report (when there was one) and a model card (those
files beside the weights through `provenance`, shared with the out-of-core rewrite). Before
the folder takes its final name, it is reloaded with ``from_pretrained``: no missing or
unexpected keys, the block count as planned, and logits equal to the in-memory model's.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .architectures import Adapter
from .calibration_report import CalibrationReport
from .data import Sample, build_batch, is_multimodal
from .errors import VerificationError
from .hub import ModelSource
from .planner import SurgeryPlan
from .provenance import copy_tokenizer_files, strip_remote_code, write_provenance
from .staging import staged_dir
from .surgery import count_parameters

log = logging.getLogger(__name__)

# float32 save/load is bit-exact on one device; the slack covers kernels that reorder sums.
LOGITS_TOLERANCE = 1e-5


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float
    params_before: int
    params_after: int


def verification_samples(processor: Any, folder: Path) -> list[Sample]:
    """Inputs for the reload check when no calibration data is at hand: fixed, seeded."""
    sample = Sample(prompt="Describe what you see in one word.")
    if is_multimodal(processor):
        from PIL import Image

        pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        image_path = folder / "verify.png"
        Image.fromarray(pixels).save(image_path)
        sample = Sample(prompt=sample.prompt, image=image_path)
    return [sample, Sample(prompt="Count to three.")]


@torch.no_grad()
def _logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()


def export_hf(
    model: Any,
    processor: Any,
    adapter: Adapter,
    out: Path | str,
    *,
    plan: SurgeryPlan,
    params_before: int,
    source: ModelSource | None = None,
    recipe_text: str | None = None,
    calibration: CalibrationReport | None = None,
    samples: list[Sample] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    out = Path(out)
    params_after = count_parameters(model)
    with staged_dir(out, overwrite=overwrite) as staging, tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None and not (staging / "generation_config.json").exists():
            model.generation_config.save_pretrained(staging)
        trusted = source is not None and source.trust_remote_code
        if source is not None:
            copy_tokenizer_files(source.path, staging)
            for code in source.path.glob("*.py") if trusted else ():  # what auto_map points at
                shutil.copyfile(code, staging / code.name)
        strip_remote_code(staging, trusted=trusted)
        write_provenance(
            staging,
            name=out.name,
            adapter=adapter,
            plan=plan,
            params_before=params_before,
            params_after=params_after,
            source=source,
            recipe_text=recipe_text,
            calibration=calibration,
        )
        check_samples = (samples or [])[:4] or verification_samples(processor, Path(scratch))
        diff = verify_reload(model, processor, adapter, staging, check_samples)
    # No path here: `out` may be a staging folder that is renamed before the user reads this.
    log.info("exported and reload-verified (max |Δlogits| = %.3g)", diff)
    return ExportResult(path=out.resolve(), max_abs_diff=diff, params_before=params_before, params_after=params_after)


def verify_reload(model: Any, processor: Any, adapter: Adapter, folder: Path, samples: list[Sample]) -> float:
    """Reload ``folder`` and compare it with ``model``; raise VerificationError on any mismatch."""
    dtype = next(model.parameters()).dtype
    reloaded, info = type(model).from_pretrained(folder, dtype=dtype, output_loading_info=True)
    reloaded.to(next(model.parameters()).device).eval()
    problems = [f"{kind}: {sorted(info[kind])[:5]}" for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)]
    reloaded_blocks = adapter.num_blocks(reloaded.config)
    if reloaded_blocks != len(adapter.blocks(model)):
        problems.append(f"reloaded config declares {reloaded_blocks} blocks, the model has {len(adapter.blocks(model))}")
    if problems:
        raise VerificationError(
            f"The export in '{folder}' does not reload cleanly: " + "; ".join(problems) + ".",
            fix="this is a bug in compressor's export; nothing was written.",
        )
    inputs = build_batch(processor, samples, with_answer=False).inputs
    expected, got = _logits(model, inputs), _logits(reloaded, inputs)
    diff = float((expected - got).abs().max())
    tolerance = LOGITS_TOLERANCE * max(1.0, float(expected.abs().max()))
    if not diff <= tolerance:
        raise VerificationError(
            f"Reloaded logits differ from the in-memory model: max |Δ| = {diff:.3g} (tolerance {tolerance:.3g}).",
            fix="this is a bug in compressor's export; nothing was written.",
        )
    return diff
