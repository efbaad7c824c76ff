"""Data-parallel healing under torchrun / accelerate launch: what the processes exchange.

Every process holds the whole student and teacher and trains on its own slice of each step's
samples (`samples_of`: the global stream of one process with ``batch_size × world_size`` samples
per micro-batch, cut into one contiguous slice per rank). After the step's last backward the
trained parameters' gradients are summed over the processes (`Team.reduce_gradients`), and the
loss of every rank was divided by the step's *global* number of scored rows beforehand, so the
summed gradient is the one a single process computes over all of the step's samples.

Why an explicit all-reduce and not ``DistributedDataParallel``: `losses.run` ends the student's
forward by raising from a hook on the final norm, so a DDP wrapper's forward never returns and
its reducer is never armed for the backward; and the trained parameters differ per method
(whole blocks, peft's LoRA matrices, the projector), with or without gradient checkpointing. One
reduction of ``Trainable.parameters`` after the last micro-batch works for all of them and needs
no ``no_sync`` for gradient accumulation; the price is no overlap of communication with the
backward pass (DDP's bucketed hooks overlap it).

Agreement (`Team.together`): a phase that can fail on one process (a step, writing the resume
checkpoint, rank 0's export) ends in a small all-reduce of "who failed"; then either every
process goes on or every one raises — the failing one its own error, the others `PeerFailure` —
so no process waits forever for a peer that is gone. These control exchanges run in a gloo group
of their own (CPU tensors, a long timeout): the others may wait there while rank 0 writes.

In one process (``Group()``) every call here is a no-op or the identity.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from ..distributed import Group
from ..errors import CompressorError

log = logging.getLogger(__name__)

# How long a process waits at an agreement point for the others, e.g. while rank 0 writes and
# verifies the checkpoint: far longer than the default collective timeout (10–30 min).
CONTROL_TIMEOUT = timedelta(hours=6)
# Gradients are summed in buckets of at most this many elements: a bounded extra copy (100 MB of
# float32) instead of one flat copy of every trained parameter.
BUCKET_ELEMENTS = 25_000_000


class PeerFailure(CompressorError):
    """Another process of a data-parallel run failed; this one stops too (nothing was written)."""

    exit_code = 1


class Team:
    """This process's place in a healing run and the collectives it takes part in."""

    def __init__(self, group: Group | None = None):
        self.group = group or Group()
        self._control: Any = None
        if self.group.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                raise RuntimeError("Team needs the process group joined first (distributed.initialise)")
            # Called by every rank at the same point: new_group is itself a collective.
            self._control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)

    @property
    def distributed(self) -> bool:
        return self.group.distributed

    @property
    def is_main(self) -> bool:
        return self.group.is_main

    # -- agreement ------------------------------------------------------------------------
    def agree(self, error: BaseException | None, doing: str) -> None:
        """Every process says whether ``doing`` failed for it; if any did, every one raises."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        flags = torch.zeros(self.group.world_size, dtype=torch.float64)
        flags[self.group.rank] = 1.0 if error is not None else 0.0
        dist.all_reduce(flags, group=self._control)
        failed = [rank for rank, flag in enumerate(flags.tolist()) if flag]
        if error is not None:
            raise error
        if failed:
            which = ", ".join(str(rank) for rank in failed)
            raise PeerFailure(
                f"Process {which} of {self.group.world_size} failed {doing}; every process stops and no output was written "
                "(a resume checkpoint already written is kept).",
                fix=f"read the error of process {which} above (torchrun prefixes its lines with [rank{failed[0]}]); the same "
                "command resumes once it is fixed.",
            )

    @contextmanager
    def together(self, doing: str) -> Iterator[None]:  # doing: "in step 3", "while writing …"
        """Run the block on every process; all of them go on, or all of them raise (`agree`).
        KeyboardInterrupt and SystemExit pass straight through: the launcher stops every process."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - shared with the peers, then raised again
            self.agree(error, doing)
            raise
        self.agree(None, doing)

    # -- sums -----------------------------------------------------------------------------
    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the processes, in float64 (exact for counts)."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch.distributed as dist

        found = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(found, group=self._control)
        return found.tolist()

    def gather(self, values: dict[int, float], size: int) -> list[float]:
        """Entries ``0 … size−1``, each given by exactly one process (the rest add zeros, so each
        sum is that one value, bit for bit): per-batch figures summed later in a fixed order."""
        found = [0.0] * size
        for index, value in values.items():
            found[index] = float(value)
        return self.sum(found)

    def reduce_gradients(self, parameters: Sequence[nn.Parameter]) -> None:
        """Sum the parameters' gradients over the processes, in place. A parameter no process
        computed a gradient for keeps ``grad = None`` (AdamW then skips it, as in one process);
        one that only some did gets the sum of theirs (zeros for the others)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        has = self.sum([0.0 if p.grad is None else 1.0 for p in parameters])
        live = [p for p, count in zip(parameters, has) if count]
        for p, count in zip(parameters, has):
            if not count:
                p.grad = None
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(live):
            grads = [p.grad for p in bucket]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self._group_for(flat))
            for grad, summed in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                grad.copy_(summed)

    def broadcast_parameters(self, parameters: Sequence[nn.Parameter]) -> None:
        """Rank 0's values of ``parameters`` on every process (as DDP does when it wraps a model):
        every process then starts from the same trained weights whatever its own initialisation did."""
        if not self.distributed:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for bucket in _buckets(list(parameters)):
                tensors = [p.data for p in bucket]
                flat = torch._utils._flatten_dense_tensors(tensors)
                dist.broadcast(flat, src=0, group=self._group_for(flat))
                for tensor, value in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
                    tensor.copy_(value)

    def _group_for(self, tensor: torch.Tensor) -> Any:
        """The default group (NCCL on GPUs) for GPU tensors; gloo for CPU ones (NCCL has no CPU
        path: a student kept on the CPU with --device cpu on a GPU machine)."""
        return None if tensor.device.type == "cuda" else self._control


def samples_of(group: Group, micro: int, batch_size: int) -> range:
    """Positions in the global sample stream of micro-batch ``micro`` for this process: global
    micro-batch ``micro`` holds ``batch_size × world_size`` samples and rank r takes the r-th
    contiguous ``batch_size``. So N processes with batch B walk the stream exactly as one process
    with batch N·B (or with batch B and N times the gradient accumulation) does."""
    first = (micro * group.world_size + group.rank) * batch_size
    return range(first, first + batch_size)


def _buckets(parameters: list[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
    """Consecutive parameters of one device and dtype, at most `BUCKET_ELEMENTS` per bucket."""
    bucket: list[nn.Parameter] = []
    size = 0
    for p in parameters:
        if bucket and (size + p.numel() > BUCKET_ELEMENTS or p.device != bucket[0].device or p.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket
