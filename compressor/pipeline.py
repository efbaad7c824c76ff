"""The chain calibrate → plan → prune → export, as library calls the CLI maps onto.

`prune` writes one checkpoint folder (with its verified ONNX graphs in ``onnx/`` when asked);
`run` writes everything of one recipe run under one folder (calibration.json, plan.json,
hf/). Both check the output path before loading anything, and stage their output so that a
failure — a failed ONNX verification included — leaves nothing behind.

Before a checkpoint is reported done it is checked as ``verify`` says (`manifest.VERIFY_MODES`;
default: the strongest that fits in memory). In memory that is `equivalence`'s proof: the
reference (the original with the removed blocks skipped) is recorded on the loaded model before
surgery mutates it, and the written checkpoint, reloaded, is compared with it. Written out of
core, the original is loaded from the source folder and then the pruned one from the staging
folder, one at a time on CPU, when the larger fits in free RAM (`proof_memory`); otherwise only
the written headers are checked, and the manifest and the log say so.

A replace plan (op replace, `heal.replace`) trains the block that stands in for its span on the
calibration samples, on the loaded original before surgery, and installs it after; its checkpoint
is verified by reload against the in-memory model (the skip-equivalence proof cannot hold for a
trained block: ``--verify skip-equivalence`` is refused), and the manifest and card state how well
the block maps the span. It needs the model in memory: out of core it is refused.

`prune_out_of_core` with ``verify="none"`` never builds a model, so it must not pay for torch
and transformers (seconds, before a copy that takes less): the modules that import them are
imported inside the functions that load a model (and of ONNX export), never at the top of this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .architectures import Adapter, adapter_for_config, blocks_of_folder
from .block_limits import BlockLimits
from .calibration_report import CalibrationReport
from .card import facts_from_folder, render_card
from .checkpoint import VERIFIED_OUT_OF_CORE, CheckpointResult, human_bytes, rewrite_checkpoint
from .errors import InputError, PlanError, SurgeryError
from .hub import ModelSource, resolve_model_ref
from .manifest import VERIFY_MODES, Check, write_manifest
from .planner import SurgeryPlan, plan
from .provenance import environment, source_facts
from .recipe import (
    FUNCTIONAL_METRICS,
    Conditions,
    ExportOptions,
    Greedy,
    Lowest,
    Recipe,
    RecipeFile,
    Replace,
    Span,
    load_recipe,
    parse_recipe,
)
from .staging import check_output, output_lock, staged_dir

if TYPE_CHECKING:  # these import torch (and transformers): see the module docstring
    from .calibrate import CalibrationOptions
    from .data import Sample
    from .distributed import Group
    from .export import ExportResult
    from .loading import LoadedModel, Placement
    from .onnx_export import OnnxExportResult

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    plan: SurgeryPlan
    export: ExportResult | CheckpointResult | None  # None for a dry run
    calibration: CalibrationReport | None
    validation: Any = None  # a validate.ValidationResult when the run validated
    healing: Any = None  # a heal.HealResult when the run's recipe has a heal: section
    onnx: OnnxExportResult | None = None  # the ONNX export in ``<checkpoint>/onnx`` when asked for
    checks: list[Check] = field(default_factory=list)  # how the checkpoint was verified (ONNX aside)
    replacement: Any = None  # a heal.replace.ReplaceResult when the plan replaced a span by a trained block


# A model loaded on CPU takes about its safetensors size; the factor and the slack cover what
# loading adds, one forward pass over a few samples, and the reference's logits and states.
PROOF_MEMORY_FACTOR = 1.5
PROOF_MEMORY_SLACK = 1 << 30


def proof_memory(folder: Path) -> int:
    """RAM the out-of-core check needs: it holds one model at a time, the original the larger."""
    return int(sum(p.stat().st_size for p in folder.glob("*.safetensors")) * PROOF_MEMORY_FACTOR) + PROOF_MEMORY_SLACK


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def check_verify(verify: str | None) -> None:
    if verify is not None and verify not in VERIFY_MODES:
        raise InputError(f"Unknown verification '{verify}'.", fix=f"use one of: {', '.join(VERIFY_MODES)}.")


def out_of_core_verify(verify: str | None, source: ModelSource) -> tuple[str, Check | None]:
    """The check a checkpoint written out of core gets: (mode, the "none" entry when no model is
    loaded). The default is the proof when the original fits in free RAM, else the headers only —
    said in the log and the manifest; a mode asked for that does not fit is refused (exit 2)."""
    check_verify(verify)
    if verify == "none":
        return "none", Check(check="none", detail="The written checkpoint was not reloaded or compared with the original (--verify none).")
    needed, free = proof_memory(source.path), available_memory()
    if needed <= free:
        return verify or "skip-equivalence", None
    reason = f"loading the model to check it needs about {human_bytes(needed)} of RAM, and {human_bytes(free)} is free"
    if verify is not None:
        raise InputError(
            f"--verify {verify} cannot run here: {reason}.",
            fix="free some memory, or pass --verify none (the written headers are still checked against the plan).",
        )
    log.warning("not comparing the pruned checkpoint with the original: %s; only the written headers are checked", reason)
    return "none", Check(check="none", detail=f"The written checkpoint was not compared with the original: {reason}.")


def folder_proof(mode: str, source: ModelSource, plan: SurgeryPlan, samples: list[Sample] | None) -> Callable[[Path], Check] | None:
    """The check `write_checkpoint` runs on a folder written out of core (None for "none")."""
    if mode == "none":
        return None

    def prove(folder: Path) -> Check:
        from .equivalence import prove_from_folders  # torch and transformers: only when a model is loaded

        return prove_from_folders(mode, source, folder, plan.removed_indices, samples)

    return prove


def onnx_tolerance(recipe_file: RecipeFile | None, onnx: bool | None) -> float | None:
    """The ONNX verification bound when ONNX is to be written (``--onnx`` or the recipe's
    ``export.formats``), else None."""
    wanted = onnx if onnx is not None else bool(recipe_file and recipe_file.recipe.export.onnx)
    if not wanted:
        return None
    return recipe_file.recipe.export.onnx_tolerance if recipe_file else ExportOptions().onnx_tolerance


def write_checkpoint(
    write: Callable[[Path, bool], Any],
    out: Path | str,
    *,
    overwrite: bool,
    onnx: float | None,
    source: ModelSource,
    adapter: Adapter,
    plan: SurgeryPlan,
    prove: Callable[[Path], Check] | None = None,
    unverified: Check | None = None,
    extra_facts: dict[str, Any] | None = None,
) -> tuple[Any, OnnxExportResult | None, list[Check]]:
    """Run ``write(folder, overwrite)`` (an HF export), then ``prove(folder)`` when given (the
    check of a checkpoint written out of core: `folder_proof`; ``unverified`` says why there is
    none); with ``onnx`` (the tolerance), also export the written checkpoint to ONNX in ``onnx/``
    inside it. All of it inside one staging folder, which gets its manifest (`manifest.py`)
    last: ``out`` appears only when everything passed, and then says what was checked."""
    with staged_dir(out, overwrite=overwrite, sources=[source.path]) as staging:
        hf = staging / "hf"
        result = write(hf, False)
        _check_written_blocks(hf, adapter, plan, source)
        checks = _written_checks(result) + ([prove(hf)] if prove is not None else []) + ([unverified] if unverified else [])
        graphs = None
        if onnx is not None:
            from .onnx_export import export_onnx  # torch, onnx: only when ONNX is asked for

            graphs = export_onnx(hf, hf / "onnx", tolerance=onnx)
        for entry in list(hf.iterdir()):
            entry.rename(staging / entry.name)
        hf.rmdir()
        onnx_checks = [_onnx_check(graphs, onnx)] if graphs is not None and onnx is not None else []
        facts = {
            "source": source_facts(source),
            "versions": environment(),
            "family": adapter.family,
            "multimodal": adapter.multimodal,
            "blocks": {"before": plan.num_blocks, "after": len(plan.kept), "removed": plan.removed_indices},
            "params": {"before": result.params_before, "after": result.params_after},
            **(extra_facts or {}),
        }
        # The out-of-core writer hashed its weight files as it wrote them: they are not read again.
        hashed = result.file_hashes if isinstance(result, CheckpointResult) else None
        write_manifest(staging, checks=[*checks, *onnx_checks], facts=facts, hashed=hashed)
        # The card again, now from the folder: it can state every check, the ONNX one included.
        (staging / "README.md").write_text(render_card(facts_from_folder(staging, name=Path(out).name)))
    final = Path(out).resolve()
    return replace(result, path=final), replace(graphs, path=final / "onnx") if graphs is not None else None, checks


def _check_written_blocks(folder: Path, adapter: Adapter, plan: SurgeryPlan, source: ModelSource) -> None:
    """The manifest and card state the plan's block counts: hold them to what was written."""
    written = declared_blocks(folder, source)[1]
    if written != len(plan.kept):
        raise SurgeryError(
            f"The written config declares {written} blocks, but the plan keeps {len(plan.kept)} of {plan.num_blocks}.",
            fix="this is a bug in compressor's surgery; nothing was written.",
        )


def declared_blocks(folder: Path, source: ModelSource) -> tuple[Adapter, int]:
    """The family and block count of ``folder``'s config: from config.json as JSON when it states
    them (`architectures.blocks_of_folder`), else as transformers reads it (its import paid)."""
    found = blocks_of_folder(folder)
    if found is not None:
        return found
    from .loading import load_config

    config = load_config(folder, trust_remote_code=source.trust_remote_code)
    adapter = adapter_for_config(config)
    return adapter, adapter.num_blocks(config)


def block_limits_of_folder(folder: Path, source: ModelSource) -> BlockLimits:
    """What the family forbids removing from the model in ``folder`` (`BlockLimits.of`): from
    config.json as JSON when it can be read so, else as transformers reads it. Rules over layer
    types need the file to state them (`reindex.read_config_json`): a `layer_types` left to the
    config class's default is only known to transformers."""
    from .reindex import JsonConfig, load_config_json, read_config_json

    raw = load_config_json(folder)
    if raw is not None:
        config: Any = JsonConfig(raw)
        try:
            adapter = adapter_for_config(config)
            by_type = adapter.kv_shared_key or adapter.last_layer_type or adapter.required_layer_type
            if not by_type or read_config_json(folder, adapter) is not None:
                return BlockLimits.of(adapter, config)
        except (AttributeError, TypeError, ValueError):
            pass
    from .loading import load_config

    config = load_config(folder, trust_remote_code=source.trust_remote_code)
    return BlockLimits.of(adapter_for_config(config), config)


def fixed_blocks_of_folder(folder: Path, source: ModelSource) -> dict[int, str]:
    """`Adapter.fixed_blocks` of ``folder``'s config (`block_limits_of_folder`)."""
    return dict(block_limits_of_folder(folder, source).fixed)


def _written_checks(result: ExportResult | CheckpointResult) -> list[Check]:
    """What the writer itself checked: the out-of-core rewrite its headers, the in-memory export
    what its ``verify`` asked for."""
    if isinstance(result, CheckpointResult):
        return [Check(check="out-of-core-headers", detail=VERIFIED_OUT_OF_CORE)]
    return [result.check]


def _onnx_check(graphs: OnnxExportResult, tolerance: float) -> dict[str, Any]:
    return {
        "check": "onnx-parity",
        "passed": True,
        "layout": graphs.layout,
        "provider": graphs.provider,
        "max_abs_diff": graphs.max_abs_diff,
        "tolerance": tolerance,
        "greedy_tokens": graphs.greedy_tokens,
        "exporter": graphs.exporter,
        "client": graphs.client,
        "detail": f"ONNX graphs ({graphs.layout} layout, {graphs.exporter}) compared with PyTorch on {graphs.provider}; "
        f"{graphs.greedy_tokens} greedy tokens generated by {graphs.client} identical to PyTorch's.",
    }


def calibration_options(recipe: Recipe | None, **overrides: Any) -> CalibrationOptions:
    """Built-in defaults < the recipe's `calibration:` < command-line overrides (non-None).

    Whatever the recipe's selection reads (an epsilon, a span length) is always measured.
    """
    from .calibrate import CalibrationOptions

    options = CalibrationOptions()
    if recipe is not None:
        c = recipe.calibration
        options = CalibrationOptions(
            num_samples=c.num_samples,
            batch_size=c.batch_size,
            token_budget=c.token_budget,
            max_length=c.max_length,
            epsilons=tuple(c.epsilons),
            max_span=c.max_span,
            ablation=c.ablation,
            greedy=c.greedy,
            attention=c.attention,
        )
    options = replace(options, **{k: v for k, v in overrides.items() if v is not None})
    if recipe is not None:
        select = recipe.select
        refs = list(select.where) if isinstance(select, Conditions) else [select] if isinstance(select, Lowest) else []
        extra = tuple(r.epsilon for r in refs if r.epsilon is not None and r.epsilon not in options.epsilons)
        options = replace(options, epsilons=options.epsilons + extra)
        for ref in refs:  # a functional metric the selection reads is measured
            options = replace(options, **{FUNCTIONAL_METRICS[ref.metric]: True}) if ref.metric in FUNCTIONAL_METRICS else options
        if isinstance(select, (Span, Replace)) and select.n > options.max_span:
            options = replace(options, max_span=select.n)
        if isinstance(select, Greedy):
            # Measure as many greedy steps as the selection takes, searching only the blocks it
            # may remove (its protected ones are kept out of the order).
            p = select.protect
            keep = (*range(p.first), *(-(i + 1) for i in range(p.last)), *p.blocks)
            options = replace(
                options,
                greedy=max(options.greedy, select.count or 0),
                greedy_fraction=max(options.greedy_fraction, select.fraction or 0.0),
                greedy_keep=tuple(sorted(set(keep))),
            )
    return options


def data_file(recipe_file: RecipeFile | None, data: Path | str | None) -> Path | None:
    if data is not None:
        return Path(data)
    if recipe_file is not None and recipe_file.recipe.calibration.data:
        return recipe_file.resolve(recipe_file.recipe.calibration.data)
    return None


def run_calibration(
    loaded: LoadedModel,
    data: Path,
    options: CalibrationOptions,
    *,
    samples: list[Sample] | None = None,
    progress: bool = False,
    group: Group | None = None,
) -> tuple[CalibrationReport, list[Sample]]:
    """Calibrate on ``data`` (its ``samples``, when already read and checked)."""
    from .calibrate import calibrate
    from .data import file_sha256, load_samples

    samples = samples if samples is not None else load_samples(data, limit=options.num_samples)
    report = calibrate(
        loaded.model,
        loaded.processor,
        loaded.adapter,
        samples,
        options=options,
        model_ref=loaded.source.public_name,
        # The report is published with the checkpoint: the file's name and hash, not its path.
        data_info={"path": Path(data).name, "sha256": file_sha256(Path(data))},
        progress=progress,
        group=group,
    )
    return report, samples


@dataclass
class Inputs:
    """Everything a prune/run reads besides the model, read and checked before the model loads
    (minutes, for a large one): data samples, the calibration report, a saved plan."""

    data: Path | None = None
    samples: list[Sample] | None = None
    report: CalibrationReport | None = None
    calibration: Path | None = None
    plan: SurgeryPlan | None = None


def read_inputs(
    *,
    data: Path | None,
    calibration: Path | str | None,
    plan_file: Path | str | None,
    options: CalibrationOptions | None,
    allow_outside_data: bool,
) -> Inputs:
    """Read and check every input; ``options`` says how many samples of ``data`` to read."""
    samples = None
    if data is not None:
        from .data import load_samples

        samples = load_samples(data, limit=options.num_samples if options else None, allow_outside=allow_outside_data)
    return Inputs(
        data=data,
        samples=samples,
        report=CalibrationReport.load(calibration) if calibration is not None else None,
        calibration=Path(calibration) if calibration is not None else None,
        plan=_read_plan(plan_file) if plan_file is not None else None,
    )


def _read_plan(plan_file: Path | str) -> SurgeryPlan:
    """A saved plan, with the recipe it came from: carried in the plan, or `recipe.yaml` beside
    it (a `run` folder) — so the pruned checkpoint keeps the recipe's validation gates."""
    saved = SurgeryPlan.load(plan_file)
    beside = Path(plan_file).parent / "recipe.yaml"
    if saved.recipe_text is None and beside.is_file():
        recipe = load_recipe(beside)
        if recipe.recipe.name == saved.recipe:
            saved = replace(saved, recipe_text=recipe.text)
    return saved


@contextmanager
def claimed(out: Path | str, *, overwrite: bool, sources: list[Path | str | None]) -> Iterator[None]:
    """Check ``out`` against the output policy and hold its lock for the whole command."""
    check_output(out, overwrite=overwrite, sources=sources)
    with output_lock(out):
        yield


def _obtain_report(
    loaded: LoadedModel, recipe_file: RecipeFile, inputs: Inputs, *, options: CalibrationOptions, progress: bool
) -> CalibrationReport | None:
    if inputs.report is not None or not recipe_file.recipe.needs_calibration:
        report = inputs.report
        measured = report.model.get("architecture") if report else None
        if measured and measured != type(loaded.model).__name__:
            raise InputError(
                f"Calibration report '{inputs.calibration}' was measured on a {measured}, not a {type(loaded.model).__name__}.",
                fix="calibrate this model (`compressor calibrate MODEL --data D -o calibration.json`).",
            )
        return report  # samples, when given, still serve as the inputs of the export's reload check
    if inputs.data is None:
        raise PlanError(
            f"Recipe '{recipe_file.path.name}' selects by metric ({recipe_file.recipe.select.op}) and needs calibration data.",
            fix="pass --data FILE.jsonl, --calibration calibration.json, or set calibration.data in the recipe.",
        )
    report, _ = run_calibration(loaded, inputs.data, options, samples=inputs.samples, progress=progress)
    return report


def _one_of(recipe_file: RecipeFile | None, plan_file: Path | str | None) -> None:
    if (recipe_file is None) == (plan_file is None):
        raise InputError("Give exactly one of --recipe or --plan.", fix="pass a recipe YAML, or a plan.json from `compressor plan -o`.")


def prune(
    model_ref: str,
    out: Path | str,
    *,
    recipe_file: RecipeFile | None = None,
    plan_file: Path | str | None = None,
    data: Path | str | None = None,
    calibration: Path | str | None = None,
    overwrite: bool = False,
    device: str | None = "cpu",
    dtype: str | None = "auto",
    progress: bool = False,
    dry_run: bool = False,
    onnx: bool | None = None,
    placement: Placement | None = None,
    allow_outside_data: bool = False,
    trust_remote_code: bool = False,
    verify: str | None = None,
    probe_adapter: bool = False,
    **calibration_overrides: Any,
) -> PruneResult:
    """Load, (calibrate,) plan, remove the blocks and write a verified HF checkpoint at ``out``.

    ``probe_adapter``: a model of a family without a written adapter is pruned with the one
    `compressor arch probe` proposes, when it classifies every block-tied field, and only with
    the export-time proof (`arch_probe.probed_adapter`).

    ``verify`` (`manifest.VERIFY_MODES`, default the strongest that fits: see the module
    docstring) says how the written checkpoint is checked.

    With a ``placement`` device map (a model bigger than one device), the model is loaded only
    to calibrate; the checkpoint is then written out of core from the source files.

    The blocks come from a recipe (planned here) or from a saved plan. With ``dry_run`` it
    stops after planning: nothing is written. ``onnx`` (default: the recipe's export formats)
    adds the verified ONNX graphs in ``out/onnx``. Every input is read and checked, and the
    output claimed (`staging.check_output`, locked), before the model loads.
    """
    tolerance = onnx_tolerance(recipe_file, onnx)
    _one_of(recipe_file, plan_file)
    check_verify(verify)
    if data is not None and calibration is not None:
        raise InputError("Give either --data or --calibration, not both.", fix="drop one of them.")
    data_path = data_file(recipe_file, data) if calibration is None else None
    options = calibration_options(recipe_file.recipe if recipe_file else None, **calibration_overrides)
    if not dry_run:  # before a Hub download; again below with the model's folder
        check_output(
            out,
            overwrite=overwrite,
            sources=[Path(model_ref), data_path, calibration, plan_file, recipe_file.path if recipe_file else None],
        )
    source = resolve_model_ref(model_ref, trust_remote_code=trust_remote_code)
    sources = [source.path, data_path, calibration, plan_file, recipe_file.path if recipe_file else None]
    with (
        _probed(source, probe_adapter, verify=verify, dry_run=dry_run) as verify,
        claimed(out, overwrite=overwrite, sources=sources) if not dry_run else nullcontext(),
    ):
        inputs = read_inputs(
            data=data_path, calibration=calibration, plan_file=plan_file, options=options, allow_outside_data=allow_outside_data
        )
        loaded = _load(source, device, dtype, placement)
        report = inputs.report if recipe_file is None else _obtain_report(loaded, recipe_file, inputs, options=options, progress=progress)
        return _prune_loaded(
            loaded,
            recipe_file,
            out,
            report=report,
            samples=inputs.samples,
            overwrite=overwrite,
            dry_run=dry_run,
            fixed_plan=inputs.plan,
            onnx=tolerance,
            out_of_core=_spread(placement),
            verify=verify,
        )


def _probed(source: ModelSource, enabled: bool, *, verify: str | None, dry_run: bool) -> Any:
    """A context yielding the verification mode: with --probe-adapter, `arch_probe.probed_adapter`
    (a family without a written adapter is pruned with the proposed one, the proof required);
    without it, ``verify`` as given (an unknown family is refused as before)."""
    if not enabled:
        return nullcontext(verify)
    from .arch_probe import probed_adapter  # torch and transformers: only when asked for

    return probed_adapter(source, verify=verify, dry_run=dry_run)


def _heal_options(recipe_file: RecipeFile, onnx: bool | None, dtype: str | None) -> Any:
    """The recipe's heal: section as `heal.HealOptions` (checked now, before any work), or None."""
    section = recipe_file.recipe.heal
    if section is None:
        return None
    if onnx_tolerance(recipe_file, onnx) is not None:
        raise InputError(
            f"Recipe '{recipe_file.path.name}' heals the pruned checkpoint and asks for ONNX graphs, which `run` exports from "
            "the pruned checkpoint before healing: they would not be the weights it ships.",
            fix="drop onnx from export.formats (or --onnx), and run `compressor export-onnx OUT/hf` on the healed checkpoint.",
        )
    from .heal.options import HealOptions  # no torch: checked before the model loads

    return HealOptions(**section.options(), dtype=dtype or "auto")


def _spread(placement: Placement | None) -> bool:
    return placement is not None and placement.device_map is not None


def _load(model_ref: str | ModelSource, device: str | None, dtype: str | None, placement: Placement | None) -> LoadedModel:
    """The model in memory: whole on ``device``, or spread by a device map (then in the compute
    dtype — it is only measured, never exported from memory)."""
    if _spread(placement):
        return load_model(model_ref, device=device, dtype=dtype, placement=placement, auto_dtype="compute")
    return load_model(model_ref, device=device, dtype=dtype)


def load_model(ref: str | ModelSource, **kwargs: Any) -> LoadedModel:
    """`loading.load_model`, imported only when a model is loaded (see the module docstring)."""
    from .loading import load_model as load

    return load(ref, **kwargs)


def prune_out_of_core(
    model_ref: str,
    out: Path | str,
    *,
    recipe_file: RecipeFile | None = None,
    plan_file: Path | str | None = None,
    calibration: Path | str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    onnx: bool | None = None,
    trust_remote_code: bool = False,
    verify: str | None = None,
    probe_adapter: bool = False,
) -> PruneResult:
    """Rewrite the checkpoint's safetensors files without loading the model (no GPU, little RAM).

    The plan comes from a saved plan, an explicit recipe, or a recipe plus an existing
    calibration report; calibrating needs the model in memory, so it cannot happen here.
    The written checkpoint is then checked as ``verify`` says (`out_of_core_verify`): by
    default compared with the original, loading both one after the other, when they fit in RAM.
    ``probe_adapter`` as for `prune` (the proof is then required, so both models must fit).
    """
    _one_of(recipe_file, plan_file)
    check_verify(verify)
    source = resolve_model_ref(model_ref, trust_remote_code=trust_remote_code)
    sources = [source.path, calibration, plan_file, recipe_file.path if recipe_file else None]
    with (
        _probed(source, probe_adapter, verify=verify, dry_run=dry_run) as verify,
        claimed(out, overwrite=overwrite, sources=sources) if not dry_run else nullcontext(),
    ):
        inputs = read_inputs(data=None, calibration=calibration, plan_file=plan_file, options=None, allow_outside_data=False)
        return _prune_out_of_core(
            source, out, recipe_file, inputs, overwrite=overwrite, dry_run=dry_run, progress=progress, onnx=onnx, verify=verify
        )


def _prune_out_of_core(
    source: ModelSource,
    out: Path | str,
    recipe_file: RecipeFile | None,
    inputs: Inputs,
    *,
    overwrite: bool,
    dry_run: bool,
    progress: Callable[[int, int], None] | None,
    onnx: bool | None,
    verify: str | None,
) -> PruneResult:
    adapter, num_blocks = declared_blocks(source.path, source)
    limits = block_limits_of_folder(source.path, source)
    report, fixed_plan = inputs.report, inputs.plan
    if fixed_plan is None:
        assert recipe_file is not None  # guaranteed by _one_of
        if recipe_file.recipe.needs_calibration and report is None:
            raise PlanError(
                f"Recipe '{recipe_file.recipe.name}' selects by metric ({recipe_file.recipe.select.op}); "
                "--out-of-core cannot calibrate, since that needs the model in memory.",
                fix="run `compressor calibrate MODEL --data D -o calibration.json` first and pass "
                "--calibration, or use an explicit recipe or a saved --plan.",
            )
        fixed_plan = replace(plan(recipe_file.recipe, num_blocks, report, limits), recipe_text=recipe_file.text)
    fixed_plan.check_model(num_blocks, source.public_name)
    fixed_plan.check_fixed(limits.fixed)
    if dry_run:
        return PruneResult(plan=fixed_plan, export=None, calibration=report)
    _refuse_empty(fixed_plan)
    _refuse_replace_out_of_core(fixed_plan)
    mode, unverified = out_of_core_verify(verify, source)
    result, graphs, checks = write_checkpoint(
        lambda folder, replace_existing: rewrite_checkpoint(
            source.path,
            folder,
            fixed_plan,
            adapter,
            recipe_text=fixed_plan.recipe_text,
            calibration=report,
            source=source,
            overwrite=replace_existing,
            progress=progress,
        ),
        out,
        overwrite=overwrite,
        onnx=onnx_tolerance(recipe_file, onnx),
        source=source,
        adapter=adapter,
        plan=fixed_plan,
        prove=folder_proof(mode, source, fixed_plan, None),
        unverified=unverified,
    )
    return PruneResult(plan=fixed_plan, export=result, calibration=report, onnx=graphs, checks=checks)


def _refuse_replace_out_of_core(surgery_plan: SurgeryPlan) -> None:
    if surgery_plan.replaced:
        raise PlanError(
            f"Recipe '{surgery_plan.recipe}' replaces a span by a trained block (op replace); training needs the model in "
            "memory, and out-of-core surgery (--out-of-core, or a device map) only rewrites the source files.",
            fix="prune in memory (drop --out-of-core / --device-map), or use op span to remove the span without training.",
        )


def _replace_verify(surgery_plan: SurgeryPlan, verify: str | None) -> str | None:
    """The check a replace plan's checkpoint gets: the skip-equivalence proof cannot hold (the
    stand-in computes what the span did, not the identity), so the reload against the in-memory
    model, which the manifest states together with how well the stand-in maps the span."""
    if not surgery_plan.replaced:
        return verify
    if verify == "skip-equivalence":
        raise InputError(
            "--verify skip-equivalence compares the checkpoint with the original run with the removed blocks skipped, and this "
            "plan replaces a span by a trained block, which computes something else by design.",
            fix="pass --verify reload (the default for op replace) or none.",
        )
    return verify or "reload"


def _replace_options(surgery_plan: SurgeryPlan, recipe_file: RecipeFile | None) -> Any:
    """The training knobs of a replace plan: its recipe's ``select.train``, from the recipe given or
    the one the plan carries."""
    from .heal.replace import ReplaceOptions

    select = recipe_file.recipe.select if recipe_file is not None else None
    if select is None and surgery_plan.recipe_text is not None:
        select = parse_recipe(surgery_plan.recipe_text, "plan.json recipe_text").select
    if not isinstance(select, Replace):
        raise PlanError(
            f"The plan (recipe '{surgery_plan.recipe}') replaces blocks {list(surgery_plan.replaced[0].span)} by a trained block, "
            "but carries no replace recipe to say how to train it.",
            fix="prune with --recipe (the replace recipe) instead of --plan.",
        )
    return ReplaceOptions.from_recipe(select.train)


def _refuse_empty(surgery_plan: SurgeryPlan) -> None:
    if not surgery_plan.removed:
        raise PlanError(
            f"Recipe '{surgery_plan.recipe}' selects no block on this model, so there is nothing to export.",
            fix="loosen the thresholds in select (see `compressor plan` for the measured values).",
        )


def _prune_loaded(
    loaded: LoadedModel,
    recipe_file: RecipeFile | None,
    out: Path | str,
    *,
    report: CalibrationReport | None,
    samples: list[Sample] | None,
    overwrite: bool,
    dry_run: bool = False,
    fixed_plan: SurgeryPlan | None = None,
    onnx: float | None = None,
    out_of_core: bool = False,
    verify: str | None = None,
) -> PruneResult:
    num_blocks = loaded.adapter.num_blocks(loaded.model.config)
    limits = BlockLimits.of(loaded.adapter, loaded.model.config)
    if fixed_plan is None:
        assert recipe_file is not None  # prune/run give a recipe or a plan
        surgery_plan = replace(plan(recipe_file.recipe, num_blocks, report, limits), recipe_text=recipe_file.text)
    else:
        surgery_plan = fixed_plan
    surgery_plan.check_model(num_blocks, loaded.source.public_name)
    surgery_plan.check_fixed(limits.fixed)
    log.debug("%s", surgery_plan.describe())
    if dry_run:
        return PruneResult(plan=surgery_plan, export=None, calibration=report)
    _refuse_empty(surgery_plan)
    verify = _replace_verify(surgery_plan, verify)
    replacement = None
    recipe_text = surgery_plan.recipe_text
    prove, unverified = None, None
    if out_of_core:  # a spread model: rewrite the source files rather than gather it to save
        _refuse_replace_out_of_core(surgery_plan)
        mode, unverified = out_of_core_verify(verify, loaded.source)
        prove = folder_proof(mode, loaded.source, surgery_plan, samples)

        def write(folder: Path, replace_existing: bool) -> Any:
            return rewrite_checkpoint(
                loaded.source.path,
                folder,
                surgery_plan,
                loaded.adapter,
                recipe_text=recipe_text,
                calibration=report,
                source=loaded.source,
                overwrite=replace_existing,
            )
    else:
        from .equivalence import record_reference
        from .export import export_hf
        from .surgery import apply_plan, count_parameters

        mode = verify or "skip-equivalence"  # the original is in memory: the proof costs two forward passes
        # Recorded now: surgery mutates the model in place, and the original is not kept twice.
        reference = (
            record_reference(loaded.model, loaded.processor, loaded.adapter, surgery_plan.removed_indices, samples)
            if mode == "skip-equivalence"
            else None
        )
        params_before = count_parameters(loaded.model)
        if surgery_plan.replaced:  # trained on the original, before surgery removes the span
            replacement = _train_replacement(loaded, surgery_plan, recipe_file, samples)
        apply_plan(loaded.model, surgery_plan, loaded.adapter)
        if replacement is not None:
            from .heal.replace import install

            install(loaded.model, loaded.adapter, surgery_plan, replacement)

        def write(folder: Path, replace_existing: bool) -> Any:
            return export_hf(
                loaded.model,
                loaded.processor,
                loaded.adapter,
                folder,
                plan=surgery_plan,
                params_before=params_before,
                source=loaded.source,
                recipe_text=recipe_text,
                calibration=report,
                samples=samples,
                overwrite=replace_existing,
                verify=mode,
                reference=reference,
            )

    exported, graphs, checks = write_checkpoint(
        write,
        out,
        overwrite=overwrite,
        onnx=onnx,
        source=loaded.source,
        adapter=loaded.adapter,
        plan=surgery_plan,
        prove=prove,
        unverified=unverified,
        extra_facts={"replacement": replacement.record()} if replacement is not None else None,
    )
    return PruneResult(plan=surgery_plan, export=exported, calibration=report, onnx=graphs, checks=checks, replacement=replacement)


def _train_replacement(loaded: LoadedModel, surgery_plan: SurgeryPlan, recipe_file: RecipeFile | None, samples: list[Sample] | None) -> Any:
    """`heal.replace.replace_span` for the plan's replaced span, on the calibration samples."""
    from .heal.replace import replace_span

    options = _replace_options(surgery_plan, recipe_file)
    if not samples:
        raise PlanError(
            f"Recipe '{surgery_plan.recipe}' replaces a span by a block trained on calibration data, and none was given.",
            fix="pass --data FILE.jsonl, or set calibration.data in the recipe.",
        )
    span = surgery_plan.replaced[0].span
    result = replace_span(loaded.model, loaded.processor, loaded.adapter, samples, start=span[0], n=len(span), options=options)
    log.info("%s", result.describe())
    return result


def run(
    recipe_file: RecipeFile,
    out: Path | str,
    *,
    model_ref: str | None = None,
    data: Path | str | None = None,
    eval_data: Path | str | None = None,
    heal_data: Path | str | None = None,
    validate_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    device: str | None = "cpu",
    dtype: str | None = "auto",
    progress: bool = False,
    onnx: bool | None = None,
    placement: Placement | None = None,
    allow_outside_data: bool = False,
    trust_remote_code: bool = False,
    verify: str | None = None,
    **calibration_overrides: Any,
) -> PruneResult:
    """The whole chain a recipe describes, everything of the run under ``out``.

    Layout: ``out/calibration.json`` (when calibrated), ``out/plan.json``, ``out/hf/`` (with
    ``out/hf/onnx/`` when the recipe's export formats or ``onnx`` ask for it), and
    ``out/report/`` when there is evaluation data (``eval_data`` or the recipe's
    ``validate.data``): the validation report, gated by the recipe's thresholds. ``verify``
    checks the pruned checkpoint as for `prune`.

    With a ``heal:`` section the pruned checkpoint goes to ``out/pruned/`` and is healed
    (`heal.heal`, the original as teacher, on ``heal_data`` or the section's ``data``) into ``out/hf/``, which is what is validated; an
    interrupted healing resumes from its checkpoint beside ``out`` when the run is started again.
    """
    model_ref = model_ref or recipe_file.recipe.model
    if model_ref is None:
        raise InputError(
            f"No model given for recipe '{recipe_file.path.name}'.",
            fix="pass --model (a folder or Hub id), or set `model:` in the recipe.",
        )
    check_verify(verify)
    options = calibration_options(recipe_file.recipe, **calibration_overrides)
    data_path = data_file(recipe_file, data)
    thresholds = recipe_file.recipe.thresholds
    if eval_data is None and thresholds is not None and thresholds.data:
        eval_data = recipe_file.resolve(thresholds.data)
    heal_section = recipe_file.recipe.heal
    if heal_data is not None and heal_section is None:
        raise InputError(
            f"--heal-data gives training data, but recipe '{recipe_file.path.name}' has no heal: section.",
            fix="add a heal: section to the recipe (see recipes/demo-heal.yaml), or drop --heal-data.",
        )
    if heal_section is not None:  # the command line wins over the recipe, as for --data and --eval
        heal_data = Path(heal_data) if heal_data is not None else recipe_file.resolve(heal_section.data)
    heal_options = _heal_options(recipe_file, onnx, dtype)
    # Before a Hub download:
    check_output(out, overwrite=overwrite, sources=[Path(model_ref), data_path, eval_data, heal_data, recipe_file.path])
    source = resolve_model_ref(model_ref, trust_remote_code=trust_remote_code)
    with claimed(out, overwrite=overwrite, sources=[source.path, data_path, eval_data, heal_data, recipe_file.path]):
        inputs = read_inputs(data=data_path, calibration=None, plan_file=None, options=options, allow_outside_data=allow_outside_data)
        if heal_data is not None:  # the training data is read and checked now, not after calibrating and pruning
            from .data import load_samples

            load_samples(heal_data, allow_outside=allow_outside_data)
        runtime = None
        if eval_data is not None:  # checked now, not after calibrating and pruning: the data, and that it can evaluate every gate
            from .data import load_samples
            from .validate import TASKS, Gates, check_gates
            from .validate_runtime import check_data, runtime_request

            given = dict(validate_options or {})
            samples = load_samples(eval_data, limit=given.get("num_samples"), allow_outside=allow_outside_data)
            # The recipe's runtime: modes (validate_options["runtime"], a `RuntimeRequest`, replaces them).
            runtime = given.get("runtime") or runtime_request(recipe_file.recipe.runtime, recipe=recipe_file.path.name)
            check_gates(
                Gates.from_thresholds(thresholds),
                samples,
                tasks=given.get("tasks", TASKS),
                latency=given.get("latency", True),
                runtime=runtime is not None,
            )
            if runtime is not None:
                check_data(runtime, samples)
                if runtime.band_where is not None and not recipe_file.recipe.needs_calibration:
                    raise InputError(
                        f"runtime.band_where chooses the band from the calibration report, and recipe '{recipe_file.path.name}' "
                        f"selects blocks without calibrating (op {recipe_file.recipe.select.op}).",
                        fix="give the band itself (runtime.band: [first, last]), or select blocks by a metric.",
                    )
        loaded = _load(source, device, dtype, placement)
        with staged_dir(out, overwrite=overwrite, sources=[source.path, data_path, eval_data, heal_data, recipe_file.path]) as staging:
            report = _obtain_report(loaded, recipe_file, inputs, options=options, progress=progress)
            if report is not None:
                report.save(staging / "calibration.json")
            result = _prune_loaded(
                loaded,
                recipe_file,
                staging / ("pruned" if heal_options is not None else "hf"),
                report=report,
                samples=inputs.samples,
                overwrite=False,
                onnx=onnx_tolerance(recipe_file, onnx),
                out_of_core=_spread(placement),
                verify=verify,
            )
            result.plan.save(staging / "plan.json")
            (staging / "recipe.yaml").write_text(recipe_file.text)
            if heal_options is not None:
                from .heal import heal, resume_folder

                loaded = None  # the pruned model in memory: healing loads student and teacher from their folders
                result.healing = heal(
                    staging / "pruned",
                    staging / "hf",
                    teacher=source,
                    data=heal_data,
                    options=heal_options,
                    device=device,
                    resume_dir=resume_folder(Path(out)),
                    progress=progress,
                    allow_outside_data=allow_outside_data,
                )
        final = Path(out).resolve() / "hf"
        written = final.parent / "pruned" if heal_options is not None else final
        result.export = replace(result.export, path=written)
        if result.healing is not None:
            result.healing.path = final
        if result.onnx is not None:
            result.onnx = replace(result.onnx, path=final / "onnx")
        if eval_data is not None:
            from .validate import thresholds_from_recipe, validate

            del loaded  # the validation loads both models afresh, from their folders
            result.validation = validate(
                source,
                str(final),
                eval_data,
                Path(out) / "report",
                gates=thresholds_from_recipe(final, None),
                device=device,
                dtype=dtype,
                allow_outside_data=allow_outside_data,
                **{**(validate_options or {}), "runtime": runtime},
            )
    return result
