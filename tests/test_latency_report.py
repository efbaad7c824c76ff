"""Latency measurement and report rendering, without assertions on real timing values.

The protocol is checked with fake clocks (a scripted one, and one that ticks once per mark),
so medians, p90s, block shares and decode throughput are exact numbers; real-clock runs only
check structure and invariants that hold however slow the machine is.
"""

from __future__ import annotations

import base64
import copy
import json
import random

import numpy as np
import pytest
import torch

from compressor.architectures import adapter_for_model
from compressor.errors import InputError
from compressor.latency import (
    amdahl_speedup,
    compare_latency,
    find_onnx,
    measure_latency,
    measure_onnx,
    percentile,
    plain_token_ids,
    summarize,
    time_repeats,
)
from compressor.planner import RemovedBlock, SurgeryPlan
from compressor.report_render import markdown, render_plots, write_html, write_markdown
from compressor.surgery import apply_plan

from .conftest import build_tiny, write_data

FAST = dict(prompt_lengths=(8,), batch_sizes=(1,), new_tokens=3, repeats=2, warmup=1, share_repeats=1)


class ScriptedClock:
    """Time moves only when the code under test says so (``advance``)."""

    label = "fake"

    def __init__(self):
        self.now = 0.0
        self.syncs = 0

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def mark(self) -> float:
        return self.now

    def elapsed(self, start: float, end: float) -> float:
        return end - start

    def sync(self) -> None:
        self.syncs += 1


class TickClock(ScriptedClock):
    """Every mark is one second after the previous one."""

    def mark(self) -> float:
        self.now += 1.0
        return self.now


def _hook_counts(blocks) -> list[tuple[int, int]]:
    return [(len(b._forward_pre_hooks), len(b._forward_hooks)) for b in blocks]


@pytest.fixture(scope="module")
def llama():
    model, tokenizer = build_tiny("llama", layers=4)
    return model, tokenizer, adapter_for_model(model)


@pytest.fixture(scope="module")
def pruned_llama(llama):
    model, tokenizer, adapter = llama
    plan = SurgeryPlan(recipe="t", op="explicit", num_blocks=4, removed=(RemovedBlock(1, "t"), RemovedBlock(2, "t")))
    return apply_plan(copy.deepcopy(model), plan, adapter), tokenizer, adapter


# -- protocol -------------------------------------------------------------------------------
def test_time_repeats_discards_warmup_and_summarizes_the_repeats():
    clock = ScriptedClock()
    durations = iter([100.0, 100.0, 5, 1, 4, 2, 3, 9, 7, 8, 6, 10])
    times = time_repeats(lambda: clock.advance(next(durations)), repeats=10, warmup=2, clock=clock)
    assert times == [5, 1, 4, 2, 3, 9, 7, 8, 6, 10]
    assert clock.syncs >= 10  # the device is drained before every timed repeat
    summary = summarize(times)
    assert summary["median_s"] == 5.5
    assert summary["p90_s"] == pytest.approx(9.1)  # linear interpolation between ranks
    assert summary["times_s"] == times and summary["repeats"] == 10
    assert (summary["min_s"], summary["max_s"]) == (1, 10)


def test_percentile_matches_numpy():
    rng = random.Random(0)
    for n in (1, 2, 3, 7, 20):
        values = [rng.random() for _ in range(n)]
        for q in (0, 50, 90, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_amdahl_ideal_speedup_on_hand_made_shares():
    shares = [0.1, 0.2, 0.3, 0.1]
    assert amdahl_speedup(shares, [1, 2]) == pytest.approx(2.0)
    assert amdahl_speedup(shares, [3]) == pytest.approx(1 / 0.9)
    assert amdahl_speedup(shares, []) == 1.0
    assert amdahl_speedup(shares, [1, 1, 2]) == pytest.approx(2.0)  # a block removed once
    assert amdahl_speedup([0.5, 0.5], [0, 1]) is None  # nothing left to run: no finite bound


# -- measuring ------------------------------------------------------------------------------
def test_measure_latency_structure_and_invariants(llama):
    model, tokenizer, adapter = llama
    blocks = adapter.blocks(model)
    hooks_before = _hook_counts(blocks)
    result = measure_latency(model, tokenizer, adapter, prompt_lengths=(8, 12), batch_sizes=(1, 2), new_tokens=3, repeats=3, warmup=1)
    json.dumps(result, allow_nan=False)
    assert result["format"] == "compressor.latency/1"
    assert result["model"]["num_blocks"] == 4
    assert result["environment"]["device"] == "cpu" and result["environment"]["gpu"] is None
    assert result["environment"]["timer"] == "cpu perf_counter"
    assert {"torch", "transformers", "dtype"} <= set(result["environment"])
    assert list(result["prefill"]) == ["text-L8-B1", "text-L12-B1", "text-L8-B2", "text-L12-B2"]
    assert list(result["decode"]) == ["text-L8-B1", "text-L8-B2"]
    assert result["onnx"] is None
    for entry in [*result["prefill"].values(), *result["decode"].values()]:
        timing = entry.get("decode", entry)
        assert len(timing["times_s"]) == 3
        assert timing["median_s"] == percentile(timing["times_s"], 50)
        assert timing["p90_s"] == percentile(timing["times_s"], 90)
        shares = entry["block_shares"]
        assert len(shares) == 4 and all(s > 0 for s in shares)
        assert sum(shares) <= 1.0  # blocks run inside the timed pass
        assert entry["peak_memory"]["peak_bytes"] > 0 and entry["peak_memory"]["method"].startswith("cpu")
    assert result["prefill"]["text-L12-B2"]["batch_size"] == 2 and result["prefill"]["text-L12-B2"]["prompt_length"] == 12
    assert _hook_counts(blocks) == hooks_before  # every timing hook was removed


def test_fake_clock_gives_exact_times_and_shares(llama):
    model, tokenizer, adapter = llama
    result = measure_latency(model, tokenizer, adapter, **{**FAST, "batch_sizes": (2,), "new_tokens": 4}, clock=TickClock())
    prefill = result["prefill"]["text-L8-B2"]
    assert prefill["times_s"] == [1.0, 1.0] and prefill["median_s"] == 1.0
    # One tick per block (before/after marks) inside a pass of 2 * 4 blocks + 1 ticks.
    assert prefill["block_shares"] == [pytest.approx(1 / 9)] * 4
    decode = result["decode"]["text-L8-B2"]
    # Marks: start, one per new token, end: first token 1 tick, 3 steps, 5 in all.
    assert decode["time_to_first_token"]["median_s"] == 1.0
    assert decode["decode"]["median_s"] == 3.0 and decode["end_to_end"]["median_s"] == 5.0
    assert decode["tokens_per_s"] == pytest.approx(2 * 3 / 3.0)
    assert decode["block_shares"] == [pytest.approx(1 / 9)] * 4  # per decode step: 4 blocks, 9 ticks
    assert result["environment"]["timer"] == "fake"


def test_decode_produces_exactly_the_requested_tokens_even_past_eos(llama, monkeypatch):
    model, tokenizer, adapter = llama
    prompt = torch.tensor([plain_token_ids(tokenizer, model)[:6].tolist()])
    with torch.no_grad():
        first = int(model.generate(input_ids=prompt, max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1])
    lengths = []
    original = model.generate

    def spy(**kwargs):
        output = original(**kwargs)
        lengths.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output

    monkeypatch.setattr(model, "generate", spy)
    # Whatever the model would say first is EOS now: unforced decoding would stop at once.
    monkeypatch.setattr(model.generation_config, "eos_token_id", first)
    result = measure_latency(model, tokenizer, adapter, **{**FAST, "new_tokens": 5})
    assert lengths and set(lengths) == {5}
    assert result["decode"]["text-L8-B1"]["new_tokens"] == 5


def test_sample_inputs_include_images(tmp_path):
    model, processor = build_tiny("llava", layers=2)
    adapter = adapter_for_model(model)
    from compressor.data import load_samples

    samples = load_samples(write_data(tmp_path, images=True, n=2))
    result = measure_latency(model, processor, adapter, **{**FAST, "prompt_lengths": ()}, samples=samples)
    assert list(result["prefill"]) == ["samples-B1"] and list(result["decode"]) == ["samples-B1"]
    entry = result["prefill"]["samples-B1"]
    assert entry["inputs"] == "samples" and entry["has_images"] is True
    assert entry["prompt_length"] > 16  # the image's 16 tokens are part of the prompt


def test_measure_latency_refuses_bad_arguments(llama):
    model, tokenizer, adapter = llama
    with pytest.raises(InputError, match="new_tokens"):
        measure_latency(model, tokenizer, adapter, **{**FAST, "new_tokens": 1})
    with pytest.raises(InputError, match="Nothing to measure"):
        measure_latency(model, tokenizer, adapter, **{**FAST, "prompt_lengths": ()})


def test_compare_latency_reports_achieved_ideal_and_their_ratio(llama, pruned_llama):
    clock = TickClock()
    base = measure_latency(*llama, **FAST, clock=clock)
    pruned = measure_latency(*pruned_llama, **FAST, clock=clock)
    # Make the pruned prefill twice as fast and its decode 1.5x as fast, by hand.
    pruned["prefill"]["text-L8-B1"]["median_s"] = base["prefill"]["text-L8-B1"]["median_s"] / 2
    pruned["decode"]["text-L8-B1"]["tokens_per_s"] = base["decode"]["text-L8-B1"]["tokens_per_s"] * 1.5
    comparison = compare_latency(base, pruned, [2, 1])
    json.dumps(comparison, allow_nan=False)
    assert comparison["removed"] == [1, 2] and comparison["block_fraction_removed"] == 0.5
    prefill = comparison["prefill"]["text-L8-B1"]
    ideal = 1 / (1 - 2 / 9)  # two of four blocks, each 1/9 of the pass under the tick clock
    assert prefill["speedup"] == pytest.approx(2.0)
    assert prefill["ideal_speedup"] == pytest.approx(ideal)
    assert prefill["achieved_over_ideal"] == pytest.approx(2.0 / ideal)
    decode = comparison["decode"]["text-L8-B1"]
    assert decode["speedup"] == pytest.approx(1.5) and decode["ideal_speedup"] == pytest.approx(ideal)
    assert comparison["onnx"] is None
    with pytest.raises(InputError, match="removed"):
        compare_latency(base, pruned, [1])
    with pytest.raises(InputError, match="within"):
        compare_latency(base, pruned, [1, 7])


# -- ONNX Runtime ---------------------------------------------------------------------------
def _merged_style_graph(path, vocab: int) -> None:
    """A stand-in for optimum's decoder_model_merged.onnx: KV-cache inputs and a branch flag
    (unused by the graph), logits from an embedding lookup."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch_size", 2, "past_sequence_length", 8]),
        helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, ["batch_size", 2, "past_sequence_length", 8]),
        helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]),
    ]
    table = helper.make_tensor("table", TensorProto.FLOAT, [vocab, vocab], np.eye(vocab, dtype=np.float32).ravel().tolist())
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"])],
        "merged",
        inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])],
        initializer=[table],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))


def test_find_onnx_looks_inside_and_beside_the_checkpoint(tmp_path):
    export = tmp_path / "exports" / "demo"
    (export / "hf").mkdir(parents=True)
    assert find_onnx(export / "hf") is None
    (export / "onnx").mkdir()
    (export / "onnx" / "decoder_model_merged.onnx").write_bytes(b"")
    assert find_onnx(export / "hf") == export / "onnx" / "decoder_model_merged.onnx"
    (export / "hf" / "onnx").mkdir()
    (export / "hf" / "onnx" / "model.onnx").write_bytes(b"")
    assert find_onnx(export / "hf") == export / "hf" / "onnx" / "model.onnx"


@pytest.mark.filterwarnings("ignore")  # the tracer's warnings about the export itself
def test_onnx_runtime_latency_of_an_exported_llama(llama, tmp_path):
    """The graph compressor's own exporter writes (KV cache inputs, fed an empty past)."""
    from compressor.onnx_export import export_onnx

    model, tokenizer, adapter = llama
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    export_onnx(tmp_path / "hf", tmp_path / "onnx", prefer_cuda=False)
    path = find_onnx(tmp_path / "hf")
    assert path == tmp_path / "onnx" / "model.onnx"
    result = measure_latency(model, tokenizer, adapter, **{**FAST, "batch_sizes": (1, 2)}, onnx=path)
    onnx = result["onnx"]
    assert "error" not in onnx, onnx
    assert onnx["provider"] == "CPUExecutionProvider" and onnx["device"] == "cpu"
    assert list(onnx["prefill"]) == list(result["prefill"])  # the same workloads as PyTorch
    entry = onnx["prefill"]["text-L8-B2"]
    assert len(entry["times_s"]) == 2 and entry["median_s"] == percentile(entry["times_s"], 50)
    comparison = compare_latency(result, result, [])
    assert comparison["onnx"]["provider"] == "CPUExecutionProvider"
    assert comparison["onnx"]["prefill"]["text-L8-B1"]["speedup"] == 1.0


def test_onnx_graph_with_cache_inputs_gets_an_empty_past(llama, tmp_path):
    model, tokenizer, _ = llama
    pool = plain_token_ids(tokenizer, model)
    _merged_style_graph(tmp_path / "decoder_model_merged.onnx", model.get_input_embeddings().num_embeddings)
    result = measure_onnx(tmp_path / "decoder_model_merged.onnx", pool, prompt_lengths=(5,), batch_sizes=(3,), repeats=2, warmup=0)
    assert "error" not in result, result
    assert result["prefill"]["text-L5-B3"]["batch_size"] == 3


def test_a_broken_onnx_file_is_recorded_not_raised(llama, tmp_path):
    model, tokenizer, _ = llama
    (tmp_path / "model.onnx").write_bytes(b"not a graph")
    result = measure_onnx(
        tmp_path / "model.onnx", plain_token_ids(tokenizer, model), prompt_lengths=(4,), batch_sizes=(1,), repeats=1, warmup=0
    )
    assert result["path"].endswith("model.onnx") and "error" in result


# -- rendering ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report(llama, pruned_llama):
    clock = TickClock()
    base = measure_latency(*llama, **FAST, clock=clock)
    pruned = measure_latency(*pruned_llama, **FAST, clock=clock)
    per_block = lambda *values: list(values)  # noqa: E731
    calibration = {
        "format": "compressor.calibration/1",
        "model": {"num_blocks": 4},
        "metrics": {
            "block_influence": {"all": per_block(0.3, 0.05, 0.04, 0.2), "text": per_block(0.2, 0.04, 0.03, 0.1), "image": [None] * 4},
            "tail_probability": {"0.05": {"all": per_block(0.9, 0.4, 0.3, 0.8), "text": [0.5] * 4, "image": [None] * 4}},
            "adjacent_distance": {"all": per_block(0.6, 0.5, 0.4, 0.3), "text": [0.5] * 4, "image": [None] * 4},
            "angular_distance": {
                "1": {"all": per_block(0.25, 0.08, 0.07, 0.2), "text": [0.1] * 4, "image": [None] * 4},
                "2": {"all": per_block(0.3, 0.1, 0.2), "text": [0.1] * 3, "image": [None] * 3},
            },
        },
    }
    return {
        "format": "compressor.validation/1",
        "verdict": {
            "passed": True,
            "summary": "PASS: 2 gates held",
            "gates": [
                {
                    "name": "max_accuracy_drop",
                    "threshold": 0.05,
                    "value": 0.02,
                    "passed": True,
                    "detail": "accuracy drop 2.0 points <= 5.0",
                },
                {"name": "min_prefill_speedup", "threshold": 1.2, "value": 1.4, "passed": True, "detail": "1.40x >= 1.20x"},
            ],
        },
        "models": {
            "base": {"ref": "tiny/base", "num_blocks": 4, "params": 5700000},
            "pruned": {"ref": "exports/<tiny>/hf", "num_blocks": 2, "params": 4400000, "removed": [1, 2]},
        },
        "accuracy": {
            "tasks": {
                "vqa": {"n": 200, "metric": "exact_match", "base": 0.9, "pruned": 0.86, "base_contains": 0.91, "pruned_contains": 0.87},
                "multiple_choice": None,
                "perplexity": {"n": 50, "base": 12.3, "pruned": 14.1},
            },
            "fidelity": {"n_positions": 400, "kl_mean": 0.05, "top1_agreement": 0.97},
        },
        "latency": {"base": base, "pruned": pruned, "comparison": compare_latency(base, pruned, [1, 2])},
        "calibration": calibration,
        "environment": {"device": "cpu", "dtype": "float32", "torch": torch.__version__, "transformers": "4.57.6", "gpu": None},
    }


def test_markdown_leads_with_the_verdict_and_has_every_table(report, tmp_path):
    path = write_markdown(report, tmp_path / "report.md")
    text = path.read_text(encoding="utf-8")
    assert text.index("Verdict: ✅ PASS") < text.index("## Accuracy") < text.index("## Latency")
    assert "PASS: 2 gates held" in text
    assert "| `max_accuracy_drop` | 0.05 | 0.02 | +0.03 | ✅ pass |" in text  # gate and by how much
    assert "| vqa | 200 | exact_match | 90.0 % | 86.0 % | -4.0 pts |" in text
    assert "| perplexity | 50 | perplexity ↓ | 12.3 | 14.1 | +14.6 % |" in text
    assert "Not run: multiple_choice." in text
    assert "| top-1 agreement | 97.0 % |" in text
    assert "| text, 8 tok × 1 | 1 s (1 s) | 1 s (1 s) | 1.00× | 1.29× | 78 % |" in text  # tick clock: exact
    assert "Greedy decoding" in text and "Peak memory" in text
    assert "Removed blocks (original 0-based numbering): **1, 2**." in text
    assert "| **1** (removed) |" in text and "block influence (image)" not in text  # no image tokens: no column
    assert "exports/\\<tiny>" not in text and "`exports/<tiny>/hf`" in text


def test_html_is_self_contained_with_embedded_plots(report, tmp_path):
    text = write_html(report, tmp_path / "report.html").read_text(encoding="utf-8")
    images = text.split('<img alt="')[1:]
    assert len(images) == 3
    for image in images:
        assert 'src="data:image/png;base64,' in image
        data = image.split("base64,", 1)[1].split('"', 1)[0]
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    assert "<script" not in text and "<link" not in text and 'src="http' not in text
    assert "exports/&lt;tiny&gt;/hf" in text  # escaped, not markup
    assert "<strong>PASS: 2 gates held</strong>" in text
    assert text.index("Verdict") < text.index("Accuracy")


def test_render_plots_returns_pngs_for_present_sections(report):
    plots = render_plots(report)
    assert set(plots) == {"redundancy", "accuracy", "latency"}
    assert all(png.startswith(b"\x89PNG") for png in plots.values())


def test_rendering_skips_null_sections(tmp_path):
    bare = {
        "format": "compressor.validation/1",
        "verdict": {
            "passed": False,
            "summary": "FAIL: 1 of 1 gates failed",
            "gates": [{"name": "max_accuracy_drop", "threshold": 0.05, "value": 0.08, "passed": False, "detail": "8.0 > 5.0"}],
        },
        "models": None,
        "accuracy": None,
        "latency": None,
        "calibration": None,
        "environment": None,
    }
    assert render_plots(bare) == {}
    md = markdown(bare)
    assert "Verdict: ❌ FAIL" in md and "| `max_accuracy_drop` | 0.05 | 0.08 | -0.03 | ❌ fail |" in md
    assert "## Accuracy" not in md and "## Latency" not in md and "## Environment" not in md
    html_text = write_html(bare, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<img" not in html_text and "Verdict" in html_text
    # Sections present but empty inside render without error.
    write_markdown({"latency": {"base": None, "pruned": None, "comparison": None}, "accuracy": {"tasks": {"vqa": None}}}, tmp_path / "x.md")
