"""The demo's generated data set, its model, and the train-once cache (smoke-sized settings)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from compressor.accuracy import answer_accuracy
from compressor.data import build_batch, format_prompt, load_samples
from compressor.demo import train as demo_train
from compressor.demo.model import build_demo_model
from compressor.demo.shapes import CELL, GRID, generate_dataset, vocabulary
from compressor.demo.train import DemoSettings, default_cache_dir, ensure_demo_model

SPLITS = ("train", "calibration", "eval")
SMOKE = DemoSettings(n_train=64, n_calibration=8, n_eval=16, steps=12, batch_size=16, warmup_steps=2)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    generate_dataset(folder, seed=3, n_train=200, n_calibration=40, n_eval=60)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One smoke-sized build into a cache found through $COMPRESSOR_CACHE."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPRESSOR_CACHE", str(cache))
        assets = ensure_demo_model(settings=SMOKE, progress=False)
    return cache, assets


def test_dataset_is_deterministic_for_a_seed(dataset, tmp_path):
    generate_dataset(tmp_path / "same", seed=3, n_train=200, n_calibration=40, n_eval=60)
    generate_dataset(tmp_path / "other", seed=4, n_train=200, n_calibration=40, n_eval=60)
    assert _tree_digest(tmp_path / "same") == _tree_digest(dataset)
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (dataset / "train.jsonl").read_bytes()


def test_splits_load_and_share_no_image(dataset):
    images: dict[str, set[str]] = {}
    for split in SPLITS:
        samples = load_samples(dataset / f"{split}.jsonl")
        assert all(s.image is not None and s.image.is_file() and s.answer for s in samples)
        images[split] = {hashlib.sha256(s.image.read_bytes()).hexdigest() for s in samples}
        assert len(images[split]) == len(samples), f"{split} repeats an image"
    assert [len(images[s]) for s in SPLITS] == [200, 40, 60]
    assert not images["train"] & images["eval"]
    assert not images["train"] & images["calibration"]
    assert not images["calibration"] & images["eval"]


def test_every_word_is_in_the_vocabulary_and_no_token_is_unknown(dataset):
    words = set(vocabulary())
    _, processor = build_demo_model(words, seed=0)
    tokenizer = processor.tokenizer
    for split in SPLITS:
        for sample in load_samples(dataset / f"{split}.jsonl"):
            assert set(sample.prompt.split()) | set(sample.answer.split()) <= words
            text = format_prompt(processor, sample, with_answer=True)
            assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text


def test_answers_are_short_and_varied(dataset):
    samples = load_samples(dataset / "train.jsonl")
    answers = [s.answer for s in samples]
    # The demo scores with max_new_tokens=4: every answer must fit, with room for </s>.
    assert max(len(a.split()) for a in answers) <= 3
    # No single answer dominates: a model that ignores the image cannot score well.
    assert max(answers.count(a) for a in set(answers)) / len(answers) < 0.2


def test_one_image_token_per_grid_cell(dataset):
    model, processor = build_demo_model(vocabulary(), seed=0)
    sample = load_samples(dataset / "eval.jsonl")[0]
    batch = build_batch(processor, [sample], with_answer=True)
    image_tokens = int((batch.inputs["input_ids"] == model.config.image_token_index).sum())
    assert image_tokens == GRID * GRID
    assert model.config.vision_config.patch_size == CELL
    with torch.no_grad():
        logits = model(**batch.inputs).logits
    assert logits.shape[-1] == len(processor.tokenizer)


def test_demo_model_is_seeded():
    first, _ = build_demo_model(vocabulary(), seed=1)
    second, _ = build_demo_model(vocabulary(), seed=1)
    third, _ = build_demo_model(vocabulary(), seed=2)
    weight = "model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(first.state_dict()[weight], second.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], third.state_dict()[weight])


def test_smoke_training_lowers_loss_and_caches_a_loadable_model(trained):
    cache, assets = trained
    assert assets.root.parent == cache and assets.root.name == f"demo-{SMOKE.key()}"
    assert [p.name for p in cache.iterdir()] == [assets.root.name], "a staging folder was left behind"
    assert assets.summary.steps == SMOKE.steps
    assert assets.summary.final_loss < assets.summary.first_loss / 2
    record = json.loads((assets.root / "training.json").read_text())
    assert DemoSettings(**record["settings"]) == SMOKE and record["summary"]["steps"] == SMOKE.steps
    model, info = LlavaForConditionalGeneration.from_pretrained(assets.model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.text_config.num_hidden_layers == 8
    processor = AutoProcessor.from_pretrained(assets.model_dir)
    result = answer_accuracy(model.eval(), processor, load_samples(assets.eval), max_new_tokens=4)
    assert len(result.records) == SMOKE.n_eval and 0.0 <= result.accuracy <= 1.0


def test_second_call_reuses_the_cache(trained, monkeypatch):
    cache, first = trained

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cached model was trained again")

    monkeypatch.setattr(demo_train, "train", must_not_train)
    again = ensure_demo_model(cache, settings=SMOKE, progress=False)
    assert again == first


def test_changed_settings_get_their_own_folder_and_failures_leave_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_train, "train", interrupted)
    other = DemoSettings(n_train=32, n_calibration=4, n_eval=4, steps=1)
    assert other.key() != SMOKE.key()
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_model(tmp_path, settings=other, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("COMPRESSOR_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "compressor"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "compressor"
