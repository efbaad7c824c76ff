"""`make bench-scale`: what calibration costs as it grows — overhead, batching, memory.

1. Overhead: calibration with every cheap metric (block influence, 4 tail thresholds,
   adjacent distance, angular spans of 1–4 blocks, all three modalities) over the time of a
   plain forward pass over the same batches, same tokenisation. Timed interleaved (plain,
   calibration, plain, …) so that a machine's drift hits both alike; median of the repeats.
   Target: ≤ 1.10.
2. Token-budget batching on samples of mixed lengths: padded tokens and calibration time
   with fixed batches in file order vs batches sorted by length and packed to a token budget.
3. Streaming: peak memory of calibration at 64 and at 1024 samples, each in a fresh process
   (peak RSS from getrusage; on a GPU also the peak of allocated GPU memory): it must not grow
   with the number of samples.

Models are random, built from config (nothing downloaded): ``--shape small`` / ``medium`` a
Llama decoder of hidden size 384 / 1024 (CPU-sized); ``--shape 7b`` the text decoder of a 7B VLM (Qwen2-VL-7B: hidden 3584, 28
blocks, MLP 18944, 28 heads / 4 KV heads, vocabulary 152064) in bfloat16 — for a GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .architectures import adapter_for_model
from .calibrate import CalibrationOptions, calibrate
from .data import Sample, build_batch, plan_batches
from .demo.processor import build_tokenizer

WORDS = [f"w{i}" for i in range(500)]
TARGET = 1.10


def build(shape: str, device: torch.device) -> tuple[Any, Any]:
    """A random decoder of ``shape`` with a word-level tokenizer, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(WORDS)
    torch.manual_seed(0)
    if shape == "7b":
        config = Qwen2Config(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=4096,
        )
        dtype, cls = torch.bfloat16, Qwen2ForCausalLM
    else:
        hidden = 1024 if shape == "medium" else 384
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=8,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 128,
            max_position_embeddings=2048,
        )
        dtype, cls = torch.float32, LlamaForCausalLM
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in its dtype: a 7B model never exists in float32
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.architectures = [cls.__name__]
    return model.eval(), tokenizer


def samples(n: int, words: tuple[int, int], seed: int = 0) -> list[Sample]:
    """``n`` prompts of ``words[0]``..``words[1]`` words (uniform) with 4-word answers."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(words[0], words[1] + 1, (n,), generator=generator)
    out = []
    for length in lengths.tolist():
        picks = torch.randint(0, len(WORDS), (length + 4,), generator=generator).tolist()
        out.append(Sample(prompt=" ".join(WORDS[i] for i in picks[:-4]), answer=" ".join(WORDS[i] for i in picks[-4:])))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1, *, rounds: dict | None = None
) -> dict[str, float]:
    """Median seconds of each function, the functions taking turns in every repeat (each
    repeat's times also go to ``rounds``, for ratios of neighbouring runs)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for repeat in range(repeats):
        # ABBA order: whatever the previous run leaves behind (caches, heat) hits both alike.
        order = list(fns.items()) if repeat % 2 == 0 else list(fns.items())[::-1]
        for name, fn in order:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    if rounds is not None:
        rounds.update(times)
    return {name: statistics.median(values) for name, values in times.items()}


@contextmanager
def timed_hooks(seconds: list[float]) -> Iterator[None]:
    """Calibration whose metric hooks add the time they take to ``seconds[0]`` (CPU: kernels
    run inside the call, so this is the hooks' whole cost)."""
    from . import calibrate as module

    plain = module._MetricHooks

    class Timed(plain):  # type: ignore[misc, valid-type]
        def before(self, *args: Any) -> None:
            start = time.perf_counter()
            super().before(*args)
            seconds[0] += time.perf_counter() - start

        def after(self, *args: Any) -> None:
            start = time.perf_counter()
            super().after(*args)
            seconds[0] += time.perf_counter() - start

    module._MetricHooks = Timed
    try:
        yield
    finally:
        module._MetricHooks = plain


def overhead(model: Any, tokenizer: Any, data: list[Sample], options: CalibrationOptions, device: torch.device, repeats: int) -> dict:
    adapter = adapter_for_model(model)
    chunks = plan_batches(tokenizer, data, batch_size=options.batch_size, token_budget=options.token_budget, max_length=options.max_length)

    def plain() -> None:
        # Calibration's own work minus the hooks: the same batches, tokenised the same way.
        with torch.inference_mode():
            for chunk in chunks:
                batch = build_batch(tokenizer, chunk, with_answer=True, max_length=options.max_length, mark_answer=False).to(device)
                model(**batch.inputs, use_cache=False)

    def calibration() -> None:
        calibrate(model, tokenizer, adapter, data, options=options)

    rounds: dict[str, list[float]] = {}
    seconds = interleaved({"plain": plain, "calibration": calibration}, device, repeats, rounds=rounds)
    # Ratios of neighbouring runs: drift on a shared machine cancels within a round.
    ratio = statistics.median(c / p for c, p in zip(rounds["calibration"], rounds["plain"]))
    hooks = None
    if device.type == "cpu":
        inside = [0.0]
        with timed_hooks(inside):
            started = time.perf_counter()
            calibration()
            hooks = inside[0] / (time.perf_counter() - started)
    tokens = sum(
        int(build_batch(tokenizer, c, with_answer=True, max_length=options.max_length, mark_answer=False).inputs["attention_mask"].sum())
        for c in chunks
    )
    return {
        **seconds,
        "ratio": ratio,
        "hook_share": hooks,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds["calibration"],
    }


def batching(model: Any, tokenizer: Any, data: list[Sample], batch_size: int, budget: int, device: torch.device, repeats: int) -> dict:
    adapter = adapter_for_model(model)
    fixed = CalibrationOptions(num_samples=None, batch_size=batch_size, max_length=None)
    packed = CalibrationOptions(num_samples=None, batch_size=4 * batch_size, max_length=None, token_budget=budget)

    def padded(options: CalibrationOptions) -> tuple[int, int]:
        chunks = plan_batches(tokenizer, data, batch_size=options.batch_size, token_budget=options.token_budget)
        shapes = [build_batch(tokenizer, c, with_answer=True, mark_answer=False).inputs["attention_mask"] for c in chunks]
        return sum(m.numel() for m in shapes), len(chunks)

    seconds = interleaved(
        {
            "fixed": lambda: calibrate(model, tokenizer, adapter, data, options=fixed),
            "budget": lambda: calibrate(model, tokenizer, adapter, data, options=packed),
        },
        device,
        repeats,
    )
    (fixed_tokens, fixed_batches), (budget_tokens, budget_batches) = padded(fixed), padded(packed)
    return {
        **seconds,
        "fixed_padded_tokens": fixed_tokens,
        "budget_padded_tokens": budget_tokens,
        "fixed_batches": fixed_batches,
        "budget_batches": budget_batches,
    }


def _rss_kb(field: str) -> int:
    """VmRSS / VmHWM (peak) of this process in kB, from /proc (Linux); getrusage's peak elsewhere."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    """Start the peak-RSS watermark afresh (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def child_memory(shape: str, n: int, device: torch.device) -> dict:
    """Run in a fresh process: peak memory of one calibration over ``n`` samples, above the
    memory in use just before it (model built, libraries loaded)."""
    model, tokenizer = build(shape, device)
    data = samples(n, (24, 160), seed=1)
    options = CalibrationOptions(num_samples=None, batch_size=8, max_length=None)
    adapter = adapter_for_model(model)
    calibrate(model, tokenizer, adapter, data[:8], options=options)  # first-call allocations are not per sample
    reset = _reset_peak_rss()
    before = _rss_kb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_gpu = torch.cuda.memory_allocated(device)
    calibrate(model, tokenizer, adapter, data, options=options)
    out = {"samples": n, "rss_before_kb": before, "rss_peak_kb": _rss_kb("VmHWM"), "peak_reset": reset}
    if device.type == "cuda":
        out["gpu_peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - base_gpu
    return out


def memory(shape: str, sizes: tuple[int, ...], device: str) -> list[dict]:
    results = []
    for n in sizes:
        command = [sys.executable, "-m", "compressor.bench_scale", "--child-memory", str(n), "--shape", shape, "--device", device]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["small", "medium", "7b"], default=None, help="[7b on a GPU, small on the CPU]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=32, help="samples for the overhead and batching runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-sizes", default="64,1024", help="sample counts for the memory runs ('' skips them)")
    parser.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    shape = args.shape or ("7b" if device.type == "cuda" else "small")
    if args.child_memory:
        print(json.dumps(child_memory(shape, args.child_memory, device)))
        return

    model, tokenizer = build(shape, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    params = sum(p.numel() for p in model.parameters())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"device: {where}; model: {shape} ({params / 1e9:.2f} B params, {dtype}, {len(model.model.layers)} blocks)")

    data = samples(args.samples, (48, 160))
    cost = overhead(model, tokenizer, data, CalibrationOptions(num_samples=None, batch_size=8, max_length=None), device, args.repeats)
    verdict = "meets" if cost["ratio"] <= TARGET else "misses"
    share = f"; the metric hooks took {cost['hook_share']:.1%} of a calibration pass" if cost["hook_share"] is not None else ""
    print(
        f"\n1. overhead: calibration {cost['calibration']:.3f} s / plain forward {cost['plain']:.3f} s (medians); "
        f"median ratio of neighbouring runs {cost['ratio']:.3f}x ({verdict} the {TARGET:.2f}x target){share}; "
        f"{cost['tokens_per_s']:,.0f} tokens/s calibrated ({cost['tokens']:,} tokens)"
    )

    mixed = samples(args.samples, (8, 400), seed=2)
    pack = batching(model, tokenizer, mixed, 8, 8 * 160, device, args.repeats)
    print(
        f"2. batching, {args.samples} samples of 8-400 words: fixed batches of 8: {pack['fixed_padded_tokens']:,} padded tokens "
        f"in {pack['fixed_batches']} batches, {pack['fixed']:.3f} s; token budget {8 * 160}: {pack['budget_padded_tokens']:,} "
        f"in {pack['budget_batches']} batches, {pack['budget']:.3f} s ({pack['fixed'] / pack['budget']:.2f}x faster)"
    )

    sizes = tuple(int(n) for n in args.memory_sizes.split(",") if n.strip())
    mem = memory(shape, sizes, str(device)) if sizes else []
    rows = []
    for entry in mem:
        extra = (entry["rss_peak_kb"] - entry["rss_before_kb"]) / 1024
        row = f"{entry['samples']} samples: peak RSS {entry['rss_peak_kb'] / 1024:,.1f} MiB, {extra:+,.1f} MiB above the level before"
        if "gpu_peak_extra_bytes" in entry:
            row += f", GPU peak above the model {entry['gpu_peak_extra_bytes'] / 2**20:,.0f} MiB"
        rows.append(row)
    if mem:
        growth = (mem[-1]["rss_peak_kb"] - mem[0]["rss_peak_kb"]) / 1024
        print("3. streaming memory: " + "; ".join(rows) + f"; {sizes[-1]} vs {sizes[0]} samples: {growth:+,.1f} MiB peak RSS")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": where, "shape": shape, "overhead": cost, "batching": pack, "memory": mem}, handle, indent=1)


if __name__ == "__main__":
    main()
