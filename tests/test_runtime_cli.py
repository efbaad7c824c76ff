"""`compressor generate`: one greedy answer with run-time visual-token options, on the tiny models of
tests/conftest.py, and every refusal of bad input (exit 2, a message naming the option)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compressor.accuracy import generate_answers
from compressor.calibration_report import CalibrationReport
from compressor.data import Sample

from .conftest import WORDS, build_tiny, run_cli

NEW = 6
PROMPT = "what color is the circle?"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("image") / "shapes.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def llava(tiny_models):
    return tiny_models["llava"]


def _json(capsys, *args) -> dict:
    code, out, err = run_cli(capsys, "generate", *args, "--max-new-tokens", NEW, "--device", "cpu", "--json")
    assert code == 0, err
    return json.loads(out)


def test_plain_generate_is_the_models_greedy_answer(capsys, tiny_models, image):
    """As `validate` generates answers (`accuracy.generate_answers`): a VLM with an image, and an LLM."""
    for family, picture in (("llava", image), ("llama", None)):
        tiny = tiny_models[family]
        loaded = tiny.load()
        expected = generate_answers(loaded.model, loaded.processor, [Sample(PROMPT, image=picture)], max_new_tokens=NEW)[0]
        args = [tiny.path, "--prompt", PROMPT, *(["--image", picture] if picture else [])]
        got = _json(capsys, *args)
        assert got["answer"] == expected and got["new_tokens"] >= 1
        assert got["flops"]["ratio"] == 1.0 and got["early_exit"] is None and got["guide_confidence"] is None
        code, out, _ = run_cli(capsys, "generate", *args, "--max-new-tokens", NEW, "--device", "cpu")
        assert code == 0 and out.splitlines()[0] == f"answer: {expected}"


def test_keep_one_is_plain_and_pruning_keeps_fewer_image_tokens(capsys, llava, image):
    common = [llava.path, "--prompt", PROMPT, "--image", image]
    plain = _json(capsys, *common)
    assert plain["image_tokens"] == 16 and plain["kept_per_block"] == [16] * 6
    assert _json(capsys, *common, "--visual-keep", "1.0", "--visual-cut", "2")["tokens"] == plain["tokens"]
    pruned = _json(capsys, *common, "--visual-keep", "0.5", "--visual-cut", "2")
    assert pruned["kept_per_block"] == [16, 16, 8, 8, 8, 8] and pruned["options"]["keep"] == 0.5
    assert pruned["prompt_tokens_per_block"][2] == pruned["prompt_tokens_per_block"][0] - 8
    assert 0 < pruned["flops"]["model"] < pruned["flops"]["plain"] and pruned["flops"]["ratio"] < 1
    code, out, _ = run_cli(capsys, "generate", *common, "--visual-depth", "0.5", "--visual-keep", "0.25", "--ranking", "random")
    assert code == 0 and "taking part per block: 16 (blocks 0-2), 4 (blocks 3-5)" in out and "% of the plain model's" in out


def test_band_from_a_calibration_report(capsys, llava, image, tmp_path):
    image_influence = [0.3, 0.01, 0.2, 0.01, 0.02, 0.01]
    table = {"all": [0.5] * 6, "text": [0.5] * 6, "image": image_influence}
    metrics = {"block_influence": table, "adjacent_distance": table, "tail_probability": {"0.05": table}, "angular_distance": {"1": table}}
    report = tmp_path / "calibration.json"
    CalibrationReport(model={"num_blocks": 6}, data={}, options={}, metrics=metrics, elapsed_s=0.0).save(report)
    where = "metric=block_influence,modality=image,below=0.05"
    got = _json(capsys, llava.path, "--prompt", PROMPT, "--image", image, "--band-from", report, "--band-where", where)
    assert got["band"]["blocks"] == [0, 2] and got["band"]["from"] == "calibration"
    assert got["kept_per_block"] == [16, 16, 16, 0, 0, 0] and got["flops"]["ratio"] < 1
    code, out, _ = run_cli(capsys, "generate", llava.path, "--prompt", PROMPT, "--image", image, "--visual-band", "1-3")
    assert code == 0 and "taking part per block: 0 (block 0), 16 (blocks 1-3), 0 (blocks 4-5)" in out


def test_guide_confidence_and_early_exit_are_reported(capsys, llava, image):
    common = [llava.path, "--prompt", PROMPT, "--image", image, "--guide", llava.path]
    got = _json(capsys, *common, "--early-exit", "1.0")
    assert 0 < got["guide_confidence"] < 1 and got["early_exit"] == {"threshold": 1.0, "fired": False, "consistent": None}
    assert got["flops"]["guide"] > 0 and got["flops"]["total"] == got["flops"]["model"] + got["flops"]["guide"]
    low = _json(capsys, *common, "--early-exit", "0.01")
    assert low["early_exit"]["fired"] == low["early_exit"]["consistent"] is not None
    if low["early_exit"]["fired"]:
        assert low["prompt_tokens_per_block"] == [0] * 6 and low["flops"]["model"] == 0
    ranked = _json(capsys, *common, "--visual-keep", "0.25", "--visual-cut", "1", "--ranking", "guide")
    assert ranked["kept_per_block"] == [16] + [4] * 5 and ranked["early_exit"] is None and ranked["guide_confidence"] > 0


@pytest.fixture(scope="module")
def other_vocabulary(tmp_path_factory):
    """A llava whose tokenizer has one more word: the same family and image token, another vocabulary."""
    from compressor.demo.processor import build_llava_processor, build_tokenizer

    model, _ = build_tiny("llava", layers=2)
    path = tmp_path_factory.mktemp("other") / "llava-words"
    model.save_pretrained(path)
    build_llava_processor(build_tokenizer([*WORDS, "triangle"]), image_size=16, patch_size=4).save_pretrained(path)
    return path


BAD = [
    (["--visual-keep", "0"], "--visual-keep 0.0: the share of image tokens kept must lie in (0, 1]"),
    (["--visual-keep", "1.5", "--visual-cut", "1"], "--visual-keep 1.5"),
    (["--visual-keep", "0.5"], "--visual-keep 0.5 prunes image tokens, but no block to start at was given"),
    (["--visual-keep", "0.5", "--visual-cut", "1", "--visual-depth", "0.5"], "--visual-cut and --visual-depth both"),
    (["--visual-cut", "2"], "--visual-cut choose how image tokens are pruned, but --visual-keep is not given"),
    (["--visual-band", "4-1"], "--visual-band 4-1: its first block 4 comes after its last 1 (an empty band)"),
    (["--visual-band", "2-9"], "--visual-band 2-9: block 9 is beyond this model's 6 blocks"),
    (["--visual-band", "two"], "--visual-band 'two' is not a range of blocks"),
    (["--visual-keep", "0.5", "--visual-cut", "0"], "--ranking self reads the attention in the block before the cut"),
    (["--visual-keep", "0.5", "--visual-cut", "9", "--ranking", "random"], "--visual-cut 9 is not a block"),
    (["--early-exit", "0.9"], "--early-exit needs SGL's guide model, and no --guide was given"),
    (["--visual-keep", "0.5", "--visual-cut", "1", "--ranking", "guide"], "--ranking guide needs SGL's guide model"),
    (["--guide", "{llava}"], "--guide was given, but nothing uses it"),
    (["--early-exit", "0.9", "--guide", "{qwen2_vl}"], "is a qwen2_vl model and '{llava}' a llava model"),
    (["--early-exit", "0.9", "--guide", "{other}"], "The guide's tokenizer has another vocabulary than this model's"),
    (["--band-where", "metric=block_influence,below=0.1"], "--band-where says how to read a calibration report, and no --band-from"),
    (["--band-from", "{report}", "--band-where", "metric=block_influence"], "give exactly one of 'below' or 'above'"),
    (["--band-from", "{report}", "--band-where", "below"], "'below' is not KEY=VALUE"),
    (["--visual-band", "1-3", "--band-from", "{report}"], "--visual-band and --band-from both give the band"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[f"{i}:{a[0]}" for i, (a, _) in enumerate(BAD)])
def test_bad_options_exit_2_naming_the_option(capsys, tiny_models, image, other_vocabulary, args, message, tmp_path):
    paths = {"llava": tiny_models["llava"].path, "report": tmp_path / "calibration.json", "other": other_vocabulary}
    if "{qwen2_vl}" in args:
        paths["qwen2_vl"] = tiny_models["qwen2_vl"].path
    args = [a.format(**paths) for a in args]
    code, out, err = run_cli(capsys, "generate", paths["llava"], "--prompt", PROMPT, "--image", image, "--device", "cpu", *args)
    assert code == 2 and out == "", err
    assert message.format(**paths) in err and "Fix:" in err and "Traceback" not in err, err


def test_bad_images_and_text_only_models(capsys, tiny_models, llava, image, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    cases = [
        ([llava.path, "--visual-band", "1-3"], "--visual-band acts on the prompt's image tokens, and no --image was given"),
        ([llava.path, "--image", tmp_path / "missing.png"], "--image: image '"),
        ([llava.path, "--image", not_an_image, "--visual-band", "1-3"], "is not an image PIL can read"),
        ([tiny_models["llama"].path, "--visual-keep", "0.5", "--visual-cut", "1"], "is a text-only llama model, and --visual-keep acts"),
        ([tiny_models["llama"].path, "--image", image], "is a text-only llama model, and --image acts on images"),
        ([llava.path, "--image", image, "--prompt", " "], "--prompt is empty"),
    ]
    for args, message in cases:
        prompt = [] if "--prompt" in args else ["--prompt", PROMPT]
        code, out, err = run_cli(capsys, "generate", *args, *prompt)
        assert code == 2 and out == "" and message in err and "Fix:" in err, (args, err)
