"""Calibration: one forward pass per batch, hooks on the decoder blocks, streaming metrics.

Functional measurements (skip-one ablation, greedy removal, visual attention) are optional
extra passes, owned by `functional`; their results join the same report.

Hooks see each block's input and output hidden states. Every metric is reduced inside the
hook to per-block partial sums and counts (per modality: image tokens, text tokens, all
tokens), so memory does not grow with the number of samples; only the inputs of the last
`max_span` blocks are held, for the angular distance of spans. Hooks are always removed,
and calibration runs without gradients, without a KV cache, in eval mode.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from . import metrics
from .architectures import Adapter
from .block_limits import BlockLimits
from .calibration_report import METRICS, MODALITIES, REPORT_FORMAT, CalibrationReport  # noqa: F401 - re-exported
from .data import Sample, build_batch, plan_batches
from .distributed import Group
from .errors import UnsupportedArchitectureError
from .loading import input_device
from .provenance import environment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationOptions:
    num_samples: int | None = 128
    batch_size: int = 8
    max_length: int | None = 512
    epsilons: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1)
    max_span: int = 4
    # Functional measurements (functional.py), off by default: they cost extra passes.
    ablation: bool = False  # skip-one scan: loss increase and KL per block (~L/2 forward passes)
    greedy: int = 0  # SLEB-style greedy removal order up to this many blocks (~L/2 passes each)
    greedy_fraction: float = 0.0  # ... or up to this fraction of the blocks (whichever is more)
    greedy_keep: tuple[int, ...] = ()  # blocks the greedy search never removes (negatives count from the end)

    attention: bool = False  # visual attention ratio per block (one eager-attention pass)
    # Batches packed by length to at most this many (padded) tokens each, instead of
    # `batch_size` samples in file order (which stays the limit on rows).
    token_budget: int | None = None

    @property
    def functional(self) -> bool:
        return self.ablation or self.greedy > 0 or self.greedy_fraction > 0 or self.attention


class _MetricHooks:
    """Forward hooks on every block; reduce each block's metrics as the pass goes.

    Every metric is a mean over tokens (or adjacent token pairs) of one modality, so a block
    keeps only sums: per block, one small float64 table (series × modality) that lives on the
    block's own device (blocks spread by a device map included) and is added to with one
    matrix product per batch — no host synchronisation inside the pass. Token and pair counts
    are the same for every block and series, so they are counted once per batch. `reduce`
    all-reduces everything for data-parallel calibration; `results` divides.
    """

    def __init__(self, num_blocks: int, options: CalibrationOptions):
        self.num_blocks = num_blocks
        self.options = options
        self.max_span = min(options.max_span, num_blocks)
        # Token series per block: influence, one tail indicator per epsilon, then the angular
        # distance of the spans of 1..max_span blocks that END at this block.
        self.epsilons = tuple(options.epsilons)
        self.series = 1 + len(self.epsilons) + self.max_span
        self.token_sums: list[torch.Tensor | None] = [None] * num_blocks  # (series, modality)
        self.pair_sums: list[torch.Tensor | None] = [None] * num_blocks  # (1, modality): adjacent distance
        self.token_counts = torch.zeros(len(MODALITIES), dtype=torch.float64)
        self.pair_counts = torch.zeros(len(MODALITIES), dtype=torch.float64)
        self._masks: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._batch_masks: tuple[torch.Tensor, torch.Tensor] | None = None
        self._shape: tuple[int, int] = (0, 0)
        self._inputs: dict[int, torch.Tensor] = {}
        self._last_output: tuple[torch.Tensor, torch.Tensor] | None = None

    def start_batch(self, masks: dict[str, torch.Tensor]) -> None:
        tokens = torch.stack([masks[m] for m in MODALITIES]).flatten(1).float()  # (modality, B·T)
        pairs = torch.stack([metrics.adjacent_pairs(masks[m]) for m in MODALITIES]).flatten(1).float()
        self._batch_masks = (tokens, pairs)  # on the input device; copied to each block's device once
        self._masks = {}
        self._shape = tuple(masks["all"].shape)
        self.token_counts += tokens.sum(dim=1).double().cpu()
        self.pair_counts += pairs.sum(dim=1).double().cpu()
        self._inputs.clear()
        self._last_output = None

    def _masks_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._masks:
            assert self._batch_masks is not None
            self._masks[device] = tuple(m.to(device, non_blocking=True) for m in self._batch_masks)
        return self._masks[device]

    def before(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if tuple(hidden.shape[:2]) != self._shape:
            raise UnsupportedArchitectureError(
                f"Block {index} sees {hidden.shape[1]} positions but the inputs have "
                f"{self._shape[1]} tokens, so tokens cannot be split by modality.",
                fix="this family merges image features differently; its adapter needs a token map.",
            )
        # Normalised once, compared with up to max_span outputs; a block's input is usually the
        # previous block's output tensor itself, already normalised in `after`.
        last = self._last_output
        self._inputs[index] = last[1] if last is not None and last[0] is hidden else metrics.unit(hidden)
        self._last_output = None
        # Only the last `max_span` inputs are needed for span distances ending later.
        self._inputs.pop(index - self.max_span, None)

    def after(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        h_out = output[0] if isinstance(output, tuple) else output
        device = h_out.device
        token_masks, pair_masks = self._masks_on(device)
        u_out = metrics.unit(h_out)
        self._last_output = (h_out, u_out)
        # The definitions of metrics.py, on unit vectors: 1 - cos, and arccos(cos) / pi.
        cosines = [metrics.unit_cosine(self._inputs[index + 1 - n].to(device), u_out) for n in range(1, min(self.max_span, index + 1) + 1)]
        distance = 1.0 - cosines[0]
        rows = [distance, *(metrics.tail_indicator(distance, e) for e in self.epsilons)]
        rows += [torch.arccos(c) / math.pi for c in cosines]
        rows += [torch.zeros_like(distance)] * (self.max_span - len(cosines))  # spans that would start before block 0
        values = torch.stack(rows).flatten(1)  # (series, B·T), float32
        token_sums = (values @ token_masks.T).double()  # (series, modality)
        adjacent = 1.0 - metrics.unit_cosine(u_out[:, :-1], u_out[:, 1:])
        pair_sums = (adjacent.flatten()[None] @ pair_masks.T).double()
        if self.token_sums[index] is None:
            self.token_sums[index], self.pair_sums[index] = token_sums, pair_sums
        else:
            self.token_sums[index] += token_sums
            self.pair_sums[index] += pair_sums

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every block's sums on the CPU: (block, series, modality) and (block, modality)."""
        zeros = torch.zeros(self.series, len(MODALITIES), dtype=torch.float64)
        tokens = torch.stack([zeros if t is None else t.cpu() for t in self.token_sums])
        pairs = torch.stack([zeros[:1] if p is None else p.cpu() for p in self.pair_sums])[:, 0]
        return tokens, pairs

    def reduce(self, all_reduce: Any) -> None:
        """Sum every partial sum and count over the processes (``all_reduce`` sums a CPU
        float64 vector in place across ranks)."""
        tokens, pairs = self._tables()
        flat = torch.cat([tokens.flatten(), pairs.flatten(), self.token_counts, self.pair_counts])
        all_reduce(flat)
        sizes = [tokens.numel(), pairs.numel(), len(MODALITIES), len(MODALITIES)]
        t, p, self.token_counts, self.pair_counts = flat.split(sizes)
        t, p = t.view_as(tokens), p.view_as(pairs)
        self.token_sums = list(t.unbind(0))
        self.pair_sums = [row[None] for row in p.unbind(0)]

    def results(self) -> dict[str, Any]:
        tokens, pairs = self._tables()

        def means(sums: torch.Tensor, counts: torch.Tensor) -> dict[str, list[float | None]]:
            """``sums``: (rows, modality) → {modality: [mean per row]}."""
            return {
                m: [float(sums[r, j] / counts[j]) if counts[j] > 0 else None for r in range(sums.shape[0])]
                for j, m in enumerate(MODALITIES)
            }

        influence = means(tokens[:, 0], self.token_counts)
        tail = {str(e): means(tokens[:, 1 + k], self.token_counts) for k, e in enumerate(self.epsilons)}
        spans = {}
        for n in range(1, self.max_span + 1):
            # Stored at the span's last block; reported by its first (start = end - n + 1).
            spans[str(n)] = means(tokens[n - 1 :, 1 + len(self.epsilons) + n - 1], self.token_counts)
        return {
            "block_influence": influence,
            "tail_probability": tail,
            "adjacent_distance": means(pairs, self.pair_counts),
            "angular_distance": spans,
        }


@contextmanager
def calibration_context(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd; the previous training mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


@contextmanager
def attached(hooks: _MetricHooks, blocks: nn.ModuleList) -> Iterator[None]:
    """Register the hooks on every block; remove them however the block exits."""
    handles = []
    try:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(lambda m, a, k, i=index: hooks.before(i, m, a, k), with_kwargs=True))
            handles.append(block.register_forward_hook(lambda m, a, k, o, i=index: hooks.after(i, m, a, k, o), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def modality_masks(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int | None) -> dict[str, torch.Tensor]:
    valid = attention_mask.bool()
    image = valid & (input_ids == image_token_id) if image_token_id is not None else torch.zeros_like(valid)
    return {"all": valid, "text": valid & ~image, "image": image}


def check_calibratable(adapter: Adapter) -> None:
    """Refuse, before any pass, a family whose blocks the hooks cannot measure (`Adapter.calibration_refusal`)."""
    if adapter.calibration_refusal:
        raise UnsupportedArchitectureError(
            f"'{adapter.family}' models cannot be calibrated: {adapter.calibration_refusal}.",
            fix="prune with an explicit list of blocks (select: {op: explicit, blocks: [...]}): surgery and its "
            "export-time check need no calibration.",
        )


def calibrate(
    model: nn.Module,
    processor: Any,
    adapter: Adapter,
    samples: list[Sample],
    *,
    options: CalibrationOptions = CalibrationOptions(),
    model_ref: str | None = None,
    data_info: dict[str, Any] | None = None,
    progress: bool = False,
    group: Group | None = None,
) -> CalibrationReport:
    """Measure every redundancy metric for every block of ``model`` over ``samples``.

    With a distributed ``group`` (data-parallel calibration), this process measures its shard
    of ``samples`` and the partial sums of all processes are added up: every process returns
    the report of the whole data set."""
    from tqdm.auto import tqdm

    from .functional import greedy_steps, measure

    check_calibratable(adapter)
    if options.num_samples is not None:
        samples = samples[: options.num_samples]
    blocks = adapter.blocks(model)
    # Refused before any pass; blocks the family fixes in place are never removed either.
    greedy_steps(len(blocks), options.greedy, options.greedy_fraction, (*options.greedy_keep, *adapter.fixed_blocks(model.config)))
    group = group or Group()
    local = group.shard(samples)  # this process's share; all of it in a single process
    chunks = plan_batches(processor, local, batch_size=options.batch_size, token_budget=options.token_budget, max_length=options.max_length)
    hooks = _MetricHooks(len(blocks), options)
    image_token_id = adapter.image_token_id(model.config)
    device = input_device(model)
    started = time.perf_counter()
    with (
        calibration_context(model),
        attached(hooks, blocks),
        tqdm(total=len(local), unit="sample", desc="calibrate", disable=not progress) as bar,
    ):
        for chunk in chunks:
            # The answer is part of the sequence (calibration sees what the model writes), but
            # geometric metrics need no answer mask: one encoding per batch, not two.
            batch = build_batch(processor, chunk, with_answer=True, max_length=options.max_length, mark_answer=False).to(device)
            masks = modality_masks(batch.inputs["input_ids"], batch.inputs["attention_mask"], image_token_id)
            hooks.start_batch(masks)
            model(**batch.inputs, use_cache=False)
            bar.update(len(chunk))
    if group.distributed:
        hooks.reduce(group.all_reduce_sum)
    geometric = time.perf_counter() - started
    functional, timings = {}, {}
    if options.functional:
        with calibration_context(model):
            functional, timings = measure(
                model,
                processor,
                adapter,
                chunks,
                device=device,
                max_length=options.max_length,
                ablation=options.ablation,
                greedy=options.greedy,
                greedy_fraction=options.greedy_fraction,
                greedy_keep=options.greedy_keep,
                attention=options.attention,
                all_reduce=group.all_reduce_sum if group.distributed else None,
                progress=progress,
            )
    elapsed = time.perf_counter() - started
    limits = BlockLimits.of(adapter, model.config)
    log.info("calibrated %d blocks on %d samples in %.2fs", len(blocks), len(samples), elapsed)
    return CalibrationReport(
        model={
            "ref": model_ref,
            "family": adapter.family,
            "architecture": type(model).__name__,
            "num_blocks": len(blocks),
            # What the family forbids removing (the planner applies it when given only this report):
            # single blocks, and the whole-removal rules over layer_types (`BlockLimits.rules`).
            "fixed_blocks": {str(i): why for i, why in limits.fixed.items()},
            "block_rules": limits.rules(),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(device),
            "devices": sorted({str(p.device) for p in model.parameters()}),
        },
        data={
            **(data_info or {}),
            "num_samples": len(samples),
            "tokens": {m: int(hooks.token_counts[j]) for j, m in enumerate(MODALITIES)},
        },
        options={**asdict(options), "epsilons": list(options.epsilons)},
        metrics={**hooks.results(), **functional},
        elapsed_s=round(elapsed, 4),
        environment={**environment(), "processes": str(group.world_size)},
        timings={"geometric_s": round(geometric, 4), **timings},
    )
