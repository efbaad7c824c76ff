"""Validation: original vs pruned on the same samples, a report, and a gate CI can trust.

Owns the choice of tasks for a data file, the gates and their verdict, how much evidence
backs each figure, the report's JSON schema (``compressor.validation/1``) and the JUnit
rendering of the gates. Scoring lives in `accuracy` (its docstring says which tokens are
scored), timing in `latency`, markdown/HTML in `report_render`.

Tasks follow from what the samples carry: ``choices`` → multiple choice by log-likelihood;
an ``answer`` → generative VQA (greedy, normalised exact match and contains-match); prompt
only, no image → perplexity of the raw text; every sample → fidelity (KL and top-1
agreement with the original at every scored position). Both models see the same samples
with the same decoding.

Gates read the figures the data can give: accuracy gates need labelled samples, the
perplexity gate prompt-only text, fidelity gates any sample, the speedup gate latency. A
requested gate the data cannot evaluate is an input error before any model loads, and a
run that evaluated no gate never passes: its verdict is NO-GATES.

Asked for run-time visual-token modes (`RuntimeRequest`: validate's --visual-* flags or a
recipe's ``runtime:`` section), the report gains a ``runtime`` section: the original model (and
the pruned one) with the mode vs plain on the answered samples (`validate_runtime`). Without
them the report has no such key.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape, quoteattr

from . import accuracy as scoring
from . import validate_runtime as runtime_checks
from .accuracy import FORMATS, Format, is_text
from .data import load_samples
from .errors import InputError
from .hub import ModelSource, resolve_model_ref
from .latency import compare_latency, find_onnx, measure_latency
from .loading import Placement, input_device, load_model
from .planner import SurgeryPlan
from .provenance import environment
from .recipe import load_recipe
from .report_render import write_html, write_markdown
from .staging import check_output, output_lock, staged_dir, staged_file
from .surgery import count_parameters
from .validate_runtime import RuntimeRequest

if TYPE_CHECKING:
    from .recipe import Recipe, RuntimeSection

log = logging.getLogger(__name__)

REPORT_FORMAT = "compressor.validation/1"
TASKS = ("vqa", "multiple_choice", "perplexity", "fidelity")

# Evidence below these is flagged weak in the report and the verdict (it still gates).
# Samples are the independent units (tokens of one sample are correlated), so every figure
# needs enough of them: below 30, one sample moves an accuracy by more than 3 points and its
# binomial standard error reaches 9 points (0.5 / sqrt(30)), more than the 2-5 point drops
# gates usually allow.
MIN_SAMPLES = 30
# A token-level mean (perplexity, mean KL, top-1 agreement) over fewer than 100 positions is
# decided by a handful of tokens: top-1 agreement's standard error reaches 5 points
# (0.5 / sqrt(100)) and one badly predicted token is at least 1 % of the mean.
MIN_POSITIONS = 100


@dataclass(frozen=True)
class Gates:
    """Release thresholds; None means not gated.

    ``max_accuracy_drop`` is absolute (0.05 = five points of accuracy), ``max_relative_drop``
    is the drop as a fraction of the original accuracy (both read VQA exact match, else
    multiple choice); ``max_perplexity_increase`` is relative (0.1 = the pruned perplexity
    at most 10 % above the base's); ``max_kl`` bounds the mean KL(base ‖ pruned) and
    ``min_top1_agreement`` the share of positions where both models rank the same token
    first; ``min_speedup`` holds when the median speedup over the measured workloads (each
    prefill and decode setting) reaches it. ``max_runtime_accuracy_drop`` bounds the original
    model's exact-match drop under the run-time modes vs plain generation (absolute; needs a
    run-time mode: the pruned checkpoint is gated by the others).
    """

    max_accuracy_drop: float | None = None
    max_relative_drop: float | None = None
    max_perplexity_increase: float | None = None
    max_kl: float | None = None
    min_top1_agreement: float | None = None
    min_speedup: float | None = None
    max_runtime_accuracy_drop: float | None = None

    @classmethod
    def from_thresholds(cls, thresholds: Any) -> Gates:
        """The gates of a recipe's `validate:` section (`recipe.ValidateThresholds`, or None)."""
        return cls(**{f.name: getattr(thresholds, f.name) for f in fields(cls)}) if thresholds is not None else cls()

    def override(self, **values: float | None) -> Gates:
        """These gates, with every value that is not None in ``values`` taking precedence."""
        return Gates(**{f.name: values.get(f.name) if values.get(f.name) is not None else getattr(self, f.name) for f in fields(self)})

    @property
    def active(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class ValidationResult:
    report: dict[str, Any]
    out_dir: Path

    @property
    def passed(self) -> bool:
        """Every gate held, and there was at least one."""
        return bool(self.report["verdict"]["passed"])

    @property
    def status(self) -> str:
        return self.report["verdict"]["status"]

    def exit_code(self, *, allow_no_gates: bool = False) -> int:
        """0 when the gates held (or none were asked for and that is allowed), else 1."""
        return 0 if self.passed or (allow_no_gates and self.status == NO_GATES) else 1

    def verdict_line(self) -> str:
        """One machine-readable line: PASS/FAIL/NO-GATES, name=value(op threshold) per gate,
        then ``weak-evidence=`` the figures that too few samples or positions back."""
        return verdict_line(self.report["verdict"])


NO_GATES = "NO-GATES"


def verdict_line(verdict: dict[str, Any]) -> str:
    parts = [f"compressor-verdict: {verdict['status']}"]
    if verdict["status"] == NO_GATES:
        parts.append("no gates evaluated")
    for gate in verdict["gates"]:
        value = "n/a" if gate["value"] is None else f"{gate['value']:.4g}"
        parts.append(f"{gate['name']}={value}({gate['op']}{gate['threshold']:g}):{'ok' if gate['passed'] else 'FAILED'}")
    if verdict.get("weak_evidence"):
        parts.append("weak-evidence=" + ",".join(verdict["weak_evidence"]))
    return " ".join(parts)


def primary_accuracy(tasks: dict[str, Any]) -> tuple[str, float, float] | None:
    """The accuracy the gates read: VQA exact match, else multiple choice."""
    for name in ("vqa", "multiple_choice"):
        task = tasks.get(name)
        if task and task.get("base") is not None:
            return name, task["base"], task["pruned"]
    return None


def evaluate_gates(report: dict[str, Any], gates: Gates) -> dict[str, Any]:
    """The verdict: each requested gate against its figure. A gate whose figure is missing
    fails (value n/a); with no gate at all the status is NO-GATES, never PASS."""
    tasks, fidelity = report["accuracy"]["tasks"], report["accuracy"].get("fidelity") or {}
    results = []
    primary = primary_accuracy(tasks)
    task, base, pruned = primary if primary is not None else ("accuracy", None, None)
    drop = base - pruned if primary is not None else None
    missing = "no labelled sample was scored"
    if gates.max_accuracy_drop is not None:
        detail = (
            f"{task} accuracy {base:.1%} -> {pruned:.1%}: drop {drop * 100:.1f} points (max {gates.max_accuracy_drop * 100:.1f})"
            if drop is not None
            else missing
        )
        results.append(_gate("max_accuracy_drop", "<=", gates.max_accuracy_drop, drop, detail, task))
    if gates.max_relative_drop is not None:
        relative = None if drop is None else drop / base if base > 0 else 0.0
        detail = (
            f"{task} accuracy fell by {relative:.1%} of the original (max {gates.max_relative_drop:.1%})"
            if relative is not None
            else missing
        )
        results.append(_gate("max_relative_drop", "<=", gates.max_relative_drop, relative, detail, task))
    if gates.max_perplexity_increase is not None:
        ppl = tasks.get("perplexity") or {}
        before, after = ppl.get("base"), ppl.get("pruned")
        increase = after / before - 1 if before and after is not None else None
        detail = (
            f"perplexity {before:.4g} -> {after:.4g} on {ppl['tokens']} tokens of {ppl['n']} texts: "
            f"{increase:+.1%} (max +{gates.max_perplexity_increase:.1%})"
            if increase is not None
            else "no prompt-only text was scored"
        )
        results.append(_gate("max_perplexity_increase", "<=", gates.max_perplexity_increase, increase, detail, "perplexity"))
    where = f"over {fidelity.get('n_positions', 0)} positions of {fidelity.get('n_samples', 0)} samples"
    if gates.max_kl is not None:
        kl = fidelity.get("kl_mean")
        detail = f"mean KL(base || pruned) {kl:.4g} {where} (max {gates.max_kl:g})" if kl is not None else "no position was compared"
        results.append(_gate("max_kl", "<=", gates.max_kl, kl, detail, "fidelity"))
    if gates.min_top1_agreement is not None:
        top1 = fidelity.get("top1_agreement")
        detail = (
            f"top-1 agreement {top1:.1%} {where} (min {gates.min_top1_agreement:.1%})" if top1 is not None else "no position was compared"
        )
        results.append(_gate("min_top1_agreement", ">=", gates.min_top1_agreement, top1, detail, "fidelity"))
    if gates.min_speedup is not None:
        # The median over workloads: one noisy workload (a shared CPU, a tiny model) must not
        # decide the release; the slowest one is named in the detail.
        speedups = _speedups(report.get("latency"))
        typical = statistics.median(speedups.values()) if speedups else None
        which = min(speedups, key=speedups.get) if speedups else "no workload"
        detail = (
            f"median speedup {typical:.2f}x over {len(speedups)} workloads (slowest {speedups[which]:.2f}x, {which}); "
            f"needs {gates.min_speedup:.2f}x"
            if typical is not None
            else "no latency was measured"
        )
        results.append(_gate("min_speedup", ">=", gates.min_speedup, typical, detail, "latency"))
    if gates.max_runtime_accuracy_drop is not None:
        runtime = (report.get("runtime") or {}).get("models", {}).get("base") or {}
        drop = runtime.get("accuracy_drop")
        detail = (
            f"base exact match {runtime['plain_accuracy']:.1%} plain -> {runtime['accuracy']:.1%} with "
            f"{report['runtime']['flags']}: drop {drop * 100:.1f} points (max {gates.max_runtime_accuracy_drop * 100:.1f})"
            if drop is not None
            else "no run-time mode was measured"
        )
        results.append(_gate("max_runtime_accuracy_drop", "<=", gates.max_runtime_accuracy_drop, drop, detail, "runtime"))
    evidence = report.get("evidence") or {}
    weak = [name for name, figure in evidence.items() if figure["weak"]]
    for gate in results:
        gate["weak_evidence"] = gate["figure"] in weak
    failed = [g["name"] for g in results if not g["passed"]]
    if not results:
        status, summary = (
            NO_GATES,
            "no gates evaluated: nothing was checked (set a gate, e.g. --max-accuracy-drop or --max-perplexity-increase, "
            "or a recipe's validate: section)",
        )
    elif failed:
        status, summary = "FAIL", f"FAIL: {', '.join(failed)}"
    else:
        status, summary = "PASS", f"PASS: {len(results)} gate(s) held"
    if weak:
        summary += "; weak evidence: " + "; ".join(f"{name} ({evidence[name]['why']})" for name in weak)
    return {"status": status, "passed": status == "PASS", "summary": summary, "gates": results, "weak_evidence": weak}


def evidence(accuracy: dict[str, Any], runtime: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per figure of the report: the samples (and scored positions) behind it, and whether
    that is weak (fewer than MIN_SAMPLES samples or MIN_POSITIONS positions)."""
    tasks, found = accuracy["tasks"], {}
    for name in ("vqa", "multiple_choice"):
        if tasks.get(name):
            found[name] = _strength(tasks[name]["n"])
    if tasks.get("perplexity"):
        found["perplexity"] = _strength(tasks["perplexity"]["n"], tasks["perplexity"]["tokens"])
    if accuracy.get("fidelity"):
        found["fidelity"] = _strength(accuracy["fidelity"]["n_samples"], accuracy["fidelity"]["n_positions"])
    if runtime is not None:
        found["runtime"] = _strength(runtime["models"]["base"]["n"])
    return found


def _strength(samples: int, positions: int | None = None) -> dict[str, Any]:
    shortfalls = [f"{samples} samples < {MIN_SAMPLES}"] if samples < MIN_SAMPLES else []
    if positions is not None and positions < MIN_POSITIONS:
        shortfalls.append(f"{positions} positions < {MIN_POSITIONS}")
    found: dict[str, Any] = {"samples": samples}
    if positions is not None:
        found["positions"] = positions
    return {**found, "weak": bool(shortfalls), "why": ", ".join(shortfalls) or None}


def _gate(name: str, op: str, threshold: float, value: float | None, detail: str, figure: str) -> dict[str, Any]:
    if value is None:
        held = False
    else:
        held = value <= threshold + 1e-12 if op == "<=" else value >= threshold - 1e-12
    margin = None if value is None else (threshold - value if op == "<=" else value - threshold)
    return {
        "name": name,
        "op": op,
        "threshold": threshold,
        "value": value,
        "margin": margin,
        "passed": held,
        "detail": detail,
        "figure": figure,  # the report figure it reads: a task, fidelity or latency
    }


def _speedups(latency: dict[str, Any] | None) -> dict[str, float]:
    if not latency or not latency.get("comparison"):
        return {}
    found = {}
    for kind in ("prefill", "decode"):
        for key, row in latency["comparison"].get(kind, {}).items():
            if row.get("speedup") is not None:
                found[f"{kind} {key}"] = row["speedup"]
    return found


def write_junit(report: dict[str, Any], path: Path | str) -> None:
    """Each gate as a JUnit test case, so CI systems show a failed gate as a failed test."""
    gates = report["verdict"]["gates"]
    failures = sum(not g["passed"] for g in gates)
    cases = []
    for gate in gates:
        body = "" if gate["passed"] else f"<failure message={quoteattr(gate['detail'])}>{escape(gate['detail'])}</failure>"
        cases.append(f'  <testcase classname="compressor.validate" name={quoteattr(gate["name"])}>{body}</testcase>')
    skipped = 0
    if not gates:  # an empty suite reads as green in most CI views: say that nothing was checked
        skipped = 1
        message = quoteattr(report["verdict"]["summary"])
        cases.append(f'  <testcase classname="compressor.validate" name="no gates evaluated"><skipped message={message}/></testcase>')
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<testsuite name="compressor.validate" tests="{len(cases)}" failures="{failures}" errors="0" skipped="{skipped}">\n'
        + "\n".join(cases)
        + "\n</testsuite>\n"
    )
    Path(path).write_text(xml)


def thresholds_from_recipe(pruned_dir: Path, recipe: Path | str | None) -> Gates:
    """The recipe's `validate:` section: an explicit --recipe, else the one exported with the model."""
    found = _recipe_of(pruned_dir, recipe)
    return Gates.from_thresholds(found.thresholds) if found is not None else Gates()


def runtime_from_recipe(pruned_dir: Path, recipe: Path | str | None) -> tuple[RuntimeSection | None, str | None]:
    """The recipe's `runtime:` section (from the same recipe as the gates) and the recipe's file name."""
    found = _recipe_of(pruned_dir, recipe)
    if found is None or found.runtime is None:
        return None, None
    return found.runtime, (Path(recipe) if recipe else pruned_dir / "recipe.yaml").name


def _recipe_of(pruned_dir: Path, recipe: Path | str | None) -> Recipe | None:
    path = Path(recipe) if recipe else Path(pruned_dir) / "recipe.yaml"
    if not path.is_file():
        if recipe:
            raise InputError(f"Recipe '{recipe}' does not exist.", fix="pass an existing recipe or drop --recipe.")
        return None
    return load_recipe(path).recipe


def data_kinds(samples: list[Any]) -> dict[str, int]:
    """How many samples of each kind the data holds: what decides which tasks (and gates) run."""
    return {
        "answered": sum(s.answer is not None and not s.choices for s in samples),
        "multiple_choice": sum(bool(s.choices) for s in samples),
        "text": sum(is_text(s) for s in samples),
        "image_prompt": sum(s.image is not None and s.answer is None for s in samples),
    }


def check_gates(gates: Gates, samples: list[Any], *, tasks: tuple[str, ...] = TASKS, latency: bool = True, runtime: bool = False) -> None:
    """Refuse, before any model loads, every requested gate these samples and options cannot
    evaluate (``runtime``: whether run-time modes are measured)."""
    kinds = data_kinds(samples)
    problems = []
    accuracy_gates = [name for name in ("max_accuracy_drop", "max_relative_drop") if getattr(gates, name) is not None]
    if accuracy_gates and not (("vqa" in tasks and kinds["answered"]) or ("multiple_choice" in tasks and kinds["multiple_choice"])):
        if kinds["answered"] or kinds["multiple_choice"]:
            needs = "the vqa or multiple_choice task (add --task vqa or --task multiple_choice)"
        else:
            needs = "labelled samples: an 'answer' (VQA, exact match) or 'choices' with an 'answer' (multiple choice)"
        problems += [f"{_flag(name)} needs {needs}" for name in accuracy_gates]
    if gates.max_perplexity_increase is not None and not ("perplexity" in tasks and kinds["text"]):
        needs = "the perplexity task" if kinds["text"] else "prompt-only text samples (a 'prompt' with no 'answer' and no 'image')"
        problems.append(f"{_flag('max_perplexity_increase')} needs {needs}")
    for name in ("max_kl", "min_top1_agreement"):
        if getattr(gates, name) is not None and "fidelity" not in tasks:
            problems.append(f"{_flag(name)} needs the fidelity task")
    if gates.min_speedup is not None and not latency:
        problems.append(f"{_flag('min_speedup')} needs latency measurements (drop --no-latency)")
    if gates.max_runtime_accuracy_drop is not None and not runtime:
        problems.append(
            f"{_flag('max_runtime_accuracy_drop')} needs a run-time mode (--visual-keep, --visual-band, --early-exit, "
            "or a recipe's runtime: section)"
        )
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        held = ", ".join(f"{count} {kind.replace('_', ' ')}" for kind, count in kinds.items())
        raise InputError(
            f"{len(problems)} gate(s) cannot be evaluated on this data ({len(samples)} samples: {held}):\n{listed}",
            fix="evaluate on data that has what each gate needs, or drop the gate: it comes from its option or a recipe's "
            "validate: section (`validate --no-recipe-gates` gates on the options alone, `--recipe FILE` on another recipe's).",
        )


def _flag(gate: str) -> str:
    return f"--{gate.replace('_', '-')} ({gate})"


def validate(
    base_ref: str | ModelSource,
    pruned_ref: str,
    data: Path | str,
    out_dir: Path | str,
    *,
    gates: Gates = Gates(),
    tasks: tuple[str, ...] = TASKS,
    num_samples: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    latency: bool = True,
    latency_options: dict[str, Any] | None = None,
    device: str | None = "cpu",
    dtype: str | None = "auto",
    overwrite: bool = False,
    junit: Path | str | None = None,
    placement: Placement | None = None,
    allow_outside_data: bool = False,
    trust_remote_code: bool = False,
    text_format: Format = "auto",
    runtime: RuntimeRequest | None = None,
) -> ValidationResult:
    """Compare ``pruned_ref`` with ``base_ref`` and write report.json/.md/.html into ``out_dir``.

    Every gate in ``gates`` is checked against the data (`check_gates`) before a model loads, as
    are the ``runtime`` modes (`validate_runtime`; the report's ``runtime`` section).
    ``text_format`` lays out the samples (`accuracy.Format`; perplexity is always raw text).
    With a ``placement`` device map, both models are spread the same way (models bigger than
    one GPU); latency is then that of the spread model, inputs entering at its first device."""
    out_dir = Path(out_dir)
    base_source = base_ref if isinstance(base_ref, ModelSource) else resolve_model_ref(base_ref, trust_remote_code=trust_remote_code)
    pruned_source = resolve_model_ref(str(pruned_ref), trust_remote_code=trust_remote_code)
    guide_source = _guide_source(runtime, trust_remote_code)
    if guide_source is not None and guide_source.path == pruned_source.path:  # --guide PRUNED_DIR: the pruned checkpoint
        runtime, guide_source = replace(runtime, guide=runtime_checks.PRUNED_GUIDE), None
    sources = [base_source.path, pruned_source.path, data, guide_source.path if guide_source else None]
    check_output(out_dir, overwrite=overwrite, sources=sources)
    if junit:
        check_output(junit, overwrite=overwrite, sources=sources)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise InputError(f"Unknown task(s) {sorted(unknown)}.", fix=f"use some of: {', '.join(TASKS)}.")
    if text_format not in FORMATS:
        raise InputError(f"Unknown text format '{text_format}'.", fix=f"use one of: {', '.join(FORMATS)}.")
    with output_lock(out_dir):  # held while both models are evaluated: a second writer fails now, not at the end
        samples = load_samples(data, limit=num_samples, allow_outside=allow_outside_data)
        check_gates(gates, samples, tasks=tasks, latency=latency, runtime=runtime is not None)
        band_choice = None
        if runtime is not None:
            runtime_checks.check_data(runtime, samples)
            runtime, band_choice = runtime_checks.choose(runtime, pruned_source.path)
        base = load_model(base_source, device=device, dtype=dtype, placement=placement)
        pruned = load_model(pruned_source, device=device, dtype=dtype, placement=placement)
        if base.adapter.family != pruned.adapter.family:
            raise InputError(
                f"The base model is {base.adapter.family} but the pruned one is {pruned.adapter.family}.",
                fix="compare a pruned model with the model it was cut from.",
            )
        removed = _removed_blocks(
            pruned.source.path, base.adapter.num_blocks(base.model.config), pruned.adapter.num_blocks(pruned.model.config)
        )
        runs = None
        if runtime is not None:  # every check before the first sample is scored
            guide = load_model(guide_source, device=device, dtype=dtype, placement=placement) if guide_source else None
            runs = runtime_checks.plan_runs(runtime, band_choice, base, pruned, guide, removed, samples, text_format)
        accuracy = _accuracy(base, pruned, samples, tasks, batch_size=batch_size, max_new_tokens=max_new_tokens, text_format=text_format)
        runtime_report = None
        if runs is not None:
            measured = runtime_checks.measure(runs, samples, max_new_tokens=max_new_tokens, text_format=text_format)
            runtime_report = runtime_checks.section(runtime, band_choice, measured)
        latency_report = None
        if latency:
            options = {"samples": [s for s in samples if s.image is not None][:4] or None, **(latency_options or {})}
            measured = {
                name: measure_latency(loaded.model, loaded.processor, loaded.adapter, onnx=find_onnx(loaded.source.path), **options)
                for name, loaded in (("base", base), ("pruned", pruned))
            }
            latency_report = {**measured, "comparison": compare_latency(measured["base"], measured["pruned"], removed)}
        calibration_file = pruned.source.path / "calibration.json"
        report: dict[str, Any] = {
            "format": REPORT_FORMAT,
            "verdict": None,
            "models": {
                "base": _describe(base),
                "pruned": {**_describe(pruned), "removed": removed},
            },
            # published with the model: no local path
            "data": {"path": Path(data).name, "num_samples": len(samples), "kinds": data_kinds(samples), "format": text_format},
            "gates": gates.active,
            "accuracy": accuracy,
            "evidence": evidence(accuracy, runtime_report),
            **({"runtime": runtime_report} if runtime_report is not None else {}),
            "latency": latency_report,
            "calibration": json.loads(calibration_file.read_text()) if calibration_file.is_file() else None,
            "environment": {
                **environment(),
                "device": str(input_device(base.model)),
                "dtype": str(next(base.model.parameters()).dtype).removeprefix("torch."),
            },
        }
        report["verdict"] = evaluate_gates(report, gates)
        with staged_dir(out_dir, overwrite=overwrite, sources=sources) as staging:
            (staging / "report.json").write_text(json.dumps(report, indent=1) + "\n")
            write_markdown(report, staging / "report.md")
            write_html(report, staging / "report.html")
        if junit:
            with staged_file(junit, overwrite=overwrite, sources=sources) as staging_file:
                write_junit(report, staging_file)
        return ValidationResult(report=report, out_dir=out_dir.resolve())


def _guide_source(runtime: RuntimeRequest | None, trust_remote_code: bool) -> ModelSource | None:
    """The guide model to load: None without one, or when the pruned checkpoint is the guide."""
    if runtime is None or runtime.guide is None or runtime.guide == runtime_checks.PRUNED_GUIDE:
        return None
    try:
        return resolve_model_ref(runtime.guide, trust_remote_code=trust_remote_code)
    except InputError as error:
        raise InputError(f"{runtime_checks.option_name('guide')}: {error.message}", fix=error.fix) from None


def _describe(loaded: Any) -> dict[str, Any]:
    return {
        "ref": loaded.source.public_name,
        "family": loaded.adapter.family,
        "num_blocks": loaded.adapter.num_blocks(loaded.model.config),
        "params": count_parameters(loaded.model),
    }


def _removed_blocks(pruned_dir: Path, base_blocks: int, pruned_blocks: int) -> list[int]:
    """The removed blocks in original numbering, from the plan exported with the model."""
    plan_file = pruned_dir / "plan.json"
    if plan_file.is_file():
        plan = SurgeryPlan.load(plan_file)
        if plan.num_blocks == base_blocks:
            return plan.removed_indices
    if base_blocks == pruned_blocks:
        return []
    raise InputError(
        f"'{pruned_dir}' has {pruned_blocks} blocks, the base {base_blocks}, and no plan.json says which were removed.",
        fix="validate a folder written by `compressor prune` (it carries plan.json).",
    )


def _accuracy(
    base: Any, pruned: Any, samples: list, tasks: tuple[str, ...], *, batch_size: int, max_new_tokens: int, text_format: Format
) -> dict[str, Any]:
    results: dict[str, Any] = {name: None for name in TASKS if name != "fidelity"}
    per_sample: dict[str, Any] = {}
    open_ended = [s for s in samples if s.answer is not None and not s.choices]
    if "vqa" in tasks and open_ended:
        scores = {
            name: scoring.answer_accuracy(
                m.model, m.processor, open_ended, batch_size=batch_size, max_new_tokens=max_new_tokens, text_format=text_format
            )
            for name, m in (("base", base), ("pruned", pruned))
        }
        results["vqa"] = {
            "n": len(open_ended),
            "metric": "exact_match",
            "base": scores["base"].accuracy,
            "pruned": scores["pruned"].accuracy,
            "base_contains": scores["base"].contains_accuracy,
            "pruned_contains": scores["pruned"].contains_accuracy,
        }
        per_sample["vqa"] = [
            {**b, "pruned_prediction": p["prediction"], "pruned_exact": p["exact"], "base_prediction": b.pop("prediction")}
            for b, p in zip(scores["base"].to_dict()["samples"], scores["pruned"].to_dict()["samples"])
        ]
    if "multiple_choice" in tasks and any(s.choices for s in samples):
        scores = {
            name: scoring.choice_accuracy(m.model, m.processor, samples, batch_size=batch_size, text_format=text_format)
            for name, m in (("base", base), ("pruned", pruned))
        }
        results["multiple_choice"] = {
            "n": scores["base"]["n"],
            "metric": "accuracy",
            "base": scores["base"]["accuracy"],
            "pruned": scores["pruned"]["accuracy"],
        }
        per_sample["multiple_choice"] = [
            {**b, "pruned_prediction": p["prediction"], "pruned_correct": p["correct"]}
            for b, p in zip(scores["base"]["samples"], scores["pruned"]["samples"])
        ]
    if "perplexity" in tasks and any(is_text(s) for s in samples):
        scores = {
            name: scoring.perplexity(m.model, m.processor, samples, batch_size=batch_size)
            for name, m in (("base", base), ("pruned", pruned))
        }
        results["perplexity"] = {
            "n": scores["base"]["n"],
            "tokens": scores["base"]["tokens"],
            "base": scores["base"]["perplexity"],
            "pruned": scores["pruned"]["perplexity"],
        }
    fidelity = None
    if "fidelity" in tasks:
        fidelity = scoring.fidelity(base.model, pruned.model, base.processor, samples, batch_size=batch_size, text_format=text_format)
    return {"tasks": results, "fidelity": fidelity, "samples": per_sample}
