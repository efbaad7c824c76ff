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
from compressor.functional import Head, Sums, record, scan, scored_positions
from compressor.pipeline import calibration_options
from compressor.planner import plan
from compressor.recipe import parse_recipe
from compressor.surgery import skip_blocks

from .conftest import FAMILIES, MULTIMODAL


def _batch(tiny, n: int = 3):
    loaded = tiny.load()
    samples = load_samples(tiny.data)[:n]
    return loaded, build_batch(loaded.processor, samples, with_answer=True)


def _scored_logits(model, adapter, batch, skipped, rows) -> torch.Tensor:
    """The naive reference: the whole model run with ``skipped`` acting as the identity."""
    with skip_blocks(model, adapter, list(skipped)):
        return model(**batch.inputs, use_cache=False).logits.float()[rows[:, 0], rows[:, 1]]


def _naive_sums(model, adapter, batch, skipped, rows, targets, original) -> tuple[float, float]:
    logp = F.log_softmax(_scored_logits(model, adapter, batch, skipped, rows), dim=-1)
    full = F.log_softmax(original, dim=-1)
    return float(F.nll_loss(logp, targets, reduction="sum")), float(F.kl_div(logp, full, log_target=True, reduction="sum"))


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_scan_equals_the_model_run_with_each_block_skipped(family, tiny_models):
    """Per block, the scan's loss and KL are those of the model literally run with that block
    skipped; it costs L + L(L-1)/2 block calls and holds two hidden states, not L."""
    loaded, batch = _batch(tiny_models[family])
    model, adapter = loaded.model, loaded.adapter
    num_blocks = len(adapter.blocks(model))
    rows, targets = scored_positions(batch, adapter.image_token_id(model.config))
    assert len(rows) > 0 and bool(batch.answer_mask[rows[:, 0], rows[:, 1] + 1].all())  # answers are scored
    sums = Sums(num_blocks)
    scan(model, adapter, Head(model, adapter), batch, sums)
    original = _scored_logits(model, adapter, batch, [], rows)
    assert sums.base_loss == pytest.approx(float(F.cross_entropy(original, targets, reduction="sum")), rel=1e-5)
    fixed = adapter.fixed_blocks(model.config)  # never a candidate in `measure` (Qwen3-VL's DeepStack blocks)
    for index in range(num_blocks):
        if index in fixed:
            continue
        loss, kl = _naive_sums(model, adapter, batch, [index], rows, targets, original)
        assert sums.loss[index] == pytest.approx(loss, rel=1e-5, abs=1e-4)
        assert sums.kl[index] == pytest.approx(kl, rel=1e-4, abs=1e-4)
    assert sums.block_calls == num_blocks + num_blocks * (num_blocks - 1) // 2
    assert sums.head_rows == len(rows) * (num_blocks + 1)  # the LM head only ever sees scored rows
    assert not any("forward" in vars(block) for block in adapter.blocks(model))  # the recording's stand-ins are gone
    state = record(model, adapter, batch).first
    row_bytes = len(rows) * state.shape[-1] * state.element_size()
    assert sums.held_bytes <= 2 * state.nbytes + (num_blocks + 1) * row_bytes < num_blocks * state.nbytes


@torch.no_grad()
def test_scan_with_removed_blocks_measures_the_pruned_model(tiny_models):
    """A greedy step: the walk is the model with blocks 1 and 4 gone, each candidate is skipped
    on top of them, the KL is against the original; the prefix before block 1 is run once."""
    loaded, batch = _batch(tiny_models["qwen2"])
    model, adapter = loaded.model, loaded.adapter
    rows, targets = scored_positions(batch, None)
    sums = Sums(6)
    scan(model, adapter, Head(model, adapter), batch, sums, removed=frozenset({1, 4}), candidates=[0, 2, 3, 5])
    original = _scored_logits(model, adapter, batch, [], rows)
    assert sums.base_loss == pytest.approx(_naive_sums(model, adapter, batch, [1, 4], rows, targets, original)[0], rel=1e-5)
    for index in (0, 2, 3, 5):
        loss, kl = _naive_sums(model, adapter, batch, [1, 4, index], rows, targets, original)
        assert sums.loss[index] == pytest.approx(loss, rel=1e-5, abs=1e-4)
        assert sums.kl[index] == pytest.approx(kl, rel=1e-4, abs=1e-4)
    assert sums.loss[1] == sums.loss[4] == 0.0  # removed blocks are not candidates
    walk, original_from_1 = 4, 5  # blocks 0, 2, 3, 5 of the pruned model; blocks 1..5 of the original
    replays = 3 + 2 + 1 + 0  # after candidate 0: blocks 2, 3, 5; after 2: 3, 5; after 3: 5
    assert sums.block_calls == walk + original_from_1 + replays


def test_scored_positions_without_answers_skip_image_targets(tiny_models):
    loaded = tiny_models["llava"].load()
    samples = [s.__class__(prompt=s.prompt, image=s.image) for s in load_samples(tiny_models["llava"].data)[:2]]
    batch = build_batch(loaded.processor, samples, with_answer=True)
    rows, targets = scored_positions(batch, loaded.adapter.image_token_id(loaded.model.config))
    assert len(rows) > 0 and not bool((targets == loaded.adapter.image_token_id(loaded.model.config)).any())
    assert bool(batch.inputs["attention_mask"][rows[:, 0], rows[:, 1] + 1].all())


@torch.no_grad()
def _loss_with(model, adapter, batch, skipped) -> float:
    rows, targets = scored_positions(batch, adapter.image_token_id(model.config))
    return float(F.cross_entropy(_scored_logits(model, adapter, batch, skipped, rows), targets))


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
    assert {"ablation_forward_s", "ablation_replay_s", "greedy_forward_s", "attention_s", "geometric_s"} <= set(report.timings)


def test_scan_costs_are_counted_in_the_report(tiny_models):
    """Ablation: at most L + L(L-1)/2 block calls a batch (≈ L/2 forward passes); greedy with
    k steps: fewer than k such scans, and no ablation scan unless one is asked for."""
    tiny = tiny_models["llama"]
    loaded = tiny.load()
    samples = load_samples(tiny.data)
    args = (loaded.model, loaded.processor, loaded.adapter, samples)
    both = calibrate(*args, options=CalibrationOptions(batch_size=3, ablation=True, greedy=3)).metrics
    scan_cost, greedy_cost = both["ablation"]["cost"], both["greedy"]["cost"]
    L = 6
    assert scan_cost["block_calls_per_batch"] <= L * (L - 1) // 2 + L
    assert scan_cost["forward_equivalents"] == pytest.approx(scan_cost["block_calls_per_batch"] / L, abs=1e-3)
    assert scan_cost["forward_equivalents"] <= (L + 1) / 2
    assert scan_cost["head_rows"] == both["ablation"]["tokens"] * (L + 1)
    assert greedy_cost["block_calls_per_batch"] < 3 * scan_cost["block_calls_per_batch"]
    alone = calibrate(*args, options=CalibrationOptions(batch_size=3, greedy=3, greedy_keep=(0, -1))).metrics
    assert "ablation" not in alone and "ablation_kl" not in alone
    # Protected blocks are never scanned: the first step alone is cheaper than a full scan.
    assert alone["greedy"]["cost"]["block_calls_per_batch"] < greedy_cost["block_calls_per_batch"]


def test_a_greedy_order_past_the_kept_blocks_is_refused_before_any_pass(tiny_models):
    from compressor.errors import InputError

    tiny = tiny_models["llama"]
    loaded = tiny.load()
    calls = []
    handle = loaded.model.register_forward_pre_hook(lambda *a: calls.append(1))
    options = CalibrationOptions(greedy=5, greedy_keep=(0, -1))  # 6 blocks, 2 kept: 4 at most
    with pytest.raises(InputError, match="--greedy 4 or less"):
        calibrate(loaded.model, loaded.processor, loaded.adapter, load_samples(tiny.data), options=options)
    handle.remove()
    assert calls == []


def test_a_greedy_recipe_runs_no_ablation_scan():
    recipe = parse_recipe("version: 1\nname: g\nselect: {op: greedy, count: 2, protect: {first: 1}}\n")
    options = calibration_options(recipe)
    assert options.greedy == 2 and options.greedy_keep == (0,) and not options.ablation
    reads = parse_recipe("version: 1\nname: t\nselect: {op: lowest, metric: ablation_kl, count: 2}\n")
    assert calibration_options(reads).ablation


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
    # Linear-attention blocks (Qwen3.5's Gated DeltaNet) form no attention weights: no ratio.
    softmax = [getattr(block, "self_attn", None) is not None for block in loaded.adapter.blocks(loaded.model)]
    assert [r is not None for r in ratios] == softmax
    assert all(0 < r < 1 for r in ratios if r is not None)
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


def test_scans_through_an_offloading_device_map_give_the_same_figures(tiny_models, tmp_path):
    """The recording stands in for the blocks' forwards for one pass; accelerate's own wrappers
    (weights streamed from disk) come back after it, and every figure is the same."""
    import json

    from compressor.cli import main

    tiny = tiny_models["llava"]
    base = ["calibrate", str(tiny.path), "--data", str(tiny.data), "--batch-size", "3", "--device", "cpu", "--ablation", "--greedy", "2"]
    assert main([*base, "-o", str(tmp_path / "plain.json")]) == 0
    offload = ["--device-map", "auto", "--max-memory", "cpu=150KB", "--offload-folder", str(tmp_path / "offload")]
    assert main([*base, *offload, "-o", str(tmp_path / "spread.json")]) == 0
    plain, spread = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("plain", "spread"))
    assert "meta" in spread["model"]["devices"]
    assert spread["metrics"]["greedy"] == plain["metrics"]["greedy"]
    assert spread["metrics"]["ablation_kl"]["all"] == pytest.approx(plain["metrics"]["ablation_kl"]["all"], rel=1e-5)


@torch.no_grad()
def test_scan_replays_what_the_model_adds_after_fixed_blocks(tmp_path):
    """Qwen3-VL with two DeepStack levels: blocks 0 and 1 get vision features added to their
    outputs by the model's loop; the scan records and replays them, so each other block's loss
    and KL are still those of the model run with it skipped, and calibration never offers a
    fixed block for removal."""

    from .conftest import TinyModel, build_tiny, write_data

    model, processor = build_tiny("qwen3_vl", deepstack=2)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    tiny = TinyModel("qwen3_vl", tmp_path / "m", write_data(tmp_path / "data", images=True))
    loaded, batch = _batch(tiny)
    model, adapter = loaded.model, loaded.adapter
    assert list(adapter.fixed_blocks(model.config)) == [0, 1]
    rows, targets = scored_positions(batch, adapter.image_token_id(model.config))
    original = _scored_logits(model, adapter, batch, [], rows)
    for removed in (frozenset(), frozenset({3})):
        sums = Sums(6)
        candidates = [i for i in range(2, 6) if i not in removed]
        scan(model, adapter, Head(model, adapter), batch, sums, removed=removed, candidates=candidates)
        base = _naive_sums(model, adapter, batch, sorted(removed), rows, targets, original)[0]
        assert sums.base_loss == pytest.approx(base, rel=1e-5)
        for index in candidates:
            loss, kl = _naive_sums(model, adapter, batch, sorted({*removed, index}), rows, targets, original)
            assert sums.loss[index] == pytest.approx(loss, rel=1e-5, abs=1e-4)
            assert sums.kl[index] == pytest.approx(kl, rel=1e-4, abs=1e-4)
    options = CalibrationOptions(batch_size=3, ablation=True, greedy=2)
    report = calibrate(model, loaded.processor, adapter, load_samples(tiny.data)[:3], options=options)
    assert report.metrics["ablation_loss"]["all"][:2] == [None, None]
    assert set(report.metrics["greedy"]["order"]).isdisjoint({0, 1})
    assert report.model["fixed_blocks"] == {"0": adapter.fixed_reason, "1": adapter.fixed_reason}
