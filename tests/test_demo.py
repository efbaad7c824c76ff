"""The demo: cached training, the whole chain with a verdict, and (slow) the real model's numbers."""

from __future__ import annotations

import json

import pytest

from compressor import cli
from compressor.demo import train as demo_train
from compressor.demo.run import run_demo
from compressor.demo.train import DemoSettings, ensure_demo_model
from compressor.staging import MARKER

SMOKE = DemoSettings(n_train=96, n_calibration=8, n_eval=16, steps=4, batch_size=16, warmup_steps=2)


@pytest.fixture(scope="module")
def smoke_assets(tmp_path_factory):
    return ensure_demo_model(tmp_path_factory.mktemp("cache"), settings=SMOKE, progress=False)


def test_training_is_cached_and_keyed_by_settings(smoke_assets, monkeypatch):
    assert smoke_assets.root.name == f"demo-{SMOKE.key()}"
    assert (smoke_assets.model_dir / "config.json").is_file() and smoke_assets.eval.is_file()
    record = json.loads((smoke_assets.root / "training.json").read_text())
    assert record["settings"]["steps"] == 4 and record["summary"]["steps"] == 4
    assert smoke_assets.summary.final_loss < smoke_assets.summary.first_loss
    assert not list(smoke_assets.root.parent.glob(".*tmp-*")), "no staging folder may be left behind"

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cached model must be reused")

    monkeypatch.setattr(demo_train, "train", must_not_train)
    again = ensure_demo_model(smoke_assets.root.parent, settings=SMOKE, progress=False)
    assert again.root == smoke_assets.root
    assert DemoSettings(steps=5).key() != DemoSettings(steps=4).key()


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "a"))
    assert demo_train.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("COMPRESSOR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert demo_train.default_cache_dir() == tmp_path / "b" / "compressor"


def test_demo_chain_writes_checkpoint_and_report(smoke_assets, tmp_path):
    summary = run_demo(tmp_path / "demo", assets=smoke_assets, progress=False)
    out = tmp_path / "demo"
    assert {p.name for p in out.iterdir()} >= {"hf", "report", "plan.json", "calibration.json", "recipe.yaml"}
    assert {p.name for p in (out / "report").iterdir() if p.name != MARKER} == {"report.json", "report.md", "report.html"}
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["accuracy"]["tasks"]["vqa"]["n"] == 16
    assert summary.verdict_line.startswith("compressor-verdict: ")
    text = summary.describe()
    assert "evaluation accuracy on 16 questions" in text and str(out / "hf") in text


@pytest.mark.slow
def test_full_demo_model_is_good_and_a_broken_prune_fails_the_gate(tmp_path, capsys):
    """The real demo model (trained once into the user cache): accurate, and a gate catches a bad cut."""
    assets = ensure_demo_model(progress=False)
    summary = run_demo(tmp_path / "demo", assets=assets, progress=False)
    vqa = summary.report["accuracy"]["tasks"]["vqa"]
    assert vqa["base"] >= 0.7, "the demo model should be well above chance"
    # Cut the first blocks, which a reasonable recipe protects: the gate must fail.
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("version: 1\nname: broken\nselect: {op: explicit, blocks: [0, 1, 2]}\n")
    broken = tmp_path / "broken"
    assert cli.main(["-q", "prune", str(assets.model_dir), "--recipe", str(recipe), "-o", str(broken)]) == 0
    code = cli.main(
        [
            "-q",
            "validate",
            "--base",
            str(assets.model_dir),
            "--pruned",
            str(broken),
            "--data",
            str(assets.eval),
            "--max-accuracy-drop",
            "0.1",
            "--no-latency",
            "-o",
            str(tmp_path / "report"),
        ]
    )
    assert code == 1
    assert "compressor-verdict: FAIL max_accuracy_drop=" in capsys.readouterr().out
