"""The healing training loop: deterministic, resumable, and honest about memory.

Each optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` samples. Which samples
is a pure function of the seed and the step (a seeded permutation per pass over the data), so a
resumed run needs no data-loader state. Gradients of a step are the mean over all its scored
rows (`losses.Terms`). AdamW with linear warm-up, then a constant rate (a token budget leaves
the run's length unknown up front, so there is no decay to schedule), gradient clipping, and
autocast (bf16/fp16) when the compute dtype is not float32 (fp16 with a gradient scaler).

Every ``eval_every`` steps the mean KL(teacher || student) on the held-out samples is measured;
after ``patience`` measurements without improvement training stops, and the best trained
weights seen are the ones kept. Every ``checkpoint_every`` steps (and after the last) the state
— trained parameters, optimizer, schedule, scaler, RNGs, the curve so far — is written
atomically into the resume folder; a run with the same key resumes from it and ends with the
same weights, bit for bit, as an uninterrupted run (same device and thread count).
An out-of-memory error becomes a `TrainingMemoryError` naming the options that reduce memory.
Data-parallel (`parallel`) and sharded (`sharding`) runs share this loop; where a sharded run
differs (collectives in every forward pass, gradients FSDP reduces, whole tensors gathered for
checkpoints) `Context.sharded` says so.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures import Adapter
from ..data import Batch, Sample, build_batch
from ..distributed import Group
from ..errors import CompressorError, InputError
from .losses import Weights, mean_kl, scored, terms
from .methods import Trainable
from .options import HealOptions
from .parallel import Team, samples_of
from .sharding import gradient_scale, load_optimizer_state, whole_optimizer_state

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


class TrainingMemoryError(CompressorError):
    """Training ran out of accelerator (or host) memory: the user's to fix with the options named."""


@dataclass
class Curve:
    """What the run looked like: the loss per step and the held-out KL per measurement."""

    loss: list[float] = field(default_factory=list)  # the step's total loss (mean per scored row)
    kl: list[float] = field(default_factory=list)  # the step's training KL (mean per scored row)
    held_out: list[tuple[int, float]] = field(default_factory=list)  # (step, mean KL); step 0 = before healing
    tokens: list[int] = field(default_factory=list)  # real tokens trained on after each step, cumulative


@dataclass
class Outcome:
    steps: int
    tokens: int
    seconds: float
    curve: Curve
    kl_before: float | None
    kl_after: float | None
    stopped_early: bool
    best_step: int | None  # the step whose weights were kept, when the held-out KL chose
    resumed_from: int  # 0 for a fresh run
    # Sharded runs: the trained parameters to write, whole (`Trainable.state` layout), on rank 0
    # only; the sharded model itself is not what gets exported. None otherwise (the model has them).
    weights: dict[str, torch.Tensor] | None = None


@dataclass
class Context:
    """What a step runs: the models, the data, how."""

    student: nn.Module
    teacher: nn.Module
    adapter: Adapter
    processor: Any
    kept: Sequence[int]
    trainable: Trainable
    train: list[Sample]
    held_out: list[Sample]
    text_format: str
    device: torch.device
    compute_dtype: torch.dtype
    max_length: int | None = None
    team: Team = field(default_factory=Team)  # the processes of a data-parallel run (one by default)

    @property
    def sharded(self) -> bool:
        """FSDP healing (`sharding`): every forward pass is a collective of all the processes."""
        return self.trainable.sharded

    def autocast(self) -> Any:
        """Mixed precision when computing below float32: frozen weights sit in the compute dtype and
        trained ones in float32, and autocast runs each matmul in the compute dtype."""
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)


def train(
    context: Context,
    options: HealOptions,
    *,
    key: str,
    resume_dir: Path | None,
    resume: bool = True,
    progress: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> Outcome:
    """Train ``context.trainable`` (in place); returns the run's figures."""
    weights = Weights(options.hidden_loss, options.hidden_weight, options.ce_weight)
    size = options.batch_size
    held_batches = [_build(context, context.held_out[i : i + size]) for i in range(0, len(context.held_out), size)]
    checkpoint = resume_dir / CHECKPOINT_FILE if resume_dir is not None else None
    state = _State.fresh(context, options)
    team = context.team
    if checkpoint is not None and resume:
        with team.together("while reading the resume checkpoint"):
            state.restore(checkpoint, context, key, options, world_size=team.group.world_size)
        _same_start(team, state, checkpoint)
    if not context.sharded:  # shards come from the same files and seed on every process
        team.broadcast_parameters(context.trainable.parameters)
    if state.step == 0 and held_batches and not state.curve.held_out:
        # The untrained student is the first candidate: if no step beats it, its weights are kept.
        state.curve.held_out.append((0, _held_kl(context, held_batches)))
        state.best_kl, state.best_step, state.best_state = state.curve.held_out[0][1], 0, _best_copy(context)
    resumed_from = state.step
    limit, budget = options.max_steps, options.token_budget
    total, unit = (limit, "step") if limit is not None else (budget, "tok")
    started = time.perf_counter() - state.seconds
    window_tokens, window_start = 0, time.perf_counter()
    context.student.train()
    try:
        initial = state.step if limit else min(state.tokens, budget or 0)
        with tqdm(total=total, initial=initial, unit=unit, desc="healing", disable=not progress) as bar:
            while not state.done(limit, budget):
                tokens = _step(context, options, state, weights)
                state.step += 1
                state.tokens += tokens
                state.curve.tokens.append(state.tokens)
                state.seconds = time.perf_counter() - started
                if held_batches and (state.step % options.evaluation_interval() == 0 or state.done(limit, budget)):
                    state.measure(context, held_batches, options)
                if checkpoint is not None and (state.step % options.checkpoint_every == 0 or state.done(limit, budget)):
                    with team.together("while writing the resume checkpoint"):  # rank 0 writes; the others wait for it
                        if team.is_main or context.sharded:  # sharded, gathering the record takes every process
                            record = state.record(context, key, world_size=team.group.world_size)
                        if team.is_main:
                            state.write(checkpoint, record)
                    state.saved_step = state.step
                window_tokens += tokens
                rate = window_tokens / max(1e-9, time.perf_counter() - window_start)
                bar.update(1 if limit else min(tokens, max(0, budget - bar.n)))
                bar.set_postfix(loss=f"{state.curve.loss[-1]:.4f}", tok_s=f"{rate:,.0f}")
                if on_step is not None:
                    on_step(state.step)
    except KeyboardInterrupt:
        if checkpoint is not None and checkpoint.is_file():
            log.warning(
                "healing interrupted at step %d; the checkpoint of step %d is kept: run the same command again to resume",
                state.step,
                state.saved_step,
            )
        raise
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not isinstance(error, torch.OutOfMemoryError) and "out of memory" not in str(error):
            raise
        _free_memory()
        kept = f" The checkpoint of step {state.saved_step} is kept: the same command resumes from it." if state.saved_step else ""
        raise TrainingMemoryError(
            f"Healing ran out of memory at step {state.step + 1} on {context.device} ({str(error).splitlines()[0][:200]}).{kept}",
            fix=f"pass --gradient-checkpointing, or a smaller --batch-size (now {options.batch_size}; raise --grad-accum to keep "
            f"the tokens per step), or a shorter --max-length (now {options.max_length}).",
        ) from None
    finally:
        context.student.eval()
    stopped_early = state.stopped
    best_step = None
    weights = None
    chosen = bool(held_batches) and state.best_step != state.step  # the best held-out KL seen, not the last
    if context.sharded:  # the weights to write, whole, for rank 0 (`Outcome.weights`)
        whole = state.best_state if chosen else context.trainable.state()  # the latter: every process gathers
        weights = whole if team.is_main else None
    elif chosen and state.best_state is not None:
        context.trainable.load(state.best_state)
    if held_batches:
        best_step = state.best_step
        if best_step == 0:
            log.warning("no step lowered the held-out KL to the teacher: the written weights are the pruned model's own")
    return Outcome(
        steps=state.step,
        tokens=state.tokens,
        seconds=round(state.seconds, 2),
        curve=state.curve,
        kl_before=state.curve.held_out[0][1] if state.curve.held_out else None,
        kl_after=state.best_kl if held_batches else None,
        stopped_early=stopped_early,
        best_step=best_step,
        resumed_from=resumed_from,
        weights=weights,
    )


def _step(context: Context, options: HealOptions, state: _State, weights: Weights) -> int:
    """One optimizer step over ``grad_accum`` micro-batches; returns the real tokens it ran on."""
    team = context.team
    first = state.step * options.grad_accum
    micros = range(first, first + options.grad_accum)
    with team.together(f"while preparing step {state.step + 1}"):
        batches = [_build(context, _samples(context.train, options, micro, team)).to(context.device) for micro in micros]
        local_rows = sum(len(scored(batch, context.adapter, context.student)[0]) for batch in batches)
    # Every process divides by the rows of the whole step (all processes'): the summed gradients
    # are then the gradient of the step's mean, as in one process.
    step_rows = int(team.sum([local_rows])[0]) if team.distributed else local_rows
    state.optimizer.zero_grad(set_to_none=True)
    loss_sum, kl_sum, tokens = 0.0, 0.0, 0
    # Sharded, the peers of a process that fails mid-step wait inside FSDP's collectives, not at
    # an agreement point: it raises at once, and the launcher (torchrun) stops the others.
    with team.together(f"in step {state.step + 1}") if not context.sharded else nullcontext():
        for batch in batches:
            with context.autocast():
                found = terms(context.student, context.teacher, context.adapter, batch, context.kept, weights)
                loss = found.total(weights, step_rows)
            if loss.requires_grad:
                # Sharded, FSDP averages the processes' gradients: back-propagating N × the loss makes that the sum.
                scaled = loss * gradient_scale(team.group.world_size) if context.sharded else loss
                state.scaler.scale(scaled).backward()
            loss_sum += float(loss.detach())
            kl_sum += float(found.kl.detach())
            tokens += found.tokens
    if team.distributed:
        if not context.sharded:  # FSDP reduced (and sharded) them in the backward pass
            team.reduce_gradients(context.trainable.parameters)
        loss_sum, kl_sum, summed_tokens = team.sum([loss_sum, kl_sum, tokens])
        tokens = int(summed_tokens)
    state.scaler.unscale_(state.optimizer)
    if options.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(context.trainable.parameters, options.max_grad_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.schedule.step()
    state.curve.loss.append(loss_sum)
    state.curve.kl.append(kl_sum / max(1, step_rows))
    return tokens


def make_optimizer(
    parameters: Sequence[nn.Parameter], *, lr: float, weight_decay: float, warmup_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear warm-up over ``warmup_steps``, then a constant rate (shared with
    `replace`, which trains one stand-in block the same way)."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    warmup = warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    return optimizer, schedule


def _samples(train: list[Sample], options: HealOptions, micro: int, team: Team | None = None) -> list[Sample]:
    """Micro-batch ``micro``'s samples: positions micro·B … micro·B + B − 1 of an endless stream
    that walks the training set in a fresh seeded order on every pass (in a data-parallel run,
    this process's slice of the global micro-batch: `parallel.samples_of`)."""
    n = len(train)
    chosen = []
    for position in samples_of(team.group if team else Group(), micro, options.batch_size):
        epoch, index = divmod(position, n)
        chosen.append(train[_order(options.seed, epoch, n)[index]])
    return chosen


_orders: dict[tuple[int, int, int], list[int]] = {}


def _order(seed: int, epoch: int, n: int) -> list[int]:
    found = _orders.get((seed, epoch, n))
    if found is None:
        found = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        if len(_orders) > 64:
            _orders.clear()
        _orders[(seed, epoch, n)] = found
    return found


def _build(context: Context, samples: list[Sample]) -> Batch:
    return build_batch(context.processor, samples, with_answer=True, max_length=context.max_length, text_format=context.text_format)


def _held_kl(context: Context, batches: list[Batch]) -> float:
    was_training = context.student.training
    context.student.eval()
    team = context.team
    try:
        with context.autocast():
            # Sharded, every process must run every forward pass: each measures every batch.
            if not team.distributed or context.sharded:
                kl = mean_kl(context.student, context.teacher, context.adapter, batches, context.device)
            else:
                kl = _sharded_kl(context, batches)
    finally:
        context.student.train(was_training)
    return float(kl) if kl is not None else float("nan")


def _sharded_kl(context: Context, batches: list[Batch]) -> float | None:
    """`mean_kl` with the batches shared out among the processes: each measures every N-th, the
    per-batch sums are gathered and added up in batch order, so every process gets the same
    value — the one a single process computes — and takes the same early-stopping decision."""
    team = context.team
    mine = range(team.group.rank, len(batches), team.group.world_size)
    sums: dict[int, float] = {}
    with team.together("while measuring the held-out KL"), torch.no_grad():
        for index in mine:
            found = terms(context.student, context.teacher, context.adapter, batches[index].to(context.device), (), Weights())
            sums[2 * index], sums[2 * index + 1] = float(found.kl), float(found.rows)
    gathered = team.gather(sums, 2 * len(batches))
    total, rows = 0.0, 0
    for index in range(len(batches)):
        total += gathered[2 * index]
        rows += int(gathered[2 * index + 1])
    return total / rows if rows else None


def _best_copy(context: Context) -> dict[str, torch.Tensor] | None:
    """A CPU copy of the trained parameters, kept by the process that writes (in one process,
    that one): N processes on a machine holding N copies in host memory would buy nothing.
    Sharded, gathering the copy takes every process."""
    if not (context.team.is_main or context.sharded):
        return None
    state = context.trainable.state()
    return state if context.team.is_main else None


def _same_start(team: Team, state: _State, checkpoint: Path) -> None:
    """Every process resumed at the same step, or none goes on: each reads the checkpoint itself,
    so a resume folder that only rank 0's machine sees would otherwise split the run."""
    if not team.distributed:
        return
    steps = team.gather({team.group.rank: state.step}, team.group.world_size)
    if len(set(steps)) > 1:
        raise CompressorError(
            f"The processes of this run found different resume checkpoints in {checkpoint.parent} (steps by rank: "
            f"{[int(step) for step in steps]}).",
            fix="put the output (and its hidden .NAME.heal-resume folder beside it) on a file system every process sees, "
            "or pass --no-resume to start over.",
        )


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class _State:
    """Everything a step depends on besides the frozen weights and the data: a checkpoint's content."""

    optimizer: torch.optim.AdamW
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    curve: Curve = field(default_factory=Curve)
    best_kl: float | None = None
    best_step: int | None = 0
    best_state: dict[str, torch.Tensor] | None = None
    bad: int = 0  # measurements since the best
    stopped: bool = False
    saved_step: int = 0

    @classmethod
    def fresh(cls, context: Context, options: HealOptions) -> _State:
        optimizer, schedule = make_optimizer(
            context.trainable.parameters, lr=options.learning_rate, weight_decay=options.weight_decay, warmup_steps=options.warmup_steps
        )
        # fp16 gradients underflow without scaling; bf16 and float32 need none (the scaler is then a no-op).
        scaler = torch.amp.GradScaler(context.device.type, enabled=context.compute_dtype == torch.float16)
        return cls(optimizer, schedule, scaler)

    def done(self, limit: int | None, budget: int | None) -> bool:
        if self.stopped:
            return True
        return self.step >= limit if limit is not None else self.tokens >= (budget or 0)

    def measure(self, context: Context, batches: list[Batch], options: HealOptions) -> None:
        kl = _held_kl(context, batches)
        self.curve.held_out.append((self.step, kl))
        if self.best_kl is None or kl < self.best_kl:
            self.best_kl, self.best_step, self.best_state, self.bad = kl, self.step, _best_copy(context), 0
            return
        self.bad += 1
        if options.patience and self.bad >= options.patience:
            log.info(
                "held-out KL did not improve for %d measurements: stopping at step %d (best: step %s)", self.bad, self.step, self.best_step
            )
            self.stopped = True

    def record(self, context: Context, key: str, world_size: int = 1) -> dict[str, Any]:
        """What a checkpoint holds: whole tensors, on the CPU, also in a sharded run."""
        return {
            "key": key,
            "world_size": world_size,  # the samples of a step depend on it: a resume needs the same
            "step": self.step,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "loss": self.curve.loss,
            "kl": self.curve.kl,
            "held_out": [list(entry) for entry in self.curve.held_out],
            "curve_tokens": self.curve.tokens,
            "best_kl": self.best_kl,
            "best_step": self.best_step,
            "best_state": self.best_state,
            "bad": self.bad,
            "stopped": self.stopped,
            "trained": context.trainable.state(),
            "optimizer": whole_optimizer_state(self.optimizer) if context.sharded else self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            # Nothing in a step draws from these today (no dropout in the trained modules at
            # these settings); saved so that a source of randomness resumes exactly too.
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": list(random.getstate()[1]),
        }

    def write(self, path: Path, record: dict[str, Any]) -> None:
        """Write a checkpoint atomically: Ctrl-C mid-write leaves the previous one intact."""
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(handle)
        try:
            torch.save(record, name)
            os.replace(name, path)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        self.saved_step = self.step

    def restore(self, path: Path, context: Context, key: str, options: HealOptions, world_size: int = 1) -> None:
        """Continue from ``path`` when it holds a checkpoint of this run (its ``key``); anything
        else is ignored with a warning and training starts from step 0: never a crash — but a
        checkpoint of this run written by another number of processes is refused (InputError)."""
        if not path.is_file():
            return
        initial = context.trainable.local_copy()  # no collective: a peer may have found no file
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
            if record["key"] != key:
                raise ValueError("it belongs to another run (other inputs or options)")
            written_by = int(record.get("world_size", 1))
            if written_by != world_size:
                raise _WorldSizeChanged(written_by, record["step"])
            if len(record["loss"]) != record["step"]:
                raise ValueError(f"step {record['step']} with {len(record['loss'])} losses")
            context.trainable.load(record["trained"])
            if context.sharded:
                load_optimizer_state(self.optimizer, record["optimizer"])
            else:
                self.optimizer.load_state_dict(record["optimizer"])
            self.schedule.load_state_dict(record["schedule"])
            self.scaler.load_state_dict(record["scaler"])
            torch.set_rng_state(record["torch_rng"])
            if record["cuda_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(record["cuda_rng"])
            state = random.getstate()
            random.setstate((state[0], tuple(record["python_rng"]), state[2]))
        except _WorldSizeChanged as changed:
            context.trainable.load_local(initial)
            raise InputError(
                f"The healing checkpoint {path} (step {changed.step}) was written by {changed.written_by} process(es); this run "
                f"has {world_size}. Each step's samples are shared out by the number of processes, so it cannot continue "
                "that run exactly.",
                fix=f"resume with the same number of processes (torchrun --nproc-per-node {changed.written_by}, or no launcher "
                "for 1), or pass --no-resume to start over.",
            ) from None
        except Exception as error:  # whatever is wrong with the file, training can still start over
            log.warning("ignoring the healing checkpoint %s (%s); training from step 0", path, error)
            context.trainable.load_local(initial)
            fresh = _State.fresh(context, options)
            self.optimizer, self.schedule, self.scaler = fresh.optimizer, fresh.schedule, fresh.scaler
            return
        self.step, self.tokens, self.seconds = record["step"], record["tokens"], record["seconds"]
        held_out = [(int(s), float(k)) for s, k in record["held_out"]]
        self.curve = Curve(list(record["loss"]), list(record["kl"]), held_out, list(record["curve_tokens"]))
        self.best_kl, self.best_step = record["best_kl"], record["best_step"]
        self.best_state = record["best_state"] if context.team.is_main else None  # as `_best_copy`
        self.bad, self.stopped, self.saved_step = record["bad"], record["stopped"], record["step"]
        log.info("resuming healing at step %d (%d tokens so far)", self.step, self.tokens)


class _WorldSizeChanged(Exception):
    def __init__(self, written_by: int, step: int):
        super().__init__(f"written by {written_by} processes")
        self.written_by, self.step = written_by, step
