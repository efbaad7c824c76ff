"""The planner keeps the whole-removal rules a family states (`block_limits.BlockLimits`).

- Required layer type (Qwen3.5: at least one `full_attention` block must stay): a metric recipe
  whose lowest scores are exactly the full-attention blocks keeps one, and says why.
- Last layer type (Gemma 4: transformers forces the last block to `full_attention`): with a
  trailing run of full-attention blocks, no selection leaves a sliding block last.
- An explicit list that breaks a rule is refused by `compressor plan` already (exit 2, the rule
  named), from the model's config.json or from a calibration report alone.
- `compressor arch list` states the rules, from the adapters' data.

Configs are hand-written config.json dicts read as `JsonConfig` (no transformers, no weights), and
reports carry chosen scores, as in tests/test_recipe_planner.py. Each test also plans with the
rule switched off (`dataclasses.replace` on the adapter) to show that the rule is what decides.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from compressor.architectures import ADAPTERS, Adapter, adapter_for_config
from compressor.block_limits import BlockLimits, rule_notes
from compressor.errors import InputError, PlanError
from compressor.planner import plan
from compressor.recipe import load_recipe, parse_recipe
from compressor.reindex import JsonConfig, check_reindex

from .conftest import missing_reason, run_cli
from .test_recipe_planner import report

RECIPES = Path(__file__).parent.parent / "recipes"
F, S, L = "full_attention", "sliding_attention", "linear_attention"

# Qwen3.5 text decoder: full attention every 3rd block (2, 5), linear attention elsewhere.
QWEN = {
    "architectures": ["Qwen3_5ForCausalLM"],
    "model_type": "qwen3_5_text",
    "num_hidden_layers": 8,
    "layer_types": [L, L, F, L, L, F, L, L],
    "full_attention_interval": 3,
}
# Gemma 4 text decoder ending in a run of three full-attention blocks (5, 6, 7); no KV sharing,
# so the last-layer-type rule is the only limit.
GEMMA = {
    "architectures": ["Gemma4ForCausalLM"],
    "model_type": "gemma4_text",
    "num_hidden_layers": 8,
    "layer_types": [S, S, F, S, S, F, F, F],
    "num_kv_shared_layers": 0,
}


def limits_of(config: dict, **off: str) -> tuple[Adapter, BlockLimits]:
    """The adapter of ``config`` (with the rules named in ``off`` switched off) and its limits."""
    adapter = replace(adapter_for_config(JsonConfig(config)), **off)
    return adapter, BlockLimits.of(adapter, JsonConfig(config))


def recipe(select: str):
    return parse_recipe(f"version: 1\nname: t\nselect: {select}\n")


def with_greedy(measured, order: list[int]):
    measured.metrics["greedy"] = {"order": order, "steps": [{"block": b, "loss": 1.0 + i, "kl": 0.1} for i, b in enumerate(order)]}
    return measured


def assert_surgery_accepts(config: dict, adapter: Adapter, kept: list[int]) -> None:
    """Surgery's own judgement of the removal (`reindex.check_reindex`) agrees with the planner."""
    check_reindex(JsonConfig(json.loads(json.dumps(config))), adapter, kept)


# -- required layer type (Qwen3.5) -----------------------------------------------------------------


def test_lowest_scores_on_every_full_attention_block_keep_one_with_the_reason():
    """shortgpt.yaml takes the 2 lowest of 8 (blocks 0 and 7 protected); the lowest are exactly the
    full-attention blocks 2 and 5, so block 5 stays (the rule) and the next best, 4, goes."""
    scores = report({"block_influence": [0.9, 0.5, 0.01, 0.4, 0.3, 0.02, 0.6, 0.8]})
    shortgpt = load_recipe(RECIPES / "shortgpt.yaml").recipe
    adapter, limits = limits_of(QWEN)
    chosen = plan(shortgpt, 8, scores, limits)
    assert chosen.removed_indices == [2, 4]
    assert 5 in chosen.protected
    (note,) = [n for n in chosen.notes if n.startswith("block 5 kept by rule required_layer_type")]
    assert "no full_attention block would remain (blocks 2, 5 in config.layer_types)" in note
    assert "cannot generate with a cache" in note  # the adapter's required_reason
    assert {b.index: b.reason for b in chosen.removed}[4] == "rank 3 lowest block_influence[all] = 0.3000"
    assert "block 5 kept by rule required_layer_type" in chosen.describe()
    assert_surgery_accepts(QWEN, adapter, chosen.kept)
    # Without the rule the planner takes both, which surgery refuses.
    bare = plan(shortgpt, 8, scores, limits_of(QWEN, required_layer_type="")[1])
    assert bare.removed_indices == [2, 5]
    with pytest.raises(PlanError, match="removes every 'full_attention' block"):
        assert_surgery_accepts(QWEN, adapter, bare.kept)


def test_every_selection_keeps_a_full_attention_block():
    """lowest, conditions, greedy and span each keep one of blocks 2, 5 when the scores point at both."""
    adapter, limits = limits_of(QWEN)
    # Spans of 4 (starts 0..4): 2..5 is the best, but takes both full-attention blocks.
    scores = report({"block_influence": [0.9, 0.5, 0.01, 0.4, 0.3, 0.02, 0.6, 0.8]}, {1: [0.5] * 8, 4: [0.9, 0.05, 0.01, 0.6, 0.7]})
    with_greedy(scores, [2, 5, 4, 3])
    for select, expected in [
        ("{op: lowest, metric: block_influence, count: 3}", [2, 3, 4]),
        ("{op: conditions, where: [{metric: block_influence, below: 0.35}]}", [2, 4]),
        ("{op: greedy, count: 2}", [2, 4]),
        ("{op: span, n: 4}", [1, 2, 3, 4]),
    ]:
        chosen = plan(recipe(select), 8, scores, limits)
        assert chosen.removed_indices == expected, select
        assert_surgery_accepts(QWEN, adapter, chosen.kept)
        bare = plan(recipe(select), 8, scores, limits_of(QWEN, required_layer_type="")[1])
        assert {2, 5} <= set(bare.removed_indices), select  # what the rule prevented
    spanned = plan(recipe("{op: span, n: 4}"), 8, scores, limits)
    assert any(
        n.startswith("span 2..5 (angular_distance(n=4)[all] = 0.0100) passed over by rule required_layer_type") for n in spanned.notes
    )
    # A span is removed whole: when every span left takes the last full-attention block, refused.
    only = BlockLimits(layer_types=(L, L, F, F, F, L, L, L), required_type=F, required_reason="r")
    with pytest.raises(PlanError, match=r"Every run of 3 .* rule\(s\) required_layer_type: blocks 2..4: no full_attention block"):
        plan(
            recipe("{op: span, n: 3, protect: {blocks: [0, 1, 5, 6, 7]}}"), 8, report({"block_influence": [0.5] * 8}, {3: [0.1] * 6}), only
        )


def test_a_count_the_rule_cannot_reach_is_refused_naming_it():
    """Only full-attention blocks left to choose from: at most all but one can go."""
    scores = report({"block_influence": [0.9, 0.5, 0.01, 0.4, 0.3, 0.02, 0.6, 0.8]})
    select = "{op: lowest, metric: block_influence, count: 2, protect: {blocks: [0, 1, 3, 4, 6, 7]}}"
    with pytest.raises(PlanError, match=r"asks for 2 blocks but only 1 can go .* rule\(s\) required_layer_type") as caught:
        plan(recipe(select), 8, scores, limits_of(QWEN)[1])
    assert caught.value.fix == "lower count/fraction to at most 1."
    assert plan(recipe(select), 8, scores, limits_of(QWEN, required_layer_type="")[1]).removed_indices == [2, 5]


# -- last layer type (Gemma 4) ---------------------------------------------------------------------


def test_trailing_full_attention_run_never_leaves_a_sliding_block_last():
    """Blocks 5, 6, 7 (the trailing full-attention run) score lowest: at most two of them go."""
    adapter, limits = limits_of(GEMMA)
    assert limits.fixed == {}  # the block before the last is full attention: no single block is fixed
    scores = report({"block_influence": [0.9, 0.5, 0.4, 0.3, 0.2, 0.03, 0.02, 0.01]}, {1: [0.5] * 8, 3: [0.9, 0.8, 0.7, 0.6, 0.5, 0.01]})
    with_greedy(scores, [7, 6, 5, 4])
    for select, expected in [
        ("{op: lowest, metric: block_influence, count: 3}", [4, 6, 7]),
        ("{op: conditions, where: [{metric: block_influence, below: 0.1}]}", [6, 7]),
        ("{op: greedy, count: 3}", [4, 6, 7]),
        ("{op: span, n: 3}", [4, 5, 6]),  # 5..7 is the best span, but would leave block 4 (sliding) last
    ]:
        chosen = plan(recipe(select), 8, scores, limits)
        assert chosen.removed_indices == expected, (select, chosen.removed_indices)
        assert GEMMA["layer_types"][chosen.kept[-1]] == F, select
        assert any("rule last_layer_type" in n and "block 4 (sliding_attention) would be last" in n for n in chosen.notes), chosen.notes
        assert_surgery_accepts(GEMMA, adapter, chosen.kept)
    # Without the rule the lowest three are the whole run, which surgery refuses.
    bare = plan(recipe("{op: lowest, metric: block_influence, count: 3}"), 8, scores, limits_of(GEMMA, last_layer_type="")[1])
    assert bare.removed_indices == [5, 6, 7]
    with pytest.raises(PlanError, match=r"leaves block 4 \(sliding_attention\) last"):
        assert_surgery_accepts(GEMMA, adapter, bare.kept)


def test_a_block_passed_over_is_taken_once_the_rule_holds_again():
    """F S F F: after block 3, removing 2 would leave the sliding block 1 last; once 1 goes too,
    block 0 (full) ends the model and 2 may go after all."""
    limits = BlockLimits(layer_types=(F, S, F, F), last_type=F)
    scores = report({"block_influence": [0.9, 0.3, 0.02, 0.01]})
    chosen = plan(recipe("{op: lowest, metric: block_influence, count: 3}"), 4, scores, limits)
    assert chosen.removed_indices == [1, 2, 3] and not any("kept by rule" in n for n in chosen.notes)
    two = plan(recipe("{op: lowest, metric: block_influence, count: 2}"), 4, scores, limits)
    assert two.removed_indices == [1, 3] and 2 in two.protected


@pytest.mark.parametrize("config", [QWEN, GEMMA], ids=["qwen3_5", "gemma4"])
def test_random_scores_never_give_a_plan_surgery_refuses(config):
    """Whatever the scores and the op, the plan satisfies surgery's own check of the rules."""
    adapter, limits = limits_of(config)
    rng = random.Random(0)
    for _ in range(200):
        scores = report({"block_influence": [rng.random() for _ in range(8)]}, {n: [rng.random() for _ in range(9 - n)] for n in (1, 2, 3)})
        with_greedy(scores, rng.sample(range(8), 7))
        select = rng.choice(
            [
                f"{{op: lowest, metric: block_influence, count: {rng.randint(1, 6)}}}",
                f"{{op: conditions, where: [{{metric: block_influence, below: {rng.random():.2f}}}]}}",
                f"{{op: greedy, count: {rng.randint(1, 5)}}}",
                f"{{op: span, n: {rng.randint(1, 3)}}}",
            ]
        )
        try:
            chosen = plan(recipe(select), 8, scores, limits)
        except PlanError as error:
            assert "rule" in error.message, (select, error.message)  # only a rule can stop these
            continue
        assert_surgery_accepts(config, adapter, chosen.kept)


# -- explicit lists: refused by `compressor plan` ----------------------------------------------------


@pytest.mark.parametrize(
    ("config", "blocks", "listed", "rule", "fix"),
    [
        (QWEN, [2, 5], "2, 5", "required_layer_type", "keep at least one of blocks 2, 5: leave it out of select.blocks"),
        (GEMMA, [5, 6, 7], "5..7", "last_layer_type", "keep one of the full_attention blocks 5..7: leave it out of select.blocks"),
    ],
    ids=["qwen3_5", "gemma4"],
)
def test_plan_refuses_an_explicit_list_that_breaks_a_rule(tmp_path, capsys, config, blocks, listed, rule, fix):
    """From config.json (no transformers: the JSON states layer_types) and from a calibration
    report alone (it records the rules): exit 2, the blocks, the rule and the fix, no plan written."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"version: 1\nname: bad\nselect: {{op: explicit, blocks: {blocks}}}\n")
    recorded = report({"block_influence": [0.5] * 8})
    recorded.model.update(block_rules=limits_of(config)[1].rules(), fixed_blocks={})
    recorded.save(tmp_path / "calibration.json")
    for source in (["--model", model], ["--calibration", tmp_path / "calibration.json"]):
        code, _, err = run_cli(capsys, "plan", "--recipe", bad, *source, "-o", tmp_path / "plan.json")
        assert code == 2, (source, err)
        assert f"select.blocks removes blocks {listed}: then" in err and f"(rule {rule})" in err, err
        assert f"Fix: {fix}." in err and "Traceback" not in err, err
        assert not (tmp_path / "plan.json").exists()
    # The same list passes when the family states no such rule.
    plan(recipe(f"{{op: explicit, blocks: {blocks}}}"), 8, limits=limits_of(config, **{rule: ""})[1])


def test_a_report_with_malformed_rules_is_refused():
    broken = report({"block_influence": [0.5] * 8})
    broken.model["block_rules"] = {**limits_of(QWEN)[1].rules(), "layer_types": [F] * 7}
    with pytest.raises(InputError, match=r"model.block_rules .* layer_types \(a list of 8 strings"):
        plan(recipe("{op: explicit, blocks: [1]}"), 8, broken)
    # A report written before the rules were recorded has none (surgery still checks them).
    assert BlockLimits.from_report({"fixed_blocks": {"3": "why"}}, 8) == BlockLimits(fixed={3: "why"})


@pytest.mark.skipif(missing_reason("qwen3_5_text") is not None, reason=missing_reason("qwen3_5_text") or "")
def test_calibration_records_the_rules_for_plan_without_the_model(tiny_models, tmp_path, capsys):
    """`compressor calibrate` writes the rules into the report, so `plan --calibration` alone holds
    a metric recipe to them: with only the full-attention blocks (1, 3, 5) unprotected, 2 can go."""
    tiny = tiny_models["qwen3_5_text"]
    path = tmp_path / "calibration.json"
    code, _, err = run_cli(capsys, "calibrate", tiny.path, "--data", tiny.data, "-o", path)
    assert code == 0, err
    rules = json.loads(path.read_text())["model"]["block_rules"]
    assert rules["layer_types"] == [L, F, L, F, L, F] and rules["required_layer_type"] == F
    only_full = tmp_path / "r.yaml"
    only_full.write_text("version: 1\nname: f\nselect: {op: lowest, metric: block_influence, count: 3, protect: {blocks: [0, 2, 4]}}\n")
    code, _, err = run_cli(capsys, "plan", "--recipe", only_full, "--calibration", path)
    assert code == 2 and "asks for 3 blocks but only 2 can go" in err and "required_layer_type" in err, err


# -- arch list -------------------------------------------------------------------------------------


def test_arch_list_states_every_rule_from_the_adapters(capsys):
    code, out, err = run_cli(capsys, "arch", "list")
    assert code == 0, err
    notes = out.split("\nnotes:\n", 1)[1]
    assert "  gemma4: KV sharing: the last config.text_config.num_kv_shared_layers blocks reuse" in notes
    assert "  gemma4_text: last layer type: transformers forces the last block to full_attention" in notes
    assert "  qwen3_5: required layer type: a plan must keep at least one full_attention block (config.text_config.layer_types)" in notes
    assert "  qwen3_vl: the first len(config.vision_config.deepstack_visual_indexes) blocks cannot be removed" in notes
    assert "  mllama: the blocks listed in config.text_config.cross_attention_layers cannot be removed" in notes
    for adapter in ADAPTERS:  # each note comes from the adapter's data: no rule, no note
        unset = dict(fixed_leading_key="", kv_shared_key="", last_layer_type="", required_layer_type="", fixed_lists=(), fixed_first="")
        bare = replace(adapter, **unset)
        assert rule_notes(bare) == []
        ruled = sum(map(bool, (adapter.fixed_leading_key, adapter.kv_shared_key, adapter.last_layer_type, adapter.required_layer_type)))
        ruled += len(adapter.fixed_lists) + bool(adapter.fixed_first)
        assert len(rule_notes(adapter)) == ruled
        assert all(f"  {adapter.family}: {note}" in notes for note in rule_notes(adapter))
