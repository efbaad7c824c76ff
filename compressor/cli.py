"""The `compressor` command line: click wiring, logging, and errors turned into exit codes.

Each command calls one library function. A `CompressorError` becomes a one-paragraph
message and its exit code (2 for usage errors); anything else is reported as an internal
error. Tracebacks only with `-v`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from .errors import CompressorError, InputError

log = logging.getLogger("compressor")
_state = {"verbose": False, "quiet": False, "bars_off": False}


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        _state["verbose"] = True
        _configure_logging()


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        _state["quiet"] = True
        _configure_logging()


def _configure_logging() -> None:
    level = logging.DEBUG if _state["verbose"] else logging.WARNING if _state["quiet"] else logging.INFO
    root = logging.getLogger("compressor")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    # transformers' own warnings are noise for users unless they asked for detail. Through its
    # environment variable when it is not imported yet: importing it (seconds, hundreds of MB)
    # only to set its verbosity would slow every command, `recipe check` included.
    verbosity = "info" if _state["verbose"] else "error"
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity(getattr(sys.modules["transformers"].logging, verbosity.upper()))
    else:
        os.environ["TRANSFORMERS_VERBOSITY"] = verbosity
    _configure_progress_bars()


def _configure_progress_bars() -> None:
    """--quiet promises no progress bars, and transformers draws its own: 5.x for every model it
    loads or saves ("Loading weights", "Writing model shards"), 4.x for sharded checkpoints; as
    huggingface_hub does for downloads. Both take HF_HUB_DISABLE_PROGRESS_BARS when imported
    (importing them here would slow every command); once imported, their switches are flipped.
    Only what --quiet turned off is turned back on (the CLI may run more than once in a process)."""
    off = _state["quiet"]
    if off == _state["bars_off"]:
        return
    _state["bars_off"] = off
    hub, transformers = sys.modules.get("huggingface_hub"), sys.modules.get("transformers")
    if off and hub is None:
        _state["bars_env"] = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    elif "bars_env" in _state and not off:
        before = _state.pop("bars_env")
        if before is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = before
    if hub is not None:
        hub_utils = importlib.import_module("huggingface_hub.utils")
        (hub_utils.disable_progress_bars if off else hub_utils.enable_progress_bars)()
    if transformers is not None:
        (transformers.logging.disable_progress_bar if off else transformers.logging.enable_progress_bar)()


def _verbosity(command: Any) -> Any:
    """-v / --quiet on the group and on every command, wherever the user types them."""
    command = click.option(
        "-v", "--verbose", is_flag=True, expose_value=False, is_eager=True, callback=_set_verbose, help="Debug logging and tracebacks."
    )(command)
    return click.option(
        "-q",
        "--quiet",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_quiet,
        help="Only warnings and errors; no progress bars.",
    )(command)


def _progress() -> bool:
    return not _state["quiet"]


def _device_options(command: Any) -> Any:
    command = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")(command)
    return click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "float16", "bfloat16"]))(
        command
    )


def _placement_options(command: Any) -> Any:
    """Loading a model bigger than one device: accelerate's device map and its budget."""
    for option in reversed(
        [
            click.option(
                "--device-map",
                type=click.Choice(["auto", "balanced", "balanced_low_0", "sequential"]),
                help="Spread the model over the GPUs, then CPU RAM, then --offload-folder (accelerate).",
            ),
            click.option(
                "--max-memory", metavar="DEV=SIZE,...", help="Per-device budget for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB."
            ),
            click.option("--offload-folder", type=click.Path(path_type=Path), help="Disk offload for weights that fit nowhere else."),
        ]
    ):
        command = option(command)
    return command


def _trust_option(command: Any) -> Any:
    return click.option(
        "--trust-remote-code",
        is_flag=True,
        help="Let Python code shipped in the model folder (config auto_map) run. Off: such code never runs, "
        "and exported configs drop auto_map.",
    )(command)


def _outside_option(command: Any) -> Any:
    return click.option(
        "--allow-outside-data",
        is_flag=True,
        help="Let image paths in the JSONL point outside its folder (absolute, ../, symlinks). Off: refused.",
    )(command)


def _verify_option(command: Any) -> Any:
    return click.option(
        "--verify",
        type=click.Choice(["skip-equivalence", "reload", "none"]),  # manifest.VERIFY_MODES, not imported at start-up
        default=None,
        help="How the written checkpoint is checked: skip-equivalence (reloaded and compared with the original run with the "
        "same blocks skipped), reload (reloaded; compared with the pruned model in memory, or only run out of core), none. "
        "[the strongest that fits in memory]",
    )(command)


def _placement(kwargs: dict[str, Any]) -> Any:
    from .loading import Placement

    return Placement.parse(kwargs.pop("device_map", None), kwargs.pop("max_memory", None), kwargs.pop("offload_folder", None))


def _calibration_options(command: Any) -> Any:
    for option in reversed(
        [
            click.option("--num-samples", type=click.IntRange(min=1), help="Samples to use [recipe or 128]."),
            click.option("--batch-size", type=click.IntRange(min=1), help="Samples per forward pass [recipe or 8]."),
            click.option(
                "--token-budget",
                type=click.IntRange(min=8),
                help="Sort samples by length and pack batches to this many padded tokens (rows still <= --batch-size) [recipe or off].",
            ),
            click.option("--max-length", type=click.IntRange(min=8), help="Token limit per sample [recipe or 512]."),
            click.option(
                "--epsilon",
                "epsilons",
                type=click.FloatRange(min=0, min_open=True),
                multiple=True,
                help="Tail-probability threshold; repeat for several [0.01 0.02 0.05 0.1].",
            ),
            click.option("--max-span", type=click.IntRange(min=1), help="Longest block span for angular distance [4]."),
            click.option(
                "--ablation/--no-ablation",
                default=None,
                help="Skip-one scan: loss increase and KL per block (~L/2 extra forward passes) [recipe or off].",
            ),
            click.option("--greedy", type=click.IntRange(min=0), help="Greedy (SLEB) removal order up to N blocks [recipe or 0]."),
            click.option(
                "--attention/--no-attention",
                default=None,
                help="Visual attention ratio per block (one eager-attention pass) [recipe or off].",
            ),
        ]
    ):
        command = option(command)
    return command


def _overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    keys = ("num_samples", "batch_size", "token_budget", "max_length", "max_span", "ablation", "greedy", "attention")
    found = {k: kwargs.get(k) for k in keys}
    found["epsilons"] = tuple(kwargs["epsilons"]) if kwargs.get("epsilons") else None
    return found


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from .versions import version_line

    click.echo(version_line())
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show compressor's, transformers' and torch's versions and the families this transformers can handle.",
)
@_verbosity
def cli() -> None:
    """Make vision-language models and decoder LLMs permanently shorter."""
    _configure_logging()


@cli.command("calibrate")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="JSONL calibration data.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Report JSON to write.")
@click.option("--recipe", type=click.Path(path_type=Path), help="Take calibration defaults from this recipe.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report.")
@_calibration_options
@_placement_options
@_device_options
@_trust_option
@_outside_option
@_verbosity
def calibrate_command(
    model: str,
    data: Path,
    output: Path,
    recipe: Path | None,
    overwrite: bool,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    allow_outside_data: bool,
    **kwargs: Any,
) -> None:
    """Measure per-block redundancy of MODEL (folder or Hub id) on a data file.

    Under torchrun / accelerate launch, each process calibrates its share of the data on its
    own GPU(s); the partial sums are all-reduced and rank 0 writes the report."""
    import torch

    from . import distributed
    from .data import load_samples
    from .hub import resolve_model_ref
    from .loading import load_model
    from .pipeline import calibration_options, run_calibration
    from .recipe import load_recipe
    from .staging import check_output, output_lock, staged_file

    placement = _placement(kwargs)
    group = distributed.current()
    if not group.is_main:  # one voice: rank 0 reports for all
        logging.getLogger("compressor").setLevel(logging.WARNING)
    source = resolve_model_ref(model, trust_remote_code=trust_remote_code)
    sources = [source.path, data, recipe]
    check_output(output, overwrite=overwrite, sources=sources)
    options = calibration_options(load_recipe(recipe).recipe if recipe else None, **_overrides(kwargs))
    samples = load_samples(data, limit=options.num_samples, allow_outside=allow_outside_data)  # before minutes of loading
    gpus = group.gpus(torch.cuda.device_count()) if placement.device_map else None
    with output_lock(output) if group.is_main else nullcontext():  # rank 0 writes; a second writer fails now
        loaded = load_model(source, device=group.device(device), dtype=dtype, placement=placement, gpus=gpus, auto_dtype="compute")
        report, _ = run_calibration(loaded, data, options, samples=samples, progress=_progress() and group.is_main, group=group)
        if group.is_main:
            with staged_file(output, overwrite=overwrite, sources=sources) as staging:
                report.save(staging)
            processes = f" by {group.world_size} processes" if group.distributed else ""
            click.echo(
                f"calibrated {report.num_blocks} blocks on {report.data['num_samples']} samples{processes} "
                f"in {report.elapsed_s:.2f}s -> {output}"
            )
    group.barrier()  # nobody leaves before the report is written
    distributed.finish(group)


@cli.group("recipe")
def recipe_group() -> None:
    """Work with recipe files."""


@recipe_group.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@_verbosity
def recipe_check(files: tuple[Path, ...]) -> None:
    """Validate recipe FILES (no model needed); report every problem of every file."""
    from .errors import RecipeError
    from .recipe import load_recipe

    failures: list[str] = []
    for file in files:
        try:
            recipe = load_recipe(file).recipe
        except RecipeError as error:
            failures.append(str(error))
            continue
        click.echo(f"ok: {file} ({recipe.name}: {recipe.select.op})")
    if failures:
        raise RecipeError("\n\n".join(failures))


@cli.command("plan")
@click.option("--recipe", required=True, type=click.Path(path_type=Path))
@click.option("--calibration", type=click.Path(path_type=Path), help="Report from `compressor calibrate`.")
@click.option("--model", help="Model folder or Hub id (only its config is read) when there is no report.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write the plan as JSON.")
@click.option("--overwrite", is_flag=True)
@_trust_option
@_verbosity
def plan_command(
    recipe: Path, calibration: Path | None, model: str | None, output: Path | None, overwrite: bool, trust_remote_code: bool
) -> None:
    """Print which blocks RECIPE removes, why, and what remains."""
    from .architectures import adapter_for_config, blocks_of_folder
    from .calibration_report import CalibrationReport
    from .errors import InputError
    from .hub import resolve_model_ref
    from .planner import plan
    from .recipe import load_recipe
    from .staging import check_output, staged_file

    source = resolve_model_ref(model, trust_remote_code=trust_remote_code) if model is not None else None
    sources = [recipe, calibration, source.path if source else None]
    if output:
        check_output(output, overwrite=overwrite, sources=sources)
    recipe_file = load_recipe(recipe)
    report = CalibrationReport.load(calibration) if calibration else None
    limits = None  # the report's record of what the family forbids removing, unless --model says
    if source is not None:
        from .pipeline import block_limits_of_folder

        limits = block_limits_of_folder(source.path, source)
    if report is not None:
        num_blocks = report.num_blocks
    elif source is not None:
        found = blocks_of_folder(source.path)  # config.json as JSON: no transformers import
        if found is None:
            from .loading import load_config

            config = load_config(source.path, trust_remote_code=source.trust_remote_code)
            found = adapter_for_config(config), adapter_for_config(config).num_blocks(config)
        num_blocks = found[1]
    else:
        raise InputError(
            "`compressor plan` needs --calibration (or --model for an explicit recipe).",
            fix="run `compressor calibrate MODEL --data D -o calibration.json` first.",
        )
    # The plan carries its recipe: `prune --plan` then keeps the recipe's validation gates.
    surgery_plan = replace(plan(recipe_file.recipe, num_blocks, report, limits), recipe_text=recipe_file.text)
    click.echo(surgery_plan.describe())
    if output:
        with staged_file(output, overwrite=overwrite, sources=sources) as staging:
            surgery_plan.save(staging)
        click.echo(f"plan written to {output}")


@cli.command("prune")
@click.argument("model")
@click.option("--recipe", type=click.Path(path_type=Path), help="Recipe that selects the blocks.")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), help="Apply a saved plan.json instead of a recipe.")
@click.option("--data", type=click.Path(path_type=Path), help="Calibrate on this JSONL first.")
@click.option("--calibration", type=click.Path(path_type=Path), help="Use an existing calibration report.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Checkpoint folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--dry-run", is_flag=True, help="Print the plan (calibrating if needed) and write nothing.")
@click.option(
    "--out-of-core",
    is_flag=True,
    help="Rewrite the safetensors files directly, one tensor at a time, without loading the model.",
)
@click.option("--onnx/--no-onnx", default=None, help="Also write verified ONNX graphs in OUTPUT/onnx [recipe's export.formats].")
@click.option(
    "--probe-adapter",
    is_flag=True,
    help="For a family without a written adapter: prune with the one `compressor arch probe` proposes, only when it "
    "classifies every block-tied field and the export-time proof passes (--verify reload/none are refused). Off: refused.",
)
@_verify_option
@_calibration_options
@_placement_options
@_device_options
@_trust_option
@_outside_option
@_verbosity
def prune_command(
    model: str,
    recipe: Path | None,
    plan_file: Path | None,
    data: Path | None,
    calibration: Path | None,
    output: Path,
    overwrite: bool,
    dry_run: bool,
    out_of_core: bool,
    onnx: bool | None,
    probe_adapter: bool,
    verify: str | None,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    allow_outside_data: bool,
    **kwargs: Any,
) -> None:
    """Remove the blocks a recipe (or a saved plan) selects from MODEL; write a verified HF checkpoint."""
    from .pipeline import prune, prune_out_of_core
    from .recipe import load_recipe

    _single_process("prune")
    recipe_file = load_recipe(recipe) if recipe else None
    if out_of_core:
        # The placement options are refused unparsed: `_placement` imports torch, which this path never needs.
        placed = [f"--{key.replace('_', '-')}" for key in ("device_map", "max_memory", "offload_folder") if kwargs.get(key)]
        if placed:
            raise InputError(f"--out-of-core loads no model, so {placed[0]} has nothing to place.", fix="drop one of them.")
        if data is not None:
            raise InputError(
                "--out-of-core cannot calibrate on --data: calibration needs the model in memory.",
                fix="run `compressor calibrate` first and pass --calibration, or drop --out-of-core.",
            )
        result = prune_out_of_core(
            model,
            output,
            recipe_file=recipe_file,
            plan_file=plan_file,
            calibration=calibration,
            overwrite=overwrite,
            dry_run=dry_run,
            onnx=onnx,
            trust_remote_code=trust_remote_code,
            verify=verify,
            probe_adapter=probe_adapter,
        )
    else:
        placement = _placement(kwargs)
        result = prune(
            model,
            output,
            recipe_file=recipe_file,
            plan_file=plan_file,
            data=data,
            calibration=calibration,
            overwrite=overwrite,
            device=device,
            dtype=dtype,
            progress=_progress(),
            dry_run=dry_run,
            onnx=onnx,
            placement=placement,
            allow_outside_data=allow_outside_data,
            trust_remote_code=trust_remote_code,
            verify=verify,
            probe_adapter=probe_adapter,
            **_overrides(kwargs),
        )
    _report_prune(result)


def _single_process(command: str) -> None:
    """prune and run write one checkpoint; only calibration is data-parallel."""
    from .distributed import from_environment

    if from_environment().distributed:
        raise InputError(
            f"`compressor {command}` runs in one process, but this one was started by a launcher (WORLD_SIZE > 1).",
            fix="calibrate data-parallel (`torchrun --nproc-per-node N -m compressor calibrate MODEL --data D -o calibration.json`), "
            f"then run `compressor {command} ... --calibration calibration.json` once, without the launcher.",
        )


@cli.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--model", help="Model folder or Hub id [recipe's `model:`].")
@click.option("--data", type=click.Path(path_type=Path), help="Calibration JSONL [recipe's calibration.data].")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), help="Evaluation JSONL: validate and gate [recipe's validate.data].")
@click.option("--heal-data", type=click.Path(path_type=Path), help="Training JSONL for the recipe's heal: section [its data].")
@click.option("--no-latency", is_flag=True, help="Validate accuracy only.")
@click.option("--onnx/--no-onnx", default=None, help="Also write verified ONNX graphs in OUTPUT/hf/onnx [recipe's export.formats].")
@_verify_option
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Folder for everything of the run.")
@click.option("--overwrite", is_flag=True)
@click.option("--push", "push_to", metavar="ORG/NAME", help="After a passing validation, push OUTPUT to this Hub repository.")
@click.option("--push-private", is_flag=True, help="With --push: create the repository private.")
@click.option(
    "--allow-no-gates",
    is_flag=True,
    help="With evaluation data: exit 0 when the recipe sets no gate (the verdict still says NO-GATES). Off: exit 1.",
)
@_calibration_options
@_placement_options
@_device_options
@_trust_option
@_outside_option
@_verbosity
@click.pass_context
def run_command(
    ctx: click.Context,
    recipe: Path,
    model: str | None,
    data: Path | None,
    eval_data: Path | None,
    heal_data: Path | None,
    no_latency: bool,
    onnx: bool | None,
    verify: str | None,
    output: Path,
    overwrite: bool,
    push_to: str | None,
    push_private: bool,
    allow_no_gates: bool,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    allow_outside_data: bool,
    **kwargs: Any,
) -> None:
    """Run the whole chain RECIPE describes: calibrate → plan → prune → export (→ validate → push).

    With evaluation data the recipe's validate: gates decide the exit code, as for `validate`."""
    from .pipeline import run
    from .push import check_repo_id, prepare, push, resolve_token
    from .recipe import load_recipe
    from .validate import Gates

    placement = _placement(kwargs)
    _single_process("run")
    recipe_file = load_recipe(recipe)
    if push_to:  # everything push needs is checked before hours of calibration, not after
        check_repo_id(push_to)
        resolve_token()
        if eval_data is None and not (recipe_file.recipe.thresholds and recipe_file.recipe.thresholds.data):
            raise InputError(
                "--push publishes only after a passing validation, and this run has no evaluation data.",
                fix="pass --eval FILE.jsonl (or set validate.data in the recipe).",
            )
        if not Gates.from_thresholds(recipe_file.recipe.thresholds).active:
            raise InputError(
                "--push publishes only after a passing validation, and the recipe's validate: section sets no gate.",
                fix="add a gate to the recipe (e.g. validate: {max_accuracy_drop: 0.05}).",
            )
    result = run(
        recipe_file,
        output,
        model_ref=model,
        data=data,
        eval_data=eval_data,
        heal_data=heal_data,
        validate_options={"latency": not no_latency},
        onnx=onnx,
        overwrite=overwrite,
        device=device,
        dtype=dtype,
        progress=_progress(),
        placement=placement,
        allow_outside_data=allow_outside_data,
        trust_remote_code=trust_remote_code,
        verify=verify,
        **_overrides(kwargs),
    )
    _report_prune(result)
    if result.healing is not None:
        click.echo(result.healing.describe())
    if result.validation is not None:
        log.info("validation report: %s/report.{json,md,html}", result.validation.out_dir)
        click.echo(result.validation.verdict_line())
        code = result.validation.exit_code(allow_no_gates=allow_no_gates)
        if not result.validation.passed:
            if push_to:
                click.echo(f"not pushed to {push_to}: the validation gate failed")
            ctx.exit(code)
    if push_to:
        _report_push(push(prepare(output, push_to), private=push_private))


def _report_prune(result: Any) -> None:
    click.echo(result.plan.describe())
    e = result.export
    if e is None:
        click.echo("dry run: nothing written")
        return
    click.echo(f"parameters: {e.params_before:,} -> {e.params_after:,} ({e.params_after / e.params_before:.1%})")
    if hasattr(e, "tensors_in"):
        click.echo(
            f"wrote {e.path} out of core ({e.tensors_in} -> {e.tensors_out} tensors, {e.bytes_written / 1e9:.3g} GB; "
            "headers re-read and checked against the plan)"
        )
    else:
        click.echo(f"wrote {e.path}")
    if getattr(result, "replacement", None) is not None:
        click.echo(result.replacement.describe())
    for check in result.checks:
        if check.check == "skip-equivalence":
            click.echo(
                f"reloaded and verified against the original with blocks {result.plan.removed_indices} skipped at run time: "
                f"max |Δlogits| = {check.max_abs_diff:.2g} on {check.samples}"
            )
        elif check.check == "hf-reload":
            diff = check.max_abs_diff
            shown = f"max |Δlogits| = {diff:.2g} vs the in-memory model" if diff is not None else "finite logits"
            click.echo(f"reloaded and verified ({shown}); not compared with the original")
        elif check.check == "none":
            click.echo(f"not verified after writing: {check.detail}")
    if getattr(result, "onnx", None) is not None:
        _report_onnx(result.onnx)


def _report_onnx(result: Any) -> None:
    click.echo(
        f"wrote {result.path} (ONNX, {result.layout} layout: {', '.join(result.graphs.values())}; "
        f"verified on {result.provider}: max |onnx - torch| = {result.max_abs_diff:.2g} over {len(result.checks)} checks, "
        f"greedy tokens of {result.client} equal to PyTorch's for {result.greedy_tokens} steps; "
        f"export {result.export_seconds:.1f} s, verification {result.verify_seconds:.1f} s)"
    )


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of block indices (e.g. 3,4)") from None


@cli.command("heal")
@click.argument("pruned")
@click.option("--teacher", required=True, help="The original model PRUNED was pruned from (folder or Hub id).")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Training JSONL (prompts; answers and images optional).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Checkpoint folder to write.")
@click.option(
    "--method",
    type=click.Choice(["distill", "lora", "full", "projector"]),
    default="distill",
    show_default=True,
    help="What trains: distill every kept block; full the chosen blocks; lora adapters on them (merged at the end); "
    "projector the multimodal projector only.",
)
@click.option("--steps", type=int, help="Optimizer steps [100 unless --token-budget].")
@click.option("--token-budget", type=int, help="Stop after training on this many tokens (instead of --steps).")
@click.option("--lr", type=float, help="Learning rate [distill 1e-5, full 5e-5, lora 1e-3, projector 1e-4].")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Samples per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--held-out", type=float, default=0.1, show_default=True, help="Share of the data kept apart for the KL and early stopping.")
@click.option("--eval-every", type=int, help="Steps between held-out KL measurements [a tenth of the run].")
@click.option("--patience", type=int, default=3, show_default=True, help="Measurements without improvement before stopping; 0 never.")
@click.option(
    "--hidden-loss",
    type=click.Choice(["mse", "cosine", "none"]),
    default="none",
    show_default=True,
    help="Also pull each kept block's output towards the output of the teacher block it was.",
)
@click.option("--hidden-weight", type=float, default=1.0, show_default=True)
@click.option("--ce-weight", type=float, default=0.0, show_default=True, help="Add cross-entropy on the answers, this much.")
@click.option("--blocks", callback=_int_list, help="Blocks full/lora train, original numbering, e.g. 3,4 [those beside each removed span].")
@click.option("--lora-rank", type=int, default=8, show_default=True)
@click.option("--lora-alpha", type=float, default=16.0, show_default=True)
@click.option("--lora-modules", help="Comma-separated linear-layer names to adapt (e.g. q_proj,v_proj) [every linear layer].")
@click.option("--max-length", type=int, default=512, show_default=True, help="Token limit per sample.")
@click.option(
    "--format",
    "text_format",
    type=click.Choice(["auto", "chat", "raw"]),
    default="auto",
    show_default=True,
    help="Sample layout: the chat template, or raw text; auto: raw when every sample is a prompt-only text.",
)
@click.option(
    "--gradient-checkpointing",
    is_flag=True,
    help="Recompute activations in the backward pass: less memory, one more forward pass of the student per step.",
)
@click.option("--checkpoint-every", type=int, default=50, show_default=True, help="Steps between resume checkpoints.")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue an interrupted run of the same command.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder written by compressor.")
@click.option(
    "--fsdp",
    is_flag=True,
    help="Under torchrun: shard both models over the processes (FSDP) instead of a whole copy on each, for a pair one GPU cannot hold.",
)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Clip the gradient norm to this; 0 never.")
@_device_options
@_trust_option
@_outside_option
@_verbosity
def heal_command(
    pruned: str,
    teacher: str,
    data: Path,
    output: Path,
    resume: bool,
    overwrite: bool,
    device: str,
    trust_remote_code: bool,
    allow_outside_data: bool,
    lora_modules: str | None,
    **kwargs: Any,
) -> None:
    """Train the pruned checkpoint PRUNED towards its original (--teacher) to recover what removing
    blocks cost; write a plain, verified HF checkpoint of the pruned shape (LoRA merged).

    Under torchrun / accelerate launch, each process trains on its slice of every step's samples
    on its own GPU (--batch-size samples per process and micro-batch), the gradients are summed,
    and rank 0 writes the resume checkpoints and the output; with --fsdp each process holds a shard
    of both models instead of whole copies."""
    from . import distributed
    from .heal import HealOptions, heal

    modules = tuple(m.strip() for m in lora_modules.split(",") if m.strip()) if lora_modules else None
    options = HealOptions(**kwargs, lora_modules=modules)
    group = distributed.current()
    if not group.is_main:  # one voice: rank 0 reports for all
        logging.getLogger("compressor").setLevel(logging.WARNING)
    result = heal(
        pruned,
        output,
        teacher=teacher,
        data=data,
        options=options,
        overwrite=overwrite,
        device=device,
        resume=resume,
        progress=_progress(),
        allow_outside_data=allow_outside_data,
        trust_remote_code=trust_remote_code,
        group=group,
    )
    if group.is_main:
        how = "sharded (FSDP)" if options.fsdp else "data-parallel"
        processes = f"\ntrained by {group.world_size} {how} processes" if group.distributed else ""
        click.echo(result.describe() + processes)
    distributed.finish(group)


@cli.command("export-onnx")
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Folder for the graphs [MODEL/onnx].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option(
    "--tolerance",
    type=click.FloatRange(0, 1, min_open=True),
    default=1e-4,
    show_default=True,
    help="Bound on max |onnx - torch| per output, relative to max(1, max |torch|).",
)
@click.option("--cpu-only", is_flag=True, help="Verify with ONNX Runtime's CPU provider even where CUDA is available.")
@_trust_option
@_verbosity
def export_onnx_command(
    model: str, output: Path | None, overwrite: bool, tolerance: float, cpu_only: bool, trust_remote_code: bool
) -> None:
    """Export MODEL (a checkpoint folder or Hub id) to ONNX and verify it against PyTorch.

    Text decoders: one model.onnx with KV cache and genai_config.json (onnxruntime-genai's og.Model loads it).
    Vision-language models: vision_encoder.onnx + embed_tokens.onnx + decoder_model_merged.onnx.
    """
    from .hub import resolve_model_ref
    from .onnx_export import export_onnx
    from .staging import check_output

    source = resolve_model_ref(model, trust_remote_code=trust_remote_code)
    if output is None:
        output = source.path / "onnx"
    check_output(output, overwrite=overwrite, hosts=[source.path])  # into the model folder, never over it
    _report_onnx(export_onnx(source, output, overwrite=overwrite, tolerance=tolerance, prefer_cuda=not cpu_only))


@cli.command("validate")
@click.option("--base", required=True, help="The original model (folder or Hub id).")
@click.option("--pruned", required=True, help="The pruned checkpoint folder.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Evaluation JSONL.")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    type=click.Choice(["vqa", "multiple_choice", "perplexity", "fidelity"]),
    help="Tasks to run (repeatable) [every task the data supports].",
)
@click.option(
    "--max-accuracy-drop", type=click.FloatRange(0, 1), help="Gate: absolute accuracy drop, 0.05 = 5 points (needs labelled samples)."
)
@click.option("--max-relative-drop", type=click.FloatRange(0, 1), help="Gate: drop as a fraction of the original accuracy.")
@click.option(
    "--max-perplexity-increase",
    type=click.FloatRange(min=0),
    help="Gate: pruned perplexity at most this much above the base's, 0.1 = 10 % (needs prompt-only text samples).",
)
@click.option("--max-kl", type=click.FloatRange(min=0), help="Gate: mean KL(base || pruned) over every scored position.")
@click.option("--min-top1-agreement", type=click.FloatRange(0, 1), help="Gate: share of scored positions where both models agree on top-1.")
@click.option("--min-speedup", type=click.FloatRange(0, min_open=True), help="Gate: median speedup over the latency workloads.")
@click.option(
    "--max-runtime-accuracy-drop",
    type=click.FloatRange(0, 1),
    help="Gate: the base model's exact-match drop under the run-time modes vs plain, 0.05 = 5 points (needs a run-time mode).",
)
@click.option(
    "--visual-keep",
    type=float,
    metavar="R",
    help="Run-time mode: keep this share of image tokens, in (0, 1], from --visual-cut/--visual-depth on (FastV, SGL) "
    "[recipe's runtime.keep].",
)
@click.option("--visual-cut", type=int, metavar="K", help="First block where image tokens are pruned, original numbering.")
@click.option("--visual-depth", type=float, metavar="F", help="The cut as a fraction of the depth, in [0, 1).")
@click.option(
    "--ranking",
    type=click.Choice(["self", "guide", "random"]),
    help="Which image tokens --visual-keep keeps: by the model's attention (self, FastV), the guide's (SGL), or at random [self].",
)
@click.option(
    "--guide",
    metavar="MODEL|pruned",
    help="SGL guide for --ranking guide and --early-exit: 'pruned' (the pruned checkpoint guides the original) or a model "
    "of the same family and tokenizer.",
)
@click.option("--early-exit", type=float, metavar="T", help="Run-time mode: SGL early exit at guide confidence T, in (0, 1].")
@click.option(
    "--visual-band",
    metavar="A-B",
    help="Run-time mode: image tokens take part only in blocks A..B (Skip-It), inclusive, original numbering.",
)
@click.option("--no-runtime", is_flag=True, help="Ignore the recipe's runtime: section (run-time modes only from the flags).")
@click.option(
    "--recipe",
    type=click.Path(path_type=Path),
    help="Take gates (and run-time modes) from this recipe's validate: (and runtime:) [the pruned folder's recipe.yaml].",
)
@click.option(
    "--allow-no-gates", is_flag=True, help="Exit 0 when no gate is set (the verdict still says NO-GATES, never PASS). Off: exit 1."
)
@click.option(
    "--no-recipe-gates",
    is_flag=True,
    help="Gate only on the options given here, not on the recipe's validate: section (e.g. a perplexity gate on plain text "
    "for a model whose recipe gates accuracy).",
)
@click.option(
    "--format",
    "text_format",
    type=click.Choice(["auto", "chat", "raw"]),
    default="auto",
    show_default=True,
    help="Sample layout: raw text (no chat template) or the chat template; auto: raw for prompt-only text, chat otherwise.",
)
@click.option("--num-samples", type=click.IntRange(min=1), help="Use the first N samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--no-latency", is_flag=True, help="Skip latency measurements.")
@click.option(
    "--prompt-length", "prompt_lengths", type=click.IntRange(min=1), multiple=True, help="Prefill prompt length (repeatable) [64 256]."
)
@click.option("--new-tokens", type=click.IntRange(min=2), default=32, show_default=True, help="Tokens per decode measurement.")
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True, help="Timed repeats per workload.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Report folder (report.json/.md/.html).")
@click.option("--junit", type=click.Path(path_type=Path), help="Also write the gates as JUnit XML.")
@click.option("--overwrite", is_flag=True)
@_placement_options
@_device_options
@_trust_option
@_outside_option
@_verbosity
@click.pass_context
def validate_command(
    ctx: click.Context,
    base: str,
    pruned: str,
    data: Path,
    tasks: tuple[str, ...],
    max_accuracy_drop: float | None,
    max_relative_drop: float | None,
    max_perplexity_increase: float | None,
    max_kl: float | None,
    min_top1_agreement: float | None,
    min_speedup: float | None,
    max_runtime_accuracy_drop: float | None,
    visual_keep: float | None,
    visual_cut: int | None,
    visual_depth: float | None,
    ranking: str | None,
    guide: str | None,
    early_exit: float | None,
    visual_band: str | None,
    no_runtime: bool,
    recipe: Path | None,
    allow_no_gates: bool,
    no_recipe_gates: bool,
    text_format: str,
    num_samples: int | None,
    batch_size: int,
    max_new_tokens: int,
    no_latency: bool,
    prompt_lengths: tuple[int, ...],
    new_tokens: int,
    repeats: int,
    output: Path,
    junit: Path | None,
    overwrite: bool,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    allow_outside_data: bool,
    **kwargs: Any,
) -> None:
    """Compare a pruned model with its original: accuracy, perplexity, fidelity, latency.

    With --visual-keep, --visual-band or --early-exit (or a recipe's runtime: section) the report
    also measures those run-time visual-token modes against plain generation.

    Exit 1 when a gate fails or when no gate was set (unless --allow-no-gates); 2 when a gate
    cannot be evaluated on the data (checked before the models load)."""
    from .validate import TASKS, Gates, runtime_from_recipe, thresholds_from_recipe, validate
    from .validate_runtime import runtime_request

    pruned_dir = Path(pruned)
    if no_recipe_gates and recipe:
        raise InputError("--no-recipe-gates and --recipe contradict each other.", fix="drop one of them.")
    gates = (Gates() if no_recipe_gates else thresholds_from_recipe(pruned_dir, recipe)).override(
        max_accuracy_drop=max_accuracy_drop,
        max_relative_drop=max_relative_drop,
        max_perplexity_increase=max_perplexity_increase,
        max_kl=max_kl,
        min_top1_agreement=min_top1_agreement,
        min_speedup=min_speedup,
        max_runtime_accuracy_drop=max_runtime_accuracy_drop,
    )
    section, section_file = (None, None) if no_runtime else runtime_from_recipe(pruned_dir, recipe)
    runtime = runtime_request(
        section,
        recipe=section_file,
        keep=visual_keep,
        cut=visual_cut,
        depth=visual_depth,
        ranking=ranking,
        guide=guide,
        early_exit=early_exit,
        band=visual_band,
    )
    latency_options = {"new_tokens": new_tokens, "repeats": repeats}
    if prompt_lengths:
        latency_options["prompt_lengths"] = prompt_lengths
    result = validate(
        base,
        pruned,
        data,
        output,
        gates=gates,
        tasks=tasks or TASKS,
        num_samples=num_samples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        latency=not no_latency,
        latency_options=latency_options,
        device=device,
        dtype=dtype,
        overwrite=overwrite,
        junit=junit,
        placement=_placement(kwargs),
        allow_outside_data=allow_outside_data,
        trust_remote_code=trust_remote_code,
        text_format=text_format,
        runtime=runtime,
    )
    log.info("%s\nreport: %s/report.{json,md,html}", result.report["verdict"]["summary"], result.out_dir)
    click.echo(result.verdict_line())
    ctx.exit(result.exit_code(allow_no_gates=allow_no_gates))


@cli.command("push")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="Target repository, ORG/NAME (created if needed).")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one keeps its visibility).")
@click.option("--revision", help="Branch to push to (created from main if needed) [main].")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--commit-message", help="Commit title [a summary of the pruning].")
@click.option("--report", type=click.Path(path_type=Path), help="Validation report (report.json or its folder) [FOLDER/report of a run].")
@click.option("--license", "license_", help="Licence for the card [the base model's, when its card states one].")
@click.option("--dry-run", is_flag=True, help="Print the files, sizes, target and card; upload nothing (no token needed).")
@click.option("--force", is_flag=True, help="Push even if the folder changed since export or its validation gate failed.")
@_verbosity
def push_command(
    folder: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    create_pr: bool,
    commit_message: str | None,
    report: Path | None,
    license_: str | None,
    dry_run: bool,
    force: bool,
) -> None:
    """Upload a pruned checkpoint (a `prune` or `run` folder) to the Hugging Face Hub with a fresh model card."""
    from .push import prepare, push

    plan = prepare(folder, repo_id, report=report, license=license_, force=force)
    if dry_run:
        click.echo(plan.describe(private=private, revision=revision, create_pr=create_pr))
        click.echo("\n--- README.md ---\n" + plan.card)
        click.echo("dry run: nothing uploaded")
        return
    _report_push(push(plan, private=private, revision=revision, create_pr=create_pr, commit_message=commit_message))


def _report_push(result: Any) -> None:
    click.echo(f"{'created' if result.created_repo else 'updated'} {result.repo_url}")
    click.echo(f"commit: {result.commit_url} ({result.verified} files verified on the Hub: sizes and hashes)")
    if result.pr_url:
        click.echo(f"pull request: {result.pr_url}")
    if result.deleted:
        click.echo(f"removed stale files: {', '.join(result.deleted)}")


@cli.command("demo")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("exports/demo"), show_default=True)
@click.option("--recipe", type=click.Path(path_type=Path), help="Recipe to apply [the recommended shipped one].")
@click.option("--retrain", is_flag=True, help="Ignore the cached demo model and train again.")
@click.option(
    "--overwrite/--no-overwrite",
    default=True,
    show_default=True,
    help="Replace the demo's own earlier output (never a folder it did not write).",
)
@_verbosity
def demo_command(output: Path, recipe: Path | None, retrain: bool, overwrite: bool) -> None:
    """Train (once, cached) a small LLaVA on generated shapes, prune it, compare accuracy."""
    from .demo.run import run_demo

    summary = run_demo(output, recipe=recipe, retrain=retrain, overwrite=overwrite, progress=_progress())
    click.echo(summary.describe())
    click.echo(summary.verdict_line)


@cli.command("generate")
@click.argument("model")
@click.option("--prompt", required=True, help="The question, sent through MODEL's chat template as `validate` asks its questions.")
@click.option("--image", type=click.Path(path_type=Path), help="The image the prompt is about (vision-language models).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--visual-keep", type=float, metavar="R", help="Share of image tokens that take part from the cut on, in (0, 1]. [1: every one]"
)
@click.option(
    "--visual-cut",
    type=int,
    metavar="K",
    help="The first block where only --visual-keep of them take part (0-based; negative from the end).",
)
@click.option("--visual-depth", type=float, metavar="F", help="The cut as a fraction of the depth, in [0, 1): block floor(F x blocks).")
@click.option(
    "--ranking",
    type=click.Choice(["self", "guide", "random"]),
    help="Which image tokens --visual-keep keeps: self (FastV: MODEL's attention at the block before the cut), "
    "guide (SGL: the --guide model's attention), random. [self]",
)
@click.option(
    "--self-queries",
    type=click.Choice(["text", "last"]),
    help="For --ranking self: the attention of every text token, or of the last prompt token. [text]",
)
@click.option("--seed", type=int, help="For --ranking random. [0]")
@click.option(
    "--guide",
    metavar="GUIDE_MODEL",
    help="SGL's small guide (e.g. the pruned checkpoint of MODEL: same family and tokenizer), for --ranking guide and --early-exit.",
)
@click.option(
    "--early-exit",
    type=float,
    metavar="T",
    help="SGL: return the guide's answer, MODEL skipped, when the guide's confidence is at least T in (0, 1] "
    "and its answer stays the same with 5% of the image tokens.",
)
@click.option(
    "--visual-band",
    metavar="A-B",
    help="Skip-It: image tokens take part only in blocks A..B (0-based, inclusive; negative from the end: 2--1).",
)
@click.option(
    "--band-from",
    type=click.Path(path_type=Path),
    metavar="CALIBRATION.json",
    help="Skip-It: choose the band from MODEL's calibration report (`compressor calibrate`), by --band-where.",
)
@click.option(
    "--band-where",
    multiple=True,
    metavar="CONDITION",
    help="With --band-from: image tokens are redundant in a block where every condition holds; the band is the smallest "
    "span of blocks holding every other block. A condition is written as a recipe's select.where entry, as KEY=VALUE "
    "pairs: 'metric=block_influence,modality=image,below=0.05' (metric, modality, below or above, epsilon). Repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the same facts instead of text.")
@_device_options
@_trust_option
@_verbosity
def generate_command(model: str, as_json: bool, **kwargs: Any) -> None:
    """Answer --prompt (about --image) with MODEL, greedily, optionally with fewer image tokens at run time.

    Prints the answer, the image tokens that took part in each block, the guide's confidence and
    whether the early exit fired, and a FLOPs estimate (decoder blocks) against the plain model.
    Without visual options this is MODEL's own greedy answer, as `validate` generates it."""
    import json

    from .runtime import Request, answer

    mapping = {"visual_keep": "keep", "visual_cut": "cut", "visual_depth": "depth", "visual_band": "band"}
    fields = {mapping.get(key, key): value for key, value in kwargs.items()}
    fields["band_where"] = tuple(fields["band_where"])
    result = answer(Request(model=model, **fields))
    click.echo(json.dumps(result.to_dict()) if as_json else result.describe())


@cli.group("arch")
def arch_group() -> None:
    """Model families: the supported ones and their rules, and a proposed adapter for another."""


@arch_group.command("list")
@_verbosity
def arch_list() -> None:
    """Show the supported families and what each supports."""
    from .architectures import ADAPTERS
    from .block_limits import rule_notes
    from .versions import family_available, installed, requirement

    click.echo(f"transformers {installed('transformers') or 'not installed'}\n")
    header = (
        "family",
        "architectures",
        "this transformers",
        "blocks at",
        "block count",
        "modality split",
        "out-of-core",
        "onnx",
        "per-layer config",
    )
    rows = [
        (
            a.family,
            ", ".join(a.architectures),
            "yes" if family_available(a) else f"no: needs {requirement(a)}",
            a.block_paths[0],
            a.count_path,
            "image/text/all" if a.modality_split else "text/all",
            # Every family's on-disk block names are known (tensor_prefix), tested per family.
            f"yes ({a.tensor_prefix.format(index='N')})",
            ("yes: " if a.onnx_support[0] else "no: ") + a.onnx_support[1],
            ", ".join(a.config_keys) or "-",
        )
        for a in ADAPTERS
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    click.echo(
        "\nblock-tied rules: what removing blocks does to each field (the same rules in memory and out of core; "
        "`compressor arch probe MODEL` proposes them for a family without an adapter):"
    )
    rules = [("family", "field", "rule", "why")]
    for a in ADAPTERS:
        rules += [(a.family if i == 0 else "", r.field, r.kind, r.reason) for i, r in enumerate(a.rules())]
    widths = [max(len(r[i]) for r in rules) for i in range(3)]
    for row in rules:  # indented: the family table above is the one with a row per family
        click.echo("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, [*widths, 0])).rstrip())
    notes = [f"  {a.family}: {note}" for a in ADAPTERS for note in (*a.notes, *rule_notes(a))]
    if notes:
        click.echo("\nnotes:\n" + "\n".join(notes))


@arch_group.command("probe")
@click.argument("model")
@_trust_option
@_verbosity
def arch_probe_command(model: str, trust_remote_code: bool) -> None:
    """Propose an adapter for MODEL's family (folder or Hub id) from its config, its skeleton on the meta
    device and its safetensors headers (no weights loaded): the decoder blocks, every block-tied field with
    the rule proposed for it (or UNCLASSIFIED, and why), and the `Adapter(...)` literal."""
    from .arch_probe import probe_model
    from .hub import resolve_model_ref

    click.echo(probe_model(resolve_model_ref(model, trust_remote_code=trust_remote_code)).describe())


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and map failures to exit codes (2 usage, 1 gate/bug)."""
    from .manifest import record_invocation

    record_invocation(list(argv) if argv is not None else sys.argv[1:])
    try:
        code = cli.main(args=argv, prog_name="compressor", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as error:
        error.show()
        return 2
    except CompressorError as error:
        if _state["verbose"]:
            log.exception("traceback:")
        click.echo(f"error: {error}", err=True)
        return error.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as error:  # a bug in compressor, not the user's input
        if _state["verbose"]:
            raise
        click.echo(f"internal error: {type(error).__name__}: {error}\n(run again with -v for the traceback)", err=True)
        return 1
    return code if isinstance(code, int) else 0


def entry_point() -> None:
    sys.exit(main())
