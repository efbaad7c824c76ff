"""`make bench`: performance figures as ratios measured in one run, printed as a table.

1. Calibration overhead: the hook-based calibration pass vs a plain forward pass over the same
   batches (same model, same data) — what the streaming metrics cost (`bench_scale` measures
   it on more shapes, with batching and memory).
2. Pruning payoff: forward (prefill) latency and greedy decode throughput of a model with a
   quarter of its blocks removed vs the original, same inputs.

Models are random Llama decoders built from config (nothing is downloaded). Timing follows
the usual protocol: warm-up, repeats, median; synchronised on CUDA, labelled CPU otherwise.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .architectures import adapter_for_model
from .bench_scale import interleaved
from .calibrate import CalibrationOptions, calibrate
from .data import Sample, build_batch
from .demo.processor import build_tokenizer
from .planner import RemovedBlock, SurgeryPlan
from .surgery import apply_plan

WORDS = [f"w{i}" for i in range(500)]


def median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_model(hidden: int, layers: int, vocab: int, device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config)
    model.config.architectures = ["LlamaForCausalLM"]
    return model.to(device).eval()


def samples(n: int, words: int) -> list[Sample]:
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(WORDS), (n, words), generator=generator)
    return [Sample(prompt=" ".join(WORDS[i] for i in row[:-4]), answer=" ".join(WORDS[i] for i in row[-4:])) for row in picks]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--words", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    tokenizer = build_tokenizer(WORDS)
    model = build_model(args.hidden, args.layers, len(tokenizer), device)
    adapter = adapter_for_model(model)
    data = samples(args.samples, args.words)
    options = CalibrationOptions(num_samples=None, batch_size=8, max_length=None)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"device: {label}; model: Llama {args.layers} blocks, hidden {args.hidden}, {params / 1e6:.1f} M params; "
        f"{args.samples} samples x ~{args.words + 8} tokens; median of {args.repeats}"
    )

    def plain() -> None:
        # Same work as calibration minus the hooks: tokenise the batch, run the forward.
        with torch.inference_mode():
            for i in range(0, len(data), options.batch_size):
                batch = build_batch(tokenizer, data[i : i + options.batch_size], with_answer=True, mark_answer=False).to(device)
                model(**batch.inputs, use_cache=False)

    def calibration() -> None:
        calibrate(model, tokenizer, adapter, data, options=options)

    # Interleaved, so that drift on a shared machine hits both alike (bench_scale.py has more).
    seconds = interleaved({"plain": plain, "calibration": calibration}, device, args.repeats)
    t_plain, t_cal = seconds["plain"], seconds["calibration"]

    removed = list(range(args.layers // 2 - args.layers // 8, args.layers // 2 + args.layers // 8))
    plan = SurgeryPlan(
        recipe="bench", op="explicit", num_blocks=args.layers, removed=tuple(RemovedBlock(index=i, reason="bench") for i in removed)
    )
    pruned = apply_plan(copy.deepcopy(model), plan, adapter)
    prompt = build_batch(tokenizer, data[:8], with_answer=False, padding_side="left").to(device).inputs

    def prefill(m: torch.nn.Module) -> Callable[[], object]:
        return lambda: m(**prompt, use_cache=False)

    def decode(m: torch.nn.Module) -> Callable[[], object]:
        return lambda: m.generate(**prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        t_pre_o = median_seconds(prefill(model), repeats=args.repeats)
        t_pre_p = median_seconds(prefill(pruned), repeats=args.repeats)
        t_dec_o = median_seconds(decode(model), repeats=args.repeats)
        t_dec_p = median_seconds(decode(pruned), repeats=args.repeats)
    tokens = 16 * prompt["input_ids"].shape[0]

    rows = [
        ("calibration pass / plain forward", f"{t_cal:.3f} s / {t_plain:.3f} s", f"{t_cal / t_plain:.2f}x"),
        (
            f"prefill, pruned ({len(removed)}/{args.layers} removed) / original",
            f"{t_pre_p * 1e3:.1f} ms / {t_pre_o * 1e3:.1f} ms",
            f"{t_pre_p / t_pre_o:.2f}x time",
        ),
        (
            "decode throughput, pruned / original",
            f"{tokens / t_dec_p:.0f} / {tokens / t_dec_o:.0f} tok/s",
            f"{t_dec_o / t_dec_p:.2f}x speed",
        ),
        (
            "ideal (blocks kept / blocks)",
            f"{args.layers - len(removed)}/{args.layers}",
            f"{(args.layers - len(removed)) / args.layers:.2f}x time",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    main()
