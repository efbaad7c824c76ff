"""The proof at export time (`compressor.equivalence`): a pruned checkpoint, reloaded, against the
original model run with the same blocks skipped, for every family, in memory and out of core —
and a broken family rule is caught, naming the first block where the two runs part."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from compressor import architectures, checkpoint, pipeline, surgery
from compressor.manifest import MANIFEST, check_folder
from compressor.planner import RemovedBlock, SurgeryPlan

from .conftest import MULTIMODAL, removable, run_cli

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def save_plan(path, removed: list[int], num_blocks: int = 6):
    plan = SurgeryPlan(
        recipe="test", op="explicit", num_blocks=num_blocks, removed=tuple(RemovedBlock(index=i, reason="test") for i in removed)
    )
    plan.save(path)
    return path


def plan_for(tiny, tmp_path, removed: list[int]):
    from compressor.architectures import blocks_of_folder
    from compressor.hub import ModelSource
    from compressor.pipeline import fixed_blocks_of_folder

    assert blocks_of_folder(tiny.path)[1] == 6
    # A source, not None: a config.json the rules cannot read as JSON (LFM2 saved by 4.57) is read by transformers.
    source = ModelSource(ref=str(tiny.path), path=tiny.path)
    return save_plan(tmp_path / "plan.json", removable(removed, fixed_blocks_of_folder(tiny.path, source)))


def verification(out) -> list[dict]:
    return json.loads((out / MANIFEST).read_text())["verification"]


def test_every_family_passes_the_proof_on_prune(tiny, tmp_path, capsys):
    """In memory, with calibration samples (images for VLMs): the default is the proof, exact in float32."""
    out = tmp_path / "out"
    plan = plan_for(tiny, tmp_path, [1, 3])
    code, stdout, err = run_cli(capsys, "prune", tiny.path, "--plan", plan, "--data", tiny.data, "--dtype", "float32", "-o", out)
    assert code == 0, err
    [check] = verification(out)
    assert check["check"] == "skip-equivalence" and check["passed"] and check["max_abs_diff"] == 0.0, check
    images = 2 if tiny.family in MULTIMODAL else 0  # every sample of their data has one
    assert check["samples"] == f"2 calibration samples ({images} with an image)"
    assert "skipped at run time" in stdout and "skipped at run time" in (out / "README.md").read_text()
    assert check_folder(out).verified


def broken_layer_types(monkeypatch, module):
    """The rule FACTS.md warns about: per-layer lists truncated instead of selected by kept index."""
    real = module.reindex_config

    def truncating(config, adapter, kept):
        lists = {key: getattr(config, key, None) for key in adapter.per_layer_lists}
        real(config, adapter, kept)
        for key, values in lists.items():
            if values is not None:
                setattr(config, key, list(values)[: len(kept)])

    monkeypatch.setattr(module, "reindex_config", truncating)


def test_a_per_layer_list_truncated_is_caught_at_the_block_it_changes(tiny_models, tmp_path, capsys, monkeypatch):
    """qwen2's layer_types are F F S S S S; removing block 0 and truncating gives block 2 full
    attention instead of sliding: the reloaded model computes block 2 differently."""
    tiny = tiny_models["qwen2"]
    plan = save_plan(tmp_path / "plan.json", [0])
    broken_layer_types(monkeypatch, surgery)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prune", tiny.path, "--plan", plan, "--data", tiny.data, "-o", out)
    assert code == 1, err
    assert "First divergence: block 2 (original numbering): same input, different output" in err, err
    assert "max |Δlogits| = " in err and "blocks [0] skipped" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_position_keyed_rule_is_caught_where_it_enters(tiny_models, tmp_path, capsys, monkeypatch):
    """Qwen3-VL adds DeepStack features to the output of the block at position 0. Without the
    adapter's rule that fixes block 0, removing it moves them after original block 1, so what
    enters block 1 differs already: the message names block 1's input and the removal before it."""
    tiny = tiny_models["qwen3_vl"]
    unguarded = tuple(replace(a, fixed_leading_key="") if a.family == "qwen3_vl" else a for a in architectures.ADAPTERS)
    monkeypatch.setattr(architectures, "ADAPTERS", unguarded)
    plan = save_plan(tmp_path / "plan.json", [0])
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prune", tiny.path, "--plan", plan, "-o", out)  # no data: the fixed samples, one with an image
    assert code == 1, err
    assert "First divergence: block 1 (original numbering): the hidden state entering it already differs" in err, err
    assert "removed before it: [0]" in err and "1 with an image" in err
    assert not out.exists()
    # The proof is what catches it: compared only with the in-memory pruned model (which has
    # the same fault), the reloaded checkpoint passes.
    code, _, err = run_cli(capsys, "prune", tiny.path, "--plan", plan, "--verify", "reload", "-o", out)
    assert code == 0, err
    assert [c["check"] for c in verification(out)] == ["hf-reload"]


def test_out_of_core_runs_the_proof_by_default(tiny_models, tmp_path, capsys):
    tiny = tiny_models["qwen3_vl"]
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "prune", tiny.path, "--plan", plan_for(tiny, tmp_path, [2, 4]), "--out-of-core", "-o", out)
    assert code == 0, err
    headers, proof = verification(out)
    assert headers["check"] == "out-of-core-headers"
    assert proof["check"] == "skip-equivalence" and proof["max_abs_diff"] == 0.0
    assert proof["samples"] == "2 built-in samples (1 with an image)"  # no data out of core: the fixed ones
    assert "skipped at run time" in stdout and check_folder(out).verified


def test_out_of_core_proof_catches_a_broken_json_rule(tiny_models, tmp_path, capsys, monkeypatch):
    tiny = tiny_models["qwen2"]
    broken_layer_types(monkeypatch, checkpoint)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prune", tiny.path, "--plan", save_plan(tmp_path / "plan.json", [0]), "--out-of-core", "-o", out)
    assert code == 1, err
    assert "First divergence: block 2 (original numbering)" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_out_of_core_without_the_memory_checks_headers_and_says_so(tiny_models, tmp_path, capsys, monkeypatch, caplog):
    tiny = tiny_models["llama"]
    monkeypatch.setattr(pipeline, "available_memory", lambda: 1000)
    plan = save_plan(tmp_path / "plan.json", [1])
    code, stdout, err = run_cli(capsys, "prune", tiny.path, "--plan", plan, "--out-of-core", "-o", tmp_path / "out")
    assert code == 0, err
    headers, none = verification(tmp_path / "out")
    assert headers["check"] == "out-of-core-headers" and none["check"] == "none" and "passed" not in none
    assert "not compared with the original" in none["detail"] and "1 kB is free" in none["detail"]
    assert "not verified after writing" in stdout
    assert "not compared with the original" in (tmp_path / "out" / "README.md").read_text()
    # Asked for explicitly, it is refused before anything is written.
    code, _, err = run_cli(
        capsys, "prune", tiny.path, "--plan", plan, "--out-of-core", "--verify", "skip-equivalence", "-o", tmp_path / "o2"
    )
    assert code == 2 and "--verify skip-equivalence cannot run here" in err and "--verify none" in err
    assert not (tmp_path / "o2").exists()


def test_verify_none_in_memory_claims_nothing(tiny_models, tmp_path, capsys):
    tiny = tiny_models["llava"]
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "prune", tiny.path, "--plan", save_plan(tmp_path / "plan.json", [1]), "--verify", "none", "-o", out)
    assert code == 0, err
    [none] = verification(out)
    assert none["check"] == "none" and "max_abs_diff" not in none and "passed" not in none
    card = (out / "README.md").read_text()
    assert "not reloaded or compared" in card and "reloaded and their logits compared" not in card


@pytest.mark.parametrize("removed", [[0], [5], [1, 2, 3, 4]], ids=["first", "last", "all-but-ends"])
def test_record_and_compare_directly(tiny_models, removed):
    """The library path: reference before surgery, the pruned model compared in memory."""
    from compressor.equivalence import compare, record_reference
    from compressor.surgery import apply_plan

    loaded = tiny_models["gemma3"].load()
    plan = SurgeryPlan(recipe="t", op="explicit", num_blocks=6, removed=tuple(RemovedBlock(index=i, reason="t") for i in removed))
    reference = record_reference(loaded.model, loaded.processor, loaded.adapter, removed, None)
    assert reference.samples == "2 built-in samples (1 with an image)" and len(reference.entering) == 6 - len(removed)
    check = compare(apply_plan(loaded.model, plan, loaded.adapter), loaded.adapter, reference)
    assert check.max_abs_diff == 0.0


@pytest.mark.parametrize(("verify", "expected"), [(None, "skip-equivalence"), ("reload", "hf-reload")])
def test_run_takes_verify(verify, expected, tiny_models, tmp_path, capsys):
    tiny = tiny_models["qwen2_5_vl"]
    out = tmp_path / "run"
    extra = ["--verify", verify] if verify else []
    code, _, err = run_cli(capsys, "run", RECIPES / "explicit.yaml", "--model", tiny.path, "--data", tiny.data, *extra, "-o", out)
    assert code == 0, err
    assert [c["check"] for c in verification(out / "hf")] == [expected]


def test_out_of_core_reload_loads_only_the_pruned_checkpoint(tiny_models, tmp_path, capsys, monkeypatch):
    from compressor import loading

    tiny = tiny_models["llava"]
    loaded: list[str] = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda ref, **kw: loaded.append(str(ref)) or real(ref, **kw))
    out = tmp_path / "out"
    plan = save_plan(tmp_path / "plan.json", [3])
    code, stdout, err = run_cli(capsys, "prune", tiny.path, "--plan", plan, "--out-of-core", "--verify", "reload", "-o", out)
    assert code == 0, err
    headers, reload = verification(out)
    assert reload["check"] == "hf-reload" and "not compared" in reload["detail"] and "max_abs_diff" not in reload
    assert loaded == [] and "not compared with the original" in stdout  # the original was never loaded
