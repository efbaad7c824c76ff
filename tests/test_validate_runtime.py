"""`compressor validate` with run-time visual-token modes (--visual-keep, --visual-band, --early-exit,
--guide; a recipe's runtime: section): the report's "Run-time modes" section, its figures, the
gate, and every refusal of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compressor import cli
from compressor.calibration_report import CalibrationReport
from compressor.data import load_samples
from compressor.errors import RecipeError
from compressor.recipe import parse_recipe
from compressor.runtime import choose_band, estimate_flops, generate
from compressor.validate_runtime import inputs_of

from .conftest import run_cli, write_data

NEW = 4  # --max-new-tokens: short answers keep every run about a second


@pytest.fixture(scope="module")
def llava(tiny_models):
    return tiny_models["llava"]


@pytest.fixture(scope="module")
def pruned(llava, tmp_path_factory):
    """The tiny llava without its two least influential blocks: a calibrating recipe, so the folder
    carries calibration.json (what runtime.band_where reads) and a recipe.yaml with no runtime: section."""
    root = tmp_path_factory.mktemp("runtime")
    recipe = root / "lowest.yaml"
    recipe.write_text("version: 1\nname: lowest\nselect: {op: lowest, metric: block_influence, count: 2}\n")
    out = root / "pruned"
    assert cli.main(["-q", "prune", str(llava.path), "--recipe", str(recipe), "--data", str(llava.data), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def answered(llava, tmp_path_factory) -> Path:
    """The tiny llava's data with each answer replaced by the model's own plain greedy answer: plain
    exact match is then 100 %, so any change a mode makes shows in its accuracy."""
    folder = tmp_path_factory.mktemp("answered")
    loaded = llava.load()
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    lines = []
    for sample in load_samples(llava.data):
        tokens = generate(loaded.model, loaded.processor, inputs_of(loaded, sample, "auto"), max_new_tokens=NEW).tokens
        answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if answer:
            shutil.copy(sample.image, folder / sample.image.name)
            lines.append(json.dumps({"prompt": sample.prompt, "answer": answer, "image": sample.image.name}))
    assert len(lines) >= 4
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def validate(capsys, base, pruned, data, out, *extra):
    return run_cli(
        capsys,
        "validate",
        "--base",
        base,
        "--pruned",
        pruned,
        "--data",
        data,
        "-o",
        out,
        "--no-latency",
        "--max-new-tokens",
        NEW,
        "--allow-no-gates",
        *extra,
    )


def report_of(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def kept_blocks(report: dict) -> list[int]:
    removed = set(report["models"]["pruned"]["removed"])
    return [i for i in range(report["models"]["base"]["num_blocks"]) if i not in removed]


def test_section_shows_computed_figures(llava, pruned, answered, tmp_path, capsys):
    out = tmp_path / "report"
    flags = ["--visual-keep", "0.25", "--visual-cut", "2", "--ranking", "random", "--max-runtime-accuracy-drop", "1"]
    code, stdout, err = validate(capsys, llava.path, pruned, answered, out, *flags)
    assert code == 0, err
    assert "max_runtime_accuracy_drop=" in stdout and ":ok" in stdout
    report = report_of(out)
    runtime = report["runtime"]
    assert runtime["flags"] == "--visual-keep 0.25 --visual-cut 2 --ranking random seed=0" and runtime["origin"] == "command line"
    assert runtime["options"]["keep"] == 0.25 and runtime["options"]["cut"] == 2 and runtime["band_choice"] is None
    base = runtime["models"]["base"]
    samples = load_samples(answered)
    assert base["n"] == len(samples) and base["plain_accuracy"] == 1.0  # the data holds the base model's own answers
    assert base["accuracy"] == sum(r["exact"] for r in base["samples"]) / base["n"]
    assert base["accuracy_drop"] == pytest.approx(1.0 - base["accuracy"])
    # 16 image tokens per prompt, ceil(0.25 * 16) = 4 of them from block 2 on.
    assert base["image_tokens"] == 16 and base["kept_by_block"] == [16, 16, 4, 4, 4, 4]
    assert base["kept_per_block"] == pytest.approx(8.0) and base["kept_share"] == pytest.approx(0.5)
    assert base["early_exit_rate"] is None and base["guide"] is None and base["flops"]["guide"] == 0
    # FLOPs, recomputed from what each generation processed.
    model = llava.load().model
    plain = sum(sum(estimate_flops(model, [r["prompt_tokens"]] * 6, r["plain_new_tokens"])) for r in base["samples"])
    mode = sum(
        sum(estimate_flops(model, [r["prompt_tokens"]] * 2 + [r["prompt_tokens"] - 12] * 4, r["new_tokens"])) for r in base["samples"]
    )
    assert base["flops"]["plain"] == pytest.approx(plain) and base["flops"]["mode"] == pytest.approx(mode)
    assert base["flops_ratio"] == pytest.approx(mode / plain) and base["flops_ratio_model"] == base["flops_ratio"]
    # The pruned model: the cut moves to the first kept block at or after block 2, in its own numbering.
    pruned_figures = runtime["models"]["pruned"]
    cut = next(j for j, original in enumerate(kept_blocks(report)) if original >= 2)
    assert pruned_figures["measured"] and pruned_figures["options"]["cut"] == cut
    assert pruned_figures["kept_by_block"] == [16] * cut + [4] * (4 - cut)
    assert pruned_figures["flops_ratio"] < 1
    assert pruned_figures["flops_ratio_vs_base"] == pytest.approx(pruned_figures["flops"]["mode"] / base["flops"]["plain"])
    gate = {g["name"]: g for g in report["verdict"]["gates"]}["max_runtime_accuracy_drop"]
    assert gate["value"] == base["accuracy_drop"] and gate["figure"] == "runtime"
    assert report["evidence"]["runtime"] == {"samples": base["n"], "weak": True, "why": f"{base['n']} samples < 30"}
    markdown = (out / "report.md").read_text()
    assert "## Run-time modes" in markdown and "`--visual-keep 0.25 --visual-cut 2 --ranking random seed=0`" in markdown
    assert "| base | cut 2 |" in markdown and f"| pruned | cut {cut} |" in markdown and "8 / 16" in markdown
    assert "Run-time modes</h2>" in (out / "report.html").read_text()


def test_keep_one_gives_exactly_the_plain_answers(llava, pruned, answered, tmp_path, capsys):
    code, _, err = validate(capsys, llava.path, pruned, answered, tmp_path / "r", "--visual-keep", "1.0", "--visual-cut", "2")
    assert code == 0, err
    for name, figures in report_of(tmp_path / "r")["runtime"]["models"].items():
        assert figures["accuracy"] == figures["plain_accuracy"] and figures["same_answer"] == 1.0, name
        assert all(r["prediction"] == r["plain_prediction"] for r in figures["samples"])
        assert figures["flops_ratio"] == 1.0 and figures["kept_share"] == 1.0
    assert report_of(tmp_path / "r")["runtime"]["models"]["base"]["plain_accuracy"] == 1.0


def test_early_exit_with_the_pruned_checkpoint_as_guide(llava, pruned, answered, tmp_path, capsys):
    code, _, err = validate(capsys, llava.path, pruned, answered, tmp_path / "r", "--early-exit", "0.2", "--guide", "pruned")
    assert code == 0, err
    runtime = report_of(tmp_path / "r")["runtime"]
    base = runtime["models"]["base"]
    assert base["guide"] == "the pruned checkpoint" and base["flops"]["guide"] > 0
    assert base["early_exit_rate"] == sum(r["skipped"] for r in base["samples"]) / base["n"]
    assert base["guide_confidence"] == pytest.approx(sum(r["guide_confidence"] for r in base["samples"]) / base["n"])
    assert runtime["models"]["pruned"] == {"measured": False, "why": "the pruned checkpoint is the guide; it does not guide itself"}
    assert "Not measured: pruned: the pruned checkpoint is the guide" in (tmp_path / "r" / "report.md").read_text()


def test_recipe_section_is_read_and_flags_override_it(llava, pruned, answered, tmp_path, capsys):
    calibration = CalibrationReport.load(pruned / "calibration.json")
    image = calibration.values("block_influence", "image")
    threshold = sorted(image)[2]  # the two least influential blocks are redundant for image tokens
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nname: r\nselect: {op: explicit, blocks: [1]}\n"
        "runtime:\n  keep: 0.5\n  depth: 0.5\n  ranking: random\n  seed: 3\n"
        f"  band_where: [{{metric: block_influence, modality: image, below: {threshold}}}]\n"
    )
    code, _, err = validate(capsys, llava.path, pruned, answered, tmp_path / "a", "--recipe", recipe)
    assert code == 0, err
    runtime = report_of(tmp_path / "a")["runtime"]
    expected = choose_band(calibration, [{"metric": "block_influence", "modality": "image", "below": threshold}])
    assert runtime["origin"] == "the runtime: section of r.yaml"
    assert runtime["options"]["keep"] == 0.5 and runtime["options"]["depth"] == 0.5 and runtime["options"]["seed"] == 3
    assert runtime["band_choice"]["band"] == list(expected.band) and runtime["options"]["band"] == list(expected.band)
    assert sum(runtime["band_choice"]["redundant"]) == 2 and "band_where=block_influence[image] <" in runtime["flags"]
    # The flags win: keep, and a band that replaces band_where; depth and seed stay the recipe's.
    code, _, err = validate(
        capsys, llava.path, pruned, answered, tmp_path / "b", "--recipe", recipe, "--visual-keep", "0.75", "--visual-band", "1-4"
    )
    assert code == 0, err
    runtime = report_of(tmp_path / "b")["runtime"]
    assert runtime["origin"] == "the runtime: section of r.yaml, overridden by --visual-keep, --visual-band"
    assert runtime["options"]["keep"] == 0.75 and runtime["options"]["band"] == [1, 4] and runtime["options"]["band_where"] is None
    assert runtime["options"]["depth"] == 0.5 and runtime["band_choice"] is None
    assert runtime["models"]["base"]["kept_by_block"][0] == 0 and runtime["models"]["base"]["kept_by_block"][5] == 0
    # --no-runtime ignores the section.
    code, _, err = validate(capsys, llava.path, pruned, answered, tmp_path / "c", "--recipe", recipe, "--no-runtime")
    assert code == 0, err
    assert "runtime" not in report_of(tmp_path / "c")


def test_run_passes_the_recipe_section_to_validation(llava, answered, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nname: r\nselect: {op: explicit, blocks: [3]}\nvalidate: {max_runtime_accuracy_drop: 1.0}\nruntime: {band: [1, -1]}\n"
    )
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "run", recipe, "--model", llava.path, "--eval", answered, "--no-latency", "-o", out)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1].startswith("compressor-verdict: PASS max_runtime_accuracy_drop=")
    runtime = report_of(out / "report")["runtime"]
    assert runtime["flags"] == "--visual-band 1--1" and runtime["origin"] == "the runtime: section of r.yaml"
    assert runtime["models"]["base"]["options"]["band"] == [1, 5] and runtime["models"]["pruned"]["options"]["band"] == [1, 4]
    assert runtime["models"]["base"]["kept_by_block"] == [0] + [16] * 5


def test_a_report_without_run_time_options_has_no_such_section(llava, pruned, answered, tmp_path, capsys):
    code, _, err = validate(capsys, llava.path, pruned, answered, tmp_path / "r")
    assert code == 0, err
    assert "runtime" not in report_of(tmp_path / "r") and "runtime" not in report_of(tmp_path / "r")["evidence"]
    assert "Run-time modes" not in (tmp_path / "r" / "report.md").read_text()


REFUSED = [
    (["--visual-keep", "1.5"], "--visual-keep (runtime.keep) = 1.5: the share of image tokens kept lies in (0, 1]"),
    (["--visual-keep", "0"], "--visual-keep (runtime.keep) = 0.0"),
    (["--visual-keep", "0.5"], "add --visual-cut (runtime.cut) K (a block) or --visual-depth"),
    (["--visual-keep", "0.5", "--visual-cut", "1", "--visual-depth", "0.5"], "were both given"),
    (["--visual-keep", "0.5", "--visual-depth", "1.0"], "--visual-depth (runtime.depth) = 1.0: a fraction of the depth lies in [0, 1)"),
    (["--visual-cut", "2"], "--visual-cut only refines a run-time mode, and none was asked for"),
    (["--visual-band", "3-1"], "--visual-band (runtime.band) = 3-1: its first block comes after its last (an empty band)"),
    (["--visual-band", "1 to 4"], "--visual-band (runtime.band) = '1 to 4' is not a band of blocks"),
    (["--visual-band", "0-9"], "block 9 is beyond the base model's 6 blocks (0..5"),
    (["--visual-band", "-2-1"], "is blocks 4..1 of this model: its first block comes after its last"),
    (["--visual-keep", "0.5", "--visual-cut", "7"], "--visual-cut (runtime.cut) = 7 is beyond the base model's 6 blocks"),
    (["--early-exit", "0"], "--early-exit (runtime.early_exit) = 0.0: a confidence threshold lies in (0, 1]"),
    (["--early-exit", "0.9"], "needs a guide model (SGL), and none was given: pass --guide pruned"),
    (["--visual-keep", "0.5", "--visual-cut", "2", "--ranking", "guide"], "--ranking (runtime.ranking) guide needs a guide model"),
    (
        ["--visual-keep", "0.5", "--visual-cut", "2", "--guide", "pruned"],
        "--guide (runtime.guide) pruned was given, but nothing uses a guide",
    ),
    (["--early-exit", "0.9", "--guide", "no/such/folder"], "--guide (runtime.guide): Model path 'no/such/folder' does not exist"),
    (["--visual-keep", "0.5", "--visual-cut", "0"], "on the base model: ranking 'self' reads the attention of the block before the cut"),
    (["--max-runtime-accuracy-drop", "0.1"], "--max-runtime-accuracy-drop (max_runtime_accuracy_drop) needs a run-time mode"),
]


@pytest.mark.parametrize("flags, message", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_bad_options_exit_2_naming_the_option(llava, pruned, answered, tmp_path, capsys, flags, message):
    code, _, err = validate(capsys, llava.path, pruned, answered, tmp_path / "r", *flags)
    assert code == 2 and message in err, err
    assert "Fix:" in err and not (tmp_path / "r").exists()


def test_guides_of_another_family_or_vocabulary_are_refused(llava, tiny_models, pruned, answered, tmp_path, capsys):
    from compressor.demo.processor import build_llava_processor, build_tokenizer

    from .conftest import WORDS

    code, _, err = validate(
        capsys, llava.path, pruned, answered, tmp_path / "a", "--early-exit", "0.9", "--guide", tiny_models["qwen2_vl"].path
    )
    assert code == 2 and "on the base model: The guide is a qwen2_vl model and this one a llava model" in err, err
    other = tmp_path / "other-words"
    shutil.copytree(pruned, other)
    build_llava_processor(build_tokenizer([*WORDS, "triangle"]), image_size=16, patch_size=4).save_pretrained(other)
    code, _, err = validate(capsys, llava.path, pruned, answered, tmp_path / "b", "--early-exit", "0.9", "--guide", other)
    assert code == 2 and "another vocabulary" in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_text_only_data_and_models_are_refused(llava, tiny_models, pruned, answered, tmp_path, capsys):
    text = write_data(tmp_path / "text", images=False)
    code, _, err = validate(capsys, llava.path, pruned, text, tmp_path / "a", "--visual-band", "1-3")
    assert code == 2 and "act on image tokens, and no answered sample has an image" in err, err
    llama = tiny_models["llama"].path
    code, _, err = validate(capsys, llama, llama, answered, tmp_path / "b", "--visual-band", "1-3")
    assert code == 2 and "the base model is a text-only llama model" in err, err
    prompts = tmp_path / "prompts" / "data.jsonl"
    prompts.parent.mkdir()
    prompts.write_text(json.dumps({"prompt": "count to three"}) + "\n")
    code, _, err = validate(capsys, llava.path, pruned, prompts, tmp_path / "c", "--visual-keep", "1.0")
    assert code == 2 and "are measured on answered samples" in err, err


def test_band_where_needs_the_calibration_report(llava, answered, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nname: r\nselect: {op: explicit, blocks: [1]}\n"
        "runtime: {band_where: [{metric: block_influence, modality: image, below: 0.1}]}\n"
    )
    out = tmp_path / "pruned"
    assert cli.main(["-q", "prune", str(llava.path), "--recipe", str(recipe), "-o", str(out)]) == 0
    code, _, err = validate(capsys, llava.path, out, answered, tmp_path / "a")  # the exported recipe's section
    assert code == 2 and "runtime.band_where chooses the band from the calibration report" in err and "no calibration.json" in err
    code, _, err = run_cli(capsys, "run", recipe, "--model", llava.path, "--eval", answered, "--no-latency", "-o", tmp_path / "run")
    assert code == 2 and "selects blocks without calibrating (op explicit)" in err, err
    assert not (tmp_path / "run").exists()


BAD_SECTIONS = [
    ("{keap: 0.5}", "runtime: unknown key 'keap' (did you mean 'keep'?)"),
    ("{keep: 0.5, band_were: []}", "unknown key 'band_were' (did you mean 'band_where'?)"),
    ("{keep: 0.5}", "keep = 0.5 prunes image tokens from some block on: give 'cut'"),
    ("{keep: 1.5}", "runtime.keep: Input should be less than or equal to 1"),
    ("{keep: 0.5, cut: 1, depth: 0.5}", "give one of 'cut' or 'depth'"),
    ("{band: [3, 1]}", "an empty band"),
    ("{band: [1, 2], band_where: [{metric: block_influence, below: 0.1}]}", "give one of 'band' or 'band_where'"),
    ("{band_where: [{metric: block_influense, below: 0.1}]}", "did you mean 'block_influence'"),
    ("{early_exit: 0.9}", "early_exit needs a guide model: add 'guide: pruned'"),
    ("{keep: 0.5, cut: 2, ranking: guide}", "ranking: guide needs a guide model"),
    ("{band: [1, 2], guide: pruned}", "'guide' is read only by"),
    ("{early_exit: 0.9, guide: small}", "runtime.guide: Input should be 'pruned'"),
]


@pytest.mark.parametrize("section, message", BAD_SECTIONS, ids=[s for s, _ in BAD_SECTIONS])
def test_bad_runtime_sections_are_refused(section, message):
    with pytest.raises(RecipeError) as error:
        parse_recipe(f"version: 1\nname: t\nselect: {{op: explicit, blocks: [1]}}\nruntime: {section}\n")
    assert message in str(error.value)


def test_bad_runtime_section_exits_2_in_validate(llava, pruned, answered, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: r\nselect: {op: explicit, blocks: [1]}\nruntime: {keap: 0.5}\n")
    code, _, err = validate(capsys, llava.path, pruned, answered, tmp_path / "a", "--recipe", recipe)
    assert code == 2 and "unknown key 'keap' (did you mean 'keep'?)" in err
