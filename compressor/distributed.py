"""Data-parallel calibration: which process this is, its share of the data, and the all-reduce.

Launched by ``torchrun`` or ``accelerate launch``, every process sees ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` (and a rendezvous address). Each one loads the model on its own GPU (or,
with a device map, on its own share of the machine's GPUs), calibrates every ``WORLD_SIZE``-th
sample, and the metric partial sums are summed over all processes with ``torch.distributed``
(NCCL between GPUs, gloo on CPUs); rank 0 writes the report. Without those variables this is
a single process and every call here is a no-op.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from .errors import InputError

if TYPE_CHECKING:  # torch is imported where a call needs it: `prune` checks `from_environment` and stays light
    import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    """This process's place among the calibration processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list[T]) -> list[T]:
        """Every ``world_size``-th item from ``rank`` on: shares that differ by at most one."""
        return items[self.rank :: self.world_size]

    def all_reduce_sum(self, values: torch.Tensor) -> None:
        """Sum a CPU float64 tensor over the processes, in place (a no-op in one process)."""
        if not self.distributed:
            return
        import torch
        import torch.distributed as dist

        if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
            on_gpu = values.to(f"cuda:{torch.cuda.current_device()}")
            dist.all_reduce(on_gpu)
            values.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(values)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def device(self, requested: str | None) -> str | None:
        """Each process's own GPU (the one `initialise` made current) unless one was named; CPU stays CPU."""
        if not self.distributed or requested not in (None, "auto", "cuda"):
            return requested
        import torch

        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"

    def gpus(self, count: int) -> list[int]:
        """This process's share of a machine's ``count`` GPUs, for a per-process device map:
        ``count // local_world_size`` consecutive ones (all of them in a single process)."""
        if not self.distributed:
            return list(range(count))
        per = count // self.local_world_size
        if per == 0:
            raise InputError(
                f"{self.local_world_size} processes on this machine share {count} GPU(s): a device map needs at least one each.",
                fix="start at most one process per GPU (torchrun --nproc-per-node), or drop --device-map.",
            )
        return list(range(self.local_rank * per, (self.local_rank + 1) * per))


def from_environment(env: dict[str, str] | None = None) -> Group:
    """The group torchrun / accelerate launch described in the environment (one process if none)."""
    env = dict(os.environ) if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as error:
        raise InputError(f"Malformed launcher variables ({error}).", fix="start with torchrun or accelerate launch.") from None
    return Group(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)


def initialise(group: Group) -> Group:
    """Join the process group torchrun set up (NCCL when every process has a GPU, else gloo)."""
    if not group.distributed:
        return group
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"
        if backend == "nccl":  # NCCL needs one distinct GPU per process: the first of its share
            count = torch.cuda.device_count()
            torch.cuda.set_device(group.gpus(count)[0] if count >= group.local_world_size else group.local_rank % count)
        dist.init_process_group(backend=backend)
        log.info("rank %d of %d joined (%s)", group.rank, group.world_size, backend)
    return group


def finish(group: Group) -> None:
    if group.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def current() -> Group:
    """The group of this process, joined (idempotent)."""
    return initialise(from_environment())
