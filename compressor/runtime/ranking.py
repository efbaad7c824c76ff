"""Ranking a prompt's image tokens: which ones a block that keeps a share of them keeps.

- guide (SGL, "Small VLM Guidance for accelerating Large VLMs", CVPR 2025): the guide answers
  the same inputs; the attention each image token receives from the prompt's text tokens and the
  answer's tokens, summed over all of the guide's layers and heads, ranks it (`guide_scores`).
- self (FastV): this model's attention at the block before the cut, received from the last prompt
  token or from every text token (`self_scores`), computed under the same participation as the
  run (a band keeps image tokens out of early blocks there too).
- random: seeded (`random_scores`).

Attention weights exist only with eager attention: a ranking pass switches the model to eager for
its own forward and back (`functional.eager_attention`); generation itself keeps the model's
implementation. Scores are sums over heads (FastV's average over heads ranks the same).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..architectures import Adapter
from ..functional import eager_attention
from .decode import answered
from .participation import Participation, taking_part


class _Stop(Exception):
    """Ends a ranking pass once the last block it reads has run."""


def attention_received(
    model: nn.Module,
    adapter: Adapter,
    inputs: dict[str, torch.Tensor],
    participation: Participation,
    blocks: list[int],
    queries: torch.Tensor,
) -> torch.Tensor:
    """Per position of ``inputs``' sequence, the attention it receives in ``blocks`` from the
    positions where ``queries`` (bool over the sequence) holds, summed over heads and blocks. One
    forward pass without cache, stopped after the last of ``blocks``."""
    length = inputs["input_ids"].shape[1]
    received = torch.zeros(length, dtype=torch.float64, device=queries.device)
    last = max(blocks)
    everyone = torch.arange(length, device=queries.device)

    def capture(index: int, hooks: Any, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(f"block {index}'s attention returned no weights under eager attention")
        # Rows and columns are the tokens that took part in this block, in order.
        taking = hooks.last.get(index)
        positions = everyone if taking is None else taking.to(queries.device)
        per_query = weights[0].double().sum(0)  # (queries, keys), over heads
        reading = queries[positions]
        received.index_add_(0, positions, per_query[reading].sum(0))
        if index == last:
            raise _Stop

    all_blocks = adapter.blocks(model)
    with torch.no_grad(), eager_attention(model), taking_part(model, adapter, participation) as hooks:
        handles = [all_blocks[i].self_attn.register_forward_hook(lambda m, a, o, i=i: capture(i, hooks, o)) for i in blocks]
        try:
            model(**inputs, use_cache=False)
        except _Stop:
            pass
        else:
            raise RuntimeError("the ranking pass never reached its last block")
        finally:
            for handle in handles:
                handle.remove()
    return received


def guide_scores(
    guide: nn.Module, adapter: Adapter, inputs: dict[str, torch.Tensor], answer: torch.Tensor, images: torch.Tensor
) -> torch.Tensor:
    """SGL: per image token (``images``: prompt positions), the attention it receives from the text
    tokens of the prompt and the guide's ``answer``, summed over every layer and head of the guide.
    The answer is read up to its first image placeholder, if it wrote one: fed back, the model would
    look for image features for it."""
    placeholder = (answer == adapter.image_token_id(guide.config)).nonzero()
    full = answered(guide, adapter, inputs, answer[: int(placeholder[0]) if len(placeholder) else len(answer)])
    length = full["input_ids"].shape[1]
    queries = torch.ones(length, dtype=torch.bool, device=images.device)
    queries[images] = False
    blocks = list(range(len(adapter.blocks(guide))))
    received = attention_received(guide, adapter, full, Participation.everything(length, len(blocks)), blocks, queries)
    return received[images]


def self_scores(
    model: nn.Module,
    adapter: Adapter,
    inputs: dict[str, torch.Tensor],
    participation: Participation,
    cut: int,
    images: torch.Tensor,
    queries: str,
) -> torch.Tensor:
    """FastV: per image token, the attention it receives in block ``cut - 1`` from the last prompt
    token (``queries="last"``) or from every text token (``"text"``), under ``participation``."""
    length = inputs["input_ids"].shape[1]
    reading = torch.zeros(length, dtype=torch.bool, device=images.device)
    if queries == "last":
        reading[-1] = True
    else:
        reading[:] = True
        reading[images] = False
    return attention_received(model, adapter, inputs, participation, [cut - 1], reading)[images]


def random_scores(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, generator=generator, dtype=torch.float64)


def kept_count(count: int, keep: float) -> int:
    """How many of ``count`` image tokens a ``keep`` share keeps: ceil(keep·n), at least one of a
    non-empty set."""
    return min(count, max(1, math.ceil(keep * count - 1e-9))) if count else 0


def top(images: torch.Tensor, scores: torch.Tensor, keep: float) -> torch.Tensor:
    """The `kept_count` best-scored of ``images``, in position order; ties go to the earlier
    token, so a ranking gives one answer."""
    count = kept_count(len(images), keep)
    order = torch.argsort(-scores.to(images.device), stable=True)[:count]
    return images[order].sort().values
