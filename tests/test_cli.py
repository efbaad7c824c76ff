"""The command line end to end, and every bad input: clear message, exit 2, no traceback,
nothing half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from compressor.architectures import adapter_for_config
from compressor.loading import load_config
from compressor.staging import MARKER

from .conftest import FAMILIES, run_cli

RECIPES = Path(__file__).parent.parent / "recipes"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".tmp-" in p.name]


def test_calibrate_plan_prune_chain(tiny_models, tmp_path, capsys):
    tiny = tiny_models["llava"]
    report = tmp_path / "calibration.json"
    code, out, err = run_cli(capsys, "calibrate", tiny.path, "--data", tiny.data, "-o", report, "--max-span", "2")
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["model"]["num_blocks"] == 6 and data["data"]["num_samples"] == 6
    assert len(data["data"]["sha256"]) == 64 and data["options"]["max_span"] == 2
    assert set(data["metrics"]["block_influence"]) == {"all", "text", "image"}

    plan_file = tmp_path / "plan.json"
    code, out, err = run_cli(capsys, "plan", "--recipe", RECIPES / "shortgpt.yaml", "--calibration", report, "-o", plan_file)
    assert code == 0, err
    assert "remove 2 of 6 blocks" in out and "kept (4)" in out
    removed = json.loads(plan_file.read_text())["removed"]
    assert all(0 < b["index"] < 5 for b in removed)  # first and last are protected

    out_dir = tmp_path / "pruned"
    code, out, err = run_cli(capsys, "prune", tiny.path, "--recipe", RECIPES / "shortgpt.yaml", "--calibration", report, "-o", out_dir)
    assert code == 0, err
    assert "reloaded and verified" in out
    saved_plan = json.loads((out_dir / "plan.json").read_text())
    assert [b["index"] for b in saved_plan["removed"]] == [b["index"] for b in removed]
    assert json.loads((out_dir / "config.json").read_text())["text_config"]["num_hidden_layers"] == 4
    assert (out_dir / "recipe.yaml").read_text() == (RECIPES / "shortgpt.yaml").read_text()
    # The image processor's settings: their own file in transformers 4, inside processor_config.json in 5.
    saved = out_dir / "preprocessor_config.json"
    assert saved.exists() or "image_processor" in json.loads((out_dir / "processor_config.json").read_text())
    assert (out_dir / "tokenizer.json").exists()


def test_run_writes_everything_under_one_folder(tiny_models, tmp_path, capsys):
    tiny = tiny_models["qwen2"]
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "run", RECIPES / "gromov-span.yaml", "--model", tiny.path, "--data", tiny.data, "-o", out_dir)
    assert code == 0, err
    assert {p.name for p in out_dir.iterdir() if p.name != MARKER} == {"calibration.json", "plan.json", "recipe.yaml", "hf"}
    config = json.loads((out_dir / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and len(config["layer_types"]) == 4
    assert not leftovers(tmp_path)


def test_dry_run_writes_nothing(tiny_models, tmp_path, capsys):
    tiny = tiny_models["llava"]
    out_dir = tmp_path / "dry"
    code, out, err = run_cli(
        capsys, "prune", tiny.path, "--recipe", RECIPES / "skipit.yaml", "--data", tiny.data, "-o", out_dir, "--dry-run"
    )
    assert code == 0, err
    assert "dry run: nothing written" in out and "conditions" in out
    assert not out_dir.exists() and not leftovers(tmp_path)


def test_explicit_recipe_needs_no_data(tiny_models, tmp_path, capsys):
    out_dir = tmp_path / "explicit"
    code, out, err = run_cli(capsys, "prune", tiny_models["mistral"].path, "--recipe", RECIPES / "explicit.yaml", "-o", out_dir)
    assert code == 0, err
    assert [b["index"] for b in json.loads((out_dir / "plan.json").read_text())["removed"]] == [2, 4]
    code, out, _ = run_cli(capsys, "plan", "--recipe", RECIPES / "explicit.yaml", "--model", tiny_models["mistral"].path)
    assert code == 0 and "kept (4): [0, 1, 3, 5]" in out


def test_hub_id_is_recorded_as_base_model(tiny_models, tmp_path, capsys, monkeypatch):
    from compressor import hub

    monkeypatch.setattr(hub, "_download", lambda hub_id, revision, code=False: tiny_models["llama"].path)
    out_dir = tmp_path / "from-hub"
    code, _, err = run_cli(capsys, "prune", "org/tiny-llama", "--recipe", RECIPES / "explicit.yaml", "-o", out_dir)
    assert code == 0, err
    card = (out_dir / "README.md").read_text()
    assert "base_model: org/tiny-llama" in card.split("---")[1]


def test_arch_list_lists_every_family(capsys):
    from compressor.architectures import ADAPTERS

    code, out, err = run_cli(capsys, "arch", "list")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip() and not line.startswith((" ", "notes"))}
    assert set(FAMILIES) <= set(rows)
    for adapter in ADAPTERS:
        assert all(arch in rows[adapter.family] for arch in adapter.architectures)
        assert ("image/text/all" in rows[adapter.family]) == adapter.multimodal


def test_prune_without_data_verifies_every_family(tiny, tmp_path, capsys):
    """An explicit recipe needs no data: the export is checked on built-in samples (an image
    one and a text-only one in the same batch), loaded with the family's own processor."""
    out_dir = tmp_path / "pruned"
    code, out, err = run_cli(capsys, "prune", tiny.path, "--recipe", RECIPES / "explicit.yaml", "-o", out_dir)
    assert code == 0, err
    assert "reloaded and verified" in out
    config = load_config(out_dir)
    assert adapter_for_config(config).num_blocks(config) == 4


# -- bad input ---------------------------------------------------------------------------------


def expect_usage_error(capsys, args, message: str, tmp_path: Path, output: Path | None = None) -> str:
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (out, err)
    assert message in err, err
    assert "Traceback" not in err + out
    assert err.startswith("error: ") and "Fix: " in err
    if output is not None:
        assert not output.exists(), "nothing may be written on failure"
    assert not leftovers(tmp_path)
    return err


def test_missing_model_path(tmp_path, tiny_models, capsys):
    out = tmp_path / "o.json"
    expect_usage_error(
        capsys, ["calibrate", tmp_path / "nope", "--data", tiny_models["llama"].data, "-o", out], "does not exist", tmp_path, out
    )


def test_malformed_yaml(tmp_path, tiny_models, capsys):
    bad = write(tmp_path / "bad.yaml", "version: 1\nselect: {op: explicit, blocks: [1\n")
    out = tmp_path / "out"
    expect_usage_error(capsys, ["prune", tiny_models["llama"].path, "--recipe", bad, "-o", out], "not valid YAML at line", tmp_path, out)
    expect_usage_error(capsys, ["recipe", "check", bad], "bad.yaml", tmp_path)


def test_unknown_key_and_op(tmp_path, tiny_models, capsys):
    bad = write(tmp_path / "bad.yaml", "version: 1\nname: t\nselect: {op: explicit, block: [1]}\n")
    err = expect_usage_error(
        capsys, ["recipe", "check", RECIPES / "explicit.yaml", bad], "unknown key 'block' (did you mean 'blocks'?)", tmp_path
    )
    assert "select.blocks: required field is missing" in err
    bad_op = write(tmp_path / "op.yaml", "version: 1\nname: t\nselect: {op: span_of, n: 1}\n")
    out = tmp_path / "out"
    expect_usage_error(capsys, ["prune", tiny_models["llama"].path, "--recipe", bad_op, "-o", out], "unknown op 'span_of'", tmp_path, out)


def test_block_index_out_of_range(tmp_path, tiny_models, capsys):
    recipe = write(tmp_path / "r.yaml", "version: 1\nname: t\nselect: {op: explicit, blocks: [1, 6]}\n")
    out = tmp_path / "out"
    expect_usage_error(
        capsys,
        ["prune", tiny_models["llama"].path, "--recipe", recipe, "-o", out],
        "select.blocks: block 6 is out of range for a model with 6 blocks",
        tmp_path,
        out,
    )


def test_removing_every_block(tmp_path, tiny_models, capsys):
    recipe = write(tmp_path / "r.yaml", "version: 1\nname: t\nselect: {op: explicit, blocks: [0, 1, 2, 3, 4, 5]}\n")
    out = tmp_path / "out"
    expect_usage_error(
        capsys, ["prune", tiny_models["llama"].path, "--recipe", recipe, "-o", out], "would remove all 6 blocks", tmp_path, out
    )


def test_corrupt_safetensors(tmp_path, tiny_models, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"].path, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "out"
    expect_usage_error(
        capsys,
        ["prune", broken, "--recipe", RECIPES / "explicit.yaml", "-o", out],
        f"Checkpoint file '{weights}' is corrupt or truncated",
        tmp_path,
        out,
    )


def test_unsupported_architecture(tmp_path, tiny_models, capsys):
    other = tmp_path / "gpt2"
    other.mkdir()
    write(other / "config.json", json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    out = tmp_path / "out"
    err = expect_usage_error(
        capsys,
        ["prune", other, "--recipe", RECIPES / "explicit.yaml", "-o", out],
        "Architecture GPT2LMHeadModel is not supported",
        tmp_path,
        out,
    )
    assert "llava (LlavaForConditionalGeneration)" in err and "qwen2" in err


def test_existing_output_folder_is_kept(tmp_path, tiny_models, capsys):
    out = tmp_path / "out"
    out.mkdir()
    write(out / "keep.txt", "mine")
    code, _, err = run_cli(capsys, "prune", tiny_models["llama"].path, "--recipe", RECIPES / "explicit.yaml", "-o", out)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what compressor wrote: a user's folder stays as it is.
    code, _, err = run_cli(capsys, "prune", tiny_models["llama"].path, "--recipe", RECIPES / "explicit.yaml", "-o", out, "--overwrite")
    assert code == 2 and "was not written by compressor" in err, err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder may be written
    code, _, err = run_cli(capsys, "prune", tiny_models["llama"].path, "--recipe", RECIPES / "explicit.yaml", "-o", out, "--overwrite")
    assert code == 0, err
    code, _, err = run_cli(capsys, "prune", tiny_models["llama"].path, "--recipe", RECIPES / "explicit.yaml", "-o", out, "--overwrite")
    assert code == 0, err  # and compressor's own output replaced
    assert (out / "model.safetensors").exists()
    assert not leftovers(tmp_path)


def test_metric_recipe_without_data(tmp_path, tiny_models, capsys):
    out = tmp_path / "out"
    expect_usage_error(
        capsys,
        ["prune", tiny_models["llama"].path, "--recipe", RECIPES / "shortgpt.yaml", "-o", out],
        "needs calibration data",
        tmp_path,
        out,
    )


def test_malformed_data_lines(tmp_path, tiny_models, capsys):
    data = write(tmp_path / "d.jsonl", '{"prompt": "hi"}\nnot json\n{"prompt": 3}\n{"prompt": "x", "image": "missing.png"}\n')
    out = tmp_path / "c.json"
    err = expect_usage_error(
        capsys, ["calibrate", tiny_models["llama"].path, "--data", data, "-o", out], "3 malformed line(s)", tmp_path, out
    )
    assert "line 2: not valid JSON" in err and "line 3: 'prompt' must be" in err and "line 4: image 'missing.png' not found" in err


def test_calibration_of_another_model(tmp_path, tiny_models, capsys):
    report = tmp_path / "c.json"
    assert run_cli(capsys, "calibrate", tiny_models["llama"].path, "--data", tiny_models["llama"].data, "-o", report)[0] == 0
    data = json.loads(report.read_text())
    data["model"]["architecture"] = "MistralForCausalLM"
    report.write_text(json.dumps(data))
    out = tmp_path / "out"
    args = ["prune", tiny_models["llama"].path, "--recipe", RECIPES / "shortgpt.yaml", "--calibration", report, "-o", out]
    expect_usage_error(capsys, args, "was measured on a MistralForCausalLM, not a LlamaForCausalLM", tmp_path, out)
    data["model"]["architecture"] = "LlamaForCausalLM"
    data["model"]["num_blocks"] = 8
    report.write_text(json.dumps(data))
    out = tmp_path / "out"
    expect_usage_error(
        capsys,
        ["prune", tiny_models["llama"].path, "--recipe", RECIPES / "shortgpt.yaml", "--calibration", report, "-o", out],
        "block_influence.all: 6 values, expected 8 (one per block)",
        tmp_path,
        out,
    )


def test_failed_verification_leaves_nothing(tmp_path, tiny_models, capsys, monkeypatch):
    from compressor import export
    from compressor.errors import VerificationError

    def fail(*args, **kwargs):
        raise VerificationError("Reloaded logits differ (simulated).", fix="none")

    monkeypatch.setattr(export, "verify_reload", fail)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prune", tiny_models["llama"].path, "--recipe", RECIPES / "explicit.yaml", "-o", out)
    assert code == 1 and "simulated" in err
    assert not out.exists() and not leftovers(tmp_path)


def test_console_script_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "compressor",
            "prune",
            str(tmp_path / "missing"),
            "--recipe",
            str(RECIPES / "explicit.yaml"),
            "-o",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_recipe_carries_model_and_data(tmp_path, tiny_models, capsys):
    tiny = tiny_models["llama"]
    shutil.copy(tiny.data, tmp_path / "calib.jsonl")
    recipe = write(
        tmp_path / "r.yaml",
        f"version: 1\nname: t\nmodel: {tiny.path}\ncalibration: {{data: calib.jsonl, num_samples: 4}}\n"
        "select: {op: lowest, metric: tail_probability, epsilon: 0.3, count: 1}\n",
    )
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "run", recipe, "-o", out_dir)
    assert code == 0, err
    report = json.loads((out_dir / "calibration.json").read_text())
    assert report["data"]["num_samples"] == 4 and report["data"]["path"] == "calib.jsonl"  # published: a name, not a path
    assert 0.3 in report["options"]["epsilons"]  # measured because the recipe selects on it
    expect_usage_error(capsys, ["run", RECIPES / "explicit.yaml", "-o", tmp_path / "x"], "No model given", tmp_path)


def test_out_of_core_matches_in_memory(tmp_path, tiny_models, capsys):
    from safetensors import safe_open

    tiny = tiny_models["llava"]
    report = tmp_path / "calibration.json"
    assert run_cli(capsys, "calibrate", tiny.path, "--data", tiny.data, "-o", report)[0] == 0
    args = ["--recipe", RECIPES / "shortgpt.yaml", "--calibration", report]
    code, out, err = run_cli(capsys, "prune", tiny.path, *args, "-o", tmp_path / "ooc", "--out-of-core")
    assert code == 0, err
    assert "out of core" in out
    assert run_cli(capsys, "prune", tiny.path, *args, "-o", tmp_path / "mem")[0] == 0
    with safe_open(tmp_path / "ooc" / "model.safetensors", "pt") as a, safe_open(tmp_path / "mem" / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(a.get_tensor(k).equal(b.get_tensor(k)) for k in a.keys())
    plans = [json.loads((tmp_path / d / "plan.json").read_text())["removed"] for d in ("ooc", "mem")]
    assert plans[0] == plans[1]

    # A saved plan applied to the folder, in memory and out of core.
    plan_file = tmp_path / "plan.json"
    assert run_cli(capsys, "plan", "--recipe", RECIPES / "explicit.yaml", "--model", tiny.path, "-o", plan_file)[0] == 0
    code, _, err = run_cli(capsys, "prune", tiny.path, "--plan", plan_file, "-o", tmp_path / "from-plan", "--out-of-core")
    assert code == 0, err
    assert json.loads((tmp_path / "from-plan" / "config.json").read_text())["text_config"]["num_hidden_layers"] == 4
    code, _, err = run_cli(capsys, "prune", tiny.path, "--plan", plan_file, "-o", tmp_path / "from-plan-mem")
    assert code == 0, err


def test_out_of_core_refusals(tmp_path, tiny_models, capsys):
    tiny = tiny_models["llama"]
    out = tmp_path / "out"
    expect_usage_error(
        capsys, ["prune", tiny.path, "--recipe", RECIPES / "shortgpt.yaml", "-o", out, "--out-of-core"], "cannot calibrate", tmp_path, out
    )
    expect_usage_error(
        capsys,
        ["prune", tiny.path, "--recipe", RECIPES / "shortgpt.yaml", "--data", tiny.data, "-o", out, "--out-of-core"],
        "cannot calibrate on --data",
        tmp_path,
        out,
    )
    expect_usage_error(capsys, ["prune", tiny.path, "-o", out], "exactly one of --recipe or --plan", tmp_path, out)
