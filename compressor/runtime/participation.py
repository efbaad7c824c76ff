"""Which tokens take part in each decoder block: the one mechanism behind visual-token pruning
(FastV, SGL), SGL's consistency check and Skip-It's visual-token band.

A `Participation` gives, per block, the prompt positions that take part (None: all of them);
generated tokens always take part. While `taking_part` is active, a forward pre-hook on each
touched block gathers the hidden states of those positions and slices what the model computed
for the whole sequence to them: the rotary tables (cos/sin; Qwen2-VL's M-RoPE alike), the
position ids and the attention mask. Kept tokens therefore keep their original positions: nothing
is renumbered. A forward hook scatters the block's output back into the full hidden state, so
the positions that did not take part pass through unchanged (an image token kept out before a
band enters its first block with its embedding) and the model's loop between blocks sees the
whole sequence as usual.

With a KV cache (`subset_cache`), each touched block's cache layer is a `SubsetLayer`: it holds
the entries of the tokens that took part there, with their original positions, and reports the
length of the whole sequence, so the position ids and masks the model builds keep counting every
token. A touched block's mask is the model's own — causal, sliding-window, bidirectional image
blocks or prefix-LM alike — cut to the rows of the tokens taking part and the columns of its
cached entries. Without a cache the same hooks compute the same pruned forward over the whole
sequence, the reference that cached decoding is checked against.

A block whose set is every prompt position is never touched: its hooks return at once, so where
no block has a set the model computes exactly what it computes without them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from ..architectures import Adapter
from .compat import block_cache, query_length


@dataclass(frozen=True)
class Participation:
    """Per block, the sorted prompt positions that take part, or None for all of them."""

    prompt_length: int
    sets: tuple[torch.Tensor | None, ...]

    @classmethod
    def everything(cls, prompt_length: int, num_blocks: int) -> Participation:
        return cls(prompt_length, (None,) * num_blocks)

    @property
    def touched(self) -> list[int]:
        return [i for i, s in enumerate(self.sets) if s is not None]

    def prompt_tokens(self) -> list[int]:
        """Prompt positions each block processes."""
        return [self.prompt_length if s is None else len(s) for s in self.sets]


class SubsetLayer(DynamicLayer):
    """A touched block's cache: the keys and values of the tokens that took part, their original
    positions, and the length of the whole sequence seen so far (which it reports as its length:
    the model derives position ids and mask sizes from it)."""

    def __init__(self) -> None:
        super().__init__()
        self.positions = torch.empty(0, dtype=torch.long)
        self.seen = 0
        self._incoming: tuple[torch.Tensor, int] | None = None

    def expect(self, positions: torch.Tensor, total: int) -> None:
        """Set by the block's pre-hook: the positions of the entries the coming update adds, and
        how many tokens the forward pass holds in all."""
        self._incoming = (positions, total)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self._incoming is None:
            raise RuntimeError("a SubsetLayer was updated outside `taking_part` (its block's hooks are not attached)")
        positions, total = self._incoming
        self._incoming = None
        self.positions = torch.cat([self.positions.to(positions.device), positions])
        self.seen += total
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        return self.seen + query_length(query), 0


def subset_cache(participation: Participation) -> Cache | None:
    """The KV cache for generating under ``participation``: None (the model's default cache) when
    no block is touched; else a `SubsetLayer` per touched block and a full `DynamicLayer` per other
    block. Full, not sliding-window, layers: every layer then counts the same positions, so masks
    the model sizes on one layer index every other (sliding blocks get their window from the mask)."""
    if not participation.touched:
        return None
    return Cache(layers=[DynamicLayer() if s is None else SubsetLayer() for s in participation.sets])


class _Hooks:
    """The hooks of one `taking_part` context; `last[i]` holds the original positions of the
    tokens that took part in block i in the latest forward pass (None where all did)."""

    def __init__(self, participation: Participation):
        self.participation = participation
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last: dict[int, torch.Tensor | None] = {}

    def before(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        chosen = self.participation.sets[index]
        self.last[index] = None
        if chosen is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        count = hidden.shape[1]
        cache = block_cache(kwargs)
        layer = cache.layers[index] if cache is not None else None
        if layer is not None and not isinstance(layer, SubsetLayer):
            raise RuntimeError(f"block {index} takes part partly but its cache layer is a {type(layer).__name__}; use subset_cache()")
        seen = layer.seen if layer is not None else 0
        positions = torch.arange(seen, seen + count, device=hidden.device)
        # Generated tokens (past the prompt) always take part.
        takes_part = (positions >= self.participation.prompt_length) | torch.isin(positions, chosen.to(hidden.device))
        rows = takes_part.nonzero().squeeze(1)
        queries = positions[rows]
        keys = queries if layer is None else torch.cat([layer.positions.to(hidden.device), queries])
        if layer is not None:
            layer.expect(queries, count)
        self.pending[index] = (hidden, rows)
        self.last[index] = queries
        kwargs = {k: _cut(k, v, rows, keys, count) for k, v in kwargs.items()}
        gathered = hidden.index_select(1, rows)
        if args:
            return (gathered, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": gathered}

    def after(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if index not in self.pending:
            return None
        hidden, rows = self.pending.pop(index)
        out = output[0] if isinstance(output, tuple) else output
        full = hidden.clone()
        full[:, rows] = out.to(full.dtype)
        return (full, *output[1:]) if isinstance(output, tuple) else full


def _cut(name: str, value: Any, rows: torch.Tensor, keys: torch.Tensor, count: int) -> Any:
    """A block argument, cut to the tokens taking part: rotary tables (..., tokens, dim) along the
    tokens, position ids (..., tokens) along the last axis, the attention mask (batch, heads, queries,
    keys) to those rows and to the columns of the keys' original positions. A mask the model left
    out (SDPA's plain causal case) stays out: causal over a subset in order is causal again."""
    if name.startswith("position_embeddings") and isinstance(value, (tuple, list)):
        return type(value)(t.index_select(-2, rows) if torch.is_tensor(t) and t.shape[-2] == count else t for t in value)
    if ("position_ids" in name or name == "cache_position") and torch.is_tensor(value) and value.shape[-1] == count:
        return value.index_select(-1, rows)
    if name == "attention_mask" and torch.is_tensor(value):
        if value.dim() != 4 or value.shape[-2] != count or value.shape[-1] <= int(keys.max()):
            raise RuntimeError(f"unexpected attention mask of shape {tuple(value.shape)} for {count} tokens")
        return value.index_select(-2, rows).index_select(-1, keys)
    return value


@contextmanager
def taking_part(model: nn.Module, adapter: Adapter, participation: Participation) -> Iterator[_Hooks]:
    """Attach the gather/scatter hooks for ``participation`` to every decoder block; always removed."""
    blocks = adapter.blocks(model)
    if len(participation.sets) != len(blocks):
        raise ValueError(f"participation is for {len(participation.sets)} blocks; the model has {len(blocks)}")
    hooks = _Hooks(participation)
    handles = []
    try:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(lambda m, a, k, i=index: hooks.before(i, m, a, k), with_kwargs=True))
            handles.append(block.register_forward_hook(lambda m, a, k, o, i=index: hooks.after(i, m, a, k, o), with_kwargs=True))
        yield hooks
    finally:
        for handle in handles:
            handle.remove()


def image_positions(input_ids: torch.Tensor, image_token_id: int | None) -> torch.Tensor:
    """Prompt positions of image tokens in a one-row batch."""
    if image_token_id is None:
        return torch.empty(0, dtype=torch.long, device=input_ids.device)
    return (input_ids[0] == image_token_id).nonzero().squeeze(1)


def build(prompt_length: int, images: torch.Tensor, allowed: Sequence[torch.Tensor]) -> Participation:
    """Per block: every text position plus the image positions ``allowed[i]`` (a subset of
    ``images``); None where that is the whole prompt."""
    text = torch.ones(prompt_length, dtype=torch.bool, device=images.device)
    text[images] = False
    sets = []
    for kept in allowed:
        if len(kept) == len(images):
            sets.append(None)
            continue
        take = text.clone()
        take[kept] = True
        sets.append(take.nonzero().squeeze(1))
    return Participation(prompt_length, tuple(sets))
