"""`compressor arch probe`, `prune --probe-adapter`, and the rules every adapter states (`arch list`).

The family without an adapter is Qwen2-MoE (in transformers 4.57 and 5.x alike): its block-tied
fields are those of two written adapters together — `layer_types` (5.x only) and
`max_window_layers` as Qwen2's, `mlp_only_layers` and the sparse step as Qwen3-MoE's — so the
hand-written adapter is known, and the probe's proposal is held to it. The tiny model's block
kinds are D S D D D S (sparse every second block, block 3 dense by `mlp_only_layers`), so the
skeleton shows the step, and removing block 0 breaks the period: the step must be restated.
A second model adds two fields no rule can be read off: a list of 6 dicts whose name does not
say per block, and an int that could count blocks from either end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest
import torch

from compressor import arch_probe
from compressor.architectures import (
    ADAPTERS,
    DESCRIPTIVE_FIELDS,
    RULE_FIELDS,
    Adapter,
    StepRule,
    _walk,
    adapter_for_config,
    probed_adapters,
)
from compressor.errors import UnsupportedArchitectureError
from compressor.hub import resolve_model_ref

from .conftest import build_tiny, missing_reason, run_cli

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SPARSE = StepRule(step="decoder_sparse_step", exceptions="mlp_only_layers", kind="a sparse-MoE MLP")
# What a hand-written adapter for Qwen2-MoE says (rules from the qwen2 and qwen3_moe adapters).
WRITTEN = Adapter(
    family="qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    model_types=("qwen2_moe",),
    block_paths=("model.layers",),
    per_layer_lists=("layer_types",),
    index_fields=("max_window_layers",),
    index_lists=("mlp_only_layers",),
    step_rules=(SPARSE,),
)
RULE_ATTRS = ("per_layer_lists", "index_fields", "index_lists", "layer_period_fields", "block_dicts", "tail_count_fields")
ODD = {"expert_layout": [{"experts": 4}] * 6, "num_dense_layers": 2}


def build_qwen2_moe(folder: Path, **extra) -> Path:
    """A tiny Qwen2-MoE (6 blocks, kinds D S D D D S, sliding window 4 on the first 4 blocks) saved to ``folder``."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen2TokenizerFast

    from .conftest import _bpe_tokenizer, _text_kwargs

    torch.manual_seed(0)
    tokenizer = _bpe_tokenizer("qwen", Qwen2TokenizerFast)  # a qwen2 tokenizer, loaded as qwen2's
    config = Qwen2MoeConfig(
        **_text_kwargs(tokenizer, 6),
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=4,
        **extra,
    )
    model = Qwen2MoeForCausalLM(config).eval()
    model.config.architectures = ["Qwen2MoeForCausalLM"]
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)  # as conftest.build_tiny: tie-free greedy decoding
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    return build_qwen2_moe(tmp_path_factory.mktemp("probe") / "qwen2_moe")


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> Path:
    return build_qwen2_moe(tmp_path_factory.mktemp("probe") / "qwen2_moe_odd", **ODD)


def explicit(tmp_path: Path, blocks: list[int]) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"version: 1\nname: drop\nselect: {{op: explicit, blocks: {blocks}}}\n")
    return recipe


def config_of(folder: Path):
    from compressor.loading import load_config

    return load_config(folder)


# -- the proposal -----------------------------------------------------------------------------------


def test_probe_proposes_what_a_written_adapter_says(moe, capsys):
    probe = arch_probe.probe_model(resolve_model_ref(str(moe)))
    config = config_of(moe)
    assert probe.written is None and probe.usable
    proposed = probe.adapter
    assert proposed.block_paths == ("model.layers",) and proposed.count_key == "num_hidden_layers"
    assert proposed.tensor_prefix == "model.layers.{index}." and proposed.renumber_attrs == ("layer_idx",)
    assert proposed.step_rules == (SPARSE,)
    assert proposed.index_lists == ("mlp_only_layers",) and proposed.index_fields == ("max_window_layers",)
    # layer_types exists in transformers 5's config only; the rules this config has are the same.
    assert proposed.per_layer_lists == (("layer_types",) if getattr(config, "layer_types", None) else ())
    assert proposed.rules(config) == WRITTEN.rules(config)
    assert all(f.confidence == "high" for f in probe.findings)
    code, out, err = run_cli(capsys, "arch", "probe", moe)
    assert code == 0, err
    assert "written adapter: none" in out and "on disk: model.layers.{index}.* (read from the safetensors headers)" in out
    assert "blocks 1, 5 build a Qwen2MoeSparseMoeBlock as mlp" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("decoder_sparse_step"))
    assert "re-express step" in row and "high" in row and "the skeleton confirms: blocks 1, 5" in row
    assert 'step_rules=(StepRule(step="decoder_sparse_step", exceptions="mlp_only_layers", kind="a sparse-MoE MLP"),),' in out
    assert "every block-tied field is classified" in out
    literal = out.split("proposed adapter (compressor/architectures.py):\n", 1)[1].split("\n\n", 1)[0]
    assert eval(literal, {"Adapter": Adapter, "StepRule": StepRule}) == proposed  # the literal is the proposal


def test_probe_reads_rules_off_the_config_and_skeleton_alone(moe, monkeypatch):
    """Without the written adapters' names to go by, the same rules, from the evidence: the
    skeleton's block kinds follow the step with mlp_only_layers as exceptions; the other fields by
    their names and values."""
    monkeypatch.setattr(arch_probe, "_known_names", dict)
    probe = arch_probe.probe_model(resolve_model_ref(str(moe)))
    proposed = probe.adapter
    assert probe.usable
    assert [(r.step, r.exceptions, r.kind) for r in proposed.step_rules] == [
        ("decoder_sparse_step", "mlp_only_layers", "a Qwen2MoeSparseMoeBlock as mlp")
    ]
    has_types = getattr(config_of(moe), "layer_types", None) is not None
    expected = replace(WRITTEN, per_layer_lists=("layer_types",) if has_types else ())
    for attr in RULE_ATTRS:
        assert getattr(proposed, attr) == getattr(expected, attr), attr
    step = next(f for f in probe.findings if f.field == "decoder_sparse_step")
    assert step.confidence == "high" and "exactly those with (i + 1) % 2 == 0 not in mlp_only_layers" in step.why


def test_a_known_name_counts_only_with_its_rules_shape(moe, monkeypatch):
    """A name some written adapter selects per block (Gemma 3n's list `intermediate_size`) is an int
    here: no rule is taken from the name, and the field is classified as any other (not tied)."""
    known = {**arch_probe._known_names(), "intermediate_size": ("per_layer_lists", "intermediate_size", ["gemma3n"])}
    monkeypatch.setattr(arch_probe, "_known_names", lambda: known)
    probe = arch_probe.probe_model(resolve_model_ref(str(moe)))
    assert probe.usable and "intermediate_size" not in {f.field for f in probe.findings}


@pytest.mark.parametrize("family", ["llava", "qwen2", "qwen3_moe", "gemma3", "gemma4_text"])
def test_probe_of_a_written_family_agrees_with_its_adapter(family):
    if missing_reason(family):
        pytest.skip(missing_reason(family))
    model, _ = build_tiny(family)
    probe = arch_probe.probe_config(model.config)
    written = adapter_for_config(model.config)
    assert probe.written == written and probe.usable
    assert probe.adapter.block_paths[0] in written.block_paths
    compared = (*RULE_ATTRS, "step_rules", "block_tensors", "decoder_index_attrs", "kv_shared_key", "text_config_path", "count_key")
    # Attributes the decoder module of this transformers has (Gemma 4's first_kv_shared_layer_idx is a
    # local variable in 5.17, an attribute in 5.24): the written adapter's rule is a no-op without one.
    decoder = _walk(model, written.block_path(model).rpartition(".")[0])
    for attr in (*compared, "multimodal"):
        got, want = getattr(probe.adapter, attr), getattr(written, attr)
        if attr == "decoder_index_attrs":
            want = tuple(name for name in want if hasattr(decoder, name))
        assert (set(got) == set(want)) if isinstance(got, tuple) else (got == want), attr  # tuples in the config's order
    if family in ("qwen2", "qwen3_moe"):  # no removal limit, on-disk names as the module path
        assert f"the proposal states the same rules as the written {family} adapter on this config" in probe.describe()


def test_probed_adapters_are_used_only_when_asked(moe):
    config = config_of(moe)
    with pytest.raises(UnsupportedArchitectureError, match="compressor arch probe MODEL"):
        adapter_for_config(config)
    proposed = arch_probe.probe_config(config).in_force()
    with probed_adapters(proposed):
        assert adapter_for_config(config) is proposed
    with pytest.raises(UnsupportedArchitectureError):
        adapter_for_config(config)
    assert proposed.family == "qwen2_moe (probed)" and not proposed.onnx_support[0]


# -- prune --probe-adapter ---------------------------------------------------------------------------


def test_prune_needs_the_opt_in(moe, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prune", moe, "--recipe", RECIPES / "explicit.yaml", "-o", out)
    assert code == 2 and "Qwen2MoeForCausalLM is not supported" in err and "--probe-adapter" in err
    assert not out.exists()


def test_prune_with_the_probed_adapter_restates_the_step_and_passes_the_proof(moe, tmp_path, capsys):
    """Removing block 0 of D S D D D S leaves S D D D S: no step fits, so the kinds are stated as a
    list (step 1, mlp_only_layers = the dense blocks), as the written qwen3_moe rule does."""
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "prune", moe, "--recipe", explicit(tmp_path, [0]), "-o", out, "--probe-adapter")
    assert code == 0, err
    assert "has no written adapter: pruning with the adapter `compressor arch probe` proposes" in err
    assert "decoder_sparse_step: re-express step" in err
    assert "reloaded and verified against the original with blocks [0] skipped" in stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_hidden_layers"] == 5
    assert saved["decoder_sparse_step"] == 1 and saved["mlp_only_layers"] == [1, 2, 3]
    assert saved["max_window_layers"] == 3  # blocks 1, 2, 3 were below 4
    original = config_of(moe)
    if getattr(original, "layer_types", None):
        assert saved["layer_types"] == original.layer_types[1:]
    manifest = json.loads((out / "compressor.json").read_text())
    assert manifest["family"] == "qwen2_moe (probed)"
    assert [c["check"] for c in manifest["verification"]] == ["skip-equivalence"]


def test_prune_out_of_core_with_the_probed_adapter(moe, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", moe, "--recipe", RECIPES / "explicit.yaml", "-o", out, "--probe-adapter", "--out-of-core"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "out of core" in stdout and "reloaded and verified against the original with blocks [2, 4] skipped" in stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_hidden_layers"] == 4 and saved["mlp_only_layers"] == [2] and saved["decoder_sparse_step"] == 2
    checks = [c["check"] for c in json.loads((out / "compressor.json").read_text())["verification"]]
    assert checks == ["out-of-core-headers", "skip-equivalence"]


@pytest.mark.parametrize("extra", [["--verify", "none"], ["--verify", "reload"], ["--out-of-core", "--verify", "none"]])
def test_probed_prune_refuses_to_skip_the_proof(moe, tmp_path, capsys, extra):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prune", moe, "--recipe", RECIPES / "explicit.yaml", "-o", out, "--probe-adapter", *extra)
    assert code == 2 and f"--probe-adapter needs the export-time proof, and --verify {extra[-1]} skips it" in err
    assert not out.exists()


def test_a_failed_proof_says_to_write_an_adapter(moe, tmp_path, capsys, monkeypatch):
    """A proposal that misses a rule (here: the step, as if the probe had found no evidence for it)
    is caught by the proof; nothing is written, and the message says what to do."""
    original = arch_probe._period_finding

    def no_step(key, value, seen, index_lists):
        found = original(key, value, seen, index_lists)
        return arch_probe.Finding(key, value, "", "high", "test: no rule") if key == "decoder_sparse_step" else found

    monkeypatch.setattr(arch_probe, "_known_names", dict)
    monkeypatch.setattr(arch_probe, "_period_finding", no_step)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prune", moe, "--recipe", explicit(tmp_path, [0]), "-o", out, "--probe-adapter")
    assert code == 1, err
    assert "misses a rule of this family" in err and "write an adapter" in err
    assert not out.exists()


# -- refusal -----------------------------------------------------------------------------------------


def test_unclassified_fields_are_marked_and_refused(odd, tmp_path, capsys):
    code, out, err = run_cli(capsys, "arch", "probe", odd)
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "UNCLASSIFIED" in rows["expert_layout"] and "its name does not say per block" in rows["expert_layout"]
    assert "UNCLASSIFIED" in rows["num_dense_layers"] and "could count blocks from the start" in rows["num_dense_layers"]
    assert "re-express step" in rows["decoder_sparse_step"]  # the rest is still classified
    found = 6 if "layer_types" in rows else 5  # transformers 4.57's config has no layer_types
    assert f"2 of {found} block-tied fields could not be classified (expert_layout, num_dense_layers)" in out
    target = tmp_path / "out"
    code, _, err = run_cli(capsys, "prune", odd, "--recipe", RECIPES / "explicit.yaml", "-o", target, "--probe-adapter")
    assert code == 2
    assert f"cannot classify 2 of its {found} block-tied fields" in err
    assert "  - expert_layout = " in err and "  - num_dense_layers = 2: " in err
    assert f"`compressor arch probe {odd}` prints the proposal" in err and "nothing was written" in err
    assert "Traceback" not in err and not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no staging folder or lock left behind


def test_a_family_with_a_written_adapter_ignores_the_flag(tmp_path, capsys, tiny_models):
    out = tmp_path / "out"
    tiny = tiny_models["llama"]
    code, _, err = run_cli(capsys, "prune", tiny.path, "--recipe", RECIPES / "explicit.yaml", "-o", out, "--probe-adapter")
    assert code == 0, err
    assert "has no written adapter" not in err
    assert json.loads((out / "compressor.json").read_text())["family"] == "llama"


# -- rules as data, shown by `arch list` --------------------------------------------------------------


def test_rules_come_from_the_adapter_fields():
    qwen3_moe = next(a for a in ADAPTERS if a.family == "qwen3_moe")
    by_field = {(r.field, r.kind): r for r in qwen3_moe.rules()}
    assert by_field[("mlp_only_layers", "renumber index list")].source == "index_lists"
    step = by_field[("decoder_sparse_step", "re-express step")]
    assert "block i builds a sparse-MoE MLP iff (i + 1) % decoder_sparse_step == 0" in step.reason
    for adapter in ADAPTERS:
        rules = adapter.rules()
        prefix = f"{adapter.text_config_path}.".lstrip(".")
        for attr, kind in (("per_layer_lists", "select per block"), ("index_fields", "remap index"), ("block_dicts", "re-key dict")):
            assert [r.field for r in rules if r.kind == kind] == [prefix + key for key in getattr(adapter, attr)], (adapter.family, attr)
        assert [r.field for r in rules if r.kind == "slice tensor"] == [t.name for t in adapter.block_tensors]
        assert {r.field for r in rules if r.kind == "set count"} == {adapter.count_path}
        undescribed = [r.source for r in rules if r.kind == "other"]
        assert not undescribed, (
            f"{adapter.family}: Adapter fields {undescribed} have no entry in architectures.RULE_FIELDS (how `arch list` shows "
            "the rule) and are not in DESCRIPTIVE_FIELDS (fields that state no block-tied rule): add them to one of the two"
        )
        # a rule on another field shows up: nothing is listed twice by hand
        extended = replace(adapter, per_layer_lists=(*adapter.per_layer_lists, "new_list"))
        assert _count(extended.rules(), "select per block") == _count(rules, "select per block") + 1


def _count(rules, kind: str) -> int:
    return sum(r.kind == kind for r in rules)


def test_an_undescribed_rule_field_is_still_shown():
    """A field added to `Adapter` without an entry in RULE_FIELDS is listed as kind "other"."""

    @dataclass(frozen=True)
    class Extended(Adapter):
        cross_attention_key: str = ""

    llama = next(a for a in ADAPTERS if a.family == "llama")
    values = {f.name: getattr(llama, f.name) for f in fields(Adapter)}
    rules = Extended(**values, cross_attention_key="cross_attention_layers").rules()
    assert rules[-1].field == "cross_attention_key" and rules[-1].kind == "other"
    assert "RULE_FIELDS" in rules[-1].reason
    assert not set(RULE_FIELDS) & DESCRIPTIVE_FIELDS


def test_rules_for_a_config_leave_out_fields_it_lacks(moe):
    config = config_of(moe)
    shown = {r.field for r in WRITTEN.rules(config)}
    assert ("layer_types" in shown) == (getattr(config, "layer_types", None) is not None)
    assert {"max_window_layers", "mlp_only_layers", "decoder_sparse_step"} <= shown


def test_arch_list_shows_each_familys_block_tied_rules(capsys):
    code, out, err = run_cli(capsys, "arch", "list")
    assert code == 0, err
    section = out.split("\nblock-tied rules:", 1)[1].split("\nnotes:\n", 1)[0]
    lines = section.splitlines()[1:]
    assert all(line.startswith("  ") for line in lines)  # the family table keeps the only unindented family rows
    family = None
    shown: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line[2:3].isspace():
            family = line.split()[0]
        shown.setdefault(family, []).append(line)
    assert set(shown) == {a.family for a in ADAPTERS}
    for adapter in ADAPTERS:
        rows = shown[adapter.family]
        assert len(rows) == len(adapter.rules())
        for row, rule in zip(rows, adapter.rules()):
            assert rule.field in row and rule.kind in row and row.rstrip().endswith(rule.reason), (adapter.family, row)
    gemma4 = "\n".join(shown["gemma4"])
    for needed in ("text_config.per_layer_config", "re-key dict", "text_config.num_kv_shared_layers", "tail count", "slice tensor"):
        assert needed in gemma4
