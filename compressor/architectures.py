"""Per-family knowledge, as data: the only place that knows how model families differ.

An `Adapter` says where a family keeps its text decoder blocks (candidate module paths,
resolved against the live model), where its block count lives in the config (a dotted path),
which per-layer config lists must be *selected* by kept index, which index-valued config
fields must be remapped, which attributes carry a block's own index, the on-disk tensor-name
prefix of a block, and how image tokens are recognised. Nothing outside this module branches
on the model family; adding a family is adding one `Adapter` to `ADAPTERS` plus a test.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UnsupportedArchitectureError

if TYPE_CHECKING:  # torch only where models are touched: `plan`, `arch list` never import it
    from torch import nn


@dataclass(frozen=True)
class Adapter:
    family: str
    architectures: tuple[str, ...]  # config.architectures class names this adapter handles
    model_types: tuple[str, ...]  # config.model_type values (fallback when architectures is absent)
    block_paths: tuple[str, ...]  # candidate dotted module paths of the decoder block list
    text_config_path: str = ""  # dotted path from the root config to the decoder's config
    count_key: str = "num_hidden_layers"
    per_layer_lists: tuple[str, ...] = ()  # config lists with one entry per block
    index_fields: tuple[str, ...] = ()  # config ints counting blocks from the start
    renumber_attrs: tuple[str, ...] = ("layer_idx",)  # set to the block's new index
    tensor_prefix: str = "model.layers.{index}."  # on-disk name prefix of block `index`
    # Config ints holding the period p of `layer_types`: block i is full attention iff
    # (i + 1) % p == 0, sliding otherwise (Gemma3's `sliding_window_pattern`). They only say
    # again what `layer_types` says, so after selection they are recomputed from the kept
    # `layer_types`, or set to None when no period reproduces it (layer_types stays the truth).
    layer_period_fields: tuple[str, ...] = ()
    image_token_keys: tuple[str, ...] = ()  # config attributes holding the image token id
    multimodal: bool = False
    # The decoder attends both ways over the prompt (prefix-LM: the prompt is the prefix, the
    # answer the causally attended suffix). A cache-free reference for cached decoding must then
    # mark generated tokens as suffix, and exporters must not trace a causal graph (FACTS.md).
    prefix_lm: bool = False
    # ONNX export (onnx_export.py): "optimum" (text-generation-with-past through optimum-onnx),
    # "split" (vision encoder / token embedding / decoder graphs, onnx_graphs.py), or "" when
    # the family cannot be exported — `onnx_refusal` then says why.
    onnx: str = "optimum"
    onnx_refusal: str = ""
    onnx_vision: str = "features"  # how the vision graph calls the tower (onnx_graphs.VisionEncoder)
    # Attention beyond causal that the decoder graph must reproduce: "causal", "prefix" (the
    # prompt attends both ways) or "image_blocks" (tokens of one image attend both ways).
    onnx_attention: str = "causal"
    position_offset: int = 0  # added to 0-based token positions (PaliGemma counts from 1)
    # Leading blocks that cannot be removed without changing the model: a dotted path from the
    # root config to a list whose length is how many of the first blocks are fixed, and why.
    # The planner skips them (and refuses a recipe or plan that lists one), surgery refuses too.
    fixed_leading_key: str = ""
    fixed_reason: str = ""
    notes: tuple[str, ...] = field(default=())

    # -- config -----------------------------------------------------------------------------
    def text_config(self, config: Any) -> Any:
        """The config object that holds the block count (the root for text-only models)."""
        return _walk(config, self.text_config_path) if self.text_config_path else config

    @property
    def count_path(self) -> str:
        return f"{self.text_config_path}.{self.count_key}".lstrip(".")

    @property
    def modality_split(self) -> bool:
        """Whether calibration can tell image tokens from text tokens (image/text/all)."""
        return bool(self.image_token_keys)

    def num_blocks(self, config: Any) -> int:
        return int(getattr(self.text_config(config), self.count_key))

    def fixed_blocks(self, config: Any) -> dict[int, str]:
        """{block index: why it cannot be removed} for the leading blocks this config fixes."""
        if not self.fixed_leading_key:
            return {}
        try:
            values = _walk(config, self.fixed_leading_key)
        except AttributeError:
            return {}
        count = len(values or ())
        return {i: self.fixed_reason for i in range(min(count, self.num_blocks(config)))}

    def image_token_id(self, config: Any) -> int | None:
        for key in self.image_token_keys:
            value = getattr(config, key, None)
            if value is not None:
                return int(value)
        return None

    # -- modules ----------------------------------------------------------------------------
    def block_path(self, model: nn.Module) -> str:
        """The first candidate path that resolves to a ModuleList on this model."""
        from torch import nn

        for path in self.block_paths:
            try:
                found = _walk(model, path)
            except AttributeError:
                continue
            if isinstance(found, nn.ModuleList):
                return path
        raise UnsupportedArchitectureError(
            f"No decoder block list found on {type(model).__name__} (looked for {', '.join(self.block_paths)}).",
            fix=f"this transformers version lays out '{self.family}' differently; report it with `pip show transformers` output.",
        )

    @property
    def onnx_support(self) -> tuple[bool, str]:
        """(whether the family exports to ONNX, the layout or the reason it does not)."""
        if not self.onnx:
            return False, self.onnx_refusal
        if self.onnx == "optimum":
            return True, "model.onnx (optimum, with past)"
        return True, "split (vision, embed, decoder)"

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _walk(model, self.block_path(model))

    def set_blocks(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        parent_path, _, name = self.block_path(model).rpartition(".")
        setattr(_walk(model, parent_path) if parent_path else model, name, blocks)


def _walk(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


_LLAMA_LIKE = dict(block_paths=("model.layers",), tensor_prefix="model.layers.{index}.")

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        family="llava",
        architectures=("LlavaForConditionalGeneration",),
        model_types=("llava",),
        # 4.57/5.x keep the decoder at model.language_model; older releases at language_model.model.
        block_paths=("model.language_model.layers", "language_model.model.layers"),
        text_config_path="text_config",
        # LLaVA checkpoints keep the pre-4.52 tensor layout on disk (FACTS.md).
        tensor_prefix="language_model.model.layers.{index}.",
        image_token_keys=("image_token_id", "image_token_index"),
        multimodal=True,
        onnx="split",
    ),
    Adapter(
        family="llama",
        architectures=("LlamaForCausalLM",),
        model_types=("llama",),
        **_LLAMA_LIKE,
    ),
    Adapter(
        family="mistral",
        architectures=("MistralForCausalLM",),
        model_types=("mistral",),
        **_LLAMA_LIKE,
    ),
    Adapter(
        family="qwen2",
        architectures=("Qwen2ForCausalLM",),
        model_types=("qwen2",),
        # The first `max_window_layers` blocks use full attention: an index field.
        per_layer_lists=("layer_types",),
        index_fields=("max_window_layers",),
        **_LLAMA_LIKE,
    ),
    Adapter(
        family="qwen2_vl",
        architectures=("Qwen2VLForConditionalGeneration",),
        model_types=("qwen2_vl",),
        # 4.52+ nest the decoder under model.language_model; older releases had it at model.
        block_paths=("model.language_model.layers", "model.layers"),
        text_config_path="text_config",
        # Sliding-window config as Qwen2; M-RoPE positions come from the processor's inputs.
        per_layer_lists=("layer_types",),
        index_fields=("max_window_layers",),
        # Saved in the pre-4.52 layout (the checkpoint conversion mapping is reversed on save).
        tensor_prefix="model.layers.{index}.",
        image_token_keys=("image_token_id",),
        multimodal=True,
        onnx="split",
        onnx_vision="grid",
        notes=("ONNX: the vision graph is traced for one image grid; the runner refuses images of another size",),
    ),
    Adapter(
        family="qwen2_5_vl",
        architectures=("Qwen2_5_VLForConditionalGeneration",),
        model_types=("qwen2_5_vl",),
        block_paths=("model.language_model.layers", "model.layers"),
        text_config_path="text_config",
        per_layer_lists=("layer_types",),
        index_fields=("max_window_layers",),
        tensor_prefix="model.layers.{index}.",
        image_token_keys=("image_token_id",),
        multimodal=True,
        onnx="split",
        onnx_vision="grid",
        notes=("ONNX: the vision graph is traced for one image grid; the runner refuses images of another size",),
    ),
    Adapter(
        family="qwen3_vl",
        architectures=("Qwen3VLForConditionalGeneration",),
        model_types=("qwen3_vl",),
        block_paths=("model.language_model.layers",),
        text_config_path="text_config",
        # No conversion mapping: saved as the module tree is laid out.
        tensor_prefix="model.language_model.layers.{index}.",
        image_token_keys=("image_token_id",),
        multimodal=True,
        # DeepStack: vision features k = 0..len(deepstack_visual_indexes)-1 are added to the image
        # positions of the output of the k-th block of the list, by position (FACTS.md).
        fixed_leading_key="vision_config.deepstack_visual_indexes",
        fixed_reason="DeepStack: the vision tower adds features to the image positions of this block's output, by position",
        onnx="",
        onnx_refusal=(
            "Qwen3-VL's DeepStack vision features enter the first decoder blocks, and the split ONNX exporter has no inputs for them"
        ),
    ),
    Adapter(
        family="idefics3",
        architectures=("Idefics3ForConditionalGeneration",),
        model_types=("idefics3",),
        # SmolVLM (v1) checkpoints are Idefics3; the decoder is a Llama under text_model.
        block_paths=("model.text_model.layers",),
        text_config_path="text_config",
        tensor_prefix="model.text_model.layers.{index}.",
        image_token_keys=("image_token_id",),
        multimodal=True,
        onnx="split",
        onnx_vision="tiles",
    ),
    Adapter(
        family="paligemma",
        architectures=("PaliGemmaForConditionalGeneration",),
        model_types=("paligemma",),
        block_paths=("model.language_model.layers", "language_model.model.layers"),
        text_config_path="text_config",
        tensor_prefix="language_model.model.layers.{index}.",
        image_token_keys=("image_token_id", "image_token_index"),
        multimodal=True,
        onnx="split",
        onnx_attention="prefix",
        position_offset=1,
        prefix_lm=True,
        notes=("prefix-LM: attends both ways over the prompt; answers are given to the processor as `suffix`",),
    ),
    Adapter(
        family="gemma3",
        architectures=("Gemma3ForConditionalGeneration",),
        model_types=("gemma3",),
        block_paths=("model.language_model.layers", "language_model.model.layers"),
        text_config_path="text_config",
        per_layer_lists=("layer_types",),
        # Saved twice in config.json (the constructor keyword and its private copy).
        layer_period_fields=("sliding_window_pattern", "_sliding_window_pattern"),
        tensor_prefix="language_model.model.layers.{index}.",
        image_token_keys=("image_token_id", "image_token_index"),
        multimodal=True,
        onnx="split",
        onnx_attention="image_blocks",
        # The local rotary embedding holds a deep copy of the text config: surgery updates every
        # config object that describes the decoder (`surgery._decoder_configs`), not just one.
        notes=("image tokens attend each other both ways (token_type_ids from the processor)",),
    ),
)


def supported_families() -> list[str]:
    return [a.family for a in ADAPTERS]


def adapter_for_config(config: Any) -> Adapter:
    """The adapter for a (root) model config; refuses unknown families with the supported list."""
    names = list(getattr(config, "architectures", None) or [])
    for adapter in ADAPTERS:
        if any(name in adapter.architectures for name in names):
            return adapter
    model_type = getattr(config, "model_type", None)
    if not names:
        for adapter in ADAPTERS:
            if model_type in adapter.model_types:
                return adapter
    shown = names[0] if names else f"model_type '{model_type}'"
    known = [arch for a in ADAPTERS for arch in a.architectures]
    close = difflib.get_close_matches(shown, known, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise UnsupportedArchitectureError(
        f"Architecture {shown} is not supported.{hint} Supported families: "
        + ", ".join(f"{a.family} ({', '.join(a.architectures)})" for a in ADAPTERS)
        + ".",
        fix="use a model of a supported family (see `compressor arch list`).",
    )


def blocks_of_folder(folder: Path) -> tuple[Adapter, int] | None:
    """(adapter, block count) read straight from ``folder/config.json``, without transformers
    (`compressor plan --model` stays fast, and no code of the folder can run); None when the
    file leaves the count to the config class's default, which only transformers knows."""
    from .reindex import JsonConfig, load_config_json

    raw = load_config_json(folder)
    if raw is None:
        return None
    config = JsonConfig(raw)
    adapter = adapter_for_config(config)
    try:
        count = adapter.num_blocks(config)
    except (AttributeError, TypeError, ValueError):
        return None
    return adapter, count


def adapter_for_model(model: nn.Module) -> Adapter:
    return adapter_for_config(model.config)
