"""Latency of one loaded model: what a user of the pruned model pays, measured like a benchmark.

Owns the timing protocol (warm-up, repeats, median and p90; CUDA events on one GPU, a
synchronised wall clock across several, `perf_counter` on CPU, always labelled), the
workloads (prefill at chosen prompt lengths x batch sizes from synthetic token ids, and from
real samples through the processor so a VLM's vision tower is included; greedy decoding of
exactly `new_tokens` tokens), peak memory, the per-block time share measured with hooks, the
Amdahl bound it implies for removing blocks, and ONNX Runtime prefill latency when an ONNX
export sits next to the checkpoint. `measure_latency` returns plain JSON-ready data; the
comparison of a base and a pruned measurement is `compare_latency`.

Base and pruned models must be measured with the same arguments: synthetic inputs are drawn
from a seeded generator, so both see the same token ids.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architectures import Adapter
from .calibrate import calibration_context
from .data import Sample, build_batch, tokenizer_of
from .errors import InputError
from .loading import input_device

log = logging.getLogger(__name__)

LATENCY_FORMAT = "compressor.latency/1"
ONNX_NAMES = ("model.onnx", "decoder_model_merged.onnx")


# -- clocks ---------------------------------------------------------------------------------
class WallClock:
    """`perf_counter`, after synchronising the given CUDA devices (none on CPU).

    Used on CPU, and when a model is spread over several GPUs (an event only times its own
    device's stream, so there the devices are synchronised at every mark instead).
    """

    def __init__(self, cuda_devices: Sequence[torch.device] = ()):
        self.cuda_devices = tuple(cuda_devices)
        self.label = "cuda synchronize + perf_counter" if self.cuda_devices else "cpu perf_counter"

    def sync(self) -> None:
        for device in self.cuda_devices:
            torch.cuda.synchronize(device)

    def mark(self) -> float:
        self.sync()
        return time.perf_counter()

    def elapsed(self, start: float, end: float) -> float:
        return end - start


class CudaEventClock:
    """CUDA events on the current stream: marks cost no synchronisation, so hooks inside a
    forward pass can mark every block without stalling the GPU; read after `sync()`."""

    label = "cuda events"

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def mark(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))  # the stream the model's kernels run on
        return event

    def elapsed(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3


def clock_for(model: nn.Module) -> WallClock | CudaEventClock:
    cuda = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    if not cuda:
        return WallClock()
    if len(cuda) == 1:
        return CudaEventClock(cuda[0])
    return WallClock(cuda)


# -- the protocol ---------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median and p90 of the recorded repeats (the repeats themselves are kept)."""
    return {
        "median_s": percentile(times, 50),
        "p90_s": percentile(times, 90),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
        "times_s": list(times),
    }


def time_repeats(fn: Callable[[], object], *, repeats: int, warmup: int, clock: Any) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; seconds per repeat.

    The queue is drained before each timed repeat, so every repeat is one request arriving
    at an idle device (what a user waits for), and repeats never overlap.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        fn()
    spans = []
    for _ in range(repeats):
        clock.sync()
        start = clock.mark()
        fn()
        spans.append((start, clock.mark()))
    clock.sync()
    return [clock.elapsed(a, b) for a, b in spans]


# -- per-block time ---------------------------------------------------------------------------
class BlockTimer:
    """Marks before and after every decoder block call, per phase (prefill or decode)."""

    def __init__(self, num_blocks: int, clock: Any):
        self.num_blocks = num_blocks
        self.clock = clock
        self.phase = "prefill"
        self._open: dict[int, Any] = {}
        self.spans: dict[str, list[list[tuple[Any, Any]]]] = {}

    def before(self, index: int) -> None:
        self._open[index] = self.clock.mark()

    def after(self, index: int) -> None:
        spans = self.spans.setdefault(self.phase, [[] for _ in range(self.num_blocks)])
        spans[index].append((self._open.pop(index), self.clock.mark()))

    def seconds(self, phase: str) -> list[float]:
        """Time per block in ``phase`` (call after the clock was synchronised)."""
        spans = self.spans.get(phase, [[] for _ in range(self.num_blocks)])
        return [sum(self.clock.elapsed(a, b) for a, b in calls) for calls in spans]


@contextlib.contextmanager
def timed_blocks(blocks: nn.ModuleList, timer: BlockTimer) -> Iterator[BlockTimer]:
    """Attach the timer's hooks to every block; remove them however the pass ends."""
    handles = []
    try:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(lambda m, a, i=index: timer.before(i)))
            handles.append(block.register_forward_hook(lambda m, a, o, i=index: timer.after(i)))
        yield timer
    finally:
        for handle in handles:
            handle.remove()


def amdahl_speedup(shares: Sequence[float], removed: Sequence[int]) -> float | None:
    """Ideal speedup from removing blocks ``removed``: 1 / (1 - their share of the time).

    Amdahl's law: only the removed blocks' time disappears; embeddings, the vision tower,
    the head and every kept block cost what they did. None when the shares leave no time.
    """
    gone = sum(shares[i] for i in set(removed))
    if gone >= 1:
        return None
    return 1.0 / (1.0 - gone)


# -- memory ---------------------------------------------------------------------------------
class MemoryProbe:
    """Peak memory of one workload: CUDA allocator peak, else the process's peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else self._cpu_method()
        self.before = 0

    @staticmethod
    def _cpu_method() -> str:
        # Linux resets the peak RSS (VmHWM) on writing 5 to clear_refs; elsewhere only the
        # peak since the process started is known, which hides growth below earlier peaks.
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            _status_kib("VmHWM")
            return "cpu peak RSS (VmHWM, reset per workload)"
        except (OSError, KeyError, ValueError):
            return "cpu peak RSS since process start (getrusage ru_maxrss; not reset)"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        elif "VmHWM" in self.method:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.before = _status_kib("VmRSS") * 1024
        else:
            self.before = _rusage_peak_bytes()

    def read(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif "VmHWM" in self.method:
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = _rusage_peak_bytes()
        return {"method": self.method, "before_bytes": int(self.before), "peak_bytes": int(peak)}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rusage_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


# -- inputs ---------------------------------------------------------------------------------
def plain_token_ids(processor: Any, model: nn.Module) -> torch.Tensor:
    """Token ids safe for synthetic prompts: the vocabulary minus special and added tokens
    (image placeholders among them: an image token without an image is an error)."""
    tokenizer = tokenizer_of(processor)
    vocab = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
    excluded = set(getattr(tokenizer, "all_special_ids", []) or [])
    excluded |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    excluded |= {getattr(processor, "image_token_id", None)}
    pool = torch.tensor([i for i in range(vocab) if i not in excluded], dtype=torch.long)
    return pool if len(pool) else torch.arange(vocab)


def synthetic_inputs(pool: torch.Tensor, batch_size: int, length: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch_size`` prompts of exactly ``length`` tokens drawn from ``pool`` (seeded)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch_size * 7919 + length)
    picks = torch.randint(0, len(pool), (batch_size, length), generator=generator)
    ids = pool[picks]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def sample_inputs(processor: Any, samples: Sequence[Sample], batch_size: int) -> dict[str, torch.Tensor]:
    """A left-padded batch of ``batch_size`` samples (cycled), images included."""
    chunk = [samples[i % len(samples)] for i in range(batch_size)]
    return dict(build_batch(processor, chunk, with_answer=False, padding_side="left").inputs)


def _to(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    # Prefill as generate() runs it: build the KV cache, compute the head for the last
    # position only (the full-sequence head would inflate the time blocks don't own).
    kwargs: dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


# -- decoding -------------------------------------------------------------------------------
class _StepMarker:
    """A logits processor that only marks the clock: generate() calls it once per new token,
    right after that token's forward pass, so consecutive marks time one decode step each."""

    def __init__(self, clock: Any, blocks: BlockTimer | None = None):
        self.clock = clock
        self.blocks = blocks
        self.marks: list[Any] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.marks.append(self.clock.mark())
        if self.blocks is not None:
            self.blocks.phase = "decode"  # every block call after the first token is decoding
        return scores


def _generate(model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int, marker: _StepMarker) -> int:
    from transformers import LogitsProcessorList

    tokenizer_pad = getattr(model.generation_config, "pad_token_id", None)
    eos = getattr(model.generation_config, "eos_token_id", None)
    pad = tokenizer_pad if tokenizer_pad is not None else (eos[0] if isinstance(eos, list) else eos)
    output = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # EOS is suppressed until the count is reached
        do_sample=False,
        num_beams=1,
        logits_processor=LogitsProcessorList([marker]),
        pad_token_id=pad if pad is not None else 0,
    )
    return int(output.shape[1] - inputs["input_ids"].shape[1])


# -- workloads ------------------------------------------------------------------------------
def _prefill(
    model: nn.Module,
    blocks: nn.ModuleList,
    inputs: dict[str, torch.Tensor],
    *,
    repeats: int,
    warmup: int,
    share_repeats: int,
    clock: Any,
    memory: MemoryProbe,
) -> dict[str, Any]:
    kwargs = _forward_kwargs(model)
    run = lambda: model(**inputs, **kwargs)
    memory.reset()
    times = time_repeats(run, repeats=repeats, warmup=warmup, clock=clock)
    peak = memory.read()
    # Block shares come from separate runs: marks inside the forward would perturb the times.
    timer = BlockTimer(len(blocks), clock)
    totals = []
    with timed_blocks(blocks, timer):
        for _ in range(share_repeats):
            clock.sync()
            start = clock.mark()
            run()
            totals.append((start, clock.mark()))
    clock.sync()
    total = sum(clock.elapsed(a, b) for a, b in totals)
    ids = inputs["input_ids"]
    result = summarize(times)
    result.update(
        batch_size=int(ids.shape[0]),
        prompt_length=int(ids.shape[1]),
        tokens_per_s=ids.numel() / result["median_s"] if result["median_s"] > 0 else None,
        peak_memory=peak,
        block_shares=[t / total for t in timer.seconds("prefill")] if total > 0 else None,
    )
    return result


def _decode(
    model: nn.Module,
    blocks: nn.ModuleList,
    inputs: dict[str, torch.Tensor],
    *,
    new_tokens: int,
    repeats: int,
    warmup: int,
    share_repeats: int,
    clock: Any,
    memory: MemoryProbe,
) -> dict[str, Any]:
    for _ in range(warmup):
        _generate(model, inputs, new_tokens, _StepMarker(clock))
    memory.reset()
    first, steps, totals = [], [], []
    for _ in range(repeats):
        marker = _StepMarker(clock)
        clock.sync()
        start = clock.mark()
        generated = _generate(model, inputs, new_tokens, marker)
        end = clock.mark()
        if generated != new_tokens or len(marker.marks) != new_tokens:
            raise RuntimeError(f"generate() produced {generated} tokens in {len(marker.marks)} steps, {new_tokens} were forced")
        clock.sync()
        first.append(clock.elapsed(start, marker.marks[0]))
        steps.append(clock.elapsed(marker.marks[0], marker.marks[-1]))
        totals.append(clock.elapsed(start, end))
    peak = memory.read()
    # Per-block share of the decode steps (after the first token), from separate hooked runs.
    timer = BlockTimer(len(blocks), clock)
    decode_time = 0.0
    with timed_blocks(blocks, timer):
        for _ in range(share_repeats):
            timer.phase = "prefill"
            marker = _StepMarker(clock, timer)
            clock.sync()
            _generate(model, inputs, new_tokens, marker)
            clock.sync()
            decode_time += clock.elapsed(marker.marks[0], marker.marks[-1])
    batch = int(inputs["input_ids"].shape[0])
    decode = summarize(steps)
    return {
        "batch_size": batch,
        "prompt_length": int(inputs["input_ids"].shape[1]),
        "new_tokens": new_tokens,
        # Tokens after the first, over the time between the first and the last: steady-state
        # decoding, without the prompt's prefill (that is `time_to_first_token`).
        "tokens_per_s": batch * (new_tokens - 1) / decode["median_s"] if decode["median_s"] > 0 else None,
        "time_per_token_s": decode["median_s"] / (new_tokens - 1),
        "decode": decode,
        "time_to_first_token": summarize(first),
        "end_to_end": summarize(totals),
        "peak_memory": peak,
        "block_shares": [t / decode_time for t in timer.seconds("decode")] if decode_time > 0 else None,
    }


def measure_latency(
    model: nn.Module,
    processor: Any,
    adapter: Adapter,
    *,
    prompt_lengths: Sequence[int] = (64, 256),
    batch_sizes: Sequence[int] = (1,),
    new_tokens: int = 32,
    repeats: int = 10,
    warmup: int = 2,
    device: str | torch.device | None = None,
    samples: Sequence[Sample] | None = None,
    share_repeats: int = 3,
    decode_prompt_length: int | None = None,
    onnx: Path | str | None = None,
    clock: Any = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Prefill latency, decode throughput, peak memory and per-block time shares of ``model``.

    Prefill runs at every ``prompt_lengths`` x ``batch_sizes`` from synthetic token ids, and,
    with ``samples`` (e.g. ones with images), at every batch size from real processor inputs.
    Decoding forces exactly ``new_tokens`` greedy tokens per sequence, from a synthetic prompt
    of ``decode_prompt_length`` (default: the shortest prompt length) and from the samples.
    ``device`` moves the model there first (default: leave it where it is). ``onnx``: an ONNX
    graph to time with ONNX Runtime as well (see `find_onnx`); the result's ``onnx`` is None
    without one. ``clock`` replaces the device clock (tests inject a fake one).
    """
    if new_tokens < 2:
        raise InputError(f"new_tokens={new_tokens}: decode throughput needs at least 2 new tokens.", fix="use new_tokens >= 2.")
    if not prompt_lengths and not samples:
        raise InputError("Nothing to measure: no prompt lengths and no samples.", fix="pass prompt_lengths or samples.")
    if device is not None:
        model.to(device)
    blocks = adapter.blocks(model)
    clock = clock or clock_for(model)
    target = input_device(model)
    memory = MemoryProbe(target)
    pool = plain_token_ids(processor, model)
    options = dict(repeats=repeats, warmup=warmup, share_repeats=share_repeats, clock=clock, memory=memory)

    prefill: dict[str, Any] = {}
    decode: dict[str, Any] = {}
    with calibration_context(model):
        for batch_size in batch_sizes:
            for length in prompt_lengths:
                inputs = _to(synthetic_inputs(pool, batch_size, length, seed=seed), target)
                log.info("prefill: %d x %d synthetic tokens", batch_size, length)
                prefill[f"text-L{length}-B{batch_size}"] = {"inputs": "synthetic", **_prefill(model, blocks, inputs, **options)}
            if samples:
                inputs = _to(sample_inputs(processor, samples, batch_size), target)
                log.info("prefill: %d samples", batch_size)
                prefill[f"samples-B{batch_size}"] = {"inputs": "samples", **_images(inputs), **_prefill(model, blocks, inputs, **options)}
        for batch_size in batch_sizes:
            if prompt_lengths:
                length = decode_prompt_length or min(prompt_lengths)
                inputs = _to(synthetic_inputs(pool, batch_size, length, seed=seed), target)
                log.info("decode: %d tokens after %d x %d synthetic tokens", new_tokens, batch_size, length)
                decode[f"text-L{length}-B{batch_size}"] = {
                    "inputs": "synthetic",
                    **_decode(model, blocks, inputs, new_tokens=new_tokens, **options),
                }
            if samples:
                inputs = _to(sample_inputs(processor, samples, batch_size), target)
                log.info("decode: %d tokens after %d samples", new_tokens, batch_size)
                decode[f"samples-B{batch_size}"] = {
                    "inputs": "samples",
                    **_images(inputs),
                    **_decode(model, blocks, inputs, new_tokens=new_tokens, **options),
                }

    onnx_result = None
    if onnx is not None:
        onnx_result = measure_onnx(
            onnx, pool, prompt_lengths=prompt_lengths, batch_sizes=batch_sizes, repeats=repeats, warmup=warmup, seed=seed
        )
    parameters = list(model.parameters())
    return {
        "format": LATENCY_FORMAT,
        "model": {
            "family": adapter.family,
            "num_blocks": len(blocks),
            "params": sum(p.numel() for p in parameters),
            "weights_bytes": sum(p.numel() * p.element_size() for p in parameters),
        },
        "environment": latency_environment(model, clock),
        "protocol": {
            "warmup": warmup,
            "repeats": repeats,
            "share_repeats": share_repeats,
            "statistics": "median and p90 over repeats; each repeat starts on an idle device",
            "timer": clock.label,
            "prefill": "one forward pass building the KV cache, head on the last position only",
            "decode": f"greedy generate(), exactly {new_tokens} new tokens; throughput over tokens 2..{new_tokens}",
        },
        "prefill": prefill,
        "decode": decode,
        "onnx": onnx_result,
    }


def _images(inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    pixels = inputs.get("pixel_values")
    return {"has_images": pixels is not None}


def latency_environment(model: nn.Module, clock: Any) -> dict[str, Any]:
    import transformers

    device = input_device(model)
    parameter = next(model.parameters())
    return {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "timer": clock.label,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# -- comparison -----------------------------------------------------------------------------
def compare_latency(base: dict[str, Any], pruned: dict[str, Any], removed_blocks: Sequence[int]) -> dict[str, Any]:
    """Achieved speedups (base time / pruned time) beside the Amdahl bound of the base model's
    per-block shares, for every workload both measurements share."""
    removed = sorted(set(removed_blocks))
    base_blocks, pruned_blocks = base["model"]["num_blocks"], pruned["model"]["num_blocks"]
    if any(not 0 <= i < base_blocks for i in removed):
        raise InputError(
            f"Removed blocks {removed} are not all within the base model's {base_blocks} blocks.", fix="pass original 0-based indices."
        )
    if base_blocks - len(removed) != pruned_blocks:
        raise InputError(
            f"The base model has {base_blocks} blocks and the pruned one {pruned_blocks}, but {len(removed)} were said to be removed.",
            fix="compare the pruned model with the base model it was cut from, and pass its plan's removed blocks.",
        )

    def row(b: dict[str, Any], p: dict[str, Any], achieved: float | None) -> dict[str, Any]:
        ideal = amdahl_speedup(b["block_shares"], removed) if b.get("block_shares") else None
        return {
            "speedup": achieved,
            "ideal_speedup": ideal,
            "achieved_over_ideal": achieved / ideal if achieved and ideal else None,
            "removed_share": sum(b["block_shares"][i] for i in removed) if b.get("block_shares") else None,
            "peak_memory_ratio": _ratio(b["peak_memory"]["peak_bytes"], p["peak_memory"]["peak_bytes"]),
        }

    prefill = {}
    for key, b in base["prefill"].items():
        if key in pruned["prefill"]:
            prefill[key] = {**_shape(b), **row(b, pruned["prefill"][key], _ratio(b["median_s"], pruned["prefill"][key]["median_s"]))}
    decode = {}
    for key, b in base["decode"].items():
        if key in pruned["decode"]:
            p = pruned["decode"][key]
            decode[key] = {
                **_shape(b),
                **row(b, p, _ratio(p["tokens_per_s"], b["tokens_per_s"])),
                "time_to_first_token_speedup": _ratio(b["time_to_first_token"]["median_s"], p["time_to_first_token"]["median_s"]),
            }
    return {
        "removed": removed,
        "block_fraction_removed": len(removed) / base_blocks,
        "params_ratio": _ratio(pruned["model"]["params"], base["model"]["params"]),
        "prefill": prefill,
        "decode": decode,
        "onnx": _compare_onnx(base.get("onnx"), pruned.get("onnx"), pruned["prefill"]),
    }


def _shape(entry: dict[str, Any]) -> dict[str, Any]:
    keys = ("inputs", "batch_size", "prompt_length", "new_tokens", "has_images")
    return {k: entry[k] for k in keys if k in entry}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _compare_onnx(base: dict[str, Any] | None, pruned: dict[str, Any] | None, pruned_torch: dict[str, Any]) -> dict[str, Any] | None:
    if not pruned or "prefill" not in pruned:
        return None
    rows = {}
    for key, p in pruned["prefill"].items():
        b = (base or {}).get("prefill", {}).get(key)
        t = pruned_torch.get(key)
        rows[key] = {
            "speedup": _ratio(b["median_s"], p["median_s"]) if b else None,
            "onnx_over_torch": _ratio(t["median_s"], p["median_s"]) if t else None,
        }
    return {"provider": pruned["provider"], "prefill": rows}


# -- ONNX Runtime ---------------------------------------------------------------------------
def find_onnx(model_dir: Path | str) -> Path | None:
    """An ONNX graph exported with a checkpoint: ``onnx/`` inside or beside it, or the folder itself."""
    folder = Path(model_dir)
    for where in (folder / "onnx", folder.parent / "onnx", folder):
        for name in ONNX_NAMES:
            if (where / name).is_file():
                return where / name
    return None


def _onnx_feeds(session: Any, ids: torch.Tensor, embed: Any = None) -> dict[str, Any]:
    """Inputs for a decoder graph, from its declared inputs: ids (or their embeddings, from the
    split layout's ``embed_tokens.onnx``), mask, positions, and empty past tensors, since
    prefill starts with no past."""
    import numpy as np

    from .onnx_runtime import empty_past, text_positions

    batch, length = ids.shape
    mask = np.ones((batch, length), dtype=np.int64)
    feeds: dict[str, Any] = {}
    for spec in session.get_inputs():
        name = spec.name
        if name == "input_ids":
            feeds[name] = ids.numpy()
        elif name == "inputs_embeds":
            if embed is None:
                raise ValueError("the decoder takes inputs_embeds but no embed_tokens.onnx lies beside it")
            feeds[name] = embed.run(None, {"input_ids": ids.numpy()})[0]
        elif name == "attention_mask":
            feeds[name] = mask
        elif name == "position_ids":
            positions = text_positions(mask)
            # M-RoPE graphs take (3, batch, seq): text advances the three axes together.
            feeds[name] = np.broadcast_to(positions, (3, batch, length)).copy() if len(spec.shape) == 3 else positions
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, length), dtype=np.int64)
        elif name == "use_cache_branch":
            feeds[name] = np.array([False])
        elif name.startswith("past_key_values") or name.startswith("past_"):
            feeds[name] = empty_past(spec, batch)
        else:
            raise ValueError(f"graph input '{name}' is not one a decoder prefill can fill in")
    return feeds


def measure_onnx(
    path: Path | str,
    pool: torch.Tensor,
    *,
    prompt_lengths: Sequence[int],
    batch_sizes: Sequence[int],
    repeats: int,
    warmup: int,
    seed: int = 0,
    clock: Any = None,
    prefer_cuda: bool = True,
) -> dict[str, Any]:
    """Prefill latency of an ONNX decoder graph under ONNX Runtime, same synthetic inputs as
    `measure_latency`. Failures are recorded, not raised: ONNX timing is an extra."""
    path = Path(path)
    try:
        import onnxruntime as ort

        from .onnx_runtime import providers
        from .onnx_runtime import session as ort_session

        # On CPU, the same threads torch had, so the ONNX/torch ratio compares like with like.
        threads = torch.get_num_threads() if providers(prefer_cuda) == ["CPUExecutionProvider"] else None
        session = ort_session(path, prefer_cuda=prefer_cuda, threads=threads)
        provider = session.get_providers()[0]
        embed_path = path.parent / "embed_tokens.onnx"
        embed = ort_session(embed_path, prefer_cuda=prefer_cuda, threads=threads) if embed_path.is_file() else None
        outputs = [o.name for o in session.get_outputs()]
        wanted = ["logits"] if "logits" in outputs else None
        clock = clock or WallClock()  # session.run returns host arrays: it is synchronous
        prefill = {}
        for batch_size in batch_sizes:
            for length in prompt_lengths:
                feeds = _onnx_feeds(session, synthetic_inputs(pool, batch_size, length, seed=seed)["input_ids"], embed)
                times = time_repeats(lambda feeds=feeds: session.run(wanted, feeds), repeats=repeats, warmup=warmup, clock=clock)
                prefill[f"text-L{length}-B{batch_size}"] = {
                    "inputs": "synthetic",
                    "batch_size": batch_size,
                    "prompt_length": length,
                    **summarize(times),
                }
    except Exception as error:  # onnxruntime raises its own types for bad graphs and inputs
        log.warning("ONNX Runtime timing of %s failed: %s", path, error)
        return {"path": str(path), "error": f"{type(error).__name__}: {error}"}
    return {
        "path": str(path),
        "provider": provider,
        "device": "cuda" if provider == "CUDAExecutionProvider" else "cpu",
        "onnxruntime": ort.__version__,
        "prefill": prefill,
    }
