"""Calibration: hook values match an independent computation, streaming is batch-invariant,
hooks are always removed, and the report round-trips."""

from __future__ import annotations

import math

import pytest
import torch

from compressor import metrics
from compressor.calibrate import CalibrationOptions, CalibrationReport, calibrate, modality_masks
from compressor.data import build_batch, load_samples
from compressor.errors import InputError

from .conftest import IMAGE_TOKENS, MULTIMODAL
from .tiny_vlm_more import IMAGE_BY_CROSS_ATTENTION

OPTIONS = CalibrationOptions(num_samples=None, batch_size=2, max_length=None, epsilons=(0.05, 0.5), max_span=3)


def _hidden_states(model, batch):
    """h_0..h_{L-1} (inputs of every block) from output_hidden_states, independent of hooks."""
    with torch.no_grad():
        out = model(**batch.inputs, output_hidden_states=True, use_cache=False)
    return out.hidden_states


def test_llama_metrics_match_hidden_states(tiny_models):
    loaded = tiny_models["llama"].load()
    model, processor, adapter = loaded.model, loaded.processor, loaded.adapter
    samples = load_samples(tiny_models["llama"].data)
    report = calibrate(
        model,
        processor,
        adapter,
        samples,
        options=CalibrationOptions(num_samples=None, batch_size=len(samples), max_length=None, epsilons=(0.5,), max_span=3),
    )
    batch = build_batch(processor, samples, with_answer=True)
    hidden = _hidden_states(model, batch)
    valid = batch.inputs["attention_mask"].bool()
    # The last entry of hidden_states is after the final norm, so compare blocks 0..L-2.
    for block in range(len(hidden) - 2):
        d = metrics.block_influence(hidden[block], hidden[block + 1])
        assert report.values("block_influence", "all")[block] == pytest.approx(d[valid].mean().item(), rel=1e-5)
        assert report.values("tail_probability", "all", epsilon=0.5)[block] == pytest.approx((d[valid] > 0.5).float().mean().item())
        adjacent = metrics.adjacent_distance(hidden[block + 1])[metrics.adjacent_pairs(valid)]
        assert report.values("adjacent_distance", "all")[block] == pytest.approx(adjacent.mean().item(), rel=1e-5)
    span = metrics.angular_distance(hidden[1], hidden[4])[valid].mean().item()
    assert report.values("angular_distance", "all", span=3)[1] == pytest.approx(span, rel=1e-5)
    assert len(report.values("angular_distance", "all", span=3)) == report.num_blocks - 2
    # A text-only model has no image tokens: the image column is undefined, not zero.
    assert all(v is None for v in report.values("block_influence", "image"))
    assert report.values("block_influence", "text") == report.values("block_influence", "all")


def test_streaming_is_independent_of_batching(tiny_models):
    tiny = tiny_models["llava"]
    loaded = tiny.load()
    samples = load_samples(tiny.data)
    one = calibrate(
        loaded.model, loaded.processor, loaded.adapter, samples, options=CalibrationOptions(num_samples=None, batch_size=1, max_length=None)
    )
    many = calibrate(
        loaded.model, loaded.processor, loaded.adapter, samples, options=CalibrationOptions(num_samples=None, batch_size=4, max_length=None)
    )
    for metric in ("block_influence", "adjacent_distance"):
        for modality in ("all", "text", "image"):
            assert one.values(metric, modality) == pytest.approx(many.values(metric, modality), rel=1e-4)
    assert one.data["tokens"] == many.data["tokens"]


PROCESSORS = {
    "llava": "LlavaProcessor",
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "idefics3": "Idefics3Processor",
    "paligemma": "PaliGemmaProcessor",
    "gemma3": "Gemma3Processor",
    "gemma4": "Gemma4Processor",
    # Qwen3-VL-MoE and Qwen3.5 reuse Qwen3-VL's processor.
    **dict.fromkeys(("qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"), "Qwen3VLProcessor"),
    # LLaVA-like VLMs (tests/tiny_llava_like.py): Mistral3 uses Pixtral's processor; the SmolVLM
    # test model Idefics3's (SmolVLM's needs num2words, not installed here; see `_smolvlm` there).
    "llava_next": "LlavaNextProcessor",
    "llava_onevision": "LlavaOnevisionProcessor",
    "mistral3": "PixtralProcessor",
    "internvl": "InternVLProcessor",
    "smolvlm": "Idefics3Processor",
    # VLMs with block-tied rules (tests/tiny_vlm_more.py).
    "mllama": "MllamaProcessor",
    **dict.fromkeys(("glm4v", "glm4v_moe", "glm46v"), "Glm4vProcessor"),
}


@pytest.mark.parametrize("family", sorted(MULTIMODAL))
def test_image_mask_marks_exactly_the_image_tokens(tiny_models, family):
    tiny = tiny_models[family]
    loaded = tiny.load()
    model, adapter = loaded.model, loaded.adapter
    # The family's own processor comes back from the folder (a fast tokenizer inside).
    assert type(loaded.processor).__name__ == PROCESSORS[family]
    assert loaded.processor.tokenizer.is_fast
    samples = load_samples(tiny.data)[:2]
    batch = build_batch(loaded.processor, samples, with_answer=True)
    image_id = adapter.image_token_id(model.config)
    masks = modality_masks(batch.inputs["input_ids"], batch.inputs["attention_mask"], image_id)
    # As many image tokens per sample as the vision tower yields features (IMAGE_TOKENS).
    assert masks["image"].sum(dim=1).tolist() == [IMAGE_TOKENS[family]] * 2
    assert not (masks["image"] & masks["text"]).any()
    assert torch.equal(masks["image"] | masks["text"], batch.inputs["attention_mask"].bool())
    if family in IMAGE_BY_CROSS_ATTENTION:  # a placeholder; tests/test_family_vlm_rules.py shows where the image enters
        return
    # And they are where the image features enter the decoder: with other pixels, the first
    # block's input changes at exactly the masked positions.
    seen = []
    handle = adapter.blocks(model)[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    generator = torch.Generator().manual_seed(0)
    other = {k: torch.rand(v.shape, generator=generator) if k == "pixel_values" else v for k, v in batch.inputs.items()}
    # LLaVA-NeXT and OneVision end each row of image features with a learned `image_newline`: an
    # image token no pixel changes. It changes with that parameter instead.
    newlines = [p for name, p in model.named_parameters() if name.endswith("image_newline")]
    try:
        with torch.no_grad():
            model(**batch.inputs, use_cache=False)
            for parameter in newlines:
                parameter.add_(1.0)
            model(**other, use_cache=False)
    finally:
        handle.remove()
    changed = (seen[0] - seen[1]).abs().amax(dim=-1) > 0
    assert torch.equal(changed, masks["image"])


def test_prefix_lm_answers_are_a_causal_suffix(tiny_models):
    """PaliGemma gets its answers as the processor's suffix: marked by token_type_ids, they
    cannot change what the prompt (attended both ways) computes."""
    tiny = tiny_models["paligemma"]
    loaded = tiny.load()
    assert loaded.adapter.prefix_lm
    batch = build_batch(loaded.processor, load_samples(tiny.data)[:3], with_answer=True)
    inputs, answer = batch.inputs, batch.answer_mask
    assert torch.equal(inputs["token_type_ids"].bool() & inputs["attention_mask"].bool(), answer)
    assert torch.equal(inputs["labels"] != -100, answer)
    other = inputs["input_ids"].masked_fill(answer, loaded.processor.tokenizer.convert_tokens_to_ids("blue"))
    with torch.no_grad():
        before = loaded.model(**inputs).logits
        after = loaded.model(**{**inputs, "input_ids": other}).logits
    prompt = inputs["attention_mask"].bool() & ~answer
    assert torch.equal(before[prompt], after[prompt])
    assert not torch.equal(before[answer], after[answer])


def test_every_family_calibrates_by_modality(tiny):
    loaded = tiny.load()
    samples = load_samples(tiny.data)
    report = calibrate(loaded.model, loaded.processor, loaded.adapter, samples, options=OPTIONS)
    assert report.data["tokens"]["image"] == IMAGE_TOKENS.get(tiny.family, 0) * len(samples)
    assert report.data["tokens"]["text"] + report.data["tokens"]["image"] == report.data["tokens"]["all"]
    for modality in ("all", "text") + (("image",) if tiny.family in MULTIMODAL else ()):
        values = report.values("block_influence", modality)
        assert len(values) == 6 and all(v is not None and math.isfinite(v) for v in values)


def test_hooks_removed_and_mode_restored_even_on_error(tiny_models):
    loaded = tiny_models["llama"].load()
    model, adapter = loaded.model, loaded.adapter
    model.train()
    samples = load_samples(tiny_models["llama"].data)
    report = calibrate(model, loaded.processor, adapter, samples, options=OPTIONS)
    assert model.training, "training mode must come back after calibration"
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in adapter.blocks(model))
    assert report.data["num_samples"] == len(samples)

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    handle = adapter.blocks(model)[2].register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        calibrate(model, loaded.processor, adapter, samples, options=OPTIONS)
    handle.remove()
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in adapter.blocks(model))


def test_no_grad_and_no_cache_while_calibrating(tiny_models):
    loaded = tiny_models["llama"].load()
    seen = []

    def spy(module, args, kwargs):
        seen.append((torch.is_grad_enabled(), kwargs.get("past_key_values"), kwargs.get("use_cache")))

    block = loaded.adapter.blocks(loaded.model)[0]
    handle = block.register_forward_pre_hook(spy, with_kwargs=True)
    calibrate(loaded.model, loaded.processor, loaded.adapter, load_samples(tiny_models["llama"].data), options=OPTIONS)
    handle.remove()
    assert seen and all(grad is False and cache is None for grad, cache, _ in seen)


def test_report_round_trip_and_corrupt_report(tiny_models, tmp_path):
    loaded = tiny_models["llama"].load()
    report = calibrate(loaded.model, loaded.processor, loaded.adapter, load_samples(tiny_models["llama"].data), options=OPTIONS)
    path = tmp_path / "calibration.json"
    report.save(path)
    again = CalibrationReport.load(path)
    assert again.values("block_influence", "all") == report.values("block_influence", "all")
    assert again.values("tail_probability", "text", epsilon=0.05) == report.values("tail_probability", "text", epsilon=0.05)
    assert all(not math.isnan(v) for v in again.values("angular_distance", "all", span=3))
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(InputError, match="not a compressor calibration report"):
        CalibrationReport.load(tmp_path / "bad.json")
    with pytest.raises(KeyError, match="epsilon 0.3 not measured"):
        report.values("tail_probability", "all", epsilon=0.3)
