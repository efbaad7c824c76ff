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
import math
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import metrics
from .architectures import Adapter
from .data import Sample, build_batch, plan_batches
from .distributed import Group
from .errors import InputError, UnsupportedArchitectureError
from .inputs import not_unicode, read_input_text
from .loading import input_device
from .recipe import FUNCTIONAL_METRICS

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
        """Read a report written by `save`. A corrupt or hand-edited one is refused here, by
        what is wrong, rather than failing later inside the planner."""
        path = Path(path)
        fix = "pass the JSON written by `compressor calibrate -o` (or calibrate again)."
        text = read_input_text(path, "Calibration report", max_bytes=MAX_REPORT_BYTES, error=InputError, fix=fix)
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise InputError(f"Calibration report '{path}' is not JSON ({error}).", fix=fix) from None
        if not isinstance(raw, dict):
            raise InputError(f"Calibration report '{path}' is a JSON {_json_type(raw)}, not an object.", fix=fix)
        if not_unicode(raw):
            raise InputError(f"Calibration report '{path}' holds a string that is not valid Unicode (a lone surrogate).", fix=fix)
        if raw.get("format") != REPORT_FORMAT:
            raise InputError(
                f"'{path}' is not a compressor calibration report (format is {raw.get('format')!r}, expected {REPORT_FORMAT!r}).",
                fix=fix,
            )
        problems = _report_problems(raw)
        if problems:
            listed = "\n".join(f"  - {p}" for p in problems)
            raise InputError(f"Calibration report '{path}': {len(problems)} problem(s):\n{listed}", fix=fix)
        return cls(**raw)


# A report holds a few numbers per block and metric: ~100 kB for 100 blocks.
MAX_REPORT_BYTES = 64_000_000
_SECTIONS = ("model", "data", "options", "metrics", "environment", "timings")


def _report_problems(raw: dict[str, Any]) -> list[str]:
    """What keeps ``raw`` from being a report the planner can read: the layout that
    `_MetricHooks.results` and `functional.measure` write, one value per block in every table."""
    known = {f.name for f in fields(CalibrationReport)}
    problems = [f"unknown key '{key}'" for key in raw if key not in known]
    problems += [f"{key}: required field is missing" for key in ("model", "data", "options", "metrics", "elapsed_s") if key not in raw]
    problems += [
        f"{key}: expected an object, got {_json_type(raw[key])}" for key in _SECTIONS if key in raw and not isinstance(raw[key], dict)
    ]
    if "elapsed_s" in raw and not _is_number(raw["elapsed_s"]):
        problems.append(f"elapsed_s: expected a number, got {_json_type(raw['elapsed_s'])}")
    n = raw["model"].get("num_blocks") if isinstance(raw.get("model"), dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return [*problems, f"model.num_blocks: expected a positive integer, got {json.dumps(n)}"]
    tables = raw.get("metrics")
    if not isinstance(tables, dict):
        return problems
    problems += [f"metrics.{metric}: missing" for metric in METRICS if metric not in tables]
    for metric in ("block_influence", "adjacent_distance"):
        if metric in tables:
            problems += _table_problems(f"metrics.{metric}", tables[metric], MODALITIES, n)
    for metric in ("tail_probability", "angular_distance"):
        if metric in tables:
            problems += _keyed_problems(f"metrics.{metric}", tables[metric], n, by_span=metric == "angular_distance")
    for metric in FUNCTIONAL_METRICS:  # measured over all tokens only
        if metric in tables:
            problems += _table_problems(f"metrics.{metric}", tables[metric], ("all",), n)
    if "greedy" in tables:
        problems += _greedy_problems(tables["greedy"], n)
    return problems


def _keyed_problems(where: str, table: Any, n: int, *, by_span: bool) -> list[str]:
    """Tables keyed by epsilon ("0.05") or by span length ("2", whose table has one value per start)."""
    if not isinstance(table, dict) or not table:
        return [f"{where}: expected a non-empty object, got {_json_type(table)}"]
    problems = []
    for key, inner in table.items():
        if by_span:
            span = int(key) if key.isascii() and key.isdigit() else 0
            if not 1 <= span <= n:
                problems.append(f"{where}: key '{key}' is not a span length 1..{n}")
                continue
            problems += _table_problems(f"{where}.{key}", inner, MODALITIES, n - span + 1)
        else:
            try:
                float(key)
            except ValueError:
                problems.append(f"{where}: key '{key}' is not an epsilon")
                continue
            problems += _table_problems(f"{where}.{key}", inner, MODALITIES, n)
    return problems


def _table_problems(where: str, table: Any, modalities: tuple[str, ...], length: int) -> list[str]:
    """``{modality: [one number or null per block]}``."""
    if not isinstance(table, dict):
        return [f"{where}: expected an object of modalities, got {_json_type(table)}"]
    problems = []
    for modality in modalities:
        values = table.get(modality)
        if not isinstance(values, list):
            problems.append(f"{where}.{modality}: expected a list of {length} values, got {_json_type(values)}")
        elif len(values) != length:
            problems.append(f"{where}.{modality}: {len(values)} values, expected {length} (one per block)")
        elif not all(v is None or _is_number(v) for v in values):
            problems.append(f"{where}.{modality}: values must be numbers or null")
    return problems


def _greedy_problems(greedy: Any, n: int) -> list[str]:
    """The greedy order must be distinct blocks, each with the step that measured it."""
    if not isinstance(greedy, dict):
        return [f"metrics.greedy: expected an object, got {_json_type(greedy)}"]
    order, steps = greedy.get("order"), greedy.get("steps")
    if not isinstance(order, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in order):
        return [f"metrics.greedy.order: expected a list of block indices 0..{n - 1}"]
    if len(set(order)) != len(order):
        return ["metrics.greedy.order: lists a block twice"]
    if not isinstance(steps, list) or not all(isinstance(s, dict) and _is_number(s.get("loss")) for s in steps):
        return ["metrics.greedy.steps: expected a list of objects with a numeric 'loss'"]
    measured = {s.get("block") for s in steps}
    missing = [i for i in order if i not in measured]
    return [f"metrics.greedy.steps: no step for block(s) {missing}"] if missing else []


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


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
    group: Group | None = None,
) -> CalibrationReport:
    """Measure every redundancy metric for every block of ``model`` over ``samples``.

    With a distributed ``group`` (data-parallel calibration), this process measures its shard
    of ``samples`` and the partial sums of all processes are added up: every process returns
    the report of the whole data set."""
    from tqdm.auto import tqdm

    from .functional import greedy_steps, measure

    if options.num_samples is not None:
        samples = samples[: options.num_samples]
    blocks = adapter.blocks(model)
    greedy_steps(len(blocks), options.greedy, options.greedy_fraction, options.greedy_keep)  # refused before any pass
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
    log.info("calibrated %d blocks on %d samples in %.2fs", len(blocks), len(samples), elapsed)
    return CalibrationReport(
        model={
            "ref": model_ref,
            "family": adapter.family,
            "architecture": type(model).__name__,
            "num_blocks": len(blocks),
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


def environment() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
