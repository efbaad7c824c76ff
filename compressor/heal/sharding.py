"""Sharded healing (``--fsdp``): the student and the teacher split over the processes with FSDP2.

For a pair of models that one GPU cannot hold: each decoder block of both models is its own
FSDP unit (`torch.distributed.fsdp.fully_shard`), then the whole model (embeddings, final norm,
LM head, vision tower) is the root unit. A process keeps 1/N of every parameter; a block's
weights are gathered just before it runs and freed after it, in the forward and the backward
pass alike. Each process trains on its own slice of every step's samples, as in data-parallel
healing (`parallel.samples_of`), so N sharded processes walk the same micro-batches as N
data-parallel ones and as one process with N times the gradient accumulation.

Three things differ from data-parallel healing, and are handled here or in `loop`:

- FSDP *averages* the gradients over the processes as it reduces them (gloo has no
  pre-multiplied sum for `set_gradient_divide_factor`), while healing needs their *sum* (each
  process's loss is already divided by the step's global number of scored rows): every
  process back-propagates its loss times N (`gradient_scale`). For N a power of two this is
  exact, bit for bit.
- What trains is a set of shards: the optimizer's state is sharded too. A resume checkpoint
  holds whole tensors (`whole_optimizer_state`, gathered by every process, written by rank 0)
  and every process cuts its own slice again on resume (`load_optimizer_state`).
- The written checkpoint is not the sharded model: rank 0 gathers the trained parameters,
  loads PRUNED again on the CPU, sets them, and exports that plain model (`heal.run`).

Refused with ``--fsdp``: float16 (its gradient scaler checks for overflow per process, so the
processes could disagree on skipping a step; bfloat16 needs no scaler) and ``--method
projector`` (a batch without images leaves the projector out of one process's backward pass,
and the others would wait for it in the gradient reduction forever).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..architectures import Adapter
from ..errors import InputError
from .methods import _is_dtensor, _shard_like, find_projector


def check_supported(compute_dtype: torch.dtype, device: torch.device, distributed: bool) -> None:
    """Refuse, before any model is sharded, what sharded healing cannot do (module docstring; the
    options themselves refuse --method projector and an explicit --dtype float16)."""
    if not distributed:
        raise InputError(
            "--fsdp shards the models over the processes of a torchrun (or accelerate launch) run; this is one process.",
            fix="launch with torchrun --nproc-per-node N -m compressor heal … --fsdp, or drop --fsdp.",
        )
    if compute_dtype == torch.float16:
        raise InputError(
            "--fsdp with float16 (what --dtype auto chose on this device): float16 training needs a gradient scaler, and "
            "each process would check only its own shards for overflow.",
            fix="pass --dtype bfloat16 (or float32) with --fsdp.",
        )
    import torch.distributed as dist

    if device.type == "cpu" and dist.is_initialized() and dist.get_backend() == "nccl":
        raise InputError(
            "--fsdp --device cpu under NCCL: the processes joined over the GPUs, so their shards must live on GPUs.",
            fix="drop --device cpu, or run without GPUs visible (CUDA_VISIBLE_DEVICES=) to shard over CPU processes.",
        )


def shard(model: nn.Module, adapter: Adapter, device: torch.device, world_size: int) -> None:
    """Split ``model`` (on the CPU or ``device``) over the processes, in place: one FSDP unit per
    decoder block, one for the multimodal projector where there is one (its trained parameters
    are float32 while the frozen ones around it are not, and FSDP wants one dtype per unit's
    trained parameters), and the root. Shards land on ``device``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for block in adapter.blocks(model):
        fully_shard(block, mesh=mesh)
    if adapter.multimodal:
        try:
            fully_shard(find_projector(model)[1], mesh=mesh)
        except InputError:
            pass  # no projector: its parameters stay in the root unit
    fully_shard(model, mesh=mesh)


def gradient_scale(world_size: int) -> float:
    """What each process multiplies its loss by so that FSDP's average is the sum (module docstring)."""
    return float(world_size)


def release(model: nn.Module) -> None:
    """Free the gathered root parameters of a model that runs forward only (the teacher): FSDP keeps
    the root unit's parameters gathered after a forward pass, expecting a backward pass to follow."""
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            model.reshard()


def whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole, on the CPU (a
    collective: every process calls it, in the same order)."""
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: copied, not changed
    state["state"] = {
        index: {key: value.full_tensor().cpu() if _is_dtensor(value) else value for key, value in values.items()}
        for index, values in state["state"].items()
    }
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a `whole_optimizer_state` record: each state tensor shaped like its parameter becomes
    this process's shard of it (cut locally: every process read the same record)."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def laid_out(value: Any, p: torch.Tensor) -> Any:
        return _shard_like(value, p) if isinstance(value, torch.Tensor) and value.shape == p.shape else value

    shards = {
        index: {key: laid_out(value, parameters[int(index)]) for key, value in values.items()} for index, values in state["state"].items()
    }
    optimizer.load_state_dict({**state, "state": shards})
