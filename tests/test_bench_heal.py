"""The healing benchmark, run for real at smoke size on a stand-in demo model (the demo's own
architecture and data generator, trained for a few steps into a temporary cache: never the real
demo model, which takes minutes), and the demo's heal: recipe through `compressor demo`."""

from __future__ import annotations

import json

import pytest

from compressor.bench_heal import (
    SMOKE,
    BudgetResult,
    MethodResult,
    TaskResult,
    available_methods,
    heal_budget,
    heal_data,
    load_results,
    markdown,
    recovered,
    run_task,
    write,
)
from compressor.data import load_samples
from compressor.demo.run import RECIPES, run_demo
from compressor.demo.train import DemoSettings, ensure_demo_model
from compressor.errors import InputError
from compressor.recipe import load_recipe

# 20 training steps: a healing budget of 2 (a tenth), the smoke run's steps.
STAND_IN = DemoSettings(n_train=96, n_calibration=8, n_eval=16, steps=20, batch_size=4, warmup_steps=2)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    return ensure_demo_model(tmp_path_factory.mktemp("cache"), settings=STAND_IN, progress=False)


def test_recovered_share():
    assert recovered(0.8, 0.6, 0.75) == pytest.approx(0.75)
    assert recovered(0.8, 0.6, 0.5) == pytest.approx(-0.5)  # healing made it worse
    assert recovered(0.8, 0.8, 0.9) is None  # nothing lost: undefined, not "infinite recovery"
    assert recovered(0.7, 0.8, 0.8) is None


def test_budget_is_a_tenth_of_the_demo_training_and_is_enforced(stand_in, tmp_path):
    assert heal_budget(DemoSettings()) == DemoSettings().steps // 10
    assert heal_budget(STAND_IN) == 2
    with pytest.raises(InputError, match="at most 2 steps"):
        run_task("shapes", stand_in, steps=3)
    with pytest.raises(InputError, match="demo's own batch"):
        run_task("shapes", stand_in, batch_size=STAND_IN.batch_size + 1)
    shipped = load_recipe(RECIPES / "demo-heal.yaml").recipe.heal
    assert shipped is not None and shipped.steps <= heal_budget(DemoSettings())
    assert shipped.batch_size <= DemoSettings().batch_size and "eval" not in shipped.data


def test_heal_data_comes_from_the_training_split(stand_in, tmp_path):
    path = heal_data(stand_in, 10, tmp_path)
    samples, train = load_samples(path, allow_outside=True), load_samples(stand_in.train)
    assert [(s.prompt, s.answer, s.image) for s in samples] == [(s.prompt, s.answer, s.image) for s in train[:10]]
    evaluation = {s.image for s in load_samples(stand_in.eval)}
    assert not evaluation & {s.image for s in samples}
    with pytest.raises(InputError, match="needs 97"):
        heal_data(stand_in, STAND_IN.n_train + 1, tmp_path)


def test_smoke_bench_heals_with_every_method_and_writes_the_table(stand_in, tmp_path):
    result = run_task(
        "shapes", stand_in, ks=[1], steps=SMOKE["steps"], eval_limit=SMOKE["eval_samples"], held_out_samples=SMOKE["held_out_samples"]
    )
    offered, missing = available_methods()
    assert result.skipped_methods == missing and result.num_blocks == 8 and result.eval_questions == SMOKE["eval_samples"]
    [budget] = result.budgets
    assert budget.k == 1 and len(budget.removed) == 1 and budget.removed[0] not in (0, 7)  # shortgpt.yaml protects first and last
    assert set(budget.methods) == set(offered) and "replace" in offered
    assert len(budget.methods["replace"].span) == 2  # k + 1 blocks, one trained block in their place
    for method, found in budget.methods.items():
        assert found.refused is None, (method, found.refused)
        assert found.steps == SMOKE["steps"] and found.seconds > 0 and found.trained_parameters > 0
        assert 0 <= found.accuracy <= 1
        assert found.recovered == recovered(result.original_accuracy, budget.pruned_accuracy, found.accuracy)
    text = write([result], tmp_path / "out")
    assert "| k | removed | no healing | " + " | ".join(m for m in offered) + " |" in text
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved[0]["budgets"][0]["methods"]["distill"]["steps"] == SMOKE["steps"]
    assert saved[0]["target"]["summary"].endswith("not measured in this run")  # k = L/4 = 2 was not run
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 0
    assert (tmp_path / "out" / "results.md").read_text().strip() == text.strip()
    assert load_results(tmp_path / "out" / "results.json") == [result]  # what --render re-draws from


def test_target_line_and_undefined_shares():
    result = TaskResult(
        "t",
        8,
        100,
        0.8,
        {
            "steps": 60,
            "budget_steps": 60,
            "demo_steps": 600,
            "batch_size": 4,
            "data": "d",
            "held_out_samples": 32,
            "hidden_loss": "none",
            "lr": {"distill": 1e-5},
            "selection": "s",
        },
    )
    healed = MethodResult(0.76, recovered(0.8, 0.7, 0.76), 1.0, 60, 60, 0.1, 0.05, 10)
    result.budgets = [  # measured target first, as `make bench-heal` orders them; shown by k
        BudgetResult(2, [5, 6], 0.7, {"distill": healed}),
        BudgetResult(1, [5], 0.8, {"distill": MethodResult(0.8, None, 1.0, 60, 0, 0.1, 0.1, 10)}),
    ]
    assert result.target() == (False, "target (distill recovers >= 80% of the lost accuracy at k = L/4 = 2): NOT MET (60%)")
    text = markdown([result])
    first, second = "| 1 | 5 | 80.0% | 80.0% (n/a) |", "| 2 | 5, 6 | 70.0% | 76.0% (60.0%) |"
    assert first in text and second in text and text.index(first) < text.index(second)
    result.budgets[0].methods["distill"] = MethodResult(0.79, recovered(0.8, 0.7, 0.79), 1.0, 60, 60, 0.1, 0.05, 10)
    assert result.target()[0] is True


def test_demo_runs_a_recipe_that_heals(stand_in, tmp_path):
    """`compressor demo --recipe recipes/demo-heal.yaml`: prunes into pruned/, heals on the demo's
    training split into hf/, validates hf/ (the shipped recipe at 2 steps, for time)."""
    shipped = (RECIPES / "demo-heal.yaml").read_text()
    assert "steps: 60\n" in shipped
    recipe = tmp_path / "demo-heal.yaml"
    recipe.write_text(shipped.replace("steps: 60\n", "steps: 2\n").replace("eval_every: 15", "eval_every: 1"))
    summary = run_demo(tmp_path / "demo", recipe=recipe, assets=stand_in, progress=False)
    out = tmp_path / "demo"
    assert (out / "pruned" / "config.json").is_file() and (out / "hf" / "config.json").is_file()
    assert summary.healing is not None and "--method distill" in summary.healing
    healing = json.loads((out / "hf" / "compressor.json").read_text())["healing"]
    assert healing["data"]["name"] == "train.jsonl" and healing["steps"] == 2
    assert summary.report["models"]["pruned"]["num_blocks"] == 6  # a quarter of 8 removed
    described = summary.describe()
    assert "  healed    6 blocks" in described and "checkpoint before healing" in described
