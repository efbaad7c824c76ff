"""What a run-time generation does to image tokens (`RuntimeOptions`), and every check of those
options against a model and a guide, with the fix in each message.

Block indices are 0-based in the model's numbering; negative ones count from the end and are
normalised once, here (`resolve`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ..architectures import Adapter, adapter_for_model
from ..data import tokenizer_of
from ..errors import InputError

Ranking = Literal["guide", "self", "random"]
RANKINGS = ("guide", "self", "random")


@dataclass(frozen=True)
class RuntimeOptions:
    """How image tokens take part in the decoder during one greedy generation.

    keep: share of image tokens that take part from the cut on, in (0, 1]; the ceil(keep·n)
        best-ranked ones are kept. 1.0 prunes nothing.
    cut / depth: the first pruned block, as an index or as a fraction of the depth in [0, 1)
        (block ⌊depth·L⌋); give one of them when keep < 1.
    ranking: "guide" (SGL: the guide's attention over all its layers), "self" (FastV: this model's
        attention at the block before the cut), or "random" (seeded by ``seed``).
    self_queries: for "self", whose attention ranks: the last prompt token's, or every text token's.
    band: Skip-It: image tokens take part only in blocks band[0]..band[1] (inclusive).
    early_exit: SGL: return the guide's answer, skipping this model, when the guide's confidence is
        at least this and its answer is consistent (the same with only its top ``consistency_keep``
        image tokens). None: never.
    """

    keep: float = 1.0
    cut: int | None = None
    depth: float | None = None
    ranking: Ranking = "self"
    self_queries: Literal["last", "text"] = "text"
    seed: int = 0
    band: tuple[int, int] | None = None
    early_exit: float | None = None
    consistency_keep: float = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise InputError(f"keep = {self.keep!r}: the share of image tokens kept must lie in (0, 1].", fix="use e.g. keep=0.5.")
        if self.ranking not in RANKINGS:
            raise InputError(f"ranking = {self.ranking!r} is not a ranking.", fix=f"use one of {', '.join(RANKINGS)}.")
        if self.self_queries not in ("last", "text"):
            raise InputError(f"self_queries = {self.self_queries!r}.", fix="use 'last' (the last prompt token) or 'text'.")
        if self.cut is not None and self.depth is not None:
            raise InputError("Both cut and depth were given; they say the same thing.", fix="give one of them.")
        if self.depth is not None and not 0 <= self.depth < 1:
            raise InputError(f"depth = {self.depth!r} must lie in [0, 1).", fix="use e.g. depth=0.25 (a quarter of the way down).")
        if self.keep < 1 and self.cut is None and self.depth is None:
            raise InputError(
                f"keep = {self.keep} prunes image tokens, but no block to prune at was given.", fix="give cut=BLOCK or depth=FRACTION."
            )
        if self.band is not None and (len(self.band) != 2 or self.band[0] is None or self.band[1] is None):
            raise InputError(f"band = {self.band!r} must be two block indices (first, last).", fix="use e.g. band=(1, 4).")
        if self.early_exit is not None and not 0 < self.early_exit <= 1:
            raise InputError(
                f"early_exit = {self.early_exit!r}: a confidence threshold lies in (0, 1].", fix="use e.g. early_exit=0.9, or None."
            )
        if not 0 < self.consistency_keep <= 1:
            raise InputError(f"consistency_keep = {self.consistency_keep!r} must lie in (0, 1].", fix="use the SGL default 0.05.")

    @property
    def visual(self) -> bool:
        """Whether these options do anything to image tokens (or need a guide)."""
        return self.keep < 1 or self.band is not None or self.early_exit is not None


@dataclass(frozen=True)
class Guide:
    """SGL's small guide VLM (in our use, the pruned checkpoint of the large model) and its processor."""

    model: nn.Module
    processor: Any


@dataclass(frozen=True)
class Resolved:
    """Options with blocks normalised against one model: cut (None when nothing is pruned) and band
    as non-negative indices."""

    options: RuntimeOptions
    num_blocks: int
    cut: int | None
    band: tuple[int, int] | None


def _block(value: int, num_blocks: int, name: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -num_blocks <= value < num_blocks:
        raise InputError(
            f"{name} = {value!r} is not a block of this model, which has {num_blocks} (0..{num_blocks - 1}, or negative from the end).",
            fix=fix,
        )
    return value % num_blocks


def resolve(
    options: RuntimeOptions, model: nn.Module, processor: Any, adapter: Adapter, inputs: dict[str, Any], *, guide: Guide | None = None
) -> Resolved:
    """Check ``options`` against ``model`` (its depth, modality, attention), the inputs (one row)
    and the guide; every refusal names the option and the fix."""
    num_blocks = len(adapter.blocks(model))
    ids = inputs.get("input_ids")
    if ids is None or ids.dim() != 2:
        raise InputError(
            "The inputs hold no input_ids of shape (1, tokens).", fix="build them with the model's processor (compressor.data.build_batch)."
        )
    if ids.shape[0] != 1:
        raise InputError(
            f"The inputs hold a batch of {ids.shape[0]} rows; run-time token pruning generates one prompt at a time "
            "(rows keep different image tokens, so a padded batch would need ragged caches).",
            fix="call generate once per prompt.",
        )
    if options.visual and adapter.image_token_id(model.config) is None:
        raise InputError(
            f"{adapter.family} is a text-only model: keep < 1, band, and early_exit act on image tokens.",
            fix="use a vision-language model, or leave keep=1.0, band=None and early_exit=None.",
        )
    cut = math.floor(options.depth * num_blocks) if options.depth is not None else None
    if options.cut is not None:
        cut = _block(options.cut, num_blocks, "cut", f"use a block in 0..{num_blocks - 1}, or depth=FRACTION.")
    if options.keep == 1:  # nothing is pruned: no block is the cut
        cut = None
    band = None
    if options.band is not None:
        fix = f"give band=(first, last) with 0 <= first <= last <= {num_blocks - 1}."
        first, last = (_block(b, num_blocks, "band", fix) for b in options.band)
        if first > last:
            raise InputError(f"band = {options.band}: its first block {first} comes after its last {last} (an empty band).", fix=fix)
        band = (first, last)
    if cut is not None and options.ranking == "self":
        if cut == 0:
            raise InputError(
                "ranking 'self' reads the attention of the block before the cut, and cut is block 0.",
                fix="use cut >= 1, or ranking 'guide' / 'random'.",
            )
        if band is not None and not band[0] <= cut - 1 <= band[1]:
            raise InputError(
                f"ranking 'self' reads the attention image tokens receive in block {cut - 1}, "
                f"outside the band {band} where they take part.",
                fix=f"put the cut in {band[0] + 1}..{band[1] + 1}, or use ranking 'guide' / 'random'.",
            )
    needs_guide = options.early_exit is not None or (cut is not None and options.ranking == "guide")
    if needs_guide and guide is None:
        what = "early_exit" if options.early_exit is not None else "ranking 'guide'"
        raise InputError(
            f"{what} needs a guide model (SGL), and none was given.", fix="pass guide=Guide(model, processor) (e.g. the pruned checkpoint)."
        )
    if guide is not None and not needs_guide:
        raise InputError(
            "A guide was given, but nothing uses it: it ranks image tokens for ranking 'guide' with keep < 1, and decides early_exit.",
            fix="set ranking='guide' with keep < 1 and a cut, or early_exit, or pass no guide.",
        )
    if needs_guide:
        _check_guide(model, processor, adapter, guide)
    if cut is not None or band is not None:
        _check_blocks(model, adapter)
    if options.early_exit is not None:  # the consistency check prunes the guide
        _check_blocks(guide.model, adapter_for_model(guide.model))
    return Resolved(options, num_blocks, cut, band)


def _check_blocks(model: nn.Module, adapter: Adapter) -> None:
    """Token participation slices the attention mask and runs attention over a subset: it needs
    attention in every block, an implementation that takes a dense mask, and blocks that take no
    other per-token input and keep their own keys and values."""
    if adapter.block_tensors or adapter.kv_shared_key:
        raise InputError(
            f"{adapter.family}'s decoder blocks take per-layer inputs per token and share keys and values between blocks; "
            "run-time token pruning cuts neither.",
            fix="use another family for keep < 1, band or early_exit (llava, qwen2_vl, qwen2_5_vl, qwen3_vl, idefics3, gemma3, paligemma).",
        )
    implementation = adapter.text_config(model.config)._attn_implementation
    if implementation not in ("eager", "sdpa"):
        raise InputError(
            f"The model runs attention with '{implementation}'; run-time token pruning cuts the dense attention mask "
            "of eager or SDPA attention.",
            fix="load the model with attn_implementation='sdpa' (or 'eager').",
        )
    for index, block in enumerate(adapter.blocks(model)):
        if getattr(block, "self_attn", None) is None:
            raise InputError(
                f"Block {index} of this {adapter.family} model has no self-attention (a linear-attention block carries a recurrent "
                "state from token to token), so tokens cannot be left out of it.",
                fix="use a model whose decoder blocks all use attention, or no visual-token options.",
            )


def _check_guide(model: nn.Module, processor: Any, adapter: Adapter, guide: Guide) -> None:
    """SGL reads the guide's attention over the same inputs: same family, vocabulary and image token."""
    guide_adapter = adapter_for_model(guide.model)
    if guide_adapter.family != adapter.family:
        raise InputError(
            f"The guide is a {guide_adapter.family} model and this one a {adapter.family} model; the guide must read the same inputs.",
            fix="use a guide of the same family, tokenizer and image processing (e.g. this model's pruned checkpoint).",
        )
    ours, theirs = adapter.image_token_id(model.config), guide_adapter.image_token_id(guide.model.config)
    if ours != theirs:
        raise InputError(f"The guide's image token id is {theirs}, this model's {ours}.", fix="use a guide with this model's processor.")
    if tokenizer_of(guide.processor).get_vocab() != tokenizer_of(processor).get_vocab():
        raise InputError("The guide's tokenizer has another vocabulary than this model's.", fix="use a guide with this model's tokenizer.")
