"""Gates by data kind: nothing passes silently, every scored position counts, evidence is stated.

The case that started it: text-only evaluation data, an accuracy gate that had nothing to
read, and a verdict of "PASS — 0 gate(s) held" while perplexity had quadrupled.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compressor import accuracy
from compressor.data import Sample, build_batch
from compressor.errors import RecipeError
from compressor.recipe import parse_recipe
from compressor.validate import MIN_POSITIONS, MIN_SAMPLES, Gates, evaluate_gates, evidence

from .conftest import WORDS, run_cli


def write_text(path: Path, n: int, words: int = 8) -> Path:
    """``n`` prompt-only text samples (no answer, no image) over the tiny models' vocabulary."""
    rng = random.Random(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n" for _ in range(n)))
    return path


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """40 texts of 8 words: 40 samples and 280 scored tokens, above both evidence thresholds."""
    return write_text(tmp_path_factory.mktemp("text") / "text.jsonl", 40)


@pytest.fixture(scope="module")
def worse_llama(tiny_models, tmp_path_factory) -> Path:
    """The tiny llama with its LM head scaled by 4: the same top-1 token everywhere, but its
    confidently wrong predictions far more confident, so a far higher perplexity and KL > 0."""
    source = tiny_models["llama"].path
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    out = tmp_path_factory.mktemp("worse") / "llama"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def validate(capsys, base: Path, pruned: Path, data: Path, out: Path, *extra):
    return run_cli(capsys, "validate", "--base", base, "--pruned", pruned, "--data", data, "--no-latency", "-o", out, *extra)


def report_of(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def no_model_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the gates were checked against the data")

    monkeypatch.setattr("compressor.validate.load_model", refuse)
    monkeypatch.setattr("compressor.pipeline.load_model", refuse)


def test_perplexity_gate_fails_a_model_that_got_worse_on_text_only_data(tiny_models, worse_llama, text_data, tmp_path, capsys):
    base = tiny_models["llama"].path
    code, out, err = validate(capsys, base, worse_llama, text_data, tmp_path / "worse", "--max-perplexity-increase", "0.1")
    assert code == 1, err
    assert out.startswith("compressor-verdict: FAIL max_perplexity_increase=") and ":FAILED" in out and "PASS" not in out
    report = report_of(tmp_path / "worse")
    ppl = report["accuracy"]["tasks"]["perplexity"]
    assert ppl["n"] == 40 and ppl["tokens"] == 280 and ppl["pruned"] > 2 * ppl["base"]
    (gate,) = report["verdict"]["gates"]
    assert gate["name"] == "max_perplexity_increase" and gate["value"] == pytest.approx(ppl["pruned"] / ppl["base"] - 1)
    assert report["verdict"]["summary"] == "FAIL: max_perplexity_increase"
    assert report["accuracy"]["tasks"]["vqa"] is None and report["data"]["kinds"]["text"] == 40
    # The same gate holds for a model that did not change.
    code, out, err = validate(capsys, base, base, text_data, tmp_path / "same", "--max-perplexity-increase", "0.1")
    assert code == 0, err
    assert out.strip() == "compressor-verdict: PASS max_perplexity_increase=0(<=0.1):ok"


def test_a_gate_the_data_cannot_evaluate_is_refused_before_any_model_loads(tiny_models, text_data, tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    tiny = tiny_models["llama"]
    code, _, err = validate(capsys, tiny.path, tiny.path, text_data, tmp_path / "r", "--max-accuracy-drop", "0.05")
    assert code == 2 and "--max-accuracy-drop (max_accuracy_drop) needs labelled samples" in err
    assert "40 samples: 0 answered, 0 multiple choice, 40 text" in err and "Traceback" not in err
    code, _, err = validate(capsys, tiny.path, tiny.path, tiny.data, tmp_path / "r", "--max-perplexity-increase", "0.1")
    assert code == 2 and "--max-perplexity-increase (max_perplexity_increase) needs prompt-only text samples" in err
    code, _, err = validate(capsys, tiny.path, tiny.path, text_data, tmp_path / "r", "--max-kl", "0.1", "--task", "perplexity")
    assert code == 2 and "--max-kl (max_kl) needs the fidelity task" in err
    # `run` checks its recipe's gates against --eval before calibrating or pruning anything.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: t\nselect: {op: explicit, blocks: [1]}\nvalidate: {max_relative_drop: 0.1}\n")
    code, _, err = run_cli(capsys, "run", recipe, "--model", tiny.path, "--eval", text_data, "--no-latency", "-o", tmp_path / "run")
    assert code == 2 and "--max-relative-drop (max_relative_drop) needs labelled samples" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "run").exists()


def test_no_gate_is_never_a_pass(tiny_models, text_data, tmp_path, capsys):
    tiny = tiny_models["llama"]
    junit = tmp_path / "gates.xml"
    code, out, err = validate(capsys, tiny.path, tiny.path, text_data, tmp_path / "a", "--junit", junit)
    assert code == 1, err
    assert out.strip() == "compressor-verdict: NO-GATES no gates evaluated"
    verdict = report_of(tmp_path / "a")["verdict"]
    assert verdict["status"] == "NO-GATES" and not verdict["passed"] and verdict["summary"].startswith("no gates evaluated")
    assert "NO GATES" in (tmp_path / "a" / "report.md").read_text()
    suite = ElementTree.parse(junit).getroot()
    assert suite.get("skipped") == "1" and suite.find("testcase/skipped") is not None
    code, out, err = validate(capsys, tiny.path, tiny.path, text_data, tmp_path / "b", "--allow-no-gates")
    assert code == 0, err
    assert "no gates evaluated" in out and "PASS" not in out
    assert report_of(tmp_path / "b")["verdict"]["status"] == "NO-GATES"
    # `run` with evaluation data and a recipe without gates: the same rule.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: t\nselect: {op: explicit, blocks: [1]}\n")
    args = ["run", recipe, "--model", tiny.path, "--eval", text_data, "--no-latency"]
    code, out, err = run_cli(capsys, *args, "-o", tmp_path / "run")
    assert code == 1 and out.strip().splitlines()[-1] == "compressor-verdict: NO-GATES no gates evaluated", err
    code, out, err = run_cli(capsys, *args, "--allow-no-gates", "-o", tmp_path / "run2")
    assert code == 0 and "PASS" not in out, err


def test_fidelity_compares_every_scored_position(tiny_models, worse_llama, text_data, tmp_path, capsys):
    loaded = tiny_models["llama"].load()
    model, tokenizer = loaded.model, loaded.processor
    texts = [Sample(prompt="count to three one two"), Sample(prompt="what color is the circle")]
    answered = [Sample(prompt="how many shapes?", answer="two"), Sample(prompt="count to three", answer="one two three")]
    result = accuracy.fidelity(model, model, tokenizer, texts + answered, batch_size=3)
    text_tokens = sum(len(tokenizer(s.prompt)["input_ids"]) - 1 for s in texts)  # every raw token but the first
    answer_tokens = int(build_batch(tokenizer, answered, with_answer=True).answer_mask.sum())  # answers + end of turn
    assert (result["prompt_positions"], result["answer_positions"]) == (text_tokens, answer_tokens) == (8, 6)
    assert result["n_positions"] == 14 and result["n_samples"] == 4
    assert result["kl_mean"] == pytest.approx(0.0, abs=1e-6) and result["top1_agreement"] == 1.0
    # Through the CLI: a sharper head keeps every top-1 token but moves the distributions.
    base = tiny_models["llama"].path
    code, out, err = validate(capsys, base, worse_llama, text_data, tmp_path / "r", "--min-top1-agreement", "0.99", "--max-kl", "0.01")
    assert code == 1, err
    gates = {g["name"]: g for g in report_of(tmp_path / "r")["verdict"]["gates"]}
    assert gates["min_top1_agreement"]["passed"] and gates["min_top1_agreement"]["value"] == 1.0
    assert (
        not gates["max_kl"]["passed"]
        and gates["max_kl"]["value"] > 0.01
        and "over 280 positions of 40 samples" in gates["max_kl"]["detail"]
    )


def test_prompt_only_text_is_scored_raw_without_the_chat_template(tiny_models, text_data, tmp_path, capsys):
    loaded = tiny_models["llama"].load()
    model, tokenizer = loaded.model, loaded.processor
    sample = Sample(prompt="count to three one two")
    raw = build_batch(tokenizer, [sample], with_answer=False, text_format="raw").inputs["input_ids"][0].tolist()
    chat = build_batch(tokenizer, [sample], with_answer=False, text_format="chat").inputs["input_ids"][0].tolist()
    assert raw == tokenizer(sample.prompt)["input_ids"] and len(chat) > len(raw)  # the template adds USER : ... ASSISTANT :
    assert accuracy.layout(sample, "auto") == "raw" and accuracy.layout(Sample(prompt="q", answer="a"), "auto") == "chat"
    assert accuracy.perplexity(model, tokenizer, [sample])["tokens"] == len(raw) - 1
    as_chat = accuracy.fidelity(model, model, tokenizer, [sample], text_format="chat")
    assert as_chat["n_positions"] == len(chat) - 1 > accuracy.fidelity(model, model, tokenizer, [sample])["n_positions"]
    # --format chat lays fidelity out in the template; perplexity stays raw text.
    base = tiny_models["llama"].path
    assert validate(capsys, base, base, text_data, tmp_path / "chat", "--format", "chat", "--allow-no-gates")[0] == 0
    assert validate(capsys, base, base, text_data, tmp_path / "auto", "--allow-no-gates")[0] == 0
    chat_report, auto_report = report_of(tmp_path / "chat"), report_of(tmp_path / "auto")
    assert chat_report["data"]["format"] == "chat" and auto_report["data"]["format"] == "auto"
    assert chat_report["accuracy"]["tasks"]["perplexity"] == auto_report["accuracy"]["tasks"]["perplexity"]
    assert chat_report["accuracy"]["fidelity"]["n_positions"] > auto_report["accuracy"]["fidelity"]["n_positions"] == 280


def test_recipe_validate_section_takes_the_new_gates(tiny_models, worse_llama, text_data, tmp_path, capsys):
    recipe = tmp_path / "gates.yaml"
    recipe.write_text(
        "version: 1\nname: t\nselect: {op: explicit, blocks: [1]}\n"
        "validate: {max_perplexity_increase: 0.1, max_kl: 1000, min_top1_agreement: 0.5}\n"
    )
    code, out, err = validate(capsys, tiny_models["llama"].path, worse_llama, text_data, tmp_path / "r", "--recipe", recipe)
    assert code == 1, err
    report = report_of(tmp_path / "r")
    assert report["gates"] == {"max_perplexity_increase": 0.1, "max_kl": 1000, "min_top1_agreement": 0.5}
    assert report["verdict"]["summary"] == "FAIL: max_perplexity_increase"
    assert "max_kl=" in out and "min_top1_agreement=1(>=0.5):ok" in out
    with pytest.raises(RecipeError, match="did you mean 'max_perplexity_increase'"):
        parse_recipe("version: 1\nname: t\nselect: {op: explicit, blocks: [1]}\nvalidate: {max_perplexity_increse: 0.1}\n")
    with pytest.raises(RecipeError, match="min_top1_agreement"):
        parse_recipe("version: 1\nname: t\nselect: {op: explicit, blocks: [1]}\nvalidate: {min_top1_agreement: 1.5}\n")
    # `compressor run` gates on text evaluation data with the recipe's perplexity gate.
    recipe.write_text("version: 1\nname: t\nselect: {op: explicit, blocks: [1]}\nvalidate: {max_perplexity_increase: 1000}\n")
    code, out, err = run_cli(
        capsys, "run", recipe, "--model", tiny_models["llama"].path, "--eval", text_data, "--no-latency", "-o", tmp_path / "run"
    )
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("compressor-verdict: PASS max_perplexity_increase=")


def test_evidence_is_stated_and_weak_figures_are_flagged(tiny_models, text_data, tmp_path, capsys):
    base = tiny_models["llama"].path
    few = write_text(tmp_path / "few" / "text.jsonl", 5)
    code, out, err = validate(capsys, base, base, few, tmp_path / "weak", "--max-perplexity-increase", "0.1")
    assert code == 0, err  # weak evidence is flagged, not failed
    assert out.strip().endswith("weak-evidence=perplexity,fidelity")
    report = report_of(tmp_path / "weak")
    assert report["evidence"]["perplexity"] == {"samples": 5, "positions": 35, "weak": True, "why": "5 samples < 30, 35 positions < 100"}
    assert report["verdict"]["gates"][0]["weak_evidence"] and "weak evidence: perplexity (5 samples < 30" in report["verdict"]["summary"]
    markdown = (tmp_path / "weak" / "report.md").read_text()
    assert "⚠️ weak evidence: 5 samples < 30, 35 positions < 100" in markdown and "| perplexity | 5 | 35 |" in markdown
    code, out, err = validate(capsys, base, base, text_data, tmp_path / "strong", "--max-perplexity-increase", "0.1")
    assert code == 0 and "weak-evidence" not in out, err
    strong = report_of(tmp_path / "strong")["evidence"]
    assert strong["fidelity"] == {"samples": 40, "positions": 280, "weak": False, "why": None}


def test_evidence_thresholds_and_verdict_arithmetic():
    assert (MIN_SAMPLES, MIN_POSITIONS) == (30, 100)
    found = evidence(
        {
            "tasks": {"vqa": {"n": 29}, "multiple_choice": {"n": 30}, "perplexity": {"n": 30, "tokens": 99}},
            "fidelity": {"n_samples": 30, "n_positions": 100},
        }
    )
    assert [name for name, figure in found.items() if figure["weak"]] == ["vqa", "perplexity"]
    report = {
        "accuracy": {"tasks": {"perplexity": {"n": 40, "tokens": 300, "base": 20.0, "pruned": 24.0}}, "fidelity": None},
        "evidence": {},
    }
    verdict = evaluate_gates(report, Gates(max_perplexity_increase=0.2))
    assert verdict["status"] == "PASS" and verdict["gates"][0]["value"] == pytest.approx(0.2)  # exactly 20 % is allowed
    assert evaluate_gates(report, Gates(max_perplexity_increase=0.1))["summary"] == "FAIL: max_perplexity_increase"
    missing = evaluate_gates(report, Gates(max_accuracy_drop=0.05, max_kl=0.1))  # figures absent: the gates fail, never vanish
    assert missing["status"] == "FAIL" and [g["value"] for g in missing["gates"]] == [None, None]
    nothing = evaluate_gates(report, Gates())
    assert (nothing["status"], nothing["passed"], nothing["gates"]) == ("NO-GATES", False, [])
    assert nothing["summary"].startswith("no gates evaluated")


def test_no_recipe_gates_replaces_an_exported_accuracy_gate_on_plain_text(tiny_models, text_data, tmp_path, capsys):
    """A checkpoint whose recipe gates accuracy, checked on plain text: the recipe's gate cannot be
    read (exit 2, pointing at --no-recipe-gates), and with that flag the perplexity gate alone decides."""
    base = tiny_models["llama"].path
    pruned = tmp_path / "pruned"
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    assert run_cli(capsys, "prune", base, "--recipe", recipes / "explicit.yaml", "-o", pruned)[0] == 0
    code, _, err = validate(capsys, base, pruned, text_data, tmp_path / "r1", "--max-perplexity-increase", "100")
    assert code == 2 and "max_accuracy_drop" in err and "--no-recipe-gates" in err, err
    code, out, err = validate(capsys, base, pruned, text_data, tmp_path / "r2", "--max-perplexity-increase", "100", "--no-recipe-gates")
    assert code == 0, err
    assert out.startswith("compressor-verdict: PASS max_perplexity_increase=") and "max_accuracy_drop" not in out
