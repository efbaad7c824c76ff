"""Data-parallel and sharded healing: `torchrun --nproc-per-node 2 -m compressor heal` on two CPU processes
(gloo) against one plain process with the same global batch.

Each test states a property a broken implementation fails:
- 2 processes × batch 2 write the weights of 1 process × batch 2 × grad-accum 2 bit for bit (the
  same micro-batches, each process's gradient summed with the other's: a + b is exact in any
  order for two addends), and those of 1 process × batch 4 within float tolerance (a batch of 4
  pads and reduces differently); without the gradient all-reduce the ranks diverge and neither
  holds;
- a failure on rank 1 mid-run makes both processes exit non-zero, with no output and no staging
  folder; the same command then resumes from rank 0's checkpoint and ends on the uninterrupted
  run's weights; one process refuses that checkpoint, naming the process count;
- sharded (--fsdp, each process half of every parameter of both models): the same bit-for-bit
  equality with clipping off (distill; lora with gradient checkpointing), float rounding with it;
  a failure mid-step stops both (the launcher ends the one waiting in FSDP's collectives) and the
  resume checkpoint holds whole tensors from which the same command resumes exactly.

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


# Sharded runs are compared with clipping off: FSDP adds up each gradient's norm from its shards,
# another order than one process's whole-tensor norm, so a clipped step may differ in the last bit.
NO_CLIP = ["--max-grad-norm", "0"]


@pytest.mark.parametrize("method", ["distill", "lora"])
def test_sharded_processes_write_the_weights_of_one_with_the_same_global_batch(made, tmp_path, capsys, one_thread, method):
    """--fsdp: each process holds half of every parameter of both models; the weights written are
    those of one process over the same micro-batches, bit for bit (lora with gradient
    checkpointing: recomputed blocks gather their shards again in the backward pass)."""
    extra = ["--method", method, *NO_CLIP] + (["--gradient-checkpointing"] if method == "lora" else [])
    done = torchrun(*_heal_args(made, tmp_path / "sharded", "--batch-size", "2", "--fsdp", *extra))
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("wrote ") == 1 and "trained by 2 sharded (FSDP) processes" in done.stdout
    assert run_cli(capsys, *_heal_args(made, tmp_path / "accum", "--batch-size", "2", "--grad-accum", "2", *extra))[0] == 0

    sharded, accum = _manifest(tmp_path / "sharded")["healing"], _manifest(tmp_path / "accum")["healing"]
    assert sharded["processes"] == 2 and sharded["sharded"] is True and accum["sharded"] is False
    assert sharded["tokens"] == accum["tokens"] and sharded["curve"]["loss"] == accum["curve"]["loss"]
    assert sharded["held_out_kl"] == accum["held_out_kl"]
    assert max_weight_difference(tmp_path / "sharded", tmp_path / "accum") == 0.0
    assert max_weight_difference(tmp_path / "sharded", made["pruned"]) > 10 * BATCH_TOLERANCE  # it trained


def test_sharded_gradient_clipping_agrees_with_one_process_to_float_rounding(made, tmp_path, capsys, one_thread):
    """With clipping on (the default), the shards' norms add up in another order: the weights agree
    to float rounding (measured 3.5e-8), far below what the steps moved them (3e-4)."""
    done = torchrun(*_heal_args(made, tmp_path / "sharded", "--batch-size", "2", "--fsdp"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert run_cli(capsys, *_heal_args(made, tmp_path / "accum", "--batch-size", "2", "--grad-accum", "2"))[0] == 0
    rounding = max_weight_difference(tmp_path / "sharded", tmp_path / "accum")
    assert rounding <= BATCH_TOLERANCE < max_weight_difference(tmp_path / "sharded", made["pruned"]) / 10


def test_a_sharded_run_stops_on_a_failure_and_resumes_from_its_whole_checkpoint(made, tmp_path, capsys, one_thread):
    """Rank 1 fails in step 3 of a sharded run: rank 0 is waiting inside FSDP's collectives, the
    launcher stops it, nothing is written but the step-2 checkpoint — whole tensors, trained
    parameters and optimizer state alike; the same command resumes from it (each process cutting
    its shards again) and writes the uninterrupted sharded run's weights."""
    args = _heal_args(made, tmp_path / "out", "--batch-size", "2", "--checkpoint-every", "1", "--fsdp", *NO_CLIP)
    failed = torchrun(*args, fail="1:3")
    assert failed.returncode != 0 and "injected failure" in failed.stderr, failed.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.heal-resume"]
    checkpoint = torch.load(tmp_path / ".out.heal-resume" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2 and checkpoint["world_size"] == 2
    whole = load_file(made["pruned"] / "model.safetensors")
    shapes = {tuple(t.shape) for t in whole.values()}
    assert all(tuple(t.shape) in shapes for t in checkpoint["trained"].values())  # whole parameters, not shards
    moments = [v for entry in checkpoint["optimizer"]["state"].values() for k, v in entry.items() if k == "exp_avg"]
    assert moments and all(tuple(m.shape) in shapes for m in moments)

    resumed = torchrun(*args)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed at step 2" in resumed.stdout
    uninterrupted = torchrun(*_heal_args(made, tmp_path / "whole", "--batch-size", "2", "--fsdp", *NO_CLIP))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-4000:]
    assert max_weight_difference(tmp_path / "out", tmp_path / "whole") == 0.0


def test_fsdp_refusals_name_what_to_do(made, tmp_path, capsys):
    """One process has nothing to shard over; the projector and float16 cannot be sharded safely."""
    code, _, err = run_cli(capsys, *_heal_args(made, tmp_path / "out", "--fsdp"))
    assert code == 2 and "--fsdp" in err and "one process" in err and "torchrun --nproc-per-node" in err
    code, _, err = run_cli(capsys, *_heal_args(made, tmp_path / "out", "--fsdp", "--dtype", "float16"))
    assert code == 2 and "--fsdp with --dtype float16" in err and "bfloat16" in err
    code, _, err = run_cli(capsys, *_heal_args(made, tmp_path / "out", "--fsdp", "--method", "projector"))
    assert code == 2 and "--fsdp with --method projector" in err
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
