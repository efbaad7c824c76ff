"""Conformance of in-memory surgery and HF export, per family, with the KV cache on.

The reference is the original model with the same blocks replaced by the identity at run
time: the pruned model must equal it exactly (float32), generate the same greedy tokens
with its cache, and survive save/reload with no missing keys and identical logits.
"""

from __future__ import annotations

import copy

import pytest
import torch

from compressor.data import build_batch, load_samples
from compressor.errors import PlanError, SurgeryError
from compressor.export import export_hf
from compressor.planner import RemovedBlock, SurgeryPlan
from compressor.surgery import apply_plan, check_invariants, count_parameters, skip_blocks

from .conftest import build_tiny


def make_plan(removed: list[int], num_blocks: int = 6) -> SurgeryPlan:
    return SurgeryPlan(
        recipe="test",
        op="explicit",
        num_blocks=num_blocks,
        removed=tuple(RemovedBlock(index=i, reason="test") for i in removed),
    )


@torch.no_grad()
def greedy_without_cache(model, inputs: dict, steps: int) -> torch.Tensor:
    """Greedy decoding recomputing the whole sequence each step: needs no KV cache at all."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return ids


REMOVALS = {"middle": [2, 3], "first": [0], "last": [5], "scattered": [0, 2, 5]}


@pytest.mark.parametrize("case", list(REMOVALS))
def test_pruned_equals_skipped_original(tiny, case):
    loaded = tiny.load()
    model, processor, adapter = loaded.model, loaded.processor, loaded.adapter
    samples = load_samples(tiny.data)[:3]
    batch = build_batch(processor, samples, with_answer=True)
    removed = REMOVALS[case]
    with torch.no_grad(), skip_blocks(model, adapter, removed):
        expected = model(**batch.inputs, use_cache=False).logits
    pruned = apply_plan(copy.deepcopy(model), make_plan(removed), adapter)
    with torch.no_grad():
        got = pruned(**batch.inputs).logits  # cache on (the default)
    assert torch.equal(expected, got)
    assert len(adapter.blocks(pruned)) == 6 - len(removed)
    assert adapter.num_blocks(pruned.config) == 6 - len(removed)

    gen_batch = build_batch(processor, samples, with_answer=False, padding_side="left")
    with skip_blocks(model, adapter, removed):
        reference = greedy_without_cache(model, gen_batch.inputs, steps=5)
    with torch.no_grad():
        generated = pruned.generate(**gen_batch.inputs, max_new_tokens=5, do_sample=False, use_cache=True, eos_token_id=None)
    assert torch.equal(reference, generated)


def test_renumbering_and_config_lists():
    model, _ = build_tiny("qwen2", layers=6)
    from compressor.architectures import adapter_for_model

    adapter = adapter_for_model(model)
    before = list(model.config.layer_types)
    assert before == ["full_attention"] * 2 + ["sliding_attention"] * 4
    apply_plan(model, make_plan([1, 4]), adapter)
    assert model.config.layer_types == [before[i] for i in (0, 2, 3, 5)]
    assert model.config.max_window_layers == 1  # one kept block (0) below the old value 2
    assert [block.self_attn.layer_idx for block in model.model.layers] == [0, 1, 2, 3]
    assert [block.attention_type for block in model.model.layers] == model.config.layer_types


def test_check_invariants_catches_a_missed_renumber():
    model, _ = build_tiny("llama", layers=4)
    from compressor.architectures import adapter_for_model

    adapter = adapter_for_model(model)
    apply_plan(model, make_plan([1], num_blocks=4), adapter)
    model.model.layers[2].self_attn.layer_idx = 3
    with pytest.raises(SurgeryError, match=r"block 2: self_attn.layer_idx = 3"):
        check_invariants(model, adapter)
    model.model.layers[2].self_attn.layer_idx = 2
    model.config.num_hidden_layers = 4
    with pytest.raises(SurgeryError, match="num_hidden_layers = 4 but the model has 3"):
        check_invariants(model, adapter)


def test_plan_for_another_model_is_refused(tiny_models):
    loaded = tiny_models["llama"].load()
    with pytest.raises(PlanError, match="plan is for a model with 8 blocks"):
        apply_plan(loaded.model, make_plan([1], num_blocks=8), loaded.adapter)


def test_export_reloads_clean_and_identical(tiny, tmp_path):
    loaded = tiny.load()
    model, processor, adapter = loaded.model, loaded.processor, loaded.adapter
    before = count_parameters(model)
    plan = make_plan([1, 3])
    samples = load_samples(tiny.data)[:2]
    batch = build_batch(processor, samples, with_answer=True)
    with torch.no_grad(), skip_blocks(model, adapter, [1, 3]):
        reference = model(**batch.inputs, use_cache=False).logits
    apply_plan(model, plan, adapter)
    out = tmp_path / "pruned"
    result = export_hf(
        model, processor, adapter, out, plan=plan, params_before=before, source=loaded.source, recipe_text="version: 1\n", samples=samples
    )
    assert result.max_abs_diff == 0.0
    assert result.params_after < before
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "plan.json", "recipe.yaml", "README.md"} <= names
    assert not list(tmp_path.glob(".pruned.tmp-*")), "staging folder left behind"
    reloaded, info = type(model).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(reference, reloaded.eval()(**batch.inputs).logits)
    assert adapter.num_blocks(reloaded.config) == 4
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "depth-pruning" in card and "| 1 |" in card and "| 3 |" in card
