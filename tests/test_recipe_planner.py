"""Recipe schema strictness and the planner's choices, on a hand-made calibration report."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.block_limits import BlockLimits
from compressor.calibrate import REPORT_FORMAT, CalibrationReport
from compressor.errors import PlanError, RecipeError
from compressor.planner import SurgeryPlan, plan
from compressor.recipe import load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def report(values: dict[str, list[float]], spans: dict[int, list[float]] | None = None) -> CalibrationReport:
    """A report with chosen per-block values (the same for every modality unless given)."""
    n = len(values["block_influence"])
    per = lambda v: {"all": v, "text": v, "image": v}  # noqa: E731
    return CalibrationReport(
        model={"ref": "test", "num_blocks": n},
        data={"path": "d.jsonl", "sha256": "0" * 64, "num_samples": 1},
        options={},
        metrics={
            "block_influence": per(values["block_influence"]),
            "tail_probability": {e: per(values.get("tail", [0.0] * n)) for e in ("0.1", "0.2")},
            "adjacent_distance": per(values.get("adjacent", [0.0] * n)),
            "angular_distance": {str(k): per(v) for k, v in (spans or {1: [0.5] * n}).items()},
        },
        elapsed_s=0.0,
        format=REPORT_FORMAT,
    )


BI = [0.9, 0.2, 0.05, 0.3, 0.01, 0.1, 0.4, 0.8]


def recipe(select: str) -> object:
    return parse_recipe(f"version: 1\nname: t\nselect: {select}\n")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate_and_plan(path):
    loaded = load_recipe(path).recipe
    spans = {n: [0.1 * (n + i % 3) for i in range(8 - n + 1)] for n in range(1, 5)}
    values = {"block_influence": BI, "tail": [0.0] * 8}
    measured = report(values, spans)
    order = [4, 2, 5, 1, 3, 6]  # a greedy order among the unprotected blocks
    measured.metrics["greedy"] = {"order": order, "steps": [{"block": b, "loss": 1.0 + i, "kl": 0.1} for i, b in enumerate(order)]}
    result = plan(loaded, 8, measured if loaded.needs_calibration else None)
    assert 0 < len(result.removed) < 8
    assert set(result.kept).isdisjoint(result.removed_indices)


def test_explicit_negative_indices_and_errors():
    assert plan(recipe("{op: explicit, blocks: [1, -1]}"), 8).removed_indices == [1, 7]
    with pytest.raises(PlanError, match=r"select.blocks: block 8 is out of range .* 8 blocks"):
        plan(recipe("{op: explicit, blocks: [8]}"), 8)
    with pytest.raises(PlanError, match="would remove all 3 blocks"):
        plan(recipe("{op: explicit, blocks: [0, 1, 2]}"), 3)
    with pytest.raises(PlanError, match="protected block"):
        plan(recipe("{op: explicit, blocks: [0], protect: {first: 1}}"), 8)
    with pytest.raises(PlanError, match="twice"):
        plan(recipe("{op: explicit, blocks: [1, -7]}"), 8)


def test_lowest_respects_protection_and_budget():
    r = report({"block_influence": BI})
    assert plan(recipe("{op: lowest, metric: block_influence, count: 3}"), 8, r).removed_indices == [2, 4, 5]
    protected = plan(recipe("{op: lowest, metric: block_influence, count: 2, protect: {blocks: [4]}}"), 8, r)
    assert protected.removed_indices == [2, 5]
    assert plan(recipe("{op: lowest, metric: block_influence, fraction: 0.25}"), 8, r).removed_indices == [2, 4]
    capped = plan(recipe("{op: lowest, metric: block_influence, count: 3, budget: {max_blocks: 1}}"), 8, r)
    assert capped.removed_indices == [4] and "capped" in capped.notes[0]
    removed = {b.index: b for b in capped.removed}
    assert removed[4].metrics["block_influence[all]"] == 0.01
    with pytest.raises(PlanError, match="needs calibration"):
        plan(recipe("{op: lowest, metric: block_influence, count: 1}"), 8, None)


def test_conditions_all_must_hold():
    r = report({"block_influence": BI, "adjacent": [0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]})
    select = "{op: conditions, where: [{metric: block_influence, below: 0.25}, {metric: adjacent_distance, below: 0.1}]}"
    chosen = plan(recipe(select), 8, r)
    assert chosen.removed_indices == [4, 5]  # 1 and 2 fail the adjacency condition
    assert "block_influence[all] = 0.0100 < 0.25" in {b.index: b for b in chosen.removed}[4].reason
    budget = select[:-1] + ", budget: {max_blocks: 1}}"
    assert plan(recipe(budget), 8, r).removed_indices == [4]
    none = plan(recipe("{op: conditions, where: [{metric: block_influence, below: 0.001}]}"), 8, r)
    assert none.removed == () and "no block meets" in none.notes[0]


def test_span_picks_smallest_angular_run():
    spans = {1: [0.5] * 8, 2: [0.9, 0.4, 0.3, 0.05, 0.6, 0.2, 0.7]}
    r = report({"block_influence": BI}, spans)
    assert plan(recipe("{op: span, n: 2}"), 8, r).removed_indices == [3, 4]
    assert plan(recipe("{op: span, n: 2, protect: {blocks: [4]}}"), 8, r).removed_indices == [5, 6]
    with pytest.raises(PlanError, match="no angular_distance"):
        plan(recipe("{op: span, n: 3}"), 8, r)


def test_modality_without_tokens_is_refused():
    r = report({"block_influence": BI})
    r.metrics["block_influence"]["image"] = [None] * 8
    with pytest.raises(PlanError, match="no image tokens"):
        plan(recipe("{op: lowest, metric: block_influence, modality: image, count: 1}"), 8, r)


def test_report_for_another_model_is_refused():
    with pytest.raises(PlanError, match="measured 8 blocks but the model has 6"):
        plan(recipe("{op: lowest, metric: block_influence, count: 1}"), 6, report({"block_influence": BI}))


def test_plan_round_trip(tmp_path):
    chosen = plan(recipe("{op: lowest, metric: block_influence, count: 2}"), 8, report({"block_influence": BI}))
    chosen.save(tmp_path / "plan.json")
    again = SurgeryPlan.load(tmp_path / "plan.json")
    assert again == chosen
    assert "kept (6): [0, 1, 3, 5, 6, 7]" in again.describe()


def test_every_problem_reported_at_once_with_suggestions():
    text = """
version: 1
name: t
calibraton: {}
select: {op: lowest, metric: block_influence, cnt: 2, protect: {frist: 1}}
"""
    with pytest.raises(RecipeError) as error:
        parse_recipe(text, "r.yaml")
    message = str(error.value)
    assert "r.yaml: 3 problem(s)" in message
    assert "unknown key 'calibraton' (did you mean 'calibration'?)" in message
    assert "select: unknown key 'cnt' (did you mean 'count'?)" in message
    assert "select.protect: unknown key 'frist' (did you mean 'first'?)" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: 1\nname: t\nselect: {op: lowst}\n", "unknown op 'lowst' (did you mean 'lowest'?)"),
        ("version: 1\nname: t\nselect: {blocks: [1]}\n", "missing 'op'"),
        ("version: 2\nname: t\nselect: {op: explicit, blocks: [1]}\n", "version"),
        ("version: 1\nname: t\nselect: {op: lowest, metric: block_influence}\n", "exactly one of 'count' or 'fraction'"),
        ("version: 1\nname: t\nselect: {op: lowest, metric: tail_probability, count: 1}\n", "needs an 'epsilon'"),
        ("version: 1\nname: t\nselect: {op: conditions, where: [{metric: block_influence}]}\n", "exactly one of 'below' or 'above'"),
        ("version: 1\nname: t\nselect: {op: lowest, metric: block_influense, count: 1}\n", "did you mean 'block_influence'"),
        ("version: 1\nname: t\nname: u\nselect: {op: explicit, blocks: [1]}\n", "duplicate key 'name'"),
        ("version: 1\nname: [t\n", "not valid YAML at line"),
        ("- 1\n- 2\n", "a recipe is a YAML mapping"),
        ("version: 1\nname: t\nselect: {op: explicit, blocks: [1]}\nvalidate: {max_accuracy_drop: 2}\n", "validate.max_accuracy_drop"),
    ],
)
def test_bad_recipes(text, expected):
    with pytest.raises(RecipeError, match=None) as error:
        parse_recipe(text)
    assert expected in str(error.value)


FIXED = BlockLimits(fixed={0: "DeepStack (test)", 1: "DeepStack (test)"})  # as `BlockLimits.of` gives them


def test_fixed_blocks_are_refused_when_listed_and_skipped_by_selections():
    # Listed: refused, naming the block and the reason.
    with pytest.raises(PlanError, match=r"block 1 \(DeepStack \(test\)\), which cannot be removed"):
        plan(recipe("{op: explicit, blocks: [1, 4]}"), 8, limits=FIXED)
    assert plan(recipe("{op: explicit, blocks: [2, 4]}"), 8, limits=FIXED).removed_indices == [2, 4]
    # Selections skip them like protected blocks, and say so in the notes.
    values = {"block_influence": [0.0, 0.01, 0.5, 0.3, 0.2, 0.6, 0.7, 0.8]}
    r = report(values, {1: [0.0, 0.0, 0.5, 0.3, 0.2, 0.6, 0.7, 0.8], 2: [0.0, 0.1, 0.9, 0.4, 0.5, 0.8, 0.9]})
    r.metrics["greedy"] = {"order": [0, 1, 4, 3], "steps": [{"block": b, "loss": 1.0 + i, "kl": 0.1} for i, b in enumerate([0, 1, 4, 3])]}
    for select, expected in [
        ("{op: lowest, metric: block_influence, count: 2}", [3, 4]),
        ("{op: conditions, where: [{metric: block_influence, below: 0.35}]}", [3, 4]),
        ("{op: span, n: 2}", [3, 4]),
        ("{op: greedy, count: 2}", [3, 4]),
    ]:
        result = plan(recipe(select), 8, r, limits=FIXED)
        assert result.removed_indices == expected, select
        assert {0, 1} <= set(result.protected)
        assert any("blocks 0, 1 (DeepStack (test))" in note and "never selected" in note for note in result.notes), result.notes
    # Given only a report, the planner takes the fixed blocks the report recorded.
    r.model["fixed_blocks"] = {"0": "DeepStack (test)"}
    assert plan(recipe("{op: lowest, metric: block_influence, count: 1}"), 8, r).removed_indices == [1]
    # A plan that removes one (e.g. a saved plan) is refused when checked against the model.
    made = plan(recipe("{op: explicit, blocks: [0]}"), 8)
    with pytest.raises(PlanError, match=r"removes block 0 \(DeepStack \(test\)\)"):
        made.check_fixed(FIXED.fixed)
