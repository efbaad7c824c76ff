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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
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
    # (config key, why): decoder-config lists of block numbers whose blocks cannot be removed
    # (Mllama's `cross_attention_layers`, where the image enters); merged into `fixed_blocks`.
    fixed_lists: tuple[tuple[str, str], ...] = ()
    # Why block 0 cannot be removed ("" = it can): transformers' cache reads the cached length from
    # block 0, which must stay a block that caches the text (Mllama: not a cross-attention block).
    fixed_first: str = ""
    # Lists of block numbers on the module holding the block list, copied from the config by its
    # __init__ (Mllama's `cross_attention_layers`): renumbered like index_lists on the model in memory.
    decoder_index_lists: tuple[str, ...] = ()
    # The norm applied after the last block: an attribute of the module holding the block list
    # (LFM2 calls it `embedding_norm`). Functional scans run it and the LM head on cached states.
    final_norm: str = "norm"
    # Why calibration cannot measure this family's blocks ("" = it can): refused before any pass
    # (Gemma 3n's blocks pass a stack of AltUp predictions); explicit plans need no calibration.
    calibration_refusal: str = ""

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

    # -- rules, as users see them ---------------------------------------------------------------
    def rules(self, config: Any = None) -> list[Rule]:
        """Every block-tied field this adapter rewrites or protects when blocks are removed, with
        its kind and why, derived from the fields above (`RULE_FIELDS` says how each reads). With
        a ``config`` (the root config of a model), rules on decoder config keys it lacks are left
        out. `compressor arch list` shows these; `compressor arch probe` proposes them."""
        return list(_rules_of(self, config))


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

# VLMs with block-tied rules (mllama, llama4, lfm2_vl, glm4v, glm4v_moe, glm46v, gemma3n):
_CROSS_ATTENTION = "a cross-attention block, where the image enters the decoder"

# LFM2 (text decoders group; lfm2_vl's decoder is the same): a hybrid whose `layer_types` mix
# short-convolution blocks ("conv": no self_attn, a `conv` mixer whose state the cache keeps per block)
# and "full_attention" blocks, which `full_attn_idxs` lists again by number (transformers 5 keeps both
# when both are given, as released configs do; 4.57 keeps only layer_types). Both mixers index the cache
# by `layer_idx`; transformers' cache reads the sequence length from an attention block.
_LFM2 = dict(
    per_layer_lists=("layer_types",),
    index_lists=("full_attn_idxs",),
    required_layer_type="full_attention",
    required_reason=(
        "transformers' cache reads the sequence length from a full-attention block, so a decoder of "
        "convolution blocks alone cannot generate with a cache"
    ),
    final_norm="embedding_norm",
    onnx="",
    onnx_refusal=(
        "LFM2's short-convolution blocks carry a convolution state from token to token, and compressor's ONNX "
        "decoder graphs pass only a KV cache"
    ),
)

# LLaVA-like VLMs (llava_next, llava_onevision, mistral3, internvl): an AutoModel decoder at
# model.language_model (4.57 and 5.x), saved in LLaVA's pre-4.52 layout, `language_model.model.layers.N`
# (each family's checkpoint conversion mapping, reversed on save). Where the decoder may be a Qwen2 or
# Qwen3 one (OneVision, InternVL3/3.5, LLaVA-NeXT 72B/110B) its `layer_types` and `max_window_layers`
# are rules as for qwen2; in a Llama or Mistral decoder they find nothing to rewrite (out of core,
# transformers then reads config.json: the JSON alone does not say the decoder lacks them).
_LLAVA_LIKE = dict(
    block_paths=("model.language_model.layers", "language_model.model.layers"),
    text_config_path="text_config",
    tensor_prefix="language_model.model.layers.{index}.",
    multimodal=True,
    onnx="",
)
_QWEN2_DECODER = dict(per_layer_lists=("layer_types",), index_fields=("max_window_layers",))
_ANYRES_ONNX = (
    "{name}'s image features depend on each image's size (anyres tiles chosen from image_grid_pinpoints, "
    "unpadded, with an image_newline after each row), computed in Python from image_sizes; the split ONNX "
    "vision graph takes whole images of one size and has no input for that"
)

# Llama 4 (Scout, Maverick): `no_rope_layers` (1 = RoPE, 0 = NoPE; generated from
# `no_rope_layer_interval` when absent) and `layer_types` (RoPE blocks attend in chunks of
# `attention_chunk_size`, NoPE blocks to everything) are selected by kept block; `moe_layers` (the
# blocks whose feed-forward is a mixture of experts with a shared expert, the others a dense MLP
# of `intermediate_size_mlp`; generated from `interleave_moe_layer_step` when absent) is
# renumbered. The interval and the step only generate those lists when a config lacks them; every
# saved config states the lists, which then win over the (stale) interval and step.
_LLAMA4 = dict(
    per_layer_lists=("layer_types", "no_rope_layers"),
    index_lists=("moe_layers",),
    transformers_module="llama4",
    onnx="",
    onnx_refusal=(
        "Llama 4's RoPE blocks attend in chunks (layer type chunked_attention) and its NoPE blocks scale attention by "
        "position; compressor's ONNX decoder graphs build causal and sliding-window masks only"
    ),
)

# GLM-4.1V / 4.5V / 4.6V: a GLM-4 decoder (extra post-attention and post-MLP norms) with M-RoPE
# positions from the processor's grid, image tokens in the sequence, no block-tied config field
# beyond the MoE variant's `first_k_dense_replace`. Saved as the module tree is laid out.
_GLM4V = dict(
    block_paths=("model.language_model.layers",),
    text_config_path="text_config",
    tensor_prefix="model.language_model.layers.{index}.",
    image_token_keys=("image_token_id",),
    multimodal=True,
    onnx="",
    onnx_refusal=(
        "GLM-4V's decoder rotates part of each head with M-RoPE sections, which the split exporter's TorchScript "
        "trace of the decoder graph refuses ('All tensors must have the same rank'); the MoE decoder traces, "
        "but its vision graph is traced for another patch grid than the processor makes of other images"
    ),
)

_GEMMA3N_NOTES = (
    "needs transformers >= 5.24 (measured): 4.57's Gemma 3n attention holds the absolute index of the block whose keys "
    "and values it reuses (`kv_shared_layer_index`), which no rule renumbers, and saves Gemma3nForCausalLM's decoder "
    "under model.language_model.* where 5.x saves it under model.*",
    "calibration is refused (AltUp's stacked hidden states); prune with an explicit list of blocks",
)
# Gemma 3n: as Gemma 4 (whose rules these are), per-layer embeddings [vocab, L·d] and their
# projection [L·d, hidden] with one slice of width `hidden_size_per_layer_input` per block, and the
# last `num_kv_shared_layers` blocks reusing the keys and values of the last earlier block of their
# type (sources fixed, the count recounted); besides `layer_types`, `intermediate_size` and
# `activation_sparsity_pattern` (top-k sparsity of the MLP's gate) have one entry per block. AltUp
# and LAuReL are modules of each block (and AltUp's projections, one per extra prediction, are not
# per block). No layer type is forced last (unlike Gemma 4).
_GEMMA3N = dict(
    per_layer_lists=("layer_types", "intermediate_size", "activation_sparsity_pattern"),
    tail_count_fields=("num_kv_shared_layers",),
    block_tensors=(
        BlockTensor(name="embed_tokens_per_layer.weight", axis=1, width_key="hidden_size_per_layer_input"),
        BlockTensor(name="per_layer_model_projection.weight", axis=0, width_key="hidden_size_per_layer_input"),
    ),
    kv_shared_key="num_kv_shared_layers",
    calibration_refusal=(
        "a Gemma 3n block takes and returns AltUp's stack of predictions of the hidden state ([altup_num_inputs, batch, "
        "tokens, hidden]), and the last block's stack is merged by AltUp's unembedding projections before the final norm; "
        "calibration would need a rule naming the prediction that carries the residual stream (`altup_active_idx`) for its "
        "hooks, and that merge for its functional scans"
    ),
    transformers_module="gemma3n",
    min_transformers="5.24",
    onnx="",
    onnx_refusal=(
        "Gemma 3n's decoder takes per-layer inputs (a second embedding table, looked up per token and fed to every block), "
        "keeps AltUp's several predictions of the hidden state between blocks and shares keys and values between blocks; "
        "the split ONNX decoder graph has none of these"
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
    Adapter(
        family="gemma2",
        architectures=("Gemma2ForCausalLM",),
        model_types=("gemma2",),
        # `layer_types` sliding/full, alternating from a sliding block 0 by default; released checkpoints
        # predate the field (transformers fills it in from the count), so their config.json is read by
        # transformers and the pruned one states it. Softcapping and query_pre_attn_scalar are global.
        per_layer_lists=("layer_types",),
        **_LLAMA_LIKE,
    ),
    Adapter(
        family="phi3",
        architectures=("Phi3ForCausalLM",),
        model_types=("phi3",),
        # Phi-3, Phi-3.5-mini, Phi-4 and Phi-4-mini: fused `qkv_proj` / `gate_up_proj` under the block prefix;
        # one `sliding_window` for every block and LongRoPE factors per rotary frequency: nothing per block.
        notes=(
            "Phi-3.5-MoE (phimoe), Phi-4-multimodal and remote-code variants (phi3small, phi4flash) are other families",
            "ONNX: LongRoPE models (Phi-3.5-mini, Phi-4-mini) are refused: their rotary frequencies follow the sequence length",
        ),
        **_LLAMA_LIKE,
    ),
    Adapter(
        family="mixtral",
        architectures=("MixtralForCausalLM",),
        model_types=("mixtral",),
        # A sparse MoE MLP in every block: no block kinds to keep. transformers 5 fuses the experts in
        # memory (`mlp.experts.gate_up_proj`) and saves them per expert as 4.x does
        # (`block_sparse_moe.experts.N.w1`), all under the block prefix: renamed like any block tensor.
        **_LLAMA_LIKE,
    ),
    Adapter(family="lfm2", architectures=("Lfm2ForCausalLM",), model_types=("lfm2",), **_LLAMA_LIKE, **_LFM2),
    # -- end of text decoders --
    # -- LLaVA-like VLMs: llava_next, llava_onevision, mistral3, internvl, smolvlm --
    Adapter(
        family="llava_next",
        architectures=("LlavaNextForConditionalGeneration",),
        model_types=("llava_next",),
        # Llama, Mistral (v1.6), Qwen2 (72B, 110B) decoders.
        image_token_keys=("image_token_id", "image_token_index"),
        onnx_refusal=_ANYRES_ONNX.format(name="LLaVA-NeXT"),
        **_LLAVA_LIKE,
        **_QWEN2_DECODER,
    ),
    Adapter(
        family="llava_onevision",
        architectures=("LlavaOnevisionForConditionalGeneration",),
        model_types=("llava_onevision",),
        # A Qwen2 decoder; the image features of the whole image come before the tiles'.
        image_token_keys=("image_token_id", "image_token_index"),
        onnx_refusal=_ANYRES_ONNX.format(name="LLaVA-OneVision"),
        **_LLAVA_LIKE,
        **_QWEN2_DECODER,
    ),
    Adapter(
        family="mistral3",
        architectures=("Mistral3ForConditionalGeneration",),
        model_types=("mistral3",),
        # Mistral (Small 3.x) or Ministral 3 decoders: no per-block config; the Pixtral tower's
        # `vision_feature_layer` counts vision blocks, not decoder blocks.
        image_token_keys=("image_token_id", "image_token_index"),
        onnx_refusal=(
            "Mistral3's Pixtral vision tower takes each image at its own size (image_sizes: the patches kept per image, "
            "their 2-D rotary positions and the patch merger's grid), and the split ONNX vision graph takes whole images "
            "without image_sizes"
        ),
        **_LLAVA_LIKE,
    ),
    Adapter(
        family="internvl",
        architectures=("InternVLForConditionalGeneration",),
        model_types=("internvl",),
        # InternVL3 decodes with Qwen2, InternVL3.5 with Qwen3 (both sliding-window configs as
        # qwen2's); pixel-shuffled tiles of one size: the split ONNX layout exports it.
        image_token_keys=("image_token_id",),
        **{**_LLAVA_LIKE, "onnx": "split"},
        **_QWEN2_DECODER,
    ),
    Adapter(
        family="smolvlm",
        architectures=("SmolVLMForConditionalGeneration",),
        model_types=("smolvlm",),
        # SmolVLM2: Idefics3's layout, a Llama decoder under text_model (no conversion mapping:
        # saved as laid out).
        block_paths=("model.text_model.layers",),
        text_config_path="text_config",
        tensor_prefix="model.text_model.layers.{index}.",
        image_token_keys=("image_token_id",),
        multimodal=True,
        onnx="split",
        onnx_vision="tiles",
        notes=(
            "SmolVLMProcessor needs the num2words package (in transformers 4.57 also torchvision); "
            "`prune --out-of-core --verify none` loads no processor",
        ),
    ),
    # -- end of LLaVA-like VLMs --
    # -- VLMs with block-tied rules: mllama, llama4, lfm2_vl, glm4v, glm4v_moe, glm46v, gemma3n --
    Adapter(
        family="mllama",
        architectures=("MllamaForConditionalGeneration",),
        model_types=("mllama",),
        # Llama 3.2 Vision: a Llama decoder whose `cross_attention_layers` are blocks of another
        # class (cross-attention to the vision states, tanh-gated): the image enters there, not as
        # tokens. They are fixed; the list is renumbered in the config and on the decoder module
        # (its __init__ copies it, and its loop reads it by position). The vision tower's own
        # `intermediate_layers_indices` count vision blocks and stay as they are.
        block_paths=("model.language_model.layers", "language_model.model.layers"),
        text_config_path="text_config",
        index_lists=("cross_attention_layers",),
        decoder_index_lists=("cross_attention_layers",),
        fixed_lists=(("cross_attention_layers", _CROSS_ATTENTION),),
        fixed_first=(
            "transformers' cache reads the cached length from block 0, and removing every block before the first "
            "cross-attention block would put that one first, which caches the image instead"
        ),
        # Saved in the pre-5 layout (the conversion mapping is reversed on save).
        tensor_prefix="language_model.model.layers.{index}.",
        # One `<|image|>` placeholder per image, where the text starts to read it.
        image_token_keys=("image_token_id", "image_token_index"),
        multimodal=True,
        onnx="",
        onnx_refusal=(
            "Mllama's image enters the decoder through cross-attention blocks (vision states as their keys and values), "
            "and the split ONNX decoder graph takes image features only as token embeddings"
        ),
        min_transformers="5.24",
        notes=(
            "needs transformers >= 5.24: earlier releases' MllamaProcessor refuses a batch that mixes samples with and "
            "without an image, as calibration and the export-time check build (measured on 4.57)",
            "the `<|image|>` placeholder stands for the image in calibration's image-token metrics",
        ),
    ),
    Adapter(
        family="llama4",
        architectures=("Llama4ForConditionalGeneration",),
        model_types=("llama4",),
        block_paths=("language_model.model.layers",),
        text_config_path="text_config",
        tensor_prefix="language_model.model.layers.{index}.",
        image_token_keys=("image_token_id", "image_token_index"),
        multimodal=True,
        notes=(
            "transformers 5.24's Llama4ForConditionalGeneration.forward fails on every call (it reads `image_outputs` off "
            "the language model's output, which has none), and the export-time check with it: prune with 4.57 or a fixed release",
        ),
        **_LLAMA4,
    ),
    Adapter(family="llama4_text", architectures=("Llama4ForCausalLM",), model_types=("llama4_text",), **_LLAMA_LIKE, **_LLAMA4),
    Adapter(
        family="lfm2_vl",
        architectures=("Lfm2VlForConditionalGeneration",),
        model_types=("lfm2_vl",),
        # LFM2-VL: the LFM2 decoder (its rules, shared with the text family) behind a SigLIP2 NaFlex
        # tower whose features replace the image tokens.
        block_paths=("model.language_model.layers",),
        text_config_path="text_config",
        tensor_prefix="model.language_model.layers.{index}.",
        image_token_keys=("image_token_id",),
        multimodal=True,
        min_transformers="5.24",
        notes=(
            "needs transformers >= 5.24 (measured): 4.57's Lfm2VlConfig names its model type 'lfm2-vl', which its "
            "AutoConfig does not map, so no saved LFM2-VL checkpoint loads there",
        ),
        **_LFM2,
    ),
    Adapter(family="glm4v", architectures=("Glm4vForConditionalGeneration",), model_types=("glm4v",), **_GLM4V),
    Adapter(
        family="glm4v_moe",
        architectures=("Glm4vMoeForConditionalGeneration",),
        model_types=("glm4v_moe",),
        # Blocks below `first_k_dense_replace` have a dense MLP, the others routed and shared experts:
        # the count of kept dense blocks, since kept blocks stay in order (dense ones first).
        index_fields=("first_k_dense_replace",),
        **_GLM4V,
    ),
    Adapter(
        family="glm46v",
        architectures=("Glm46VForConditionalGeneration",),
        model_types=("glm46v",),
        # The text config may be GLM-4.5V's MoE one (model_type glm4v_moe_text): then its dense blocks
        # are counted as in glm4v_moe; a dense text config has no such field, and the rule skips it.
        index_fields=("first_k_dense_replace",),
        min_transformers="5.0",
        **_GLM4V,
    ),
    Adapter(
        family="gemma3n",
        architectures=("Gemma3nForConditionalGeneration",),
        model_types=("gemma3n",),
        block_paths=("model.language_model.layers",),
        text_config_path="text_config",
        tensor_prefix="model.language_model.layers.{index}.",
        image_token_keys=("image_token_id",),
        multimodal=True,
        notes=(*_GEMMA3N_NOTES, "the vision tower (MobileNetV5) is built by timm: loading the model needs `pip install timm`"),
        **_GEMMA3N,
    ),
    Adapter(
        family="gemma3n_text",
        architectures=("Gemma3nForCausalLM",),
        model_types=("gemma3n_text",),
        notes=_GEMMA3N_NOTES,
        **_LLAMA_LIKE,
        **_GEMMA3N,
    ),
    # -- end of VLMs with block-tied rules --
)


def supported_families() -> list[str]:
    return [a.family for a in ADAPTERS]


# -- rules as data, shown to users ------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One block-tied thing an adapter rewrites or protects when blocks are removed: the field (a
    dotted config key from the root config, a tensor name, a module attribute or the on-disk name
    template of a block), the kind of rewrite (a `RuleField.kind`), why, and the `Adapter` field
    that states it."""

    field: str
    kind: str
    reason: str
    source: str


@dataclass(frozen=True)
class RuleField:
    """How the items of one `Adapter` field read as rules: their kind, where their names live
    (``config``: a decoder config key; ``root``: a dotted key from the root config; ``layer_types``:
    a rule over the decoder's layer_types; ``tensor``: a tensor of the module holding the block
    list; ``attribute``: a module attribute; ``disk``: the on-disk tensor names of a block), why
    (a function of the adapter and the item), and the name an item gives (a `StepRule`'s step,
    a `BlockTensor`'s name)."""

    kind: str
    where: str
    reason: Callable[[Adapter, Any], str]
    name: Callable[[Any], str] = str


def _said(text: str) -> Callable[[Adapter, Any], str]:
    return lambda adapter, item: text


# Every Adapter field that states a block-tied rule, in the order `arch list` shows them. A new rule
# field (added at the end of `Adapter`) gets one entry here, and `Adapter.rules`, `arch list` and
# `arch probe` show it; until then `rules()` lists it as kind "other" so that it is never hidden.
RULE_FIELDS: dict[str, RuleField] = {
    "count_key": RuleField("set count", "config", _said("the block count: set to the number of kept blocks")),
    "per_layer_lists": RuleField(
        "select per block", "config", _said("one entry per block: the kept blocks' entries are kept, in order (never truncated)")
    ),
    "index_fields": RuleField(
        "remap index", "config", _said("counts blocks from the start: set to the number of kept blocks below its value")
    ),
    "index_lists": RuleField("renumber index list", "config", _said("lists blocks by number: kept ones renumbered, removed ones dropped")),
    "step_rules": RuleField(
        "re-express step",
        "config",
        lambda a, rule: (
            f"block i builds {rule.kind} iff (i + 1) % {rule.step} == 0 and i is not in {rule.exceptions}: kept while it still "
            f"gives every kept block its kind, else restated as {rule.step} = 1 with the other blocks listed in {rule.exceptions}"
        ),
        name=lambda rule: rule.step,
    ),
    "layer_period_fields": RuleField(
        "recompute period",
        "config",
        _said("the period of layer_types (every p-th block full attention): recomputed from the kept layer_types, None when none fits"),
    ),
    "block_dicts": RuleField(
        "re-key dict", "config", _said("keyed by block index: the kept blocks' entries re-keyed to their new indices, the others dropped")
    ),
    "tail_count_fields": RuleField(
        "tail count", "config", _said("counts blocks from the end: set to the number of kept blocks among those last ones")
    ),
    "block_tensors": RuleField(
        "slice tensor",
        "tensor",
        lambda a, t: f"one slice of width config.{t.width_key} per block along axis {t.axis}: cut to the kept blocks' slices",
        name=lambda t: t.name,
    ),
    "decoder_index_attrs": RuleField(
        "remap attribute", "attribute", _said("an index the decoder computes from the config when built: remapped like an index field")
    ),
    "renumber_attrs": RuleField(
        "renumber attribute", "attribute", _said("a block's own index (the KV cache is indexed by it): set to 0..n-1 on the kept blocks")
    ),
    "tensor_prefix": RuleField(
        "rename tensors", "disk", _said("the on-disk names of block i's tensors: the kept blocks' renumbered, the others dropped")
    ),
    "fixed_leading_key": RuleField(
        "protect blocks", "root", lambda a, key: f"the first len(config.{key}) blocks cannot be removed: {a.fixed_reason}"
    ),
    "kv_shared_key": RuleField(
        "protect blocks",
        "config",
        lambda a, key: f"the last {key} blocks reuse the keys and values of an earlier block of their type: the sources cannot be removed",
    ),
    "last_layer_type": RuleField(
        "protect layer type",
        "layer_types",
        lambda a, kind: f"transformers forces the last block to {kind}: a plan must leave a {kind} block last",
    ),
    "required_layer_type": RuleField(
        "protect layer type", "layer_types", lambda a, kind: f"at least one {kind} block must stay: {a.required_reason}"
    ),
    "fixed_lists": RuleField(
        "protect blocks", "config", lambda a, entry: f"the blocks it lists cannot be removed: {entry[1]}", name=lambda entry: entry[0]
    ),
    "fixed_first": RuleField("protect blocks", "block", lambda a, why: f"block 0 cannot be removed: {why}", name=lambda why: "block 0"),
    "decoder_index_lists": RuleField(
        "renumber index list",
        "attribute",
        _said("a list of blocks the decoder copies from the config when built: renumbered like an index list"),
    ),
}
# Adapter fields that state no block-tied rule (identity, loading, ONNX, messages, and the texts
# that go with a rule above).
DESCRIPTIVE_FIELDS = frozenset(
    {
        "family", "architectures", "model_types", "block_paths", "text_config_path", "image_token_keys", "multimodal",
        "prefix_lm", "onnx", "onnx_refusal", "onnx_vision", "onnx_attention", "position_offset", "fixed_reason",
        "required_reason", "min_transformers", "transformers_module", "notes", "final_norm", "calibration_refusal",
    }
)  # fmt: skip


def _rules_of(adapter: Adapter, config: Any) -> Iterator[Rule]:
    text = adapter.text_config(config) if config is not None else None
    decoder = f"{adapter.text_config_path}.".lstrip(".")
    for attr, rule in RULE_FIELDS.items():
        value = getattr(adapter, attr)
        for item in ((value,) if value else ()) if isinstance(value, str) else tuple(value):
            name = rule.name(item)
            key = "layer_types" if rule.where == "layer_types" else name
            if text is not None and rule.where in ("config", "layer_types") and getattr(text, key, None) is None:
                continue  # this model's config has no such field
            shown = {"config": decoder + key, "layer_types": decoder + key, "disk": f"{name}*"}.get(rule.where, name)
            yield Rule(shown, rule.kind, rule.reason(adapter, item), attr)
    for spec in fields(adapter):  # a rule field nobody described yet: shown, never hidden
        value = getattr(adapter, spec.name)
        if spec.name not in RULE_FIELDS and spec.name not in DESCRIPTIVE_FIELDS and value and value != spec.default:
            yield Rule(spec.name, "other", f"Adapter.{spec.name} = {value!r} (no entry in architectures.RULE_FIELDS yet)", spec.name)


# -- adapters proposed by `compressor arch probe` ------------------------------------------------

# Adapters `arch_probe` proposed for families without a written one. `adapter_for_config` falls
# back to them only inside `probed_adapters` (`compressor prune --probe-adapter`, which makes the
# export-time proof mandatory); everywhere else an unknown family is refused.
_PROBED: ContextVar[tuple[Adapter, ...]] = ContextVar("probed_adapters", default=())


@contextmanager
def probed_adapters(*adapters: Adapter) -> Iterator[None]:
    """Let `adapter_for_config` find ``adapters`` (after every written one) inside this block."""
    token = _PROBED.set(_PROBED.get() + adapters)
    try:
        yield
    finally:
        _PROBED.reset(token)


def _matches(adapter: Adapter, names: list[str], model_type: Any) -> bool:
    return any(name in adapter.architectures for name in names) or (not names and model_type in adapter.model_types)


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
    for adapter in _PROBED.get():  # only inside `probed_adapters` (prune --probe-adapter)
        if _matches(adapter, names, model_type):
            return adapter
    shown = names[0] if names else f"model_type '{model_type}'"
    known = [arch for a in ADAPTERS for arch in a.architectures]
    close = difflib.get_close_matches(shown, known, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise UnsupportedArchitectureError(
        f"Architecture {shown} is not supported.{hint} Supported families: "
        + ", ".join(f"{a.family} ({', '.join(a.architectures)})" for a in ADAPTERS)
        + ".",
        fix="use a model of a supported family (see `compressor arch list`); or let compressor propose an adapter from the "
        "model's config and skeleton: `compressor arch probe MODEL` shows it, and `compressor prune MODEL --probe-adapter ...` "
        "uses it when every block-tied config field is classified and the export-time proof passes.",
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
