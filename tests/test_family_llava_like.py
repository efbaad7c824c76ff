"""LLaVA-like VLMs (llava_next, llava_onevision, mistral3, internvl, smolvlm): what each adapter
says, shown on the tiny models of tests/tiny_llava_like.py.

The conformance matrix (test_surgery, test_checkpoint, test_onnx, ... over conftest.FAMILIES)
proves every family end to end. Here:

- where the blocks are on disk: the four families with a LLaVA-style conversion mapping save the
  decoder as `language_model.model.layers.N` (the mapping reversed), SmolVLM as laid out in memory;
  and surgery touches only the decoder's part of the config (the vision tower's own layer
  indices, `vision_feature_layer`, stay);
- the Qwen2 decoder rules of LLaVA-NeXT (72B/110B), LLaVA-OneVision and InternVL (3: Qwen2,
  3.5: Qwen3): `layer_types` selected by kept block and `max_window_layers` remapped, in memory
  and out of core (config.json edited as JSON), the result equal to the original run with those
  blocks skipped; without the rules the plan is refused;
- a LLaVA-NeXT with a Llama decoder (7B-34B), whose config.json states none of those fields:
  out of core, transformers reads the config, and the result is the same;
- SmolVLM's own processor needs the num2words package: a clear error when it is missing, and
  out-of-core pruning, which loads no processor, still works.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
import transformers
from transformers.utils import is_torchvision_available

from compressor.architectures import ADAPTERS
from compressor.checkpoint import read_header, rewrite_checkpoint
from compressor.data import build_batch, load_samples
from compressor.errors import InputError, UnsupportedArchitectureError
from compressor.loading import load_model
from compressor.reindex import read_config_json
from compressor.surgery import apply_plan, skip_blocks

from .conftest import TinyModel, run_cli, write_data
from .test_checkpoint import check_against_in_memory
from .test_surgery import make_plan

ADAPTER = {a.family: a for a in ADAPTERS}
FAMILIES = ("llava_next", "llava_onevision", "mistral3", "internvl", "smolvlm")
QWEN2_DECODERS = ("llava_next", "llava_onevision", "internvl")  # their tiny models: layer_types F F S S S S, max_window_layers 2
F, S = "full_attention", "sliding_attention"


def saved_variant(folder, build) -> TinyModel:
    """A tiny model from ``build(6)`` saved with its processor and image data, made as
    conftest.build_tiny makes the matrix's (seed 0, architectures set, sharpened head)."""
    torch.manual_seed(0)
    model, processor = build(6)
    model.config.architectures = [type(model).__name__]
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return TinyModel(family=model.config.model_type, path=folder / "model", data=write_data(folder / "data", images=True))


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """LLaVA-NeXT with a Llama decoder (the 7B-34B models) and InternVL3.5 (a Qwen3 decoder)."""
    from .tiny_llava_like import _internvl, _llava_next

    root = tmp_path_factory.mktemp("llava_like_variants")
    return {
        "llava_next-llama": saved_variant(root / "llava_next-llama", lambda n: _llava_next(n, decoder="llama")),
        "internvl-qwen3": saved_variant(root / "internvl-qwen3", lambda n: _internvl(n, decoder="qwen3")),
    }


def skipped_logits(loaded, samples, removed) -> tuple[dict, torch.Tensor]:
    """The batch of ``samples`` and the original model's logits on it with ``removed`` skipped."""
    batch = build_batch(loaded.processor, samples, with_answer=True)
    with torch.no_grad(), skip_blocks(loaded.model, loaded.adapter, removed):
        return batch.inputs, loaded.model(**batch.inputs, use_cache=False).logits


def prune_out_of_core_and_compare(tiny: TinyModel, tmp_path, removed: list[int]) -> dict:
    """Prune ``tiny`` out of core: it equals the in-memory result (tensors, config, logits) and the
    original model run with ``removed`` skipped. Returns the output's config.json."""
    loaded = tiny.load()
    samples = load_samples(tiny.data)[:2]
    inputs, expected = skipped_logits(loaded, samples, removed)
    check_against_in_memory(loaded.model, loaded.processor, loaded.adapter, tiny.path, tmp_path, removed, samples)
    reloaded = type(loaded.model).from_pretrained(tmp_path / "ooc").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)
    return json.loads((tmp_path / "ooc" / "config.json").read_text())


# -- layout: block tensors on disk, and what surgery leaves alone ---------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_are_saved_under_the_adapters_prefix(tiny_models, family):
    """The installed transformers saves the decoder blocks 0..5 under `tensor_prefix` (not under the
    module path, where the four LLaVA-style families keep them in memory): the names out-of-core
    surgery renames."""
    tiny = tiny_models[family]
    adapter = ADAPTER[family]
    names = [tensor.name for file in sorted(tiny.path.glob("*.safetensors")) for tensor in read_header(file).tensors]
    head = adapter.tensor_prefix.split("{index}")[0]
    assert {int(name[len(head) :].split(".")[0]) for name in names if name.startswith(head)} == set(range(6))
    model = tiny.load().model
    path = adapter.block_path(model)
    assert path == adapter.block_paths[0]
    if head != path + ".":
        assert not any(name.startswith(path + ".") for name in names), "saved as laid out in memory"


@pytest.mark.parametrize("family", FAMILIES)
def test_surgery_leaves_the_vision_side_of_the_config_alone(tiny_models, family):
    """Only the decoder's config changes: the vision tower's layer count and `vision_feature_layer`
    (a vision block index) are not decoder blocks."""
    loaded = tiny_models[family].load()
    before = loaded.model.config.to_dict()
    apply_plan(loaded.model, make_plan([1, 4]), loaded.adapter)
    after = loaded.model.config.to_dict()
    assert after["text_config"]["num_hidden_layers"] == 4
    for key in set(before) - {"text_config"}:
        assert after[key] == before[key], key


# -- Qwen2 decoders: layer_types and max_window_layers --------------------------------------------


@pytest.mark.parametrize(
    ("removed", "types", "window_layers"), [([0, 3], [F, S, S, S], 1), ([1], [F, S, S, S, S], 1), ([4, 5], [F, F, S, S], 2)]
)
@pytest.mark.parametrize("family", QWEN2_DECODERS)
def test_qwen2_decoder_rules_in_memory_and_out_of_core(tiny_models, tmp_path, family, removed, types, window_layers):
    """layer_types F F S S S S, max_window_layers 2: the kept blocks' types, the number of kept
    blocks below 2; config.json is edited as JSON (it states both), and the output equals the
    in-memory one and the original run with the blocks skipped."""
    tiny = tiny_models[family]
    assert read_config_json(tiny.path, ADAPTER[family]) is not None
    text = prune_out_of_core_and_compare(tiny, tmp_path, removed)["text_config"]
    assert (text["layer_types"], text["max_window_layers"], text["num_hidden_layers"]) == (types, window_layers, 6 - len(removed))
    # What a client that derives the attention kinds from max_window_layers alone (as the config
    # class does when layer_types is absent) reads: the same blocks.
    rebuilt = transformers.AutoConfig.for_model(**{k: v for k, v in text.items() if k != "layer_types"})
    assert rebuilt.layer_types == types


def test_internvl3_5_qwen3_decoder_follows_the_same_rules(variants, tmp_path):
    tiny = variants["internvl-qwen3"]
    assert json.loads((tiny.path / "config.json").read_text())["text_config"]["model_type"] == "qwen3"
    text = prune_out_of_core_and_compare(tiny, tmp_path, [0, 3])["text_config"]
    assert (text["layer_types"], text["max_window_layers"]) == ([F, S, S, S], 1)


@pytest.mark.parametrize("family", QWEN2_DECODERS)
def test_without_the_rules_layer_types_is_refused(tiny_models, tmp_path, family):
    """Why the rules are named: with none, `layer_types` is per-block data no rule re-indexes, and
    the plan is refused in memory and out of core before anything is written."""
    tiny = tiny_models[family]
    loaded = tiny.load()
    bare = replace(loaded.adapter, per_layer_lists=(), index_fields=())
    match = r"per-block data in config\.text_config\.layer_types \(6 entries"
    with pytest.raises(UnsupportedArchitectureError, match=match):
        apply_plan(loaded.model, make_plan([1]), bare)
    assert len(bare.blocks(loaded.model)) == 6
    with pytest.raises(UnsupportedArchitectureError, match=match):
        rewrite_checkpoint(tiny.path, tmp_path / "ooc", make_plan([1]), bare)
    assert not (tmp_path / "ooc").exists()


# -- LLaVA-NeXT with a Llama decoder: nothing to rewrite, read by transformers --------------------


def test_llava_next_with_a_llama_decoder(variants, tmp_path):
    """config.json states no layer_types (a Llama decoder has none), which the JSON alone cannot
    tell from one left to the class default: transformers reads the config, and the output is
    still the in-memory one and the original with the blocks skipped."""
    tiny = variants["llava_next-llama"]
    assert read_config_json(tiny.path, ADAPTER["llava_next"]) is None
    text = prune_out_of_core_and_compare(tiny, tmp_path, [0, 3])["text_config"]
    assert text["model_type"] == "llama" and text["num_hidden_layers"] == 4
    assert "layer_types" not in text and "max_window_layers" not in text


# -- SmolVLM's own processor ----------------------------------------------------------------------


def test_smolvlm_processor_without_num2words_is_a_clear_error(tiny_models, tmp_path, capsys):
    """SmolVLMProcessor refuses to be built without num2words: loading says which package to
    install (exit 2). `prune --out-of-core --verify none` loads no processor, so it prunes all the
    same, and the result equals the original with the block skipped."""
    try:
        import num2words  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("num2words is installed: SmolVLMProcessor loads")
    tiny = tiny_models["smolvlm"]
    source = shutil.copytree(tiny.path, tmp_path / "src")
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = source / name
        if path.is_file() and "processor_class" in (data := json.loads(path.read_text())):
            path.write_text(json.dumps({**data, "processor_class": "SmolVLMProcessor"}))
    # transformers 4.57's processing module imports its video processor, which needs torchvision.
    needed = "num2words" if transformers.__version__ >= "5" or is_torchvision_available() else "torchvision"
    with pytest.raises(InputError, match=needed) as caught:
        load_model(str(source), device="cpu", dtype="float32")
    assert "install the package it names" in caught.value.fix
    plan_file = tmp_path / "plan.json"
    make_plan([2]).save(plan_file)
    code, _, err = run_cli(capsys, "prune", source, "--plan", plan_file, "-o", tmp_path / "ooc", "--out-of-core", "--verify", "none")
    assert code == 0, err
    loaded = tiny.load()
    inputs, expected = skipped_logits(loaded, load_samples(tiny.data)[:2], [2])
    reloaded = type(loaded.model).from_pretrained(tmp_path / "ooc").eval()
    assert reloaded.config.text_config.num_hidden_layers == 5
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)
