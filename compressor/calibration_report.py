"""The calibration report: its schema (``compressor.calibration/1``), saving it, and loading it
with every field checked.

Apart from `calibrate` (which fills it) so that reading a report — `compressor plan`, the
planner, exports — needs neither torch nor transformers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import InputError
from .inputs import read_json_object
from .recipe import FUNCTIONAL_METRICS

MODALITIES = ("all", "text", "image")
REPORT_FORMAT = "compressor.calibration/1"
METRICS = ("block_influence", "tail_probability", "adjacent_distance", "angular_distance")


@dataclass
class CalibrationReport:
    """Per-block redundancy metrics of one model on one data file, plus how they were made."""

    model: dict[str, Any]
    data: dict[str, Any]
    options: dict[str, Any]
    metrics: dict[str, Any]
    elapsed_s: float
    environment: dict[str, str] = field(default_factory=dict)
    format: str = REPORT_FORMAT
    timings: dict[str, float] = field(default_factory=dict)  # seconds per pass (geometric, functional)

    @property
    def num_blocks(self) -> int:
        return int(self.model["num_blocks"])

    def has(self, metric: str) -> bool:
        return metric in self.metrics

    @property
    def greedy_order(self) -> list[int]:
        return list(self.metrics.get("greedy", {}).get("order", []))

    def values(self, metric: str, modality: str, *, epsilon: float | None = None, span: int = 1) -> list[float | None]:
        """One value per block (per span start for ``angular_distance``), None where no tokens."""
        table = self.metrics[metric]
        if metric == "tail_probability":
            key = _float_key(table, epsilon)
            if key is None:
                raise KeyError(f"epsilon {epsilon} not measured (have {', '.join(table)})")
            table = table[key]
        elif metric == "angular_distance":
            if str(span) not in table:
                raise KeyError(f"span {span} not measured (have up to {max(map(int, table))})")
            table = table[str(span)]
        return list(table[modality])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> CalibrationReport:
        """Read a report written by `save`. A corrupt or hand-edited one is refused here, by
        what is wrong, rather than failing later inside the planner."""
        path = Path(path)
        fix = "pass the JSON written by `compressor calibrate -o` (or calibrate again)."
        raw = read_json_object(path, "Calibration report", fmt=REPORT_FORMAT, max_bytes=MAX_REPORT_BYTES, fix=fix)
        problems = _report_problems(raw)
        if problems:
            listed = "\n".join(f"  - {p}" for p in problems)
            raise InputError(f"Calibration report '{path}': {len(problems)} problem(s):\n{listed}", fix=fix)
        return cls(**raw)


# A report holds a few numbers per block and metric: ~100 kB for 100 blocks.
MAX_REPORT_BYTES = 64_000_000
_SECTIONS = ("model", "data", "options", "metrics", "environment", "timings")


def _report_problems(raw: dict[str, Any]) -> list[str]:
    """What keeps ``raw`` from being a report the planner can read: the layout that
    `_MetricHooks.results` and `functional.measure` write, one value per block in every table."""
    known = {f.name for f in fields(CalibrationReport)}
    problems = [f"unknown key '{key}'" for key in raw if key not in known]
    problems += [f"{key}: required field is missing" for key in ("model", "data", "options", "metrics", "elapsed_s") if key not in raw]
    problems += [
        f"{key}: expected an object, got {_json_type(raw[key])}" for key in _SECTIONS if key in raw and not isinstance(raw[key], dict)
    ]
    if "elapsed_s" in raw and not _is_number(raw["elapsed_s"]):
        problems.append(f"elapsed_s: expected a number, got {_json_type(raw['elapsed_s'])}")
    n = raw["model"].get("num_blocks") if isinstance(raw.get("model"), dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return [*problems, f"model.num_blocks: expected a positive integer, got {json.dumps(n)}"]
    tables = raw.get("metrics")
    if not isinstance(tables, dict):
        return problems
    problems += [f"metrics.{metric}: missing" for metric in METRICS if metric not in tables]
    for metric in ("block_influence", "adjacent_distance"):
        if metric in tables:
            problems += _table_problems(f"metrics.{metric}", tables[metric], MODALITIES, n)
    for metric in ("tail_probability", "angular_distance"):
        if metric in tables:
            problems += _keyed_problems(f"metrics.{metric}", tables[metric], n, by_span=metric == "angular_distance")
    for metric in FUNCTIONAL_METRICS:  # measured over all tokens only
        if metric in tables:
            problems += _table_problems(f"metrics.{metric}", tables[metric], ("all",), n)
    if "greedy" in tables:
        problems += _greedy_problems(tables["greedy"], n)
    return problems


def _keyed_problems(where: str, table: Any, n: int, *, by_span: bool) -> list[str]:
    """Tables keyed by epsilon ("0.05") or by span length ("2", whose table has one value per start)."""
    if not isinstance(table, dict) or not table:
        return [f"{where}: expected a non-empty object, got {_json_type(table)}"]
    problems = []
    for key, inner in table.items():
        if by_span:
            span = int(key) if key.isascii() and key.isdigit() else 0
            if not 1 <= span <= n:
                problems.append(f"{where}: key '{key}' is not a span length 1..{n}")
                continue
            problems += _table_problems(f"{where}.{key}", inner, MODALITIES, n - span + 1)
        else:
            try:
                float(key)
            except ValueError:
                problems.append(f"{where}: key '{key}' is not an epsilon")
                continue
            problems += _table_problems(f"{where}.{key}", inner, MODALITIES, n)
    return problems


def _table_problems(where: str, table: Any, modalities: tuple[str, ...], length: int) -> list[str]:
    """``{modality: [one number or null per block]}``."""
    if not isinstance(table, dict):
        return [f"{where}: expected an object of modalities, got {_json_type(table)}"]
    problems = []
    for modality in modalities:
        values = table.get(modality)
        if not isinstance(values, list):
            problems.append(f"{where}.{modality}: expected a list of {length} values, got {_json_type(values)}")
        elif len(values) != length:
            problems.append(f"{where}.{modality}: {len(values)} values, expected {length} (one per block)")
        elif not all(v is None or _is_number(v) for v in values):
            problems.append(f"{where}.{modality}: values must be numbers or null")
    return problems


def _greedy_problems(greedy: Any, n: int) -> list[str]:
    """The greedy order must be distinct blocks, each with the step that measured it."""
    if not isinstance(greedy, dict):
        return [f"metrics.greedy: expected an object, got {_json_type(greedy)}"]
    order, steps = greedy.get("order"), greedy.get("steps")
    if not isinstance(order, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in order):
        return [f"metrics.greedy.order: expected a list of block indices 0..{n - 1}"]
    if len(set(order)) != len(order):
        return ["metrics.greedy.order: lists a block twice"]
    if not isinstance(steps, list) or not all(isinstance(s, dict) and _is_number(s.get("loss")) for s in steps):
        return ["metrics.greedy.steps: expected a list of objects with a numeric 'loss'"]
    measured = {s.get("block") for s in steps}
    missing = [i for i in order if i not in measured]
    return [f"metrics.greedy.steps: no step for block(s) {missing}"] if missing else []


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _float_key(table: dict[str, Any], value: float | None) -> str | None:
    if value is None:
        return None
    return next((key for key in table if abs(float(key) - value) < 1e-12), None)
