"""Tiny text-only families of issue 18 (gemma2, phi3, mixtral, lfm2): random-weight models built from config objects, for the shared tests
(tests/conftest.py registers them). Each builder takes the decoder's block count and returns
(model in eval mode, processor or tokenizer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _gemma2(layers: int):
    """Gemma 2: layer_types S F S F S F (the config's default), a window shorter than the test prompts,
    query_pre_attn_scalar other than head_dim, and softcaps small enough to bite on these tiny logits.
    Untied head, as Gemma3's in conftest (a tied random Gemma repeats one token when decoding greedily)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from .conftest import WORDS, _text_kwargs, build_tokenizer

    tokenizer = build_tokenizer(WORDS)
    config = Gemma2Config(
        **_text_kwargs(tokenizer, layers),
        head_dim=8,
        query_pre_attn_scalar=16,
        sliding_window=6,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=10.0,
        tie_word_embeddings=False,
    )
    return Gemma2ForCausalLM(config), tokenizer


def _phi3(layers: int):
    """Phi-3 / Phi-4: fused `qkv_proj` and `gate_up_proj`, one sliding window for every block, Phi-4-mini's
    partial rotary (half of head_dim 8). No LongRoPE: its frequencies switch with the sequence length at
    run time, which the ONNX export refuses (tests/test_family_text.py prunes a LongRoPE model)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from .conftest import WORDS, _text_kwargs, build_tokenizer

    tokenizer = build_tokenizer(WORDS)
    config = Phi3Config(**_text_kwargs(tokenizer, layers), sliding_window=6, partial_rotary_factor=0.5)
    return Phi3ForCausalLM(config), tokenizer


def _mixtral(layers: int):
    """Mixtral: a sparse MoE MLP (4 experts, 2 per token) in every block, a window shorter than the prompts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from .conftest import WORDS, _text_kwargs, build_tokenizer

    tokenizer = build_tokenizer(WORDS)
    config = MixtralConfig(
        **{**_text_kwargs(tokenizer, layers), "intermediate_size": 16}, num_local_experts=4, num_experts_per_tok=2, sliding_window=6
    )
    return MixtralForCausalLM(config), tokenizer


def _lfm2(layers: int):
    """LFM2: short-convolution blocks and full-attention blocks, C F C F C F (full every second block, so
    that none of the shared tests' removals leaves no attention block, which the adapter refuses), stated
    both as `layer_types` and as `full_attn_idxs`, as released configs do. Untied head (see _gemma2); the
    feed-forward width as given (LFM2 rounds it up to a multiple of 256 by default)."""
    from transformers import Lfm2Config, Lfm2ForCausalLM

    from .conftest import WORDS, _text_kwargs, build_tokenizer

    tokenizer = build_tokenizer(WORDS)
    full = list(range(1, layers, 2))
    config = Lfm2Config(
        **_text_kwargs(tokenizer, layers),
        layer_types=["full_attention" if i in full else "conv" for i in range(layers)],
        full_attn_idxs=full,
        block_auto_adjust_ff_dim=False,
        tie_word_embeddings=False,
    )
    return Lfm2ForCausalLM(config), tokenizer


BUILDERS: dict[str, Callable[[int], tuple[Any, Any]]] = {"gemma2": _gemma2, "phi3": _phi3, "mixtral": _mixtral, "lfm2": _lfm2}
MULTIMODAL: frozenset[str] = frozenset()
IMAGE_TOKENS: dict[str, int] = {}  # image tokens per 16x16 test image, per multimodal family
