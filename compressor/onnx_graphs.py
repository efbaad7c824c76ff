"""The exported ONNX graphs, as torch modules ready to trace: a text decoder with past, and the
split layout of a vision-language model.

VLM runtimes (transformers.js, onnx-community checkpoints) run three graphs: a vision encoder
(vision tower + projector: pixels -> image features), a token embedding (ids -> embeddings),
and a decoder with a KV cache that takes ``inputs_embeds``. The runtime embeds the prompt,
writes the image features over the image-token rows, and decodes. A text decoder is the same
decoder taking ``input_ids`` (``DecoderSpec.text``), in the I/O layout onnxruntime-genai reads
(`onnx_export.genai_config`). This module owns the modules that compute exactly those graphs
from a loaded model, and their legacy ``torch.onnx`` export (FACTS.md: the dynamo exporter
fails on every VLM of transformers 4.57; on text decoders it is correct but 15-40x slower,
`onnx_export`).

Two choices make the decoder traceable and faithful:
- The attention masks are built here, in tensor ops, from the 2-D padding mask, and handed to
  the model already 4-D (transformers uses a 4-D mask as given). Building them from sizes
  read as tensors keeps batch, sequence and past lengths dynamic in the graph. Each family's
  attention pattern is reproduced: causal, sliding window per layer type (counted in real
  tokens, so a right-padded batch — onnxruntime-genai's — sees the window transformers sees),
  PaliGemma's bidirectional prompt (prefix-LM), Gemma3's bidirectional image blocks.
  `onnx_verify` compares against the model's own masking, so a pattern reproduced wrongly is
  caught.
- The KV cache enters and leaves as one tensor pair per block, so the graph's inputs and
  outputs are plain tensors named ``past_key_values.N.key`` / ``present.N.key`` (the names
  transformers.js, optimum and onnxruntime-genai use).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from .architectures import Adapter

OPSET = 17


@dataclass(frozen=True)
class DecoderSpec:
    """What the decoder graph needs to know about the text model it wraps."""

    num_blocks: int
    layer_types: tuple[str, ...]  # "full_attention" / "sliding_attention", one per block
    sliding_window: int | None
    attention: str  # "causal" | "prefix" (PaliGemma) | "image_blocks" (Gemma3)
    mrope: bool  # positions are (3, batch, seq): time, height, width (Qwen2-VL)
    mask_as_dict: bool  # the text model takes one mask per layer type
    image_token_id: int  # -1 for a text decoder
    text: bool = False  # the graph takes input_ids (a text decoder), not inputs_embeds (a VLM's)

    @property
    def token_types(self) -> bool:
        return self.attention == "image_blocks"


def decoder_spec(model: Any, adapter: Adapter) -> DecoderSpec:
    text = adapter.text_config(model.config)
    n = adapter.num_blocks(model.config)
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is None:
        # No per-layer types: a set sliding window applies to every block (Mistral-style).
        layer_types = ["sliding_attention" if window else "full_attention"] * n
    rope = getattr(text, "rope_scaling", None) or {}
    image_token = adapter.image_token_id(model.config)
    return DecoderSpec(
        num_blocks=n,
        layer_types=tuple(layer_types),
        sliding_window=int(window) if window else None,
        attention=adapter.onnx_attention,
        mrope="mrope_section" in rope,
        mask_as_dict=hasattr(text, "layer_types"),
        image_token_id=-1 if image_token is None else int(image_token),
        text=not adapter.multimodal,
    )


# -- masks ----------------------------------------------------------------------------------
def _count(t: torch.Tensor) -> torch.Tensor:
    """The length of a 1-D tensor as a 0-d tensor: a size the tracer keeps symbolic."""
    return torch.ones_like(t, dtype=torch.int64).sum()


def _indices(t: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(t, dtype=torch.int64).cumsum(0) - 1


def attention_masks(
    spec: DecoderSpec,
    attention_mask: torch.Tensor,
    seq_probe: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive 4-D masks (batch, 1, seq, past + seq) for the current tokens.

    ``attention_mask`` covers past and current tokens; ``seq_probe`` is any 1-D tensor with
    one entry per current token. Follows transformers' masking: a key is visible when it is
    not padding and (causal [and within the sliding window] or an extra bidirectional rule).
    """
    total = _count(attention_mask[0])
    seq = _count(seq_probe)
    k = _indices(attention_mask[0])  # key positions 0 .. past+seq-1
    q = _indices(seq_probe) + (total - seq)  # query positions past .. past+seq-1
    causal = k[None, :] <= q[:, None]  # (seq, total)
    extra = None
    if spec.attention == "prefix":
        # PaliGemma (inference): during a prefill of more than one token, the first `seq` keys
        # are visible to every query — the prompt attends both ways.
        extra = ((k[None, :] < seq) & (seq > 1)).expand(q.shape[0], -1)[None]  # (1, seq, total)
    elif spec.attention == "image_blocks":
        # Gemma3: image tokens of one image see each other both ways. Keys of the past count
        # as text (decoding steps are text queries, for which the rule never applies).
        past = torch.zeros_like(attention_mask[:, : total - seq])
        types = torch.cat([past, token_type_ids.to(past.dtype)], dim=1)
        is_image = types == 1
        start = is_image & ~torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
        group = torch.where(is_image, start.to(torch.int64).cumsum(1), torch.zeros_like(types) - 1)
        group_q, image_q = group[:, total - seq :], is_image[:, total - seq :]
        extra = image_q[:, :, None] & is_image[:, None, :] & (group_q[:, :, None] == group[:, None, :])
    padding = attention_mask.to(torch.bool)[:, None, None, :]
    floor = torch.finfo(dtype).min

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        # (seq, total) for every row, or (batch, seq, total) -> (batch | 1, 1, seq, total)
        allowed = allowed[None, None] if allowed.dim() == 2 else allowed[:, None]
        if extra is not None:
            allowed = allowed | extra[:, None]
        allowed = allowed & padding
        zero = torch.zeros((), dtype=dtype)
        return torch.where(allowed, zero, torch.full((), floor, dtype=dtype))

    masks = {"full_attention": additive(causal)} if "full_attention" in spec.layer_types else {}
    if "sliding_attention" in spec.layer_types:
        # The window counts real tokens, not slots: a key is in it when fewer than `window` real
        # tokens separate it from the query. With left padding (transformers) that is the slot
        # distance; onnxruntime-genai pads a batch on the right, so a row's decoded tokens follow
        # a hole of padding slots that must not use up the window.
        rank = attention_mask.to(torch.int64).cumsum(-1)
        distance = rank[:, total - seq :, None] - rank[:, None, :]  # (batch, seq, total)
        masks["sliding_attention"] = additive(causal[None] & (distance < spec.sliding_window))
    if spec.mask_as_dict:
        return masks
    (only,) = masks.values()
    return only


# -- the three modules ----------------------------------------------------------------------
def image_features(output: Any) -> Any:
    """The projected image features from ``get_image_features``' return value.

    transformers 4.x returns them directly (a tensor, or a list/tuple of per-image tensors);
    5.x returns the vision tower's output object with the projected features put in
    ``pooler_output`` (a tensor, or a list/tuple: per image for LLaVA and Qwen2-VL, per sample
    with the tiles flattened for Idefics3).
    """
    if isinstance(output, (torch.Tensor, list, tuple)):
        return output
    features = getattr(output, "pooler_output", None)
    if features is None:
        raise TypeError(f"get_image_features returned {type(output).__name__} without pooler_output")
    return features


class Decoder(nn.Module):
    """inputs_embeds (a VLM's decoder) or input_ids (a text decoder, ``spec.text``) + 2-D mask +
    positions (+ token types) + past -> logits + present."""

    def __init__(self, model: nn.Module, spec: DecoderSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, first, attention_mask, position_ids, *rest):
        token_type_ids = rest[0] if self.spec.token_types else None
        past = rest[1:] if self.spec.token_types else rest
        cache = DynamicCache()
        for i in range(self.spec.num_blocks):
            cache.update(past[2 * i], past[2 * i + 1], i)
        seq_probe = first[0] if self.spec.text else first[0, :, 0]
        masks = attention_masks(self.spec, attention_mask, seq_probe, token_type_ids, past[0].dtype)
        out = self.model(
            **({"input_ids": first} if self.spec.text else {"inputs_embeds": first}),
            attention_mask=masks,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present.extend((layer.keys, layer.values))
        return (out.logits, *present)


class TokenEmbedding(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids):
        return self.embed(input_ids)


class VisionEncoder(nn.Module):
    """Pixels -> image features, one row per image token, in the order the prompt holds them.

    ``features``: ``get_image_features(pixel_values)`` over a batch of images (LLaVA,
    PaliGemma, Gemma3). ``grid``: Qwen2-VL's flattened patches of one image and its
    (t, h, w) grid; the tower's rotary table and attention windows are computed from the
    grid's values, so the graph is traced for one grid and the runner feeds one image at a
    time. ``tiles``: Idefics3's whole image tiles; the tower's per-tile loop over patch
    masks (which tracing would unroll for one tile count) is replaced by the position term it
    adds on a whole tile, a constant.
    """

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model = model
        self.kind = kind
        if kind == "tiles":
            self.register_buffer("tile_positions", self._tile_positions(), persistent=False)

    @torch.no_grad()
    def _tile_positions(self) -> torch.Tensor:
        """What the tower's embedding adds for position on a whole tile, computed by the tower
        itself (its output on a blank tile minus the patch embedding of that tile): the
        bucketed position ids it derives from the patch mask are then reproduced exactly."""
        embeddings = self.model.model.vision_model.embeddings
        size = embeddings.image_size
        blank = torch.zeros(1, 3, size, size, dtype=embeddings.patch_embedding.weight.dtype)
        full = torch.ones(1, size // embeddings.patch_size, size // embeddings.patch_size, dtype=torch.bool)
        patches = embeddings.patch_embedding(blank).flatten(2).transpose(1, 2)
        return embeddings(pixel_values=blank, patch_attention_mask=full) - patches

    def forward(self, pixel_values, image_grid_thw=None):
        inner = self.model.model
        if self.kind == "grid":
            return torch.cat(list(image_features(inner.get_image_features(pixel_values, image_grid_thw))), dim=0)
        if self.kind == "tiles":
            tower = inner.vision_model
            patches = tower.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
            hidden = patches + self.tile_positions
            hidden = tower.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
            return inner.connector(tower.post_layernorm(hidden))
        # LLaVA returns the projector's batched output split into a list of images; traced,
        # that split would fix the image count. Return the batched tensor it was cut from.
        captured = []
        hook = inner.multi_modal_projector.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            features = image_features(inner.get_image_features(pixel_values=pixel_values))
        finally:
            hook.remove()
        return captured[-1] if isinstance(features, (list, tuple)) else features


# -- export ---------------------------------------------------------------------------------
def past_names(n: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]


def present_names(n: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]


def decoder_io(spec: DecoderSpec) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """Input names, output names and dynamic axes of the decoder graph."""
    first = "input_ids" if spec.text else "inputs_embeds"
    inputs = [first, "attention_mask", "position_ids"] + (["token_type_ids"] if spec.token_types else [])
    inputs += past_names(spec.num_blocks)
    outputs = ["logits", *present_names(spec.num_blocks)]
    axes: dict[str, dict[int, str]] = {
        first: {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {1: "batch_size", 2: "sequence_length"} if spec.mrope else {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    if spec.token_types:
        axes["token_type_ids"] = {0: "batch_size", 1: "sequence_length"}
    for name in past_names(spec.num_blocks):
        axes[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in present_names(spec.num_blocks):
        axes[name] = {0: "batch_size", 2: "total_sequence_length"}
    return inputs, outputs, axes


def export_graph(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    """Legacy TorchScript-based export (see the module docstring), eval mode, no grad."""
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings about Python values are expected: every size that must stay
        # dynamic is computed in tensor ops, and onnx_verify runs the graph at other sizes.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
