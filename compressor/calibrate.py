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

import json
import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import metrics
from .architectures import Adapter
from .data import Sample, build_batch
from .errors import InputError, UnsupportedArchitectureError

log = logging.getLogger(__name__)

MODALITIES = ("all", "text", "image")
REPORT_FORMAT = "compressor.calibration/1"
METRICS = ("block_influence", "tail_probability", "adjacent_distance", "angular_distance")


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

    @property
    def functional(self) -> bool:
        return self.ablation or self.greedy > 0 or self.greedy_fraction > 0 or self.attention


class _Stat:
    """Streaming mean per row (block, or span start): partial sums and counts."""

    def __init__(self, rows: int):
        self.sums = torch.zeros(rows, dtype=torch.float64)
        self.counts = torch.zeros(rows, dtype=torch.float64)

    def add(self, row: int, values: torch.Tensor, mask: torch.Tensor) -> None:
        total, count = metrics.masked_sum_count(values, mask)
        self.sums[row] += total
        self.counts[row] += count

    def means(self) -> list[float | None]:
        return [float(s / c) if c > 0 else None for s, c in zip(self.sums, self.counts)]


class _MetricHooks:
    """Forward hooks on every block; reduce each block's metrics as the pass goes."""

    def __init__(self, num_blocks: int, options: CalibrationOptions):
        self.num_blocks = num_blocks
        self.options = options
        self.max_span = min(options.max_span, num_blocks)
        self.masks: dict[str, torch.Tensor] = {}
        self.influence = {m: _Stat(num_blocks) for m in MODALITIES}
        self.tail = {e: {m: _Stat(num_blocks) for m in MODALITIES} for e in options.epsilons}
        self.adjacent = {m: _Stat(num_blocks) for m in MODALITIES}
        self.span = {n: {m: _Stat(num_blocks - n + 1) for m in MODALITIES} for n in range(1, self.max_span + 1)}
        self._inputs: dict[int, torch.Tensor] = {}

    def start_batch(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks
        self._inputs.clear()

    def before(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[:2] != self.masks["all"].shape:
            raise UnsupportedArchitectureError(
                f"Block {index} sees {hidden.shape[1]} positions but the inputs have "
                f"{self.masks['all'].shape[1]} tokens, so tokens cannot be split by modality.",
                fix="this family merges image features differently; its adapter needs a token map.",
            )
        self._inputs[index] = hidden
        # Only the last `max_span` inputs are needed for span distances ending later.
        self._inputs.pop(index - self.max_span, None)

    def after(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        h_out = output[0] if isinstance(output, tuple) else output
        h_in = self._inputs[index]
        masks = {m: mask.to(h_out.device) for m, mask in self.masks.items()}
        distance = metrics.block_influence(h_in, h_out)
        adjacent = metrics.adjacent_distance(h_out)
        for modality, mask in masks.items():
            self.influence[modality].add(index, distance, mask)
            for epsilon, stats in self.tail.items():
                stats[modality].add(index, metrics.tail_indicator(distance, epsilon), mask)
            self.adjacent[modality].add(index, adjacent, metrics.adjacent_pairs(mask))
        for n in range(1, self.max_span + 1):
            start = index + 1 - n
            if start < 0:
                break
            angle = metrics.angular_distance(self._inputs[start], h_out)
            for modality, mask in masks.items():
                self.span[n][modality].add(start, angle, mask)

    def results(self) -> dict[str, Any]:
        means = lambda stats: {m: s.means() for m, s in stats.items()}  # noqa: E731
        return {
            "block_influence": means(self.influence),
            "tail_probability": {str(e): means(s) for e, s in self.tail.items()},
            "adjacent_distance": means(self.adjacent),
            "angular_distance": {str(n): means(s) for n, s in self.span.items()},
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


@dataclass
class CalibrationReport:
    """Per-block redundancy metrics of one model on one data file, plus how they were made."""

    model: dict[str, Any]
    data: dict[str, Any]
    options: dict[str, Any]
    metrics: dict[str, Any]
    elapsed_s: float
    environment: dict[str, str] = field(default_factory=dict)
    format: str = REPORT_FORMAT
    timings: dict[str, float] = field(default_factory=dict)  # seconds per pass (geometric, functional)

    @property
    def num_blocks(self) -> int:
        return int(self.model["num_blocks"])

    def has(self, metric: str) -> bool:
        return metric in self.metrics

    @property
    def greedy_order(self) -> list[int]:
        return list(self.metrics.get("greedy", {}).get("order", []))

    def values(self, metric: str, modality: str, *, epsilon: float | None = None, span: int = 1) -> list[float | None]:
        """One value per block (per span start for ``angular_distance``), None where no tokens."""
        table = self.metrics[metric]
        if metric == "tail_probability":
            key = _float_key(table, epsilon)
            if key is None:
                raise KeyError(f"epsilon {epsilon} not measured (have {', '.join(table)})")
            table = table[key]
        elif metric == "angular_distance":
            if str(span) not in table:
                raise KeyError(f"span {span} not measured (have up to {max(map(int, table))})")
            table = table[str(span)]
        return list(table[modality])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> CalibrationReport:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"Calibration report '{path}' does not exist.", fix="run `compressor calibrate` first.")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != REPORT_FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, expected {REPORT_FORMAT!r}")
            report = cls(**raw)
            for metric in METRICS:
                report.metrics[metric]  # noqa: B018 - presence check
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise InputError(
                f"'{path}' is not a compressor calibration report ({error}).",
                fix="pass the JSON written by `compressor calibrate -o`.",
            ) from None
        return report


def _float_key(table: dict[str, Any], value: float | None) -> str | None:
    if value is None:
        return None
    return next((key for key in table if abs(float(key) - value) < 1e-12), None)


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
) -> CalibrationReport:
    """Measure every redundancy metric for every block of ``model`` over ``samples``."""
    from tqdm.auto import tqdm

    if options.num_samples is not None:
        samples = samples[: options.num_samples]
    blocks = adapter.blocks(model)
    if options.greedy >= len(blocks):  # refused before any pass, not after the geometric one
        raise InputError(
            f"A greedy order of {options.greedy} blocks was asked for, but the model has {len(blocks)} blocks.",
            fix=f"use --greedy {len(blocks) - 1} or less.",
        )
    hooks = _MetricHooks(len(blocks), options)
    image_token_id = adapter.image_token_id(model.config)
    device = next(model.parameters()).device
    tokens = dict.fromkeys(MODALITIES, 0)
    started = time.perf_counter()
    with (
        calibration_context(model),
        attached(hooks, blocks),
        tqdm(total=len(samples), unit="sample", desc="calibrate", disable=not progress) as bar,
    ):
        for begin in range(0, len(samples), options.batch_size):
            chunk = samples[begin : begin + options.batch_size]
            batch = build_batch(processor, chunk, with_answer=True, max_length=options.max_length).to(device)
            masks = modality_masks(batch.inputs["input_ids"], batch.inputs["attention_mask"], image_token_id)
            hooks.start_batch(masks)
            model(**batch.inputs, use_cache=False)
            for modality, mask in masks.items():
                tokens[modality] += int(mask.sum())
            bar.update(len(chunk))
    geometric = time.perf_counter() - started
    functional, timings = {}, {}
    if options.functional:
        from .functional import measure

        with calibration_context(model):
            functional, timings = measure(
                model,
                processor,
                adapter,
                samples,
                batch_size=options.batch_size,
                max_length=options.max_length,
                ablation=options.ablation,
                greedy=options.greedy,
                greedy_fraction=options.greedy_fraction,
                greedy_keep=options.greedy_keep,
                attention=options.attention,
                progress=progress,
            )
    elapsed = time.perf_counter() - started
    log.info("calibrated %d blocks on %d samples in %.2fs", len(blocks), len(samples), elapsed)
    return CalibrationReport(
        model={
            "ref": model_ref,
            "family": adapter.family,
            "architecture": type(model).__name__,
            "num_blocks": len(blocks),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(device),
        },
        data={**(data_info or {}), "num_samples": len(samples), "tokens": tokens},
        options={**asdict(options), "epsilons": list(options.epsilons)},
        metrics={**hooks.results(), **functional},
        elapsed_s=round(elapsed, 4),
        environment=environment(),
        timings={"geometric_s": round(geometric, 4), **timings},
    )


def environment() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
