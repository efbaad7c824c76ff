"""Benchmark of out-of-core checkpoint surgery: a ≥ 1 GB checkpoint pruned vs plainly copied.

    python -m compressor.bench_checkpoint [--preset llama-2-7b] [--layers 3] [--remove 1]

Generates a random bf16 safetensors checkpoint with the tensor names and shapes of a real
model (only the number of blocks is cut down), written tensor by tensor from one reused
random block so generation stays small in memory, in a temporary folder deleted afterwards.
Then it times, alternately and best of ``--rounds``: a plain ``shutil.copyfile`` of every
file, and `rewrite_checkpoint` (in a fresh subprocess) with each copy method this system has
(``copy_file_range``, ``sendfile``, the user-space buffer), whose peak RSS (``ru_maxrss``)
it reports against the budget "largest tensor + 300 MB".
Numbers depend on the disk and the page cache: the files are freshly written, so both the
copy and the prune read them from memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Shapes of real models (config.json values); only num_hidden_layers is chosen here.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}
RSS_SLACK = 300 * 2**20  # the budget: largest tensor + 300 MB (interpreter, torch, transformers)
RANDOM_BLOCK = 16 * 2**20
LABELS = {"copy_file_range": "copy_file_range", "sendfile": "sendfile", "buffer": "user-space buffer"}


@dataclass(frozen=True)
class Generated:
    folder: Path
    total_bytes: int
    files: int
    largest: tuple[str, int]  # (tensor name, bytes)


def tensor_shapes(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """The state-dict names and shapes of the model, from a meta-device instance (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # state_dict() omits nothing on disk except tied weights, which save_pretrained drops too.
    names = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        names.pop("lm_head.weight", None)
    return list(names.items())


def generate(folder: Path, preset: str, layers: int, shard_bytes: int) -> Generated:
    """Write config.json, bf16 shards of random bytes and the index into ``folder``."""
    import numpy as np
    from transformers import LlamaConfig

    from .checkpoint import INDEX_NAME, TensorInfo, encode_header, write_all

    config = LlamaConfig(**PRESETS[preset], num_hidden_layers=layers, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    tensors = [TensorInfo(name, "BF16", shape, 0, 2 * _numel(shape)) for name, shape in tensor_shapes(config)]
    shards: list[list[TensorInfo]] = [[]]
    for tensor in tensors:
        if shards[-1] and sum(t.nbytes for t in shards[-1]) + tensor.nbytes > shard_bytes:
            shards.append([])
        shards[-1].append(tensor)
    block = np.random.default_rng(0).bytes(RANDOM_BLOCK)
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        with open(folder / name, "wb", buffering=0) as handle:
            write_all(handle, encode_header(((t.name, t) for t in shard), {"format": "pt"}))
            for tensor in shard:
                remaining = tensor.nbytes
                while remaining:
                    n = min(remaining, RANDOM_BLOCK)
                    write_all(handle, block[:n])
                    remaining -= n
        weight_map.update(dict.fromkeys((t.name for t in shard), name))
    total = sum(t.nbytes for t in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    largest = max(tensors, key=lambda t: t.nbytes)
    return Generated(folder=folder, total_bytes=total, files=len(shards), largest=(largest.name, largest.nbytes))


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def plain_copy(source: Path, out: Path) -> float:
    start = time.perf_counter()
    out.mkdir()
    for path in sorted(source.iterdir()):
        shutil.copyfile(path, out / path.name)
    return time.perf_counter() - start


def prune_in_child(source: Path, scratch: Path, remove: list[int], *, methods: list[str], chunk_size: int) -> dict[str, Any]:
    """Run the prunes in a fresh interpreter, so its ru_maxrss is the prunes' own peak.

    One subprocess runs every copy method in turn (the allocating user-space buffer last),
    which saves an interpreter start and the torch import per method; ru_maxrss only grows,
    so the value recorded after each method bounds that method's peak from above.
    """
    command = [sys.executable, "-m", "compressor.bench_checkpoint", "--child", str(source), str(scratch)]
    command += ["--remove", ",".join(map(str, remove)), "--chunk-mb", str(chunk_size / 2**20), "--methods", ",".join(methods)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    process_seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"prune subprocess failed:\n{done.stderr}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["process_seconds"] = process_seconds
    return report


def child(source: Path, scratch: Path, remove: list[int], chunk_size: int, methods: list[str]) -> None:
    """The subprocess side: import, prune once per copy method, print timings and RSS as JSON."""
    from . import checkpoint
    from .architectures import adapter_for_config
    from .loading import load_config
    from .planner import RemovedBlock, SurgeryPlan

    # transformers imports a family's config module on first use (about a second here): a
    # one-time start-up cost, counted with the imports rather than with the prune.
    config = load_config(source)
    adapter = adapter_for_config(config)
    removed = tuple(RemovedBlock(index=i, reason="benchmark") for i in remove)
    plan = SurgeryPlan(recipe="bench", op="explicit", num_blocks=adapter.num_blocks(config), removed=removed)
    available = checkpoint.COPY_METHODS
    report: dict[str, Any] = {"import_rss": _maxrss(), "methods": {}}
    for method in methods:
        if method not in available:
            raise SystemExit(f"copy method {method} is not available on this system")
        checkpoint.COPY_METHODS = (method, "buffer")
        out = scratch / f"pruned-{method}"
        start = time.perf_counter()
        result = checkpoint.rewrite_checkpoint(source, out, plan, adapter, chunk_size=chunk_size)
        seconds = time.perf_counter() - start
        report["methods"][method] = dict(seconds=seconds, peak_rss=_maxrss(), bytes_written=result.bytes_written)
        shutil.rmtree(out)
        _settle()
    print(json.dumps(report))


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _settle() -> None:
    """Flush dirty pages between runs so one run's writeback is not billed to the next."""
    if hasattr(os, "sync"):
        os.sync()


def run(args: argparse.Namespace) -> int:
    from .checkpoint import COPY_METHODS

    mb = 2**20
    remove = [int(i) for i in args.remove.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-", dir=args.workdir) as scratch:
        root = Path(scratch)
        start = time.perf_counter()
        generated = generate(root / "source", args.preset, args.layers, int(args.shard_mb * mb))
        _settle()
        print(
            f"generated {generated.total_bytes / 1e9:.2f} GB ({args.preset} shape, {args.layers} blocks, bf16, "
            f"{generated.files} shards) in {time.perf_counter() - start:.1f} s; largest tensor "
            f"{generated.largest[0]} = {generated.largest[1] / mb:.0f} MiB",
            flush=True,
        )
        methods = [m for m in ("copy_file_range", "sendfile", "buffer") if m in COPY_METHODS]
        copies: list[float] = []
        children: list[dict[str, Any]] = []
        for _ in range(args.rounds):
            copies.append(plain_copy(generated.folder, root / "copy"))
            shutil.rmtree(root / "copy")
            _settle()
            children.append(prune_in_child(generated.folder, root, remove, methods=methods, chunk_size=int(args.chunk_mb * mb)))
        parent_view = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # cross-check of the children's own
    copy_s = min(copies)
    budget = generated.largest[1] + RSS_SLACK
    print(f"\nremove blocks {remove} of {args.layers}; chunk {args.chunk_mb:g} MiB; best of {args.rounds} (wall s)\n")
    header = f"{'step':<30} {'wall s':>7} {'GB out':>7} {'GB/s':>6} {'ratio':>6} {'peak RSS MiB':>13}"
    print(header)
    print("-" * len(header))
    gigabytes = generated.total_bytes / 1e9
    print(f"{'plain copy (shutil.copyfile)':<30} {copy_s:>7.2f} {gigabytes:>7.2f} {gigabytes / copy_s:>6.2f}")
    verdicts = {}
    for method in methods:
        seconds = min(c["methods"][method]["seconds"] for c in children)
        nbytes = children[0]["methods"][method]["bytes_written"]
        peak = max(c["methods"][method]["peak_rss"] for c in children)
        verdicts[method] = (seconds / copy_s <= 1.5, peak < budget)
        print(
            f"{'prune, ' + LABELS[method]:<30} {seconds:>7.2f} {nbytes / 1e9:>7.2f} {nbytes / 1e9 / seconds:>6.2f} "
            f"{seconds / copy_s:>6.2f} {peak / mb:>13.0f}"
        )
    import_rss = max(c["import_rss"] for c in children)
    start_s = min(c["process_seconds"] for c in children)
    print(
        f"\nprune subprocess: RSS after imports {import_rss / mb:.0f} MiB (torch, transformers); whole process "
        f"(start, imports, {len(methods)} prunes) {start_s:.1f} s; RUSAGE_CHILDREN max RSS {parent_view / mb:.0f} MiB"
    )
    default = methods[0]  # what rewrite_checkpoint uses on this system
    ok = all(verdicts[default]) and all(rss_ok for _, rss_ok in verdicts.values())
    print(
        f"\ntargets: ratio prune/copy ≤ 1.5 with the default method ({default}); peak RSS < largest tensor + 300 MiB "
        f"= {budget / mb:.0f} MiB ({generated.largest[1] / mb:.0f} + 300) for every method -> {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compressor.bench_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-2-7b")
    parser.add_argument("--layers", type=int, default=3, help="decoder blocks in the generated checkpoint")
    parser.add_argument("--remove", default="1", help="comma-separated block indices to remove")
    parser.add_argument("--shard-mb", type=float, default=500.0, help="maximum shard size")
    parser.add_argument("--chunk-mb", type=float, default=8.0, help="copy chunk size of the prune")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best of each is reported")
    parser.add_argument("--workdir", default=None, help="where the temporary checkpoint goes (default: system temp)")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "SCRATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--methods", default="copy_file_range", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        remove = [int(i) for i in args.remove.split(",")]
        child(Path(args.child[0]), Path(args.child[1]), remove, int(args.chunk_mb * 2**20), methods=args.methods.split(","))
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
