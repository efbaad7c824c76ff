"""The run-time token-reduction benchmark, run for real at smoke size on a stand-in demo model (the
demo's own architecture and data generator, trained for a few steps into a temporary cache: never
the real demo model, which takes minutes)."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.accuracy import answer_accuracy
from compressor.bench_heal import MAX_NEW_TOKENS
from compressor.bench_runtime import (
    BAND_CRITERIA,
    DEPTH,
    KEEPS,
    MATCHED_KEEP,
    METHODS,
    SMOKE,
    Scorer,
    early_exit_outcomes,
    load_results,
    main,
    markdown,
    prune_guide,
    run_task,
    smoke_options,
    write,
)
from compressor.data import build_batch, load_samples
from compressor.demo.train import DemoSettings, ensure_demo_model
from compressor.errors import InputError
from compressor.loading import load_model
from compressor.runtime import Guide, RuntimeOptions, generate

STAND_IN = DemoSettings(n_train=96, n_calibration=8, n_eval=16, steps=20, batch_size=4, warmup_steps=2)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    return ensure_demo_model(tmp_path_factory.mktemp("cache"), settings=STAND_IN, progress=False)


@pytest.fixture(scope="module")
def smoke(stand_in):
    return run_task("shapes", stand_in, **smoke_options())


def test_smoke_run_has_every_row_and_writes_the_files(smoke, tmp_path):
    r = smoke
    assert r.num_blocks == 8 and r.pruned_blocks == 6 and len(r.removed) == 2 and r.eval_questions == SMOKE["eval_samples"]
    assert r.image_tokens == 16  # the demo's 4×4 grid
    cut = r.settings["cuts"][0]
    assert cut == 3 and r.settings["depths"] == [DEPTH]
    [original], [pruned] = r.find("original"), r.find("pruned")
    assert original.accuracy == r.original_accuracy and original.flops == 1.0 and original.flops_as_run == 1.0
    assert 0 < pruned.flops < 1
    for method in METHODS:
        [point] = r.find(method, keep=MATCHED_KEEP, cut=cut)
        assert point.kept_tokens == 6 and 0 <= point.accuracy <= 1 and point.latency is not None
    [combined] = r.find("pruned+fastv", keep=MATCHED_KEEP)
    assert combined.cut == 2 and combined.flops < pruned.flops and combined.latency is not None
    exits = r.find("early-exit")
    assert [p.threshold for p in exits] == sorted(SMOKE["thresholds"])
    assert all(0 <= p.skip_rate <= 1 for p in exits)
    assert [p.skip_rate for p in exits] == sorted((p.skip_rate for p in exits), reverse=True)  # a higher bar skips less
    assert set(r.bands) == set(BAND_CRITERIA) and any("band" in chosen for chosen in r.bands.values())
    for label, chosen in r.bands.items():
        if "refused" in chosen:  # choose_band may find every block redundant on a barely trained model: recorded
            continue
        [band] = r.find("band", criterion=label)
        randoms = r.find("random-band", criterion=label)
        width = chosen["band"][1] - chosen["band"][0] + 1
        assert band.band == chosen["band"] and len(randoms) == SMOKE["random_bands"]
        assert all(p.band[1] - p.band[0] + 1 == width and p.band != band.band for p in randoms)
    assert set(r.latency) == {"original", "pruned", "fastv", "random", "sgl", "pruned+fastv"}
    assert original.latency == {"prefill": 1.0, "decode": 1.0}

    text = write([r], tmp_path / "out")
    for heading in ("**1. Image tokens kept", "**2. SGL early exit", "**3. Skip-It bands", "**4. Against and with block removal"):
        assert heading in text
    assert f"| SGL (guide) | {cut} | {original.accuracy:.1%} (1.00) |" in text
    assert (tmp_path / "out" / "runtime.png").stat().st_size > 0
    assert (tmp_path / "out" / "results.md").read_text().strip() == text.strip()
    assert json.loads((tmp_path / "out" / "results.json").read_text())[0]["name"] == "shapes"
    assert load_results(tmp_path / "out" / "results.json") == [r]
    assert main(["--render", "-o", str(tmp_path / "out")]) == 0  # redraws from the JSON alone
    assert (tmp_path / "out" / "results.md").read_text().strip() == markdown([r]).strip()


def test_plain_accuracy_is_accuracy_py_scoring(smoke, stand_in):
    """Keeping 100 % is the plain model: its accuracy is what accuracy.py scores (one prompt per
    batch, so no padding differs), on the same questions."""
    loaded = load_model(str(stand_in.model_dir), device="cpu", dtype="float32")
    questions = load_samples(stand_in.eval)[: SMOKE["eval_samples"]]
    scored = answer_accuracy(loaded.model, loaded.processor, questions, batch_size=1, max_new_tokens=MAX_NEW_TOKENS)
    assert smoke.original_accuracy == scored.accuracy
    scorer = Scorer(loaded.processor)
    inputs = build_batch(loaded.processor, [questions[0]], with_answer=False).inputs
    tokens = generate(loaded.model, loaded.processor, inputs, max_new_tokens=MAX_NEW_TOKENS).tokens
    assert scorer.text(tokens) == scored.records[0].prediction


def test_flops_fall_with_the_share_kept(stand_in):
    r = run_task("shapes", stand_in, eval_limit=2, keeps=KEEPS, depths=(DEPTH,), thresholds=(0.9,), random_bands=1,
                 latency_repeats=1, latency_questions=1)  # fmt: skip
    cut = r.settings["cuts"][0]
    for method in METHODS:
        points = sorted(r.find(method, cut=cut), key=lambda p: -p.keep)
        assert [p.keep for p in points] == [k for k in KEEPS if k < 1]
        # SGL adds the same guide run at every keep (it does not depend on it): the order holds for all three.
        assert all(a.flops > b.flops for a, b in zip(points, points[1:])), (method, [p.flops for p in points])
        if method == "fastv":  # its ranking pass is counted as run, not in the method
            assert points[0].flops < 1 and all(p.flops_as_run > p.flops for p in points)
        if method == "random":
            assert points[0].flops < 1 and all(p.flops_as_run == p.flops for p in points)
    combined = sorted(r.find("pruned+fastv"), key=lambda p: -p.keep)
    assert all(a.flops > b.flops for a, b in zip(combined, combined[1:]))


def test_early_exit_outcomes_equal_direct_calls(stand_in, tmp_path):
    """One call at the lowest threshold gives what a call at each higher one returns."""
    prune_guide(stand_in, tmp_path / "pruned")
    original = load_model(str(stand_in.model_dir), device="cpu", dtype="float32")
    pruned = load_model(str(tmp_path / "pruned"), device="cpu", dtype="float32")
    guide = Guide(pruned.model, pruned.processor)
    questions = load_samples(stand_in.eval)[:4]
    outcomes = []
    for question in questions:
        inputs = build_batch(original.processor, [question], with_answer=False).inputs
        plain = generate(original.model, original.processor, inputs, max_new_tokens=MAX_NEW_TOKENS)
        lowest = generate(original.model, original.processor, inputs, RuntimeOptions(early_exit=1e-6), guide=guide,
                          max_new_tokens=MAX_NEW_TOKENS)  # fmt: skip
        confidence = lowest.guide.confidence
        thresholds = [1e-6, confidence, min(1.0, confidence + 1e-6)]  # at and just above the confidence
        for threshold, (skipped, tokens, checked) in early_exit_outcomes(lowest, plain, thresholds).items():
            direct = generate(original.model, original.processor, inputs, RuntimeOptions(early_exit=threshold), guide=guide,
                              max_new_tokens=MAX_NEW_TOKENS)  # fmt: skip
            assert direct.skipped == skipped and torch.equal(direct.tokens, tokens)
            assert checked == (direct.guide.consistent is not None)
            outcomes.append(skipped)
    assert False in outcomes  # above the confidence the large model answers


def test_run_task_refuses_settings_without_its_references(stand_in):
    with pytest.raises(InputError, match="compare against keep 1.0"):
        run_task("shapes", stand_in, keeps=(0.5,))
