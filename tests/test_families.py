"""The re-indexing rules the newer families need, each shown to matter.

The conformance matrix (test_surgery, test_checkpoint, test_onnx, ... over conftest.FAMILIES)
proves every family end to end. Here: the rule kinds those families added to `Adapter` —
MoE block kinds chosen by index (`index_lists`, `step_rules`), a layer type a hybrid decoder
must keep (`required_layer_type`), the period of a hybrid's `layer_types` — and the refusal of
a per-block config list no rule names. Each rule is checked in memory and on config.json as
plain JSON (the out-of-core path), and where it guards against something, the test also
shows what goes wrong without it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from itertools import combinations

import pytest
import torch

from compressor import versions
from compressor.architectures import ADAPTERS, StepRule
from compressor.checkpoint import rewrite_checkpoint
from compressor.data import build_batch, load_samples
from compressor.errors import PlanError, SurgeryError, UnsupportedArchitectureError
from compressor.reindex import JsonConfig, block_of_kind, layer_period, read_config_json, reindex_config
from compressor.surgery import apply_plan, check_invariants, skip_blocks

from .conftest import missing_reason, removable, run_cli
from .test_checkpoint import check_against_in_memory, edited_copy
from .test_surgery import make_plan

ADAPTER = {a.family: a for a in ADAPTERS}
MOE = ("qwen3_moe", "qwen3_vl_moe")
HYBRID = ("qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text")  # linear + full attention
SPARSE = StepRule(step="decoder_sparse_step", exceptions="mlp_only_layers", kind="a sparse-MoE MLP")


def sparse_blocks(model, adapter) -> list[bool]:
    """Which blocks hold a router (a sparse-MoE MLP), read off the modules themselves."""
    return [hasattr(block.mlp, "gate") and not hasattr(block.mlp, "gate_proj") for block in adapter.blocks(model)]


# -- MoE block kinds by index ---------------------------------------------------------------------


@pytest.mark.parametrize(("step", "dense"), [(2, [5]), (1, [0, 3]), (3, []), (1, [])])
def test_step_rule_keeps_every_kept_blocks_kind_for_every_removal(step, dense):
    """Out of core (JsonConfig, no transformers): for every set of removed blocks of a 6-block
    config, each kept block is of the kind it was, and the step survives when it still fits."""
    adapter = ADAPTER["qwen3_moe"]
    for removed_count in range(1, 6):
        for removed in combinations(range(6), removed_count):
            kept = [i for i in range(6) if i not in removed]
            data = {"num_hidden_layers": 6, "decoder_sparse_step": step, "mlp_only_layers": list(dense)}
            before = [block_of_kind(JsonConfig(dict(data)), SPARSE, i) for i in kept]
            config = JsonConfig(data)
            reindex_config(config, adapter, kept)
            assert [block_of_kind(config, SPARSE, j) for j in range(len(kept))] == before, (removed, data)
            assert data["num_hidden_layers"] == len(kept)
            assert all(0 <= j < len(kept) for j in data["mlp_only_layers"])
            if step == 1:  # a step of 1 fits any pattern: only the list is renumbered
                assert data["decoder_sparse_step"] == 1
                assert data["mlp_only_layers"] == [kept.index(i) for i in dense if i in kept]


def test_step_survives_when_it_still_fits_and_is_restated_when_not():
    adapter = ADAPTER["qwen3_moe"]
    # Kinds D S D S D D (step 2, block 5 dense by list). Removing 2 and 3 keeps D S D D: step 2
    # with the list renumbered ([3]) still says so.
    data = {"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [5]}
    reindex_config(JsonConfig(data), adapter, [0, 1, 4, 5])
    assert (data["decoder_sparse_step"], data["mlp_only_layers"]) == (2, [3])
    # Removing block 0 keeps S D S D D: no period gives that; the dense blocks are listed instead.
    data = {"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [5]}
    reindex_config(JsonConfig(data), adapter, [1, 2, 3, 4, 5])
    assert (data["decoder_sparse_step"], data["mlp_only_layers"]) == (1, [1, 3, 4])


@pytest.mark.parametrize("removed", [[1, 3], [0], [2, 3], [5]], ids=["restated", "first", "kept-step", "last"])
@pytest.mark.parametrize("family", MOE)
def test_moe_kinds_survive_save_and_reload(tiny_models, tmp_path, family, removed):
    """Reloaded from disk, the pruned MoE model builds each kept block's MLP as it was: no
    missing or unexpected keys, logits equal the original run with those blocks skipped."""
    tiny = tiny_models[family]
    loaded = tiny.load()
    model, adapter = loaded.model, loaded.adapter
    removed = removable(removed, adapter.fixed_blocks(model.config))  # Qwen3-VL-MoE: block 0 is DeepStack's
    kinds = sparse_blocks(model, adapter)
    assert kinds == [False, True, False, True, False, False]  # conftest.MOE: step 2, block 5 dense by list
    batch = build_batch(loaded.processor, load_samples(tiny.data)[:2], with_answer=True)
    with torch.no_grad(), skip_blocks(model, adapter, removed):
        expected = model(**batch.inputs, use_cache=False).logits
    pruned = apply_plan(copy.deepcopy(model), make_plan(removed), adapter)
    pruned.save_pretrained(tmp_path)
    reloaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    kept = [i for i in range(6) if i not in removed]
    assert sparse_blocks(reloaded, adapter) == [kinds[i] for i in kept]
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**batch.inputs).logits, expected)


@pytest.mark.parametrize("family", MOE)
def test_without_the_moe_rules_reload_loses_weights(tiny_models, tmp_path, family):
    """Why the rules exist: with `mlp_only_layers` and the step left as they were, removing the
    first (removable) block shifts the kinds after it, and the reload finds experts where it
    builds dense MLPs."""
    loaded = tiny_models[family].load()
    bare = replace(loaded.adapter, index_lists=(), step_rules=())
    apply_plan(loaded.model, make_plan(removable([0], bare.fixed_blocks(loaded.model.config))), bare)
    loaded.model.save_pretrained(tmp_path)
    _, info = type(loaded.model).from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] and info["unexpected_keys"]


@pytest.mark.parametrize("removed", [[0], [5], [0, 2, 5]], ids=["first", "last", "scattered"])
@pytest.mark.parametrize("family", [*MOE, *HYBRID])
def test_out_of_core_config_json_matches_in_memory(tiny_models, tmp_path, family, removed):
    """The rules on config.json read as plain JSON give the in-memory config, tensor for tensor."""
    tiny = tiny_models[family]
    loaded = tiny.load()
    assert read_config_json(tiny.path, loaded.adapter) is not None  # the JSON path, not transformers'
    if loaded.adapter.required_layer_type and removed == [0, 2, 5]:
        removed = [0, 2, 4]  # [0, 2, 5] would leave no full-attention block (L F L F L F), refused below
    removed = removable(removed, loaded.adapter.fixed_blocks(loaded.model.config))
    samples = load_samples(tiny.data)[:1]
    check_against_in_memory(loaded.model, loaded.processor, loaded.adapter, tiny.path, tmp_path, removed, samples)


@pytest.mark.parametrize(
    ("key", "moe"), [("mlp_only_layers", {"decoder_sparse_step": 2}), ("decoder_sparse_step", {"mlp_only_layers": [5]})]
)
def test_moe_config_leaving_a_rule_field_to_its_default_is_read_by_transformers(tmp_path, key, moe):
    """The JSON alone cannot be re-indexed when it leaves a field a rule reads to the config
    class's default: transformers reads it then, and the output is still the in-memory one."""
    from transformers import Qwen2TokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from compressor.loading import load_model

    from .conftest import MOE, _bpe_tokenizer, _text_kwargs

    tokenizer = _bpe_tokenizer("qwen", Qwen2TokenizerFast)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(**_text_kwargs(tokenizer, 6), head_dim=8, **{**MOE, "mlp_only_layers": [], "decoder_sparse_step": 1, **moe})
    model = Qwen3MoeForCausalLM(config)
    model.config.architectures = ["Qwen3MoeForCausalLM"]
    source = tmp_path / "src"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    data = json.loads((source / "config.json").read_text())
    del data[key]  # the class default (mlp_only_layers [], decoder_sparse_step 1) says the same
    (source / "config.json").write_text(json.dumps(data))
    loaded = load_model(str(source), device="cpu", dtype="float32")
    assert read_config_json(source, loaded.adapter) is None
    check_against_in_memory(loaded.model, loaded.processor, loaded.adapter, source, tmp_path, [0])


def test_index_list_naming_a_missing_block_breaks_the_invariants():
    from .conftest import build_tiny

    model, _ = build_tiny("qwen3_moe")
    adapter = ADAPTER["qwen3_moe"]
    apply_plan(model, make_plan([0]), adapter)
    model.config.mlp_only_layers = [1, 7]
    with pytest.raises(SurgeryError, match=r"mlp_only_layers names blocks \[7\], beyond the 5 blocks"):
        check_invariants(model, adapter)


# -- Qwen3.5: hybrid linear / full attention ------------------------------------------------------


def test_layer_period_reads_any_second_layer_type():
    linear, full = "linear_attention", "full_attention"
    assert layer_period([linear, linear, linear, full] * 2) == 4
    assert layer_period([linear, full, linear, full, full]) is None
    assert layer_period([linear, "sliding_attention", full]) is None  # three kinds: no period says that


@pytest.mark.parametrize(("removed", "interval"), [([2, 3], 2), ([0], None), ([1, 4], None), ([4, 5], 2)])
def test_full_attention_interval_follows_layer_types(tiny_models, tmp_path, removed, interval):
    """L F L F L F, interval 2: the interval is recomputed from the kept layer types (None when
    no period describes them) and the saved config reloads with the same block types."""
    loaded = tiny_models["qwen3_5"].load()
    model, adapter = loaded.model, loaded.adapter
    types = list(model.config.text_config.layer_types)
    apply_plan(model, make_plan(removed), adapter)
    text = model.config.text_config
    assert text.full_attention_interval == interval
    assert text.layer_types == [types[i] for i in range(6) if i not in removed]
    assert [block.block_type for block in adapter.blocks(model)] == text.layer_types
    model.save_pretrained(tmp_path)
    reloaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert [block.block_type for block in adapter.blocks(reloaded)] == text.layer_types
    assert reloaded.config.text_config.full_attention_interval == interval


@pytest.mark.parametrize("family", HYBRID)
def test_every_module_with_a_layer_index_is_renumbered(tiny_models, family):
    """Both mixers (Gated DeltaNet and softmax attention) index the cache by `layer_idx`."""
    loaded = tiny_models[family].load()
    apply_plan(loaded.model, make_plan([0, 3]), loaded.adapter)
    for index, block in enumerate(loaded.adapter.blocks(loaded.model)):
        numbers = {m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")}
        assert numbers == {index}, (index, numbers)


def test_removing_every_full_attention_block_is_refused(tiny_models, tmp_path, capsys):
    """A decoder of linear-attention blocks alone cannot generate with transformers' cache; such
    a plan is refused in memory, out of core and by the CLI (exit 2), and nothing is written."""
    tiny = tiny_models["qwen3_5"]
    loaded = tiny.load()
    model, adapter = loaded.model, loaded.adapter
    every_full = [1, 3, 5]  # L F L F L F
    with pytest.raises(PlanError, match=r"removes every 'full_attention' block .*blocks \[1, 3, 5\] in config.text_config.layer_types"):
        apply_plan(model, make_plan(every_full), adapter)
    assert len(adapter.blocks(model)) == 6 and model.config.text_config.num_hidden_layers == 6  # untouched
    with pytest.raises(PlanError, match="removes every 'full_attention' block"):
        rewrite_checkpoint(tiny.path, tmp_path / "ooc", make_plan(every_full), adapter)
    assert not (tmp_path / "ooc").exists()
    plan_file = tmp_path / "plan.json"
    make_plan(every_full).save(plan_file)
    for extra in ([], ["--out-of-core"]):
        out = tmp_path / f"out{len(extra)}"
        code, _, err = run_cli(capsys, "prune", tiny.path, "--plan", plan_file, "-o", out, *extra)
        assert code == 2 and "keep at least one of blocks [1, 3, 5]" in err, (extra, err)
        assert not out.exists()
    # Why: without the rule the pruned model runs a plain forward but not cached generation.
    bare = apply_plan(copy.deepcopy(model), make_plan(every_full), replace(adapter, required_layer_type=""))
    batch = build_batch(loaded.processor, load_samples(tiny.data)[:1], with_answer=False)
    with pytest.raises(ValueError, match="only contain LinearAttention layers"), torch.no_grad():
        bare.generate(**batch.inputs, max_new_tokens=2, do_sample=False)


# -- bad input: per-block data no rule names ------------------------------------------------------


def with_unknown_list(config: dict) -> dict:
    text = config.get("text_config", config)
    text["layer_scales"] = [1.0] * text["num_hidden_layers"]
    return config


@pytest.mark.parametrize("family", ["qwen3", "qwen3_vl_moe"])
def test_unknown_per_block_config_list_is_refused(tiny_models, tmp_path, capsys, family):
    tiny = tiny_models[family]
    source = edited_copy(tiny, tmp_path / "src", with_unknown_list)
    loaded = tiny.load()
    where = "text_config.layer_scales" if loaded.adapter.text_config_path else "layer_scales"
    # In memory: refused before anything changes.
    loaded.adapter.text_config(loaded.model.config).layer_scales = [1.0] * 6
    with pytest.raises(UnsupportedArchitectureError, match=rf"per-block data in config\.{where} \(6 entries") as caught:
        apply_plan(loaded.model, make_plan([2, 3]), loaded.adapter)
    assert caught.value.exit_code == 2 and "it needs an adapter rule" in caught.value.fix
    assert len(loaded.adapter.blocks(loaded.model)) == 6
    # Out of core, from config.json as JSON: refused before any byte is written.
    assert read_config_json(source, loaded.adapter) is not None
    with pytest.raises(UnsupportedArchitectureError, match=rf"config\.{where}"):
        rewrite_checkpoint(source, tmp_path / "ooc", make_plan([2, 3]), loaded.adapter)
    assert not (tmp_path / "ooc").exists()
    # The CLI: a usage error (exit 2) naming the field and the fix, both paths.
    plan_file = tmp_path / "plan.json"
    make_plan([2, 3]).save(plan_file)
    for extra in ([], ["--out-of-core"]):
        out = tmp_path / f"out{len(extra)}"
        code, _, err = run_cli(capsys, "prune", source, "--plan", plan_file, "-o", out, *extra)
        assert code == 2 and f"config.{where}" in err and "it needs an adapter rule" in err, (extra, err)
        assert not out.exists()


def test_lists_that_only_happen_to_match_the_block_count_are_not_refused():
    data = {"num_hidden_layers": 2, "eos_token_id": [1, 2], "architectures": ["A", "B"], "layer_types": ["full_attention"] * 2}
    reindex_config(JsonConfig(data), ADAPTER["qwen3"], [0])
    assert data["eos_token_id"] == [1, 2] and data["layer_types"] == ["full_attention"]


# -- the test harness: families this transformers lacks are skipped, with the reason --------------


def test_a_family_missing_from_transformers_is_skipped_with_the_reason(monkeypatch, tmp_path):
    assert missing_reason("gemma3_text") is None  # its code lives in models/gemma3 (`transformers_module`)
    monkeypatch.setattr(versions, "_models_dir", lambda: tmp_path)  # a transformers without model folders
    reason = missing_reason("qwen3_5")
    assert reason is not None and "lacks the qwen3_5 family" in reason and "transformers>=5.17" in reason
    (tmp_path / "qwen3_5").mkdir()
    (tmp_path / "qwen3_5" / "__init__.py").write_text("")
    monkeypatch.setattr(versions, "installed", lambda package: "5.17.0")  # the folder, in a release the adapter supports
    assert missing_reason("qwen3_5") is None
    monkeypatch.setattr(versions, "installed", lambda package: "5.16.0")  # the folder in an older release: still refused
    assert "needs transformers>=5.17" in missing_reason("qwen3_5")
