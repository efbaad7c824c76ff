"""ONNX export of pruned checkpoints: parity with PyTorch, greedy tokens through real runtimes
(optimum's ORTModelForCausalLM for text decoders, our split runner for VLMs), the failures a
user can meet, and the CLI / recipe / validation entry points."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compressor import onnx_runtime
from compressor.architectures import ADAPTERS
from compressor.cli import main
from compressor.data import Sample, build_batch, load_samples
from compressor.errors import OutputExistsError, UnsupportedArchitectureError
from compressor.export import export_hf
from compressor.latency import find_onnx, measure_onnx
from compressor.loading import load_model
from compressor.onnx_export import export_onnx
from compressor.onnx_runtime import METADATA, SplitRunner, mrope_positions
from compressor.onnx_verify import OnnxParityError
from compressor.surgery import apply_plan, count_parameters

from .conftest import FAMILIES, MULTIMODAL
from .test_surgery import make_plan

# Families whose adapter refuses ONNX (`Adapter.onnx_refusal`) are checked for the refusal instead.
_ADAPTERS = {a.family: a for a in ADAPTERS}
REFUSED = tuple(f for f in FAMILIES if not _ADAPTERS[f].onnx)
TEXT = tuple(f for f in FAMILIES if f not in MULTIMODAL and f not in REFUSED)
VLM = tuple(f for f in FAMILIES if f in MULTIMODAL and f not in REFUSED)
REMOVED = [1, 4]  # of 6: keeps a mix of sliding and full layers where the family has both
# Text decoders export through optimum-onnx (the "optimum" layout); VLMs through our own split graphs.
EVERY_LAYOUT = [pytest.param(f, marks=pytest.mark.optimum_onnx) if f in TEXT else f for f in (*TEXT, *VLM)]


@pytest.fixture(scope="module")
def pruned(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Every family, blocks 1 and 4 removed, as a verified HF checkpoint folder."""
    root = tmp_path_factory.mktemp("pruned")
    folders = {}
    for family, tiny in tiny_models.items():
        loaded = tiny.load()
        before = count_parameters(loaded.model)
        plan = make_plan(REMOVED)
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
    result = exported(family)
    meta = json.loads((result.path / METADATA).read_text())
    assert result.layout == ("split" if family in MULTIMODAL else "optimum") == meta["layout"]
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


@pytest.mark.optimum_onnx
@pytest.mark.parametrize("family", TEXT)
def test_text_export_generates_like_pytorch_in_ort_model_for_causal_lm(family, pruned, exported, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM

    loaded = load_model(str(pruned[family]), dtype="float32")
    batch = build_batch(loaded.processor, _samples(tmp_path, False), with_answer=False, padding_side="left").inputs
    want = loaded.model.generate(**batch, do_sample=False, max_new_tokens=8)
    ort_model = ORTModelForCausalLM.from_pretrained(exported(family).path)
    got = ort_model.generate(**batch, do_sample=False, max_new_tokens=8)
    assert torch.equal(got, want)
    # The graph carries the pruned depth: one past/present pair per kept block.
    pasts = [i.name for i in ort_model.session.get_inputs() if i.name.startswith("past_key_values") and i.name.endswith(".key")]
    assert len(pasts) == 4


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


def test_unexportable_family_is_refused_before_any_work(pruned, tmp_path):
    loaded = load_model(str(pruned["llava"]), dtype="float32")
    loaded.adapter = replace(loaded.adapter, onnx="", onnx_refusal="its vision tower does not trace (test)")
    with pytest.raises(UnsupportedArchitectureError, match="cannot be exported to ONNX: its vision tower does not trace"):
        export_onnx(loaded, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_external_data_for_large_graphs(pruned, tmp_path):
    # A threshold of 0 bytes takes the >2 GB path on a tiny model: weights beside each graph.
    result = export_onnx(pruned["qwen2_vl"], tmp_path / "onnx", external_data_bytes=0)
    data_files = sorted(p.name for p in result.path.iterdir() if p.name.endswith(".onnx_data"))
    assert data_files == sorted(f"{g}_data" for g in result.graphs.values()) == result.external_data
    graph = onnx.load(str(result.path / "decoder_model_merged.onnx"), load_external_data=False)
    external = [t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 4 * 7  # at least every kept block's projection weights
    assert all(c.passed for c in result.checks) and result.greedy_tokens > 0  # ORT loaded and ran them


@pytest.mark.optimum_onnx  # exports llama
def test_output_exists_is_refused_and_overwrite_replaces(pruned, exported):
    path = exported("llama").path
    with pytest.raises(OutputExistsError):
        export_onnx(pruned["llama"], path)
    again = export_onnx(pruned["llama"], path, overwrite=True)
    assert (again.path / "model.onnx").is_file()


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


@pytest.mark.optimum_onnx  # exports llama
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
    assert "split layout" in stdout and "verified on CPUExecutionProvider" in stdout and "greedy tokens equal" in stdout
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
    assert [c["check"] for c in manifest["verification"]] == ["hf-reload", "onnx-parity"]
    assert {"onnx/decoder_model_merged.onnx", "onnx/vision_encoder.onnx", "onnx/embed_tokens.onnx"} <= set(manifest["files"])
    assert "ONNX graphs (split layout)" in (out / "README.md").read_text()


@pytest.mark.optimum_onnx  # exports qwen2
def test_cli_out_of_core_prune_with_onnx(tiny_models, tmp_path, capsys):
    out = tmp_path / "ooc"
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    code, stdout, err = run_cli(
        capsys, "prune", tiny_models["qwen2"].path, "--recipe", recipes / "explicit.yaml", "-o", out, "--out-of-core", "--onnx"
    )
    assert code == 0, err
    assert (out / "onnx" / "model.onnx").is_file() and "out of core" in stdout


@pytest.mark.optimum_onnx  # exports mistral
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
    header, *rows = stdout.splitlines()
    assert "onnx" in header.split()
    for family in FAMILIES:
        row = next(r for r in rows if r.startswith(family + " "))
        if family in REFUSED:
            assert "no: " + _ADAPTERS[family].onnx_refusal in row
            continue
        assert ("split (vision, embed, decoder)" if family in MULTIMODAL else "model.onnx (optimum") in row


@pytest.mark.parametrize("family", REFUSED)
def test_family_without_onnx_support_is_refused_with_its_reason(family, pruned, tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="cannot be exported to ONNX") as caught:
        export_onnx(pruned[family], tmp_path / "onnx")
    assert _ADAPTERS[family].onnx_refusal in caught.value.message
    assert not (tmp_path / "onnx").exists()
