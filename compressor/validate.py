"""Validation: original vs pruned on the same samples, a report, and a gate CI can trust.

Owns the choice of tasks for a data file, the gates (absolute and relative accuracy drop,
minimum speedup) and their verdict, the report's JSON schema (``compressor.validation/1``)
and the JUnit rendering of the gates. Scoring lives in `accuracy`, timing in `latency`,
markdown/HTML in `report_render`.

Tasks follow from what the samples carry: ``choices`` → multiple choice by log-likelihood;
an ``answer`` → generative VQA (greedy, normalised exact match and contains-match); no image
→ perplexity; every sample → fidelity (KL and top-1 agreement with the original). Both
models see the same samples with the same decoding.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from . import accuracy as scoring
from .calibrate import environment
from .data import load_samples
from .errors import InputError
from .hub import ModelSource, resolve_model_ref
from .latency import compare_latency, find_onnx, measure_latency
from .loading import Placement, input_device, load_model
from .planner import SurgeryPlan
from .recipe import load_recipe
from .report_render import write_html, write_markdown
from .staging import check_output, output_lock, staged_dir, staged_file
from .surgery import count_parameters

log = logging.getLogger(__name__)

REPORT_FORMAT = "compressor.validation/1"
TASKS = ("vqa", "multiple_choice", "perplexity", "fidelity")


@dataclass(frozen=True)
class Gates:
    """Release thresholds; None means not gated.

    ``max_accuracy_drop`` is absolute (0.05 = five points of accuracy), ``max_relative_drop``
    is the drop as a fraction of the original accuracy, ``min_speedup`` holds when the median
    speedup over the measured workloads (each prefill and decode setting) reaches it.
    """

    max_accuracy_drop: float | None = None
    max_relative_drop: float | None = None
    min_speedup: float | None = None

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
        return bool(self.report["verdict"]["passed"])

    def verdict_line(self) -> str:
        """One machine-readable line: PASS/FAIL then name=value(op threshold) per gate."""
        verdict = self.report["verdict"]
        parts = [f"compressor-verdict: {'PASS' if verdict['passed'] else 'FAIL'}"]
        for gate in verdict["gates"]:
            value = "n/a" if gate["value"] is None else f"{gate['value']:.4g}"
            parts.append(f"{gate['name']}={value}({gate['op']}{gate['threshold']:g}):{'ok' if gate['passed'] else 'FAILED'}")
        return " ".join(parts)


def primary_accuracy(tasks: dict[str, Any]) -> tuple[str, float, float] | None:
    """The accuracy the gates read: VQA exact match, else multiple choice."""
    for name in ("vqa", "multiple_choice"):
        task = tasks.get(name)
        if task and task.get("base") is not None:
            return name, task["base"], task["pruned"]
    return None


def evaluate_gates(report: dict[str, Any], gates: Gates) -> dict[str, Any]:
    results = []
    primary = primary_accuracy(report["accuracy"]["tasks"])
    if primary is not None:
        task, base, pruned = primary
        drop = base - pruned
        if gates.max_accuracy_drop is not None:
            results.append(
                _gate(
                    "max_accuracy_drop",
                    "<=",
                    gates.max_accuracy_drop,
                    drop,
                    f"{task} accuracy {base:.1%} -> {pruned:.1%}: drop {drop * 100:.1f} points (max {gates.max_accuracy_drop * 100:.1f})",
                )
            )
        if gates.max_relative_drop is not None:
            relative = drop / base if base > 0 else 0.0
            results.append(
                _gate(
                    "max_relative_drop",
                    "<=",
                    gates.max_relative_drop,
                    relative,
                    f"{task} accuracy fell by {relative:.1%} of the original (max {gates.max_relative_drop:.1%})",
                )
            )
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
        results.append(_gate("min_speedup", ">=", gates.min_speedup, typical, detail))
    passed = all(g["passed"] for g in results)
    failed = [g["name"] for g in results if not g["passed"]]
    summary = f"PASS: {len(results)} gate(s) held" if passed else f"FAIL: {', '.join(failed)}"
    return {"passed": passed, "summary": summary, "gates": results}


def _gate(name: str, op: str, threshold: float, value: float | None, detail: str) -> dict[str, Any]:
    if value is None:
        held = False
    else:
        held = value <= threshold + 1e-12 if op == "<=" else value >= threshold - 1e-12
    margin = None if value is None else (threshold - value if op == "<=" else value - threshold)
    return {"name": name, "op": op, "threshold": threshold, "value": value, "margin": margin, "passed": held, "detail": detail}


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
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<testsuite name="compressor.validate" tests="{len(gates)}" failures="{failures}" errors="0">\n'
        + "\n".join(cases)
        + "\n</testsuite>\n"
    )
    Path(path).write_text(xml)


def thresholds_from_recipe(pruned_dir: Path, recipe: Path | str | None) -> Gates:
    """The recipe's `validate:` section: an explicit --recipe, else the one exported with the model."""
    path = Path(recipe) if recipe else pruned_dir / "recipe.yaml"
    if not path.is_file():
        if recipe:
            raise InputError(f"Recipe '{recipe}' does not exist.", fix="pass an existing recipe or drop --recipe.")
        return Gates()
    thresholds = load_recipe(path).recipe.thresholds
    if thresholds is None:
        return Gates()
    return Gates(thresholds.max_accuracy_drop, thresholds.max_relative_drop, thresholds.min_speedup)


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
) -> ValidationResult:
    """Compare ``pruned_ref`` with ``base_ref`` and write report.json/.md/.html into ``out_dir``.

    With a ``placement`` device map, both models are spread the same way (models bigger than
    one GPU); latency is then that of the spread model, inputs entering at its first device."""
    out_dir = Path(out_dir)
    base_source = base_ref if isinstance(base_ref, ModelSource) else resolve_model_ref(base_ref, trust_remote_code=trust_remote_code)
    pruned_source = resolve_model_ref(str(pruned_ref), trust_remote_code=trust_remote_code)
    sources = [base_source.path, pruned_source.path, data]
    check_output(out_dir, overwrite=overwrite, sources=sources)
    if junit:
        check_output(junit, overwrite=overwrite, sources=sources)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise InputError(f"Unknown task(s) {sorted(unknown)}.", fix=f"use some of: {', '.join(TASKS)}.")
    if (gates.max_accuracy_drop is not None or gates.max_relative_drop is not None) and not {"vqa", "multiple_choice"} & set(tasks):
        raise InputError("An accuracy gate needs the vqa or multiple_choice task.", fix="add --task vqa (or multiple_choice).")
    if gates.min_speedup is not None and not latency:
        raise InputError("--min-speedup needs latency measurements.", fix="drop --no-latency.")
    with output_lock(out_dir):  # held while both models are evaluated: a second writer fails now, not at the end
        samples = load_samples(data, limit=num_samples, allow_outside=allow_outside_data)
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
        accuracy = _accuracy(base, pruned, samples, tasks, batch_size=batch_size, max_new_tokens=max_new_tokens)
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
            "data": {"path": Path(data).name, "num_samples": len(samples)},  # published with the model: no local path
            "gates": gates.active,
            "accuracy": accuracy,
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


def _accuracy(base: Any, pruned: Any, samples: list, tasks: tuple[str, ...], *, batch_size: int, max_new_tokens: int) -> dict[str, Any]:
    results: dict[str, Any] = {name: None for name in TASKS if name != "fidelity"}
    per_sample: dict[str, Any] = {}
    open_ended = [s for s in samples if s.answer is not None and not s.choices]
    if "vqa" in tasks and open_ended:
        scores = {
            name: scoring.answer_accuracy(m.model, m.processor, open_ended, batch_size=batch_size, max_new_tokens=max_new_tokens)
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
            name: scoring.choice_accuracy(m.model, m.processor, samples, batch_size=batch_size)
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
    if "perplexity" in tasks and any(s.image is None for s in samples):
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
    fidelity = scoring.fidelity(base.model, pruned.model, base.processor, samples, batch_size=batch_size) if "fidelity" in tasks else None
    return {"tasks": results, "fidelity": fidelity, "samples": per_sample}
