"""Op `replace` (LLM-Streamline): a span of n blocks becomes ONE trained block, on tiny random models.

Each test states a property a broken implementation fails, measured here with plain forward
passes rather than read from the tool's own report: the trained block maps the span's input to
its output better than its initialisation (= the plain removal of the span's first n − 1
blocks); the model is closer to the original's next-token distributions than with the span
removed; the checkpoint has L − n + 1 blocks, reloads clean and computes the in-memory model's
logits; the same seed gives the same weights; bad recipes and plans are refused with exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.data import Sample, build_batch, load_samples
from compressor.errors import InputError, PlanError
from compressor.planner import RemovedBlock, SurgeryPlan, plan
from compressor.recipe import load_recipe, parse_recipe

from .conftest import WORDS, run_cli, write_data

START, N = 2, 3  # of 6 blocks: 2, 3 go, 4 is trained in their place; kept 0 1 4 5
TRAIN = "{steps: 40, lr: 1.0e-3, batch_size: 4, seed: 0}"


def _prompts(folder: Path, n: int, seed: int) -> Path:
    """``n`` distinct random prompts of the tokenizer's words (the conftest data repeats 4 prompts,
    which would make a held-out share a copy of the training share)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": " ".join(rng.choice(WORDS, size=int(rng.integers(5, 12))))}) for _ in range(n)]
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def _recipe(folder: Path, select: str, name: str = "rep") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"version: 1\nname: {name}\nselect: {select}\n")
    return path


def _load(path):
    from compressor.loading import load_model

    return load_model(str(path), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def made(tiny_models, tmp_path_factory):
    """Tiny llama replaced at blocks 2..4 by `prune --recipe` (library call), with its data."""
    from compressor.pipeline import prune

    root = tmp_path_factory.mktemp("replace")
    data = _prompts(root / "train", 16, seed=1)
    recipe = _recipe(root, f"{{op: replace, n: {N}, start: {START}, train: {TRAIN}}}")
    result = prune(str(tiny_models["llama"].path), root / "out", recipe_file=load_recipe(recipe), data=data)
    return {"root": root, "data": data, "recipe": recipe, "out": root / "out", "result": result,
            "held": load_samples(_prompts(root / "held", 8, seed=2))}  # fmt: skip


def _pruned(original_path, removed, state=None, kept_block=None):
    """The original with ``removed`` cut by surgery and, with ``state``, the trained weights installed."""
    from compressor.heal.replace import ReplaceOptions, ReplaceResult, install
    from compressor.surgery import apply_plan

    loaded = _load(original_path)
    surgery_plan = SurgeryPlan(recipe="t", op="explicit", num_blocks=6, removed=tuple(RemovedBlock(i, "t") for i in removed))
    apply_plan(loaded.model, surgery_plan, loaded.adapter)
    if state is not None:
        fake = ReplaceResult(block=kept_block, span=(), state=state, options=ReplaceOptions(), held_out={}, curve=[],
                             train_samples=0, held_out_samples=0, seconds=0.0, improved=True)  # fmt: skip
        install(loaded.model, loaded.adapter, surgery_plan, fake)
    return loaded


def _next_token_kl(reference, model, processor, samples) -> float:
    """Mean KL(reference || model) of the next-token distributions over the real tokens."""
    inputs = build_batch(processor, samples, with_answer=False).inputs
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        p = torch.log_softmax(reference(**inputs).logits[mask].float(), -1)
        q = torch.log_softmax(model(**inputs).logits[mask].float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_trained_block_maps_the_span_better_than_its_initialisation(tiny_models, made):
    """Held-out prompts the training never saw: the hidden state leaving the stand-in against the one
    leaving original block 4, from the same input (blocks 0, 1 are the original's in both)."""
    original = _load(tiny_models["llama"].path)
    initial = _pruned(tiny_models["llama"].path, [2, 3])  # the copied block, untrained: removing 2, 3
    trained = _load(made["out"])
    inputs = build_batch(original.processor, made["held"], with_answer=False).inputs
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        target = original.model(**inputs, output_hidden_states=True).hidden_states[START + N][mask]
        got = {name: m.model(**inputs, output_hidden_states=True).hidden_states[START + 1][mask] for name, m in
               (("initial", initial), ("trained", trained))}  # fmt: skip
    mse = {name: float(((h - target) ** 2).mean()) for name, h in got.items()}
    cosine = {name: float((1 - torch.cosine_similarity(h, target, dim=-1)).mean()) for name, h in got.items()}
    assert mse["trained"] < 0.5 * mse["initial"], mse
    assert cosine["trained"] < 0.5 * cosine["initial"], cosine
    # The tool's own held-out figures agree in direction, and it says it kept the trained weights.
    replacement = made["result"].replacement
    assert replacement.improved and replacement.held_out["mse"]["after"] < replacement.held_out["mse"]["before"]


def test_closer_to_the_original_than_removing_the_span(tiny_models, made):
    original = _load(tiny_models["llama"].path)
    removed = _pruned(tiny_models["llama"].path, [2, 3, 4])  # op span: the n blocks gone
    initial = _pruned(tiny_models["llama"].path, [2, 3])
    trained = _load(made["out"])
    kl = {
        name: _next_token_kl(original.model, m.model, original.processor, made["held"])
        for name, m in (("removed", removed), ("initial", initial), ("trained", trained))
    }
    assert kl["trained"] < 0.5 * kl["removed"], kl
    assert kl["trained"] < kl["initial"], kl


def test_checkpoint_has_one_block_for_the_span_and_reloads_as_the_in_memory_model(tiny_models, made):
    from transformers import LlamaForCausalLM

    out, result = made["out"], made["result"]
    model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.num_hidden_layers == len(model.model.layers) == 6 - N + 1
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    # The in-memory model: the original cut by the plan, the trained weights installed.
    memory = _pruned(tiny_models["llama"].path, [2, 3], result.replacement.state, kept_block=4)
    inputs = build_batch(memory.processor, made["held"], with_answer=False).inputs
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, memory.model(**inputs).logits)
    original = _load(tiny_models["llama"].path)
    assert not torch.equal(model.model.layers[2].mlp.up_proj.weight, original.model.model.layers[4].mlp.up_proj.weight)
    for j, i in ((0, 0), (1, 1), (3, 5)):  # the other kept blocks are the original's own
        assert torch.equal(model.model.layers[j].mlp.up_proj.weight, original.model.model.layers[i].mlp.up_proj.weight)
    manifest = json.loads((out / "compressor.json").read_text())
    assert [c["check"] for c in manifest["verification"]] == ["hf-reload"]  # not the skip-equivalence proof
    assert manifest["replacement"]["span"] == [2, 3, 4] and manifest["replacement"]["block"] == 4
    held = manifest["replacement"]["held_out"]
    assert held["cosine"]["after"] < held["cosine"]["before"]
    saved = SurgeryPlan.load(out / "plan.json")
    assert saved.op == "replace" and saved.kept == [0, 1, 4, 5] and [(r.block, r.span) for r in saved.replaced] == [(4, (2, 3, 4))]
    card = (out / "README.md").read_text()
    assert "## Replaced span" in card and "not retrained" not in card


def test_same_seed_same_weights_other_seed_other_weights(tiny_models, made):
    from compressor.heal.replace import ReplaceOptions, replace_span

    original = _load(tiny_models["llama"].path)
    samples = load_samples(made["data"])

    def trained(seed: int):
        options = ReplaceOptions(steps=6, lr=1e-3, batch_size=2, seed=seed)
        return replace_span(original.model, original.processor, original.adapter, samples, start=START, n=N, options=options).state

    first, again, other = trained(0), trained(0), trained(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    # The original model is left as it was: the stand-in trains on a copy.
    assert torch.equal(
        original.model.model.layers[4].mlp.up_proj.weight, _load(tiny_models["llama"].path).model.model.layers[4].mlp.up_proj.weight
    )


def test_a_saved_plan_trains_the_same_block_again(tiny_models, made, tmp_path, capsys):
    """`prune --plan plan.json` reads the training knobs from the recipe the plan carries: same seed, same bytes."""
    from safetensors.torch import load_file

    args = ("prune", tiny_models["llama"].path, "--plan", made["out"] / "plan.json", "--data", made["data"], "-o", tmp_path / "again")
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    first, again = load_file(made["out"] / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_run_chooses_the_span_by_angular_distance_and_trains_a_vlm(tiny_models, tmp_path, capsys):
    """`compressor run` on llava: calibrate (angular distances) -> plan -> train -> export, images included."""
    data = write_data(tmp_path / "data", images=True, n=8)
    recipe = _recipe(tmp_path, "{op: replace, n: 2, protect: {first: 1}, train: {steps: 8, lr: 1.0e-3, batch_size: 2}}")
    code, stdout, err = run_cli(capsys, "run", recipe, "--model", tiny_models["llava"].path, "--data", data, "-o", tmp_path / "out")
    assert code == 0, err
    from compressor.calibration_report import CalibrationReport

    angular = CalibrationReport.load(tmp_path / "out" / "calibration.json").values("angular_distance", "all", span=2)
    saved = SurgeryPlan.load(tmp_path / "out" / "plan.json")
    (replaced,) = saved.replaced
    # The chosen start has the smallest angular distance among the unprotected starts 1..4.
    assert replaced.span[0] == min(range(1, 5), key=lambda s: angular[s])
    assert len(replaced.span) == 2 and saved.removed_indices == [replaced.span[0]] and saved.kept.count(replaced.block) == 1
    assert "replaced blocks" in stdout and "not compared with the original" in stdout
    manifest = json.loads((tmp_path / "out" / "hf" / "compressor.json").read_text())
    assert manifest["blocks"]["after"] == 5 and manifest["replacement"]["train_samples"] >= 1


# -- the schema and the plan: exit 2 naming the field and the fix --------------------------------


@pytest.mark.parametrize(
    ("select", "message"),
    [
        ("{op: replace, n: 1}", "select.n: replace needs n >= 2 (got 1)"),
        ("{op: replace, n: 3, strat: 2}", "unknown key 'strat' (did you mean 'start'?)"),
        ("{op: replace, n: 3, train: {loss: l1}}", "select.train.loss"),
        ("{op: replace, n: 3, train: {steps: 0}}", "select.train.steps"),
        ("{op: replce, n: 3}", "unknown op 'replce' (did you mean 'replace'?)"),
    ],
)
def test_recipe_schema_refuses(select, message, tmp_path, capsys):
    code, _, err = run_cli(capsys, "recipe", "check", _recipe(tmp_path, select))
    assert code == 2 and message in err, err


@pytest.mark.parametrize(
    ("select", "message", "fix"),
    [
        ("{op: replace, n: 6}", "select.n = 6: the model has 6 blocks", "between 2 and 5"),
        ("{op: replace, n: 3, start: 6}", "select.start: block 6 is out of range", "0..5"),
        ("{op: replace, n: 3, start: 4}", "select.start = 4 with n = 3 runs past the last block", "between -6 and 3"),
        ("{op: replace, n: 3, start: 1, protect: {blocks: [3]}}", "holds protected block(s) [3]", "move select.start"),
        ("{op: replace, n: 3, start: -5, protect: {first: 2}}", "the span 1..3 holds protected block(s) [1]", "move select.start"),
        ("{op: replace, n: 4, start: 0, budget: {max_blocks: 2}}", "removes 3 block(s), over the removal budget of 2", "lower n"),
    ],
)
def test_plan_refuses(select, message, fix, tiny_models, tmp_path, capsys):
    with pytest.raises(PlanError) as caught:
        plan(parse_recipe(f"version: 1\nname: r\nselect: {select}\n"), 6)
    assert message in caught.value.message and fix in caught.value.fix and caught.value.exit_code == 2
    code, _, err = run_cli(capsys, "plan", "--recipe", _recipe(tmp_path, select), "--model", tiny_models["llama"].path)
    assert code == 2 and message in err, err


def test_plan_holds_a_given_span_to_the_family_rules():
    """Fixed blocks are protected; a whole-removal rule is judged on the blocks that go (all of the
    span but its last block, which stays with its layer type)."""
    from compressor.block_limits import BlockLimits

    types = ("linear_attention", "linear_attention", "full_attention", "linear_attention", "linear_attention", "linear_attention")
    limits = BlockLimits(fixed={4: "a test reason"}, layer_types=types, required_type="full_attention", required_reason="why")
    recipe = "version: 1\nname: r\nselect: {{op: replace, n: {n}, start: {start}}}\n"
    with pytest.raises(PlanError, match=r"holds protected block\(s\) \[4\]"):
        plan(parse_recipe(recipe.format(n=2, start=3)), 6, limits=limits)
    with pytest.raises(PlanError, match="no full_attention block would remain"):  # 1, 2 go
        plan(parse_recipe(recipe.format(n=3, start=1)), 6, limits=limits)
    kept = plan(parse_recipe(recipe.format(n=3, start=0)), 6, limits=limits)  # 0, 1 go; 2 (full) stands in
    assert kept.kept == [2, 3, 4, 5] and kept.replaced[0].block == 2


def test_plan_accepts_negative_start_and_keeps_the_span_last_block():
    found = plan(parse_recipe("version: 1\nname: r\nselect: {op: replace, n: 2, start: -2}\n"), 6)
    assert found.removed_indices == [4] and found.kept == [0, 1, 2, 3, 5] and found.replaced[0].span == (4, 5)
    assert not parse_recipe("version: 1\nname: r\nselect: {op: replace, n: 2, start: 0}\n").needs_calibration
    assert parse_recipe("version: 1\nname: r\nselect: {op: replace, n: 2}\n").needs_calibration


def test_plan_file_with_a_replaced_span_is_checked_and_old_files_still_load(tmp_path):
    found = plan(parse_recipe("version: 1\nname: r\nselect: {op: replace, n: 3, start: 1}\n"), 6)
    path = tmp_path / "plan.json"
    found.save(path)
    assert SurgeryPlan.load(path) == found
    for change, message in [
        ({"block": 2, "span": [1, 2, 3]}, "replaced[0].block: block 2 is not the span's last block (3)"),
        ({"block": 3, "span": [1, 3]}, "replaced[0].span: [1, 3] is not a run of 2 or more consecutive blocks"),
        ({"block": 4, "span": [2, 3, 4]}, "replaced[0]: block 4 must be kept and blocks [2, 3] removed"),
        ({"block": 3, "span": [1, 2, 3], "extra": 1}, "unknown key 'extra'"),
    ]:
        raw = json.loads(path.read_text())
        raw["replaced"] = [change]
        path.write_text(json.dumps(raw))
        with pytest.raises(InputError) as caught:
            SurgeryPlan.load(path)
        assert message in caught.value.message
    # A plan of another op writes no 'replaced' (files stay as before) and one without it loads.
    other = plan(parse_recipe("version: 1\nname: e\nselect: {op: explicit, blocks: [2]}\n"), 6)
    assert "replaced" not in other.to_dict()
    other.save(path)
    assert SurgeryPlan.load(path).replaced == ()
    raw = json.loads(path.read_text())
    raw["replaced"] = [{"block": 3, "span": [2, 3]}]
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match="only a plan of op 'replace' replaces spans"):
        SurgeryPlan.load(path)


def test_skip_equivalence_and_out_of_core_are_refused(tiny_models, made, tmp_path, capsys):
    args = ("prune", tiny_models["llama"].path, "--recipe", made["recipe"], "--data", made["data"])
    code, _, err = run_cli(capsys, *args, "--verify", "skip-equivalence", "-o", tmp_path / "a")
    assert code == 2 and "--verify reload" in err and not (tmp_path / "a").exists()
    code, _, err = run_cli(capsys, *args[:2], "--plan", made["out"] / "plan.json", "--out-of-core", "-o", tmp_path / "b")
    assert code == 2 and "prune in memory" in err and not (tmp_path / "b").exists()
    code, _, err = run_cli(capsys, *args[:4], "-o", tmp_path / "c")  # no data to train on
    assert code == 2 and "pass --data" in err and not (tmp_path / "c").exists()


def test_too_few_samples_is_refused(tiny_models):
    from compressor.heal.replace import replace_span

    original = _load(tiny_models["llama"].path)
    with pytest.raises(InputError, match="at least 2 samples"):
        replace_span(original.model, original.processor, original.adapter, [Sample(prompt="count to three")], start=1, n=2)


def test_healing_a_replaced_checkpoint_keeps_the_replacement_record(tiny_models, made, tmp_path):
    """heal after op replace: the healed manifest and card still say which span one trained block stands in for."""
    from compressor.heal import HealOptions, heal

    healed = heal(made["out"], tmp_path / "healed", teacher=tiny_models["llama"].path, data=made["data"],
                  options=HealOptions(steps=2, batch_size=2, held_out=0.25, eval_every=1), device="cpu")  # fmt: skip
    manifest = json.loads((healed.path / "compressor.json").read_text())
    assert manifest["replacement"] == json.loads((made["out"] / "compressor.json").read_text())["replacement"]
    assert manifest["healing"]["method"] == "distill" and manifest["healing"]["steps"] == 2
    card = (healed.path / "README.md").read_text()
    assert "## Replaced span" in card and "## Healing" in card
