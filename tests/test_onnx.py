"""ONNX export of pruned checkpoints: parity with PyTorch, greedy tokens through real runtimes
(onnxruntime-genai's og.Model for text decoders, our split runner for VLMs), the failures a
user can meet, and the CLI / recipe / validation entry points. Every test runs on
transformers 4.57 and 5.x alike."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers

from compressor import onnx_graphs, onnx_runtime
from compressor.architectures import ADAPTERS
from compressor.cli import main
from compressor.data import Sample, build_batch, load_samples
from compressor.errors import InputError, OutputExistsError, UnsupportedArchitectureError, VerificationError
from compressor.export import export_hf
from compressor.latency import find_onnx, measure_onnx
from compressor.loading import load_model
from compressor.onnx_export import GENAI_PACKAGE, export_onnx
from compressor.onnx_runtime import GENAI_CONFIG, METADATA, SplitRunner, genai_generate, mrope_positions
from compressor.onnx_verify import OnnxParityError
from compressor.surgery import apply_plan, count_parameters

from .conftest import FAMILIES, MULTIMODAL, removable
from .test_surgery import make_plan

# Families whose adapter refuses ONNX (`Adapter.onnx_refusal`) are checked for the refusal instead.
_ADAPTERS = {a.family: a for a in ADAPTERS}
REFUSED = tuple(f for f in FAMILIES if not _ADAPTERS[f].onnx)
TEXT = tuple(f for f in FAMILIES if f not in MULTIMODAL and f not in REFUSED)
VLM = tuple(f for f in FAMILIES if f in MULTIMODAL and f not in REFUSED)
REMOVED = [1, 4]  # of 6: keeps a mix of sliding and full layers where the family has both
# Text decoders export as one graph for onnxruntime-genai ("genai" layout); VLMs as split graphs.
EVERY_LAYOUT = (*TEXT, *VLM)
# transformers < 5 writes a mixture-of-experts block as a Python loop over one module per expert,
# which `check_traceable` refuses; 5.x keeps the experts as one tensor, which exports.
LOOPED_EXPERTS = {"qwen3_moe", "mixtral"} & set(TEXT) if int(transformers.__version__.split(".")[0]) < 5 else set()


@pytest.fixture(scope="module")
def pruned(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Every family, blocks 1 and 4 removed, as a verified HF checkpoint folder."""
    root = tmp_path_factory.mktemp("pruned")
    folders = {}
    for family, tiny in tiny_models.items():
        loaded = tiny.load()
        before = count_parameters(loaded.model)
        plan = make_plan(removable(REMOVED, loaded.adapter.fixed_blocks(loaded.model.config)))
        apply_plan(loaded.model, plan, loaded.adapter)
        folders[family] = export_hf(loaded.model, loaded.processor, loaded.adapter, root / family, plan=plan, params_before=before).path
    return folders


@pytest.fixture(scope="module")
def exported(pruned, tmp_path_factory):
    """ONNX exports, made once per family on first use."""
    root = tmp_path_factory.mktemp("onnx")
    done = {}

    def get(family: str):
        if family not in done:
            done[family] = export_onnx(pruned[family], root / family)
        return done[family]

    return get


def _samples(folder: Path, multimodal: bool) -> list[Sample]:
    from PIL import Image

    rng = np.random.default_rng(7)
    prompts = ["what color is the circle?", "how many red shapes are there to count?"]
    samples = []
    for i, prompt in enumerate(prompts):
        image = None
        if multimodal:
            image = folder / f"runner{i}.png"
            Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(image)
        samples.append(Sample(prompt=prompt, image=image))
    return samples


@pytest.mark.parametrize("family", EVERY_LAYOUT)
def test_export_is_verified_against_pytorch(family, exported):
    if family in LOOPED_EXPERTS:
        with pytest.raises(UnsupportedArchitectureError, match="loops over its experts in Python") as caught:
            exported(family)
        assert "transformers >= 5" in caught.value.fix
        return
    result = exported(family)
    meta = json.loads((result.path / METADATA).read_text())
    assert result.layout == ("split" if family in MULTIMODAL else "genai") == meta["layout"]
    assert meta["exporter"] == result.exporter and "TorchScript" in result.exporter
    assert meta["verification"]["greedy_client"] == result.client
    assert result.client.startswith("compressor SplitRunner" if family in MULTIMODAL else "onnxruntime-genai 0.18")
    for name in result.graphs.values():
        assert (result.path / name).is_file()
    cases = {(c.graph, c.case) for c in result.checks}
    assert any(case.startswith("decode") for _, case in cases)  # the KV cache path was compared
    if family in MULTIMODAL:
        assert {"vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx"} <= {g for g, _ in cases}
    assert all(c.passed for c in result.checks)
    assert 0 < result.max_abs_diff < 1e-4  # computed, not assumed: a graph of zeros would not get here
    assert result.greedy_tokens > 0
    assert meta["verification"]["provider"] == result.provider == "CPUExecutionProvider"
    if family in MULTIMODAL:
        assert meta["decoder"]["num_blocks"] == 4 and meta["decoder"]["layer_types"] is not None


@pytest.mark.parametrize("family", TEXT)
def test_text_export_generates_like_pytorch_in_onnxruntime_genai(family, pruned, exported, tmp_path):
    import onnxruntime_genai as og

    if family in LOOPED_EXPERTS:  # refused (test_export_is_verified_against_pytorch)
        return
    loaded = load_model(str(pruned[family]), dtype="float32")
    samples = [*_samples(tmp_path, False), Sample(prompt="count to three")]  # three lengths: padding on both sides
    batch = build_batch(loaded.processor, samples, with_answer=False, padding_side="left").inputs
    assert (batch["attention_mask"] == 0).any()
    want = loaded.model.generate(**batch, do_sample=False, max_new_tokens=8)[:, batch["input_ids"].shape[1] :]
    folder = exported(family).path
    # What a client has: the prompts' token ids. og.Model pads them itself (on the right) from genai_config.json.
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    got = genai_generate(folder, prompts, max_new_tokens=8, prefer_cuda=False)
    assert got.provider == "CPUExecutionProvider"
    np.testing.assert_array_equal(got.tokens, want.numpy())
    # The folder carries the pruned depth: genai_config.json and the graph agree on 4 blocks.
    genai = json.loads((folder / GENAI_CONFIG).read_text())["model"]
    assert genai["decoder"]["num_hidden_layers"] == 4 and genai["type"] == "decoder"
    graph = onnx.load(str(folder / genai["decoder"]["filename"]), load_external_data=False)
    inputs = [i.name for i in graph.graph.input]
    assert [n for n in inputs if n.endswith(".key")] == [genai["decoder"]["inputs"]["past_key_names"] % i for i in range(4)]
    assert og.Config(str(folder)) is not None


@pytest.mark.parametrize("family", [f for f in ("llama", "qwen2") if f in TEXT])
def test_text_export_loads_in_optimum_ort_model_for_causal_lm(family, pruned, exported):
    """The transformers 4.57 leg's client: optimum-onnx's ORTModelForCausalLM (no 5.x release, so
    this runs where `make test-457` installs it) generates PyTorch's greedy tokens from the folder."""
    ort = pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx is installed on the transformers 4.57 leg only")
    loaded = load_model(str(pruned[family]), dtype="float32")
    batch = build_batch(loaded.processor, [Sample(prompt="how many red shapes are there")], with_answer=False).inputs
    want = loaded.model.generate(**batch, do_sample=False, max_new_tokens=8)
    client = ort.ORTModelForCausalLM.from_pretrained(exported(family).path, use_cache=True, use_io_binding=False)
    got = client.generate(**batch, do_sample=False, max_new_tokens=8)
    assert got.tolist() == want.tolist()


def test_genai_tokenizer_is_checked_and_reported(exported):
    """qwen2's tiny tokenizer is BPE (og.Tokenizer reads it); llama's is WordLevel (it does not):
    both exports are valid (ids drive the graph), and the metadata says which is which."""
    assert "tokenizer: og.Tokenizer encodes as transformers" in exported("qwen2").client
    assert "tokenize with transformers" in exported("llama").client  # 5.x: it cannot load it; 4.57: it encodes -1s


def test_window_counted_in_slots_is_caught_by_the_genai_check(pruned, tmp_path, monkeypatch):
    """A sliding window counted in cache slots (as transformers does with left padding) passes
    the left-padded parity probe but not onnxruntime-genai, which pads a batch on the right:
    the shorter prompt's decoded tokens then see fewer real tokens. The greedy check catches it."""
    real = onnx_graphs.attention_masks

    def slot_window(spec, attention_mask, seq_probe, token_type_ids, dtype):
        masks = real(spec, attention_mask, seq_probe, token_type_ids, dtype)
        total, seq = onnx_graphs._count(attention_mask[0]), onnx_graphs._count(seq_probe)
        k = onnx_graphs._indices(attention_mask[0])
        q = onnx_graphs._indices(seq_probe) + (total - seq)
        outside = (k[None, :] <= q[:, None] - spec.sliding_window)[None, None]
        return masks.masked_fill(outside, torch.finfo(dtype).min)  # mistral: one mask, every block sliding

    monkeypatch.setattr(onnx_graphs, "attention_masks", slot_window)
    out = tmp_path / "onnx"
    with pytest.raises(VerificationError, match="by onnxruntime-genai 0.18.0 .* gives") as caught:
        export_onnx(pruned["mistral"], out)
    assert not isinstance(caught.value, OnnxParityError)  # every graph matched PyTorch on its own
    assert not out.exists() and not list(tmp_path.glob(".onnx*"))


def test_text_export_without_onnxruntime_genai_is_refused_before_any_work(pruned, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # `import onnxruntime_genai` raises ImportError
    with pytest.raises(InputError, match="needs onnxruntime-genai") as caught:
        export_onnx(pruned["llama"], tmp_path / "onnx")
    assert caught.value.exit_code == 2 and GENAI_PACKAGE in caught.value.fix and "never the CPU" in caught.value.fix
    assert not (tmp_path / "onnx").exists() and not list(tmp_path.glob(".onnx*"))


@pytest.mark.parametrize("family", VLM)
def test_split_runner_generates_like_pytorch(family, pruned, exported, tmp_path):
    loaded = load_model(str(pruned[family]), dtype="float32")
    # Two prompts of different lengths, each with an image: left padding, two images in one batch.
    batch = build_batch(loaded.processor, _samples(tmp_path, True), with_answer=False, padding_side="left").inputs
    assert (batch["attention_mask"] == 0).any()
    want = loaded.model.generate(**batch, do_sample=False, max_new_tokens=8)[:, batch["input_ids"].shape[1] :]
    runner = SplitRunner(exported(family).path)
    config = loaded.model.generation_config
    got = runner.generate(
        {k: v.numpy() for k, v in batch.items()}, max_new_tokens=8, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id or 0
    )
    assert got.provider == "CPUExecutionProvider"
    np.testing.assert_array_equal(got.tokens, want.numpy())


def test_a_graph_computing_something_else_is_caught(pruned, tmp_path):
    """FACTS.md: PaliGemma traced with a causal mask silently disagreed with PyTorch, which
    attends both ways over the prompt. Exporting it that way must fail, naming each output."""
    loaded = load_model(str(pruned["paligemma"]), dtype="float32")
    loaded.adapter = replace(loaded.adapter, onnx_attention="causal")
    out = tmp_path / "onnx"
    with pytest.raises(OnnxParityError) as caught:
        export_onnx(loaded, out)
    message = str(caught.value)
    assert "decoder_model_merged.onnx [prefill]" in message and "FAIL logits" in message and "present.0.key" in message
    assert not out.exists() and not list(tmp_path.glob(".onnx*"))  # nothing half-written


def test_looped_experts_are_refused_before_any_work(pruned, tmp_path):
    """A block holding one module per expert (transformers < 5's MoE) is refused by name: traced,
    its Python loop over the routed experts would keep only the example's experts."""
    loaded = load_model(str(pruned["llama"]), dtype="float32")
    mlp = loaded.adapter.blocks(loaded.model)[2].mlp
    mlp.experts = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(UnsupportedArchitectureError, match=r"model\.layers\.2\.mlp loops over its experts in Python"):
        export_onnx(loaded, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists() and not list(tmp_path.glob(".onnx*"))


def test_a_graph_that_cannot_run_other_inputs_is_a_parity_failure(pruned, exported):
    """A graph traced for one input shape fails in ONNX Runtime on another: reported as a failed
    check naming the graph, the case and ONNX Runtime's message, not as a raw onnxruntime error."""
    from compressor.onnx_verify import DecoderProbe, raise_on_failure, verify_decoder

    class Refusing:  # an InferenceSession whose graph cannot run the probe's inputs
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def run(self, outputs, feeds):
            raise RuntimeError("Split size 1 exceeds the remaining size of the selected axis, 0.")

    loaded = load_model(str(pruned["llama"]), dtype="float32")
    real = onnx_runtime.session(exported("llama").path / "model.onnx", prefer_cuda=False)
    probe = DecoderProbe(graph="model.onnx", first_input="input_ids", make_first=lambda b, s, g: torch.zeros(b, s, dtype=torch.int64),
                         reference=lambda *args: loaded.model(input_ids=args[0]))  # fmt: skip
    checks = verify_decoder(Refusing(real), probe)
    assert [c.case for c in checks] == ["prefill"] and not checks[0].passed
    with pytest.raises(OnnxParityError, match=r"model\.onnx \[prefill\].*\n    FAIL run failed: Split size 1 exceeds"):
        raise_on_failure(checks)


def test_unexportable_family_is_refused_before_any_work(pruned, tmp_path):
    loaded = load_model(str(pruned["llava"]), dtype="float32")
    loaded.adapter = replace(loaded.adapter, onnx="", onnx_refusal="its vision tower does not trace (test)")
    with pytest.raises(UnsupportedArchitectureError, match="cannot be exported to ONNX: its vision tower does not trace"):
        export_onnx(loaded, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("family", ["qwen2_vl", "llama"])
def test_external_data_for_large_graphs(family, pruned, tmp_path):
    # A threshold of 0 bytes takes the >2 GB path on a tiny model: weights beside each graph.
    result = export_onnx(pruned[family], tmp_path / "onnx", external_data_bytes=0)
    data_files = sorted(p.name for p in result.path.iterdir() if p.name.endswith(".onnx_data"))
    assert data_files == sorted(f"{g}_data" for g in result.graphs.values()) == result.external_data
    graph = onnx.load(str(result.path / result.graphs["decoder"]), load_external_data=False)
    external = [t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 4 * 7  # at least every kept block's projection weights
    assert all(c.passed for c in result.checks) and result.greedy_tokens > 0  # ORT (and og.Model for llama) loaded and ran them


def test_output_exists_is_refused_and_overwrite_replaces(pruned, exported):
    path = exported("llama").path
    with pytest.raises(OutputExistsError):
        export_onnx(pruned["llama"], path)
    again = export_onnx(pruned["llama"], path, overwrite=True)
    assert (again.path / "model.onnx").is_file() and (again.path / GENAI_CONFIG).is_file()


def test_provider_is_cuda_only_with_a_cuda_device(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnx_runtime, "cuda_present", lambda: False)
    assert onnx_runtime.providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnx_runtime, "cuda_present", lambda: True)
    assert onnx_runtime.providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_runtime.providers(prefer_cuda=False) == ["CPUExecutionProvider"]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_positions_match_transformers(family, tiny_models, tmp_path):
    loaded = tiny_models[family].load()
    samples = [Sample(prompt="count to three", image=s.image) for s in load_samples(tiny_models[family].data)[:2]]
    samples.append(Sample(prompt="what color is the circle?"))  # a text-only row in the batch
    batch = build_batch(loaded.processor, samples, with_answer=False, padding_side="left").inputs
    # transformers 5 reads the image positions from the processor's mm_token_type_ids (4.x: from input_ids).
    modality = {"mm_token_type_ids": batch["mm_token_type_ids"]} if "mm_token_type_ids" in batch else {}
    want, want_deltas = loaded.model.model.get_rope_index(
        input_ids=batch["input_ids"], image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"].bool(), **modality
    )
    got, deltas = mrope_positions(
        batch["input_ids"].numpy(),
        batch["attention_mask"].numpy(),
        batch["image_grid_thw"].numpy(),
        image_token_id=loaded.model.config.image_token_id,
        merge=loaded.model.config.vision_config.spatial_merge_size,
    )
    valid = batch["attention_mask"].bool().numpy()  # positions of padding differ between the two Qwen versions; unused
    np.testing.assert_array_equal(got[:, valid], want.numpy()[:, valid])
    np.testing.assert_array_equal(deltas, want_deltas.flatten().numpy())


def test_runner_refuses_an_image_of_another_grid(exported, tiny_models):
    runner = SplitRunner(exported("qwen2_vl").path)
    grid = np.array([[1, 8, 8]])
    with pytest.raises(Exception, match="exported for"):
        runner.image_features({"pixel_values": np.zeros((64, 48), np.float32), "image_grid_thw": grid})


def test_onnx_latency_is_measured_for_both_layouts(exported):
    pool = torch.arange(3, 20)
    for family in ("llama", "gemma3"):
        path = find_onnx(exported(family).path)
        timing = measure_onnx(path, pool, prompt_lengths=[8], batch_sizes=[1], repeats=2, warmup=1)
        assert "error" not in timing, timing.get("error")
        assert timing["prefill"]["text-L8-B1"]["median_s"] > 0


# -- command line ---------------------------------------------------------------------------
def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_export_onnx(pruned, tmp_path, capsys):
    out = tmp_path / "graphs"
    code, stdout, _ = run_cli(capsys, "export-onnx", pruned["gemma3"], "-o", out)
    assert code == 0
    assert "split layout" in stdout and "verified on CPUExecutionProvider" in stdout
    assert "greedy tokens of compressor SplitRunner" in stdout and "equal to PyTorch's" in stdout
    code, _, err = run_cli(capsys, "export-onnx", pruned["gemma3"], "-o", out)
    assert code == 2 and "already exists" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "export-onnx", tmp_path / "missing", "-o", tmp_path / "x")
    assert code == 2 and "does not exist" in err and not (tmp_path / "x").exists()


def test_cli_prune_with_onnx_writes_verified_graphs_inside(tiny_models, tmp_path, capsys):
    out = tmp_path / "pruned"
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    code, stdout, _ = run_cli(capsys, "prune", tiny_models["llava"].path, "--recipe", recipes / "explicit.yaml", "-o", out, "--onnx")
    assert code == 0, stdout
    assert (out / "model.safetensors").is_file() and (out / "onnx" / "decoder_model_merged.onnx").is_file()
    assert f"wrote {out.resolve() / 'onnx'}" in stdout
    assert find_onnx(out) == out / "onnx" / "decoder_model_merged.onnx"  # what `compressor validate` times
    manifest = json.loads((out / "compressor.json").read_text())  # what `compressor push` checks
    checks = {c["check"]: c for c in manifest["verification"]}
    assert checks["onnx-parity"]["passed"] and checks["onnx-parity"]["layout"] == "split"  # beside the HF check of the run
    assert {"onnx/decoder_model_merged.onnx", "onnx/vision_encoder.onnx", "onnx/embed_tokens.onnx"} <= set(manifest["files"])
    assert "ONNX graphs (split layout, torch.onnx.export" in (out / "README.md").read_text()


def test_cli_out_of_core_prune_with_onnx(tiny_models, tmp_path, capsys):
    out = tmp_path / "ooc"
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    code, stdout, err = run_cli(
        capsys, "prune", tiny_models["qwen2"].path, "--recipe", recipes / "explicit.yaml", "-o", out, "--out-of-core", "--onnx"
    )
    assert code == 0, err
    assert (out / "onnx" / "model.onnx").is_file() and (out / "onnx" / GENAI_CONFIG).is_file() and "out of core" in stdout


def test_recipe_export_formats(tiny_models, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: with-onnx\nselect: {op: explicit, blocks: [2]}\nexport: {formats: [hf, onnx]}\n")
    code, stdout, err = run_cli(capsys, "run", recipe, "--model", tiny_models["mistral"].path, "-o", tmp_path / "run")
    assert code == 0, err
    assert (tmp_path / "run" / "hf" / "onnx" / "model.onnx").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: bad\nselect: {op: explicit, blocks: [2]}\nexport: {formats: [onnx, tflite]}\n")
    code, _, err = run_cli(capsys, "recipe", "check", bad)
    assert code == 2 and "export.formats[1]" in err and "'hf' or 'onnx'" in err


def test_arch_list_says_which_families_export(capsys):
    code, stdout, _ = run_cli(capsys, "arch", "list")
    assert code == 0
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("family "))
    header, *rows = lines[start:]
    assert "onnx" in header.split()
    for family in FAMILIES:
        row = next(r for r in rows if r.startswith(family + " "))
        if family in REFUSED:
            assert "no: " + _ADAPTERS[family].onnx_refusal in row
            continue
        assert ("split (vision, embed, decoder)" if family in MULTIMODAL else "model.onnx") in row


@pytest.mark.parametrize("family", REFUSED)
def test_family_without_onnx_support_is_refused_with_its_reason(family, pruned, tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="cannot be exported to ONNX") as caught:
        export_onnx(pruned[family], tmp_path / "onnx")
    assert _ADAPTERS[family].onnx_refusal in caught.value.message
    assert not (tmp_path / "onnx").exists()
