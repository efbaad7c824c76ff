"""The demo's small LLaVA-style model: a CLIP vision tower, a projector and a Llama decoder.

This module owns the architecture of the demo model (built from config, randomly
initialised, never downloaded) and the processor that goes with it. It is a real
`LlavaForConditionalGeneration`, so the pruning pipeline treats it exactly like a Hub
LLaVA checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from compressor.demo.processor import IMAGE, build_llava_processor, build_tokenizer
from compressor.demo.shapes import CELL, IMAGE_SIZE

# Eight decoder blocks: enough depth that the pipeline has real choices to make, while
# a step over a batch of 64 still takes a fraction of a second on two CPU cores.
NUM_DECODER_BLOCKS = 8
TEXT_HIDDEN = 256
VISION_HIDDEN = 128


def build_demo_config(vocab_size: int, image_token_id: int, pad_token_id: int, bos_token_id: int, eos_token_id: int) -> LlavaConfig:
    """The demo model's configuration, sized to train in minutes on a CPU."""
    vision = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=4 * VISION_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        # One patch per grid cell: each image token then sees exactly one object, which
        # the decoder can attend to directly (smaller patches learn far more slowly).
        patch_size=CELL,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=NUM_DECODER_BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        # Four times Llama's usual 0.02 (which suits hidden sizes in the thousands): with
        # 0.02 at this width attention stays uniform for hundreds of steps and the model
        # sits on the answer priors; 0.08 ≈ 1/sqrt(hidden) leaves that plateau far sooner.
        initializer_range=0.08,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        # "default" drops CLS: one image token per cell. With only two vision layers the
        # last one carries the most processed features, unlike the usual -2 of big LLaVAs.
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )


def build_demo_model(vocab_words: Iterable[str], seed: int) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised demo model (deterministic in ``seed``) and its processor."""
    tokenizer = build_tokenizer(vocab_words)
    processor = build_llava_processor(tokenizer, image_size=IMAGE_SIZE, patch_size=CELL)
    config = build_demo_config(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return model, processor
