"""Tiny VLM families of issue 18 with block-tied rules (mllama, llama4, lfm2_vl, glm4v, glm4v_moe, glm46v,
gemma3n): random-weight models built from config objects, for the shared tests (tests/conftest.py
registers them) and tests/test_family_vlm_rules.py. Each builder takes the decoder's block count and
returns (model in eval mode, processor or tokenizer).

In the shared matrix: mllama, the GLM-4V family, and Llama 4's decoder alone (`llama4_text`). Not
there, and checked by tests/test_family_vlm_rules.py with hand-made inputs: the Llama 4 and LFM2-VL
VLMs (their image processors need torchvision, which cannot be installed here: FACTS.md) and Gemma 3n
(its vision tower needs timm, and the family refuses calibration)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

# Mllama: the blocks that cross-attend to the image (`cross_attention_layers`, fixed by the adapter,
# as is block 0). Block 1 in the shared matrix, whose fixed removals ([2, 3]; [2, 4] from
# recipes/explicit.yaml) must stay possible; tests/test_family_vlm_rules.py builds others.
MLLAMA_CROSS = (1,)
MLLAMA_IMAGE = "<|image|>"


def _mllama(layers: int, cross: tuple[int, ...] = MLLAMA_CROSS):
    """Llama 3.2 Vision: the ``cross`` blocks cross-attend to the vision states (a tile of 16x16 in 4x4
    patches plus a class token, one-layer local and global vision encoders); the text carries one
    `<|image|>` placeholder per image. Cross-attention gates start at zero in transformers (the
    block is then the identity): set to 1 here so that the image changes the logits."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor

    from .conftest import CHAT_TEMPLATE, IMAGE, WORDS, _text_kwargs, build_tokenizer, pil_image_processor_class

    tokenizer = build_tokenizer(
        WORDS, special_tokens=(MLLAMA_IMAGE, "<|python_tag|>"), chat_template=CHAT_TEMPLATE.replace(IMAGE, MLLAMA_IMAGE)
    )
    image_processor = pil_image_processor_class("MllamaImageProcessor")(size={"height": 16, "width": 16}, max_image_tiles=1)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_global_layers=1, attention_heads=2, image_size=16,
        patch_size=4, max_num_tiles=1, supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[0], vision_output_dim=32,
    )  # fmt: skip
    config = MllamaConfig(
        # 4.57's rotary embedding reads the rope type from rope_scaling (5.x: rope_parameters, converted).
        text_config={
            **_text_kwargs(tokenizer, layers),
            "cross_attention_layers": [i for i in cross if i < layers],
            "rope_scaling": {"rope_type": "default"},
        },
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids(MLLAMA_IMAGE),
    )
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                parameter.fill_(1.0)
    return model, processor


# Llama 4's decoder: NoPE every third block (no_rope_layers 1 1 0 1 1 0, so layer_types C C F C C F:
# the RoPE blocks attend in chunks of 4 tokens, shorter than the test prompts), mixture-of-experts
# feed-forward every second block (moe_layers 1, 3, 5; the others dense), attention temperature
# tuned from position 4 on (floor_scale 4): every block-tied field of the family changes something.
LLAMA4_TEXT = dict(
    head_dim=8,
    intermediate_size=32,
    intermediate_size_mlp=64,
    num_local_experts=4,
    num_experts_per_tok=1,
    interleave_moe_layer_step=2,
    no_rope_layer_interval=3,
    attention_chunk_size=4,
    floor_scale=4,
)


def llama4_text_config(tokenizer, layers: int, **extra) -> dict:
    from .conftest import _text_kwargs

    return {**_text_kwargs(tokenizer, layers), **LLAMA4_TEXT, **extra}


def _llama4_text(layers: int):
    """Llama 4's decoder alone (Llama4ForCausalLM): the VLM's image processor needs torchvision, which
    this project cannot install (FACTS.md), so the shared matrix runs the decoder; the VLM class is
    checked with hand-made image inputs in tests/test_family_vlm_rules.py."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from .conftest import WORDS, build_tokenizer

    tokenizer = build_tokenizer(WORDS)
    return Llama4ForCausalLM(Llama4TextConfig(**llama4_text_config(tokenizer, layers))), tokenizer


GLM_SPECIAL = ("<|image|>", "<|begin_of_image|>", "<|end_of_image|>", "<|video|>", "<|begin_of_video|>", "<|end_of_video|>")
# GLM-4.5V's MoE decoder: blocks 0 and 1 dense (`first_k_dense_replace`), the others 4 routed
# experts (2 per token) and a shared one.
GLM_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=2)


def glm_text_config(tokenizer, layers: int, *, moe: bool = False) -> dict:
    """GLM-4V's decoder: head_dim 16 (2 heads), half of it rotary, split (2, 1, 1) over M-RoPE's
    time, height and width (4.57 reads partial_rotary_factor from the config, 5.x from the rope
    parameters, where it moves it)."""
    from .conftest import _text_kwargs

    text = {
        **_text_kwargs(tokenizer, layers),
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "partial_rotary_factor": 0.5,
        "rope_scaling": {"rope_type": "default", "mrope_section": [2, 1, 1]},
    }
    return {**text, **GLM_MOE} if moe else text


def _glm(family: str, layers: int, *, moe: bool | None = None):
    """GLM-4.1V (glm4v), GLM-4.5V (glm4v_moe) and GLM-4.6V (glm46v, transformers 5): as Qwen2-VL's
    tests, 16x16 images resized to 24x24, a 6x6 grid of 4x4 patches merged 2x2 into 9 image tokens
    between <|begin_of_image|> and <|end_of_image|>; a one-block vision tower."""
    import transformers

    from .conftest import CHAT_TEMPLATE, IMAGE, WORDS, build_tokenizer, pil_image_processor_class, video_processor_placeholder

    template = CHAT_TEMPLATE.replace(IMAGE, "<|begin_of_image|><|image|><|end_of_image|>")
    tokenizer = build_tokenizer(WORDS, special_tokens=GLM_SPECIAL, chat_template=template)
    image_processor = pil_image_processor_class("Glm4vImageProcessor")(
        patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 24 * 24, "longest_edge": 24 * 24}
    )
    processor = transformers.Glm4vProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor_placeholder(), chat_template=template
    )
    names = ("image_token_id", "image_start_token_id", "image_end_token_id", "video_token_id", "video_start_token_id", "video_end_token_id")
    ids = dict(zip(names, tokenizer.convert_tokens_to_ids(list(GLM_SPECIAL))))
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
        out_hidden_size=32, image_size=16,
    )  # fmt: skip
    moe = family == "glm4v_moe" if moe is None else moe
    text = glm_text_config(tokenizer, layers, moe=moe)
    if family == "glm46v":
        if moe:
            text["model_type"] = "glm4v_moe_text"
        config = transformers.Glm46VConfig(text_config=text, vision_config=vision, **ids)
        return transformers.Glm46VForConditionalGeneration(config), processor
    if family == "glm4v_moe":
        config = transformers.Glm4vMoeConfig(text_config=text, vision_config=vision, **ids)
        return transformers.Glm4vMoeForConditionalGeneration(config), processor
    config = transformers.Glm4vConfig(text_config=text, vision_config=vision, **ids)
    return transformers.Glm4vForConditionalGeneration(config), processor


F, S = "full_attention", "sliding_attention"


def gemma3n_text_config(tokenizer, layer_types, **extra) -> dict:
    """Gemma 3n's decoder: the last 2 blocks KV-shared, per-layer embeddings of width 4, AltUp with 2
    predictions, LAuReL of rank 4, the MLP's gate top-k sparse in the first 2 blocks, MLP widths per
    block, a sliding window shorter than the test prompts."""
    from .conftest import _text_kwargs

    layers = len(layer_types)
    return {
        **_text_kwargs(tokenizer, layers),
        "head_dim": 8,
        "intermediate_size": [64, 64, 48, 48, 32, 32][:layers] + [32] * (layers - 6),
        "layer_types": list(layer_types),
        "sliding_window": 4,
        "hidden_size_per_layer_input": 4,
        "vocab_size_per_layer_input": len(tokenizer),
        "num_kv_shared_layers": 2,
        "activation_sparsity_pattern": [0.95, 0.95] + [0.0] * (layers - 2),
        "altup_num_inputs": 2,
        "laurel_rank": 4,
        "final_logit_softcapping": 10.0,
        "tie_word_embeddings": False,  # as Gemma3's in conftest: a tied random Gemma repeats one token
        **extra,
    }


def gemma3n_text(layer_types, **extra):
    """Gemma 3n's decoder alone (Gemma3nForCausalLM). Not in the shared matrix: the family refuses
    calibration (`Adapter.calibration_refusal`), and the VLM's vision tower is built by timm, which
    needs torchvision, which this project cannot install (FACTS.md). tests/test_family_vlm_rules.py
    checks it (and the VLM's checkpoint layout) instead."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    from .conftest import WORDS, build_tokenizer

    tokenizer = build_tokenizer(WORDS)
    model = Gemma3nForCausalLM(Gemma3nTextConfig(**gemma3n_text_config(tokenizer, layer_types, **extra)))
    model.config.architectures = ["Gemma3nForCausalLM"]
    return model, tokenizer


BUILDERS: dict[str, Callable[[int], tuple[Any, Any]]] = {
    "mllama": _mllama,
    "llama4_text": _llama4_text,
    **{family: functools.partial(_glm, family) for family in ("glm4v", "glm4v_moe", "glm46v")},
}
MULTIMODAL: frozenset[str] = frozenset({"mllama", "glm4v", "glm4v_moe", "glm46v"})
# Image tokens per 16x16 test image, per multimodal family. Mllama: the one `<|image|>` placeholder
# (the image itself enters through the cross-attention blocks).
IMAGE_TOKENS: dict[str, int] = {"mllama": 1, **dict.fromkeys(("glm4v", "glm4v_moe", "glm46v"), 9)}
# Families whose image enters the decoder through cross-attention blocks, not as token embeddings:
# the `<|image|>` placeholder is the image's one token, and the first block's input does not see it.
IMAGE_BY_CROSS_ATTENTION = frozenset({"mllama"})
