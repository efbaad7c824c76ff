"""Commands that need no model import neither torch nor transformers, numpy nor huggingface_hub (seconds and hundreds of
MB each): `--help`, `recipe check`, `plan` (from a report or a model's config.json), `arch list`, and
`prune --out-of-core --verify none` (by default that prune loads both models to prove the result)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import run_cli

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PROBE = """
import sys
from compressor.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "transformers", "onnx", "onnxruntime", "numpy", "huggingface_hub") if m in sys.modules)
print("HEAVY:" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


def heavy_imports(*args) -> tuple[int, str, list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, "-q", *map(str, args)], capture_output=True, text=True, timeout=120)
    line = next(line for line in done.stderr.splitlines() if line.startswith("HEAVY:"))
    return done.returncode, done.stderr, [m for m in line.removeprefix("HEAVY:").split(",") if m]


@pytest.fixture(scope="module")
def report(tiny_models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("startup") / "calibration.json"
    from compressor import cli

    assert cli.main(["-q", "calibrate", str(tiny_models["llama"].path), "--data", str(tiny_models["llama"].data), "-o", str(path)]) == 0
    return path


@pytest.mark.parametrize(
    "command",
    ["help", "recipe check", "arch list", "plan --model", "plan --calibration"],
)
def test_commands_without_a_model_stay_light(command, tiny_models, report):
    args = {
        "help": ["--help"],
        "recipe check": ["recipe", "check", *sorted(RECIPES.glob("*.yaml"))],
        "arch list": ["arch", "list"],
        "plan --model": ["plan", "--recipe", RECIPES / "explicit.yaml", "--model", tiny_models["qwen2_vl"].path],
        "plan --calibration": ["plan", "--recipe", RECIPES / "shortgpt.yaml", "--calibration", report],
    }[command]
    code, err, heavy = heavy_imports(*args)
    assert code == 0, err
    assert heavy == [], f"`compressor {command}` imported {heavy}"


def test_plan_from_config_json_agrees_with_transformers(tiny_models, capsys, tmp_path):
    """The light path reads the block count where transformers' config would."""
    from compressor.architectures import adapter_for_config, blocks_of_folder
    from compressor.loading import load_config

    for tiny in tiny_models.values():
        config = load_config(tiny.path)
        assert blocks_of_folder(tiny.path) == (adapter_for_config(config), adapter_for_config(config).num_blocks(config)), tiny.family
    # A config that leaves the count to its class default falls back to transformers.
    folder = tmp_path / "defaults"
    folder.mkdir()
    config = json.loads((tiny_models["llama"].path / "config.json").read_text())
    del config["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(config))
    assert blocks_of_folder(folder) is None
    code, out, err = run_cli(capsys, "plan", "--recipe", RECIPES / "explicit.yaml", "--model", folder)
    assert code == 0, err
    assert "of 32 blocks" in out  # LlamaConfig's default


@pytest.mark.parametrize(
    ("family", "selection"),
    [("gemma3", "--recipe"), ("qwen2_vl", "--plan"), ("llama", "--calibration")],
    ids=["explicit recipe", "saved plan", "recipe + calibration"],
)
def test_out_of_core_prune_stays_light_and_gives_the_in_memory_model(family, selection, tiny_models, report, tmp_path, capsys):
    """`prune --out-of-core --verify none` builds no model: it imports neither torch nor transformers
    (config.json is re-indexed as JSON), and what it writes loads with the logits of the model pruned in memory."""
    import torch

    from compressor.data import build_batch, load_samples
    from compressor.planner import SurgeryPlan
    from compressor.surgery import apply_plan

    tiny = tiny_models[family]
    source, out = tiny.path, tmp_path / "out"
    if selection == "--recipe":
        choice = ["--recipe", RECIPES / "explicit.yaml"]
    elif selection == "--plan":
        code, _, err = run_cli(capsys, "plan", "--recipe", RECIPES / "explicit.yaml", "--model", source, "-o", tmp_path / "plan.json")
        assert code == 0, err
        choice = ["--plan", tmp_path / "plan.json"]
    else:
        choice = ["--recipe", RECIPES / "shortgpt.yaml", "--calibration", report]
    code, err, heavy = heavy_imports("prune", source, *choice, "-o", out, "--out-of-core", "--verify", "none")
    assert code == 0, err
    assert heavy == [], f"`compressor prune {selection} ... --out-of-core --verify none` imported {heavy}"
    assert [c["check"] for c in json.loads((out / "compressor.json").read_text())["verification"]] == ["out-of-core-headers", "none"]

    loaded = tiny.load()
    plan = SurgeryPlan.load(out / "plan.json")
    assert plan.removed_indices
    pruned = apply_plan(loaded.model, plan, loaded.adapter)
    reloaded, info = type(pruned).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    inputs = build_batch(loaded.processor, load_samples(tiny.data)[:2], with_answer=True).inputs
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**inputs).logits, pruned.eval()(**inputs).logits)


def test_default_out_of_core_prune_runs_the_proof(tiny_models, tmp_path):
    """Without --verify, a model that fits in RAM is proved: the original and the pruned checkpoint
    are loaded (torch and transformers imported) and compared, images included; the manifest says so."""
    tiny = tiny_models["gemma3"]
    out = tmp_path / "out"
    code, err, heavy = heavy_imports("prune", tiny.path, "--recipe", RECIPES / "explicit.yaml", "-o", out, "--out-of-core")
    assert code == 0, err
    assert {"torch", "transformers"} <= set(heavy)
    headers, proof = json.loads((out / "compressor.json").read_text())["verification"]
    assert headers["check"] == "out-of-core-headers"
    assert proof["check"] == "skip-equivalence" and proof["max_abs_diff"] == 0.0
    assert proof["samples"] == "2 built-in samples (1 with an image)"  # no data out of core: the fixed ones


def test_every_processor_loads_in_a_fresh_process(tiny_models):
    """Loading a processor must not depend on what an earlier import left behind: on 5.x without
    torchvision, Qwen2-VL's processor check failed in a fresh process ('VIDEO_PROCESSOR_MAPPING'
    has no attribute '_extra_content') while in-process tests, which had imported more, passed."""
    from .conftest import MULTIMODAL, missing_reason

    families = sorted(f for f in MULTIMODAL if missing_reason(f) is None)
    folders = {family: str(tiny_models[family].path) for family in families}
    probe = (
        "import json, sys\nfrom pathlib import Path\n"
        "from compressor.architectures import blocks_of_folder\nfrom compressor.loading import load_processor\n"
        "for family, folder in json.loads(sys.argv[1]).items():\n"
        "    load_processor(Path(folder), blocks_of_folder(Path(folder))[0])\n"
        "    print('LOADED', family)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, json.dumps(folders)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(line.split()[1] for line in done.stdout.splitlines() if line.startswith("LOADED")) == families


def test_image_processors_are_the_pil_ones(tiny_models):
    """The loader asks every transformers for the PIL image processors (`PIL_BACKEND`: ``backend="pil"`` in
    5.x, ``use_fast=False`` in 4.57), torchvision installed or not: the same pixels on every machine."""
    from compressor.architectures import blocks_of_folder
    from compressor.loading import load_processor

    from .conftest import MULTIMODAL, missing_reason

    try:
        from transformers.image_processing_backends import PilBackend  # 5.x

        is_pil = lambda processor: isinstance(processor, PilBackend)  # noqa: E731
    except ImportError:  # 4.x: the slow classes are the PIL ones
        from transformers.image_processing_utils_fast import BaseImageProcessorFast

        is_pil = lambda processor: not isinstance(processor, BaseImageProcessorFast)  # noqa: E731
    for family in sorted(f for f in MULTIMODAL if missing_reason(f) is None):
        path = tiny_models[family].path
        image_processor = load_processor(path, blocks_of_folder(path)[0]).image_processor
        assert is_pil(image_processor), (family, type(image_processor))


def test_a_processor_that_needs_a_missing_package_says_which(tiny_models, monkeypatch):
    """A processor class that cannot be imported (transformers 5.17's Gemma 4 processor needed torchvision
    until compressor served its import) is refused naming the package, not with "save the processor"."""
    from compressor import loading
    from compressor.architectures import blocks_of_folder
    from compressor.errors import InputError

    def needs_torchvision(name):
        raise ModuleNotFoundError(f"Could not import module '{name}'") from ModuleNotFoundError("No module named 'torchvision'")

    monkeypatch.setattr(loading, "find_processor_class", needs_torchvision)
    path = tiny_models["qwen2_vl"].path
    with pytest.raises(InputError) as raised:
        loading.load_processor(path, blocks_of_folder(path)[0])
    message = str(raised.value)
    assert "Could not import module 'Qwen2VLProcessor'" in message and "No module named 'torchvision'" in message
    assert "install the package it names, or a transformers release" in message and "save_pretrained" not in message
