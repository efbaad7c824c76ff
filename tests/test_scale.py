"""Scaling calibration: token-budget batching, accelerate device maps (with disk offload), and
data-parallel calibration in two CPU processes under torchrun (gloo) — all with the same
figures as one plain process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.calibrate import CalibrationOptions, calibrate
from compressor.data import load_samples, plan_batches, sample_length
from compressor.distributed import Group, from_environment
from compressor.errors import InputError
from compressor.loading import Placement

from .conftest import run_cli

RECIPES = Path(__file__).parent.parent / "recipes"
ROOT = Path(__file__).resolve().parents[1]


def assert_same_metrics(a: dict, b: dict, tol: float = 1e-5, path: str = "") -> None:
    """Every number in two metric trees equal within ``tol`` (None where the other is None)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_same_metrics(a[key], b[key], tol, f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_metrics(x, y, tol, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None and abs(a - b) <= tol * max(1.0, abs(a)), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a} vs {b}"


# -- token-budget batching ------------------------------------------------------------------
def test_token_budget_packs_sorted_batches_within_the_budget(tiny_models):
    tiny = tiny_models["llama"]
    processor = tiny.load().processor
    samples = load_samples(tiny.data) * 5  # 30 samples of 4 lengths
    lengths = {id(s): sample_length(processor, s) for s in samples}
    batches = plan_batches(processor, samples, batch_size=6, token_budget=60)
    assert sorted(id(s) for b in batches for s in b) == sorted(id(s) for s in samples)  # each exactly once
    widths = [max(lengths[id(s)] for s in b) for b in batches]
    assert all(len(b) <= 6 and (len(b) * w <= 60 or len(b) == 1) for b, w in zip(batches, widths))
    assert widths == sorted(widths, reverse=True)  # longest first: rows of a batch have similar lengths
    padded = sum(len(b) * w for b, w in zip(batches, widths))
    fixed = plan_batches(processor, samples, batch_size=6)
    assert [len(b) for b in fixed] == [6] * 5
    assert padded <= sum(len(b) * max(lengths[id(s)] for s in b) for b in fixed)  # never more padding than file order


def test_token_budget_gives_the_same_figures(tiny_models):
    tiny = tiny_models["llava"]
    loaded = tiny.load()
    samples = load_samples(tiny.data)
    reports = [
        calibrate(loaded.model, loaded.processor, loaded.adapter, samples, options=CalibrationOptions(batch_size=b, token_budget=t))
        for b, t in ((2, None), (8, 100))
    ]
    assert_same_metrics(reports[0].metrics, reports[1].metrics)
    assert reports[0].data["tokens"] == reports[1].data["tokens"]


# -- device maps ----------------------------------------------------------------------------
def test_device_map_with_disk_offload_gives_the_same_figures(tiny_models, tmp_path, capsys):
    tiny = tiny_models["llava"]
    plain, spread = tmp_path / "plain.json", tmp_path / "spread.json"
    base = ["calibrate", tiny.path, "--data", tiny.data, "--batch-size", "3", "--device", "cpu"]
    assert run_cli(capsys, *base, "-o", plain)[0] == 0
    # A CPU budget smaller than the model: accelerate offloads the later blocks to disk and
    # streams their weights in through its own hooks, beside compressor's.
    offload = ["--device-map", "auto", "--max-memory", "cpu=150KB", "--offload-folder", tmp_path / "offload"]
    code, _, err = run_cli(capsys, *base, *offload, "-o", spread)
    assert code == 0, err
    a, b = json.loads(plain.read_text()), json.loads(spread.read_text())
    assert "meta" in b["model"]["devices"] and "meta" not in a["model"]["devices"]  # offloaded for real
    assert_same_metrics(a["metrics"], b["metrics"])


def test_prune_with_a_device_map_writes_out_of_core(tiny_models, tmp_path, capsys):
    tiny = tiny_models["llama"]
    common = ["prune", tiny.path, "--recipe", RECIPES / "shortgpt.yaml", "--data", tiny.data, "--device", "cpu"]
    assert run_cli(capsys, *common, "-o", tmp_path / "memory")[0] == 0
    code, out, err = run_cli(capsys, *common, "--device-map", "sequential", "-o", tmp_path / "spread")
    assert code == 0, err
    assert "out of core" in out
    manifest = json.loads((tmp_path / "spread" / "compressor.json").read_text())
    # Written out of core, then proved: the original and the pruned checkpoint loaded from their folders.
    assert [c["check"] for c in manifest["verification"]] == ["out-of-core-headers", "skip-equivalence"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "memory" / "model.safetensors"), load_file(tmp_path / "spread" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_placement_errors():
    with pytest.raises(InputError, match="--max-memory item 'gpu0:7GB' is not DEVICE=SIZE"):
        Placement.parse("auto", "gpu0:7GB")
    with pytest.raises(InputError, match="add --device-map auto"):
        Placement.parse(None, "cpu=1GiB")
    assert Placement.parse("auto", "0=70GiB, cpu=200GiB").max_memory == {0: "70GiB", "cpu": "200GiB"}


# -- data-parallel --------------------------------------------------------------------------
def test_group_from_launcher_variables():
    group = from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert group.distributed and not group.is_main and group.shard(list(range(10))) == [3, 7]
    assert group.gpus(8) == [4, 5, 6, 7] and group.device("auto") in ("cuda:1", "cpu")
    assert from_environment({}) == Group() and Group().gpus(2) == [0, 1]
    with pytest.raises(InputError, match="needs at least one each"):
        Group(rank=2, world_size=4, local_rank=2, local_world_size=4).gpus(2)


def test_prune_and_run_refuse_a_launcher(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(capsys, "prune", tiny_models["llama"].path, "--recipe", RECIPES / "explicit.yaml", "-o", tmp_path / "p")
    assert code == 2 and "runs in one process" in err and "--calibration calibration.json" in err
    assert not (tmp_path / "p").exists()


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    # --standalone: a rendezvous on a free local port, as on one machine.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "compressor", *args]
    # A session of its own: on a timeout the launcher and both workers are killed, not orphaned.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in 300 s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_two_processes_give_the_figures_of_one(tiny_models, tmp_path, capsys):
    """torchrun, 2 CPU processes (gloo): each calibrates half of the samples, the partial sums
    are all-reduced, rank 0 writes; cheap and functional metrics equal one process's."""
    tiny = tiny_models["llava"]
    args = ["calibrate", str(tiny.path), "--data", str(tiny.data), "--batch-size", "2", "--device", "cpu"]
    functional = ["--ablation", "--greedy", "2", "--attention"]
    assert run_cli(capsys, *args, *functional, "-o", tmp_path / "one.json")[0] == 0
    done = torchrun("-q", *args, *functional, "-o", str(tmp_path / "two.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("calibrated ") == 1 and "by 2 processes" in done.stdout  # rank 0 alone reports
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert two["environment"]["processes"] == "2" and two["data"] == one["data"]
    assert_same_metrics(one["metrics"], two["metrics"])
    assert two["metrics"]["greedy"]["order"] == one["metrics"]["greedy"]["order"]


def test_validate_with_a_device_map_gives_the_same_accuracy(tiny_models, tmp_path, capsys):
    tiny = tiny_models["llava"]
    pruned = tmp_path / "pruned"
    assert run_cli(capsys, "prune", tiny.path, "--recipe", RECIPES / "explicit.yaml", "-o", pruned)[0] == 0
    base = ["validate", "--base", tiny.path, "--pruned", pruned, "--data", tiny.data, "--device", "cpu"]
    fast = ["--prompt-length", "12", "--new-tokens", "3", "--repeats", "2"]
    assert run_cli(capsys, *base, "--no-latency", "-o", tmp_path / "plain")[0] == 0
    offload = ["--device-map", "auto", "--max-memory", "cpu=150KB", "--offload-folder", tmp_path / "offload"]
    code, _, err = run_cli(capsys, *base, *offload, *fast, "-o", tmp_path / "spread")
    assert code == 0, err
    a, b = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("plain", "spread"))
    assert_same_metrics(a["accuracy"], b["accuracy"])
    assert b["latency"]["pruned"]["prefill"] and b["environment"]["device"] == "cpu"


def test_a_device_and_a_device_map_conflict(tiny_models, tmp_path, capsys):
    tiny = tiny_models["llama"]
    code, _, err = run_cli(
        capsys, "calibrate", tiny.path, "--data", tiny.data, "--device", "cuda:1", "--device-map", "auto", "-o", tmp_path / "c.json"
    )
    assert code == 2 and "--device cuda:1 and --device-map both say where the model goes" in err and "Traceback" not in err
    assert not (tmp_path / "c.json").exists()
