"""One greedy generation with run-time visual-token options: the entry point of `compressor.runtime`.

`generate` resolves the options against the model, runs the guide where SGL needs it (its answer,
confidence, attention ranking, and the consistency check of the early exit), ranks the image tokens,
builds the per-block `Participation` and decodes with the KV cache. The returned `Generation` says
what ran: tokens and logits, whether the large model was skipped, and per block how many prompt
positions and image tokens took part (`flops.estimate_flops` turns that into a cost).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..architectures import Adapter, adapter_for_model
from .decode import Decoded, greedy
from .options import Guide, Resolved, RuntimeOptions, resolve
from .participation import Participation, build, image_positions
from .ranking import guide_scores, random_scores, self_scores, top


@dataclass(frozen=True)
class GuideRun:
    """What the guide did: its answer, its confidence, and the early-exit verdict. Its cost is its
    plain generation (``participation``: every position), plus one forward pass over prompt and
    answer for the ranking and, when checked, one generation with ``consistency_keep`` of the image
    tokens from block 0 on."""

    decoded: Decoded
    participation: Participation
    confidence: float
    consistent: bool | None  # None: not checked (no early exit asked, or confidence below it)


@dataclass(frozen=True)
class Generation:
    tokens: torch.Tensor  # (new,) the answer's token ids
    logits: torch.Tensor  # (new, vocab) the logits each was chosen from
    skipped: bool  # SGL early exit: the answer is the guide's, the large model did not run
    image_tokens: int  # image tokens in the prompt
    kept_per_block: tuple[int, ...]  # image tokens that took part in each block of the large model
    participation: Participation  # of the large model (every block's positions when skipped: it did not run)
    guide: GuideRun | None = None

    @property
    def prompt_tokens_per_block(self) -> tuple[int, ...]:
        """Prompt positions each block of the large model processed (0 for all when it was skipped)."""
        return tuple(0 for _ in self.participation.sets) if self.skipped else tuple(self.participation.prompt_tokens())

    @property
    def guide_confidence(self) -> float | None:
        return None if self.guide is None else self.guide.confidence


def generate(
    model: nn.Module,
    processor: object,
    inputs: dict[str, torch.Tensor],
    options: RuntimeOptions | None = None,
    *,
    guide: Guide | None = None,
    max_new_tokens: int = 32,
) -> Generation:
    """Greedy answer of ``model`` to ``inputs`` (one prompt, as the processor builds it:
    `compressor.data.build_batch(processor, [sample], with_answer=False).inputs`) under ``options``.

    Without anything that acts on image tokens (keep 1.0, no band, no early exit) this is the
    model's plain greedy ``generate``, bit for bit (also the default: ``options=None``)."""
    options = options or RuntimeOptions()
    adapter = adapter_for_model(model)
    resolved = resolve(options, model, processor, adapter, inputs, guide=guide)
    images = image_positions(inputs["input_ids"], adapter.image_token_id(model.config))
    length = inputs["input_ids"].shape[1]
    guide_run, guide_ranking = None, None
    if guide is not None:  # `resolve` refused a guide that nothing uses
        ranks = resolved.cut is not None and options.ranking == "guide"
        guide_run, guide_ranking = _run_guide(guide, inputs, images, options, max_new_tokens, rank=ranks)
        if guide_run.consistent:
            return Generation(
                tokens=guide_run.decoded.tokens,
                logits=guide_run.decoded.logits,
                skipped=True,
                image_tokens=len(images),
                kept_per_block=(0,) * resolved.num_blocks,
                participation=Participation.everything(length, resolved.num_blocks),
                guide=guide_run,
            )
    participation, kept = plan(model, adapter, inputs, images, resolved, guide_ranking)
    decoded = greedy(model, adapter, inputs, participation, max_new_tokens=max_new_tokens)
    return Generation(
        tokens=decoded.tokens,
        logits=decoded.logits,
        skipped=False,
        image_tokens=len(images),
        kept_per_block=kept,
        participation=participation,
        guide=guide_run,
    )


def plan(
    model: nn.Module,
    adapter: Adapter,
    inputs: dict[str, torch.Tensor],
    images: torch.Tensor,
    resolved: Resolved,
    guide_ranking: torch.Tensor | None = None,
) -> tuple[Participation, tuple[int, ...]]:
    """The per-block participation of ``resolved`` options, and the image tokens kept per block.

    Block i takes every text position and the image tokens that are inside the band (if any) and,
    from the cut on, among the best-ranked ``keep`` share (ranked before anything else runs: by the
    guide, by this model's attention at the block before the cut, or at random)."""
    options, length = resolved.options, inputs["input_ids"].shape[1]
    band_sets = [
        images if resolved.band is None or resolved.band[0] <= i <= resolved.band[1] else images[:0] for i in range(resolved.num_blocks)
    ]
    allowed = list(band_sets)
    if resolved.cut is not None and len(images):
        if options.ranking == "guide":
            scores = guide_ranking
        elif options.ranking == "self":
            before = build(length, images, band_sets)
            scores = self_scores(model, adapter, inputs, before, resolved.cut, images, options.self_queries)
        else:
            scores = random_scores(len(images), options.seed)
        kept = top(images, scores, options.keep)
        for i in range(resolved.cut, resolved.num_blocks):
            allowed[i] = allowed[i][torch.isin(allowed[i], kept)]
    return build(length, images, allowed), tuple(len(a) for a in allowed)


def _run_guide(
    guide: Guide,
    inputs: dict[str, torch.Tensor],
    images: torch.Tensor,
    options: RuntimeOptions,
    max_new_tokens: int,
    *,
    rank: bool,
) -> tuple[GuideRun, torch.Tensor | None]:
    """The guide's plain answer and its SGL ranking of the image tokens (when ``rank``, or when the
    consistency check needs it: the ranking is a second, eager pass over prompt and answer); with
    an early-exit threshold that its confidence reaches, the consistency check: the guide pruned
    at block 0 to its own top ``consistency_keep`` image tokens must give the same answer tokens."""
    adapter = adapter_for_model(guide.model)
    num_blocks = len(adapter.blocks(guide.model))
    length = inputs["input_ids"].shape[1]
    plain = Participation.everything(length, num_blocks)
    decoded = greedy(guide.model, adapter, inputs, plain, max_new_tokens=max_new_tokens)
    confidence = decoded.confidence
    confident = options.early_exit is not None and confidence >= options.early_exit
    scores = guide_scores(guide.model, adapter, inputs, decoded.tokens, images) if rank or confident else None
    consistent = None
    if confident:
        kept = top(images, scores, options.consistency_keep)
        pruned = build(length, images, [kept] * num_blocks)
        check = greedy(guide.model, adapter, inputs, pruned, max_new_tokens=max_new_tokens)
        consistent = torch.equal(check.tokens, decoded.tokens)
    return GuideRun(decoded, plain, confidence, consistent), scores
