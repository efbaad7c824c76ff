"""Input building (answer masks, truncation), answer scoring, and model reference resolution."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.accuracy import answer_accuracy, normalize_answer
from compressor.data import Sample, build_batch, load_samples
from compressor.demo.processor import build_tokenizer
from compressor.errors import InputError
from compressor.hub import resolve_model_ref


def test_answer_mask_marks_answer_and_end_of_turn(tiny_models):
    loaded = tiny_models["llava"].load()
    tokenizer = loaded.processor.tokenizer
    samples = [
        Sample(prompt="how many shapes?", answer="one two three", image=s.image) for s in load_samples(tiny_models["llava"].data)[:1]
    ]
    samples.append(Sample(prompt="what color is the circle?", answer="red", image=samples[0].image))
    for side in ("right", "left"):
        batch = build_batch(loaded.processor, samples, with_answer=True, padding_side=side)
        answers = [tokenizer.convert_ids_to_tokens(row[mask]) for row, mask in zip(batch.inputs["input_ids"], batch.answer_mask)]
        assert answers == [["one", "two", "three", "</s>"], ["red", "</s>"]]


def test_truncation_refuses_to_cut_image_tokens(tiny_models):
    loaded = tiny_models["llava"].load()
    sample = load_samples(tiny_models["llava"].data)[0]
    with pytest.raises(InputError, match="cuts through image tokens"):
        build_batch(loaded.processor, [sample], with_answer=True, max_length=10)
    text_model = tiny_models["llama"].load()
    batch = build_batch(text_model.processor, [Sample(prompt="count to three", answer="one two three")], with_answer=True, max_length=8)
    assert batch.inputs["input_ids"].shape[1] == 8 and batch.answer_mask.shape == (1, 8)


def test_normalize_answer():
    assert normalize_answer("  The Red. ") == "red"
    assert normalize_answer("a square!") == "square"
    assert normalize_answer("Two  circles") == "two circles"


class _ScriptedModel(torch.nn.Module):
    """Answers with fixed token ids, so the scoring can be checked without a trained model."""

    def __init__(self, replies: list[list[int]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.replies = replies

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        new = torch.tensor([r[:max_new_tokens] for r in self.replies[: len(input_ids)]])
        del self.replies[: len(input_ids)]
        return torch.cat([input_ids, new], dim=1)


def test_answer_accuracy_scores_exact_and_contains():
    tokenizer = build_tokenizer(["red", "blue", "square", "circle"])
    ids = tokenizer.convert_tokens_to_ids
    pad = tokenizer.pad_token_id
    samples = [
        Sample(prompt="what color?", answer="red"),
        Sample(prompt="what color?", answer="Blue"),
        Sample(prompt="what shape?", answer="square"),
        Sample(prompt="what shape?", answer="circle"),
    ]
    replies = [[ids("red"), pad], [ids("blue"), tokenizer.eos_token_id], [ids("red"), ids("square")], [ids("square"), pad]]
    result = answer_accuracy(_ScriptedModel(replies), tokenizer, samples, batch_size=3, max_new_tokens=2)
    assert [r.exact for r in result.records] == [True, True, False, False]
    assert [r.contains for r in result.records] == [True, True, True, False]
    assert result.accuracy == 0.5 and result.contains_accuracy == 0.75
    assert json.loads(json.dumps(result.to_dict()))["samples"][2]["prediction"] == "red square"


def test_resolve_local_and_hub(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    with pytest.raises(InputError, match="has no config.json"):
        resolve_model_ref(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model_ref(str(tmp_path / "m")).hub_id is None
    with pytest.raises(InputError, match="does not exist"):
        resolve_model_ref(str(tmp_path / "missing" / "deeper"))

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path / "m")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    source = resolve_model_ref("llava-hf/llava-1.5-7b-hf", revision="main")
    assert source.hub_id == "llava-hf/llava-1.5-7b-hf" and source.path == tmp_path / "m"
    assert calls[0][0] == "llava-hf/llava-1.5-7b-hf" and "*.safetensors" in calls[0][2]
