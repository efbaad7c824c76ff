"""Functional redundancy: what the model's output does when blocks are skipped.

The geometric metrics of `calibrate` predict; these measure. For each calibration batch one
ordinary forward pass records every block's input hidden state and call arguments (masks,
rotary tables — they do not depend on the hidden states). Skipping block ``i`` then means
resuming from block ``i``'s recorded input at block ``i + 1``: blocks before ``i`` are not
run again, so a scan over all L blocks costs sum(L - 1 - i) = L(L-1)/2 block passes, about
L/2 forward passes instead of L (`make bench-quality` measures the ratio).

- **Ablation scan**: per block, the increase of the loss (on answer tokens where the data has
  answers, else next-token loss on text tokens) and the mean KL(full || skipped) of the
  next-token distribution at those positions, when that block alone is skipped.
- **Greedy removal** (SLEB-style): skip the block whose removal raises the loss least,
  re-measure with it gone, repeat up to a budget; the order and losses are reported.
- **Visual attention ratio** per block (the Skip-It cross-modal condition): the share of
  attention that text tokens placed after an image give to image tokens, averaged over heads
  and those tokens. Needs attention weights: one extra forward pass with eager attention,
  which materialises a (batch, heads, tokens, tokens) tensor per block, reduced at once.

Scores are computed only at the scored positions (final norm and LM head on those rows).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import Adapter, _walk
from .data import Batch
from .errors import InputError


@dataclass
class Trace:
    """One batch's forward pass, replayable from any block."""

    inputs: list[torch.Tensor]  # hidden state entering each block (of the model with `skip` removed)
    kwargs: list[dict[str, Any]]  # each block's call arguments besides the hidden state
    positions: torch.Tensor  # (N, 2) batch/position rows whose next token is scored
    targets: torch.Tensor  # (N,) the scored next tokens
    full_logits: torch.Tensor  # (N, V) the original model's logits there: the reference of every KL
    logits: torch.Tensor  # (N, V) the logits of the model with `skip` removed
    skip: frozenset[int] = frozenset()


class Head(nn.Module):
    """The part after the last block: final norm, LM head, and a final logit softcap where the
    family has one (Gemma2/3)."""

    def __init__(self, model: nn.Module, adapter: Adapter):
        super().__init__()
        self.norm = _walk(model, adapter.block_path(model).rpartition(".")[0]).norm
        self.lm_head = model.get_output_embeddings()
        self.softcap = getattr(adapter.text_config(model.config), "final_logit_softcapping", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden)).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def scored_positions(batch: Batch, image_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, targets): positions whose next token is scored, and those tokens."""
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"].bool()
    if batch.answer_mask.any():
        predicts = batch.answer_mask[:, 1:]
    else:
        predicts = mask[:, :-1] & mask[:, 1:]
        if image_token_id is not None:
            predicts &= ids[:, 1:] != image_token_id  # image placeholders are not text to predict
    rows = predicts.nonzero()
    return rows, ids[rows[:, 0], rows[:, 1] + 1]


@contextmanager
def _recording(blocks: nn.ModuleList, inputs: list, kwargs: list, last: list) -> Iterator[None]:
    def before(index: int, module: nn.Module, args: tuple, kw: dict) -> None:
        inputs[index] = args[0] if args else kw["hidden_states"]
        rest = {k: v for k, v in kw.items() if k != "hidden_states"}
        kwargs[index] = {**rest, **({"__args__": args[1:]} if len(args) > 1 else {})}

    handles = [b.register_forward_pre_hook(lambda m, a, k, i=i: before(i, m, a, k), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(lambda m, a, o: last.append(o[0] if isinstance(o, tuple) else o)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def trace(model: nn.Module, adapter: Adapter, head: Head, batch: Batch, skip: frozenset[int] = frozenset()) -> Trace:
    """Run ``batch`` once through the model, recording every block's input and arguments.

    With ``skip``, the recorded inputs are then replayed to be those of the model with those
    blocks removed (the call arguments do not depend on hidden states, so they carry over)."""
    blocks = adapter.blocks(model)
    inputs: list[Any] = [None] * len(blocks)
    kwargs: list[Any] = [None] * len(blocks)
    last: list[torch.Tensor] = []
    with _recording(blocks, inputs, kwargs, last):
        model(**batch.inputs, use_cache=False)
    rows, targets = scored_positions(batch, adapter.image_token_id(model.config))
    full = head(last[-1][rows[:, 0], rows[:, 1]])
    t = Trace(inputs, kwargs, rows, targets, full_logits=full, logits=full, skip=frozenset(skip))
    if skip:
        hidden, t.inputs = inputs[0], []
        for index in range(len(blocks)):
            t.inputs.append(hidden)  # a skipped block's input is what the next block receives
            if index not in skip:
                hidden = _call(blocks[index], hidden, kwargs[index])
        t.logits = head(hidden[rows[:, 0], rows[:, 1]])
    return t


def _call(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    extra = kwargs.get("__args__", ())
    out = block(hidden, *extra, **{k: v for k, v in kwargs.items() if k != "__args__"})
    return out[0] if isinstance(out, tuple) else out


def replay(blocks: nn.ModuleList, t: Trace, start: int, skip: frozenset[int], hidden: torch.Tensor) -> torch.Tensor:
    """The last block's output when ``hidden`` enters at block ``start``, skipping ``skip``."""
    for index in range(start, len(blocks)):
        if index not in skip:
            hidden = _call(blocks[index], hidden, t.kwargs[index])
    return hidden


def _loss_and_kl(logits: torch.Tensor, t: Trace) -> tuple[float, float]:
    """Summed loss and summed KL(original || this) over the scored positions."""
    logp = F.log_softmax(logits, dim=-1)
    full = F.log_softmax(t.full_logits, dim=-1)
    loss = F.nll_loss(logp, t.targets, reduction="sum")
    kl = F.kl_div(logp, full, log_target=True, reduction="sum")
    return float(loss), float(kl)


@dataclass
class Sums:
    """Streaming sums over batches of the scan's loss and KL per candidate block."""

    num_blocks: int
    tokens: int = 0
    base_loss: float = 0.0
    loss: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.loss = self.loss or [0.0] * self.num_blocks
        self.kl = self.kl or [0.0] * self.num_blocks

    def reduce(self, all_reduce: Callable[[torch.Tensor], None]) -> None:
        """Add up every process's sums (data-parallel calibration)."""
        flat = torch.tensor([self.tokens, self.base_loss, *self.loss, *self.kl], dtype=torch.float64)
        all_reduce(flat)
        values = flat.tolist()
        self.tokens, self.base_loss = int(round(values[0])), values[1]
        self.loss, self.kl = values[2 : 2 + self.num_blocks], values[2 + self.num_blocks :]


def scan(model: nn.Module, adapter: Adapter, head: Head, t: Trace, sums: Sums) -> None:
    """Add one batch: for every block not in ``t.skip``, the loss and KL with it skipped too."""
    blocks = adapter.blocks(model)
    skip = t.skip
    rows = t.positions
    base, _ = _loss_and_kl(t.logits, t)
    sums.base_loss += base
    sums.tokens += len(rows)
    for index in range(len(blocks)):
        if index in skip:
            continue
        # Resume at the next block from this block's input: what skipping it means.
        hidden = replay(blocks, t, index + 1, skip | {index}, t.inputs[index])
        loss, kl = _loss_and_kl(head(hidden[rows[:, 0], rows[:, 1]]), t)
        sums.loss[index] += loss
        sums.kl[index] += kl


def ablation_results(sums: Sums, skip: frozenset[int] = frozenset()) -> dict[str, Any]:
    n = max(sums.tokens, 1)
    base = sums.base_loss / n
    return {
        "base_loss": base,
        "tokens": sums.tokens,
        "loss_increase": [None if i in skip else sums.loss[i] / n - base for i in range(sums.num_blocks)],
        "kl": [None if i in skip else sums.kl[i] / n for i in range(sums.num_blocks)],
    }


# -- visual attention -----------------------------------------------------------------------
class AttentionRatio:
    """Per block: mean over heads and text-after-image queries of the attention on image keys."""

    def __init__(self, num_blocks: int):
        self.sums = torch.zeros(num_blocks, dtype=torch.float64)
        self.counts = torch.zeros(num_blocks, dtype=torch.float64)
        self.queries: torch.Tensor | None = None  # (B, T) bool
        self.keys: torch.Tensor | None = None  # (B, T) bool

    def start_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> None:
        image = (input_ids == image_token_id) & attention_mask.bool()
        seen_image = image.long().cumsum(dim=1) > 0
        self.keys = image
        self.queries = attention_mask.bool() & ~image & seen_image

    def hook(self, index: int, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("the attention module returned no weights")
        on_image = (weights.float() * self.keys[:, None, None, :].to(weights.device)).sum(-1).mean(1)  # (B, T)
        queries = self.queries.to(weights.device)
        self.sums[index] += float(on_image[queries].sum())
        self.counts[index] += float(queries.sum())

    def results(self) -> list[float | None]:
        return [float(s / c) if c > 0 else None for s, c in zip(self.sums, self.counts)]


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Attention weights exist only with eager attention (SDPA and flash never form them)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextmanager
def attention_hooks(blocks: nn.ModuleList, ratio: AttentionRatio) -> Iterator[None]:
    handles = []
    try:
        for index, block in enumerate(blocks):
            attention = getattr(block, "self_attn", None)
            if attention is None:
                raise RuntimeError(f"block {index} has no self_attn module")
            handles.append(attention.register_forward_hook(lambda m, a, o, i=index: ratio.hook(i, o)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class Stopwatch:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


# -- the passes over the calibration data ---------------------------------------------------
def measure(
    model: nn.Module,
    processor: Any,
    adapter: Adapter,
    chunks: list[list[Any]],
    *,
    device: torch.device,
    max_length: int | None,
    ablation: bool,
    greedy: int,
    attention: bool,
    greedy_fraction: float = 0.0,
    greedy_keep: tuple[int, ...] = (),
    all_reduce: Callable[[torch.Tensor], None] | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Run the requested functional measurements (inside calibration's no-grad, eval context)
    over the batches ``chunks`` (lists of samples, as calibration planned them).

    With ``all_reduce`` (data-parallel calibration: sums a float64 vector over the processes),
    every scan's sums are added up over the processes before anything is decided from them, so
    every process picks the same greedy order. Returns report metrics (``ablation_loss`` /
    ``ablation_kl`` / ``visual_attention`` as one value per block under modality ``all``,
    ``greedy`` as order and losses) and timings."""
    from tqdm.auto import tqdm

    from .data import build_batch

    samples = [s for chunk in chunks for s in chunk]
    num_blocks = len(adapter.blocks(model))
    head = Head(model, adapter)
    watch = Stopwatch()
    out: dict[str, Any] = {}

    def batches() -> Iterator[Batch]:
        for chunk in chunks:
            yield build_batch(processor, chunk, with_answer=True, max_length=max_length).to(device)

    def scan_all(skip: frozenset[int], label: str) -> dict[str, Any]:
        sums = Sums(num_blocks)
        # Timed apart: the recording forward pass, and the replays of the scan (the ratio of
        # the two is the scan's cost in forward passes).
        for batch in tqdm(batches(), total=len(chunks), desc=label, unit="batch", disable=not progress):
            with watch.time(f"{label}_forward"):
                t = trace(model, adapter, head, batch, skip)
            with watch.time(f"{label}_replay"):
                scan(model, adapter, head, t, sums)
        if all_reduce is not None:
            sums.reduce(all_reduce)
        return ablation_results(sums, skip)

    first = None
    if ablation or greedy:
        first = scan_all(frozenset(), "ablation")
        if ablation:
            out["ablation_loss"] = {"all": first["loss_increase"]}
            out["ablation_kl"] = {"all": first["kl"]}
            out["ablation"] = {"base_loss": first["base_loss"], "tokens": first["tokens"], "scored": _scored_kind(samples)}
    # Blocks a recipe protects are never candidates: the order is then the one the recipe can use.
    keep = {i % num_blocks for i in greedy_keep if -num_blocks <= i < num_blocks}
    removable = min(num_blocks - 1, num_blocks - len(keep))  # never every block
    greedy = max(greedy, round(greedy_fraction * num_blocks))
    if greedy:
        if greedy > removable:
            raise InputError(
                f"A greedy order of {greedy} blocks was asked for, but the model has {num_blocks} blocks"
                + (f" ({len(keep)} of them kept)" if keep else "")
                + ".",
                fix=f"use --greedy {removable} or less.",
            )
        removed: list[int] = []
        steps = []
        result = first  # the first greedy step is the ablation scan
        for step in range(greedy):
            if step:
                result = scan_all(frozenset(removed), "greedy")
            candidates = [i for i in range(num_blocks) if i not in removed and i not in keep]
            # Least harmful first; KL breaks exact ties (e.g. when the loss is saturated).
            pick = min(candidates, key=lambda i: (result["loss_increase"][i], result["kl"][i]))
            removed.append(pick)
            steps.append({"block": pick, "loss": result["base_loss"] + result["loss_increase"][pick], "kl": result["kl"][pick]})
        out["greedy"] = {"base_loss": first["base_loss"], "order": removed, "steps": steps, "kept": sorted(keep)}
    if attention:
        image_token_id = adapter.image_token_id(model.config)
        if image_token_id is None:
            out["visual_attention"] = {"all": [None] * num_blocks}
        else:
            ratio = AttentionRatio(num_blocks)
            with watch.time("attention"), eager_attention(model), attention_hooks(adapter.blocks(model), ratio):
                for batch in batches():
                    ratio.start_batch(batch.inputs["input_ids"], batch.inputs["attention_mask"], image_token_id)
                    model(**batch.inputs, use_cache=False)
            if all_reduce is not None:
                all_reduce(ratio.sums)
                all_reduce(ratio.counts)
            out["visual_attention"] = {"all": ratio.results()}
    timings = {f"{k}_s": round(v, 4) for k, v in watch.seconds.items()}
    return out, timings


def _scored_kind(samples: list[Any]) -> str:
    return "answer tokens" if any(getattr(s, "answer", None) for s in samples) else "next text tokens"
