"""`python -m compressor.bench_latency`: does removing blocks buy the speed it should?

Prefill latency and decode throughput of a model before and after removing a quarter of its
blocks, each speedup beside its ideal (Amdahl's law over the base model's measured per-block
time shares), printed as a table with the device labelled. The target is achieved >= 0.95
of ideal: less means time moved somewhere blocks don't own (e.g. per-layer cache overhead).

By default the model is a random Llama decoder with a real VLM's text widths (Llama-7B-like:
hidden 4096, MLP 11008, 32 heads) but 8 blocks, in bfloat16 on a GPU; on CPU the widths are
smaller and float32 so it finishes in about two minutes on two cores. ``--model DIR`` runs
on any saved model instead (``--data`` adds real samples, with images for a VLM).
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .architectures import adapter_for_model
from .data import load_samples
from .latency import compare_latency, measure_latency
from .planner import RemovedBlock, SurgeryPlan
from .surgery import apply_plan

TARGET = 0.95

# (hidden, intermediate, heads, dtype): a 7B-class text decoder on GPU; on CPU a quarter of
# the width keeps the same shape ratios within the time budget.
WIDTHS = {"cuda": (4096, 11008, 32, torch.bfloat16), "cpu": (1024, 2752, 16, torch.float32)}


class _Tokenizer:
    """Just enough of a tokenizer for synthetic prompts: a vocabulary size, no special tokens."""

    def __init__(self, size: int):
        self.size = size
        self.all_special_ids: list[int] = []

    def __len__(self) -> int:
        return self.size


def random_llama(device: torch.device, blocks: int, vocab: int) -> tuple[LlamaForCausalLM, _Tokenizer]:
    hidden, intermediate, heads, dtype = WIDTHS[device.type]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=blocks,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        eos_token_id=None,  # random weights: never stop early (min_new_tokens does too)
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.config.architectures = ["LlamaForCausalLM"]
    return model.eval(), _Tokenizer(vocab)


def quarter(num_blocks: int) -> list[int]:
    """A quarter of the blocks, contiguous, late in the stack but never the last one (the
    usual shape of a depth-pruning result); at least one block."""
    count = max(1, round(num_blocks / 4))
    return list(range(num_blocks - 1 - count, num_blocks - 1))


def _table(comparison: dict[str, Any], base: dict[str, Any], pruned: dict[str, Any]) -> list[list[str]]:
    rows = [["workload", "base", "pruned", "speedup", "ideal (Amdahl)", "achieved/ideal", f">= {TARGET}"]]
    for phase in ("prefill", "decode"):
        for key, row in comparison[phase].items():
            b, p = base[phase][key], pruned[phase][key]
            if phase == "prefill":
                before, after = f"{b['median_s'] * 1e3:.1f} ms", f"{p['median_s'] * 1e3:.1f} ms"
            else:
                before, after = f"{b['tokens_per_s']:.1f} tok/s", f"{p['tokens_per_s']:.1f} tok/s"
            ratio = row["achieved_over_ideal"]
            rows.append(
                [
                    f"{phase} {key}" + (f" +{b['new_tokens']}" if phase == "decode" else ""),
                    before,
                    after,
                    f"{row['speedup']:.3f}x" if row["speedup"] else "-",
                    f"{row['ideal_speedup']:.3f}x" if row["ideal_speedup"] else "-",
                    f"{ratio:.3f}" if ratio else "-",
                    ("yes" if ratio >= TARGET else "NO") if ratio else "-",
                ]
            )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a saved model folder (default: a random Llama)")
    parser.add_argument("--data", type=Path, help="JSONL samples for real-input workloads (images for a VLM)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--blocks", type=int, default=8, help="blocks of the random Llama")
    parser.add_argument("--remove", help="comma-separated block indices (default: a quarter, late in the stack)")
    parser.add_argument("--lengths", default=None, help="prompt lengths, comma-separated")
    parser.add_argument("--batch-sizes", default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, help="CPU threads (default on CPU: 1)")
    parser.add_argument("--json", type=Path, help="also write base, pruned and comparison here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device
    )
    gpu = device.type == "cuda"
    if args.threads or not gpu:
        # On a shared CPU, intra-op threads spin-wait for cores other processes hold, and the
        # times swing several-fold between runs; one thread gives stable ratios (the point here).
        torch.set_num_threads(args.threads or 1)
    lengths = _ints(args.lengths) or ((512, 2048) if gpu else (128,))
    batch_sizes = _ints(args.batch_sizes) or ((1, 8) if gpu else (1,))
    new_tokens = args.new_tokens or (128 if gpu else 32)
    repeats = args.repeats or (20 if gpu else 5)

    if args.model:
        from .loading import load_model

        loaded = load_model(str(args.model), device=str(device), dtype="auto")
        model, processor, adapter = loaded.model, loaded.processor, loaded.adapter
        what = f"{args.model} ({adapter.family})"
    else:
        model, processor = random_llama(device, args.blocks, vocab=32000)
        adapter = adapter_for_model(model)
        hidden, intermediate, heads, _ = WIDTHS[device.type]
        what = f"random Llama, {args.blocks} blocks, hidden {hidden}, MLP {intermediate}, {heads} heads"
    samples = load_samples(args.data, limit=max(batch_sizes)) if args.data else None
    num_blocks = len(adapter.blocks(model))
    removed = _ints(args.remove) or quarter(num_blocks)
    options = dict(
        prompt_lengths=lengths,
        batch_sizes=batch_sizes,
        new_tokens=new_tokens,
        repeats=repeats,
        warmup=2,
        share_repeats=3,
        samples=samples,
    )

    base = measure_latency(model, processor, adapter, **options)
    # In place: the removed blocks are freed, so a large model never exists twice.
    plan = SurgeryPlan(
        recipe="bench", op="explicit", num_blocks=num_blocks, removed=tuple(RemovedBlock(index=i, reason="bench") for i in removed)
    )
    apply_plan(model, plan, adapter)
    pruned = measure_latency(model, processor, adapter, **options)
    comparison = compare_latency(base, pruned, removed)

    env = base["environment"]
    where = f"GPU {env['gpu']}" if env["gpu"] else f"CPU ({env['cpu_threads']} threads; labelled cpu timing)"
    params = base["model"]["params"]
    print(f"device: {where}; {env['dtype']}; timer: {env['timer']}; torch {env['torch']}, transformers {env['transformers']}")
    print(f"model: {what}; {params / 1e6:.1f} M params; removed blocks {removed} of {num_blocks}")
    print(f"protocol: 2 warm-up, median of {repeats} repeats; decode = greedy, exactly {new_tokens} new tokens")
    rows = _table(comparison, base, pruned)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    result = {"base": base, "pruned": pruned, "comparison": comparison}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",")) if text else ()


if __name__ == "__main__":
    main()
