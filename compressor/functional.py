"""Functional redundancy: what the model's output does when blocks are skipped.

The geometric metrics of `calibrate` predict; these measure. Per calibration batch, one
forward pass in which only block 0 runs records every block's call arguments (masks, rotary
tables: they do not depend on the hidden states). A walk down the blocks then carries each
block's input h_i; skipping block ``i`` means resuming from h_i at block ``i + 1``, so blocks
before ``i`` never run again: a scan over all L blocks costs L + L(L-1)/2 block calls, (L+1)/2
forward passes instead of L + 1, and holds two hidden states, not L. The counts go into the
report (``cost``); `make bench` measures time and memory against a plain calibration.

- **Ablation scan**: per block, the increase of the loss (on answer tokens where the data has
  answers, else next-token loss on text tokens) and the mean KL(full || skipped) of the
  next-token distribution at those positions, when that block alone is skipped.
- **Greedy removal** (SLEB-style): skip the block whose removal raises the loss least,
  re-measure with it gone, repeat up to a budget; the order and losses are reported. Each
  step scans only the blocks the search may remove, and shares the walk's prefix up to the
  first removed block with the original model (the reference of its KL).
- **Visual attention ratio** per block (the Skip-It cross-modal condition): the share of
  attention that text tokens placed after an image give to image tokens, averaged over heads
  and those tokens. Needs attention weights: one extra forward pass with eager attention,
  which materialises a (batch, heads, tokens, tokens) tensor per block, reduced at once.

Scores are computed only at the scored positions (final norm and LM head on those rows).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import Adapter, _walk
from .data import Batch
from .errors import InputError


@dataclass
class Recording:
    """One batch's forward pass as far as replaying it from any block needs."""

    first: torch.Tensor  # the hidden state entering block 0
    second: torch.Tensor  # block 0's output (block 0 runs while recording)
    kwargs: list[dict[str, Any]]  # each block's call arguments besides the hidden state
    # What the model's loop adds to block i's output before block i + 1 takes it, for the blocks
    # the family fixes in place (`Adapter.fixed_blocks`: Qwen3-VL's DeepStack vision features).
    added: dict[int, torch.Tensor] = field(default_factory=dict)


class Head(nn.Module):
    """The part after the last block: final norm, LM head, and a final logit softcap where the
    family has one (Gemma2/3)."""

    def __init__(self, model: nn.Module, adapter: Adapter):
        super().__init__()
        self.norm = getattr(_walk(model, adapter.block_path(model).rpartition(".")[0]), adapter.final_norm)
        self.lm_head = model.get_output_embeddings()
        self.softcap = getattr(adapter.text_config(model.config), "final_logit_softcapping", None)
        self.vocab = self.lm_head.weight.shape[0]

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


class _Stop(Exception):
    """Ends the recording forward once the last block's arguments are known."""


def _arguments(args: tuple, kw: dict) -> tuple[torch.Tensor, dict[str, Any]]:
    """A block call's hidden state, and the rest of its arguments in the form `_call` takes."""
    hidden = args[0] if args else kw["hidden_states"]
    rest = {k: v for k, v in kw.items() if k != "hidden_states"}
    return hidden, {**rest, **({"__args__": args[1:]} if len(args) > 1 else {})}


def record(model: nn.Module, adapter: Adapter, batch: Batch) -> Recording:
    """Every block's call arguments, from one forward pass in which only block 0 runs.

    The model makes the blocks' arguments (masks, rotary tables, cache positions) before its
    block loop, whatever the hidden states are. So for this one forward, blocks 1.. are stood
    in for by functions that note their arguments and hand their input on, and the forward
    stops at the last of them: no block runs twice, and no LM head runs over every position.
    Block 0 runs for real: its output is the next hidden state anyway, and it shows the
    stand-ins what the model's loop expects back (a tensor, or a tuple led by one)."""
    blocks = adapter.blocks(model)
    kwargs: list[Any] = [None] * len(blocks)
    seen: dict[str, Any] = {}
    # A fixed block's output is copied as it leaves the block (the loop may add to it in place);
    # the next block's input less that copy is what the loop added.
    fixed = set(adapter.fixed_blocks(model.config))
    added: dict[int, torch.Tensor] = {}

    def note_added(index: int, hidden: torch.Tensor) -> None:
        if index - 1 in fixed:
            added[index - 1] = hidden - seen.pop("returned")

    def before_first(module: nn.Module, args: tuple, kw: dict) -> None:
        seen["first"], kwargs[0] = _arguments(args, kw)

    def after_first(module: nn.Module, args: tuple, kw: dict, output: Any) -> None:
        seen["output"] = output
        hidden = output[0] if isinstance(output, tuple) else output
        seen["raw"] = hidden.clone() if 0 in fixed else hidden
        if 0 in fixed:
            seen["returned"] = seen["raw"]
        if len(blocks) == 1:
            raise _Stop

    def stand_in(index: int, *args: Any, **kw: Any) -> Any:
        hidden, kwargs[index] = _arguments(args, kw)
        note_added(index, hidden)
        if index == len(blocks) - 1:
            raise _Stop
        if index in fixed:
            seen["returned"] = hidden.clone()
        output = seen["output"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    # An accelerate device map keeps its own wrapper in the instance's `forward`: put it back.
    saved = [vars(block).get("forward") for block in blocks]
    handles = [
        blocks[0].register_forward_pre_hook(before_first, with_kwargs=True),
        blocks[0].register_forward_hook(after_first, with_kwargs=True),
    ]
    try:
        for index in range(1, len(blocks)):
            blocks[index].forward = partial(stand_in, index)
        model(**batch.inputs, use_cache=False)
    except _Stop:
        pass
    else:
        raise RuntimeError("the forward pass never reached the last decoder block")
    finally:
        for handle in handles:
            handle.remove()
        for block, forward in zip(blocks, saved):
            if forward is None:
                vars(block).pop("forward", None)
            else:
                block.forward = forward
    return Recording(seen["first"], seen["raw"], kwargs, added)


def _call(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    extra = kwargs.get("__args__", ())
    out = block(hidden, *extra, **{k: v for k, v in kwargs.items() if k != "__args__"})
    return out[0] if isinstance(out, tuple) else out


@dataclass
class Sums:
    """Streaming sums over batches of a scan's loss and KL per candidate block, and what the
    scan cost: block calls (a forward pass is one per block per batch) and LM-head rows."""

    num_blocks: int
    tokens: int = 0
    base_loss: float = 0.0
    loss: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    batches: int = 0
    block_calls: int = 0
    head_rows: int = 0
    held_bytes: int = 0  # the most hidden-state bytes one batch's scan held at once (in this process)

    def __post_init__(self) -> None:
        self.loss = self.loss or [0.0] * self.num_blocks
        self.kl = self.kl or [0.0] * self.num_blocks

    def reduce(self, all_reduce: Callable[[torch.Tensor], None]) -> None:
        """Add up every process's sums (data-parallel calibration)."""
        counts = [self.tokens, self.batches, self.block_calls, self.head_rows]
        flat = torch.tensor([*counts, self.base_loss, *self.loss, *self.kl], dtype=torch.float64)
        all_reduce(flat)
        values = flat.tolist()
        self.tokens, self.batches, self.block_calls, self.head_rows = (int(round(v)) for v in values[:4])
        self.base_loss = values[4]
        self.loss, self.kl = values[5 : 5 + self.num_blocks], values[5 + self.num_blocks :]

    def add_cost(self, other: Sums) -> None:
        """Count another scan over the same batches (a greedy step) into this one's cost."""
        self.batches = other.batches
        self.block_calls += other.block_calls
        self.head_rows += other.head_rows
        self.held_bytes = max(self.held_bytes, other.held_bytes)

    def cost(self) -> dict[str, Any]:
        """What the scan ran, per batch and in forward-pass equivalents (block calls over the L
        of one forward pass), so that one process and many give the same figures."""
        per_batch = self.block_calls / max(self.batches, 1)
        return {
            "block_calls_per_batch": round(per_batch, 3),
            "forward_equivalents": round(per_batch / self.num_blocks, 3),
            "head_rows": self.head_rows,
        }


# Rows per LM-head chunk: about this many logits at once, however big the vocabulary.
HEAD_ELEMENTS = 1 << 24


def _chunks(rows: int, vocab: int) -> Iterator[slice]:
    step = max(1, HEAD_ELEMENTS // vocab)
    return (slice(start, start + step) for start in range(0, rows, step))


def scan(
    model: nn.Module,
    adapter: Adapter,
    head: Head,
    batch: Batch,
    sums: Sums,
    *,
    removed: frozenset[int] = frozenset(),
    candidates: Iterable[int] | None = None,
    watch: Stopwatch | None = None,
    label: str = "scan",
) -> None:
    """Add one batch: the loss of the model with ``removed`` skipped, and for every block of
    ``candidates`` (default: all others) the loss and KL(original || skipped) with it skipped too.

    One walk down the blocks carries the input of block i of the model with ``removed`` gone;
    skipping candidate i resumes from it at block i + 1, so blocks before i never run again
    (sum over i of L - 1 - i block calls, ≈ L/2 forward passes, plus the walk's L). The
    original model, the reference of every KL, is the walk itself when nothing is removed, else
    the walk up to the first removed block and its own run from there. Held at once: the
    walk's hidden state, one replay's, and per candidate its last hidden state at the scored
    positions only; the final norm, LM head and log-softmax run at the end, on those rows."""
    blocks = adapter.blocks(model)
    watch = watch or Stopwatch()
    candidates = {i for i in (range(len(blocks)) if candidates is None else candidates) if i not in removed}
    first_removed = min(removed, default=None)
    rows, targets = scored_positions(batch, adapter.image_token_id(model.config))
    with watch.time(f"{label}_forward"):
        recording = record(model, adapter, batch)
    sums.block_calls += 1  # block 0, run while recording
    first, second, kwargs, added = recording.first, recording.second, recording.kwargs, recording.added
    del recording  # its hidden states go as soon as the walk is past them
    if 0 in added:  # block 0 always runs first: its output as block 1 takes it
        second = second + added.pop(0)

    def step(index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block ``index`` on ``hidden``, plus what the model adds after it (fixed blocks only,
        never removed: their index is their position); block 0's output is recorded."""
        if index == 0:
            out = second
        else:
            sums.block_calls += 1
            out = _call(blocks[index], hidden, kwargs[index])
        return out + added[index] if index in added else out

    def run(start: int, hidden: torch.Tensor, skip: frozenset[int]) -> torch.Tensor:
        for index in range(start, len(blocks)):
            if index not in skip:
                hidden = step(index, hidden)
        return hidden

    def at_rows(hidden: torch.Tensor) -> torch.Tensor:
        return hidden[rows[:, 0], rows[:, 1]]

    finals: dict[int, torch.Tensor] = {}  # candidate -> its last hidden state at the scored rows
    reference = None  # the original model's, when ``removed`` makes the walk another model
    hidden = first
    for index in range(len(blocks)):
        if index == first_removed:
            with watch.time(f"{label}_forward"):
                reference = at_rows(run(index, hidden, frozenset()))
        if index in candidates:
            with watch.time(f"{label}_replay"):
                finals[index] = at_rows(run(index + 1, hidden, removed))
        if index not in removed:
            with watch.time(f"{label}_forward"):
                hidden = step(index, hidden)
        live = [t for t in (hidden, first, second, reference, *finals.values()) if t is not None]
        sums.held_bytes = max(sums.held_bytes, _nbytes(live))
        del live
        first = second = None  # past block 0, the walk holds all that is still needed
    base = at_rows(hidden)
    del hidden
    with watch.time(f"{label}_replay"):
        sums.head_rows += len(rows) * (len(candidates) + 1 + (reference is not None))
        # The original's log-probabilities, kept for every KL; the rest is reduced chunk by chunk.
        full = None
        for part in _chunks(len(rows), head.vocab):
            logp = F.log_softmax(head((base if reference is None else reference)[part]), dim=-1)
            full = logp.new_empty(len(rows), logp.shape[1]) if full is None else full
            full[part] = logp
            if reference is None:
                sums.base_loss += float(F.nll_loss(logp, targets[part], reduction="sum"))
        if reference is not None:
            sums.base_loss += _loss_and_kl(head, base, targets, full)[0]
        sums.tokens += len(rows)
        for index in candidates:
            loss, kl = _loss_and_kl(head, finals.pop(index), targets, full)
            sums.loss[index] += loss
            sums.kl[index] += kl
    sums.batches += 1


def _nbytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _loss_and_kl(head: Head, hidden: torch.Tensor, targets: torch.Tensor, full: torch.Tensor | None) -> tuple[float, float]:
    """Summed loss and summed KL(original || this) over the scored rows ``hidden``; ``full``
    holds the original's log-probabilities there."""
    loss = kl = 0.0
    for part in _chunks(len(hidden), head.vocab):
        logp = F.log_softmax(head(hidden[part]), dim=-1)
        loss += float(F.nll_loss(logp, targets[part], reduction="sum"))
        kl += float(F.kl_div(logp, full[part], log_target=True, reduction="sum"))
    return loss, kl


def ablation_results(sums: Sums, candidates: Iterable[int]) -> dict[str, Any]:
    n = max(sums.tokens, 1)
    base = sums.base_loss / n
    measured = set(candidates)
    return {
        "base_loss": base,
        "tokens": sums.tokens,
        "loss_increase": [sums.loss[i] / n - base if i in measured else None for i in range(sums.num_blocks)],
        "kl": [sums.kl[i] / n if i in measured else None for i in range(sums.num_blocks)],
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
            if attention is None:  # a linear-attention block (Qwen3.5's Gated DeltaNet) forms no
                continue  # attention weights: its ratio stays None, as for a block no query reached
            handles.append(attention.register_forward_hook(lambda m, a, o, i=index: ratio.hook(i, o)))
        if not handles:
            raise RuntimeError("no block has a self_attn module")
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
def greedy_steps(num_blocks: int, greedy: int, fraction: float, keep: tuple[int, ...]) -> tuple[int, set[int]]:
    """(steps, kept blocks) of a greedy order; an order that would remove every block, or a
    kept one, is refused (calibration asks before its first pass)."""
    # Blocks a recipe protects are never candidates: the order is then the one the recipe can use.
    kept = {i % num_blocks for i in keep if -num_blocks <= i < num_blocks}
    removable = min(num_blocks - 1, num_blocks - len(kept))  # never every block
    steps = max(greedy, round(fraction * num_blocks))
    if steps > removable:
        raise InputError(
            f"A greedy order of {steps} blocks was asked for, but the model has {num_blocks} blocks"
            + (f" ({len(kept)} of them kept)" if kept else "")
            + ".",
            fix=f"use --greedy {removable} or less.",
        )
    return steps, kept


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

    from .calibrate import check_calibratable
    from .data import build_batch

    check_calibratable(adapter)
    samples = [s for chunk in chunks for s in chunk]
    num_blocks = len(adapter.blocks(model))
    head = Head(model, adapter)
    watch = Stopwatch()
    out: dict[str, Any] = {}

    def batches() -> Iterator[Batch]:
        for chunk in chunks:
            yield build_batch(processor, chunk, with_answer=True, max_length=max_length).to(device)

    def scan_all(removed: list[int], candidates: list[int], label: str) -> tuple[dict[str, Any], Sums]:
        sums = Sums(num_blocks)
        for batch in tqdm(batches(), total=len(chunks), desc=label, unit="batch", disable=not progress):
            scan(model, adapter, head, batch, sums, removed=frozenset(removed), candidates=candidates, watch=watch, label=label)
        if all_reduce is not None:
            sums.reduce(all_reduce)
        return ablation_results(sums, candidates), sums

    # Blocks the family fixes in place (`Adapter.fixed_blocks`) are never candidates: removing one
    # is not an option, and replaying the blocks after it would miss what the model adds there.
    fixed = set(adapter.fixed_blocks(model.config))
    greedy, keep = greedy_steps(num_blocks, greedy, greedy_fraction, tuple(sorted({*greedy_keep, *fixed})))
    first = None
    if ablation:
        first = scan_all([], [i for i in range(num_blocks) if i not in fixed], "ablation")
        result, sums = first
        out["ablation_loss"] = {"all": result["loss_increase"]}
        out["ablation_kl"] = {"all": result["kl"]}
        out["ablation"] = {
            "base_loss": result["base_loss"],
            "tokens": result["tokens"],
            "scored": _scored_kind(samples),
            "cost": sums.cost(),
        }
    if greedy:
        removed: list[int] = []
        steps = []
        cost = Sums(num_blocks)  # every scan the order took, counted together
        for step in range(greedy):
            candidates = [i for i in range(num_blocks) if i not in removed and i not in keep]
            # The first step is the ablation scan where one ran; else a scan of the candidates only.
            result, sums = first if step == 0 and first is not None else scan_all(removed, candidates, "greedy")
            cost.add_cost(sums)
            if step == 0:
                base_loss = result["base_loss"]  # the original model's
            # Least harmful first; KL breaks exact ties (e.g. when the loss is saturated).
            pick = min(candidates, key=lambda i: (result["loss_increase"][i], result["kl"][i]))
            removed.append(pick)
            steps.append({"block": pick, "loss": result["base_loss"] + result["loss_increase"][pick], "kl": result["kl"][pick]})
        out["greedy"] = {"base_loss": base_loss, "order": removed, "steps": steps, "kept": sorted(keep), "cost": cost.cost()}
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
