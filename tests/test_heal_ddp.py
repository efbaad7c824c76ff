"""Data-parallel healing: `torchrun --nproc-per-node 2 -m compressor heal` on two CPU processes
(gloo) against one plain process with the same global batch.

Each test states a property a broken implementation fails:
- 2 processes × batch 2 write the weights of 1 process × batch 2 × grad-accum 2 bit for bit (the
  same micro-batches, each process's gradient summed with the other's: a + b is exact in any
  order for two addends), and those of 1 process × batch 4 within float tolerance (a batch of 4
  pads and reduces differently); without the gradient all-reduce the ranks diverge and neither
  holds;
- a failure on rank 1 mid-run makes both processes exit non-zero, with no output and no staging
  folder; the same command then resumes from rank 0's checkpoint and ends on the uninterrupted
  run's weights; one process refuses that checkpoint, naming the process count.

The worker entry is this module (`python -m tests.test_heal_ddp`): it can inject a failure into
one rank before it hands over to the CLI, which the real entry point cannot.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
REMOVED = [2, 3]  # of 6: kept 0 1 4 5
# A step's samples: 2 processes × 2, or one process × 2 × 2 micro-batches, or one × 4.
COMMON = ["--steps", "3", "--lr", "1e-3", "--patience", "0", "--eval-every", "1", "--held-out", "0.25", "--device", "cpu"]
# 1 process × batch 4 pads and sums in another order than 2 × 2: float32 rounding, amplified a
# little by Adam's normalised steps (measured: see the test), far below a step's own change.
BATCH_TOLERANCE = 2e-6


@pytest.fixture(scope="module")
def made(tiny_models, tmp_path_factory):
    """The tiny Llama pruned (blocks 2, 3 removed) and 16 text samples: 12 train, 4 held out."""
    from compressor.pipeline import prune
    from compressor.recipe import load_recipe

    from .conftest import write_data

    root = tmp_path_factory.mktemp("heal-ddp")
    recipe = root / "explicit.yaml"
    recipe.write_text(f"version: 1\nname: heal-ddp\nselect: {{op: explicit, blocks: {REMOVED}}}\n")
    pruned = root / "pruned"
    prune(str(tiny_models["llama"].path), pruned, recipe_file=load_recipe(recipe))
    return {"pruned": pruned, "teacher": tiny_models["llama"].path, "data": write_data(root / "train", images=False, n=16)}


@pytest.fixture
def one_thread():
    """The torchrun workers run on one thread each: so does the reference run here (a CPU matmul's
    summation order may depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _heal_args(made, out: Path, *extra: str) -> list[str]:
    return ["heal", str(made["pruned"]), "--teacher", str(made["teacher"]), "--data", str(made["data"]), "-o", str(out), *COMMON, *extra]


def torchrun(*args: str, fail: str | None = None) -> subprocess.CompletedProcess:
    """Two CPU processes under torchrun running this module's worker entry (the CLI)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "HEAL_TEST_FAIL"):
        env.pop(name, None)
    if fail:
        env["HEAL_TEST_FAIL"] = fail
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "tests.test_heal_ddp",
        "-q",
        *args,
    ]
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


def max_weight_difference(a: Path, b: Path) -> float:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    return max(float((first[k].float() - second[k].float()).abs().max()) for k in first)


def _manifest(path: Path) -> dict:
    import json

    return json.loads((path / "compressor.json").read_text())


@pytest.mark.parametrize("method", ["distill", "lora"])
def test_two_processes_write_the_weights_of_one_with_the_same_global_batch(made, tmp_path, capsys, one_thread, method):
    """distill: every kept block; lora (peft) with gradient checkpointing: adapters, merged."""
    extra = ["--method", method] + (["--gradient-checkpointing"] if method == "lora" else [])
    done = torchrun(*_heal_args(made, tmp_path / "two", "--batch-size", "2", *extra))
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("wrote ") == 1 and "trained by 2 data-parallel processes" in done.stdout  # rank 0 alone reports
    assert run_cli(capsys, *_heal_args(made, tmp_path / "accum", "--batch-size", "2", "--grad-accum", "2", *extra))[0] == 0
    assert run_cli(capsys, *_heal_args(made, tmp_path / "four", "--batch-size", "4", *extra))[0] == 0

    two, accum = _manifest(tmp_path / "two")["healing"], _manifest(tmp_path / "accum")["healing"]
    assert two["processes"] == 2 and accum["processes"] == 1
    assert two["tokens"] == accum["tokens"] and two["curve"]["loss"] == accum["curve"]["loss"]
    assert two["held_out_kl"] == accum["held_out_kl"]  # sharded over the ranks, summed in batch order
    # The same micro-batches, the two gradients added: bit for bit.
    assert max_weight_difference(tmp_path / "two", tmp_path / "accum") == 0.0
    moved, batch_of_four = (
        max_weight_difference(tmp_path / "two", made["pruned"]),
        max_weight_difference(tmp_path / "two", tmp_path / "four"),
    )
    print(f"{method}: max |Δw| vs the pruned weights {moved:.3g}; vs 1 process × batch 4 {batch_of_four:.3g}")
    assert moved > 10 * BATCH_TOLERANCE  # it trained: the comparison below is not of untouched weights
    assert batch_of_four <= BATCH_TOLERANCE, (moved, batch_of_four)


def test_a_failure_on_one_rank_stops_both_and_the_same_command_resumes(made, tmp_path, capsys, one_thread):
    """Rank 1 fails in step 3: both exit non-zero, nothing is written but rank 0's checkpoint of
    step 2; one process refuses that checkpoint; the same torchrun command then resumes from it
    and writes the uninterrupted run's weights."""
    args = _heal_args(made, tmp_path / "out", "--batch-size", "2", "--checkpoint-every", "1")
    failed = torchrun(*args, fail="1:3")
    assert failed.returncode != 0
    assert "injected failure" in failed.stderr and "Process 1 of 2 failed in step 3" in failed.stderr, failed.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.heal-resume"]  # no output, no staging, no lock left
    checkpoint = torch.load(tmp_path / ".out.heal-resume" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2 and checkpoint["world_size"] == 2

    code, _, err = run_cli(capsys, *args)  # one process: the samples of a step would differ
    assert code == 2 and "written by 2 process(es); this run has 1" in err and "--nproc-per-node 2" in err
    assert not (tmp_path / "out").exists()

    resumed = torchrun(*args)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed at step 2" in resumed.stdout
    whole = torchrun(*_heal_args(made, tmp_path / "whole", "--batch-size", "2"))
    assert whole.returncode == 0, whole.stderr[-4000:]
    assert max_weight_difference(tmp_path / "out", tmp_path / "whole") == 0.0
    assert not (tmp_path / ".out.heal-resume").exists()


def test_each_process_takes_its_slice_of_the_global_sample_stream():
    """2 processes × batch 2 walk the positions of 1 process × batch 4 (or × batch 2, 2 micro-batches)."""
    from compressor.distributed import Group
    from compressor.heal.parallel import samples_of

    two = [list(samples_of(Group(rank=rank, world_size=2), micro, 2)) for micro in range(3) for rank in range(2)]
    assert two == [list(samples_of(Group(), micro, 2)) for micro in range(6)]
    assert sum(two, []) == sum((list(samples_of(Group(), micro, 4)) for micro in range(3)), [])


def test_fsdp_is_refused_with_what_to_do_instead(made, tmp_path, capsys):
    code, _, err = run_cli(capsys, *_heal_args(made, tmp_path / "out", "--fsdp"))
    assert code == 2 and "--fsdp" in err and "not built" in err and "--gradient-checkpointing" in err
    assert not (tmp_path / "out").exists()


def _worker() -> int:
    """The torchrun worker: the CLI, with ``HEAL_TEST_FAIL=RANK:STEP`` failing that rank's loss
    computation in that step (a stand-in for any error one process alone meets)."""
    from compressor import cli

    fail = os.environ.get("HEAL_TEST_FAIL")
    if fail:
        rank, step = (int(part) for part in fail.split(":"))
        if int(os.environ.get("RANK", "0")) == rank:
            import compressor.heal.loop as loop

            step_of, terms_of = loop._step, loop.terms

            def failing_terms(*args, **kwargs):
                raise RuntimeError(f"injected failure on rank {rank} in step {step}")

            def step_that_fails(context, options, state, weights):
                # The loss of that step fails, inside the step: where a real error (out of memory) would.
                loop.terms = failing_terms if state.step + 1 == step else terms_of
                return step_of(context, options, state, weights)

            loop._step = step_that_fails
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(_worker())
