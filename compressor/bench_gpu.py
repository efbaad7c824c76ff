"""`make bench-gpu`: the GPU-scale figures of compressor, one command, one table (< 8 min on an H200).

Rows, every one measured in the run (nothing typed in):

1. calibration: time of `calibrate` (every cheap metric, hooks on all blocks) over a plain
   forward pass of the same batches, on a random Qwen3-VL-8B in bfloat16 built from a config
   object directly on the GPU (nothing downloaded). The class is the real
   ``Qwen3VLForConditionalGeneration`` with Qwen3-VL-8B's text decoder (hidden 4096, 36 blocks,
   MLP 12288, 32 query / 8 KV heads, head_dim 128, vocabulary 151936, interleaved M-RoPE
   24/20/20, rope theta 5e6 — transformers' own ``Qwen3VLTextConfig`` defaults are a 7B-style
   shape, not these) and a 3-block stand-in vision tower: only text runs through it, and its
   three DeepStack indexes keep blocks 0-2 fixed as in the real model. Timed interleaved
   (`bench_scale.overhead`: synchronize + perf_counter, warm-up, median of neighbouring ratios).
2. latency: prefill and decode speedup after removing 9 of the 36 blocks (a quarter, late in
   the stack, by `surgery.apply_plan`) beside the ideal Amdahl speedup computed from the base
   model's measured per-block time shares (`latency.measure_latency` / `compare_latency`:
   CUDA events, warm-up, medians).
3. memory: peak GPU memory (``torch.cuda.max_memory_allocated``) of each workload, base and pruned.
4. onnx: ONNX Runtime vs PyTorch on a small pruned Llama: the CUDA provider when the installed
   onnxruntime has it (else the row says why it is unavailable, and no figure), and the CPU
   provider. The graph is the one `onnx_export` writes for a text decoder (`onnx_graphs`:
   ``decoder_spec``, ``Decoder``, legacy ``torch.onnx.export``); `export_onnx` itself is not
   called because its end-to-end check generates with onnxruntime-genai, which the GPU image
   lacks. Parity is `onnx_verify.verify_decoder`: logits and KV cache over a left-padded
   prefill and two cached steps, against PyTorch in float32 on the CPU.

Every section runs on its own: one that fails prints its reason and the others go on, and a
section is skipped with a message when less time is left of ``--budget`` than it needs (450 s:
the 8 minutes less the interpreter's start). ``--smoke`` runs the same code at tiny shapes on
the CPU in seconds (tests/test_bench_gpu.py).

On the GPU machine, from the repository root, with the image's own python3 (its CUDA torch,
transformers, onnx, onnxruntime, pyyaml, tqdm; no venv, nothing of torch installed): compressor's
recipe and plan modules import pydantic, which that image lacks, so the `WHEELS` travel along
(2.8 MB), fetched here into ``.whl/`` (kept out of git; named in the device run's carry):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 -d .whl pydantic==2.14.4 pydantic-core==2.50.5 \\
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
    # there:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \\
        && export PYTHONPATH=/tmp/site && make bench-gpu     # or: python3 -m compressor.bench_gpu
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# The limit is 8 minutes for the whole command; the clock starts after the interpreter
# and torch are loaded, so 30 s of the 480 are left for those.
BUDGET_S = 450.0
# What compressor's bench path imports beyond the GPU image (recipe.py and planner.py use pydantic),
# with the versions CI pins: carried there as wheels (see the module docstring).
WHEELS = ("pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5", "typing-extensions==4.16.0")

# Qwen3-VL-8B-Instruct's text_config (the same decoder as Qwen3-8B).
QWEN3_VL_8B_TEXT = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=262144,
    # transformers 5 folds these two into `rope_parameters`; 4.57 reads them as they are.
    rope_theta=5000000.0,
    rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
)
# A stand-in vision tower: text-only inputs never run it; three DeepStack indexes as the real one
# has, so the adapter fixes the same leading blocks. Its output width must be the text width.
STAND_IN_VISION = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, deepstack_visual_indexes=[0, 1, 2])


@dataclass(frozen=True)
class Settings:
    """Everything that differs between the GPU run and the CPU smoke run."""

    text: dict[str, Any]
    dtype: torch.dtype
    calib_samples: int
    calib_words: tuple[int, int]
    calib_repeats: int
    prompt_lengths: tuple[int, ...]
    decode_prompt: int
    new_tokens: int
    latency_repeats: int
    share_repeats: int
    onnx_llama: dict[str, Any]
    onnx_remove: tuple[int, ...]
    needs_s: dict[str, float]  # rough cost of each section, for the budget guard


GPU = Settings(
    text=QWEN3_VL_8B_TEXT,
    dtype=torch.bfloat16,
    calib_samples=64,
    calib_words=(200, 500),  # batches of 8 x ~500 tokens: the GPU is busy, not waiting on launches
    calib_repeats=5,
    prompt_lengths=(512, 2048),
    decode_prompt=512,
    new_tokens=64,
    latency_repeats=10,
    share_repeats=3,
    onnx_llama=dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, vocab_size=2000
    ),
    onnx_remove=(5, 6),
    needs_s={"model": 90, "calibration": 90, "latency": 200, "onnx": 60},
)
SMOKE = Settings(
    text=dict(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_theta=5000000.0,
        rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
    ),
    dtype=torch.float32,
    calib_samples=8,
    calib_words=(10, 30),
    calib_repeats=2,
    prompt_lengths=(32,),
    decode_prompt=16,
    new_tokens=4,
    latency_repeats=2,
    share_repeats=1,
    onnx_llama=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=300
    ),
    onnx_remove=(2,),
    needs_s={"model": 5, "calibration": 5, "latency": 10, "onnx": 10},
)


@dataclass
class Row:
    section: str
    measure: str
    value: str
    detail: str = ""
    status: str = "ok"  # ok | failed | skipped | unavailable


@dataclass
class Bench:
    """The rows so far, the figures behind them, and the clock of the time budget."""

    budget_s: float
    started: float = field(default_factory=time.perf_counter)
    rows: list[Row] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        # Printed as it comes: a run killed from outside still shows what it measured.
        print(f"  [{row.status}] {row.section}: {row.measure}: {row.value}" + (f" ({row.detail})" if row.detail else ""), flush=True)

    def section(self, name: str, needs_s: float, fn: Callable[[], None]) -> bool:
        """Run ``fn`` unless the budget is too short; a failure becomes a row, never the end."""
        left = self.left()
        if left < needs_s:
            self.add(
                Row(
                    name,
                    "section",
                    "skipped",
                    f"{max(left, 0):.0f} s of the {self.budget_s:.0f} s budget left, needs ~{needs_s:.0f} s",
                    "skipped",
                )
            )
            return False
        try:
            fn()
            return True
        except Exception as error:  # a bench reports every section it can: any failure is a result
            traceback.print_exc(file=sys.stderr)
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            if isinstance(error, ModuleNotFoundError):
                reason += f"; carry the wheels {', '.join(WHEELS)} (module docstring)"
            self.add(Row(name, "section", "failed", reason, "failed"))
            return False


# -- the model ------------------------------------------------------------------------------
class _Ids:
    """What `measure_latency` needs of a processor for synthetic prompts: a vocabulary size and
    the ids never to draw (Qwen3-VL's image and video placeholders would ask for pixels)."""

    def __init__(self, size: int, special: list[int]):
        self.size = size
        self.all_special_ids = special

    def __len__(self) -> int:
        return self.size


def build_qwen3_vl(settings: Settings, device: torch.device) -> Any:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    vision = {**STAND_IN_VISION, "out_hidden_size": settings.text["hidden_size"]}
    # eos None: random weights must never stop a timed decode early.
    config = Qwen3VLConfig(text_config={**settings.text, "eos_token_id": None}, vision_config=vision)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(settings.dtype)  # built in bf16 on the device: 8 B params never exist in fp32
    try:
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.architectures = [type(model).__name__]
    model.generation_config.eos_token_id = None
    return model.eval()


def describe(model: Any) -> str:
    text = model.config.text_config
    params = sum(p.numel() for p in model.parameters())
    return (
        f"{type(model).__name__}, random weights: text decoder hidden {text.hidden_size}, {text.num_hidden_layers} blocks, "
        f"MLP {text.intermediate_size}, {text.num_attention_heads}/{text.num_key_value_heads} heads, head_dim {text.head_dim}, "
        f"vocab {text.vocab_size}; stand-in vision tower; {params / 1e6:,.1f} M params, {str(model.dtype).removeprefix('torch.')}"
    )


# -- sections -------------------------------------------------------------------------------
def calibration_section(bench: Bench, model: Any, settings: Settings, device: torch.device) -> None:
    from .bench_scale import WORDS, overhead, samples
    from .calibrate import CalibrationOptions
    from .demo.processor import build_tokenizer

    data = samples(settings.calib_samples, settings.calib_words)
    options = CalibrationOptions(num_samples=None, batch_size=8, max_length=None)
    cost = overhead(model, build_tokenizer(WORDS), data, options, device, settings.calib_repeats)
    bench.figures["calibration"] = cost
    bench.add(
        Row(
            "calibration",
            "calibration / plain forward",
            f"{cost['ratio']:.3f}x",
            f"{cost['calibration']:.3f} s vs {cost['plain']:.3f} s (medians of {settings.calib_repeats}, interleaved) over "
            f"{len(data)} samples, {cost['tokens']:,} tokens; {cost['tokens_per_s']:,.0f} tokens/s calibrated",
        )
    )


def latency_section(bench: Bench, model: Any, settings: Settings) -> None:
    from .architectures import adapter_for_model
    from .bench_latency import quarter
    from .latency import compare_latency, measure_latency
    from .planner import RemovedBlock, SurgeryPlan
    from .surgery import apply_plan

    adapter = adapter_for_model(model)
    config = model.config
    ids = _Ids(
        config.text_config.vocab_size,
        [config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id],
    )
    options = dict(
        prompt_lengths=settings.prompt_lengths,
        batch_sizes=(1,),
        new_tokens=settings.new_tokens,
        repeats=settings.latency_repeats,
        warmup=2,
        share_repeats=settings.share_repeats,
        decode_prompt_length=settings.decode_prompt,
    )
    base = measure_latency(model, ids, adapter, **options)
    num_blocks = len(adapter.blocks(model))
    removed = quarter(num_blocks)
    plan = SurgeryPlan(
        recipe="bench-gpu", op="explicit", num_blocks=num_blocks, removed=tuple(RemovedBlock(i, "bench-gpu") for i in removed)
    )
    apply_plan(model, plan, adapter)  # in place: the removed blocks are freed, never two models at once
    pruned = measure_latency(model, ids, adapter, **options)
    comparison = compare_latency(base, pruned, removed)
    bench.figures["latency"] = {"base": base, "pruned": pruned, "comparison": comparison}
    gone = f"blocks {removed[0]}-{removed[-1]} ({len(removed)} of {num_blocks})"
    for phase in ("prefill", "decode"):
        for key, row in comparison[phase].items():
            b, p = base[phase][key], pruned[phase][key]
            if phase == "prefill":
                times = f"{b['median_s'] * 1e3:.1f} -> {p['median_s'] * 1e3:.1f} ms"
            else:
                times = f"{b['tokens_per_s']:.1f} -> {p['tokens_per_s']:.1f} tok/s, {settings.new_tokens} new tokens"
            ideal = row["ideal_speedup"]
            if ideal is None:  # the shares left no time outside the removed blocks
                bench.add(Row("latency", f"{phase} {key} speedup", f"{row['speedup']:.3f}x", f"{times}; no Amdahl bound", "failed"))
                continue
            share = f"removed {gone} held {row['removed_share']:.1%} of the base time; achieved/ideal {row['achieved_over_ideal']:.3f}"
            bench.add(Row("latency", f"{phase} {key} speedup", f"{row['speedup']:.3f}x vs ideal {ideal:.3f}x", f"{times}; {share}"))
    for phase in ("prefill", "decode"):
        for key in comparison[phase]:
            b, p = base[phase][key]["peak_memory"], pruned[phase][key]["peak_memory"]
            bench.add(
                Row(
                    "memory",
                    f"peak, {phase} {key}",
                    f"{_size(b['peak_bytes'])} -> {_size(p['peak_bytes'])}",
                    f"base -> pruned, {b['method']}; weights {_size(base['model']['weights_bytes'])} -> "
                    f"{_size(pruned['model']['weights_bytes'])}",
                )
            )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def onnx_section(bench: Bench, settings: Settings) -> None:
    import onnxruntime as ort
    from transformers import LlamaConfig, LlamaForCausalLM

    from .architectures import adapter_for_model
    from .onnx_graphs import Decoder, decoder_io, decoder_spec, export_graph
    from .onnx_verify import DEFAULT_TOLERANCE, DecoderProbe, verify_decoder
    from .planner import RemovedBlock, SurgeryPlan
    from .surgery import apply_plan

    torch.manual_seed(0)
    # As export_onnx runs it: float32 on the CPU, eager attention (SDPA with grouped KV heads
    # does not trace).
    model = LlamaForCausalLM(LlamaConfig(**settings.onnx_llama, max_position_embeddings=512, attn_implementation="eager")).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    adapter = adapter_for_model(model)
    n = adapter.num_blocks(model.config)
    apply_plan(model, SurgeryPlan("bench-gpu", "explicit", n, tuple(RemovedBlock(i, "bench-gpu") for i in settings.onnx_remove)), adapter)
    spec = decoder_spec(model, adapter)
    text = getattr(spec, "text", False)  # a text decoder's graph takes input_ids (transformers 5 text export)
    vocab, hidden = model.get_input_embeddings().weight.shape
    heads = model.config.num_key_value_heads
    head_dim = getattr(model.config, "head_dim", None) or hidden // model.config.num_attention_heads

    def first(b: int, s: int, g: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, vocab, (b, s), generator=g) if text else torch.randn(b, s, hidden, generator=g)

    # Traced with a non-empty past, so the past length stays a dynamic axis of the graph.
    batch, seq, past = 2, 4, 3
    args = (
        first(batch, seq),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq).expand(batch, seq).contiguous(),
        *(torch.randn(batch, heads, past, head_dim) for _ in range(2 * spec.num_blocks)),
    )
    name = "input_ids" if text else "inputs_embeds"

    def reference(ids, mask, pos, types, cache):
        return model(**{name: ids}, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)

    probe = DecoderProbe(graph="decoder", first_input=name, make_first=first, reference=reference)
    what = f"Llama {n} -> {spec.num_blocks} blocks (hidden {hidden}), float32; PyTorch on the CPU; graph: onnx_graphs' decoder ({name})"
    found: dict[str, Any] = {"model": what, "onnxruntime": ort.__version__, "providers": {}}
    bench.figures["onnx"] = found
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "decoder.onnx"
        started = time.perf_counter()
        export_graph(Decoder(model, spec), args, path, *decoder_io(spec))
        found["export_s"] = time.perf_counter() - started
        for provider in ("CUDAExecutionProvider", "CPUExecutionProvider"):
            measure = f"ORT {provider.removesuffix('ExecutionProvider')} vs PyTorch"
            why = _provider_missing(provider, ort)
            session = None
            if why is None:
                options = ort.SessionOptions()
                options.log_severity_level = 3
                session = ort.InferenceSession(str(path), options, providers=[provider])
                if session.get_providers()[0] != provider:  # ORT falls back when a provider's libraries do not load
                    why = f"onnxruntime {ort.__version__} lists {provider}, but its session ran on {session.get_providers()[0]}"
            if why is not None:
                found["providers"][provider] = {"unavailable": why}
                bench.add(Row("onnx", measure, "unavailable", why, "unavailable"))
                continue
            checks = verify_decoder(session, probe, tolerance=DEFAULT_TOLERANCE)
            worst, passed = max(c.max_abs_diff for c in checks), all(c.passed for c in checks)
            found["providers"][provider] = {"max_abs_diff": worst, "passed": passed, "checks": [c.to_dict() for c in checks]}
            bound = f"{'within' if passed else 'OUTSIDE'} {DEFAULT_TOLERANCE:g} x max(1, |output|)"
            detail = f"{what}; logits and KV cache over a left-padded prefill + 2 cached steps; export {found['export_s']:.1f} s"
            bench.add(Row("onnx", measure, f"max |diff| {worst:.2e} ({bound})", detail, "ok" if passed else "failed"))


def _provider_missing(provider: str, ort: Any) -> str | None:
    """Why ``provider`` cannot run here, or None when it can."""
    available = ort.get_available_providers()
    if provider not in available:
        hint = " (the CUDA provider ships in the onnxruntime-gpu package)" if provider == "CUDAExecutionProvider" else ""
        return f"onnxruntime {ort.__version__} offers {', '.join(available)}{hint}"
    if provider == "CUDAExecutionProvider" and not torch.cuda.is_available():
        return f"onnxruntime {ort.__version__} has {provider}, but torch sees no CUDA device"
    return None


# -- the run --------------------------------------------------------------------------------
def run(settings: Settings, device: torch.device, budget_s: float) -> Bench:
    import transformers

    bench = Bench(budget_s)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads (labelled CPU timing)"
    bench.figures["environment"] = {
        "device": where,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }
    print(f"device: {where}; torch {torch.__version__}, transformers {transformers.__version__}; budget {budget_s:.0f} s", flush=True)

    holder: dict[str, Any] = {}

    def build() -> None:
        started = time.perf_counter()
        holder["model"] = build_qwen3_vl(settings, device)
        built = {"description": describe(holder["model"]), "build_s": time.perf_counter() - started}
        bench.figures["model"] = built
        bench.add(
            Row(
                "model",
                "random Qwen3-VL-8B shape" if settings is GPU else "tiny Qwen3-VL",
                f"built in {built['build_s']:.1f} s",
                built["description"],
            )
        )

    needs = settings.needs_s
    if bench.section("model", needs["model"], build):
        model = holder.pop("model")
        bench.section("calibration", needs["calibration"], lambda: calibration_section(bench, model, settings, device))
        bench.section("latency", needs["latency"], lambda: latency_section(bench, model, settings))
        del model  # the ONNX section's small model needs none of it
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        for name in ("calibration", "latency"):
            bench.add(Row(name, "section", "skipped", "no model (see the model row)", "skipped"))
    bench.section("onnx", needs["onnx"], lambda: onnx_section(bench, settings))
    bench.figures["elapsed_s"] = time.perf_counter() - bench.started
    return bench


def table(rows: list[Row]) -> str:
    cells = [["section", "measure", "value", "how / detail"]] + [[r.section, r.measure, r.value, r.detail] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3] for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 12)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (seconds): what the tests run")
    parser.add_argument("--device", default="auto", help="default: cuda when present (cpu with --smoke)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds; later sections are skipped when too little is left")
    parser.add_argument("--json", type=Path, help="also write every row and figure here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    else:
        device = torch.device(args.device)
    settings = SMOKE if args.smoke else GPU
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: running the GPU shapes on the CPU will not finish in the budget; use --smoke", flush=True)
    bench = run(settings, device, args.budget)
    mode = "smoke" if args.smoke else "full"
    print(f"\ncompressor bench-gpu ({mode}): {bench.figures['elapsed_s']:.0f} s of the {args.budget:.0f} s budget")
    print(table(bench.rows))
    result = {"settings": "smoke" if args.smoke else "gpu", "rows": [asdict(r) for r in bench.rows], "figures": bench.figures}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
