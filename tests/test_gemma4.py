"""Gemma 4 (transformers 5 only): the conformance matrix and each rule the family needs.

Two tiny layouts of 6 blocks, both with per-layer embeddings (width 4), `per_layer_config`
(full-attention blocks have head_dim 16, the others 8) and the last 2 blocks KV-shared:

- MATRIX, layer_types F S S S F F: the shared blocks are full attention, so block 0 (the full
  KV source) and block 4 (first of the trailing full blocks: one must end the model) are fixed;
  the first removable block is 1, the last (5) can go. Used for the conformance matrix, with
  images (VLM class) and without (Gemma4ForCausalLM).
- SHARING, layer_types S F S S S F: both types shared, so blocks 1 and 3 are KV sources, and the
  block before the last slides, so the last block is fixed. Used to show why each rule exists.

Images go to the model as the Gemma 4 processor would hand them over (patches, their grid
positions, 4 soft-token placeholders per image): the processor needs audio, video and image
parts of its own, more than these tests need to show that surgery keeps the decoder exact.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from compressor.architectures import adapter_for_model
from compressor.block_tensors import decoder_of, kept_ranges
from compressor.checkpoint import read_header, rewrite_checkpoint
from compressor.errors import PlanError, SurgeryError
from compressor.surgery import apply_plan, skip_blocks

from .conftest import WORDS, missing_reason, removable, run_cli
from .test_checkpoint import assert_same_tensors, config_dict, load_tensors
from .test_surgery import greedy_without_cache, make_plan

pytestmark = pytest.mark.skipif(missing_reason("gemma4") is not None, reason=missing_reason("gemma4") or "")

F, S = "full_attention", "sliding_attention"
MATRIX = [F, S, S, S, F, F]
SHARING = [S, F, S, S, S, F]
VOCAB = 64
IMAGE, BOI, EOI = 60, 61, 62  # token ids (the tokenizer of the text model has fewer than 60)
REMOVALS = {"middle": [2, 3], "first": [0], "last": [5], "scattered": [0, 2, 5]}


def build(layer_types=MATRIX, *, vlm: bool = True, shared: int = 2, per_layer_width: int = 4, seed: int = 0, **extra):
    """A tiny random Gemma 4, float32, eval mode (``vlm``: Gemma4ForConditionalGeneration with a
    one-layer vision tower, else Gemma4ForCausalLM; ``per_layer_width`` 0: no per-layer embeddings)."""
    from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig

    from compressor.demo.processor import build_tokenizer

    tokenizer = build_tokenizer(WORDS)
    text = dict(
        vocab_size=VOCAB,
        vocab_size_per_layer_input=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=len(layer_types),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,  # per_layer_config: full-attention blocks get their own head_dim
        hidden_size_per_layer_input=per_layer_width,
        layer_types=list(layer_types),
        num_kv_shared_layers=shared,
        sliding_window=4,  # shorter than the prompts: sliding attention matters
        max_position_embeddings=128,
        tie_word_embeddings=False,  # a tied random model repeats one token when decoding greedily
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    if vlm:
        vision = dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            head_dim=8, patch_size=4, pooling_kernel_size=2, position_embedding_size=16,
        )  # fmt: skip
        config = Gemma4Config(
            text_config={**text, "use_bidirectional_attention": "vision"},  # image tokens attend both ways, as in the large models
            vision_config=vision,
            image_token_id=IMAGE,
            boi_token_id=BOI,
            eoi_token_id=EOI,
            video_token_id=63,
            audio_token_id=59,
            boa_token_id=58,
            eoa_token_index=57,
        )
        model = Gemma4ForConditionalGeneration(config)
    else:
        model = Gemma4ForCausalLM(Gemma4TextConfig(**text))
    model.config.architectures = [type(model).__name__]
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)  # sharp logits: greedy decoding without ties
    return model.eval(), tokenizer


def inputs_for(model, batch: int = 2, length: int = 14, seed: int = 1) -> dict:
    """Token ids with, for the VLM, one 16x16 image per row: 16 patches of 4x4 (48 values), pooled
    2x2 into 4 soft tokens between <boi> and <eoi>."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (batch, length), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if hasattr(model.config, "vision_config"):
        ids[:, 2], ids[:, 3:7], ids[:, 7] = BOI, IMAGE, EOI
        grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), dim=-1).reshape(16, 2)
        inputs.update(
            pixel_values=torch.rand(batch, 16, 48, generator=generator),
            image_position_ids=grid.expand(batch, 16, 2).clone(),
            mm_token_type_ids=(ids == IMAGE).long(),
        )
    return inputs


def logits(model, inputs: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


@pytest.fixture(scope="module")
def models():
    return {"vlm": build(vlm=True)[0], "text": build(vlm=False)[0]}


# -- the conformance matrix ---------------------------------------------------------------------


@pytest.mark.parametrize("case", list(REMOVALS))
@pytest.mark.parametrize("kind", ["vlm", "text"])
def test_pruned_equals_skipped_original_with_cache_and_generate(models, kind, case):
    model = models[kind]
    adapter = adapter_for_model(model)
    assert adapter.family == ("gemma4" if kind == "vlm" else "gemma4_text")
    removed = removable(REMOVALS[case], adapter.fixed_blocks(model.config))
    inputs = inputs_for(model)
    with skip_blocks(model, adapter, removed):
        expected = logits(model, inputs, use_cache=False)
    pruned = apply_plan(copy.deepcopy(model), make_plan(removed), adapter)
    assert torch.equal(logits(pruned, inputs), expected)  # cache on (the default)
    assert len(adapter.blocks(pruned)) == adapter.num_blocks(pruned.config) == 6 - len(removed)

    suppress = [IMAGE, BOI, EOI]  # a cache-free reference would feed them back without pixels
    with skip_blocks(model, adapter, removed):
        reference = greedy_without_cache(model, inputs, steps=5, suppress=suppress)
    with torch.no_grad():
        generated = pruned.generate(
            **inputs, max_new_tokens=5, do_sample=False, use_cache=True, eos_token_id=None, suppress_tokens=suppress
        )
    assert torch.equal(reference, generated)


@pytest.mark.parametrize("kind", ["vlm", "text"])
def test_pruned_model_is_what_its_config_builds_and_reloads_clean(models, kind, tmp_path):
    """The pruned model has exactly the parameters, shapes and decoder attributes that a fresh
    model built from its (re-indexed) config has; save -> from_pretrained reports no missing,
    unexpected or mismatched keys and gives the same logits."""
    model = models[kind]
    adapter = adapter_for_model(model)
    removed = [2, 5]  # a non-source sliding block and a KV-shared block
    pruned = apply_plan(copy.deepcopy(model), make_plan(removed), adapter)
    text = adapter.text_config(pruned.config)
    assert text.num_kv_shared_layers == 1  # the shared blocks were 4, 5; 5 is gone
    assert text.layer_types == [F, S, S, F]
    assert text.to_dict()["per_layer_config"] == {"0": {"head_dim": 16}, "3": {"head_dim": 16}}  # was 0, 4 (5 removed)

    fresh = type(model)(copy.deepcopy(pruned.config)).eval()
    shapes = lambda m: {name: tuple(t.shape) for name, t in m.state_dict().items()}  # noqa: E731
    assert shapes(pruned) == shapes(fresh)
    # Plain values the decoder's __init__ derived from the config (first_kv_shared_layer_idx...).
    derived = lambda m: {k: v for k, v in vars(decoder_of(m, adapter)).items() if isinstance(v, (bool, int, float, str))}  # noqa: E731
    assert derived(pruned) == derived(fresh)
    # The first KV-shared block is now 3. Asked of each attention (its `is_kv_shared_layer`): transformers
    # 5.24 also keeps the index on the decoder (`first_kv_shared_layer_idx`), 5.17 computes it per layer.
    assert [block.self_attn.is_kv_shared_layer for block in decoder_of(pruned, adapter).layers] == [False, False, False, True]

    pruned.save_pretrained(tmp_path)
    reloaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    inputs = inputs_for(model)
    assert torch.equal(logits(reloaded.eval(), inputs), logits(pruned, inputs))


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("kind", ["vlm", "text"])
def test_out_of_core_equals_in_memory_tensor_for_tensor(models, kind, layout, tmp_path):
    model = models[kind]
    adapter = adapter_for_model(model)
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB" if layout == "sharded" else "5GB")
    for removed in ([1, 5], [2, 3], [1, 2, 3, 5]):
        out, mem = tmp_path / f"ooc{removed}", tmp_path / f"mem{removed}"
        plan = make_plan(removed)
        result = rewrite_checkpoint(tmp_path / "src", out, plan, adapter)
        pruned = apply_plan(copy.deepcopy(model), plan, adapter)
        pruned.save_pretrained(mem)
        written = load_tensors(out)
        assert_same_tensors(written, load_tensors(mem))
        table = written[("model.language_model." if kind == "vlm" else "model.") + "embed_tokens_per_layer.weight"]
        assert table.shape == (VOCAB, 4 * (6 - len(removed)))
        assert config_dict(out) == config_dict(mem)
        reloaded, info = type(model).from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        inputs = inputs_for(model)
        assert torch.equal(logits(reloaded.eval(), inputs), logits(pruned, inputs))
        assert result.params_after == sum(t.numel() for t in written.values())


def test_column_slices_are_copied_chunk_by_chunk_and_hashed(models, tmp_path):
    """The strided copy of a [vocab, L·d] tensor gives the same bytes whatever the chunk: rows
    gathered several per chunk, one row per chunk, or rows longer than a chunk; the hashes the
    rewrite reports are those of the files it wrote."""
    import hashlib

    model = models["text"]
    adapter = adapter_for_model(model)
    model.save_pretrained(tmp_path / "src")
    row = 6 * 4 * 4  # 6 blocks x width 4 x float32
    outputs = []
    for chunk in (1 << 20, row, row - 1, 7):
        out = tmp_path / f"out{chunk}"
        result = rewrite_checkpoint(tmp_path / "src", out, make_plan([1, 3]), adapter, chunk_size=chunk)
        outputs.append((out / "model.safetensors").read_bytes())
        assert result.file_hashes["model.safetensors"].sha256 == hashlib.sha256(outputs[-1]).hexdigest()
    assert all(data == outputs[0] for data in outputs)
    source = load_tensors(tmp_path / "src")["model.embed_tokens_per_layer.weight"]
    kept = torch.cat([source[:, b:e] for b, e in kept_ranges([0, 2, 4, 5], 4)], dim=1)
    assert torch.equal(load_tensors(tmp_path / f"out{1 << 20}")["model.embed_tokens_per_layer.weight"], kept)
    header = {t.name: t for t in read_header(tmp_path / f"out{1 << 20}" / "model.safetensors").tensors}
    assert header["model.per_layer_model_projection.weight"].shape == (16, 32)


def test_per_layer_config_is_rekeyed_alike_in_memory_and_in_config_json():
    """Both paths write the dict as transformers serialises it, keys zero-padded to the widest
    ("03" beside "11"), so the out-of-core config.json equals the in-memory save."""
    from transformers import Gemma4TextConfig

    from compressor.architectures import ADAPTERS
    from compressor.reindex import JsonConfig, reindex_config

    adapter = next(a for a in ADAPTERS if a.family == "gemma4_text")
    config = Gemma4TextConfig(num_hidden_layers=14, global_head_dim=512, hidden_size_per_layer_input=0)  # full: 5, 11, 13
    raw = config.to_dict()
    assert list(raw["per_layer_config"]) == ["05", "11", "13"]
    kept = [i for i in range(14) if i not in (0, 1)]
    reindex_config(config, adapter, kept)
    reindex_config(JsonConfig(raw), adapter, kept)
    expected = {key: {"head_dim": 512} for key in ("03", "09", "11")}
    assert raw["per_layer_config"] == config.to_dict()["per_layer_config"] == expected


# -- why each rule is there ---------------------------------------------------------------------


def test_per_layer_tensors_must_be_sliced():
    """Without the block-tensor rule the pruned model cannot even run: the per-layer inputs are
    reshaped to the new block count."""
    model, _ = build(vlm=False)
    adapter = adapter_for_model(model)
    unsliced = replace(adapter, block_tensors=())
    with pytest.raises(RuntimeError, match="shape"):
        logits(apply_plan(copy.deepcopy(model), make_plan([2]), unsliced), inputs_for(model))
    # The invariant check names the tensor when its size disagrees with the block count.
    pruned = apply_plan(copy.deepcopy(model), make_plan([2]), adapter)
    pruned.model.embed_tokens_per_layer.weight = model.model.embed_tokens_per_layer.weight
    from compressor.surgery import check_invariants

    with pytest.raises(SurgeryError, match=r"embed_tokens_per_layer.weight has 24 entries along axis 1, expected 5 × 4"):
        check_invariants(pruned, adapter)


def test_a_gemma4_without_per_layer_embeddings_prunes_in_memory_and_out_of_core(tmp_path):
    """The larger Gemma 4 models have no per-layer embeddings (hidden_size_per_layer_input = 0):
    the block-tensor rule then finds nothing to cut, and both paths still agree."""
    model, _ = build(vlm=False, shared=0, per_layer_width=0)
    adapter = adapter_for_model(model)
    assert not any("per_layer" in name for name, _ in model.named_parameters() if "layers." not in name)
    inputs = inputs_for(model)
    with skip_blocks(model, adapter, [2, 4]):
        expected = logits(model, inputs, use_cache=False)
    pruned = apply_plan(copy.deepcopy(model), make_plan([2, 4]), adapter)
    assert torch.equal(logits(pruned, inputs), expected)
    model.save_pretrained(tmp_path / "src")
    pruned.save_pretrained(tmp_path / "mem")
    rewrite_checkpoint(tmp_path / "src", tmp_path / "ooc", make_plan([2, 4]), adapter)
    assert_same_tensors(load_tensors(tmp_path / "ooc"), load_tensors(tmp_path / "mem"))


def test_moe_blocks_prune_like_any_block(tmp_path):
    """`enable_moe_block` gives every block a router and fused experts beside its MLP, all under
    the block prefix: renaming covers them, in memory and out of core."""
    model, _ = build(vlm=False, enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16)
    adapter = adapter_for_model(model)
    assert any(".experts." in name for name in model.state_dict())
    inputs = inputs_for(model)
    with skip_blocks(model, adapter, [1, 5]):
        expected = logits(model, inputs, use_cache=False)
    pruned = apply_plan(copy.deepcopy(model), make_plan([1, 5]), adapter)
    assert torch.equal(logits(pruned, inputs), expected)
    model.save_pretrained(tmp_path / "src")
    pruned.save_pretrained(tmp_path / "mem")
    rewrite_checkpoint(tmp_path / "src", tmp_path / "ooc", make_plan([1, 5]), adapter)
    assert_same_tensors(load_tensors(tmp_path / "ooc"), load_tensors(tmp_path / "mem"))


def test_per_layer_config_must_be_rekeyed(tmp_path):
    """Not re-keyed, `per_layer_config` names a block beyond the count and the config fails to
    load (FACTS.md); re-keyed, the full-attention blocks keep their head_dim."""
    from transformers import AutoConfig

    model, _ = build(vlm=False)
    adapter = adapter_for_model(model)
    stale = apply_plan(copy.deepcopy(model), make_plan([3]), replace(adapter, block_dicts=()))
    stale.save_pretrained(tmp_path / "stale")
    with pytest.raises(ValueError, match="per_layer_config"):
        AutoConfig.from_pretrained(tmp_path / "stale")
    pruned = apply_plan(copy.deepcopy(model), make_plan([3]), adapter)
    assert [block.self_attn.head_dim for block in adapter.blocks(pruned)] == [16, 8, 8, 16, 16]
    pruned.save_pretrained(tmp_path / "good")
    reloaded = type(model).from_pretrained(tmp_path / "good")
    assert [block.self_attn.head_dim for block in adapter.blocks(reloaded)] == [16, 8, 8, 16, 16]


def test_kv_sources_are_fixed_and_removing_one_is_not_exact(tmp_path):
    """SHARING: blocks 4 (sliding) and 5 (full) reuse the keys and values of blocks 3 and 1.
    Removing a shared block (the count decremented) or a non-source block is exact; removing a
    source hands its readers another block's keys and values, so it is refused."""
    model, _ = build(SHARING, vlm=True)
    adapter = adapter_for_model(model)
    fixed = adapter.fixed_blocks(model.config)
    assert sorted(fixed) == [1, 3, 5]
    assert "num_kv_shared_layers = 2" in fixed[3] and "block(s) 4 reuse" in fixed[3]
    assert "block(s) 5 reuse" in fixed[1]
    inputs = inputs_for(model)
    for removed, shared_after in (([4], 1), ([2], 2), ([0, 2, 4], 1)):
        with skip_blocks(model, adapter, removed):
            expected = logits(model, inputs, use_cache=False)
        pruned = apply_plan(copy.deepcopy(model), make_plan(removed), adapter)
        assert torch.equal(logits(pruned, inputs), expected), removed
        assert pruned.config.text_config.num_kv_shared_layers == shared_after
    with pytest.raises(PlanError, match=r"removes block 3 \(num_kv_shared_layers = 2"):
        apply_plan(copy.deepcopy(model), make_plan([3]), adapter)
    # Why: unguarded, the saved model makes block 2 the sliding source (in memory block 4 finds
    # no keys at all: each attention module decided at construction whether it stores them).
    unguarded = replace(adapter, kv_shared_key="", last_layer_type="")
    with skip_blocks(model, adapter, [3]):
        expected = logits(model, inputs, use_cache=False)
    apply_plan(copy.deepcopy(model), make_plan([3]), unguarded).save_pretrained(tmp_path)
    got = logits(type(model).from_pretrained(tmp_path).eval(), inputs)
    assert (got - expected).abs().max() > 1e-3


def test_last_block_stays_full_attention(tmp_path):
    """transformers forces the last block to full attention when it reads the config, so a
    removal may not leave a sliding block last: SHARING's last block is fixed (block 4 slides, so
    the planner never picks it); in MATRIX blocks 4 and 5 may each go, but not both."""
    from transformers import AutoConfig

    model, _ = build(SHARING, vlm=False)
    adapter = adapter_for_model(model)
    fixed = adapter.fixed_blocks(model.config)
    assert "removing it would leave block 4 (sliding_attention) last" in fixed[5]
    with pytest.raises(PlanError, match=r"removes block 5 \(layer_types: transformers forces the last block to full_attention"):
        apply_plan(copy.deepcopy(model), make_plan([5]), adapter)
    # Why: unguarded, the saved config says sliding but loads as full (a different model).
    unguarded = replace(adapter, kv_shared_key="", last_layer_type="")
    apply_plan(copy.deepcopy(model), make_plan([5]), unguarded).save_pretrained(tmp_path / "forced")
    assert json.loads((tmp_path / "forced" / "config.json").read_text())["layer_types"][-1] == S
    assert AutoConfig.from_pretrained(tmp_path / "forced").layer_types[-1] == F

    # MATRIX ends F F: either may go, not both (block 3 slides).
    matrix, _ = build(MATRIX, vlm=False)
    assert sorted(adapter.fixed_blocks(matrix.config)) == [0]  # the KV source only
    for removed in ([4], [5]):
        apply_plan(copy.deepcopy(matrix), make_plan(removed), adapter)
    message = r"removes blocks 4, 5 and leaves block 3 \(sliding_attention\) last.*\nFix: keep one of the full_attention blocks among 4, 5"
    with pytest.raises(PlanError, match=message):
        apply_plan(copy.deepcopy(matrix), make_plan([2, 4, 5]), adapter)
    matrix.save_pretrained(tmp_path / "matrix")
    with pytest.raises(PlanError, match=message):
        rewrite_checkpoint(tmp_path / "matrix", tmp_path / "out", make_plan([4, 5]), adapter)
    assert not (tmp_path / "out").exists()


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    model, tokenizer = build(SHARING, vlm=False)
    folder = tmp_path_factory.mktemp("gemma4") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_removing_a_kv_source_is_refused_by_the_cli_with_the_field_and_the_fix(text_folder, tmp_path, capsys):
    """Bad input: a plan or recipe removing block 3, whose keys and values the KV-shared block 4
    reads. One message naming `num_kv_shared_layers` and the fix, exit 2, nothing written."""
    plan_file = tmp_path / "plan.json"
    make_plan([2, 3]).save(plan_file)
    for extra in ([], ["--out-of-core"]):
        out = tmp_path / f"out{len(extra)}"
        code, _, err = run_cli(capsys, "prune", text_folder, "--plan", plan_file, "-o", out, *extra)
        assert code == 2, err
        assert "block 3 (num_kv_shared_layers = 2" in err and "Fix: make the plan again without block(s) [3]" in err, err
        assert "Traceback" not in err and not out.exists() and not list(tmp_path.glob(f".{out.name}*"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: kv\nselect: {op: explicit, blocks: [3]}\n")
    code, _, err = run_cli(capsys, "plan", "--recipe", recipe, "--model", text_folder)
    assert code == 2 and "block 3 (num_kv_shared_layers = 2" in err, err


def test_prune_through_the_cli_in_memory_and_out_of_core_agree(text_folder, tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    make_plan([0, 4]).save(plan_file)
    for extra in ([], ["--out-of-core"]):
        code, _, err = run_cli(capsys, "prune", text_folder, "--plan", plan_file, "-o", tmp_path / f"out{len(extra)}", *extra)
        assert code == 0, err
    assert_same_tensors(load_tensors(tmp_path / "out1"), load_tensors(tmp_path / "out0"))
    config = json.loads((tmp_path / "out1" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_kv_shared_layers"], config["layer_types"]) == (4, 1, [F, S, S, F])
    assert config["per_layer_config"] == {"0": {"head_dim": 16}, "3": {"head_dim": 16}}


def test_onnx_export_is_refused_with_the_reason(tmp_path):
    from compressor.errors import UnsupportedArchitectureError
    from compressor.onnx_export import export_onnx

    model, tokenizer = build(vlm=False)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with pytest.raises(UnsupportedArchitectureError, match="cannot be exported to ONNX") as caught:
        export_onnx(tmp_path / "model", tmp_path / "onnx")
    assert "per-layer inputs" in caught.value.message and "shares keys and values" in caught.value.message
    assert not (tmp_path / "onnx").exists()


def test_the_planner_never_selects_a_fixed_block(text_folder, tmp_path):
    """Calibration records the fixed blocks (SHARING: KV sources 1 and 3, the last block 5); a
    metric recipe asking for 3 blocks then gets exactly the other three, and says why."""
    from compressor.calibrate import calibrate
    from compressor.data import Sample
    from compressor.loading import load_model
    from compressor.planner import plan
    from compressor.recipe import parse_recipe

    loaded = load_model(str(text_folder), device="cpu", dtype="float32")
    samples = [Sample(prompt="what color is the circle?", answer="red"), Sample(prompt="count to three", answer="one two three")]
    report = calibrate(loaded.model, loaded.processor, loaded.adapter, samples)
    recipe = parse_recipe("version: 1\nname: most\nselect: {op: lowest, metric: block_influence, modality: all, count: 3}\n", "r.yaml")
    chosen = plan(recipe, 6, report)
    assert chosen.removed_indices == [0, 2, 4]
    assert any("num_kv_shared_layers" in note and "never selected" in note for note in chosen.notes), chosen.notes
    pruned = apply_plan(loaded.model, chosen, loaded.adapter)
    assert adapter_for_model(pruned).num_blocks(pruned.config) == 3
