"""Hugging Face export of a pruned model, verified before it is reported done.

The folder gets safetensors weights, config, generation config, processor/tokenizer files,
the recipe, the plan, the calibration report (when there was one) and a model card (those
files beside the weights through `provenance`, shared with the out-of-core rewrite). Before
the folder takes its final name it is checked as ``verify`` says (`manifest.VERIFY_MODES`):

- ``skip-equivalence``: reloaded with ``from_pretrained`` (no missing or unexpected keys, the
  planned block count) and compared with the original model run with the removed blocks
  skipped (`equivalence`: its reference was recorded on the original, before surgery);
- ``reload``: reloaded the same way and compared with the in-memory pruned model;
- ``none``: not reloaded at all.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .architectures import Adapter
from .calibration_report import CalibrationReport
from .card import RELOAD_VERIFIED
from .data import Sample, build_batch
from .equivalence import LOGITS_TOLERANCE, Reference, compare, logits_of, reload, verification_samples
from .errors import VerificationError
from .hub import ModelSource
from .manifest import Check
from .planner import SurgeryPlan
from .provenance import copy_tokenizer_files, strip_remote_code, write_provenance
from .staging import staged_dir
from .surgery import count_parameters

__all__ = ["LOGITS_TOLERANCE", "NOT_VERIFIED", "ExportResult", "export_hf", "verification_samples", "verify_reload"]

log = logging.getLogger(__name__)

NOT_VERIFIED = "The written checkpoint was not reloaded or compared with any model (--verify none)."


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float | None  # of the comparison that ran; None with verify="none"
    params_before: int
    params_after: int
    check: Check  # what was verified: for the manifest, the card and the CLI


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
    verify: str = "reload",
    reference: Reference | None = None,
) -> ExportResult:
    """Write ``model`` (pruned by ``plan``) to ``out``, checked as ``verify`` says (the module
    docstring); ``skip-equivalence`` compares with ``reference``, recorded on the original
    before surgery (`equivalence.record_reference`)."""
    if (verify == "skip-equivalence") != (reference is not None):
        raise ValueError("export_hf: verify='skip-equivalence' needs the reference recorded before surgery, and only it takes one")
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
            # The claim holds once the folder exists (it takes its name only after the check
            # passed); `pipeline.write_checkpoint` re-renders the card with the measured figures.
            verification=NOT_VERIFIED if verify == "none" else RELOAD_VERIFIED,
        )
        if verify == "none":
            check = Check(check="none", detail=NOT_VERIFIED)
        else:  # the reference carries its own inputs; the in-memory comparison needs some
            check_samples = [] if reference is not None else (samples or [])[:4] or verification_samples(processor, Path(scratch))
            check = verify_reload(model, processor, adapter, staging, check_samples, reference=reference)
    # No path here: `out` may be a staging folder that is renamed before the user reads this.
    log.info("exported: %s", check.detail)
    return ExportResult(
        path=out.resolve(), max_abs_diff=check.max_abs_diff, params_before=params_before, params_after=params_after, check=check
    )


def verify_reload(
    model: Any, processor: Any, adapter: Adapter, folder: Path, samples: list[Sample], *, reference: Reference | None = None
) -> Check:
    """Reload ``folder`` and compare it with ``reference`` (the original with the removed blocks
    skipped) when given, else with the in-memory ``model`` on ``samples``; VerificationError on
    any mismatch."""
    parameter = next(model.parameters())
    reloaded = reload(type(model), folder, adapter, blocks=len(adapter.blocks(model)), dtype=parameter.dtype, device=parameter.device)
    if reference is not None:
        return compare(reloaded, adapter, reference)
    inputs = build_batch(processor, samples, with_answer=False).inputs
    expected, got = logits_of(model, inputs), logits_of(reloaded, inputs)
    diff = float((expected - got).abs().max())
    tolerance = LOGITS_TOLERANCE * max(1.0, float(expected.abs().max()))
    if not diff <= tolerance:
        raise VerificationError(
            f"Reloaded logits differ from the in-memory model: max |Δ| = {diff:.3g} (tolerance {tolerance:.3g}).",
            fix="this is a bug in compressor's export; nothing was written.",
        )
    return Check(check="hf-reload", max_abs_diff=diff, tolerance=tolerance, detail=f"{RELOAD_VERIFIED} Max |Δlogits| = {diff:.3g}.")
