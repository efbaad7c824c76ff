"""Hermetic fixtures: tiny random models of every supported family, built from config.

Nothing is downloaded: each family's model is built from a config object, saved once per
session with its own word-level tokenizer (and, for VLMs, a real processor of the family's
class with the family's special tokens and chat template) into a temporary folder.
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
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaTokenizerFast,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2TokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipVisionConfig,
)
from transformers.utils import is_torchvision_available  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
# threads' spin-waiting made each forward pass several times slower.
torch.set_num_threads(1)

# Image processors are built as `pil_image_processor_class` gives them, the PIL ones, which the loader picks
# too (compressor.loading.PIL_BACKEND), so a saved processor reloads as the same class: in transformers 5.x
# the family's plain class name (Idefics3ImageProcessor) is the torchvision one, a placeholder without it.
from compressor.demo.processor import CHAT_TEMPLATE, IMAGE, build_llava_processor, build_tokenizer  # noqa: E402
from compressor.loading import find_processor_class, pil_image_processor_class, video_processor_placeholder  # noqa: E402

WORDS = "what color shape is the how many red blue green circle square one two three describe count to".split()
FAMILIES = (
    "llava", "llama", "mistral", "qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "paligemma", "gemma3",
    "qwen3", "qwen3_moe", "gemma3_text", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "gemma4", "gemma4_text",
    "qwen3_5_text", "qwen3_5_moe_text",
)  # fmt: skip
MULTIMODAL = frozenset(
    {"llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "paligemma", "gemma3", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "gemma4"}
)

# More families, one module per group (tests/tiny_*.py): each names its builders (family ->
# build(layers) -> (model, processor)), which of them are multimodal, and their image tokens per
# 16x16 test image. The shared tests pick them up as they pick up the families above.
from . import tiny_llava_like, tiny_text, tiny_vlm_more  # noqa: E402

EXTRA_BUILDERS = {**tiny_text.BUILDERS, **tiny_llava_like.BUILDERS, **tiny_vlm_more.BUILDERS}
FAMILIES = FAMILIES + tuple(EXTRA_BUILDERS)
MULTIMODAL = MULTIMODAL | tiny_text.MULTIMODAL | tiny_llava_like.MULTIMODAL | tiny_vlm_more.MULTIMODAL

# Image tokens per 16x16 calibration image, as each family's vision tower produces them:
# LLaVA 16/4 squared patches; Qwen 24x24 (min_pixels) / patch 4 = 6x6 grid, merged 2x2 -> 9;
# Idefics3 resized to 32, split into 2x2 crops of 16 plus the global image, 4 tokens each
# (16/4 squared patches, pixel-shuffled by 2x2) -> 20; PaliGemma 16/4 squared patches -> 16;
# Gemma3 mm_tokens_per_image (16 patches average-pooled 2x2) -> 4.
IMAGE_TOKENS = {"llava": 16, "qwen2_vl": 9, "qwen2_5_vl": 9, "qwen3_vl": 9, "idefics3": 20, "paligemma": 16, "gemma3": 4}
IMAGE_TOKENS.update(dict.fromkeys(("qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"), 9))  # the Qwen3-VL vision tower and processor
# Gemma 4 resizes to its smallest patch budget (70 soft tokens x 2x2 pooling = 280 patches of 4x4):
# 16x16 becomes 64x64, a 16x16 grid of patches pooled 2x2 -> 64.
IMAGE_TOKENS["gemma4"] = 64
for _group in (tiny_text, tiny_llava_like, tiny_vlm_more):
    IMAGE_TOKENS.update(_group.IMAGE_TOKENS)

# Each family's image placeholder in the chat template (CHAT_TEMPLATE writes LLaVA's "<image>").
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_SPECIAL = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
IDEFICS3_SPECIAL = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>") + tuple(
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
)
GEMMA3_SPECIAL = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
# Gemma 4's processor also reads the audio tokens from the tokenizer (and refuses text without them).
GEMMA4_SPECIAL = {**GEMMA3_SPECIAL, "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"}


def missing_reason(family: str) -> str | None:
    """Why ``family`` cannot be tested with the installed transformers (its modeling folder,
    transformers/models/<Adapter.transformers_module>, is absent), or None when it can."""
    from compressor.architectures import ADAPTERS
    from compressor.versions import family_available, installed, requirement

    adapter = next(a for a in ADAPTERS if a.family == family)
    if family_available(adapter):
        return None
    return f"transformers {installed('transformers')} lacks the {family} family (needs {requirement(adapter)})"


def removable(removed: list[int], fixed, num_blocks: int = 6) -> list[int]:
    """``removed`` with each block the family fixes in place (`Adapter.fixed_blocks`, e.g. Qwen3-VL's
    DeepStack blocks) replaced by the first free block after it: "first" means first removable."""
    chosen: list[int] = []
    for index in removed:
        while index in fixed or index in chosen:
            index += 1
        assert index < num_blocks, (removed, fixed)
        chosen.append(index)
    return sorted(chosen)


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


def _bpe_tokenizer(style: str, tokenizer_class, *, special_tokens=(), chat_template=CHAT_TEMPLATE):
    """A BPE tokenizer trained on WORDS with the pipeline of Qwen2's tokenizer (byte-level, ``style="qwen"``)
    or Gemma's ("▁" for spaces, ``style="gemma"``), each word one token.

    transformers 5 loads a Qwen2 or Gemma tokenizer (and any tokenizer of a ``qwen2`` model) by rebuilding
    it from tokenizer.json's vocabulary and merges with the class's own normalizer and pre-tokenizer, where
    4.x takes the file as it is: the word-level tokenizer of the other families would come back turning
    every prompt into a few ``<unk>``. With the class's own pipeline it comes back the same in both.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from compressor.demo.processor import BOS, EOS, PAD, SPECIAL_TOKENS, TEMPLATE_WORDS, UNK

    if style == "qwen":
        core = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
        core.normalizer = normalizers.NFC()
        core.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        core.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        core = Tokenizer(models.BPE(unk_token=UNK, fuse_unk=True, byte_fallback=True))
        core.normalizer = normalizers.Replace(" ", "▁")
        core.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        alphabet = ["\n"]  # PaliGemma ends every prompt with a newline
    specials = list(dict.fromkeys([*SPECIAL_TOKENS, *special_tokens]))
    corpus = [text for word in (*TEMPLATE_WORDS, *WORDS) for text in (word, " " + word)]
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, special_tokens=specials, initial_alphabet=alphabet, min_frequency=0, show_progress=False
    )
    core.train_from_iterator(corpus, trainer)
    tokenizer = tokenizer_class(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=specials[len(SPECIAL_TOKENS) - 1 :],  # IMAGE and the family's own
        chat_template=chat_template,
        model_input_names=["input_ids", "attention_mask"],
    )
    # As in build_tokenizer: transformers 5 may drop the list given at construction.
    if any(token not in tokenizer.all_special_tokens for token in specials):
        tokenizer.add_special_tokens({"additional_special_tokens": specials[len(SPECIAL_TOKENS) - 1 :]})
    return tokenizer


def _siglip(**extra) -> SiglipVisionConfig:
    """A one-layer SigLIP tower over 16x16 images in 4x4 patches (16 patch features)."""
    return SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4, **extra
    )


def _qwen_vl(family: str, layers: int, deepstack: int = 1):
    tokenizer = _bpe_tokenizer(
        "qwen", Qwen2TokenizerFast, special_tokens=QWEN_SPECIAL, chat_template=CHAT_TEMPLATE.replace(IMAGE, QWEN_IMAGE)
    )
    # min_pixels = max_pixels fixes every image at 24x24: a 6x6 grid of 4x4 patches, 9 tokens.
    image_processor = pil_image_processor_class("Qwen2VLImageProcessor")(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=24 * 24, max_pixels=24 * 24
    )
    if is_torchvision_available():
        from transformers import Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    else:
        video_processor = video_processor_placeholder()
    processor_class = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}.get(family, Qwen3VLProcessor)
    processor = processor_class(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=tokenizer.chat_template
    )
    token_ids = dict(
        zip(
            ("image_token_id", "vision_start_token_id", "vision_end_token_id", "video_token_id"),
            tokenizer.convert_tokens_to_ids(QWEN_SPECIAL),
        )
    )
    common = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if family.startswith("qwen3"):
        # No sliding window; interleaved M-RoPE over head_dim/2 = 4 frequencies. DeepStack: the
        # first vision block's features are added to the output of decoder block 0, so block 0
        # is fixed (the adapter's fixed_leading_key); 16 position embeddings, a 4x4 grid.
        rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True}
        text = dict(**_text_kwargs(tokenizer, layers), head_dim=8, rope_scaling=rope)
        vision = dict(
            depth=2,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=32,
            num_position_embeddings=16,
            deepstack_visual_indexes=list(range(deepstack)),
            **common,
        )
        if family.startswith("qwen3_5"):
            return _qwen3_5(family, tokenizer, text, vision, token_ids), processor
        if family == "qwen3_vl_moe":
            from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

            config = Qwen3VLMoeConfig(text_config={**text, **MOE}, vision_config=vision, **token_ids)
            return Qwen3VLMoeForConditionalGeneration(config), processor
        return Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids)), processor
    # M-RoPE splits head_dim/2 = 4 rotary frequencies over (time, height, width).
    # Like qwen2: the first 2 blocks full attention, the rest sliding over a short window.
    text = dict(
        **_text_kwargs(tokenizer, layers),
        rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=2,
    )
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, **common)
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids)), processor
    # Window attention over 2x2 merged patches in the first vision block, full in the second.
    vision = dict(
        depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1], **common
    )
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)), processor


# MoE text config: 4 experts of which 2 per token. Sparse every second block, and block 5 dense by
# list: block kinds D S D S D D, so removals change which step or list describes the kept blocks
# (the reindex rules `Adapter.index_lists` and `Adapter.step_rules`).
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=2, mlp_only_layers=[5])


def _qwen3_5(family: str, tokenizer, text: dict, vision: dict, token_ids: dict):
    """Qwen3.5 (transformers 5.x only, imported here): hybrid Gated DeltaNet / full attention, layer
    types L F L F L F (full every second block, stated also as `full_attention_interval`, as real
    checkpoints do; every 4th in those, but then the conformance removals would leave no full-attention
    block, which `Adapter.required_layer_type` refuses); partial rotary over half of head_dim 16 = the
    M-RoPE section's 4 frequencies."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    text = {k: v for k, v in text.items() if k != "rope_scaling"}
    text.update(
        head_dim=16,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
            "partial_rotary_factor": 0.5,
        },
        linear_conv_kernel_dim=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=["linear_attention" if (i + 1) % 2 else "full_attention" for i in range(text["num_hidden_layers"])],
        full_attention_interval=2,
    )
    vision = {k: v for k, v in vision.items() if k != "deepstack_visual_indexes"}
    if family == "qwen3_5_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
        return Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=text, vision_config=vision, **token_ids))
    return Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision, **token_ids))


def _idefics3(layers: int):
    tokenizer = build_tokenizer(WORDS, special_tokens=IDEFICS3_SPECIAL)
    # Images are resized to 32 and split into 16x16 crops (2x2) plus a global 16x16 image.
    image_processor = pil_image_processor_class("Idefics3ImageProcessor")(
        size={"longest_edge": 32}, max_image_size={"longest_edge": 16}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=tokenizer.chat_template
    )
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
        ),
        text_config=LlamaConfig(**_text_kwargs(tokenizer, layers)),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        pad_token_id=tokenizer.pad_token_id,
    )
    return Idefics3ForConditionalGeneration(config), processor


def _paligemma(layers: int):
    # PaliGemma has no chat template: "<image>"*16 <bos> prompt "\n", the answer as a suffix.
    tokenizer = _bpe_tokenizer("gemma", GemmaTokenizerFast, chat_template=None)
    image_processor = pil_image_processor_class("SiglipImageProcessor")(size={"height": 16, "width": 16}, image_seq_length=16)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds <loc…>/<seg…> tokens
    # Untied head, unlike real checkpoints: a tied random Gemma just repeats one token when
    # decoding greedily, which would leave the cached-generation test nothing to compare.
    # (test_tied_embeddings_export_reloads_clean covers the tied layout.)
    text = GemmaConfig(**{**_text_kwargs(tokenizer, layers), "vocab_size": len(tokenizer)}, head_dim=8, tie_word_embeddings=False)
    config = PaliGemmaConfig(
        vision_config=_siglip(),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        projection_dim=32,
        hidden_size=32,
        vocab_size=len(tokenizer),
    )
    return PaliGemmaForConditionalGeneration(config), processor


def _gemma3(layers: int):
    tokenizer = build_tokenizer(
        WORDS, extra_special_tokens=GEMMA3_SPECIAL, chat_template=CHAT_TEMPLATE.replace(IMAGE, GEMMA3_SPECIAL["boi_token"])
    )
    image_processor = pil_image_processor_class("Gemma3ImageProcessor")(size={"height": 16, "width": 16})
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4, chat_template=tokenizer.chat_template
    )
    # Every third block full attention, the others sliding: layer_types S S F S S F. Untied
    # head for the same reason as PaliGemma's.
    text = Gemma3TextConfig(
        **_text_kwargs(tokenizer, layers), head_dim=8, sliding_window=6, sliding_window_pattern=3, tie_word_embeddings=False
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=_siglip(),
        mm_tokens_per_image=4,
        image_token_index=tokenizer.image_token_id,
        boi_token_index=tokenizer.convert_tokens_to_ids(GEMMA3_SPECIAL["boi_token"]),
        eoi_token_index=tokenizer.convert_tokens_to_ids(GEMMA3_SPECIAL["eoi_token"]),
    )
    model = Gemma3ForConditionalGeneration(config)
    # Gemma3 initialises its image projection to zeros: every image would embed the same.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.1)
    return model, processor


def _gemma4(family: str, layers: int):
    """Gemma 4 (transformers 5 only): layer_types S S S S F F (no rule fixes a block, so the shared
    tests' removals all apply; tests/test_gemma4.py covers the KV-shared layouts), per-layer
    embeddings of width 4, full-attention blocks with their own head_dim (`per_layer_config`)."""
    from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig

    template = CHAT_TEMPLATE.replace(IMAGE, GEMMA4_SPECIAL["image_token"])
    tokenizer = build_tokenizer(WORDS, extra_special_tokens=GEMMA4_SPECIAL, chat_template=template)
    processor = tokenizer
    if family == "gemma4":  # the processor adds its video token to the tokenizer: before the vocabulary is sized
        from transformers import Gemma4AudioFeatureExtractor

        # Through compressor's lookup, as the loader finds it: transformers 5.17's Gemma4Processor cannot
        # be imported without torchvision otherwise (see `find_processor_class`).
        processor = find_processor_class("Gemma4Processor")(
            feature_extractor=Gemma4AudioFeatureExtractor(),
            image_processor=pil_image_processor_class("Gemma4ImageProcessor")(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70),
            tokenizer=tokenizer,
            video_processor=video_processor_placeholder(),
            chat_template=template,
        )
    text = dict(
        **_text_kwargs(tokenizer, layers),
        head_dim=8,
        global_head_dim=16,
        hidden_size_per_layer_input=4,
        vocab_size_per_layer_input=len(tokenizer),
        layer_types=["sliding_attention"] * (layers - 2) + ["full_attention"] * 2,
        sliding_window=6,
        tie_word_embeddings=False,  # as Gemma3's
    )
    if family == "gemma4_text":
        return Gemma4ForCausalLM(Gemma4TextConfig(**text)), processor
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma4Config(
        text_config={**text, "use_bidirectional_attention": "vision"},
        vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            head_dim=8, patch_size=4, pooling_kernel_size=2, position_embedding_size=16,
        ),
        image_token_id=tokenizer.image_token_id,
        boi_token_id=ids(GEMMA4_SPECIAL["boi_token"]),
        eoi_token_id=ids(GEMMA4_SPECIAL["eoi_token"]),
        video_token_id=processor.video_token_id,
        audio_token_id=ids(GEMMA4_SPECIAL["audio_token"]),
        boa_token_id=ids(GEMMA4_SPECIAL["boa_token"]),
        eoa_token_index=ids(GEMMA4_SPECIAL["eoa_token"]),
    )  # fmt: skip
    return Gemma4ForConditionalGeneration(config), processor


def build_tiny(family: str, layers: int = 6, seed: int = 0, deepstack: int = 1):
    """(model, processor) of ``family`` with random weights, float32, eval mode (``deepstack``:
    Qwen3-VL's DeepStack levels, one per vision block, so at most 2)."""
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
        tokenizer = _bpe_tokenizer("qwen", Qwen2TokenizerFast)  # see there: how transformers 5 loads a qwen2 tokenizer
        # First 2 blocks full attention, the rest sliding: layer_types mixes both kinds.
        config = Qwen2Config(**_text_kwargs(tokenizer, layers), use_sliding_window=True, sliding_window=6, max_window_layers=2)
        processor, model = tokenizer, Qwen2ForCausalLM(config)
    elif family in ("qwen3", "qwen3_moe"):
        from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

        tokenizer = _bpe_tokenizer("qwen", Qwen2TokenizerFast)  # a qwen2 tokenizer, loaded as qwen2's (see there)
        if family == "qwen3":  # as qwen2: the first 2 blocks full attention, the rest sliding
            config = Qwen3Config(
                **_text_kwargs(tokenizer, layers), head_dim=8, use_sliding_window=True, sliding_window=6, max_window_layers=2
            )
            processor, model = tokenizer, Qwen3ForCausalLM(config)
        else:
            processor, model = tokenizer, Qwen3MoeForCausalLM(Qwen3MoeConfig(**_text_kwargs(tokenizer, layers), head_dim=8, **MOE))
    elif family == "gemma3_text":
        from transformers import Gemma3ForCausalLM

        # Gemma3's decoder alone: layer_types S S F S S F as in gemma3; untied as there.
        config = Gemma3TextConfig(
            **_text_kwargs(tokenizer, layers), head_dim=8, sliding_window=6, sliding_window_pattern=3, tie_word_embeddings=False
        )
        processor, model = tokenizer, Gemma3ForCausalLM(config)
    elif family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):
        model, processor = _qwen_vl(family, layers, deepstack)
    elif family in ("qwen3_5_text", "qwen3_5_moe_text"):
        # The Qwen3.5 VLM's decoder alone (its ForCausalLM class), with the same tokenizer.
        vlm, processor = _qwen_vl(family.removesuffix("_text"), layers, deepstack)
        import transformers

        causal_lm = getattr(transformers, type(vlm).__name__.replace("ForConditionalGeneration", "ForCausalLM"))
        processor, model = processor.tokenizer, causal_lm(vlm.config.text_config)
    elif family == "idefics3":
        model, processor = _idefics3(layers)
    elif family == "paligemma":
        model, processor = _paligemma(layers)
    elif family == "gemma3":
        model, processor = _gemma3(layers)
    elif family in ("gemma4", "gemma4_text"):
        model, processor = _gemma4(family, layers)
    elif family in EXTRA_BUILDERS:
        model, processor = EXTRA_BUILDERS[family](layers)
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


def pytest_collection_modifyitems(config, items):
    """Skip, with the reason, every test parametrised by a family (a ``family`` argument or the
    ``tiny`` fixture) that the installed transformers lacks: Qwen3.5 under 4.57, say."""
    from compressor.architectures import supported_families

    reasons = {family: reason for family in supported_families() if (reason := missing_reason(family))}
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        family = params.get("family", params.get("tiny"))
        if family in reasons:
            item.add_marker(pytest.mark.skip(reason=reasons[family]))


class TinyModels(dict):
    """Family -> `TinyModel`, each built and saved on first use (a targeted test run builds only
    the families it touches). Iterating gives every family this transformers has; indexing a
    family it lacks skips the test with the reason (`missing_reason`)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> TinyModel:
        if family not in FAMILIES:
            raise KeyError(family)
        reason = missing_reason(family)
        if reason:
            pytest.skip(reason)
        model, processor = build_tiny(family)
        path = self.root / family
        model.save_pretrained(path)
        processor.save_pretrained(path)
        data = write_data(self.root / f"{family}-data", images=family in MULTIMODAL)
        self[family] = TinyModel(family=family, path=path, data=data)
        return self[family]

    def _every(self) -> list[str]:
        return [f for f in FAMILIES if missing_reason(f) is None]

    def items(self):
        return [(f, self[f]) for f in self._every()]

    def keys(self):
        return self._every()

    def values(self):
        return [self[f] for f in self._every()]

    def __iter__(self):
        return iter(self._every())

    def __len__(self):
        return len(self._every())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, TinyModel]:
    return TinyModels(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(params=FAMILIES)
def tiny(request, tiny_models) -> TinyModel:
    return tiny_models[request.param]


@pytest.fixture
def fake_hub(monkeypatch):
    """A started fake Hub (tests/hub_server.py) that the real huggingface_hub client may reach in this test."""
    from .hub_server import FakeHub, client_uses

    with FakeHub() as hub, client_uses(hub, monkeypatch):
        yield hub


@pytest.fixture(autouse=True)
def _fresh_cli_state():
    """-v / -q set module state in the CLI; every test starts without either."""
    from compressor import cli

    cli._state.update(verbose=False, quiet=False)
    yield
    cli._state.update(verbose=False, quiet=False)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`compressor -q ARGS` in this process: exit code, stdout, stderr."""
    from compressor import cli

    code = cli.main(["-q", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
