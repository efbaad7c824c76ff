"""Out-of-core checkpoint surgery against the in-memory reference, per family and layout.

The reference is `apply_plan` + `save_pretrained`: the rewritten files must hold the same
tensors (names, dtypes, values) and the same config, reload with no missing or unexpected
keys, and give the in-memory pruned model's logits. Each source byte is read once and hashed
as it is written (the manifest does not read the weights again); memory is checked with
tracemalloc, with a control run that shows the measurement sees the copy buffers.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from compressor import checkpoint, manifest
from compressor.architectures import adapter_for_config
from compressor.checkpoint import (
    DTYPE_BYTES,
    INDEX_NAME,
    BlockNames,
    read_checkpoint,
    read_header,
    rewrite_checkpoint,
    shard_names,
    write_shard,
)
from compressor.data import build_batch, load_samples
from compressor.demo.processor import build_tokenizer
from compressor.errors import CheckpointError, InputError, InsufficientSpaceError, OutputExistsError, PlanError
from compressor.manifest import FileHash, check_folder, folder_files
from compressor.reindex import read_config_json
from compressor.surgery import apply_plan

from .conftest import FAMILIES, WORDS, _text_kwargs, run_cli
from .test_surgery import make_plan

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                assert name not in tensors, f"{name} stored twice"
                tensors[name] = handle.get_tensor(name)
    return tensors


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def config_dict(folder: Path) -> dict:
    """config.json without the sub-configs' `dtype`, which `from_pretrained` fills in on the in-memory
    model (the reference) but a config read from disk does not have: a loading artefact, not surgery."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not (k == "dtype" and value is not top)}
        return value

    top = json.loads((folder / "config.json").read_text())
    return strip(top)


def save_source(model, processor, folder: Path, sharded: bool) -> Path:
    model.save_pretrained(folder, max_shard_size="20KB" if sharded else "5GB")
    processor.save_pretrained(folder)
    return folder


def check_against_in_memory(model, processor, adapter, source: Path, tmp_path: Path, removed: list[int], samples=None):
    """Rewrite ``source`` out of core and compare everything with the in-memory path."""
    plan = make_plan(removed, num_blocks=adapter.num_blocks(model.config))
    result = rewrite_checkpoint(source, tmp_path / "ooc", plan, adapter, recipe_text="name: test\n")
    pruned = apply_plan(copy.deepcopy(model), plan, adapter)
    pruned.save_pretrained(tmp_path / "mem")

    assert_same_tensors(load_tensors(tmp_path / "ooc"), load_tensors(tmp_path / "mem"))
    assert config_dict(tmp_path / "ooc") == config_dict(tmp_path / "mem")
    reloaded, info = type(model).from_pretrained(tmp_path / "ooc", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert adapter.num_blocks(reloaded.config) == len(plan.kept)
    texts = samples or load_samples_for_text()
    inputs = build_batch(processor, texts, with_answer=True).inputs
    with torch.no_grad():
        expected = pruned.eval()(**inputs).logits
        got = reloaded.eval()(**inputs).logits
    assert torch.equal(got, expected)
    for name in ("plan.json", "recipe.yaml", "README.md", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "ooc" / name).is_file(), name
    assert json.loads((tmp_path / "ooc" / "plan.json").read_text())["kept"] == plan.kept
    assert "out of core" in (tmp_path / "ooc" / "README.md").read_text()
    return result


def load_samples_for_text():
    from compressor.data import Sample

    return [Sample(prompt="what color is the circle?", answer="red"), Sample(prompt="count to three", answer="one two three")]


# -- conformance per family ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_in_memory_export(tiny_models, tmp_path, family, layout):
    tiny = tiny_models[family]
    loaded = tiny.load()
    source = tiny.path if layout == "single" else save_source(loaded.model, loaded.processor, tmp_path / "src", sharded=True)
    # One sample: the two paths differ only in how the weights reach disk, which batching does not exercise.
    samples = load_samples(tiny.data)[:1]
    result = check_against_in_memory(loaded.model, loaded.processor, loaded.adapter, source, tmp_path, [2, 3], samples)
    prefixes = tuple(loaded.adapter.tensor_prefix.format(index=i) for i in (2, 3))
    assert result.tensors_dropped == sum(1 for name in load_tensors(source) if name.startswith(prefixes))
    assert result.params_after < result.params_before
    if layout == "sharded":
        assert result.dropped_files, "the 20KB shards of removed blocks should disappear"
    else:
        assert result.weight_files == ("model.safetensors",)


@pytest.mark.parametrize("removed", [[0], [5], [0, 2, 5]], ids=["first", "last", "scattered"])
@pytest.mark.parametrize("family", ["llama", "llava"])
def test_removing_first_last_scattered(tiny_models, tmp_path, family, removed):
    tiny = tiny_models[family]
    loaded = tiny.load()
    source = save_source(loaded.model, loaded.processor, tmp_path / "src", sharded=True)
    check_against_in_memory(loaded.model, loaded.processor, loaded.adapter, source, tmp_path, removed, load_samples(tiny.data)[:1])


def test_tied_embeddings(tmp_path):
    torch.manual_seed(0)
    tokenizer = build_tokenizer(WORDS)
    model = LlamaForCausalLM(LlamaConfig(**_text_kwargs(tokenizer, 6), tie_word_embeddings=True)).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    source = save_source(model, tokenizer, tmp_path / "src", sharded=False)
    assert "lm_head.weight" not in load_tensors(source)
    adapter = adapter_for_config(model.config)
    check_against_in_memory(model, tokenizer, adapter, source, tmp_path, [1, 4])
    assert "lm_head.weight" not in load_tensors(tmp_path / "ooc")


# -- sharded layout ------------------------------------------------------------------------------


def test_sharded_index_is_consistent(tiny_models, tmp_path):
    loaded = tiny_models["llava"].load()
    source = save_source(loaded.model, loaded.processor, tmp_path / "src", sharded=True)
    seen: list[tuple[int, int]] = []
    result = rewrite_checkpoint(source, tmp_path / "out", make_plan([1, 2, 3]), loaded.adapter, progress=lambda *a: seen.append(a))
    out = tmp_path / "out"
    assert seen[-1][0] == seen[-1][1] == sum(read_header(p).data_bytes for p in out.glob("*.safetensors"))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    index = json.loads((out / INDEX_NAME).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == files == sorted(result.weight_files)
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    headers = [read_header(out / name) for name in files]
    assert index["metadata"]["total_size"] == sum(h.data_bytes for h in headers)
    assert index["metadata"]["total_parameters"] == result.params_after
    assert {t.name: h.path.name for h in headers for t in h.tensors} == index["weight_map"]
    assert all(h.metadata == {"format": "pt"} for h in headers)
    assert result.bytes_written == sum((out / name).stat().st_size for name in files)
    assert not any(re.search(r"layers\.[3-5]\.", name) and name.startswith("language_model.") for name in index["weight_map"])


def test_shard_names_renumber_or_keep():
    assert shard_names(["model-00001-of-00004.safetensors", "model-00004-of-00004.safetensors"]) == {
        "model-00001-of-00004.safetensors": "model-00001-of-00002.safetensors",
        "model-00004-of-00004.safetensors": "model-00002-of-00002.safetensors",
    }
    assert shard_names(["a.safetensors", "b.safetensors"]) == {"a.safetensors": "a.safetensors", "b.safetensors": "b.safetensors"}


def test_mixed_dtypes_stay_aligned(tmp_path):
    """Dropping tensors must not leave a wider dtype at an offset that is not a multiple of its size."""
    (tmp_path / "src").mkdir()
    tensors = {
        "model.embed_tokens.weight": torch.arange(7, dtype=torch.bfloat16),  # 14 bytes: odd number of words
        "model.layers.0.a": torch.arange(3, dtype=torch.int8),
        "model.layers.1.b": torch.arange(5, dtype=torch.float32),
        "model.layers.1.c": torch.arange(3, dtype=torch.float64),
        "model.layers.2.d": torch.arange(9, dtype=torch.float16),
        "model.layers.2.e": torch.arange(4, dtype=torch.int64),
        "model.norm.weight": torch.ones(0, dtype=torch.float32),  # empty tensors are legal
    }
    save_file(tensors, tmp_path / "src" / "model.safetensors", metadata={"format": "pt", "note": "kept"})
    adapter = adapter_for_config(LlamaConfig(architectures=["LlamaForCausalLM"]))
    names = BlockNames.for_plan(adapter, make_plan([1], num_blocks=3))
    source = read_checkpoint(tmp_path / "src")
    shards, dropped = checkpoint.plan_shards(source, names)
    assert dropped == [] and len(shards) == 1
    digest = write_shard(shards[0], tmp_path / "out.safetensors", chunk_size=5)
    assert digest == FileHash.of((tmp_path / "out.safetensors").read_bytes())
    written = read_header(tmp_path / "out.safetensors")
    assert written.metadata == {"format": "pt", "note": "kept"}
    assert written.data_start % 8 == 0
    for tensor in written.tensors:
        assert (written.data_start + tensor.begin) % DTYPE_BYTES[tensor.dtype] == 0, tensor
    with safe_open(tmp_path / "out.safetensors", framework="pt") as handle:
        got = {name: handle.get_tensor(name) for name in handle.keys()}
    expected = {names.rename(k): v for k, v in tensors.items() if names.rename(k) is not None}
    assert sorted(expected) == [
        "model.embed_tokens.weight",
        "model.layers.0.a",
        "model.layers.1.d",
        "model.layers.1.e",
        "model.norm.weight",
    ]
    assert_same_tensors(got, expected)


# -- refusals -----------------------------------------------------------------------------------


def test_wrong_prefix_is_refused(tiny_models, tmp_path):
    loaded = tiny_models["llama"].load()
    adapter = dataclasses.replace(loaded.adapter, tensor_prefix="model.decoder.layers.{index}.")
    with pytest.raises(CheckpointError) as caught:
        rewrite_checkpoint(tiny_models["llama"].path, tmp_path / "out", make_plan([2]), adapter)
    message = str(caught.value)
    assert "model.decoder.layers.{index}." in message  # the prefix that matched nothing
    assert "model.layers.{index}." in message  # what the names look like instead
    assert "model.embed_tokens.weight" in message or "lm_head.weight" in message  # example names
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_llava_names_do_not_match_the_llama_prefix(tiny_models, tmp_path):
    """The template is anchored: LLaVA's legacy `language_model.model.layers.N.` is not `model.layers.N.`."""
    loaded = tiny_models["llava"].load()
    adapter = dataclasses.replace(loaded.adapter, tensor_prefix="model.layers.{index}.")
    with pytest.raises(CheckpointError, match=re.escape("language_model.model.layers.{index}.")):
        rewrite_checkpoint(tiny_models["llava"].path, tmp_path / "out", make_plan([2]), adapter)


def test_plan_for_another_model_is_refused(tiny_models, tmp_path):
    loaded = tiny_models["qwen2"].load()
    with pytest.raises(PlanError, match="8 blocks"):
        rewrite_checkpoint(tiny_models["qwen2"].path, tmp_path / "out", make_plan([1], num_blocks=8), loaded.adapter)


def test_existing_output_refused_unless_overwrite(tiny_models, tmp_path):
    loaded = tiny_models["mistral"].load()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError):
        rewrite_checkpoint(tiny_models["mistral"].path, tmp_path / "out", make_plan([1]), loaded.adapter)
    with pytest.raises(OutputExistsError, match="not written by compressor"):  # a user's folder: never replaced
        rewrite_checkpoint(tiny_models["mistral"].path, tmp_path / "out", make_plan([1]), loaded.adapter, overwrite=True)
    assert (tmp_path / "out" / "old.txt").read_text() == "old"
    (tmp_path / "out" / "old.txt").unlink()
    rewrite_checkpoint(tiny_models["mistral"].path, tmp_path / "out", make_plan([1]), loaded.adapter, overwrite=True)
    (tmp_path / "out" / "model.safetensors").unlink()  # compressor's own output is replaced, whatever it holds now
    rewrite_checkpoint(tiny_models["mistral"].path, tmp_path / "out", make_plan([1]), loaded.adapter, overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_not_enough_disk_space_is_refused_before_writing(tiny_models, tmp_path, monkeypatch):
    loaded = tiny_models["llama"].load()
    usage = checkpoint.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(InsufficientSpaceError, match=r"needs \d+ kB but its file system has 1 kB free"):
        rewrite_checkpoint(tiny_models["llama"].path, tmp_path / "out", make_plan([1]), loaded.adapter)
    assert list(tmp_path.iterdir()) == []


def test_output_over_the_source_is_refused(tiny_models):
    loaded = tiny_models["llama"].load()
    with pytest.raises(InputError, match="source checkpoint itself"):
        rewrite_checkpoint(tiny_models["llama"].path, tiny_models["llama"].path, make_plan([1]), loaded.adapter, overwrite=True)


def test_truncated_shard_is_refused(tiny_models, tmp_path):
    loaded = tiny_models["llama"].load()
    source = save_source(loaded.model, loaded.processor, tmp_path / "src", sharded=True)
    victim = sorted(source.glob("*.safetensors"))[1]
    os.truncate(victim, victim.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=re.escape(victim.name) + ".*truncated"):
        rewrite_checkpoint(source, tmp_path / "out", make_plan([1]), loaded.adapter)
    assert not (tmp_path / "out").exists()


def test_stale_weights_and_source_lineage_are_not_copied(tiny_models, tmp_path):
    loaded = tiny_models["llama"].load()
    source = save_source(loaded.model, loaded.processor, tmp_path / "src", sharded=False)
    (source / "pytorch_model.bin").write_bytes(b"stale")
    (source / "README.md").write_text("card of the source")
    (source / "original").mkdir()
    (source / "original" / "consolidated.00.pth").write_bytes(b"stale")
    (source / "LICENSE").write_text("license text")
    result = rewrite_checkpoint(source, tmp_path / "out", make_plan([1]), loaded.adapter)
    out = tmp_path / "out"
    assert (out / "LICENSE").read_text() == "license text"
    assert not (out / "pytorch_model.bin").exists() and not (out / "original").exists()
    assert "card of the source" not in (out / "README.md").read_text()
    assert {"pytorch_model.bin", "original/", "README.md"} <= set(result.skipped_files)


# -- the config: edited as JSON by surgery's rules, by transformers when it relies on defaults -----


def edited_copy(tiny, folder: Path, edit) -> Path:
    """A copy of ``tiny``'s folder whose config.json went through ``edit`` (a dict -> dict function)."""
    shutil.copytree(tiny.path, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config), indent=2))
    return folder


def without(config: dict, *keys: str) -> dict:
    text = config.get("text_config", config)
    for key in keys:
        text.pop(key, None)
    return config


@pytest.mark.parametrize(
    ("family", "keys", "light"),
    [
        ("qwen2", (), True),
        ("qwen2", ("num_hidden_layers",), False),  # the block count: LlamaConfig-style class default
        ("qwen2", ("layer_types",), False),  # a per-layer list the class derives
        ("qwen2", ("max_window_layers",), False),  # an index field with a class default
        ("gemma3", ("sliding_window_pattern",), True),  # the period is still stated under its other name
        ("gemma3", ("sliding_window_pattern", "_sliding_window_pattern"), False),
        ("llava", ("num_hidden_layers",), False),  # nested under text_config
    ],
)
def test_config_json_is_read_as_json_only_when_it_states_what_the_rules_read(tiny_models, tmp_path, family, keys, light):
    tiny = tiny_models[family]
    adapter = adapter_for_config(json.loads((tiny.path / "config.json").read_text(), object_hook=lambda d: SimpleNamespace(**d)))
    folder = edited_copy(tiny, tmp_path / "src", lambda c: without(c, *keys))
    assert (read_config_json(folder, adapter) is not None) == light
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), "auto_map": {}}))
    assert read_config_json(folder, adapter) is None  # code of its own: transformers and the trust policy decide


def test_config_json_keeps_its_key_order_and_changes_only_what_surgery_changes(tiny_models, tmp_path):
    tiny = tiny_models["gemma3"]
    reverse = lambda d: dict(reversed(d.items()))  # noqa: E731 - not the order transformers writes
    source = edited_copy(tiny, tmp_path / "src", lambda c: reverse({**c, "text_config": reverse(c["text_config"])}))
    loaded = tiny.load()
    rewrite_checkpoint(source, tmp_path / "out", make_plan([2, 3]), loaded.adapter)
    before = json.loads((source / "config.json").read_text())
    text = (tmp_path / "out" / "config.json").read_text()
    after = json.loads(text)
    assert text == json.dumps(after, indent=2) + "\n"
    assert list(after) == list(before) and list(after["text_config"]) == list(before["text_config"])
    changed = {k for k in before["text_config"] if before["text_config"][k] != after["text_config"][k]}
    assert changed == {"num_hidden_layers", "layer_types", "sliding_window_pattern", "_sliding_window_pattern"}
    assert {k for k in before if k != "text_config" and before[k] != after[k]} == set()
    pruned = apply_plan(loaded.model, make_plan([2, 3]), loaded.adapter)
    assert after["text_config"]["layer_types"] == pruned.config.text_config.layer_types


def test_config_left_to_class_defaults_is_reindexed_by_transformers(tiny_models, tmp_path):
    """Qwen2 derives `layer_types` when config.json leaves it out: the JSON alone cannot be
    re-indexed, so transformers reads the config, and the result is still the in-memory one."""
    from compressor.loading import load_model

    source = edited_copy(tiny_models["qwen2"], tmp_path / "src", lambda c: without(c, "layer_types"))
    loaded = load_model(str(source), device="cpu", dtype="float32")
    assert read_config_json(source, loaded.adapter) is None
    check_against_in_memory(loaded.model, loaded.processor, loaded.adapter, source, tmp_path, [1, 4])
    written = json.loads((tmp_path / "ooc" / "config.json").read_text())["layer_types"]  # derived, then selected
    assert written == [loaded.model.config.layer_types[i] for i in (0, 2, 3, 5)]


# -- copying: one read of the source, hashed as written, memory bounded ---------------------------


class CountingReads:
    """A file opened by `checkpoint` that counts the bytes its callers read through it."""

    def __init__(self, handle, counts: Counter):
        self.handle, self.counts = handle, counts

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.handle.close()

    def read(self, size=-1):
        data = self.handle.read(size)
        self.counts[Path(self.handle.name).name] += len(data)
        return data

    def readinto(self, buffer):
        n = self.handle.readinto(buffer)
        self.counts[Path(self.handle.name).name] += n
        return n


def prune_out_of_core(source: Path, out: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "prune", source, "--recipe", RECIPES / "explicit.yaml", "-o", out, "--out-of-core")
    assert code == 0, err


def test_manifest_hashes_are_those_of_the_files_on_disk(tiny_models, tmp_path, capsys):
    loaded = tiny_models["llava"].load()
    source = save_source(loaded.model, loaded.processor, tmp_path / "src", sharded=True)
    prune_out_of_core(source, tmp_path / "out", capsys)
    out = tmp_path / "out"
    on_disk = {
        p.relative_to(out).as_posix(): {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in folder_files(out)
        if p.name not in {"README.md", "compressor.json"}
    }
    assert len([name for name in on_disk if name.endswith(".safetensors")]) > 1
    assert json.loads((out / "compressor.json").read_text())["files"] == on_disk
    assert check_folder(out).verified


def test_weights_are_read_once_and_never_again_for_the_manifest(tiny_models, tmp_path, capsys, monkeypatch):
    loaded = tiny_models["llama"].load()
    source = save_source(loaded.model, loaded.processor, tmp_path / "src", sharded=True)
    names = BlockNames.for_plan(loaded.adapter, make_plan([2, 4]))  # explicit.yaml: [2, -2] of 6
    # Each source file: its header, then the bytes of every tensor it keeps, once.
    expected = {
        f.path.name: f.data_start + sum(t.nbytes for t in f.tensors if names.rename(t.name) is not None)
        for f in read_checkpoint(source).files
    }
    reads: Counter = Counter()

    def counting_open(file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)
        return CountingReads(handle, reads) if Path(file).parent == source and "r" in mode else handle

    hashed: list[str] = []

    def recording_sha256(path: Path, *args) -> str:
        hashed.append(path.name)
        return real_sha256(path, *args)

    real_sha256 = manifest.sha256
    monkeypatch.setattr(checkpoint, "open", counting_open, raising=False)
    monkeypatch.setattr(manifest, "sha256", recording_sha256)
    prune_out_of_core(source, tmp_path / "out", capsys)
    assert dict(reads) == expected
    assert sum(expected.values()) < sum(p.stat().st_size for p in source.glob("*.safetensors"))  # removed blocks: never read
    written = {p.name for p in (tmp_path / "out").glob("*.safetensors")} | {INDEX_NAME}
    assert "config.json" in hashed  # the manifest still hashes the files nobody hashed for it
    assert not written & set(hashed), f"re-read for the manifest: {sorted(written & set(hashed))}"


def test_manifest_takes_given_hashes_and_rehashes_stale_ones(tmp_path):
    (tmp_path / "given").write_bytes(b"a" * 10)
    (tmp_path / "stale").write_bytes(b"b" * 10)
    (tmp_path / "other").write_bytes(b"c" * 10)
    given = {"given": FileHash(10, "1" * 64), "stale": FileHash(9, "2" * 64)}  # "stale": rewritten since (size differs)
    files = manifest.write_manifest(tmp_path, checks=[], facts={}, hashed=given)["files"]
    assert files["given"] == {"size": 10, "sha256": "1" * 64}  # taken as given: not read
    assert files["stale"] == {"size": 10, "sha256": hashlib.sha256(b"b" * 10).hexdigest()}
    assert files["other"] == {"size": 10, "sha256": hashlib.sha256(b"c" * 10).hexdigest()}


def test_hashing_writer_reuses_a_buffer_only_once_it_is_hashed(tmp_path, monkeypatch):
    """With a hasher far slower than the copy, a buffer refilled too early would change the hash."""
    data = os.urandom(10_000)
    (tmp_path / "src").write_bytes(data)

    class SlowSha256:
        def __init__(self):
            self.sha = hashlib.sha256()

        def update(self, chunk):
            time.sleep(0.001)
            self.sha.update(chunk)

        def hexdigest(self):
            return self.sha.hexdigest()

    monkeypatch.setattr(checkpoint, "hashlib", SimpleNamespace(sha256=SlowSha256))
    with open(tmp_path / "src", "rb", buffering=0) as src, open(tmp_path / "dst", "wb", buffering=0) as dst:
        with checkpoint.HashingWriter(dst, chunk_size=100) as writer:
            writer.write(b"header")
            writer.copy(src, 5000, 5000)  # 50 chunks through HASH_DEPTH buffers
            writer.copy(src, 10, 1234)
            digest = writer.finish()
    expected = b"header" + data[5000:] + data[10:1244]
    assert (tmp_path / "dst").read_bytes() == expected
    assert digest == FileHash.of(expected)


def test_a_failing_hash_stops_the_rewrite_and_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    loaded = tiny_models["llama"].load()

    class BrokenSha256:
        def update(self, chunk):
            raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(checkpoint, "hashlib", SimpleNamespace(sha256=BrokenSha256))
    with pytest.raises(OSError, match="I/O error"):
        rewrite_checkpoint(tiny_models["llama"].path, tmp_path / "out", make_plan([1]), loaded.adapter, chunk_size=1000)
    assert list(tmp_path.iterdir()) == []


def test_shards_are_written_side_by_side(tiny_models, tmp_path, monkeypatch):
    """Each shard is hashed at one core's speed, so the shards go at once (not one after another)."""
    loaded = tiny_models["llava"].load()
    source = save_source(loaded.model, loaded.processor, tmp_path / "src", sharded=True)
    active, most = 0, 0
    lock = threading.Lock()
    original = checkpoint.write_shard

    def tracked(*args, **kwargs):
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
        time.sleep(0.05)  # long enough that writers started together overlap
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(checkpoint, "write_shard", tracked)
    result = rewrite_checkpoint(source, tmp_path / "out", make_plan([1]), loaded.adapter)
    assert len(result.weight_files) >= 3
    assert most == min(len(result.weight_files), checkpoint.MAX_PARALLEL_SHARDS)
    apply_plan(copy.deepcopy(loaded.model), make_plan([1]), loaded.adapter).save_pretrained(tmp_path / "mem")
    assert_same_tensors(load_tensors(tmp_path / "out"), load_tensors(tmp_path / "mem"))


def test_one_failing_shard_stops_the_others_and_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    loaded = tiny_models["llava"].load()
    source = save_source(loaded.model, loaded.processor, tmp_path / "src", sharded=True)
    original = checkpoint.write_shard
    tensors_after_failure: list[str] = []
    failed = threading.Event()

    def second_fails(shard, path, chunk_size, on_tensor):
        def counted(nbytes):
            if failed.is_set():
                tensors_after_failure.append(shard.name)
            on_tensor(nbytes)

        if shard.name.startswith("model-00002-"):
            failed.set()
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        time.sleep(0.05)  # the failure comes first
        return original(shard, path, chunk_size, counted)

    monkeypatch.setattr(checkpoint, "write_shard", second_fails)
    with pytest.raises(InsufficientSpaceError, match="disk is full"):  # the real error, not the others' stop
        rewrite_checkpoint(source, tmp_path / "out", make_plan([1]), loaded.adapter)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    # Every other writer stopped at its first tensor after the failure.
    assert Counter(tensors_after_failure) and max(Counter(tensors_after_failure).values()) == 1


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """A 2-block Llama whose MLP matrices are 8 MiB each (so a whole-tensor read would show)."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(WORDS)
    kwargs = _text_kwargs(tokenizer, 2) | {"hidden_size": 16, "intermediate_size": 131072}
    model = LlamaForCausalLM(LlamaConfig(**kwargs))
    model.config.architectures = ["LlamaForCausalLM"]
    folder = tmp_path_factory.mktemp("wide") / "llama"
    return save_source(model, tokenizer, folder, sharded=False)


def traced_peak(source: Path, out: Path, chunk_size: int) -> int:
    adapter = adapter_for_config(LlamaConfig(architectures=["LlamaForCausalLM"]))
    plan = make_plan([0], num_blocks=2)
    rewrite_checkpoint(source, out.with_name(out.name + "-warm"), plan, adapter, chunk_size=chunk_size)  # imports, caches
    tracemalloc.start()
    try:
        rewrite_checkpoint(source, out, plan, adapter, chunk_size=chunk_size)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_is_bounded_by_the_chunk(wide_llama, tmp_path):
    tensor_bytes = 16 * 131072 * 4
    assert max(t.nbytes for t in read_header(wide_llama / "model.safetensors").tensors) == tensor_bytes
    chunk = 256 << 10
    peak = traced_peak(wide_llama, tmp_path / "small", chunk_size=chunk)
    assert checkpoint.HASH_DEPTH * chunk <= peak < tensor_bytes // 4, f"peak {peak} bytes while copying {tensor_bytes}-byte tensors"
    # Control: the measurement does see the copy buffers (a chunk as big as a tensor shows up).
    assert traced_peak(wide_llama, tmp_path / "big", chunk_size=tensor_bytes) >= tensor_bytes
