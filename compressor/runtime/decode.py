"""Greedy decoding under a `Participation`: with the KV cache (`greedy`, what runs) and without it
(`recompute`, the whole pruned forward again at every step: the reference cached decoding must
equal).

`greedy` is transformers' own ``generate`` (greedy, the model's generation config: its EOS and any
logits processors it names), run inside `taking_part` with a `subset_cache`: each family's code
still prepares its inputs at every step (Qwen2-VL's M-RoPE positions, masks). Where no block is
touched it gets no cache of ours and hooks that return at once, so it is the plain model's
``generate`` exactly. Where transformers 4.57 and 5.x differ (the cache's keyword, a prefix-LM's
cache-free mask: `answered`), `compat` says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..architectures import Adapter
from .compat import CACHE_KWARG, generated_cache, prefix_lm_reference
from .participation import Participation, subset_cache, taking_part


@dataclass(frozen=True)
class Decoded:
    tokens: torch.Tensor  # (new,) generated token ids, EOS included when it ended the answer
    logits: torch.Tensor  # (new, vocab) float32: the logits each token was chosen from
    cache: Any = None  # the KV cache after the last step (None for `recompute`)

    @property
    def confidence(self) -> float:
        """Geometric mean over the answer tokens of the largest softmax probability (SGL)."""
        if len(self.tokens) == 0:
            return 0.0
        top = torch.log_softmax(self.logits.float(), dim=-1).max(dim=-1).values
        return math.exp(float(top.mean()))


def greedy(
    model: nn.Module, adapter: Adapter, inputs: dict[str, torch.Tensor], participation: Participation, *, max_new_tokens: int
) -> Decoded:
    """Greedy generation with the KV cache, each block seeing the tokens ``participation`` gives it."""
    cache = subset_cache(participation)
    extra = {CACHE_KWARG: cache} if cache is not None else {}
    with torch.no_grad(), taking_part(model, adapter, participation):
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True, **extra
        )
    prompt = inputs["input_ids"].shape[1]
    return Decoded(out.sequences[0, prompt:], torch.stack(out.logits)[:, 0].float(), generated_cache(out))


def recompute(
    model: nn.Module, adapter: Adapter, inputs: dict[str, torch.Tensor], participation: Participation, *, max_new_tokens: int
) -> Decoded:
    """Greedy generation without a cache: at every step the pruned forward over the prompt and the
    tokens generated so far; the next token is the argmax of the raw logits, and generation stops at
    the model's EOS as ``generate`` does."""
    eos = _eos_ids(model)
    tokens: list[int] = []
    logits = []
    with torch.no_grad(), taking_part(model, adapter, participation):
        for _ in range(max_new_tokens):
            step = answered(model, adapter, inputs, torch.tensor(tokens, dtype=torch.long))
            last = model(**step, use_cache=False).logits[0, -1].float()
            logits.append(last)
            tokens.append(int(last.argmax()))
            if tokens[-1] in eos:
                break
    device = inputs["input_ids"].device
    return Decoded(torch.tensor(tokens, dtype=torch.long, device=device), torch.stack(logits))


def extend(inputs: dict[str, torch.Tensor], tokens: torch.Tensor, adapter: Adapter) -> dict[str, torch.Tensor]:
    """``inputs`` with ``tokens`` appended as the answer: input_ids grow by them, the attention mask
    by ones, other per-token rows (Qwen-VL's mm_token_type_ids, token_type_ids) by text (0) — by
    the suffix mark (1) for token_type_ids of a prefix-LM, whose answer is attended causally."""
    if len(tokens) == 0:
        return dict(inputs)
    ids = inputs["input_ids"]
    length = ids.shape[1]
    out = {}
    for key, value in inputs.items():
        if key == "input_ids":
            value = torch.cat([ids, tokens.to(ids.device, ids.dtype)[None]], dim=1)
        elif torch.is_tensor(value) and value.dim() == 2 and value.shape == (1, length):
            fill = 1 if key == "attention_mask" or (key == "token_type_ids" and adapter.prefix_lm) else 0
            value = torch.cat([value, value.new_full((1, len(tokens)), fill)], dim=1)
        out[key] = value
    return out


def answered(model: nn.Module, adapter: Adapter, inputs: dict[str, torch.Tensor], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs of one cache-free forward over the prompt ``inputs`` and the answer ``tokens``,
    attended as cached decoding attends them (`extend`; a prefix-LM's mask on 4.57, see `compat`)."""
    step = extend(inputs, tokens, adapter)
    if adapter.prefix_lm:
        step = prefix_lm_reference(model, step, inputs["input_ids"].shape[1])
    return step


def _eos_ids(model: nn.Module) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
