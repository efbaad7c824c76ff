"""Conformance of in-memory surgery and HF export, per family, with the KV cache on.

The reference is the original model with the same blocks replaced by the identity at run
time: the pruned model must equal it exactly (float32), generate the same greedy tokens
with its cache, and survive save/reload with no missing keys and identical logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig

from compressor.architectures import ADAPTERS, adapter_for_model
from compressor.data import build_batch, load_samples, tokenizer_of
from compressor.errors import PlanError, SurgeryError
from compressor.export import export_hf
from compressor.planner import RemovedBlock, SurgeryPlan
from compressor.surgery import apply_plan, check_invariants, count_parameters, layer_period, skip_blocks

from .conftest import FAMILIES, build_tiny, removable, write_data


def make_plan(removed: list[int], num_blocks: int = 6) -> SurgeryPlan:
    return SurgeryPlan(
        recipe="test",
        op="explicit",
        num_blocks=num_blocks,
        removed=tuple(RemovedBlock(index=i, reason="test") for i in removed),
    )


@torch.no_grad()
def greedy_without_cache(model, inputs: dict, steps: int, *, suppress: list[int], prefix_lm: bool = False) -> torch.Tensor:
    """Greedy decoding recomputing the whole sequence each step: needs no KV cache at all.

    Tokens in ``suppress`` are never chosen (as ``generate(suppress_tokens=...)``). Other
    per-token inputs (Gemma3's token_type_ids; Mllama's cross_attention_mask, per token along
    dim 1) grow by repeating their last column, as generate() does. For a prefix-LM (PaliGemma), generated tokens are marked as the suffix
    (token_type_ids 1, with labels) so they attend causally, as in cached decoding, instead of
    both ways like the prompt.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    per_token = {k for k, v in extra.items() if v.shape[:2] == ids.shape}  # decided on the prompt, not as ids grow
    prompt_length = ids.shape[1]
    for _ in range(steps):
        step = dict(extra)
        if prefix_lm:
            step["token_type_ids"] = (torch.arange(ids.shape[1]) >= prompt_length).long().expand_as(ids)
            step["labels"] = ids
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **step).logits[:, -1]
        logits[:, suppress] = -torch.inf
        token = logits.argmax(dim=-1, keepdim=True)
        extra = {k: torch.cat([v, v[:, -1:]], dim=1) if k in per_token else v for k, v in extra.items()}
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return ids


def placeholder_ids(processor) -> list[int]:
    """Special tokens a processor expands or wraps around images: not to be generated, since a
    cache-free reference would feed them back without their pixels."""
    tokenizer = tokenizer_of(processor)
    # transformers 5 renamed the list of unnamed special tokens to extra_special_tokens.
    ids = getattr(tokenizer, "additional_special_tokens_ids", None)
    return ids if ids is not None else tokenizer.extra_special_tokens_ids


def attention_type(block) -> str:
    """A block's attention type as its modules hold it: the block's ``attention_type`` in
    transformers 4.x, its attention's ``layer_type`` in 5.x (Qwen3.5: the block's ``block_type``,
    since a linear-attention block has no ``self_attn``; LFM2: whether the block is an attention one)."""
    kind = getattr(block, "attention_type", None) or getattr(block, "block_type", None)
    if kind is None and hasattr(block, "is_attention_layer"):  # LFM2: attention or short-convolution blocks
        kind = "full_attention" if block.is_attention_layer else "conv"
    if kind is None and hasattr(getattr(block, "self_attn", None), "use_rope"):  # Llama 4 (5.x): RoPE blocks attend in chunks
        kind = "chunked_attention" if block.self_attn.use_rope and block.self_attn.config.attention_chunk_size else "full_attention"
    return kind if kind is not None else block.self_attn.layer_type


def sliding_window(block) -> int | None:
    """The window a block's attention slides over (None: full, or no softmax attention at all)."""
    return getattr(getattr(block, "self_attn", None), "sliding_window", None)


REMOVALS = {"middle": [2, 3], "first": [0], "last": [5], "scattered": [0, 2, 5]}


@pytest.mark.parametrize("case", list(REMOVALS))
def test_pruned_equals_skipped_original(tiny, case):
    loaded = tiny.load()
    model, processor, adapter = loaded.model, loaded.processor, loaded.adapter
    samples = load_samples(tiny.data)[:3]
    batch = build_batch(processor, samples, with_answer=True)
    removed = removable(REMOVALS[case], adapter.fixed_blocks(model.config))
    with torch.no_grad(), skip_blocks(model, adapter, removed):
        expected = model(**batch.inputs, use_cache=False).logits
    pruned = apply_plan(copy.deepcopy(model), make_plan(removed), adapter)
    with torch.no_grad():
        got = pruned(**batch.inputs).logits  # cache on (the default)
    assert torch.equal(expected, got)
    assert len(adapter.blocks(pruned)) == 6 - len(removed)
    assert adapter.num_blocks(pruned.config) == 6 - len(removed)

    gen_batch = build_batch(processor, samples, with_answer=False, padding_side="left")
    suppress = placeholder_ids(processor)
    with skip_blocks(model, adapter, removed):
        reference = greedy_without_cache(model, gen_batch.inputs, steps=5, suppress=suppress, prefix_lm=adapter.prefix_lm)
    with torch.no_grad():
        generated = pruned.generate(
            **gen_batch.inputs, max_new_tokens=5, do_sample=False, use_cache=True, eos_token_id=None, suppress_tokens=suppress
        )
    assert torch.equal(reference, generated)


def test_renumbering_and_config_lists():
    model, _ = build_tiny("qwen2", layers=6)
    adapter = adapter_for_model(model)
    before = list(model.config.layer_types)
    assert before == ["full_attention"] * 2 + ["sliding_attention"] * 4
    apply_plan(model, make_plan([1, 4]), adapter)
    assert model.config.layer_types == [before[i] for i in (0, 2, 3, 5)]
    assert model.config.max_window_layers == 1  # one kept block (0) below the old value 2
    assert [block.self_attn.layer_idx for block in model.model.layers] == [0, 1, 2, 3]
    assert [attention_type(block) for block in model.model.layers] == model.config.layer_types


def test_check_invariants_catches_a_missed_renumber():
    model, _ = build_tiny("llama", layers=4)
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
    removed = removable([1, 3], adapter.fixed_blocks(model.config))
    plan = make_plan(removed)
    samples = load_samples(tiny.data)[:2]
    batch = build_batch(processor, samples, with_answer=True)
    with torch.no_grad(), skip_blocks(model, adapter, removed):
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
    assert card.startswith("---\n") and "depth-pruning" in card and all(f"| {i} |" in card for i in removed)


LAYERED = [a.family for a in ADAPTERS if a.per_layer_lists and a.family in FAMILIES]  # tiny-buildable ones


@pytest.mark.parametrize("removed", [[0, 3], [0]], ids=["two", "first"])
@pytest.mark.parametrize("family", LAYERED)
def test_per_layer_config_after_pruning(family, removed, tmp_path):
    """Every config copy in the model agrees after pruning, the kept blocks keep their attention
    type, and the saved config validates and rebuilds the same blocks."""
    model, _ = build_tiny(family)
    adapter = adapter_for_model(model)
    text = adapter.text_config(model.config)
    kept = [i for i in range(6) if i not in removed]
    types = list(text.layer_types)
    assert len(set(types)) == 2 and "full_attention" in types  # the tiny model mixes both (sliding or linear)
    windows = [sliding_window(block) for block in adapter.blocks(model)]
    index_before = {key: getattr(text, key) for key in adapter.index_fields}

    apply_plan(model, make_plan(removed), adapter)
    copies = [m.config for m in model.modules() if type(getattr(m, "config", None)) is type(text)]
    assert text in copies
    for config in copies:  # Gemma3's local rotary embedding holds its own deep copy
        assert config.num_hidden_layers == len(kept)
        assert config.layer_types == [types[i] for i in kept]
        for key, value in index_before.items():
            assert getattr(config, key) == sum(1 for i in kept if i < value)
        for key in adapter.layer_period_fields:
            assert getattr(config, key) == layer_period(config.layer_types)
    assert [attention_type(block) for block in adapter.blocks(model)] == text.layer_types
    assert [sliding_window(block) for block in adapter.blocks(model)] == [windows[i] for i in kept]

    model.save_pretrained(tmp_path)
    reloaded_config = AutoConfig.from_pretrained(tmp_path)  # validates layer_types against the count
    assert adapter.text_config(reloaded_config).layer_types == text.layer_types
    reloaded = type(model).from_pretrained(tmp_path)
    assert [attention_type(block) for block in adapter.blocks(reloaded)] == text.layer_types
    assert [sliding_window(block) for block in adapter.blocks(reloaded)] == [windows[i] for i in kept]
    for key in adapter.layer_period_fields:
        assert getattr(adapter.text_config(reloaded.config), key) == getattr(text, key)


def test_gemma3_sliding_window_pattern_follows_layer_types():
    # S S F S S F, pattern 3: dropping 0 and 3 leaves S F S F (period 2); dropping 0 alone
    # leaves S F S S F, which no period describes.
    assert layer_period(["sliding_attention", "full_attention"] * 2) == 2
    assert layer_period(["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]) is None
    assert layer_period(["sliding_attention"] * 3) == 4
    model, _ = build_tiny("gemma3")
    adapter = adapter_for_model(model)
    assert model.config.text_config._sliding_window_pattern == 3
    apply_plan(model, make_plan([0, 3]), adapter)
    assert model.config.text_config._sliding_window_pattern == 2
    assert model.config.text_config.sliding_window_pattern == 2
    text = model.config.text_config
    copies = [m.config for m in model.modules() if type(getattr(m, "config", None)) is type(text)]
    local = getattr(model.model.language_model, "rotary_emb_local", None)
    if local is not None:  # transformers 4.x: the local rotary embedding holds a deep copy of the text config
        assert local.config is not text and any(config is local.config for config in copies)
    for config in copies:
        assert (config.num_hidden_layers, config.layer_types, config._sliding_window_pattern) == (4, text.layer_types, 2)
    model.config.text_config._sliding_window_pattern = 3
    with pytest.raises(SurgeryError, match="_sliding_window_pattern = 3 does not describe layer_types"):
        check_invariants(model, adapter)


def test_tied_embeddings_export_reloads_clean(tmp_path):
    """Real Gemma-family VLMs tie the output head to the input embeddings (the fixtures untie it,
    or greedy decoding of a random model just repeats one token); tied, export works the same."""
    model, processor = build_tiny("paligemma")
    model.config.text_config.tie_word_embeddings = True
    model.tie_weights()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    adapter = adapter_for_model(model)
    before = count_parameters(model)
    plan = make_plan([1, 3])
    apply_plan(model, plan, adapter)
    samples = load_samples(write_data(tmp_path / "data", images=True))[:2]
    out = tmp_path / "pruned"
    result = export_hf(model, processor, adapter, out, plan=plan, params_before=before, samples=samples)
    assert result.max_abs_diff == 0.0
    reloaded, info = type(model).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_qwen3_vl_deepstack_block_is_fixed_and_a_later_one_removes_exactly(tiny_models, tmp_path, capsys):
    """Qwen3-VL adds DeepStack vision features to the output of the first blocks *by position*:
    removing one shifts the features onto another block (not exact), so it is refused
    everywhere; removing a later block is exact."""
    from dataclasses import replace as replace_field

    from .conftest import run_cli

    tiny = tiny_models["qwen3_vl"]
    loaded = tiny.load()
    model, adapter = loaded.model, loaded.adapter
    fixed = adapter.fixed_blocks(model.config)
    assert list(fixed) == list(range(len(model.config.vision_config.deepstack_visual_indexes))) == [0]
    assert "DeepStack" in fixed[0]
    batch = build_batch(loaded.processor, load_samples(tiny.data)[:2], with_answer=True)
    with pytest.raises(PlanError, match="block 0 .*DeepStack.*cannot be removed"):
        apply_plan(copy.deepcopy(model), make_plan([0]), adapter)
    # Why: without the rule, removing block 0 changes the image positions' logits.
    unguarded = replace_field(adapter, fixed_leading_key="")
    with torch.no_grad(), skip_blocks(model, adapter, [0]):
        expected = model(**batch.inputs, use_cache=False).logits
    with torch.no_grad():
        assert not torch.allclose(apply_plan(copy.deepcopy(model), make_plan([0]), unguarded)(**batch.inputs).logits, expected, atol=1e-3)
    # A later block: exact.
    with torch.no_grad(), skip_blocks(model, adapter, [1]):
        expected = model(**batch.inputs, use_cache=False).logits
    with torch.no_grad():
        assert torch.equal(apply_plan(copy.deepcopy(model), make_plan([1]), adapter)(**batch.inputs).logits, expected)
    # The CLI: a recipe listing it and a saved plan removing it both exit 2, naming the block.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: deepstack\nselect: {op: explicit, blocks: [0, 3]}\n")
    code, _, err = run_cli(capsys, "plan", "--recipe", recipe, "--model", tiny.path)
    assert code == 2 and "block 0 (DeepStack" in err, err
    plan_file = tmp_path / "plan.json"
    make_plan([0, 3]).save(plan_file)
    for extra in ([], ["--out-of-core"]):
        code, _, err = run_cli(capsys, "prune", tiny.path, "--plan", plan_file, "-o", tmp_path / f"out{len(extra)}", *extra)
        assert code == 2 and "block 0 (DeepStack" in err, (extra, err)
        assert not (tmp_path / f"out{len(extra)}").exists()
