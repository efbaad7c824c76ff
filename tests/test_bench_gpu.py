"""`make bench-gpu` in its CPU smoke mode: every row of the table is computed, failures and the
time budget turn into rows instead of ending the run, and the bench imports nothing that the GPU
machine's image lacks beyond the wheels it names."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor import bench_gpu

ROOT = Path(__file__).resolve().parents[1]

# The GPU image's Python packages as the device notes list them (KINDS.md, read on 2026-11-17).
GPU_IMAGE = set(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
    cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
    formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
    imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
    lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
    matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
    networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless
    optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
    portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
    scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
    tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
    transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
    wrapt xarray xxhash yarl zipp""".split()
)
# The same packages under the names this machine's venv installs them by.
ALIASES = {"onnxruntime-gpu": "onnxruntime"}

# Runs the smoke bench in a fresh interpreter, then lists the distributions whose modules it loaded.
SMOKE = """
import importlib.metadata, json, re, sys
from compressor.bench_gpu import main
main(["--smoke", "--json", sys.argv[1]])
owners = importlib.metadata.packages_distributions()
tops = {name.split(".")[0] for name in list(sys.modules)} - set(sys.stdlib_module_names) - {"compressor", "__main__"}
print("DISTRIBUTIONS " + json.dumps(sorted({re.sub(r"[-_.]+", "-", d).lower() for t in tops for d in owners.get(t, [])})))
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu") / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SMOKE, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("DISTRIBUTIONS ")]
    return json.loads(out.read_text()), done.stdout, json.loads(line.removeprefix("DISTRIBUTIONS "))


def _rows(result, section):
    return [r for r in result["rows"] if r["section"] == section]


def test_smoke_prints_one_table_with_every_section(smoke):
    result, stdout, _ = smoke
    assert result["settings"] == "smoke"
    table = stdout[stdout.index("compressor bench-gpu (smoke)") :]
    for section in ("model", "calibration", "latency", "memory", "onnx"):
        assert re.search(rf"^{section}\s", table, re.M), f"no {section} row in:\n{table}"
    assert not [r for r in result["rows"] if r["status"] in ("failed", "skipped")], result["rows"]


def test_calibration_ratio_is_measured(smoke):
    result, _, _ = smoke
    cost = result["figures"]["calibration"]
    assert cost["plain"] > 0 and cost["calibration"] > 0 and cost["tokens"] > 0
    (row,) = _rows(result, "calibration")
    assert row["value"] == f"{cost['ratio']:.3f}x"


def test_speedups_sit_beside_the_amdahl_bound_of_the_measured_block_shares(smoke):
    result, _, _ = smoke
    latency = result["figures"]["latency"]
    base, pruned, comparison = latency["base"], latency["pruned"], latency["comparison"]
    removed = comparison["removed"]
    assert len(removed) == base["model"]["num_blocks"] // 4 == base["model"]["num_blocks"] - pruned["model"]["num_blocks"]
    assert pruned["model"]["params"] < base["model"]["params"]
    for phase in ("prefill", "decode"):
        assert comparison[phase], phase
        for key, row in comparison[phase].items():
            shares = base[phase][key]["block_shares"]
            assert 0 < sum(shares) <= 1 + 1e-9
            # The bound follows from the shares the base run measured, not from a typed-in quarter.
            assert row["ideal_speedup"] == pytest.approx(1 / (1 - sum(shares[i] for i in removed)))
            assert row["speedup"] > 0
    values = [r["value"] for r in _rows(result, "latency")]
    assert len(values) == len(comparison["prefill"]) + len(comparison["decode"])
    assert all(re.fullmatch(r"\d+\.\d{3}x vs ideal \d+\.\d{3}x", v) for v in values), values
    memory = _rows(result, "memory")
    assert len(memory) == len(values)
    assert all(base[p][k]["peak_memory"]["peak_bytes"] > 0 for p in ("prefill", "decode") for k in comparison[p])


def test_onnx_parity_is_measured_and_an_absent_cuda_provider_says_why(smoke):
    result, _, _ = smoke
    providers = result["figures"]["onnx"]["providers"]
    cpu = providers["CPUExecutionProvider"]
    assert cpu["passed"] and 0 <= cpu["max_abs_diff"] <= 1e-4
    assert {c["case"] for c in cpu["checks"]} == {"prefill", "decode-1", "decode-2"}
    (cuda_row,) = [r for r in _rows(result, "onnx") if "CUDA" in r["measure"]]
    if not torch.cuda.is_available():
        assert cuda_row["status"] == "unavailable" and cuda_row["value"] == "unavailable"
        assert "onnxruntime" in cuda_row["detail"]  # the reason names what is missing
        assert providers["CUDAExecutionProvider"] == {"unavailable": cuda_row["detail"]}  # and no parity figure


def _with_requirements(names: set[str]) -> set[str]:
    """``names`` and everything they require as installed here (extras left out)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_norm(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requires if "extra ==" not in r]
    return seen


def test_the_bench_needs_nothing_beyond_the_gpu_image_and_its_wheels(smoke):
    _, _, distributions = smoke
    # This venv's huggingface-hub (2.x) loads httpx2, httpcore2 and truststore where the image's
    # 1.33 loads httpx: what the hub requires here is the image's hub's business, not ours.
    image = GPU_IMAGE | _with_requirements({"huggingface-hub"})
    carried = {_norm(w.split("==")[0]) for w in bench_gpu.WHEELS}
    missing = {d for d in distributions if ALIASES.get(d, d) not in image | carried}
    assert not missing, f"the GPU image lacks {sorted(missing)}: add them to WHEELS or drop the import"
    # The one the image lacks, which is why WHEELS exists.
    assert "pydantic" in distributions and "pydantic" not in image


def test_a_failing_section_becomes_a_row_and_the_rest_still_run(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("calibration broke")

    monkeypatch.setattr(bench_gpu, "calibration_section", broken)
    monkeypatch.setattr(bench_gpu, "onnx_section", lambda bench, settings: None)  # not under test here: saves time
    result = bench_gpu.main(["--smoke"])
    (failed,) = _rows(result, "calibration")
    assert failed["status"] == "failed" and failed["detail"] == "RuntimeError: calibration broke"
    assert [r["status"] for r in _rows(result, "latency")] and all(r["status"] == "ok" for r in _rows(result, "latency"))
    assert "calibration broke" in capsys.readouterr().out


def test_sections_are_skipped_with_a_message_when_the_budget_runs_out():
    result = bench_gpu.main(["--smoke", "--budget", "0"])
    rows = result["rows"]
    assert {r["section"] for r in rows} == {"model", "calibration", "latency", "onnx"}
    assert all(r["status"] == "skipped" for r in rows)
    assert "budget" in next(r for r in rows if r["section"] == "model")["detail"]
    assert "calibration" not in result["figures"] and "latency" not in result["figures"]
