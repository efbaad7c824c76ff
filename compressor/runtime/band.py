"""Choosing Skip-It's visual-token band from a calibration report ("Skip-It? Theoretical Conditions
for Layer Skipping in VLMs").

Image tokens are *redundant* in block i when every condition holds for block i's value in the
report — the condition language of block removal's ``conditions`` op (`recipe.Condition`: a metric,
a modality, ``below`` or ``above``, an epsilon for tail_probability), e.g. image-token block
influence below x. A block whose value is missing (no image token reached it) is not redundant: the
report cannot say it is. The band is the smallest contiguous [first, last] (inclusive, original
numbering) that holds every block where image tokens are not redundant; outside it image tokens
neither take part nor are attended (`RuntimeOptions.band`). Redundant blocks inside the band stay
in it: a band has no holes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..calibration_report import CalibrationReport
from ..errors import InputError
from ..planner import _label, _values
from ..recipe import Condition


@dataclass(frozen=True)
class BandChoice:
    band: tuple[int, int]
    redundant: tuple[bool, ...]  # per block: every condition holds for image tokens there
    criterion: str  # the conditions, as text

    def describe(self) -> str:
        skipped = [i for i, r in enumerate(self.redundant) if r]
        return f"image tokens take part in blocks {self.band[0]}..{self.band[1]}; redundant by {self.criterion}: {skipped or 'none'}"


def choose_band(report: CalibrationReport, where: Sequence[Condition | Mapping[str, Any]]) -> BandChoice:
    """The Skip-It band of ``report`` under the conditions ``where`` (see the module docstring)."""
    if not where:
        raise InputError(
            "No condition was given to choose the band by.",
            fix="give at least one, e.g. {metric: block_influence, modality: image, below: 0.05}.",
        )
    conditions = [_condition(c, i) for i, c in enumerate(where)]
    tables = [_values(report, c.metric, c.modality, epsilon=c.epsilon) for c in conditions]
    redundant = tuple(all(t[i] is not None and c.holds(t[i]) for c, t in zip(conditions, tables)) for i in range(report.num_blocks))
    needed = [i for i, r in enumerate(redundant) if not r]
    criterion = " and ".join(
        f"{_label(c.metric, c.modality, c.epsilon)} {'<' if c.below is not None else '>'} {c.below if c.below is not None else c.above:g}"
        for c in conditions
    )
    if not needed:
        raise InputError(
            f"Image tokens are redundant in every block by {criterion}: the band would be empty and the image ignored.",
            fix="tighten the conditions (a smaller 'below', a larger 'above'), or leave the band out.",
        )
    return BandChoice((needed[0], needed[-1]), redundant, criterion)


def _condition(value: Condition | Mapping[str, Any], index: int) -> Condition:
    if isinstance(value, Condition):
        return value
    try:
        return Condition.model_validate(dict(value))
    except (ValidationError, TypeError, ValueError) as error:
        problems = (
            "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors()) if isinstance(error, ValidationError) else str(error)
        )
        raise InputError(
            f"Band condition {index}: {problems}.", fix="write it as {metric: ..., modality: ..., below: X} (or above: X)."
        ) from None
