"""Hermetic fixtures: tiny random models of every supported family, built from config.

Nothing is downloaded: each family's model is built from a config object, saved once per
session with its own word-level tokenizer (and LLaVA processor) into a temporary folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import (  # noqa: E402
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from compressor.demo.processor import IMAGE, build_llava_processor, build_tokenizer  # noqa: E402

WORDS = "what color shape is the how many red blue green circle square one two three describe count to".split()
FAMILIES = ("llava", "llama", "mistral", "qwen2")


@dataclass
class TinyModel:
    family: str
    path: Path
    data: Path  # JSONL calibration data matching the model's modality

    def load(self):
        from compressor.loading import load_model

        return load_model(str(self.path), device="cpu", dtype="float32")


def _text_kwargs(tokenizer, layers: int) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_tiny(family: str, layers: int = 6, seed: int = 0):
    """(model, processor) of ``family`` with random weights, float32, eval mode."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(WORDS)
    if family == "llava":
        processor = build_llava_processor(tokenizer, image_size=16, patch_size=4)
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=16,
                patch_size=4,
            ),
            text_config=LlamaConfig(**_text_kwargs(tokenizer, layers)),
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )
        model = LlavaForConditionalGeneration(config)
    elif family == "llama":
        processor, model = tokenizer, LlamaForCausalLM(LlamaConfig(**_text_kwargs(tokenizer, layers)))
    elif family == "mistral":
        # A window shorter than the test prompts, so sliding attention really matters.
        config = MistralConfig(**_text_kwargs(tokenizer, layers), sliding_window=6)
        processor, model = tokenizer, MistralForCausalLM(config)
    elif family == "qwen2":
        # First 2 blocks full attention, the rest sliding: layer_types mixes both kinds.
        config = Qwen2Config(**_text_kwargs(tokenizer, layers), use_sliding_window=True, sliding_window=6, max_window_layers=2)
        processor, model = tokenizer, Qwen2ForCausalLM(config)
    else:
        raise ValueError(family)
    model.config.architectures = [type(model).__name__]
    # Random weights give near-uniform logits; sharper ones make greedy decoding tie-free.
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.mul_(20.0)
    return model.eval(), processor


def write_data(folder: Path, *, images: bool, n: int = 6) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    prompts = ["what color is the circle?", "how many shapes?", "what shape is red?", "count to three"]
    answers = ["red", "two", "square", "one two three"]
    lines = []
    for i in range(n):
        record = {"prompt": prompts[i % 4], "answer": answers[i % 4]}
        if images:
            Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
            record["image"] = f"img{i}.png"
        lines.append(json.dumps(record))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("tiny")
    found = {}
    for family in FAMILIES:
        model, processor = build_tiny(family)
        path = root / family
        model.save_pretrained(path)
        processor.save_pretrained(path)
        data = write_data(root / f"{family}-data", images=family == "llava")
        found[family] = TinyModel(family=family, path=path, data=data)
    return found


@pytest.fixture(params=FAMILIES)
def tiny(request, tiny_models) -> TinyModel:
    return tiny_models[request.param]
