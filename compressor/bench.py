"""`make bench`: performance figures as ratios measured in one run, printed as a table.

1. Calibration overhead: the hook-based calibration pass vs a plain forward pass over the same
   batches (same model, same data) — what the streaming metrics cost (`bench_scale` measures
   it on more shapes, with batching and memory).
2. Pruning payoff: forward (prefill) latency and greedy decode throughput of a model with a
   quarter of its blocks removed vs the original, same inputs.
3. Functional scans (CPU, float32, 8 samples): a plain calibration pass, the skip-one
   ablation scan and a 3-step greedy (SLEB) order vs a plain forward pass over the same
   batches, on the demo's LLaVA shape (8 blocks) and on a 30-block Llama: cost in forward
   passes from wall time, from CPU time and from the scans' own block-call counts; and each
   one's peak memory (peak RSS above the loaded model, each in a fresh process).
4. Command start-up: whole-process wall time of the commands that need no model (`--help`,
   `recipe check`, `arch list`, `plan --model`) against `import torch, transformers`, which
   they must not pay (target < 0.5 s each).

Models are random Llama decoders built from config (nothing is downloaded). Timing follows
the usual protocol: warm-up, repeats, median; synchronised on CUDA, labelled CPU otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .architectures import adapter_for_model
from .bench_scale import _reset_peak_rss, _rss_kb, interleaved
from .calibrate import CalibrationOptions, calibrate, calibration_context
from .data import Sample, build_batch, load_samples, plan_batches
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


# -- 3. functional scans --------------------------------------------------------------------
FUNCTIONAL_SHAPES = {
    "demo": "LLaVA demo shape (8 blocks, hidden 256, CLIP tower), 8 shape questions",
    "llama30": "random Llama (30 blocks, hidden 256), 8 samples x ~40 tokens",
}
PASSES = ("forward", "calibration", "ablation", "greedy 3")


def functional_setup(shape: str, workdir: Path) -> dict[str, Callable[[], dict | None]]:
    """The model of ``shape`` (random weights, float32, CPU) and its passes over 8 samples in
    batches of 8: a plain forward pass, a plain calibration, the ablation scan, a 3-step
    greedy order. The scans return their report metrics (with their block-call counts)."""
    from .functional import measure

    if shape == "demo":
        from .demo.model import build_demo_model
        from .demo.shapes import generate_dataset, vocabulary

        model, processor = build_demo_model(vocabulary(), seed=0)
        data = load_samples(generate_dataset(workdir, seed=0, n_train=0, n_calibration=8, n_eval=0).calibration)
    else:
        processor = build_tokenizer(WORDS)
        model, data = build_model(256, 30, len(processor), torch.device("cpu")), samples(8, 32)
    model.eval()
    adapter = adapter_for_model(model)
    cpu = torch.device("cpu")
    chunks = plan_batches(processor, data, batch_size=8, token_budget=None, max_length=None)

    def forward() -> None:
        with torch.inference_mode():
            for chunk in chunks:
                model(**build_batch(processor, chunk, with_answer=True, mark_answer=False).inputs, use_cache=False)

    def calibration() -> None:
        calibrate(model, processor, adapter, data, options=CalibrationOptions(num_samples=None, batch_size=8, max_length=None))

    def scan(ablation: bool, greedy: int) -> dict:
        with calibration_context(model):
            return measure(
                model, processor, adapter, chunks, device=cpu, max_length=None, ablation=ablation, greedy=greedy, attention=False
            )[0]

    return dict(zip(PASSES, (forward, calibration, lambda: scan(True, 0), lambda: scan(False, 3))))


def child_functional_memory(shape: str, name: str, workdir: Path) -> dict:
    """In a fresh process: peak RSS of one pass above the RSS just before it (model built,
    libraries loaded, one forward pass run so that kernels and thread pools exist)."""
    torch.set_num_threads(1)  # as the timed runs
    passes = functional_setup(shape, workdir)
    passes["forward"]()
    reset = _reset_peak_rss()
    before = _rss_kb("VmRSS")
    passes[name]()
    return {"peak_extra_kb": _rss_kb("VmHWM") - before, "peak_reset": reset}


def functional_memory(shape: str, name: str, workdir: Path) -> dict:
    # glibc raises its mmap threshold as big blocks are freed, after which freed tensors stay
    # in its heap and the peak RSS depends on allocation history; fixed at 64 KiB, every
    # tensor of that size or more is its own mapping, returned when freed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, "-m", "compressor.bench", "--child-functional", shape, name, str(workdir)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def functional_section(shape: str, workdir: Path) -> list[tuple[str, ...]]:
    """Rows of the table for ``shape``: each pass's time against the plain forward pass
    (median of the forward passes run between the others, against drift), and its memory."""
    passes = functional_setup(shape, workdir)
    passes["forward"]()  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in PASSES}
    cpu: dict[str, list[float]] = {name: [] for name in PASSES}
    calls: dict[str, float] = {"forward": 1.0, "calibration": 1.0}  # every block once per batch
    for name in ("forward", "calibration", "forward", "calibration", "forward", "ablation", "forward", "greedy 3", "forward"):
        started, started_cpu = time.perf_counter(), time.process_time()
        metrics = passes[name]()
        wall[name].append(time.perf_counter() - started)
        cpu[name].append(time.process_time() - started_cpu)
        if metrics:
            calls[name] = metrics["ablation" if name == "ablation" else "greedy"]["cost"]["forward_equivalents"]
    unit, unit_cpu = statistics.median(wall["forward"]), statistics.median(cpu["forward"])
    memory = {name: functional_memory(shape, name, workdir)["peak_extra_kb"] / 1024 for name in PASSES[1:]}
    rows = []
    for name in PASSES:
        t, c = statistics.median(wall[name]), statistics.median(cpu[name])
        peak = f"{memory[name]:.1f} MB" if name in memory else ""
        ratio = f"{memory[name] / memory['calibration']:.2f}x" if name in memory else ""
        rows.append((name, f"{t:.3f} s", f"{t / unit:.2f}", f"{c / unit_cpu:.2f}", f"{calls[name]:.2f}", peak, ratio))
    return rows


def print_functional() -> None:
    print(
        "\n3. functional scans on the CPU (1 thread), float32; cost in plain forward passes "
        "over the same batches (by wall time, by CPU time, by decoder-block calls); peak RSS above the loaded model, "
        "each pass in a fresh process"
    )
    header = ("pass", "wall", "x fwd (wall)", "x fwd (CPU)", "x fwd (calls)", "peak RSS", "x calibration")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a busy shared machine then slows the runs, it does not stall them
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for shape, label in FUNCTIONAL_SHAPES.items():
                print(f"\n{label}:")
                rows = [header, *functional_section(shape, Path(workdir))]
                widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
                for row in rows:
                    print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    finally:
        torch.set_num_threads(threads)


def payoff(args: argparse.Namespace) -> None:
    """Sections 1 and 2."""
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


def print_startup(repeats: int = 5) -> None:
    """Section 4: median wall time of whole `compressor` processes that load no model."""
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / "model"
        model.mkdir()
        LlamaConfig(num_hidden_layers=8, architectures=["LlamaForCausalLM"]).to_json_file(model / "config.json")
        commands = {
            "compressor --help": ["--help"],
            "compressor recipe check recipes/*.yaml": ["recipe", "check", *map(str, sorted(recipes.glob("*.yaml")))],
            "compressor arch list": ["arch", "list"],
            "compressor plan --recipe explicit.yaml --model M": ["plan", "--recipe", str(recipes / "explicit.yaml"), "--model", str(model)],
        }
        rows = [("command", "median s", f"of {repeats}")]
        for label, args in {**commands, 'python -c "import torch, transformers"': None}.items():
            argv = (
                [sys.executable, "-c", "import torch, transformers"] if args is None else [sys.executable, "-m", "compressor", "-q", *args]
            )
            times = []
            for _ in range(repeats + 1):  # the first run warms the page cache, untimed
                started = time.perf_counter()
                subprocess.run(argv, check=True, capture_output=True)
                times.append(time.perf_counter() - started)
            rows.append((label, f"{statistics.median(times[1:]):.2f}", ""))
    print("\n4. command start-up (whole processes; commands that load no model must not import torch/transformers)")
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--words", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only-functional", action="store_true", help="run section 3 alone")
    parser.add_argument("--child-functional", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_functional:
        shape, name, workdir = args.child_functional
        print(json.dumps(child_functional_memory(shape, name, Path(workdir))))
        return
    if not args.only_functional:
        payoff(args)
    print_functional()
    if not args.only_functional:
        print_startup()


if __name__ == "__main__":
    main()
