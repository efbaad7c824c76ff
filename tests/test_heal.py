"""`compressor heal`: training a pruned model towards its original, on tiny random models.

Each test states a property that a broken implementation fails: the KL to the teacher goes down
(measured here, not read from the tool's own report), the checkpoint reloads clean with the
in-memory model's logits, LoRA merged equals LoRA applied, a resumed run ends bit for bit where
an uninterrupted one does, every bad input is refused with exit 2 before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.data import file_sha256, load_samples
from compressor.heal import HealOptions, heal, resume_folder
from compressor.heal.loop import CHECKPOINT_FILE

from .conftest import build_tiny, run_cli, write_data

REMOVED = [2, 3]  # of 6: kept 0 1 4 5, so blocks 1 and 4 sit beside the removed span


@pytest.fixture(scope="module")
def made(tiny_models, tmp_path_factory):
    """Pruned llama and llava (blocks 2, 3 removed) and training data of each modality (12 samples)."""
    from compressor.pipeline import prune
    from compressor.recipe import load_recipe

    root = tmp_path_factory.mktemp("heal")
    recipe = root / "explicit.yaml"
    recipe.write_text(f"version: 1\nname: heal-test\nselect: {{op: explicit, blocks: {REMOVED}}}\n")
    found = {}
    for family in ("llama", "llava"):
        out = root / f"{family}-pruned"
        prune(str(tiny_models[family].path), out, recipe_file=load_recipe(recipe))
        found[family] = out
        found[f"{family}-data"] = write_data(root / f"{family}-train", images=family == "llava", n=12)
    found["text-only"] = write_data(root / "text-only", images=False, n=12)
    return found


def _options(**given) -> HealOptions:
    settings = {"steps": 6, "lr": 1e-3, "batch_size": 2, "patience": 0, **given}
    return HealOptions(**settings)


def _kl(student, teacher, adapter, processor, samples) -> float:
    """Mean KL(teacher || student) per scored token, computed here with plain full-logit forwards."""
    from compressor.data import build_batch
    from compressor.functional import scored_positions

    batch = build_batch(processor, samples, with_answer=True)
    rows, _ = scored_positions(batch, adapter.image_token_id(student.config))
    with torch.no_grad():
        p = torch.log_softmax(teacher(**batch.inputs).logits[rows[:, 0], rows[:, 1]].float(), -1)
        q = torch.log_softmax(student(**batch.inputs).logits[rows[:, 0], rows[:, 1]].float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _load(path):
    from compressor.loading import load_model

    return load_model(str(path), device="cpu", dtype="float32")


def test_distill_brings_the_student_closer_to_the_teacher(tiny_models, made, tmp_path):
    result = heal(
        made["llama"],
        tmp_path / "healed",
        teacher=tiny_models["llama"].path,
        data=made["llama-data"],
        options=_options(steps=12, eval_every=4, lr=1e-4),
        device="cpu",
    )
    assert result.steps == 12 and result.tokens > 0
    loss = result.curve.loss  # per step, each on other samples: compare the ends, not single steps
    assert sum(loss[-3:]) < 0.5 * sum(loss[:3])
    assert result.kl_after < result.kl_before
    base, pruned, healed = _load(tiny_models["llama"].path), _load(made["llama"]), _load(tmp_path / "healed")
    samples = load_samples(made["llama-data"])
    before = _kl(pruned.model, base.model, base.adapter, base.processor, samples)
    after = _kl(healed.model, base.model, base.adapter, base.processor, samples)
    assert after < 0.8 * before, (before, after)
    # Every kept block trained (distill), and nothing outside them: embeddings and head are the pruned model's.
    assert torch.equal(healed.model.get_input_embeddings().weight, pruned.model.get_input_embeddings().weight)
    assert torch.equal(healed.model.lm_head.weight, pruned.model.lm_head.weight)
    for j in range(4):
        assert not torch.equal(healed.model.model.layers[j].mlp.down_proj.weight, pruned.model.model.layers[j].mlp.down_proj.weight)


def test_loss_is_kl_of_teacher_to_student_on_the_answer_tokens(tiny_models, made):
    """The objective's KL (final norm captured, LM head on the scored rows only) equals
    KL(teacher || student) computed from full logits; the reverse direction differs."""
    from compressor.data import build_batch
    from compressor.heal.losses import Weights, terms

    base, pruned = _load(tiny_models["llama"].path), _load(made["llama"])
    samples = load_samples(made["llama-data"])[:4]
    batch = build_batch(base.processor, samples, with_answer=True)
    with torch.no_grad():
        found = terms(pruned.model, base.model, base.adapter, batch, [0, 1, 4, 5], Weights())
    assert found.rows == int(batch.answer_mask.sum())  # answers exist: only answer tokens are scored
    forward = _kl(pruned.model, base.model, base.adapter, base.processor, samples)
    backward = _kl(base.model, pruned.model, base.adapter, base.processor, samples)
    assert float(found.kl) / found.rows == pytest.approx(forward, rel=1e-4)
    assert abs(forward - backward) > 1e-3


def test_a_run_that_never_beats_the_pruned_model_writes_the_pruned_weights(tiny_models, made, tmp_path):
    # A learning rate this large wrecks every step: the held-out KL picks the untrained student.
    result = heal(made["llama"], tmp_path / "h", teacher=tiny_models["llama"].path, data=made["llama-data"],
                  options=_options(method="full", steps=2, eval_every=1, lr=1.0, max_grad_norm=0), device="cpu")  # fmt: skip
    assert [kl for _, kl in result.curve.held_out][1:] > [result.kl_before] * 2
    assert result.kl_after == result.kl_before
    a, b = load_file(tmp_path / "h" / "model.safetensors"), load_file(made["llama"] / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def lora_run(tiny_models, made, tmp_path_factory):
    """One CLI run: llava, LoRA, hidden-state MSE, a held-out split; its output folder and stdout."""
    from compressor import cli  # capsys is function-scoped: the CLI's entry point is called directly

    out = tmp_path_factory.mktemp("lora") / "healed"
    cli._state.update(verbose=False, quiet=False)
    code = cli.main(["-q", "heal", str(made["llava"]), "--teacher", str(tiny_models["llava"].path), "--data", str(made["llava-data"]),
                     "-o", str(out), "--method", "lora", "--steps", "6", "--lr", "1e-2", "--batch-size", "2",
                     "--hidden-loss", "mse", "--eval-every", "3", "--device", "cpu"])  # fmt: skip
    cli._state.update(verbose=False, quiet=False)
    assert code == 0
    return out


def test_lora_output_is_a_plain_checkpoint_that_reloads_clean(made, lora_run):
    from transformers import LlavaForConditionalGeneration

    files = {p.name for p in lora_run.iterdir()}
    assert not {"adapter_config.json", "adapter_model.safetensors"} & files
    assert not [k for k in load_file(lora_run / "model.safetensors") if "lora" in k]
    assert set(load_file(lora_run / "model.safetensors")) == set(load_file(made["llava"] / "model.safetensors"))
    model, info = LlavaForConditionalGeneration.from_pretrained(lora_run, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.text_config.num_hidden_layers == 4
    # The pruned shape exactly: the config is PRUNED's (peft's merge may not rewrite it), but for
    # the dtype transformers records of the load.
    assert _described(lora_run / "config.json") == _described(made["llava"] / "config.json")
    # Trained: the adapted blocks (1 and 4, beside the removed span) changed, the others did not.
    healed, pruned = load_file(lora_run / "model.safetensors"), load_file(made["llava"] / "model.safetensors")
    changed = {k.split("layers.")[1].split(".")[0] for k in healed if not torch.equal(healed[k], pruned[k])}
    assert changed == {"1", "2"}  # new numbering of original blocks 1 and 4


def _described(path: Path) -> dict:
    """A config.json without what says how it was written (versions, the dtype of the load)."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("dtype", "torch_dtype", "transformers_version")}
        return value

    return strip(json.loads(path.read_text()))


def test_reloaded_checkpoint_gives_the_in_memory_logits(tiny_models, made, tmp_path):
    from transformers import LlamaForCausalLM

    from compressor.data import build_batch

    result = heal(
        made["llama"],
        tmp_path / "healed",
        teacher=tiny_models["llama"].path,
        data=made["llama-data"],
        options=_options(method="full", steps=3),
        device="cpu",
    )
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "healed").eval()
    samples = load_samples(made["llama-data"])[:3]
    inputs = build_batch(tiny_models["llama"].load().processor, samples, with_answer=True).inputs
    with torch.no_grad():
        expected, got = result.model(**inputs).logits, reloaded(**inputs).logits
    assert torch.equal(expected, got)
    pruned = _load(made["llama"]).model
    with torch.no_grad():
        assert not torch.allclose(pruned(**inputs).logits, got)  # it did train


def test_projector_method_trains_the_projector_alone(tiny_models, made, tmp_path):
    result = heal(made["llava"], tmp_path / "h", teacher=tiny_models["llava"].path, data=made["llava-data"],
                  options=_options(method="projector", steps=3), device="cpu")  # fmt: skip
    assert result.kl_after < result.kl_before
    healed, pruned = load_file(tmp_path / "h" / "model.safetensors"), load_file(made["llava"] / "model.safetensors")
    changed = {k for k in healed if not torch.equal(healed[k], pruned[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)


def test_lora_merged_equals_the_adapter_model(made):
    from compressor.data import build_batch
    from compressor.heal.methods import merge, prepare
    from compressor.planner import SurgeryPlan

    loaded = _load(made["llama"])
    plan = SurgeryPlan.load(made["llama"] / "plan.json")
    trainable = prepare(loaded.model, loaded.adapter, plan, HealOptions(method="lora", lora_rank=4))
    assert trainable.blocks == [1, 4] and trainable.count > 0
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainable.parameters:
            p.normal_(std=0.3)  # B starts at zero: give the adapters something to merge
    inputs = build_batch(loaded.processor, load_samples(made["llama-data"])[:3], with_answer=True).inputs
    with torch.no_grad():
        adapted = trainable.peft_model(**inputs).logits
        plain = _load(made["llama"]).model(**inputs).logits
        merged_model = merge(trainable)
        merged = merged_model(**inputs).logits
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapters change the output
    # float32 rounding of W + BA vs W·x + B·A·x: 1e-5 of the logits' scale (the project's LOGITS_TOLERANCE).
    assert (adapted - merged).abs().max() <= 1e-5 * max(1.0, float(adapted.abs().max()))
    assert type(merged_model).__name__ == "LlamaForCausalLM"
    assert not [n for n, _ in merged_model.named_parameters() if "lora" in n]


def test_resumed_run_ends_bit_exactly_where_an_uninterrupted_one_does(tiny_models, made, tmp_path):
    options = _options(steps=6, checkpoint_every=2, eval_every=2, grad_accum=2)
    common = dict(teacher=tiny_models["llama"].path, data=made["llama-data"], device="cpu")
    whole = heal(made["llama"], tmp_path / "whole", options=options, **common)

    def interrupt(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        heal(made["llama"], out, options=options, on_step=interrupt, **common)
    assert not out.exists() and (resume_folder(out) / CHECKPOINT_FILE).is_file()
    resumed = heal(made["llama"], out, options=options, **common)
    assert resumed.resumed_from == 2 and resumed.steps == 6
    assert not resume_folder(out).exists()
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.curve.loss == whole.curve.loss and resumed.curve.held_out == whole.curve.held_out
    # The same run with other settings never resumes from that checkpoint.
    with pytest.raises(KeyboardInterrupt):
        heal(made["llama"], tmp_path / "other", options=options, on_step=interrupt, **common)
    other = heal(made["llama"], tmp_path / "other", options=_options(steps=6, checkpoint_every=2, lr=5e-4), **common)
    assert other.resumed_from == 0
    # --no-resume starts over, and ends where the uninterrupted run does.
    with pytest.raises(KeyboardInterrupt):
        heal(made["llama"], tmp_path / "fresh", options=options, on_step=interrupt, **common)
    fresh = heal(made["llama"], tmp_path / "fresh", options=options, resume=False, **common)
    assert fresh.resumed_from == 0 and fresh.curve.loss == whole.curve.loss


def test_token_budget_and_gradient_checkpointing(tiny_models, made, tmp_path):
    common = dict(teacher=tiny_models["llama"].path, data=made["llama-data"], device="cpu")
    plain = heal(made["llama"], tmp_path / "a", options=_options(steps=None, token_budget=60, method="full"), **common)
    assert plain.steps >= 2 and plain.curve.tokens[-2] < 60 <= plain.curve.tokens[-1] == plain.tokens  # the first step past it
    checkpointed = heal(
        made["llama"], tmp_path / "b", options=_options(steps=None, token_budget=60, method="full", gradient_checkpointing=True), **common
    )
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert checkpointed.steps == plain.steps
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_card_and_manifest_state_the_healing(made, lora_run):
    manifest = json.loads((lora_run / "compressor.json").read_text())
    card = (lora_run / "README.md").read_text()
    h = manifest["healing"]
    assert h["method"] == "lora" and h["steps"] == 6 and h["tokens"] > 0
    assert h["trained"]["blocks"] == [1, 4] and h["trained"]["lora"]["merged"] is True
    assert h["data"] == {"name": "data.jsonl", "sha256": file_sha256(made["llava-data"]), "train_samples": 11,
                         "held_out_samples": 1, "format": "chat"}  # fmt: skip
    assert h["loss"]["hidden"] == "mse"
    kl = h["held_out_kl"]
    assert kl["before"] > kl["after"] > 0
    assert [step for step, _ in h["curve"]["held_out_kl"]] == [0, 3, 6] and len(h["curve"]["loss"]) == 6
    curve = json.loads((lora_run / "loss_curve.json").read_text())
    assert len(curve["loss"]) == 6 and curve["held_out_kl"][0]["kl"] == pytest.approx(kl["before"])
    assert [c["check"] for c in manifest["verification"]] == ["lora-merge", "hf-reload"]
    assert "loss_curve.json" in manifest["files"] and "plan.json" in manifest["files"]
    assert manifest["blocks"] == {"before": 6, "after": 4, "removed": REMOVED}
    assert "--teacher BASE_MODEL" in manifest["command"] and "--data DATA.jsonl" in manifest["command"]
    assert "## Healing" in card and "- healed" in card and f"{kl['before']:.4g} before healing" in card
    assert "not retrained" not in card
    for text in (json.dumps(manifest), card):
        assert str(made["llava"].parent) not in text and "/tmp" not in text


# -- bad input: exit 2, one message naming the problem and the fix, nothing written ----------------


def _refused(capsys, out: Path, *args) -> str:
    code, _, err = run_cli(capsys, "heal", *args, "-o", out, "--steps", "2", "--device", "cpu")
    assert code == 2, err
    assert not out.exists() and not resume_folder(out).exists()
    assert "Fix:" in err
    return err


def test_teacher_of_another_family_is_refused(tiny_models, made, tmp_path, capsys):
    err = _refused(capsys, tmp_path / "o", made["llama"], "--teacher", tiny_models["llava"].path, "--data", made["llama-data"])
    assert "llama model" in err and "llava model" in err


def test_student_that_is_not_a_prune_is_refused(tiny_models, made, tmp_path, capsys):
    # No manifest/plan: the base itself passed as PRUNED.
    err = _refused(capsys, tmp_path / "o", tiny_models["llama"].path, "--teacher", tiny_models["llama"].path, "--data", made["llama-data"])
    assert "compressor.json" in err
    # A teacher of another depth.
    deeper, processor = build_tiny("llama", layers=8)
    deeper.save_pretrained(tmp_path / "deeper")
    processor.save_pretrained(tmp_path / "deeper")
    err = _refused(capsys, tmp_path / "o", made["llama"], "--teacher", tmp_path / "deeper", "--data", made["llama-data"])
    assert "6 blocks" in err and "has 8" in err
    # Another hidden size: the configs differ beyond the removal.
    wider = tmp_path / "wider"
    shutil.copytree(tiny_models["llama"].path, wider)
    config = json.loads((wider / "config.json").read_text())
    config["intermediate_size"] = 48
    (wider / "config.json").write_text(json.dumps(config))
    err = _refused(capsys, tmp_path / "o", made["llama"], "--teacher", wider, "--data", made["llama-data"])
    assert "intermediate_size: teacher 48, student 64" in err
    # Same architecture, other weights: a different random model is not the origin.
    other, processor = build_tiny("llama", seed=1)
    other.save_pretrained(tmp_path / "other")
    processor.save_pretrained(tmp_path / "other")
    err = _refused(capsys, tmp_path / "o", made["llama"], "--teacher", tmp_path / "other", "--data", made["llama-data"])
    assert "token embeddings" in err


def test_teacher_with_another_vocabulary_is_refused(tiny_models, made, tmp_path, capsys):
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_models["llama"].path, swapped)
    tokenizer = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["red"], vocab["blue"] = vocab["blue"], vocab["red"]
    (swapped / "tokenizer.json").write_text(json.dumps(tokenizer))
    err = _refused(capsys, tmp_path / "o", made["llama"], "--teacher", swapped, "--data", made["llama-data"])
    assert "number tokens differently" in err and "red" in err


def test_method_needs_of_the_data_and_model_are_refused(tiny_models, made, tmp_path, capsys):
    llava = ("--teacher", tiny_models["llava"].path)
    err = _refused(capsys, tmp_path / "o", made["llava"], *llava, "--data", made["text-only"], "--method", "projector")
    assert "no sample with an image" in err
    err = _refused(capsys, tmp_path / "o", made["llama"], "--teacher", tiny_models["llama"].path, "--data", made["llama-data"],
                   "--method", "projector")  # fmt: skip
    assert "text-only model" in err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "what color is the circle"}\n{"prompt": "count to three"}\n')
    err = _refused(capsys, tmp_path / "o", made["llama"], "--teacher", tiny_models["llama"].path, "--data", prompts, "--ce-weight", "1")
    assert "no sample with an 'answer'" in err
    err = _refused(capsys, tmp_path / "o", made["llama"], "--teacher", tiny_models["llama"].path, "--data", made["llama-data"],
                   "--method", "full", "--blocks", "1,3")  # fmt: skip
    assert "[3] were removed" in err and "[0, 1, 4, 5]" in err


def test_zero_steps_and_existing_output_are_refused(tiny_models, made, tmp_path, capsys):
    args = (made["llama"], "--teacher", tiny_models["llama"].path, "--data", made["llama-data"], "-o", tmp_path / "o", "--device", "cpu")
    code, _, err = run_cli(capsys, "heal", *args, "--steps", "0")
    assert code == 2 and "--steps 0" in err and not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "heal", *args, "--steps", "1")
    assert code == 2 and "already exists" in err
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep me"


def test_out_of_memory_names_the_options_that_help(tiny_models, made, tmp_path, capsys, monkeypatch):
    from compressor.heal import loop

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "_step", exhausted)
    err = _refused(capsys, tmp_path / "o", made["llama"], "--teacher", tiny_models["llama"].path, "--data", made["llama-data"])
    assert "ran out of memory" in err and "--gradient-checkpointing" in err and "--batch-size" in err


# -- the recipe's heal: section in `compressor run` ------------------------------------------------


def test_run_heals_between_pruning_and_validation(tiny_models, made, tmp_path, capsys):
    data = made["llama-data"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\nname: healed\nselect: {{op: explicit, blocks: {REMOVED}}}\nvalidate: {{max_kl: 100.0}}\n"
        f"heal: {{data: {data}, method: lora, steps: 3, lr: 1.0e-3, batch_size: 2}}\n"
    )
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "run", recipe, "--model", tiny_models["llama"].path, "--eval", data, "--no-latency", "-o", out)
    assert code == 0, err
    assert {"pruned", "hf", "report", "plan.json"} <= {p.name for p in out.iterdir()}
    assert "healed with --method lora" in stdout and stdout.strip().splitlines()[-1].startswith("compressor-verdict: PASS")
    healing = json.loads((out / "hf" / "compressor.json").read_text())["healing"]
    assert healing["method"] == "lora" and healing["steps"] == 3 and healing["teacher"]["ref"] == "llama"
    assert "healing" not in json.loads((out / "pruned" / "compressor.json").read_text())
    # The validation judged the healed checkpoint, not the pruned one.
    healed, pruned = load_file(out / "hf" / "model.safetensors"), load_file(out / "pruned" / "model.safetensors")
    assert any(not torch.equal(healed[k], pruned[k]) for k in healed)
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["models"]["pruned"]["ref"] == "hf"
    assert not resume_folder(out).exists()


def test_heal_data_on_the_command_line_wins_over_the_recipe(tiny_models, made, tmp_path, capsys):
    """A shipped recipe (recipes/demo-heal.yaml) names data relative to itself; --heal-data points
    it at the user's own file, as --data and --eval do for calibration and evaluation."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\nname: healed\nselect: {{op: explicit, blocks: {REMOVED}}}\n"
        f"heal: {{data: {tmp_path / 'not-there.jsonl'}, method: full, steps: 2, batch_size: 2}}\n"
    )
    model, data = tiny_models["llama"].path, made["llama-data"]
    code, _, err = run_cli(capsys, "run", recipe, "--model", model, "-o", tmp_path / "a")
    assert code == 2 and "not-there.jsonl" in err  # the recipe's own data, when not overridden
    code, stdout, err = run_cli(capsys, "run", recipe, "--model", model, "--heal-data", data, "-o", tmp_path / "b")
    assert code == 0, err
    healing = json.loads((tmp_path / "b" / "hf" / "compressor.json").read_text())["healing"]
    assert healing["data"]["name"] == data.name and healing["steps"] == 2
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"version: 1\nname: p\nselect: {{op: explicit, blocks: {REMOVED}}}\n")
    code, _, err = run_cli(capsys, "run", plain, "--model", model, "--heal-data", data, "-o", tmp_path / "c")
    assert code == 2 and "has no heal: section" in err and not (tmp_path / "c").exists()


def test_recipe_heal_section_is_checked_before_any_work(tiny_models, made, tmp_path, capsys):
    base = f"version: 1\nname: t\nselect: {{op: explicit, blocks: {REMOVED}}}\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(base + f"heal: {{data: {made['llama-data']}, setps: 3}}\n")
    code, _, err = run_cli(capsys, "recipe", "check", recipe)
    assert code == 2 and "heal: unknown key 'setps' (did you mean 'steps'?)" in err
    recipe.write_text(base + f"heal: {{data: {made['llama-data']}}}\nexport: {{formats: [hf, onnx]}}\n")
    code, _, err = run_cli(capsys, "run", recipe, "--model", tiny_models["llama"].path, "-o", tmp_path / "o")
    assert code == 2 and "export-onnx OUT/hf" in err and not (tmp_path / "o").exists()
    recipe.write_text(base + f"heal: {{data: {tmp_path / 'missing.jsonl'}}}\n")
    code, _, err = run_cli(capsys, "run", recipe, "--model", tiny_models["llama"].path, "-o", tmp_path / "o")
    assert code == 2 and "missing.jsonl" in err and not (tmp_path / "o").exists()


def test_interrupted_run_resumes_its_healing(tiny_models, made, tmp_path, capsys, monkeypatch):
    import compressor.heal.run as heal_run

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\nname: healed\nselect: {{op: explicit, blocks: {REMOVED}}}\n"
        f"heal: {{data: {made['llama-data']}, method: full, steps: 4, checkpoint_every: 2, lr: 1.0e-3, batch_size: 2}}\n"
    )
    args = ("run", recipe, "--model", tiny_models["llama"].path, "-o")
    assert run_cli(capsys, *args, tmp_path / "whole")[0] == 0
    real, calls = heal_run.train, []

    def interrupted_once(*positional, **named):
        calls.append(1)
        if len(calls) == 1:

            def stop(step: int) -> None:
                if step == 3:
                    raise KeyboardInterrupt

            named["on_step"] = stop
        return real(*positional, **named)

    monkeypatch.setattr(heal_run, "train", interrupted_once)
    out = tmp_path / "run"
    assert run_cli(capsys, *args, out)[0] == 130
    assert not out.exists() and (resume_folder(out) / CHECKPOINT_FILE).is_file()
    code, stdout, err = run_cli(capsys, *args, out)
    assert code == 0, err
    assert "resumed at step 2" in stdout and not resume_folder(out).exists()
    a, b = load_file(tmp_path / "whole" / "hf" / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
