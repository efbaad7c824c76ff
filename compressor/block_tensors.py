"""Decoder state outside the blocks that is sized or indexed by the block count.

Owns two rule kinds an `architectures.Adapter` states as data, applied to a model in memory
(`surgery.apply_plan`) and, for the tensors, to safetensors files out of core
(`checkpoint.rewrite_checkpoint`), and the invariant they keep:

- `BlockTensor`: a tensor with one equal slice per block along an axis — Gemma 4's per-layer
  embeddings, ``embed_tokens_per_layer`` [vocab, L·d] (block i owns columns i·d..(i+1)·d) and
  ``per_layer_model_projection`` [L·d, hidden] (rows). Pruning keeps the kept blocks' slices,
  in order. In memory the parameter is replaced by its slice; out of core a `SlicedTensor`
  copies the kept byte ranges (a row slice is a few contiguous ranges; a column slice of a
  row-major tensor is strided and is copied a bounded chunk of rows at a time). Gemma 4's
  ``per_layer_projection_norm`` normalises each block's slice with one shared weight of width
  d, so it is not sized by the block count and stays as it is.
- decoder index attributes: ints on the module that holds the block list that count blocks
  from the start (Gemma 4's ``first_kv_shared_layer_idx``, computed once in ``__init__`` from
  the config); remapped like `Adapter.index_fields`. Lists of block numbers copied there from
  the config (Mllama's ``cross_attention_layers``, `Adapter.decoder_index_lists`) are
  renumbered like `Adapter.index_lists`.
- `problems`: after surgery, each block tensor spans exactly ``count`` slices, and each decoder
  index list says what the config says.

Neither torch nor transformers is imported at module level: `checkpoint` uses this module and
must stay free of both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, SurgeryError

if TYPE_CHECKING:
    from torch import nn

    from .architectures import Adapter


@dataclass(frozen=True)
class BlockTensor:
    """A tensor of the decoder (the module holding the block list) with one slice per block.

    ``name`` is relative to that module in memory and to the decoder's on-disk prefix (the
    adapter's ``tensor_prefix`` up to the block list's name); ``axis`` is the dimension of
    length ``count × width``; ``width_key`` names the config int holding the slice width.
    """

    name: str
    axis: int
    width_key: str


def kept_ranges(kept: Sequence[int], width: int) -> list[tuple[int, int]]:
    """The [begin, end) element ranges of the kept blocks' slices, adjacent ones merged."""
    ranges: list[tuple[int, int]] = []
    for block in kept:
        begin, end = block * width, (block + 1) * width
        if ranges and ranges[-1][1] == begin:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((begin, end))
    return ranges


def slice_width(name: str, size: int, num_blocks: int) -> int:
    """The width of one block's slice of a tensor whose ``axis`` has ``size`` entries."""
    if num_blocks <= 0 or size % num_blocks:
        raise SurgeryError(
            f"Tensor '{name}' has {size} entries along its per-block axis, not a multiple of the {num_blocks} blocks.",
            fix="the checkpoint does not match its config (or the family's adapter names the wrong axis); nothing was written.",
        )
    return size // num_blocks


# -- in memory ----------------------------------------------------------------------------------


def decoder_of(model: nn.Module, adapter: Adapter) -> nn.Module:
    """The module that holds the block list (``model.language_model`` for a Gemma 4 VLM)."""
    return model.get_submodule(adapter.block_path(model).rpartition(".")[0])


def _owner(decoder: nn.Module, rule: BlockTensor) -> tuple[nn.Module | None, str]:
    """The module holding ``rule``'s tensor and the tensor's attribute name; no module when the
    model has none (a Gemma 4 without per-layer embeddings: hidden_size_per_layer_input = 0)."""
    path, _, attr = rule.name.rpartition(".")
    try:
        return decoder.get_submodule(path), attr
    except AttributeError:
        return None, attr


def slice_in_memory(model: nn.Module, adapter: Adapter, kept: Sequence[int], num_blocks: int) -> None:
    """Cut every `BlockTensor` of ``model`` to the kept blocks and remap the decoder's index
    attributes. Call with the block list already cut (its parent path is the same)."""
    import torch
    from torch import nn

    if not (adapter.block_tensors or adapter.decoder_index_attrs or adapter.decoder_index_lists):
        return
    decoder = decoder_of(model, adapter)
    for rule in adapter.block_tensors:
        owner, attr = _owner(decoder, rule)
        weight = getattr(owner, attr, None)
        if weight is None:
            continue
        width = slice_width(rule.name, weight.shape[rule.axis], num_blocks)
        index = torch.cat([torch.arange(b, e) for b, e in kept_ranges(kept, width)]).to(weight.device)
        sliced = nn.Parameter(weight.detach().index_select(rule.axis, index).contiguous(), requires_grad=weight.requires_grad)
        setattr(owner, attr, sliced)
        # Keep the module's own description of its shape true (repr, resize_token_embeddings).
        if isinstance(owner, nn.Embedding):
            owner.num_embeddings, owner.embedding_dim = sliced.shape
        elif isinstance(owner, nn.Linear):
            owner.out_features, owner.in_features = sliced.shape
    for attr in adapter.decoder_index_attrs:
        value = getattr(decoder, attr, None)
        if isinstance(value, int):
            setattr(decoder, attr, sum(1 for i in kept if i < value))
    new_index = {old: new for new, old in enumerate(kept)}
    for attr in adapter.decoder_index_lists:
        values = getattr(decoder, attr, None)
        if isinstance(values, (list, tuple)):
            setattr(decoder, attr, [new_index[i] for i in values if i in new_index])


def problems(model: nn.Module, adapter: Adapter, text_config: Any, count: int) -> list[str]:
    """What breaks the invariant "each block tensor has ``count`` slices of the config's width"."""
    found: list[str] = []
    decoder = decoder_of(model, adapter) if adapter.block_tensors else None
    for rule in adapter.block_tensors:
        owner, attr = _owner(decoder, rule)
        weight = getattr(owner, attr, None)
        width = getattr(text_config, rule.width_key, None)
        if weight is not None and isinstance(width, int) and weight.shape[rule.axis] != count * width:
            found.append(f"{rule.name} has {weight.shape[rule.axis]} entries along axis {rule.axis}, expected {count} × {width}")
    for attr in adapter.decoder_index_lists:
        held, stated = getattr(decoder_of(model, adapter), attr, None), getattr(text_config, attr, None)
        if held is not None and stated is not None and list(held) != list(stated):
            found.append(f"the decoder module's {attr} = {list(held)}, but the config's is {list(stated)}")
    return found


# -- out of core --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlicedTensor:
    """An output tensor cut from a source tensor (a `checkpoint.TensorInfo`) along one axis.

    It answers what the writer asks of a `TensorInfo` (``name``, ``dtype``, ``shape``,
    ``nbytes``, ``numel``) for the *output*, and copies itself with `copy_to`.
    """

    source: Any  # checkpoint.TensorInfo
    axis: int
    ranges: tuple[tuple[int, int], ...]  # kept element ranges along ``axis``

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def dtype(self) -> str:
        return self.source.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.source.shape)
        shape[self.axis] = sum(e - b for b, e in self.ranges)
        return tuple(shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        size, count = self.source.nbytes, self.source.numel
        if not count or size % count:  # sub-byte dtypes (F4, F6) pack elements across bytes
            raise CheckpointError(
                f"Tensor '{self.name}' ({self.dtype}) has no whole bytes per element, so its per-block slices cannot be cut byte-wise.",
                fix="prune this checkpoint in memory, or convert it to a byte-sized dtype first.",
            )
        return size // count

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def copy_to(self, out: Any, src: Any, data_start: int) -> None:
        """Append the kept slices to ``out`` (a `checkpoint.HashingWriter`) from ``src``.

        The tensor is read as ``rows`` rows (the product of the dimensions before ``axis``) of
        ``row_bytes`` each; the kept bytes of a row are the kept ranges scaled by the size of
        one step along ``axis``. With ``axis`` 0 there is one row and the ranges are contiguous.
        """
        shape = self.source.shape
        step = math.prod(shape[self.axis + 1 :]) * self.itemsize
        rows = math.prod(shape[: self.axis])
        row_bytes = shape[self.axis] * step
        keep = [(b * step, e * step) for b, e in self.ranges]
        offset = data_start + self.source.begin
        if rows == 1:
            for begin, end in keep:
                out.copy(src, offset + begin, end - begin)
        else:
            out.copy_columns(src, offset, rows, row_bytes, keep)


def decoder_prefix(adapter: Adapter) -> str:
    """The on-disk name prefix of the decoder: ``tensor_prefix`` up to the block list's name
    ("model.language_model.layers.{index}." -> "model.language_model.")."""
    block_list = adapter.block_paths[0].rpartition(".")[2]
    head = adapter.tensor_prefix.split("{index}")[0]
    if not head.endswith(block_list + "."):
        raise SurgeryError(
            f"Adapter '{adapter.family}' has tensor_prefix '{adapter.tensor_prefix}', which does not end in its block list '{block_list}'.",
            fix="this is a bug in the family's adapter (compressor/architectures.py).",
        )
    return head[: len(head) - len(block_list) - 1]


def resizer(adapter: Adapter, num_blocks: int, kept: Sequence[int]):
    """A function mapping a source `checkpoint.TensorInfo` to what the output holds: a
    `SlicedTensor` for a `BlockTensor` of this adapter, the same info otherwise."""
    prefix = decoder_prefix(adapter) if adapter.block_tensors else ""
    rules = {prefix + rule.name: rule for rule in adapter.block_tensors}

    def resize(info: Any) -> Any:
        rule = rules.get(info.name)
        if rule is None:
            return info
        if rule.axis >= len(info.shape):
            raise CheckpointError(
                f"Tensor '{info.name}' has shape {list(info.shape)}, without the per-block axis {rule.axis}.",
                fix="the checkpoint does not match the family's layout; prune it in memory.",
            )
        width = slice_width(info.name, info.shape[rule.axis], num_blocks)
        return SlicedTensor(source=info, axis=rule.axis, ranges=tuple(kept_ranges(kept, width)))

    return resize
