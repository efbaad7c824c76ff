"""The planner: recipe + calibration report + block count -> a `SurgeryPlan` (pure data).

The plan is the contract between choosing and cutting: it lists the blocks that go (original
0-based numbering), why (the metric values that chose them), and what remains. It can be
printed, saved, reviewed and applied later; nothing here touches a model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .block_limits import BlockLimits, Breach
from .calibration_report import MODALITIES, CalibrationReport
from .errors import InputError, PlanError, RecipeError
from .inputs import read_json_object
from .recipe import (
    FUNCTIONAL_METRICS,
    OPS,
    Conditions,
    Explicit,
    Greedy,
    Lowest,
    Recipe,
    Replace,
    Span,
    did_you_mean,
    parse_recipe,
)

PLAN_FORMAT = "compressor.plan/1"
MAX_PLAN_BYTES = 10_000_000  # a plan of a 1,000-block model is ~200 kB
MAX_BLOCKS = 100_000  # far above any model; keeps `kept` (a list of every index) small
_FIX = "write the plan again with `compressor plan --recipe R ... -o plan.json` (or correct the fields listed)."


@dataclass(frozen=True)
class RemovedBlock:
    index: int
    reason: str
    metrics: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplacedSpan:
    """A span of blocks (original numbering) that one kept block stands in for: ``block`` is the
    span's last block, kept in the span's place with weights trained to map the span's input to
    its output (`heal.replace`); the other blocks of the span are removed."""

    block: int
    span: tuple[int, ...]


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
    # The verbatim recipe the plan came from, so that applying a saved plan keeps its gates.
    recipe_text: str | None = None
    # op replace: the kept block that is trained to stand in for a span. Empty otherwise, and then
    # not written, so that plan files of every other op stay as they were.
    replaced: tuple[ReplacedSpan, ...] = ()

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
        if not self.replaced:
            del data["replaced"]
        return data

    def save(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> SurgeryPlan:
        """Read a plan written by `save`, refusing (with every problem, each by field) anything
        that would prune the wrong blocks: indices out of range, repeated, or not integers."""
        path = Path(path)
        raw = read_json_object(path, "Plan", fmt=PLAN_FORMAT, max_bytes=MAX_PLAN_BYTES, fix=_FIX)
        try:
            checked, problems = _PlanFile.model_validate(raw), []
        except ValidationError as error:
            checked, problems = None, [_describe(e) for e in error.errors()]
        problems += _consistency(raw)
        if checked is None or problems:
            listed = "\n".join(f"  - {p}" for p in problems)
            raise InputError(f"Plan '{path}': {len(problems)} problem(s):\n{listed}", fix=_FIX)
        return cls(
            recipe=checked.recipe,
            op=checked.op,
            num_blocks=checked.num_blocks,
            removed=tuple(RemovedBlock(index=b.index, reason=b.reason, metrics=b.metrics) for b in checked.removed),
            protected=tuple(checked.protected),
            criterion=checked.criterion,
            notes=tuple(checked.notes),
            calibration=checked.calibration,
            recipe_text=checked.recipe_text,
            replaced=tuple(ReplacedSpan(block=r.block, span=tuple(r.span)) for r in checked.replaced),
        )

    def check_model(self, num_blocks: int, model: str) -> None:
        """Refuse to apply this plan to a model with another number of blocks than it was made for."""
        if num_blocks != self.num_blocks:
            raise PlanError(
                f"The plan (recipe '{self.recipe}') was made for a model with {self.num_blocks} blocks, but '{model}' has {num_blocks}.",
                fix="make a plan for this model: `compressor plan --recipe R --model MODEL -o plan.json`.",
            )

    def check_fixed(self, fixed: Mapping[int, str]) -> None:
        """Refuse a plan that removes a block the model's family fixes in place
        (`Adapter.fixed_blocks`): the pruned model would compute something else."""
        clash = [i for i in self.removed_indices if i in fixed]
        if clash:
            raise PlanError(
                f"The plan (recipe '{self.recipe}') removes {_fixed_blocks_text(clash, fixed)}.",
                fix=f"make the plan again without block(s) {clash}; `compressor plan` skips them itself.",
            )

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
        for r in self.replaced:
            lines.append(
                f"replaced: blocks {r.span[0]}..{r.span[-1]} by one block trained in their place (initialised from block {r.block})"
            )
        if self.protected:
            lines.append(f"protected: {list(self.protected)}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


# -- the plan file's schema ----------------------------------------------------------------------


class _Schema(BaseModel):
    # strict: JSON `true` and "2" are not block indices, and 2.0 is not a block count.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _RemovedEntry(_Schema):
    index: int
    reason: str
    metrics: dict[str, float | None]


class _ReplacedEntry(_Schema):
    block: int
    span: list[int]


class _PlanFile(_Schema):
    format: str
    recipe: str
    op: str
    num_blocks: int = Field(ge=1, le=MAX_BLOCKS)
    removed: list[_RemovedEntry]
    protected: list[int] = []
    criterion: str = ""
    notes: list[str] = []
    calibration: dict[str, Any] | None = None
    kept: list[int] | None = None  # derived; written for readers, checked on load
    recipe_text: str | None = None
    replaced: list[_ReplacedEntry] = []


def _describe(error: dict[str, Any]) -> str:
    loc = error["loc"]
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".") or "(top level)"
    if error["type"] == "extra_forbidden":
        key, where = str(loc[-1]), loc[:-1]
        entry = _ReplacedEntry if where and where[0] == "replaced" else _RemovedEntry
        allowed = list((entry if where else _PlanFile).model_fields)
        parent = path.removesuffix(f".{key}").removesuffix(key) or "(top level)"
        return f"{parent}: unknown key '{key}'{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"{path}: required field is missing"
    given = json.dumps(error["input"], default=str)
    given = given if len(given) <= 40 else given[:37] + "..."
    return f"{path}: {error['msg']} (got {given})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _consistency(raw: dict[str, Any]) -> list[str]:
    """Problems between fields; each field of the wrong type is left to the schema's message."""
    problems = []
    op = raw.get("op")
    if isinstance(op, str) and op not in OPS:
        problems.append(f"op: unknown op '{op}'{did_you_mean(op, OPS)}; ops: {', '.join(OPS)}")
    problems += _recipe_text_problems(raw)
    n = raw.get("num_blocks")
    if not _is_int(n) or not 1 <= n <= MAX_BLOCKS:
        return problems  # no range to check against
    entries = raw.get("removed") if isinstance(raw.get("removed"), list) else []
    removed: dict[int, int] = {}  # index -> the first entry that removes it
    typed = True  # every index an int: only then can `kept` be compared
    for k, entry in enumerate(entries):
        index = entry.get("index") if isinstance(entry, dict) else None
        if not _is_int(index):
            typed = False
            continue
        if not 0 <= index < n:
            problems.append(f"removed[{k}].index: block {index} is out of range for {n} blocks (0..{n - 1})")
        elif index in removed:
            problems.append(f"removed[{k}].index: block {index} is already removed by removed[{removed[index]}]")
        else:
            removed[index] = k
    if len(removed) >= n:
        problems.append(f"removed: removes all {n} blocks; at least one must be kept")
    protected = raw.get("protected") if isinstance(raw.get("protected"), list) else []
    for k, index in enumerate(protected):
        if _is_int(index) and not 0 <= index < n:
            problems.append(f"protected[{k}]: block {index} is out of range for {n} blocks (0..{n - 1})")
        elif _is_int(index) and index in removed:
            problems.append(f"protected[{k}]: block {index} is protected but removed by removed[{removed[index]}]")
    kept = raw.get("kept")
    complement = [i for i in range(n) if i not in removed]
    if typed and isinstance(kept, list) and all(_is_int(i) for i in kept) and kept != complement:
        problems.append(f"kept: {_short(kept)} is not the blocks that removed leaves ({_short(complement)})")
    problems += _replaced_problems(raw, n, removed)
    return problems


def _replaced_problems(raw: dict[str, Any], n: int, removed: dict[int, int]) -> list[str]:
    """A replaced span must be consecutive blocks in range, end with its kept block, and have
    every other block removed: otherwise the trained block would stand in for something else."""
    entries = raw.get("replaced") if isinstance(raw.get("replaced"), list) else []
    problems = []
    if entries and raw.get("op") != "replace":
        problems.append(f"replaced: only a plan of op 'replace' replaces spans (this one's op is {raw.get('op')!r})")
    for k, entry in enumerate(entries):
        block, span = (entry.get("block"), entry.get("span")) if isinstance(entry, dict) else (None, None)
        if not _is_int(block) or not isinstance(span, list) or not all(_is_int(i) for i in span):
            continue  # the schema names the wrong type
        if len(span) < 2 or span != list(range(span[0], span[0] + len(span))) or not 0 <= span[0] <= span[-1] < n:
            problems.append(f"replaced[{k}].span: {_short(span)} is not a run of 2 or more consecutive blocks of 0..{n - 1}")
        elif block != span[-1]:
            problems.append(f"replaced[{k}].block: block {block} is not the span's last block ({span[-1]})")
        elif block in removed or any(i not in removed for i in span[:-1]):
            problems.append(f"replaced[{k}]: block {block} must be kept and blocks {_short(span[:-1])} removed")
    return problems


def _recipe_text_problems(raw: dict[str, Any]) -> list[str]:
    text = raw.get("recipe_text")
    if not isinstance(text, str):
        return []
    try:
        recipe = parse_recipe(text, "recipe_text")
    except RecipeError as error:
        return [error.message.replace("\n", "\n    ")]  # "recipe_text: ..." with its own list indented
    problems = []
    if isinstance(raw.get("recipe"), str) and recipe.name != raw["recipe"]:
        problems.append(f"recipe_text: is recipe '{recipe.name}', but the plan names recipe '{raw['recipe']}'")
    if isinstance(raw.get("op"), str) and recipe.select.op != raw["op"]:
        problems.append(f"recipe_text: selects by op '{recipe.select.op}', but the plan's op is '{raw['op']}'")
    return problems


def _short(indices: list[int]) -> str:
    return str(indices) if len(indices) <= 12 else f"[{', '.join(map(str, indices[:12]))}, ... ({len(indices)} in all)]"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _fixed_blocks_text(indices: list[int], fixed: Mapping[int, str]) -> str:
    reasons: dict[str, list[int]] = {}
    for i in indices:
        reasons.setdefault(fixed[i], []).append(i)
    parts = [f"block{'s' if len(b) > 1 else ''} {', '.join(map(str, b))} ({reason})" for reason, b in reasons.items()]
    return "; ".join(parts) + ", which cannot be removed without changing the model"


def plan(recipe: Recipe, num_blocks: int, report: CalibrationReport | None = None, limits: BlockLimits | None = None) -> SurgeryPlan:
    """``limits``: what the model's family forbids removing (`BlockLimits.of(adapter, config)`);
    None takes what the calibration report recorded. Selections skip fixed blocks, and any block
    whose removal would break a whole-removal rule (`BlockLimits.breach`), taking the next best
    and saying why in the notes (the blocks kept so are listed as protected); a recipe that lists
    blocks to remove is refused instead when one is fixed or the list breaks a rule."""
    select = recipe.select
    if report is not None and report.num_blocks != num_blocks:
        raise PlanError(
            f"The calibration report measured {report.num_blocks} blocks but the model has {num_blocks}.",
            fix="calibrate this model again (the report belongs to another model).",
        )
    if limits is None:
        limits = BlockLimits.from_report(report.model, num_blocks) if report is not None else BlockLimits()
    fixed = {i: r for i, r in limits.fixed.items() if 0 <= i < num_blocks}
    if isinstance(select, Replace):  # the span's shape first: no calibration can make it fit
        _replace_span_fits(select, num_blocks)
    if recipe.needs_calibration and report is None:
        raise PlanError(
            f"Recipe '{recipe.name}' selects by metric ({select.op}) and needs calibration.",
            fix="pass --data FILE.jsonl (or --calibration calibration.json).",
        )
    protected = _protected(select, num_blocks)
    budget = _budget(select, num_blocks)
    notes: list[str] = []
    if isinstance(select, Explicit):
        listed = sorted({i % num_blocks for i in select.blocks if -num_blocks <= i < num_blocks} & set(fixed))
        if listed:
            raise PlanError(
                f"select.blocks removes {_fixed_blocks_text(listed, fixed)}.",
                fix=f"drop block(s) {listed} from select.blocks.",
            )
    if fixed:
        protected |= set(fixed)
        notes.append(f"{_fixed_blocks_text(sorted(fixed), fixed)}: protected, never selected")
    rules = _Rules(limits)
    if isinstance(select, Explicit):
        chosen, criterion = _explicit(select, num_blocks, protected, budget)
        reasons = dict.fromkeys(chosen, "listed in recipe")
    elif isinstance(select, Lowest):
        chosen, criterion, reasons = _lowest(select, num_blocks, protected, budget, report, notes, rules)
    elif isinstance(select, Conditions):
        chosen, criterion, reasons = _conditions(select, protected, budget, report, notes, rules)
    elif isinstance(select, Span):
        chosen, criterion, reasons = _span(select, num_blocks, protected, budget, report, notes, rules)
    elif isinstance(select, Greedy):
        chosen, criterion, reasons = _greedy(select, num_blocks, protected, budget, report, notes, rules)
    elif isinstance(select, Replace):
        chosen, criterion, reasons = _replace(select, num_blocks, protected, budget, report, notes, rules)
    else:  # pragma: no cover - the schema admits no other op
        raise PlanError(f"Unknown op {select.op}")
    if len(chosen) >= num_blocks:
        raise PlanError(
            f"Recipe '{recipe.name}' would remove all {num_blocks} blocks.",
            fix="keep at least one block: lower the count/fraction, or add select.protect.",
        )
    if isinstance(select, Explicit):  # selections keep the rules themselves; a list is held to them
        limits.check(chosen, "select.blocks")
    notes += [f"block {i} kept by rule {b.rule}: removing it too, {b.problem}" for i, b in sorted(rules.held.items())]
    removed = tuple(RemovedBlock(index=i, reason=reasons[i], metrics=_block_metrics(report, select, i)) for i in sorted(chosen))
    calibration = None
    if report is not None:
        calibration = {"model": report.model.get("ref"), "data": report.data.get("path"), "sha256": report.data.get("sha256")}
    return SurgeryPlan(
        recipe=recipe.name,
        op=select.op,
        num_blocks=num_blocks,
        removed=removed,
        protected=tuple(sorted(protected | set(rules.held))),
        criterion=criterion,
        notes=tuple(notes),
        calibration=calibration,
        replaced=(ReplacedSpan(block=max(chosen) + 1, span=tuple(range(min(chosen), max(chosen) + 2))),)
        if isinstance(select, Replace)
        else (),
    )


@dataclass
class _Rules:
    """Takes blocks best first under the whole-removal rules (`BlockLimits.breach`), and
    remembers each block a rule kept, with the rule (``held``), for the plan's notes."""

    limits: BlockLimits
    held: dict[int, Breach] = field(default_factory=dict)

    def take(self, ranked: list[int], count: int) -> list[int]:
        """Up to ``count`` of ``ranked`` (best first) whose removal together breaks no rule.

        Rules are judged on the whole set, not per block (whether block 4 may go depends on
        whether block 5 goes), so each step takes the best remaining block that keeps every rule
        with those already taken, and a block passed over is tried again at the next step (the
        last-layer-type rule can hold again once more blocks go)."""
        chosen: list[int] = []
        rest = list(ranked)
        while len(chosen) < count:
            for i in rest:
                found = self.limits.breach([*chosen, i])
                if found is None:
                    chosen.append(i)
                    rest.remove(i)
                    self.held.pop(i, None)
                    break
                self.held[i] = found
            else:
                break  # every remaining block would break a rule
        return chosen

    def refusal(self, count: int, chosen: list[int], fix: str) -> PlanError:
        """The refusal of a selection that cannot reach ``count`` blocks without breaking a rule."""
        rules = sorted({b.rule for b in self.held.values()})
        return PlanError(
            f"The recipe asks for {count} blocks but only {len(chosen)} can go without breaking the family's rule(s) "
            f"{', '.join(rules)}: " + "; ".join(f"block {i}: {b.problem}" for i, b in sorted(self.held.items())) + ".",
            fix=f"{fix} to at most {len(chosen)}.",
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


def _lowest(select: Lowest, num_blocks: int, protected: set[int], budget: int, report: Any, notes: list[str], rules: _Rules):
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
    ranked = sorted(candidates, key=lambda i: values[i])
    chosen = rules.take(ranked, count)
    if len(chosen) < count:
        raise rules.refusal(count, chosen, "lower count/fraction")
    label = _label(select.metric, select.modality, select.epsilon)
    reasons = {i: f"rank {ranked.index(i) + 1} lowest {label} = {values[i]:.4f}" for i in chosen}
    return chosen, f"lowest {count} by {label}", reasons


def _conditions(select: Conditions, protected: set[int], budget: int, report: Any, notes: list[str], rules: _Rules):
    tables = [_values(report, c.metric, c.modality, epsilon=c.epsilon) for c in select.where]
    labels = [_label(c.metric, c.modality, c.epsilon) for c in select.where]
    qualified = [
        i
        for i in range(report.num_blocks)
        if i not in protected and all(t[i] is not None and c.holds(t[i]) for c, t in zip(select.where, tables))
    ]
    # Over budget: keep the blocks that satisfy the first condition by the widest margin.
    ranked = rules.take(sorted(qualified, key=lambda i: tables[0][i]), budget)
    if len(qualified) > len(ranked) + len(rules.held):  # some block that qualifies was left to the budget
        notes.append(f"{len(qualified)} blocks qualify; kept the {budget} lowest by {labels[0]} (budget)")
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


def _span(select: Span, num_blocks: int, protected: set[int], budget: int, report: Any, notes: list[str], rules: _Rules):
    n = select.n
    if n > budget:
        raise PlanError(f"select.n = {n} exceeds the removal budget of {budget} block(s).", fix="lower n or raise the budget.")
    best, reason, label = _smallest_span(n, n, select.modality, num_blocks, protected, report, notes, rules)
    chosen = list(range(best, best + n))
    return chosen, f"span of {n} with smallest {label}", dict.fromkeys(chosen, reason)


def _smallest_span(
    n: int, gone: int, modality: str, num_blocks: int, protected: set[int], report: Any, notes: list[str], rules: _Rules
) -> tuple[int, str, str]:
    """(start, reason, label) of the unprotected run of ``n`` blocks with the smallest angular
    distance whose first ``gone`` blocks may go together under the family's rules (all of them
    for ``span``; all but the last, which stands in for the run, for ``replace``)."""
    values = _values(report, "angular_distance", modality, span=n)
    starts = [s for s in range(num_blocks - n + 1) if values[s] is not None and not protected.intersection(range(s, s + n))]
    if not starts:
        raise PlanError(
            f"No run of {n} consecutive unprotected blocks exists.",
            fix="lower select.n or protect fewer blocks.",
        )
    # A span is removed whole, so a rule is judged on each span: one that breaks it is passed over.
    breaches = {s: rules.limits.breach(range(s, s + gone)) for s in starts}
    allowed = [s for s in starts if breaches[s] is None]
    if not allowed:
        broken = sorted({b.rule for b in breaches.values() if b is not None})
        raise PlanError(
            f"Every run of {n} consecutive unprotected blocks breaks the family's rule(s) {', '.join(broken)}: "
            + "; ".join(f"blocks {s}..{s + n - 1}: {b.problem}" for s, b in breaches.items() if b is not None)
            + ".",
            fix="lower select.n, or protect fewer blocks so that another run can go.",
        )
    best = min(allowed, key=lambda s: values[s])
    label = _label("angular_distance", modality, span=n)
    for s in sorted(s for s in starts if breaches[s] is not None and values[s] < values[best]):
        notes.append(f"span {s}..{s + n - 1} ({label} = {values[s]:.4f}) passed over by rule {breaches[s].rule}: {breaches[s].problem}")
    return best, f"span {best}..{best + n - 1}: {label} = {values[best]:.4f} (smallest of {len(allowed)})", label


def _replace_span_fits(select: Replace, num_blocks: int) -> None:
    """Refuse a span that cannot be one of this model: n blocks and one more, a start in range."""
    n = select.n
    if n >= num_blocks:
        raise PlanError(
            f"select.n = {n}: the model has {num_blocks} blocks, and a replaced span must leave at least one other block.",
            fix=f"use select.n between 2 and {num_blocks - 1}.",
        )
    if select.start is not None and _normalize(select.start, num_blocks, "select.start") + n > num_blocks:
        raise PlanError(
            f"select.start = {select.start} with n = {n} runs past the last block ({num_blocks - 1}).",
            fix=f"use a start between {-num_blocks} and {num_blocks - n} (the span {num_blocks - n}..{num_blocks - 1} is the last).",
        )


def _replace(select: Replace, num_blocks: int, protected: set[int], budget: int, report: Any, notes: list[str], rules: _Rules):
    """The span's first n - 1 blocks go; its last block stays in its place, to be trained to map
    the span's input to its output. Initialising from the last block means the untrained stand-in
    is exactly the model with the first n - 1 blocks removed: training starts from that and must
    beat it (`heal.replace` measures both)."""
    n = select.n
    if n - 1 > budget:
        raise PlanError(
            f"select.n = {n} removes {n - 1} block(s), over the removal budget of {budget}.", fix="lower n or raise the budget."
        )
    if select.start is not None:
        start = _normalize(select.start, num_blocks, "select.start")
        clash = sorted(protected.intersection(range(start, start + n)))
        if clash:
            raise PlanError(
                f"select.start = {select.start}, n = {n}: the span {start}..{start + n - 1} holds protected block(s) {clash} "
                "(by select.protect, or fixed by the model's family).",
                fix="move select.start, lower n, or protect fewer blocks.",
            )
        rules.limits.check(range(start, start + n - 1), "select.start/n")
        reason, label = f"span {start}..{start + n - 1}: select.start", "select.start"
    else:
        start, reason, label = _smallest_span(n, n - 1, select.modality, num_blocks, protected, report, notes, rules)
    last = start + n - 1
    notes.append(
        f"block {last} stays in place of blocks {start}..{last}, trained to map block {start}'s input to block {last}'s output "
        f"(initialised from block {last})"
    )
    chosen = list(range(start, last))
    return chosen, f"replace a span of {n} with one trained block ({label})", dict.fromkeys(chosen, f"{reason}; replaced by block {last}")


def _greedy(select: Greedy, num_blocks: int, protected: set[int], budget: int, report: Any, notes: list[str], rules: _Rules):
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
    # Calibration measured each step with the earlier picks gone, rules or not; a pick that breaks
    # a rule is passed over like a protected block (the notes say so), the next one taken.
    chosen = rules.take(usable, count)
    if len(chosen) < count:
        raise rules.refusal(count, chosen, f"calibrate with --greedy {count + len(rules.held)} or more, or lower select.count")
    steps = {step["block"]: step for step in report.metrics["greedy"]["steps"]}
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
