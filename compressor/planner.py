"""The planner: recipe + calibration report + block count -> a `SurgeryPlan` (pure data).

The plan is the contract between choosing and cutting: it lists the blocks that go (original
0-based numbering), why (the metric values that chose them), and what remains. It can be
printed, saved, reviewed and applied later; nothing here touches a model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .calibrate import MODALITIES, CalibrationReport
from .errors import InputError, PlanError
from .recipe import FUNCTIONAL_METRICS, Conditions, Explicit, Greedy, Lowest, Recipe, Span

PLAN_FORMAT = "compressor.plan/1"


@dataclass(frozen=True)
class RemovedBlock:
    index: int
    reason: str
    metrics: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class SurgeryPlan:
    recipe: str
    op: str
    num_blocks: int
    removed: tuple[RemovedBlock, ...]
    protected: tuple[int, ...] = ()
    criterion: str = ""
    notes: tuple[str, ...] = ()
    calibration: dict[str, Any] | None = None
    format: str = PLAN_FORMAT

    @property
    def removed_indices(self) -> list[int]:
        return sorted(b.index for b in self.removed)

    @property
    def kept(self) -> list[int]:
        gone = set(self.removed_indices)
        return [i for i in range(self.num_blocks) if i not in gone]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kept"] = self.kept
        return data

    def save(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> SurgeryPlan:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != PLAN_FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, expected {PLAN_FORMAT!r}")
            raw.pop("kept", None)
            raw["removed"] = tuple(RemovedBlock(**b) for b in raw["removed"])
            raw["protected"] = tuple(raw.get("protected", ()))
            raw["notes"] = tuple(raw.get("notes", ()))
            return cls(**raw)
        except FileNotFoundError:
            raise InputError(f"Plan '{path}' does not exist.", fix="write one with `compressor plan -o`.") from None
        except (ValueError, TypeError, KeyError) as error:
            raise InputError(f"'{path}' is not a compressor plan ({error}).", fix="write one with `compressor plan -o`.") from None

    def describe(self) -> str:
        """A human-readable table: what goes, why, and what remains."""
        lines = [
            f"recipe {self.recipe!r}: {self.op} — remove {len(self.removed)} of {self.num_blocks} blocks"
            + (f" ({self.criterion})" if self.criterion else ""),
        ]
        if self.removed:
            metric_names = sorted({k for b in self.removed for k in b.metrics})
            header = ["block", *metric_names, "reason"]
            rows = [
                [str(b.index), *(_fmt(b.metrics.get(k)) for k in metric_names), b.reason]
                for b in sorted(self.removed, key=lambda b: b.index)
            ]
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
            for row in [header, *rows]:
                lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        lines.append(f"kept ({len(self.kept)}): {self.kept}")
        if self.protected:
            lines.append(f"protected: {list(self.protected)}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def plan(recipe: Recipe, num_blocks: int, report: CalibrationReport | None = None) -> SurgeryPlan:
    select = recipe.select
    if report is not None and report.num_blocks != num_blocks:
        raise PlanError(
            f"The calibration report measured {report.num_blocks} blocks but the model has {num_blocks}.",
            fix="calibrate this model again (the report belongs to another model).",
        )
    if recipe.needs_calibration and report is None:
        raise PlanError(
            f"Recipe '{recipe.name}' selects by metric ({select.op}) and needs calibration.",
            fix="pass --data FILE.jsonl (or --calibration calibration.json).",
        )
    protected = _protected(select, num_blocks)
    budget = _budget(select, num_blocks)
    notes: list[str] = []
    if isinstance(select, Explicit):
        chosen, criterion = _explicit(select, num_blocks, protected, budget)
        reasons = dict.fromkeys(chosen, "listed in recipe")
    elif isinstance(select, Lowest):
        chosen, criterion, reasons = _lowest(select, num_blocks, protected, budget, report, notes)
    elif isinstance(select, Conditions):
        chosen, criterion, reasons = _conditions(select, protected, budget, report, notes)
    elif isinstance(select, Span):
        chosen, criterion, reasons = _span(select, num_blocks, protected, budget, report)
    elif isinstance(select, Greedy):
        chosen, criterion, reasons = _greedy(select, num_blocks, protected, budget, report, notes)
    else:  # pragma: no cover - the schema admits no other op
        raise PlanError(f"Unknown op {select.op}")
    if len(chosen) >= num_blocks:
        raise PlanError(
            f"Recipe '{recipe.name}' would remove all {num_blocks} blocks.",
            fix="keep at least one block: lower the count/fraction, or add select.protect.",
        )
    removed = tuple(RemovedBlock(index=i, reason=reasons[i], metrics=_block_metrics(report, select, i)) for i in sorted(chosen))
    calibration = None
    if report is not None:
        calibration = {"model": report.model.get("ref"), "data": report.data.get("path"), "sha256": report.data.get("sha256")}
    return SurgeryPlan(
        recipe=recipe.name,
        op=select.op,
        num_blocks=num_blocks,
        removed=removed,
        protected=tuple(sorted(protected)),
        criterion=criterion,
        notes=tuple(notes),
        calibration=calibration,
    )


def _normalize(index: int, num_blocks: int, where: str) -> int:
    if not -num_blocks <= index < num_blocks:
        raise PlanError(
            f"{where}: block {index} is out of range for a model with {num_blocks} blocks.",
            fix=f"use 0..{num_blocks - 1} (or -{num_blocks}..-1 counting from the end).",
        )
    return index % num_blocks


def _protected(select: Any, num_blocks: int) -> set[int]:
    spec = select.protect
    protected = set(range(min(spec.first, num_blocks)))
    protected |= set(range(max(num_blocks - spec.last, 0), num_blocks))
    protected |= {_normalize(i, num_blocks, "select.protect.blocks") for i in spec.blocks}
    return protected


def _budget(select: Any, num_blocks: int) -> int:
    """Most blocks the selection may remove (never all of them)."""
    limit = num_blocks - 1
    if select.budget is not None:
        if select.budget.max_blocks is not None:
            limit = min(limit, select.budget.max_blocks)
        if select.budget.max_fraction is not None:
            limit = min(limit, math.floor(select.budget.max_fraction * num_blocks))
    return limit


def _explicit(select: Explicit, num_blocks: int, protected: set[int], budget: int) -> tuple[list[int], str]:
    chosen = [_normalize(i, num_blocks, "select.blocks") for i in select.blocks]
    if len(set(chosen)) != len(chosen):
        raise PlanError(f"select.blocks lists a block twice: {select.blocks}.", fix="list each block once.")
    clash = sorted(set(chosen) & protected)
    if clash:
        raise PlanError(f"select.blocks removes protected block(s) {clash}.", fix="drop them from select.blocks or from select.protect.")
    if len(chosen) > budget and len(chosen) < num_blocks:
        raise PlanError(
            f"select.blocks removes {len(chosen)} blocks but select.budget allows {budget}.",
            fix="list fewer blocks or raise the budget.",
        )
    return chosen, "explicit list"


def _values(report: CalibrationReport, metric: str, modality: str, *, epsilon: float | None = None, span: int = 1) -> list[float | None]:
    if metric in FUNCTIONAL_METRICS and not report.has(metric):
        option = FUNCTIONAL_METRICS[metric]
        raise PlanError(
            f"The calibration report has no {metric}: it is measured by an extra calibration pass.",
            fix=f"calibrate with --{option} (or `calibration: {{{option}: true}}` in the recipe; `compressor run` turns it on itself).",
        )
    try:
        values = report.values(metric, modality, epsilon=epsilon, span=span)
    except KeyError as error:
        raise PlanError(
            f"The calibration report has no {metric} for this setting ({error.args[0]}).",
            fix="calibrate again with the recipe's settings (--epsilon / --max-span), or via `compressor run`.",
        ) from None
    if all(v is None for v in values):
        raise PlanError(
            f"The calibration data has no {modality} tokens, so {metric}[{modality}] is undefined.",
            fix=f"use another modality ({', '.join(m for m in MODALITIES if m != modality)}) or data with images.",
        )
    return values


def _label(metric: str, modality: str, epsilon: float | None = None, span: int | None = None) -> str:
    suffix = f"@{epsilon:g}" if epsilon is not None else ""
    suffix += f"(n={span})" if span is not None and span > 1 else ""
    return f"{metric}{suffix}[{modality}]"


def _lowest(select: Lowest, num_blocks: int, protected: set[int], budget: int, report: Any, notes: list[str]):
    values = _values(report, select.metric, select.modality, epsilon=select.epsilon)
    count = select.count if select.count is not None else max(1, round(select.fraction * num_blocks))
    candidates = [i for i in range(num_blocks) if i not in protected and values[i] is not None]
    if count > len(candidates):
        raise PlanError(
            f"select.count asks for {count} blocks but only {len(candidates)} are unprotected.",
            fix="lower count/fraction or protect fewer blocks.",
        )
    if count > budget:
        notes.append(f"count {count} capped at the budget of {budget} block(s)")
        count = budget
    ranked = sorted(candidates, key=lambda i: values[i])[:count]
    label = _label(select.metric, select.modality, select.epsilon)
    reasons = {i: f"rank {r + 1} lowest {label} = {values[i]:.4f}" for r, i in enumerate(ranked)}
    return ranked, f"lowest {count} by {label}", reasons


def _conditions(select: Conditions, protected: set[int], budget: int, report: Any, notes: list[str]):
    tables = [_values(report, c.metric, c.modality, epsilon=c.epsilon) for c in select.where]
    labels = [_label(c.metric, c.modality, c.epsilon) for c in select.where]
    qualified = [
        i
        for i in range(report.num_blocks)
        if i not in protected and all(t[i] is not None and c.holds(t[i]) for c, t in zip(select.where, tables))
    ]
    # Over budget: keep the blocks that satisfy the first condition by the widest margin.
    ranked = sorted(qualified, key=lambda i: tables[0][i])
    if len(ranked) > budget:
        notes.append(f"{len(ranked)} blocks qualify; kept the {budget} lowest by {labels[0]} (budget)")
        ranked = ranked[:budget]
    if not qualified:
        notes.append("no block meets every condition")
    reasons = {
        i: "; ".join(
            f"{label} = {t[i]:.4f} {'<' if c.below is not None else '>'} {c.below if c.below is not None else c.above:g}"
            for label, t, c in zip(labels, tables, select.where)
        )
        for i in ranked
    }
    criterion = " and ".join(
        f"{label} {'<' if c.below is not None else '>'} {c.below if c.below is not None else c.above:g}"
        for label, c in zip(labels, select.where)
    )
    return ranked, criterion, reasons


def _span(select: Span, num_blocks: int, protected: set[int], budget: int, report: Any):
    n = select.n
    if n > budget:
        raise PlanError(f"select.n = {n} exceeds the removal budget of {budget} block(s).", fix="lower n or raise the budget.")
    values = _values(report, "angular_distance", select.modality, span=n)
    starts = [s for s in range(num_blocks - n + 1) if values[s] is not None and not protected.intersection(range(s, s + n))]
    if not starts:
        raise PlanError(
            f"No run of {n} consecutive unprotected blocks exists.",
            fix="lower select.n or protect fewer blocks.",
        )
    best = min(starts, key=lambda s: values[s])
    label = _label("angular_distance", select.modality, span=n)
    reason = f"span {best}..{best + n - 1}: {label} = {values[best]:.4f} (smallest of {len(starts)})"
    chosen = list(range(best, best + n))
    return chosen, f"span of {n} with smallest {label}", dict.fromkeys(chosen, reason)


def _greedy(select: Greedy, num_blocks: int, protected: set[int], budget: int, report: Any, notes: list[str]):
    order = report.greedy_order
    if not order:
        raise PlanError(
            "The calibration report has no greedy removal order.",
            fix="calibrate with --greedy N (N >= the blocks to remove), or set calibration.greedy in the recipe.",
        )
    count = select.count if select.count is not None else max(1, round(select.fraction * num_blocks))
    if count > budget:
        notes.append(f"count {count} capped at the budget of {budget} block(s)")
        count = budget
    usable = [i for i in order if i not in protected]
    if len(usable) < len(order):
        # Later greedy steps were measured with the protected block gone: say so.
        notes.append(f"protected block(s) {sorted(set(order) - set(usable))} skipped in the greedy order")
    if count > len(usable):
        raise PlanError(
            f"select.count asks for {count} blocks but the greedy order has {len(order)} blocks"
            + (f" ({len(usable)} unprotected)" if len(usable) < len(order) else "")
            + ".",
            fix=f"calibrate with --greedy {count + len(order) - len(usable)} or more, or lower select.count.",
        )
    steps = {step["block"]: step for step in report.metrics["greedy"]["steps"]}
    chosen = usable[:count]
    reasons = {i: f"greedy step {order.index(i) + 1}: loss with it removed {steps[i]['loss']:.4f}" for i in chosen}
    return chosen, f"first {count} of the greedy order {order}", reasons


def _block_metrics(report: CalibrationReport | None, select: Any, index: int) -> dict[str, float | None]:
    """The values that explain a removal: the selecting metric(s) and block influence."""
    if report is None:
        return {}
    refs: list[tuple[str, str, float | None]] = [("block_influence", m, None) for m in MODALITIES]
    if isinstance(select, Lowest):
        refs.insert(0, (select.metric, select.modality, select.epsilon))
    elif isinstance(select, Conditions):
        refs = [(c.metric, c.modality, c.epsilon) for c in select.where] + refs
    found: dict[str, float | None] = {}
    for metric, modality, epsilon in refs:
        found[_label(metric, modality, epsilon)] = report.values(metric, modality, epsilon=epsilon)[index]
    return found
