"""Per-family knowledge, as data: the only place that knows how model families differ.

An `Adapter` says where a family keeps its text decoder blocks (candidate module paths,
resolved against the live model), where its block count lives in the config (a dotted path),
which per-layer config lists must be *selected* by kept index, which index-valued config
fields must be remapped, which config lists of block numbers must be renumbered, which block
kinds are chosen by a period (`StepRule`: Qwen-MoE's sparse blocks), which layer type a plan
must keep, which attributes carry a block's own index, the on-disk tensor-name prefix of a
block, the tensors and config fields sized, keyed or counted by block (Gemma 4's per-layer
embeddings, `per_layer_config`, `num_kv_shared_layers`), the blocks a config forbids removing
(KV-sharing sources, the layer type forced last), and how image tokens are recognised.
`reindex`, `block_tensors` and `block_limits` apply these rules. Nothing outside this module branches
on the model family; adding a family is adding one `Adapter` to `ADAPTERS` plus a test.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .block_tensors import BlockTensor
from .errors import UnsupportedArchitectureError

if TYPE_CHECKING:  # torch only where models are touched: `plan`, `arch list` never import it
    from torch import nn


@dataclass(frozen=True)
class StepRule:
    """A block kind chosen by index: block i is of the kind iff i is not in config.<exceptions>
    and (i + 1) % config.<step> == 0 (Qwen-MoE: sparse-MoE MLP, else dense). Renumbering can
    break the period (keep blocks 0 1 3 of a step-2 model: kinds D S S), so after surgery the
    step stays only if it, with the renumbered exceptions, still gives every kept block its
    kind; otherwise the kinds are stated as a list: step 1, exceptions = the other-kind blocks."""

    step: str  # config int: the period
    exceptions: str  # config list of block numbers that are never of the kind (also in index_lists)
    kind: str  # what the kind is, for messages: "a sparse-MoE MLP"


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
    # Config lists of block numbers (Qwen-MoE's `mlp_only_layers`: the dense blocks): the entries
    # of kept blocks are kept, renumbered; those of removed blocks go.
    index_lists: tuple[str, ...] = ()
    # Block kinds decided by a period and an exception list (`StepRule`); kept blocks must build
    # the same kind after renumbering.
    step_rules: tuple[StepRule, ...] = ()
    # A `layer_types` value at least one kept block must have, and why; a plan removing every
    # such block is refused (`reindex.check_reindex`).
    required_layer_type: str = ""
    required_reason: str = ""
    # Config dicts keyed by block index (transformers 5's `per_layer_config`): the kept blocks'
    # entries are re-keyed to their new indices, the removed blocks' entries go.
    block_dicts: tuple[str, ...] = ()
    # Config ints counting blocks from the end (Gemma 4's `num_kv_shared_layers`): set to the
    # number of kept blocks among those last ones.
    tail_count_fields: tuple[str, ...] = ()
    # Tensors of the decoder with one slice per block (Gemma 4's per-layer embeddings): cut to
    # the kept blocks' slices in memory and out of core (block_tensors.py).
    block_tensors: tuple[BlockTensor, ...] = ()
    # Ints on the module holding the block list that count blocks from the start, computed by
    # its __init__ from the config (Gemma 4's `first_kv_shared_layer_idx`): remapped like
    # index_fields on the model in memory.
    decoder_index_attrs: tuple[str, ...] = ()
    # Removal limits (block_limits.py), merged into `fixed_blocks`: the config int counting the
    # trailing blocks that reuse an earlier block's keys and values (their sources are fixed),
    # and the layer type transformers forces on the last block.
    kv_shared_key: str = ""
    last_layer_type: str = ""
    image_token_keys: tuple[str, ...] = ()  # config attributes holding the image token id
    multimodal: bool = False
    # The decoder attends both ways over the prompt (prefix-LM: the prompt is the prefix, the
    # answer the causally attended suffix). A cache-free reference for cached decoding must then
    # mark generated tokens as suffix, and exporters must not trace a causal graph (FACTS.md).
    prefix_lm: bool = False
    # ONNX export (onnx_export.py): "text" (one decoder graph with KV cache, loaded by
    # onnxruntime-genai), "split" (vision encoder / token embedding / decoder graphs,
    # onnx_graphs.py), or "" when the family cannot be exported — `onnx_refusal` then says why.
    onnx: str = "text"
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
    # The transformers release this family needs ("" = any the project supports): a family whose
    # modeling code this transformers lacks is refused with this version to install. Its code
    # lives in transformers/models/<transformers_module> (default: the first model type), which
    # is how `arch list` tells without importing transformers.
    min_transformers: str = ""
    transformers_module: str = ""
    notes: tuple[str, ...] = field(default=())

    # -- config -----------------------------------------------------------------------------
    def text_config(self, config: Any) -> Any:
        """The config object that holds the block count (the root for text-only models)."""
        return _walk(config, self.text_config_path) if self.text_config_path else config

    @property
    def count_path(self) -> str:
        return f"{self.text_config_path}.{self.count_key}".lstrip(".")

    @property
    def config_keys(self) -> tuple[str, ...]:
        """Every decoder config key a rule of this adapter rewrites (what `arch list` shows)."""
        steps = (key for rule in self.step_rules for key in (rule.step, rule.exceptions))
        return tuple(dict.fromkeys((*self.per_layer_lists, *self.index_fields, *self.layer_period_fields, *self.index_lists, *steps)))

    @property
    def modality_split(self) -> bool:
        """Whether calibration can tell image tokens from text tokens (image/text/all)."""
        return bool(self.image_token_keys)

    def num_blocks(self, config: Any) -> int:
        return int(getattr(self.text_config(config), self.count_key))

    def fixed_blocks(self, config: Any) -> dict[int, str]:
        """{block index: why it cannot be removed}: the leading blocks this config fixes, and
        those the removal limits fix (`block_limits`: KV-sharing sources, the last layer type)."""
        from . import block_limits

        limits = block_limits.fixed_blocks(self, config)
        if not self.fixed_leading_key:
            return limits
        try:
            values = _walk(config, self.fixed_leading_key)
        except AttributeError:
            return limits
        count = len(values or ())
        return {**limits, **{i: self.fixed_reason for i in range(min(count, self.num_blocks(config)))}}

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
        if self.onnx == "text":
            return True, "model.onnx + genai_config.json (onnxruntime-genai, with past)"
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
# Qwen-MoE decoders: block i builds a sparse-MoE MLP iff i is not in `mlp_only_layers` and
# (i + 1) % decoder_sparse_step == 0, a dense MLP otherwise (a mismatch loses weights on reload).
_SPARSE_MOE = StepRule(step="decoder_sparse_step", exceptions="mlp_only_layers", kind="a sparse-MoE MLP")
_DEEPSTACK = "DeepStack: the vision tower adds features to the image positions of this block's output, by position"
# Qwen3.5 / 3.6 (dense and MoE; transformers 5 only): a hybrid decoder whose `layer_types` mix
# Gated DeltaNet (`linear_attention`) and `full_attention` blocks, every
# `full_attention_interval`-th one full. The cache keeps per-block linear-attention state,
# indexed by `layer_idx` on both kinds of mixer. Every block of the MoE variant is sparse.
# Released checkpoints also carry `mtp.*` tensors (a multi-token-prediction head) that
# transformers ignores on load: the out-of-core rewrite copies them unchanged.
_QWEN3_5 = dict(
    block_paths=("model.language_model.layers",),
    text_config_path="text_config",
    per_layer_lists=("layer_types",),
    layer_period_fields=("full_attention_interval",),
    required_layer_type="full_attention",
    required_reason=(
        "transformers' cache reads the sequence length from a full-attention block, so a decoder of "
        "linear-attention blocks alone cannot generate with a cache"
    ),
    tensor_prefix="model.language_model.layers.{index}.",
    image_token_keys=("image_token_id",),
    multimodal=True,
    min_transformers="5.17",
    onnx="",
    onnx_refusal=(
        "Qwen3.5's Gated DeltaNet blocks carry a convolution and a recurrent state from token to token, "
        "and compressor's ONNX decoder graphs pass only a KV cache"
    ),
)

# Gemma 4 (transformers 5 only; FACTS.md): `layer_types` sliding/full, the last block forced to
# full; `per_layer_config` keyed by block index (full-attention blocks carry their own head_dim);
# per-layer embeddings packed as one slice of width `hidden_size_per_layer_input` per block; the
# last `num_kv_shared_layers` blocks reuse the keys and values of the last earlier block of their
# type. MoE blocks (`enable_moe_block`, one flag for every block) keep their router and experts
# under the block prefix: nothing beyond renaming.
_GEMMA4 = dict(
    per_layer_lists=("layer_types",),
    block_dicts=("per_layer_config",),
    tail_count_fields=("num_kv_shared_layers",),
    block_tensors=(
        BlockTensor(name="embed_tokens_per_layer.weight", axis=1, width_key="hidden_size_per_layer_input"),
        BlockTensor(name="per_layer_model_projection.weight", axis=0, width_key="hidden_size_per_layer_input"),
    ),
    decoder_index_attrs=("first_kv_shared_layer_idx",),
    kv_shared_key="num_kv_shared_layers",
    last_layer_type="full_attention",
    min_transformers="5.17",
    transformers_module="gemma4",
    onnx="",
    onnx_refusal=(
        "Gemma 4's decoder takes per-layer inputs (a second embedding table, looked up per token and fed to every block) "
        "and shares keys and values between blocks; the split ONNX decoder graph has neither"
    ),
)

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
        fixed_reason=_DEEPSTACK,
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
    Adapter(
        family="qwen3",
        architectures=("Qwen3ForCausalLM",),
        model_types=("qwen3",),
        # Sliding-window config as Qwen2.
        per_layer_lists=("layer_types",),
        index_fields=("max_window_layers",),
        **_LLAMA_LIKE,
    ),
    Adapter(
        family="qwen3_moe",
        architectures=("Qwen3MoeForCausalLM",),
        model_types=("qwen3_moe",),
        # Experts are one fused tensor per block in memory (transformers 5) but saved per expert
        # under the same block prefix, so the out-of-core rewrite renames them like any block tensor.
        index_lists=("mlp_only_layers",),
        step_rules=(_SPARSE_MOE,),
        **_LLAMA_LIKE,
    ),
    Adapter(
        family="gemma3_text",
        architectures=("Gemma3ForCausalLM",),
        model_types=("gemma3_text",),
        transformers_module="gemma3",
        per_layer_lists=("layer_types",),
        layer_period_fields=("sliding_window_pattern", "_sliding_window_pattern"),
        **_LLAMA_LIKE,
    ),
    Adapter(
        family="qwen3_vl_moe",
        architectures=("Qwen3VLMoeForConditionalGeneration",),
        model_types=("qwen3_vl_moe",),
        block_paths=("model.language_model.layers",),
        text_config_path="text_config",
        # Experts saved fused (`mlp.experts.gate_up_proj`, `down_proj`), under the block prefix too.
        tensor_prefix="model.language_model.layers.{index}.",
        index_lists=("mlp_only_layers",),
        step_rules=(_SPARSE_MOE,),
        image_token_keys=("image_token_id",),
        multimodal=True,
        fixed_leading_key="vision_config.deepstack_visual_indexes",
        fixed_reason=_DEEPSTACK,
        onnx="",
        onnx_refusal=(
            "Qwen3-VL-MoE's DeepStack vision features enter the first decoder blocks, and the split ONNX exporter has no inputs for them"
        ),
    ),
    Adapter(family="qwen3_5", architectures=("Qwen3_5ForConditionalGeneration",), model_types=("qwen3_5",), **_QWEN3_5),
    Adapter(family="qwen3_5_moe", architectures=("Qwen3_5MoeForConditionalGeneration",), model_types=("qwen3_5_moe",), **_QWEN3_5),
    # The decoders alone (text-only checkpoints): the text config is the root config.
    Adapter(
        family="qwen3_5_text",
        architectures=("Qwen3_5ForCausalLM",),
        model_types=("qwen3_5_text",),
        transformers_module="qwen3_5",
        **{**_QWEN3_5, **_LLAMA_LIKE, "text_config_path": "", "image_token_keys": (), "multimodal": False},
    ),
    Adapter(
        family="qwen3_5_moe_text",
        architectures=("Qwen3_5MoeForCausalLM",),
        model_types=("qwen3_5_moe_text",),
        transformers_module="qwen3_5_moe",
        **{**_QWEN3_5, **_LLAMA_LIKE, "text_config_path": "", "image_token_keys": (), "multimodal": False},
    ),
    Adapter(
        family="gemma4",
        architectures=("Gemma4ForConditionalGeneration",),
        model_types=("gemma4",),
        block_paths=("model.language_model.layers",),
        text_config_path="text_config",
        tensor_prefix="model.language_model.layers.{index}.",
        image_token_keys=("image_token_id",),
        multimodal=True,
        **_GEMMA4,
    ),
    Adapter(family="gemma4_text", architectures=("Gemma4ForCausalLM",), model_types=("gemma4_text",), **_LLAMA_LIKE, **_GEMMA4),
    # -- text decoders: gemma2, phi3, mixtral --
    # -- end of text decoders --
    # -- LLaVA-like VLMs: llava_next, llava_onevision, mistral3, internvl, smolvlm --
    # -- end of LLaVA-like VLMs --
    # -- VLMs with block-tied rules: mllama, llama4, lfm2_vl, glm4v, glm4v_moe, glm46v, gemma3n --
    # -- end of VLMs with block-tied rules --
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
