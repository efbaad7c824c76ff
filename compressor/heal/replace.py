"""Replacing a span of blocks by ONE trained block (LLM-Streamline, Chen et al., ICLR 2025).

Owns the training of the stand-in: a copy of the span's LAST block (same architecture, so the
checkpoint stays a plain one of the family with n − 1 fewer blocks), trained to map the hidden
state entering the span's first block to the one leaving its last block, with MSE or 1 − cosine
per real token. Why the last block: fed the span's input, it computes exactly what the model
with the span's first n − 1 blocks removed computes there — the plain removal that training has
to beat, and the "before" figure the manifest states.

Streamed: per batch, the ORIGINAL model runs under no_grad up to the span's last block (a hook
stops it there, so nothing after the span runs), hooks keep the span's input, the last block's
call arguments (masks, rotary tables: what the stand-in is called with in that place) and the
span's output; the stand-in trains on them and they are dropped. No hidden states of the whole
data set are ever held. The optimizer (AdamW, warm-up) and the seeded micro-batch order are
healing's own (`loop.make_optimizer`, `loop._samples`): the same seed gives the same weights.

A seeded share of the samples is held out: the mapping's MSE and cosine distance there, before
and after training, go into the manifest and card (`ReplaceResult.record`). When training does
not lower the held-out loss, the initial weights (the plain removal) are kept and that is said.

`replace_span` leaves the model untouched (the stand-in is a copy); `install` puts the trained
weights into the kept block after `surgery.apply_plan` removed the rest of the span.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import Adapter
from ..data import Batch, Sample, build_batch
from ..errors import InputError
from ..functional import _arguments, _call
from ..planner import SurgeryPlan
from .loop import _samples, make_optimizer

log = logging.getLogger(__name__)

LOSSES = ("mse", "cosine")


@dataclass(frozen=True)
class ReplaceOptions:
    """The training knobs (a recipe's ``select.train``)."""

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    seed: int = 0
    loss: str = "mse"
    held_out: float = 0.25
    max_length: int | None = 512
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.loss not in LOSSES:
            problems.append(f"loss '{self.loss}' is not one of {', '.join(LOSSES)}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            problems.append(f"lr must be positive (got {self.lr})")
        if not 0 < self.held_out < 1:
            problems.append(f"held_out is a share of the samples, 0 < x < 1 (got {self.held_out})")
        if problems:
            raise InputError("select.train: " + "; ".join(problems) + ".", fix="correct select.train in the recipe.")

    @classmethod
    def from_recipe(cls, training: Any) -> ReplaceOptions:
        """From a recipe's `recipe.ReplaceTraining`."""
        return cls(**training.model_dump())


@dataclass
class ReplaceResult:
    """The trained stand-in and how well it maps the span (held-out figures, per real token)."""

    block: int  # original numbering: the span's last block, kept in the span's place
    span: tuple[int, ...]
    state: dict[str, torch.Tensor] = field(repr=False)  # the stand-in's weights (CPU, the model's dtype)
    options: ReplaceOptions
    held_out: dict[str, dict[str, float]]  # {"mse": {"before", "after"}, "cosine": {...}}
    curve: list[float]  # training loss per step
    train_samples: int
    held_out_samples: int
    seconds: float
    improved: bool  # False: training did not lower the held-out loss, and the initial weights were kept

    def record(self) -> dict[str, Any]:
        """The manifest's ``replacement`` entry."""
        return {
            "block": self.block,
            "span": list(self.span),
            "initialised_from": self.block,
            "objective": f"{self.options.loss} between the stand-in's output and block {self.span[-1]}'s, "
            f"given block {self.span[0]}'s input (original model, real tokens)",
            "options": {k: getattr(self.options, k) for k in ("steps", "lr", "batch_size", "seed", "loss", "held_out", "max_length")},
            "train_samples": self.train_samples,
            "held_out_samples": self.held_out_samples,
            "held_out": self.held_out,
            "improved": self.improved,
            "seconds": self.seconds,
            "curve": [round(v, 6) for v in self.curve],
        }

    def describe(self) -> str:
        key = self.options.loss
        before, after = self.held_out[key]["before"], self.held_out[key]["after"]
        text = (
            f"replaced blocks {self.span[0]}..{self.span[-1]} by one block (initialised from block {self.block}), "
            f"{len(self.curve)} steps: held-out {key} {before:.4g} -> {after:.4g}"
        )
        return text + ("" if self.improved else " (no improvement: the initial weights were kept)")


class _Stop(Exception):
    """Ends the original model's forward once the span's output is known."""


@dataclass
class _Captured:
    entering: torch.Tensor  # the hidden state entering the span's first block
    leaving: torch.Tensor  # ... and leaving its last block
    kwargs: dict[str, Any]  # the last block's call arguments besides its hidden state
    mask: torch.Tensor  # (batch, tokens) bool: real tokens


@torch.no_grad()
def capture(model: nn.Module, adapter: Adapter, batch: Batch, start: int, last: int) -> _Captured:
    """One batch through the original ``model`` up to block ``last``: the span's input, output and
    the last block's arguments (a sliding-window block gets its own mask: the stand-in takes its place)."""
    blocks = adapter.blocks(model)
    seen: dict[str, Any] = {}

    def entering(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["entering"] = _arguments(args, kwargs)[0].detach().clone()

    def arguments(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["kwargs"] = _arguments(args, kwargs)[1]

    def leaving(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        seen["leaving"] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        raise _Stop

    handles = [
        blocks[start].register_forward_pre_hook(entering, with_kwargs=True),
        blocks[last].register_forward_pre_hook(arguments, with_kwargs=True),
        blocks[last].register_forward_hook(leaving, with_kwargs=True),
    ]
    try:
        model(**batch.inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if "leaving" not in seen:
        raise RuntimeError(f"the forward pass never reached block {last}")
    return _Captured(seen["entering"], seen["leaving"], seen["kwargs"], batch.inputs["attention_mask"].bool())


def _float(value: Any) -> Any:
    """The stand-in trains in float32 whatever the model's dtype: its floating arguments too."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_float(v) for v in value)
    if isinstance(value, list):
        return [_float(v) for v in value]
    if isinstance(value, dict):
        return {k: _float(v) for k, v in value.items()}
    return value


def _distances(block: nn.Module, captured: _Captured) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum of squared errors per element / hidden size, sum of 1 − cosine, real tokens) on one batch:
    sums, so that batches of any size add up to per-token means."""
    out = _call(block, _float(captured.entering), _float(captured.kwargs))
    mine, target = out[captured.mask].float(), captured.leaving[captured.mask].float()
    squared = F.mse_loss(mine, target, reduction="none").mean(-1).sum()
    cosine = (1 - F.cosine_similarity(mine, target, dim=-1)).sum()
    return squared, cosine, int(captured.mask.sum())


def _held_out(block: nn.Module, batches: Sequence[Batch], model: nn.Module, adapter: Adapter, start: int, last: int) -> dict[str, float]:
    squared = cosine = 0.0
    tokens = 0
    with torch.no_grad():
        for batch in batches:
            s, c, t = _distances(block, capture(model, adapter, batch, start, last))
            squared, cosine, tokens = squared + float(s), cosine + float(c), tokens + t
    return {"mse": squared / max(1, tokens), "cosine": cosine / max(1, tokens)}


def split(samples: list[Sample], options: ReplaceOptions) -> tuple[list[Sample], list[Sample]]:
    """(train, held out), seeded; at least one sample on each side."""
    if len(samples) < 2:
        raise InputError(
            f"op replace trains its block on the calibration samples and measures it on a held-out share: {len(samples)} sample "
            "is too few.",
            fix="give calibration data with at least 2 samples (more: the figures the card states come from the held-out share).",
        )
    held = min(len(samples) - 1, max(1, round(len(samples) * options.held_out)))
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(options.seed)).tolist()
    return [samples[i] for i in sorted(order[held:])], [samples[i] for i in sorted(order[:held])]


def replace_span(
    model: nn.Module,
    processor: Any,
    adapter: Adapter,
    samples: list[Sample],
    *,
    start: int,
    n: int,
    options: ReplaceOptions | None = None,
) -> ReplaceResult:
    """Train one block to stand in for blocks ``start .. start + n − 1`` of ``model`` (unchanged;
    the stand-in is a copy of block ``start + n − 1``) on ``samples``; see the module docstring."""
    options = options or ReplaceOptions()
    blocks = adapter.blocks(model)
    last = start + n - 1
    if not (n >= 2 and 0 <= start and last < len(blocks)):
        raise InputError(f"replace_span: blocks {start}..{last} are not a span of 2 or more of the model's {len(blocks)} blocks.",
                         fix="give 0 <= start and start + n <= the block count, n >= 2.")  # fmt: skip
    train, held = split(samples, options)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    torch.manual_seed(options.seed)
    stand_in = copy.deepcopy(blocks[last]).float()
    stand_in.eval()  # no dropout: the same seed gives the same weights
    stand_in.requires_grad_(True)
    parameters = [p for p in stand_in.parameters()]
    initial = {k: v.detach().clone() for k, v in stand_in.state_dict().items()}
    # Warm-up capped at a tenth of the run: a short run would otherwise spend its steps warming up.
    optimizer, schedule = make_optimizer(
        parameters, lr=options.lr, weight_decay=options.weight_decay, warmup_steps=min(options.warmup_steps, options.steps // 10)
    )

    def batch_of(chosen: list[Sample]) -> Batch:
        return build_batch(processor, chosen, with_answer=True, max_length=options.max_length).to(device)

    held_batches = [batch_of(held[i : i + options.batch_size]) for i in range(0, len(held), options.batch_size)]
    measure = partial(_held_out, batches=held_batches, model=model, adapter=adapter, start=start, last=last)
    started = time.perf_counter()
    before = measure(stand_in)
    curve = []
    try:
        for step in range(options.steps):
            captured = capture(model, adapter, batch_of(_samples(train, options, step)), start, last)  # type: ignore[arg-type]
            squared, cosine, tokens = _distances(stand_in, captured)
            loss = (squared if options.loss == "mse" else cosine) / max(1, tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if options.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(parameters, options.max_grad_norm)
            optimizer.step()
            schedule.step()
            curve.append(float(loss.detach()))
            del captured
        after = measure(stand_in)
    finally:
        model.train(was_training)
    improved = after[options.loss] < before[options.loss]
    if not improved:
        log.warning("training the replacement block did not lower its held-out %s: keeping its initial weights", options.loss)
        stand_in.load_state_dict(initial)
        after = dict(before)
    dtype = next(blocks[last].parameters()).dtype
    state = {k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype) for k, v in stand_in.state_dict().items()}
    return ReplaceResult(
        block=last,
        span=tuple(range(start, last + 1)),
        state=state,
        options=options,
        held_out={key: {"before": before[key], "after": after[key]} for key in before},
        curve=curve,
        train_samples=len(train),
        held_out_samples=len(held),
        seconds=round(time.perf_counter() - started, 2),
        improved=improved,
    )


def install(model: nn.Module, adapter: Adapter, plan: SurgeryPlan, result: ReplaceResult) -> None:
    """Load the trained weights into the kept block ``result.block`` of the pruned ``model``."""
    position = plan.kept.index(result.block)
    adapter.blocks(model)[position].load_state_dict(result.state, strict=True)
