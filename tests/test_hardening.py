"""Hostile and careless use of the command line: nothing lost, nothing run, nothing misreported.

Each test is one case of issue #13, driven through the CLI as a user would: outputs that would
destroy inputs, model folders with code, hand-edited plans, concurrent writers, tokenizer
files, local paths in published files, bad inputs found before the model loads, disk errors,
permissions. (Files read before the model: tests/test_input_files.py and test_input_data.py.)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from compressor.staging import MARKER, output_lock

from .conftest import run_cli
from .test_input_data import _black_png

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
REPO = Path(__file__).resolve().parents[1]


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its SHA-256: what must survive a refused command."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_model(tiny, where: Path) -> Path:
    shutil.copytree(tiny.path, where)
    return where


def no_model_load(monkeypatch) -> None:
    """Make loading a model fail loudly: the error a test expects must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    import compressor.loading
    import compressor.pipeline

    monkeypatch.setattr(compressor.loading, "load_model", refuse)
    monkeypatch.setattr(compressor.pipeline, "load_model", refuse)


def usage_error(capsys, *args) -> str:
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err and "internal error" not in err
    return err


# -- the output policy ---------------------------------------------------------------------------


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys, monkeypatch):
    import compressor.demo.run

    monkeypatch.setattr(compressor.demo.run, "ensure_demo_model", lambda **kw: pytest.fail("trained before checking -o"))
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    err = usage_error(capsys, "demo", "-o", target)
    assert "was not written by compressor" in err
    assert (target / "thesis.tex").read_text() == "years of work"


def test_prune_into_the_parent_of_the_model_is_refused(tmp_path, tiny_models, capsys):
    parent = tmp_path / "work"
    model = copy_model(tiny_models["llama"], parent / "model")
    (parent / "notes.txt").write_text("keep me")
    before = tree(parent)
    err = usage_error(capsys, "prune", model, "--recipe", RECIPES / "explicit.yaml", "-o", parent, "--overwrite")
    assert "contains the input" in err
    assert tree(parent) == before


@pytest.mark.parametrize("command", ["run", "prune"])
def test_output_that_is_or_lies_inside_the_model_is_refused(tmp_path, tiny_models, capsys, command):
    model = copy_model(tiny_models["llama"], tmp_path / "model")
    before = tree(model)
    for out, words in ((model, "is the input"), (model / "pruned", "lies inside the input")):
        args = (
            ["run", RECIPES / "explicit.yaml", "--model", model]
            if command == "run"
            else ["prune", model, "--recipe", RECIPES / "explicit.yaml"]
        )
        err = usage_error(capsys, *args, "-o", out, "--overwrite")
        assert words in err
    assert tree(model) == before


def test_calibration_cannot_overwrite_its_data(tmp_path, tiny_models, capsys):
    data = tmp_path / "data.jsonl"
    shutil.copyfile(tiny_models["llama"].data, data)
    err = usage_error(capsys, "calibrate", tiny_models["llama"].path, "--data", data, "-o", data, "--overwrite")
    assert "is the input" in err
    assert data.read_bytes() == tiny_models["llama"].data.read_bytes()


def test_overwrite_replaces_compressor_output_and_an_empty_folder_only(tmp_path, tiny_models, capsys):
    report = tmp_path / "calibration.json"
    report.write_text('{"mine": true}')
    err = usage_error(capsys, "calibrate", tiny_models["llama"].path, "--data", tiny_models["llama"].data, "-o", report, "--overwrite")
    assert "was not written by compressor" in err and json.loads(report.read_text()) == {"mine": True}
    report.unlink()
    for _ in range(2):  # written, then replaced: it is compressor's own now
        code, _, err = run_cli(
            capsys, "calibrate", tiny_models["llama"].path, "--data", tiny_models["llama"].data, "-o", report, "--overwrite"
        )
        assert code == 0, err
    assert json.loads(report.read_text())["format"].startswith("compressor.")


# -- one writer per target -------------------------------------------------------------------------


def test_a_second_writer_fails_fast_naming_the_first(tmp_path, tiny_models, capsys):
    out = tmp_path / "pruned"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom compressor.staging import output_lock\nwith output_lock(sys.argv[1]):\n"
            "    print('locked', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.perf_counter()
        err = usage_error(capsys, "prune", tiny_models["llama"].path, "--recipe", RECIPES / "explicit.yaml", "-o", out)
        assert time.perf_counter() - started < 10
        assert "is being written by another compressor process" in err and f"pid {holder.pid}" in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run_cli(capsys, "prune", tiny_models["llama"].path, "--recipe", RECIPES / "explicit.yaml", "-o", out)
    assert code == 0, err  # a dead holder leaves no stale lock
    assert not list(tmp_path.glob(".*.lock"))


def test_two_concurrent_prunes_never_both_succeed(tmp_path, tiny_models):
    out = tmp_path / "pruned"
    command = [
        sys.executable,
        "-m",
        "compressor",
        "-q",
        "prune",
        str(tiny_models["llama"].path),
        "--recipe",
        str(RECIPES / "explicit.yaml"),
    ]
    runs = [
        subprocess.Popen([*command, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)
    ]
    results = [(r.wait(timeout=300), *r.communicate()) for r in runs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    assert "being written by another compressor process" in loser or "already exists" in loser
    assert sum("wrote" in out for _, out, _ in results) == 1


# -- code from a model folder ------------------------------------------------------------------------


def evil_model(tiny, where: Path, *, model_type: str = "evilmodel") -> tuple[Path, Path]:
    """A model folder whose config asks transformers to import its Python file, which leaves a mark."""
    model = copy_model(tiny, where)
    mark = where.parent / "CODE-RAN"
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil_code.py").write_text(
        f"import pathlib\npathlib.Path({str(mark)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    model_type = 'evilmodel'\n"
    )
    return model, mark


@pytest.mark.parametrize("command", ["plan", "prune", "calibrate"])
def test_code_in_a_model_folder_never_runs_whatever_stdin_says(tmp_path, tiny_models, command):
    model, mark = evil_model(tiny_models["llama"], tmp_path / "evil")
    args = {
        "plan": ["plan", "--recipe", str(RECIPES / "explicit.yaml"), "--model", str(model)],
        "prune": ["prune", str(model), "--recipe", str(RECIPES / "explicit.yaml"), "-o", str(tmp_path / "out")],
        "calibrate": ["calibrate", str(model), "--data", str(tiny_models["llama"].data), "-o", str(tmp_path / "c.json")],
    }[command]
    # transformers asks "Do you wish to run the custom code? [y/N]" when nobody said; a pipe answers yes.
    done = subprocess.run(
        [sys.executable, "-m", "compressor", *args], input="y\n" * 10, capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert "never runs code from a model folder" in done.stderr and "--trust-remote-code" in done.stderr
    assert "Traceback" not in done.stderr
    assert not mark.exists(), "the model folder's Python ran"


def test_auto_map_is_dropped_from_exports_unless_trusted(tmp_path, tiny_models, capsys):
    model = copy_model(tiny_models["llama"], tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}  # a known model_type: loads without it
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_custom.py").write_text("raise SystemExit('never imported in this test')\n")
    for extra in ([], ["--out-of-core"]):
        out = tmp_path / f"plain{len(extra)}"
        code, _, err = run_cli(capsys, "prune", model, "--recipe", RECIPES / "explicit.yaml", "-o", out, *extra)
        assert code == 0, err
        assert "auto_map" not in json.loads((out / "config.json").read_text())
        assert not (out / "modeling_custom.py").exists()
        assert "--trust-remote-code" not in (out / "README.md").read_text()
        trusted = tmp_path / f"trusted{len(extra)}"
        code, _, err = run_cli(capsys, "prune", model, "--recipe", RECIPES / "explicit.yaml", "-o", trusted, "--trust-remote-code", *extra)
        assert code == 0, err
        assert json.loads((trusted / "config.json").read_text())["auto_map"] == config["auto_map"]
        assert (trusted / "modeling_custom.py").read_bytes() == (model / "modeling_custom.py").read_bytes()
        assert "Made with `--trust-remote-code`" in (trusted / "README.md").read_text()
        assert json.loads((trusted / "compressor.json").read_text())["source"]["trust_remote_code"] is True


# -- edited plans ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "removed",
    [[4, 60], [-1], [2, 2], [True], ["2"], [0, 1, 2, 3, 4, 5]],
    ids=["out-of-range", "negative", "duplicate", "bool", "string", "all"],
)
def test_an_edited_plan_is_refused_and_nothing_written(tmp_path, tiny_models, capsys, removed):
    plan_file = tmp_path / "plan.json"
    code, _, err = run_cli(capsys, "plan", "--recipe", RECIPES / "explicit.yaml", "--model", tiny_models["llama"].path, "-o", plan_file)
    assert code == 0, err
    plan = json.loads(plan_file.read_text())
    plan["removed"] = [{"index": i, "reason": "edited", "metrics": {}} for i in removed]
    plan.pop("kept")
    plan_file.write_text(json.dumps(plan))
    out = tmp_path / "out"
    usage_error(capsys, "prune", tiny_models["llama"].path, "--plan", plan_file, "-o", out)
    assert not out.exists()


def test_a_plan_for_another_model_is_refused(tmp_path, tiny_models, capsys):
    plan_file = tmp_path / "plan.json"
    code, _, err = run_cli(capsys, "plan", "--recipe", RECIPES / "explicit.yaml", "--model", tiny_models["llama"].path, "-o", plan_file)
    assert code == 0, err
    plan = json.loads(plan_file.read_text())
    plan["num_blocks"], plan["kept"] = 8, [i for i in range(8) if i not in {2, 4}]
    plan_file.write_text(json.dumps(plan))
    for extra in ([], ["--out-of-core"]):
        err = usage_error(capsys, "prune", tiny_models["llama"].path, "--plan", plan_file, "-o", tmp_path / "out", *extra)
        assert "8 blocks" in err and "6" in err
    assert not (tmp_path / "out").exists()


def test_prune_with_a_plan_keeps_the_recipes_gates(tmp_path, tiny_models, capsys):
    tiny = tiny_models["llama"]
    recipe = tmp_path / "gated.yaml"
    recipe.write_text("version: 1\nname: gated\nselect: {op: explicit, blocks: [2]}\nvalidate: {max_accuracy_drop: 1.0}\n")
    plan_file = tmp_path / "plan.json"
    assert run_cli(capsys, "plan", "--recipe", recipe, "--model", tiny.path, "-o", plan_file)[0] == 0
    out = tmp_path / "pruned"
    code, _, err = run_cli(capsys, "prune", tiny.path, "--plan", plan_file, "-o", out)
    assert code == 0, err
    assert (out / "recipe.yaml").read_text() == recipe.read_text()
    code, out_text, err = run_cli(
        capsys, "validate", "--base", tiny.path, "--pruned", out, "--data", tiny.data, "--no-latency", "-o", tmp_path / "r"
    )
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [g["name"] for g in report["verdict"]["gates"]] and "0 gate(s)" not in out_text
    assert report["gates"]["max_accuracy_drop"] == 1.0


def test_a_run_folders_plan_finds_its_recipe_beside_it(tmp_path, tiny_models, capsys):
    tiny = tiny_models["llama"]
    recipe = tmp_path / "gated.yaml"
    recipe.write_text("version: 1\nname: gated\nselect: {op: explicit, blocks: [2]}\nvalidate: {max_accuracy_drop: 1.0}\n")
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "run", recipe, "--model", tiny.path, "-o", run_dir)[0] == 0
    plan = json.loads((run_dir / "plan.json").read_text())
    plan.pop("recipe_text")  # an older plan: the recipe beside it still counts
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "plan.json").write_text(json.dumps(plan))
    shutil.copyfile(run_dir / "recipe.yaml", tmp_path / "copy" / "recipe.yaml")
    code, _, err = run_cli(capsys, "prune", tiny.path, "--plan", tmp_path / "copy" / "plan.json", "-o", tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "recipe.yaml").read_text() == recipe.read_text()


# -- tokenizer and processor files -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_tokenizer_and_processor_files_reach_the_output_byte_for_byte(tmp_path, tiny_models, capsys, family):
    model = copy_model(tiny_models[family], tmp_path / "model")
    # Files save_pretrained of the loaded tokenizer would not write back (or would rewrite).
    (model / "tokenizer.model").write_bytes(os.urandom(2048))  # SentencePiece, as llama.cpp's converter reads it
    (model / "cl100k.tiktoken").write_bytes(b"IQ== 0\nIg== 1\n")
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(config, indent=4, sort_keys=True) + "\n\n")  # not save_pretrained's layout
    expected = {
        name: digest for name, digest in tree(model).items() if not name.endswith((".safetensors", "config.json")) or "token" in name
    }
    expected = {n: d for n, d in expected.items() if n not in ("README.md", "generation_config.json")}
    expected.update({n: d for n, d in tree(model).items() if n in ("preprocessor_config.json", "processor_config.json")})
    for extra in ([], ["--out-of-core"]):
        out = tmp_path / f"out{len(extra)}"
        code, _, err = run_cli(capsys, "prune", model, "--recipe", RECIPES / "explicit.yaml", "-o", out, *extra)
        assert code == 0, err
        written = tree(out)
        for name, digest in expected.items():
            assert written.get(name) == digest, f"{name} differs from the source ({'out of core' if extra else 'in memory'})"


# -- published files name no local path --------------------------------------------------------------


def test_published_files_hold_no_local_path(tmp_path, tiny_models, capsys):
    tiny = tiny_models["llava"]
    home = tmp_path / "home" / "alice"
    model = copy_model(tiny, home / "models" / "tiny-llava")
    data = home / "data"
    shutil.copytree(tiny.data.parent, data)
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "run",
        RECIPES / "shortgpt.yaml",
        "--model",
        model,
        "--data",
        data / "data.jsonl",
        "--eval",
        data / "data.jsonl",
        "--no-latency",
        "-o",
        out,
    )
    assert code == 0, err
    pruned = tmp_path / "pruned"
    code, _, err = run_cli(capsys, "prune", model, "--recipe", RECIPES / "shortgpt.yaml", "--data", data / "data.jsonl", "-o", pruned)
    assert code == 0, err
    code, card, err = run_cli(capsys, "push", out, "--repo-id", "org/tiny", "--dry-run")
    assert code == 0, err
    for folder in (out, pruned):
        for path in folder.rglob("*"):
            if path.is_file():
                text = path.read_bytes().decode("utf-8", "replace")
                assert str(tmp_path) not in text and "alice" not in text, path
    assert "alice" not in card.split("--- README.md ---")[1]
    manifest = json.loads((out / "hf" / "compressor.json").read_text())
    assert manifest["command"].startswith("compressor -q run recipe.yaml --model MODEL --data DATA.jsonl --eval EVAL.jsonl")
    assert manifest["source"]["ref"] == "tiny-llava"
    calibration = json.loads((pruned / "calibration.json").read_text())
    assert calibration["data"]["path"] == "data.jsonl" and len(calibration["data"]["sha256"]) == 64


# -- inputs checked before the model loads -----------------------------------------------------------


def test_bad_inputs_are_reported_before_the_model_loads(tmp_path, tiny_models, capsys, monkeypatch):
    no_model_load(monkeypatch)
    tiny = tiny_models["llava"]
    folder = tmp_path / "data"
    shutil.copytree(tiny.data.parent, folder)
    good = folder / "data.jsonl"
    cases = {
        "missing.jsonl": None,
        "empty.jsonl": "",
        "bad-json.jsonl": '{"prompt": "hi"\n',
        "huge-image.jsonl": json.dumps({"prompt": "hi", "image": _black_png(folder / "huge.png", 20000, 20000).name}),
        "not-an-image.jsonl": json.dumps({"prompt": "hi", "image": "notes.png"}),
        "outside.jsonl": json.dumps({"prompt": "hi", "image": "../secret.png"}),
    }
    (folder / "notes.png").write_text("not a picture")
    for name, text in cases.items():
        if text is not None:
            (folder / name).write_text(text)
        for args in (
            ["calibrate", tiny.path, "--data", folder / name, "-o", tmp_path / "c.json"],
            ["prune", tiny.path, "--recipe", RECIPES / "shortgpt.yaml", "--data", folder / name, "-o", tmp_path / "o"],
            ["run", RECIPES / "shortgpt.yaml", "--model", tiny.path, "--data", good, "--eval", folder / name, "-o", tmp_path / "r"],
            ["validate", "--base", tiny.path, "--pruned", tiny.path, "--data", folder / name, "-o", tmp_path / "v"],
        ):
            err = usage_error(capsys, *args)
            assert name in err or "huge.png" in err or "notes.png" in err or "secret.png" in err, err
    corrupt = tmp_path / "calibration.json"
    corrupt.write_text('{"format": "compressor.calibration/1", "num_blocks": ')
    err = usage_error(capsys, "prune", tiny.path, "--recipe", RECIPES / "shortgpt.yaml", "--calibration", corrupt, "-o", tmp_path / "o")
    assert "calibration.json" in err
    assert not [p for p in tmp_path.iterdir() if p.name not in ("data", "calibration.json")]


def test_images_outside_the_data_folder_need_the_flag(tmp_path, tiny_models, capsys):
    tiny = tiny_models["llava"]
    images = tmp_path / "images"
    shutil.copytree(tiny.data.parent, images)
    data = tmp_path / "lists" / "data.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(json.dumps({"prompt": "what?", "image": f"../images/img{i}.png"}) for i in range(4)) + "\n")
    err = usage_error(capsys, "calibrate", tiny.path, "--data", data, "-o", tmp_path / "c.json")
    assert "--allow-outside-data" in err
    code, _, err = run_cli(capsys, "calibrate", tiny.path, "--data", data, "-o", tmp_path / "c.json", "--allow-outside-data")
    assert code == 0, err


# -- disks and permissions ---------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("extra", [[], ["--out-of-core"]], ids=["in-memory", "out-of-core"])
def test_a_full_or_read_only_disk_is_a_user_error_and_leaves_nothing(tmp_path, tiny_models, capsys, monkeypatch, failure, extra):
    import compressor.export

    def fail(*args, **kwargs):  # the OS refusing a write in the middle of the export
        raise OSError(failure, os.strerror(failure), str(tmp_path / "out" / "tokenizer.json"))

    monkeypatch.setattr(compressor.export.shutil, "copyfile", fail)
    err = usage_error(capsys, "prune", tiny_models["llama"].path, "--recipe", RECIPES / "explicit.yaml", "-o", tmp_path / "out", *extra)
    assert {errno.ENOSPC: "the disk is full", errno.EROFS: "read-only", errno.EACCES: "permission denied"}[failure] in err
    assert "Nothing was written" in err and "tokenizer.json" in err
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_that_cannot_be_created_is_a_user_error(tmp_path, tiny_models, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder would go")
    err = usage_error(capsys, "prune", tiny_models["llama"].path, "--recipe", RECIPES / "explicit.yaml", "-o", blocker / "out")
    assert str(blocker) in err


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_permissions_follow_the_umask(tmp_path, tiny_models, capsys, umask):
    previous = os.umask(umask)
    try:
        out = tmp_path / "out"
        code, _, err = run_cli(capsys, "prune", tiny_models["llama"].path, "--recipe", RECIPES / "explicit.yaml", "-o", out)
        report = tmp_path / "c.json"
        code2, _, err2 = run_cli(capsys, "calibrate", tiny_models["llama"].path, "--data", tiny_models["llama"].data, "-o", report)
    finally:
        os.umask(previous)
    assert code == 0 and code2 == 0, err + err2
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(report.stat().st_mode) == 0o666 & ~umask
    for path in out.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~umask, path


def test_the_marker_is_not_published(tmp_path, tiny_models, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, "prune", tiny_models["llama"].path, "--recipe", RECIPES / "explicit.yaml", "-o", out)[0] == 0
    assert (out / MARKER).is_file()
    manifest = json.loads((out / "compressor.json").read_text())
    assert MARKER not in manifest["files"]


def test_output_lock_is_reentrant_in_one_process(tmp_path):
    with output_lock(tmp_path / "x"), output_lock(tmp_path / "x"):
        assert (tmp_path / ".x.lock").is_file()
    assert not (tmp_path / ".x.lock").exists()


def test_lock_file_names_its_holder(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        from compressor.staging import output_lock
        from compressor.errors import InputError
        with output_lock(sys.argv[1]):
            try:
                import subprocess
                subprocess.run([sys.executable, "-c", "from compressor.staging import output_lock\\nimport sys\\n"
                                "with output_lock(sys.argv[1]): pass", sys.argv[1]], check=True, capture_output=True, text=True)
            except subprocess.CalledProcessError as error:
                print(error.stderr)
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "is being written by another compressor process (pid" in done.stdout, done


@pytest.mark.parametrize("blocks", ["[true]", "['2']", "[2.0]"])
def test_recipes_are_as_strict_as_plans(tmp_path, capsys, blocks):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nname: loose\nselect: {{op: explicit, blocks: {blocks}}}\n")
    err = usage_error(capsys, "recipe", "check", recipe)
    assert "select.blocks[0]" in err or "select.explicit.blocks[0]" in err, err


def without_pad_token(tiny, where: Path) -> Path:
    """A copy of ``tiny`` whose tokenizer declares no pad token, as many Llama checkpoints do."""
    model = copy_model(tiny, where)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (model / name).is_file():
            config = json.loads((model / name).read_text())
            config.pop("pad_token", None)
            (model / name).write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_a_tokenizer_without_pad_token_changes_no_figure(tmp_path, tiny_models, capsys, family):
    tiny = tiny_models[family]
    model = without_pad_token(tiny, tmp_path / "nopad")
    reports = {}
    for name, path in (("pad", tiny.path), ("nopad", model)):
        reports[name] = tmp_path / f"{name}.json"
        code, _, err = run_cli(capsys, "calibrate", path, "--data", tiny.data, "--batch-size", "3", "-o", reports[name])
        assert code == 0, err
    with_pad, without = (json.loads(reports[n].read_text())["metrics"]["block_influence"] for n in ("pad", "nopad"))
    for modality, values in with_pad.items():
        assert without[modality] == pytest.approx(values, abs=1e-6, nan_ok=True), modality
    code, _, err = run_cli(capsys, "prune", model, "--recipe", RECIPES / "explicit.yaml", "-o", tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "tokenizer_config.json").read_bytes() == (model / "tokenizer_config.json").read_bytes()


@pytest.mark.parametrize(
    "extra",
    [[], ["--out-of-core"], ["--onnx"]],
    ids=["in-memory", "out-of-core", "onnx"],
)
def test_messages_name_final_paths_only(tmp_path, tiny_models, capsys, extra):
    from compressor import cli

    out = tmp_path / "pruned"
    code = cli.main(["prune", str(tiny_models["llama"].path), "--recipe", str(RECIPES / "explicit.yaml"), "-o", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    said = captured.out + captured.err
    assert ".tmp-" not in said and f"wrote {out}" in said
