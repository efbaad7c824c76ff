"""Functional redundancy: the ablation scan's replay is the model with a block skipped, the
greedy order re-measures with earlier removals in place, the visual attention ratio is the
attention mass the model really puts on image tokens, and recipes select on all of them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compressor.calibrate import CalibrationOptions, CalibrationReport, calibrate
from compressor.data import build_batch, load_samples
from compressor.errors import PlanError
from compressor.functional import Head, replay, scored_positions, trace
from compressor.planner import plan
from compressor.recipe import parse_recipe
from compressor.surgery import skip_blocks

from .conftest import FAMILIES, MULTIMODAL


def _batch(tiny, n: int = 3):
    loaded = tiny.load()
    samples = load_samples(tiny.data)[:n]
    return loaded, build_batch(loaded.processor, samples, with_answer=True)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_replay_reproduces_the_model_and_its_skips(family, tiny_models):
    loaded, batch = _batch(tiny_models[family])
    model, adapter = loaded.model, loaded.adapter
    head = Head(model, adapter)
    t = trace(model, adapter, head, batch)
    rows = t.positions
    assert len(rows) > 0 and bool(batch.answer_mask[rows[:, 0], rows[:, 1] + 1].all())  # answers are scored
    full = model(**batch.inputs, use_cache=False).logits.float()[rows[:, 0], rows[:, 1]]
    torch.testing.assert_close(t.full_logits, full, rtol=1e-5, atol=1e-5)  # norm, head and softcap right
    blocks = adapter.blocks(model)
    for index in (0, 3, len(blocks) - 1):
        with skip_blocks(model, adapter, [index]):
            want = model(**batch.inputs, use_cache=False).logits.float()[rows[:, 0], rows[:, 1]]
        got = head(replay(blocks, t, index + 1, frozenset({index}), t.inputs[index])[rows[:, 0], rows[:, 1]])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_trace_with_removed_blocks_is_the_pruned_model(tiny_models):
    loaded, batch = _batch(tiny_models["qwen2"])
    model, adapter = loaded.model, loaded.adapter
    t = trace(model, adapter, Head(model, adapter), batch, skip=frozenset({1, 4}))
    with skip_blocks(model, adapter, [1, 4]):
        want = model(**batch.inputs, use_cache=False).logits.float()[t.positions[:, 0], t.positions[:, 1]]
    torch.testing.assert_close(t.logits, want, rtol=1e-5, atol=1e-5)
    assert t.inputs[2] is t.inputs[1] or torch.equal(t.inputs[2], t.inputs[1])  # a removed block passes its input on


def test_scored_positions_without_answers_skip_image_targets(tiny_models):
    loaded = tiny_models["llava"].load()
    samples = [s.__class__(prompt=s.prompt, image=s.image) for s in load_samples(tiny_models["llava"].data)[:2]]
    batch = build_batch(loaded.processor, samples, with_answer=True)
    rows, targets = scored_positions(batch, loaded.adapter.image_token_id(loaded.model.config))
    assert len(rows) > 0 and not bool((targets == loaded.adapter.image_token_id(loaded.model.config)).any())
    assert bool(batch.inputs["attention_mask"][rows[:, 0], rows[:, 1] + 1].all())


@torch.no_grad()
def _loss_with(model, adapter, batch, skipped) -> float:
    t = trace(model, adapter, Head(model, adapter), batch, skip=frozenset(skipped))
    return float(F.cross_entropy(t.logits, t.targets))


def test_ablation_and_greedy_are_the_losses_of_the_skipped_models(tiny_models):
    tiny = tiny_models["llava"]
    loaded = tiny.load()
    samples = load_samples(tiny.data)
    options = CalibrationOptions(batch_size=len(samples), ablation=True, greedy=2, attention=True)
    report = calibrate(loaded.model, loaded.processor, loaded.adapter, samples, options=options)
    model, adapter = loaded.model, loaded.adapter
    batch = build_batch(loaded.processor, samples, with_answer=True)  # one batch: means are exact
    base = _loss_with(model, adapter, batch, [])
    assert report.metrics["ablation"]["base_loss"] == pytest.approx(base, rel=1e-5)
    increases = report.values("ablation_loss", "all")
    for index in range(6):
        assert increases[index] == pytest.approx(_loss_with(model, adapter, batch, [index]) - base, abs=1e-4)
    assert all(kl >= 0 for kl in report.values("ablation_kl", "all"))
    greedy = report.metrics["greedy"]
    first = min(range(6), key=lambda i: increases[i])
    assert greedy["order"][0] == first and len(set(greedy["order"])) == 2
    # The second step was measured with the first block already gone.
    assert greedy["steps"][1]["loss"] == pytest.approx(_loss_with(model, adapter, batch, greedy["order"]), abs=1e-4)
    assert report.greedy_order == greedy["order"]
    assert {"ablation_forward_s", "ablation_replay_s", "attention_s", "geometric_s"} <= set(report.timings)


@torch.no_grad()
def test_visual_attention_ratio_is_the_attention_on_image_tokens(tiny_models):
    tiny = tiny_models["llava"]
    loaded = tiny.load()
    samples = load_samples(tiny.data)[:2]
    report = calibrate(loaded.model, loaded.processor, loaded.adapter, samples, options=CalibrationOptions(batch_size=2, attention=True))
    ratios = report.values("visual_attention", "all")
    batch = build_batch(loaded.processor, samples, with_answer=True)
    loaded.model.set_attn_implementation("eager")
    attentions = loaded.model(**batch.inputs, use_cache=False, output_attentions=True).attentions
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"].bool()
    image = (ids == loaded.adapter.image_token_id(loaded.model.config)) & mask
    queries = mask & ~image & (image.long().cumsum(1) > 0)
    for index, weights in enumerate(attentions):
        on_image = (weights * image[:, None, None, :]).sum(-1).mean(1)  # (B, T)
        assert ratios[index] == pytest.approx(float(on_image[queries].mean()), rel=1e-5)
        assert 0 < ratios[index] < 1
    assert loaded.model.config._attn_implementation == "eager"  # what this test set; calibrate restores its own


def test_text_model_has_no_visual_attention(tiny_models):
    tiny = tiny_models["llama"]
    loaded = tiny.load()
    report = calibrate(loaded.model, loaded.processor, loaded.adapter, load_samples(tiny.data), options=CalibrationOptions(attention=True))
    assert report.values("visual_attention", "all") == [None] * 6


def _functional_report(tiny_models) -> CalibrationReport:
    tiny = tiny_models["llava"]
    loaded = tiny.load()
    options = CalibrationOptions(batch_size=6, ablation=True, greedy=3, attention=True)
    return calibrate(loaded.model, loaded.processor, loaded.adapter, load_samples(tiny.data), options=options)


def test_recipes_select_on_functional_metrics(tiny_models, tmp_path):
    report = _functional_report(tiny_models)
    report.save(tmp_path / "c.json")
    report = CalibrationReport.load(tmp_path / "c.json")  # survives the round trip
    kl = report.values("ablation_kl", "all")
    lowest = parse_recipe("version: 1\nname: t\nselect: {op: lowest, metric: ablation_kl, count: 2}\n")
    assert sorted(plan(lowest, 6, report).removed_indices) == sorted(sorted(range(6), key=lambda i: kl[i])[:2])
    greedy = parse_recipe("version: 1\nname: g\nselect: {op: greedy, count: 2}\n")
    assert plan(greedy, 6, report).removed_indices == sorted(report.greedy_order[:2])
    ratio = report.values("visual_attention", "all")
    cut = sorted(ratio)[3]
    conditions = parse_recipe(f"version: 1\nname: c\nselect: {{op: conditions, where: [{{metric: visual_attention, below: {cut}}}]}}\n")
    assert plan(conditions, 6, report).removed_indices == sorted(i for i in range(6) if ratio[i] < cut)
    too_many = parse_recipe("version: 1\nname: g\nselect: {op: greedy, count: 4}\n")
    with pytest.raises(PlanError, match="greedy order has 3 blocks"):
        plan(too_many, 6, report)


def test_functional_metric_without_measurement_is_a_clear_error(tiny_models):
    tiny = tiny_models["llama"]
    loaded = tiny.load()
    report = calibrate(loaded.model, loaded.processor, loaded.adapter, load_samples(tiny.data))
    recipe = parse_recipe("version: 1\nname: t\nselect: {op: lowest, metric: ablation_kl, count: 2}\n")
    with pytest.raises(PlanError, match="--ablation"):
        plan(recipe, 6, report)
    with pytest.raises(PlanError, match="--greedy"):
        plan(parse_recipe("version: 1\nname: g\nselect: {op: greedy, count: 2}\n"), 6, report)


def test_functional_metrics_only_over_all_tokens():
    from compressor.errors import RecipeError

    with pytest.raises(RecipeError, match="modality"):
        parse_recipe("version: 1\nname: t\nselect: {op: lowest, metric: ablation_kl, modality: image, count: 2}\n")


@pytest.mark.parametrize("family", sorted(MULTIMODAL))
def test_visual_attention_on_every_vlm(family, tiny_models):
    tiny = tiny_models[family]
    loaded = tiny.load()
    before = loaded.model.config._attn_implementation
    report = calibrate(
        loaded.model, loaded.processor, loaded.adapter, load_samples(tiny.data)[:2], options=CalibrationOptions(attention=True)
    )
    ratios = report.values("visual_attention", "all")
    assert all(r is not None and 0 < r < 1 for r in ratios)
    assert loaded.model.config._attn_implementation == before  # eager only for the attention pass


def test_cli_calibrate_functional_options_and_run_with_a_greedy_recipe(tiny_models, tmp_path, capsys):
    import json

    from compressor.cli import main

    tiny = tiny_models["qwen2_vl"]
    out = tmp_path / "c.json"
    code = main(["calibrate", str(tiny.path), "--data", str(tiny.data), "-o", str(out), "--ablation", "--greedy", "2", "--attention"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads(out.read_text())["metrics"]
    assert len(metrics["ablation_kl"]["all"]) == 6 and len(metrics["greedy"]["order"]) == 2 and metrics["visual_attention"]["all"][0] > 0
    recipe = tmp_path / "g.yaml"
    recipe.write_text("version: 1\nname: g\nselect: {op: greedy, count: 2, protect: {first: 1}}\n")
    code = main(["run", str(recipe), "--model", str(tiny.path), "--data", str(tiny.data), "-o", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "greedy order" in captured.out
    report = json.loads((tmp_path / "run" / "calibration.json").read_text())
    greedy = report["metrics"]["greedy"]
    assert len(greedy["order"]) == 2 and 0 not in greedy["order"] and greedy["kept"] == [0]  # searched as the recipe allows
    code = main(["calibrate", str(tiny.path), "--data", str(tiny.data), "-o", str(tmp_path / "x.json"), "--greedy", "6"])
    assert code == 2 and "--greedy 5 or less" in capsys.readouterr().err
