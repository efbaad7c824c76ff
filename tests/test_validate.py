"""The validation command: tasks, gates, verdict line, exit codes, JUnit and report files."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch

from compressor import accuracy, cli
from compressor.data import Sample
from compressor.staging import MARKER
from compressor.validate import Gates, evaluate_gates

RECIPES = Path(__file__).parent.parent / "recipes"
FAST = ["--prompt-length", "12", "--new-tokens", "3", "--repeats", "2"]


@pytest.fixture(scope="module")
def pruned_llava(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("validate") / "pruned"
    assert cli.main(["-q", "prune", str(tiny_models["llava"].path), "--recipe", str(RECIPES / "explicit.yaml"), "-o", str(out)]) == 0
    return out


def run_validate(capsys, tiny, pruned, out, *extra):
    code = cli.main(
        ["-q", "validate", "--base", str(tiny.path), "--pruned", str(pruned), "--data", str(tiny.data), "-o", str(out), *FAST, *extra]
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_lenient_gate_passes_and_writes_every_report(tiny_models, pruned_llava, tmp_path, capsys):
    junit = tmp_path / "gates.xml"
    code, out, err = run_validate(
        capsys, tiny_models["llava"], pruned_llava, tmp_path / "report", "--max-accuracy-drop", "1", "--junit", junit
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compressor-verdict: PASS max_accuracy_drop=")
    assert {p.name for p in (tmp_path / "report").iterdir() if p.name != MARKER} == {"report.json", "report.md", "report.html"}
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["format"] == "compressor.validation/1" and report["verdict"]["passed"]
    assert report["models"]["pruned"]["removed"] == [2, 4] and report["models"]["pruned"]["num_blocks"] == 4
    vqa = report["accuracy"]["tasks"]["vqa"]
    assert vqa["n"] == 6 and len(report["accuracy"]["samples"]["vqa"]) == 6
    assert 0 <= report["accuracy"]["fidelity"]["top1_agreement"] <= 1
    assert report["latency"]["comparison"]["removed"] == [2, 4]
    assert 'src="data:image/png;base64,' in (tmp_path / "report" / "report.html").read_text()
    suite = ElementTree.parse(junit).getroot()
    assert suite.get("tests") == "1" and suite.get("failures") == "0"


def test_impossible_speedup_gate_fails_with_exit_1(tiny_models, pruned_llava, tmp_path, capsys):
    junit = tmp_path / "gates.xml"
    code, out, err = run_validate(capsys, tiny_models["llava"], pruned_llava, tmp_path / "report", "--min-speedup", "100", "--junit", junit)
    assert code == 1
    assert out.startswith("compressor-verdict: FAIL") and "min_speedup=" in out and ":FAILED" in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    gate = {g["name"]: g for g in report["verdict"]["gates"]}["min_speedup"]
    assert not gate["passed"] and gate["margin"] < -90
    failure = ElementTree.parse(junit).getroot().find("testcase/failure")
    assert failure is not None and "needs 100.00x" in failure.get("message")


def test_gates_from_the_exported_recipe_and_cli_wins(tiny_models, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: t\nselect: {op: explicit, blocks: [1]}\nvalidate: {min_speedup: 1000}\n")
    pruned = tmp_path / "pruned"
    assert cli.main(["-q", "prune", str(tiny_models["llama"].path), "--recipe", str(recipe), "-o", str(pruned)]) == 0
    code, out, _ = run_validate(capsys, tiny_models["llama"], pruned, tmp_path / "a")
    assert code == 1 and "min_speedup" in out  # from the recipe.yaml exported with the model
    code, out, _ = run_validate(capsys, tiny_models["llama"], pruned, tmp_path / "b", "--min-speedup", "0.01")
    assert code == 0 and "min_speedup=" in out  # the command line wins


def test_validate_usage_errors(tiny_models, pruned_llava, tmp_path, capsys):
    code, _, err = run_validate(capsys, tiny_models["llava"], tmp_path / "missing", tmp_path / "r")
    assert code == 2 and "does not exist" in err
    code, _, err = run_validate(capsys, tiny_models["llama"], pruned_llava, tmp_path / "r")
    assert code == 2 and "base model is llama but the pruned one is llava" in err
    code, _, err = run_validate(capsys, tiny_models["llava"], pruned_llava, tmp_path / "r", "--min-speedup", "2", "--no-latency")
    assert code == 2 and "needs latency" in err
    assert not (tmp_path / "r").exists()


def test_gate_arithmetic():
    report = {
        "accuracy": {"tasks": {"vqa": {"base": 0.8, "pruned": 0.7}}},
        "latency": {"comparison": {"prefill": {"a": {"speedup": 1.2}, "b": {"speedup": 1.4}}, "decode": {"c": {"speedup": 1.3}}}},
    }
    verdict = evaluate_gates(report, Gates(max_accuracy_drop=0.1, max_relative_drop=0.1, min_speedup=1.3))
    by_name = {g["name"]: g for g in verdict["gates"]}
    assert by_name["max_accuracy_drop"]["passed"]  # a drop of exactly 10 points is allowed
    assert by_name["max_relative_drop"]["value"] == pytest.approx(0.125) and not by_name["max_relative_drop"]["passed"]
    assert by_name["min_speedup"]["value"] == pytest.approx(1.3) and by_name["min_speedup"]["passed"]  # median
    assert not verdict["passed"] and verdict["summary"] == "FAIL: max_relative_drop"
    assert Gates(max_accuracy_drop=0.1).override(max_accuracy_drop=None, min_speedup=2.0) == Gates(max_accuracy_drop=0.1, min_speedup=2.0)


def test_multiple_choice_perplexity_and_fidelity_on_a_known_model(tiny_models):
    loaded = tiny_models["llama"].load()
    model, tokenizer = loaded.model, loaded.processor
    samples = [Sample(prompt="what color is the circle?", answer=c, choices=("red", "blue", "green")) for c in ("red", "blue", "green")]
    result = accuracy.choice_accuracy(model, tokenizer, samples)
    # The model prefers one choice for this prompt, whatever the label: exactly one sample is right.
    assert result["n"] == 3 and result["accuracy"] == pytest.approx(1 / 3)
    assert len({r["prediction"] for r in result["samples"]}) == 1

    # Perplexity: prompt-only text, raw (no chat template), every token after the first.
    text = [Sample(prompt="count to three one two"), Sample(prompt="count to three", answer="one two three")]
    ppl = accuracy.perplexity(model, tokenizer, text)
    ids = torch.tensor([tokenizer("count to three one two")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp().item()
    assert ppl["n"] == 1 and ppl["tokens"] == 4 and ppl["perplexity"] == pytest.approx(expected, rel=1e-5)

    same = accuracy.fidelity(model, model, tokenizer, text)
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    # "one two three" and the end-of-turn token of the answer; four raw tokens of the text.
    assert (same["answer_positions"], same["prompt_positions"], same["n_positions"]) == (4, 4, 8)


def test_run_validates_when_given_evaluation_data(tiny_models, tmp_path, capsys):
    tiny = tiny_models["llama"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: t\nselect: {op: explicit, blocks: [3]}\nvalidate: {max_accuracy_drop: 1.0}\n")
    out = tmp_path / "run"
    code = cli.main(["-q", "run", str(recipe), "--model", str(tiny.path), "--eval", str(tiny.data), "--no-latency", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip().splitlines()[-1].startswith("compressor-verdict: PASS max_accuracy_drop=")
    assert (out / "report" / "report.json").is_file() and (out / "hf" / "model.safetensors").is_file()
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["latency"] is None and report["gates"] == {"max_accuracy_drop": 1.0}
