"""Text decoders of issue 18 (gemma2, phi3, mixtral, lfm2): what each family adds beyond the conformance matrix.

The matrix (test_surgery, test_checkpoint, test_equivalence, ... over conftest.FAMILIES) proves each
family end to end on its tiny model (tests/tiny_text.py). Here, each quirk found in the family:

- gemma2: `layer_types` (S F S F ...) is selected by kept block. Released checkpoints predate the
  field, and transformers fills it in from the block count, so a pruned config that did not state
  it would come back alternating from block 0 again: the output always states it.
- phi3: Phi-3 and Phi-4 (mini) share `Phi3ForCausalLM`; LongRoPE (Phi-3.5-mini, Phi-4-mini) prunes
  exactly, but its frequencies follow the sequence length, which the ONNX export refuses.
- mixtral: the experts are fused in memory by transformers 5 and stored per expert on disk by both
  versions, under the block prefix: the out-of-core rewrite renames them with their block.
- lfm2: short-convolution and attention blocks, named twice (`layer_types`, `full_attn_idxs`): both
  stay consistent after removal, and a plan may not remove every attention block.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from compressor.architectures import ADAPTERS, adapter_for_config
from compressor.checkpoint import rewrite_checkpoint
from compressor.data import build_batch, load_samples
from compressor.errors import PlanError, UnsupportedArchitectureError
from compressor.reindex import JsonConfig, read_config_json
from compressor.surgery import apply_plan, skip_blocks

from .test_checkpoint import check_against_in_memory, edited_copy, load_tensors
from .test_surgery import make_plan, sliding_window

ADAPTER = {a.family: a for a in ADAPTERS}
F, S = "full_attention", "sliding_attention"


def skipped_logits(model, adapter, inputs: dict, removed: list[int]) -> torch.Tensor:
    with torch.no_grad(), skip_blocks(model, adapter, removed):
        return model(**inputs, use_cache=False).logits


# -- gemma2 -----------------------------------------------------------------------------------------


def test_gemma2_config_without_layer_types_is_pruned_with_them_stated(tiny_models, tmp_path):
    """A released Gemma 2 config.json has no `layer_types`: transformers reads it (the JSON alone does
    not say which blocks slide), and the pruned config states the kept blocks' types. Removing block 0
    leaves F S F S F; left unstated, transformers would rebuild S F S F S and compute something else."""
    tiny = tiny_models["gemma2"]
    loaded = tiny.load()
    model, adapter = loaded.model, loaded.adapter
    assert model.config.layer_types == [S, F] * 3
    source = edited_copy(tiny, tmp_path / "src", lambda c: {k: v for k, v in c.items() if k != "layer_types"})
    assert read_config_json(source, adapter) is None  # transformers' path: the JSON leaves the types to the class
    samples = load_samples(tiny.data)[:2]
    check_against_in_memory(model, loaded.processor, adapter, source, tmp_path, [0], samples)

    pruned = json.loads((tmp_path / "ooc" / "config.json").read_text())
    assert pruned["layer_types"] == [F, S, F, S, F] and pruned["num_hidden_layers"] == 5
    # The global attention settings are untouched (the kept blocks compute as before).
    for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window"):
        assert pruned[key] == getattr(model.config, key), key
    inputs = build_batch(loaded.processor, samples, with_answer=True).inputs
    expected = skipped_logits(model, adapter, inputs, [0])
    reloaded = type(model).from_pretrained(tmp_path / "ooc").eval()
    assert [sliding_window(b) for b in adapter.blocks(reloaded)] == [None, 6, None, 6, None]
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)

    # Why it is stated: without it the kept blocks come back with the default pattern.
    unstated = tmp_path / "unstated"
    shutil.copytree(tmp_path / "ooc", unstated)
    (unstated / "config.json").write_text(json.dumps({k: v for k, v in pruned.items() if k != "layer_types"}))
    defaulted = type(model).from_pretrained(unstated).eval()
    assert defaulted.config.layer_types == [S, F, S, F, S]
    with torch.no_grad():
        assert not torch.allclose(defaulted(**inputs).logits, expected, atol=1e-3)


# -- phi3 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "model_type"),
    [("Phi3ForCausalLM", "phi3")],  # Phi-3(.5)-mini/medium, Phi-4, Phi-4-mini(-reasoning): one class
)
def test_phi_checkpoints_of_the_phi3_class_share_the_family(architecture, model_type):
    assert adapter_for_config(JsonConfig({"architectures": [architecture], "model_type": model_type})).family == "phi3"


@pytest.mark.parametrize("architecture", ["PhiMoEForCausalLM", "Phi4MultimodalForCausalLM", "PhiForCausalLM"])
def test_other_phi_classes_are_other_families(architecture):
    """Phi-3.5-MoE, Phi-4-multimodal and Phi-1/2 have their own modeling code: not taken for phi3."""
    with pytest.raises(UnsupportedArchitectureError, match=f"Architecture {architecture} is not supported"):
        adapter_for_config(JsonConfig({"architectures": [architecture]}))


def _longrope_phi3():
    """A tiny Phi-4-mini-like model: partial rotary with LongRoPE factors, pretrained for 8 positions,
    so the test prompts (longer) run on the long factors and short ones on the short factors."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from .conftest import WORDS, _text_kwargs, build_tokenizer

    tokenizer = build_tokenizer(WORDS)
    rope = {"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 4.0]}
    config = Phi3Config(**_text_kwargs(tokenizer, 6), partial_rotary_factor=0.5, original_max_position_embeddings=8, rope_scaling=rope)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config)
    model.config.architectures = ["Phi3ForCausalLM"]
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model.eval(), tokenizer


def test_phi3_longrope_prunes_exactly_and_its_onnx_export_is_refused(tmp_path):
    from compressor.loading import load_model
    from compressor.onnx_export import export_onnx

    model, tokenizer = _longrope_phi3()
    adapter = adapter_for_config(model.config)
    source = tmp_path / "src"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    samples = load_samples_for_lengths()
    check_against_in_memory(model, tokenizer, adapter, source, tmp_path, [1, 4], samples)

    # Cached generation from a prompt on the short factors to a length on the long ones (past 8), against
    # the original generating the same way with the blocks skipped (LongRoPE switches the factors of new
    # positions only, so a cache-free reference would differ from any cached run, pruned or not).
    inputs = build_batch(tokenizer, samples[:1], with_answer=False).inputs
    assert inputs["input_ids"].shape[1] < 8
    pruned = apply_plan(copy.deepcopy(model), make_plan([1, 4]), adapter)
    greedy = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), skip_blocks(model, adapter, [1, 4]):
        reference = model.generate(**inputs, **greedy)
    with torch.no_grad():
        generated = pruned.generate(**inputs, **greedy)
    assert torch.equal(generated.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(generated.logits, reference.logits, strict=True))

    loaded = load_model(str(tmp_path / "ooc"), device="cpu", dtype="float32")
    with pytest.raises(UnsupportedArchitectureError, match="rotary embedding of type longrope") as caught:
        export_onnx(loaded, tmp_path / "onnx")
    assert "export the Hugging Face checkpoint only" in caught.value.fix
    assert not (tmp_path / "onnx").exists()


def load_samples_for_lengths():
    from compressor.data import Sample

    return [Sample(prompt="count to", answer="one two three"), Sample(prompt="how many red blue green shapes", answer="two")]


# -- mixtral ----------------------------------------------------------------------------------------


def test_mixtral_experts_are_stored_per_expert_and_move_with_their_block(tiny_models, tmp_path):
    """Both transformers versions save Mixtral's experts as 4.x laid them out
    (`block_sparse_moe.experts.E.w1/w2/w3`, the router as `block_sparse_moe.gate`), under the block
    prefix, so the out-of-core rewrite renames them with their block and drops the removed blocks'.
    transformers 5 fuses them on load (`mlp.experts.gate_up_proj` = w1 and w3 stacked)."""
    tiny = tiny_models["mixtral"]
    source = load_tensors(tiny.path)
    experts = {name for name in source if name.startswith("model.layers.3.block_sparse_moe.")}
    assert experts == {f"model.layers.3.block_sparse_moe.experts.{e}.w{k}.weight" for e in range(4) for k in (1, 2, 3)} | {
        "model.layers.3.block_sparse_moe.gate.weight"
    }
    loaded = tiny.load()
    rewrite_checkpoint(tiny.path, tmp_path / "ooc", make_plan([1, 2]), loaded.adapter)
    out = load_tensors(tmp_path / "ooc")
    new_index = {0: 0, 3: 1, 4: 2, 5: 3}
    expected = {
        name.replace(f"model.layers.{old}.", f"model.layers.{new}.", 1): tensor
        for name, tensor in source.items()
        for old, new in new_index.items()
        if name.startswith(f"model.layers.{old}.")
    }
    assert {name for name in out if name.startswith("model.layers.")} == set(expected)
    assert all(torch.equal(out[name], tensor) for name, tensor in expected.items())

    reloaded = type(loaded.model).from_pretrained(tmp_path / "ooc")
    moe = reloaded.model.layers[1]
    w = {k: source[f"model.layers.3.block_sparse_moe.experts.2.w{k}.weight"] for k in (1, 2, 3)}
    if hasattr(moe, "mlp"):  # transformers 5: fused experts
        assert torch.equal(moe.mlp.experts.gate_up_proj[2], torch.cat([w[1], w[3]]))
        assert torch.equal(moe.mlp.experts.down_proj[2], w[2])
    else:  # 4.x: one module per expert
        expert = moe.block_sparse_moe.experts[2]
        assert all(torch.equal(getattr(expert, f"w{k}").weight, w[k]) for k in (1, 2, 3))


# -- lfm2 -------------------------------------------------------------------------------------------

C = "conv"


def with_attention_list(config: dict) -> dict:
    """config.json as released LFM2 checkpoints state it: `full_attn_idxs` beside `layer_types`
    (transformers 5 saves both; 4.57 drops the list, so the tiny model saved there lacks it)."""
    return {**config, "full_attn_idxs": [i for i, kind in enumerate(config["layer_types"]) if kind == F]}


@pytest.mark.parametrize("removed", [[0, 3], [5], [1, 2]], ids=["conv+attention", "last", "attention+conv"])
def test_lfm2_attention_list_and_layer_types_agree_after_removal(tiny_models, tmp_path, removed):
    """C F C F C F: `layer_types` is selected and `full_attn_idxs` renumbered (removed blocks dropped), so
    the list still names exactly the attention blocks, in memory and out of core (config.json as JSON).
    Both mixers are renumbered (the cache keeps a convolution state or keys and values per block), and
    the reloaded model generates, with its cache, what the original does with the blocks skipped."""
    tiny = tiny_models["lfm2"]
    loaded = tiny.load()
    model, adapter = loaded.model, loaded.adapter
    kept = [i for i in range(6) if i not in removed]
    types = [[C, F][i % 2] for i in kept]
    attention = [j for j, kind in enumerate(types) if kind == F]

    pruned = apply_plan(copy.deepcopy(model), make_plan(removed), adapter)
    assert pruned.config.layer_types == types
    if getattr(model.config, "full_attn_idxs", None) is not None:  # transformers 5 keeps the list in memory
        assert pruned.config.full_attn_idxs == attention
    for index, block in enumerate(adapter.blocks(pruned)):
        assert {m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")} == {index}
        assert hasattr(block, "self_attn") == (types[index] == F) and hasattr(block, "conv") == (types[index] == C)

    source = edited_copy(tiny, tmp_path / "src", with_attention_list)
    assert read_config_json(source, adapter) is not None  # the JSON path, without transformers
    rewrite_checkpoint(source, tmp_path / "ooc", make_plan(removed), adapter)
    written = json.loads((tmp_path / "ooc" / "config.json").read_text())
    assert (written["layer_types"], written["full_attn_idxs"], written["num_hidden_layers"]) == (types, attention, len(kept))

    reloaded, info = type(model).from_pretrained(tmp_path / "ooc", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    batch = build_batch(loaded.processor, load_samples(tiny.data)[:2], with_answer=False, padding_side="left")
    greedy = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), skip_blocks(model, adapter, removed):
        reference = model.generate(**batch.inputs, **greedy)
    with torch.no_grad():
        generated = reloaded.eval().generate(**batch.inputs, **greedy)
    assert torch.equal(generated.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(generated.logits, reference.logits, strict=True))


def test_lfm2_removing_every_attention_block_is_refused(tiny_models, tmp_path, capsys):
    """Convolution blocks alone cannot generate with transformers' cache (it reads the length from an
    attention block): refused in memory, out of core and by the CLI (exit 2), and nothing is written."""
    from dataclasses import replace

    from .conftest import run_cli

    tiny = tiny_models["lfm2"]
    loaded = tiny.load()
    model, adapter = loaded.model, loaded.adapter
    every_attention = [1, 3, 5]
    with pytest.raises(PlanError, match=r"removes every 'full_attention' block .*blocks \[1, 3, 5\] in config.layer_types"):
        apply_plan(model, make_plan(every_attention), adapter)
    assert len(adapter.blocks(model)) == 6 and model.config.num_hidden_layers == 6  # untouched
    with pytest.raises(PlanError, match="convolution blocks alone cannot generate with a cache"):
        rewrite_checkpoint(tiny.path, tmp_path / "ooc", make_plan(every_attention), adapter)
    assert not (tmp_path / "ooc").exists()
    plan_file = tmp_path / "plan.json"
    make_plan(every_attention).save(plan_file)
    for extra in ([], ["--out-of-core"]):
        out = tmp_path / f"out{len(extra)}"
        code, _, err = run_cli(capsys, "prune", tiny.path, "--plan", plan_file, "-o", out, *extra)
        assert code == 2 and "keep at least one of blocks [1, 3, 5]" in err, (extra, err)
        assert not out.exists()
    # Why: without the rule the pruned model runs a plain forward, but cached generation fails.
    bare = apply_plan(copy.deepcopy(model), make_plan(every_attention), replace(adapter, required_layer_type=""))
    batch = build_batch(loaded.processor, load_samples(tiny.data)[:1], with_answer=False)
    with torch.no_grad():
        bare(**batch.inputs, use_cache=False)
        with pytest.raises(ValueError, match="only contain LinearAttention layers|'full_attention' is not in list"):
            bare.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
