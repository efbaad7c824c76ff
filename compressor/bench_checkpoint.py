"""Benchmark of out-of-core checkpoint surgery as users run it: `compressor prune --out-of-core --verify none`
against `cp -r` of the same ≥ 1 GB checkpoint, both as whole processes.

    python -m compressor.bench_checkpoint [--preset tinyllama-1.1b] [--layers 22] [--remove 3,6,9]

Generates a random bf16 sharded safetensors checkpoint with the tensor names and shapes of a
real model (by default TinyLlama-1.1B whole, 2.2 GB; ``--layers`` makes it shorter; names and
shapes come from transformers' own model on the meta device, so it loads as that config), written from one reused random
block, in a temporary folder deleted afterwards. Then it times, interleaved, the median of
``--rounds`` wall-clock runs of each whole process (start-up and imports included):

    cp -r SRC DST
    python -m compressor -q prune SRC --recipe R -o OUT --out-of-core --verify none     (R: explicit, --remove)
    python -c "import compressor.cli"  and  python -m compressor --help   (for context)
    python -c "import compressor.pipeline"                                (what prune imports)

``--verify none``: the benchmark measures the rewrite against ``cp -r``; by default `prune` then
also loads the original and the pruned model to compare them (`equivalence`), which costs the
torch and transformers imports and two model loads, and is not what the target is about.

It reports prune / copy against the target (≤ 2, reported only: start-up imports count in
it), for the medians and for the fastest run of each (cp on this VM is bimodal, 0.3 or 0.8 s
for 1.3 GB: its fastest runs are the harder baseline) and the prune's peak RSS (``wait4``) against the
budget "largest tensor + 300 MB", which alone sets the exit status. The page cache cannot be dropped without root, so every command
runs once untimed first: both read a warm source. Dirty pages are flushed (``sync``, untimed)
before each run so that one run's writeback is not billed to the next.

Last, in process, it times the two ways to get the SHA-256 the manifest records of every
written byte (`checkpoint.HashingWriter` explains the choice): a kernel copy followed by a
hashing read of the output, against the user-space copy that hashes each chunk it holds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
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
RATIO_TARGET = 2.0  # issue 14: prune as a whole process within twice a plain copy
RANDOM_BLOCK = 16 * 2**20
PRUNE = "compressor prune --out-of-core --verify none"
IMPORT_PRUNE = 'python -c "import compressor.pipeline"'  # what `prune` imports before it starts


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


def timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS in bytes of ``command``, run as a whole process."""
    os.sync()  # untimed: earlier runs' dirty pages are written back now, not during this run
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)  # wait4: this child's own ru_maxrss
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"`{shlex.join(command)}` failed:\n{errors.read().decode(errors='replace')}")
    return seconds, usage.ru_maxrss * 1024  # KiB on Linux


def whole_processes(source: Path, scratch: Path, remove: list[int], rounds: int) -> dict[str, list[tuple[float, int]]]:
    """Each command once untimed, then ``rounds`` interleaved timed runs of each."""
    recipe = scratch / "recipe.yaml"
    recipe.write_text(f"version: 1\nname: bench-explicit\nselect:\n  op: explicit\n  blocks: {remove}\n")
    copy, pruned = scratch / "copy", scratch / "pruned"
    python = sys.executable
    commands: dict[str, tuple[list[str], Path | None]] = {
        "cp -r": (["cp", "-r", str(source), str(copy)], copy),
        PRUNE: (
            # --verify none: the rewrite alone is timed (see the module docstring).
            [python, "-m", "compressor", "-q", "prune", str(source), "--recipe", str(recipe), "-o", str(pruned), "--out-of-core"]
            + ["--verify", "none"],
            pruned,
        ),
        'python -c "import compressor.cli"': ([python, "-c", "import compressor.cli"], None),
        "python -m compressor --help": ([python, "-m", "compressor", "--help"], None),
        IMPORT_PRUNE: ([python, "-c", "import compressor.pipeline"], None),
    }
    runs: dict[str, list[tuple[float, int]]] = {label: [] for label in commands}
    for round_ in range(rounds + 1):
        for label, (command, output) in commands.items():
            result = timed(command)
            if round_:  # round 0 warms the page cache and the interpreter's files
                runs[label].append(result)
            if output is not None:
                shutil.rmtree(output)
    return runs


def kernel_copy_then_hash(source: Path, out: Path) -> str:
    """Strategy (a): the kernel copies (sendfile/copy_file_range; the bytes never enter this
    process), then a second pass reads the fresh output back from the page cache to hash it."""
    from .manifest import sha256

    shutil.copyfile(source, out)
    return sha256(out)


def hashing_copy(source: Path, out: Path) -> str:
    """Strategy (b), what prune does: one user-space pass that hashes the chunks it copies."""
    from .checkpoint import HashingWriter

    with open(source, "rb", buffering=0) as src, open(out, "wb", buffering=0) as dst, HashingWriter(dst) as writer:
        writer.copy(src, 0, source.stat().st_size)
        return writer.finish().sha256


def copy_strategies(source: Path, scratch: Path, rounds: int) -> dict[str, float]:
    """Median seconds of each strategy over every weight file of ``source`` (interleaved, after a warm-up)."""
    strategies: dict[str, Callable[[Path, Path], str]] = {
        "kernel copy, then hash the output": kernel_copy_then_hash,
        "user-space copy hashing each chunk": hashing_copy,
    }
    files = sorted(source.glob("*.safetensors"))
    seconds: dict[str, list[float]] = {label: [] for label in strategies}
    for round_ in range(rounds + 1):
        digests = set()
        for label, strategy in strategies.items():
            out = scratch / "strategy"
            out.mkdir()
            os.sync()
            start = time.perf_counter()
            digests.add(tuple(strategy(path, out / path.name) for path in files))
            if round_:
                seconds[label].append(time.perf_counter() - start)
            shutil.rmtree(out)
        if len(digests) != 1:
            raise SystemExit("the two strategies hash different bytes: a bug in the benchmark or in HashingWriter")
    return {label: statistics.median(values) for label, values in seconds.items()}


def run(args: argparse.Namespace) -> int:
    mb = 2**20
    remove = [int(i) for i in args.remove.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-", dir=args.workdir) as scratch:
        root = Path(scratch)
        start = time.perf_counter()
        # In a process of its own: generating imports torch and transformers, and a child forked
        # from a process that holds them starts with their pages, which its peak RSS would count.
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            generated = pool.submit(generate, root / "source", args.preset, args.layers, int(args.shard_mb * mb)).result()
        print(
            f"generated {generated.total_bytes / 1e9:.2f} GB ({args.preset} shape, {args.layers} blocks, bf16, "
            f"{generated.files} shards) in {time.perf_counter() - start:.1f} s; largest tensor "
            f"{generated.largest[0]} = {generated.largest[1] / mb:.0f} MiB; removing blocks {remove}",
            flush=True,
        )
        runs = whole_processes(generated.folder, root, remove, args.rounds)
        strategies = copy_strategies(generated.folder, root, args.rounds) if args.strategies else {}

    median = {label: statistics.median(s for s, _ in values) for label, values in runs.items()}
    copy_s, prune_s = median["cp -r"], median[PRUNE]
    ratio = prune_s / copy_s
    peak = max(rss for _, rss in runs[PRUNE])
    budget = generated.largest[1] + RSS_SLACK
    print(f"\nwhole processes, wall seconds, median of {args.rounds} interleaved runs (after one untimed run each):")
    for label, seconds in median.items():
        note = f"   {ratio:.2f} × cp -r, peak RSS {peak / mb:.0f} MiB" if label == PRUNE else ""
        print(f"  {label:<52} {seconds:>6.2f}{note}")
    best = {label: min(s for s, _ in runs[label]) for label in ("cp -r", PRUNE)}
    best_ratio = best[PRUNE] / best["cp -r"]
    print(f"  {'fastest runs, prune / cp -r':<40} {best[PRUNE]:>6.2f} / {best['cp -r']:.2f} = {best_ratio:.2f} × cp -r")
    rewrite_s = prune_s - median[IMPORT_PRUNE]
    print(f"  {'prune less its imports (difference)':<40} {rewrite_s:>6.2f}   {rewrite_s / copy_s:.2f} × cp -r")
    if strategies:
        print(f"\nhashing every written byte, in process, {generated.total_bytes / 1e9:.2f} GB, median of {args.rounds}:")
        for label, seconds in strategies.items():
            print(f"  {label:<40} {seconds:>6.2f}   {generated.total_bytes / 1e9 / seconds:.2f} GB/s")
    print(
        f"\ntargets: prune ≤ {RATIO_TARGET:g} × cp -r as whole processes: median {ratio:.2f}, fastest {best_ratio:.2f} -> "
        f"{'met' if max(ratio, best_ratio) <= RATIO_TARGET else 'NOT MET'}; "
        f"peak RSS < largest tensor + 300 MiB = {budget / mb:.0f} MiB: {peak / mb:.0f} -> {'PASS' if peak < budget else 'FAIL'}"
    )
    # Only memory fails the run: the time ratio depends on start-up imports too, reported above.
    return 0 if peak < budget else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compressor.bench_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama-1.1b")
    parser.add_argument("--layers", type=int, default=22, help="decoder blocks in the generated checkpoint (22: TinyLlama-1.1B itself)")
    parser.add_argument("--remove", default="3,6,9", help="comma-separated block indices to remove")
    parser.add_argument("--shard-mb", type=float, default=500.0, help="maximum shard size")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each command; the median is reported")
    parser.add_argument("--no-strategies", dest="strategies", action="store_false", help="skip the in-process hashing comparison")
    parser.add_argument("--workdir", default=None, help="where the temporary checkpoint goes (default: system temp)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
