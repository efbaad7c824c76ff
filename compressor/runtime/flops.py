"""A FLOPs estimate of a generation from what each block processed.

Per block: 2 · (the block's parameters) · (tokens it processed) for its matrix products, plus
4 · (query width: heads · head dim) · (query-key pairs it attended) for QKᵀ and the weighted sum of
values. A generation of n new tokens feeds the prompt, then n − 1 tokens one at a time (the last
token is never fed back); a block that takes p prompt positions processes p + n − 1 tokens and
attends p(p + 1)/2 pairs in the prompt plus p + j keys at the j-th step after it. Sliding windows
are not counted (an upper bound there); an MoE block counts all its experts (an upper bound too).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..architectures import adapter_for_model


def estimate_flops(model: nn.Module, prompt_tokens: Sequence[int], new_tokens: int) -> list[float]:
    """Per decoder block of ``model``: the estimate for ``prompt_tokens[i]`` prompt positions taking
    part in block i (`Generation.prompt_tokens_per_block`) and ``new_tokens`` generated tokens."""
    adapter = adapter_for_model(model)
    blocks = adapter.blocks(model)
    if len(prompt_tokens) != len(blocks):
        raise ValueError(f"{len(prompt_tokens)} token counts for {len(blocks)} blocks")
    config = adapter.text_config(model.config)
    heads = config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    steps = max(new_tokens - 1, 0)
    flops = []
    for block, prompt in zip(blocks, prompt_tokens):
        if prompt == 0:  # the block did not run (the model was skipped)
            flops.append(0.0)
            continue
        params = sum(p.numel() for p in block.parameters())
        pairs = prompt * (prompt + 1) // 2 + sum(prompt + j for j in range(1, steps + 1))
        flops.append(2.0 * params * (prompt + steps) + 4.0 * width * pairs)
    return flops
