"""Which parameters of the student train, per method, and putting LoRA adapters in and out.

- ``distill``: every parameter of every kept decoder block;
- ``full``: every parameter of the chosen blocks (default: the kept blocks beside each removed
  span — the ones whose inputs or outputs the removal changed);
- ``lora``: low-rank adapters (peft) on the linear layers of the chosen blocks, merged into
  those layers at the end, so the checkpoint is a plain one of the pruned shape;
- ``projector``: the multimodal projector alone (what maps vision features into the decoder).

Embeddings, the final norm, the LM head and the vision tower never train: the KL is measured
through the teacher's own head, and the embeddings are how `inputs.check_weights` recognises
the teacher. Block indices are in the original numbering everywhere a user sees them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..architectures import Adapter, _walk
from ..errors import InputError
from ..planner import SurgeryPlan
from .options import HealOptions

# Where the multimodal projector lives, tried in order against the live model (transformers 4.57
# and 5.x alike): LLaVA, PaliGemma and Gemma 3 `multi_modal_projector`; Qwen2/2.5/3-VL the vision
# tower's `merger`; Idefics3 `connector`; Gemma 4 `embed_vision`. Per-family knowledge that
# belongs with the rest of it in `architectures.Adapter` once another module needs it.
PROJECTOR_PATHS = (
    "model.multi_modal_projector",
    "multi_modal_projector",
    "model.visual.merger",
    "visual.merger",
    "model.connector",
    "connector",
    "model.embed_vision",
    "embed_vision",
)


def beside_removed(plan: SurgeryPlan) -> list[int]:
    """The kept blocks (original numbering) right before and right after each removed span."""
    removed = set(plan.removed_indices)
    chosen = {i for r in removed for i in (r - 1, r + 1) if 0 <= i < plan.num_blocks and i not in removed}
    return sorted(chosen)


def chosen_blocks(plan: SurgeryPlan, options: HealOptions) -> list[int]:
    """The blocks ``full`` and ``lora`` train, original numbering: --blocks, checked, or `beside_removed`."""
    if options.method == "distill":
        return plan.kept
    if options.method == "projector":
        return []
    if options.blocks is None:
        return beside_removed(plan)
    kept = set(plan.kept)
    wrong = [i for i in options.blocks if i not in kept]
    if wrong:
        removed = [i for i in wrong if 0 <= i < plan.num_blocks]
        what = f"{removed} were removed by the plan" if removed else f"{wrong} are not blocks of this {plan.num_blocks}-block model"
        raise InputError(
            f"--blocks {list(options.blocks)}: blocks {what}.",
            fix=f"choose among the kept blocks (original numbering): {plan.kept}.",
        )
    return sorted(set(options.blocks))


@dataclass
class Trainable:
    """What trains, and how to turn the model back into a plain one."""

    method: str
    parameters: list[nn.Parameter]
    names: list[str]  # what the user reads and checkpoints key on ("block 3.mlp.up_proj.weight", peft's names)
    blocks: list[int]  # original numbering; empty for the projector
    paths: list[str] = field(default_factory=list)  # each parameter's name in model.named_parameters()
    projector: str | None = None
    lora: dict[str, Any] | None = None  # rank, alpha, the adapted module names
    peft_model: Any = None  # the peft wrapper while LoRA layers are in
    described: str = ""

    @property
    def count(self) -> int:
        return sum(p.numel() for p in self.parameters)

    @property
    def sharded(self) -> bool:
        """The parameters are FSDP shards (DTensors): `state` is then a collective every process calls."""
        return bool(self.parameters) and _is_dtensor(self.parameters[0])

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the trained parameters, on the CPU: the best weights seen wait there, not in GPU
        memory. Sharded, each whole parameter is gathered from the processes (all of them call this)."""
        return {name: _whole(p).to("cpu", copy=True) for name, p in zip(self.names, self.parameters)}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Set the trained parameters from whole values (`state`'s); a shard takes its own slice."""
        with torch.no_grad():
            for name, p in zip(self.names, self.parameters):
                p.copy_(_shard_like(state[name], p))

    def local_copy(self) -> list[torch.Tensor]:
        """This process's part of each trained parameter (all of it unless sharded), copied to the CPU."""
        return [(p.to_local() if _is_dtensor(p) else p).detach().to("cpu", copy=True) for p in self.parameters]

    def load_local(self, copies: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, value in zip(self.parameters, copies):
                (p.to_local() if _is_dtensor(p) else p).copy_(value)

    def rebind(self, model: nn.Module) -> None:
        """Point at ``model``'s current parameter objects: sharding (FSDP) replaces every parameter
        of a module with a new one holding this process's shard."""
        current = dict(model.named_parameters())
        self.parameters = [current[path] for path in self.paths]

    def record(self) -> dict[str, Any]:
        found: dict[str, Any] = {"parameters": self.count}
        if self.blocks:
            found["blocks"] = self.blocks
        if self.projector:
            found["projector"] = self.projector
        if self.lora:
            found["lora"] = self.lora
        return found


def prepare(model: nn.Module, adapter: Adapter, plan: SurgeryPlan, options: HealOptions) -> Trainable:
    """Freeze ``model`` but for what ``options.method`` trains (adding LoRA layers for ``lora``);
    trained parameters are float32 whatever the model's dtype (the optimizer's master copy)."""
    model.requires_grad_(False)
    blocks = chosen_blocks(plan, options)
    position = {original: j for j, original in enumerate(plan.kept)}
    decoder = adapter.blocks(model)
    trainable = Trainable(method=options.method, parameters=[], names=[], blocks=blocks)
    if options.method == "projector":
        path, module = find_projector(model)
        trainable.projector = path
        _train(module, trainable, prefix=path)
        trainable.paths = list(trainable.names)
        trainable.described = f"the multimodal projector ({path})"
    elif options.method in ("distill", "full"):
        for original in blocks:
            _train(decoder[position[original]], trainable, prefix=f"block {original}")
        path = adapter.block_path(model)
        trainable.paths = [
            f"{path}.{position[original]}.{name}" for original in blocks for name, _ in decoder[position[original]].named_parameters()
        ]
        trainable.described = f"blocks {blocks} (original numbering)"
    else:
        trainable.peft_model, trainable.lora = _add_lora(model, adapter, [position[i] for i in blocks], options)
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(True)
                parameter.data = parameter.data.float()
                trainable.parameters.append(parameter)
                trainable.names.append(name)
                trainable.paths.append(name)
        trainable.described = f"LoRA (rank {options.lora_rank}) on {len(trainable.lora['modules'])} linear layers of blocks {blocks}"
    return trainable


def _train(module: nn.Module, trainable: Trainable, *, prefix: str) -> None:
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(True)
        parameter.data = parameter.data.float()
        trainable.parameters.append(parameter)
        trainable.names.append(f"{prefix}.{name}")


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _whole(p: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter, gathered from the processes when it is a shard."""
    return p.detach().full_tensor() if _is_dtensor(p) else p.detach()


def _shard_like(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole parameter) laid out as ``p``: this process's shard of it when ``p`` is one
    (cut locally, no communication: every process holds the same whole value)."""
    if not _is_dtensor(p):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements, src_data_rank=None)


def find_projector(model: nn.Module) -> tuple[str, nn.Module]:
    for path in PROJECTOR_PATHS:
        try:
            found = _walk(model, path)
        except AttributeError:
            continue
        if isinstance(found, nn.Module) and any(True for _ in found.parameters()):
            return path, found
    raise InputError(
        f"No multimodal projector found on {type(model).__name__} (looked for {', '.join(PROJECTOR_PATHS)}).",
        fix="use --method lora, full or distill for this model.",
    )


def _add_lora(model: nn.Module, adapter: Adapter, positions: Sequence[int], options: HealOptions) -> tuple[Any, dict[str, Any]]:
    """Wrap ``model`` with peft LoRA on the linear layers of the blocks at ``positions`` (new
    numbering). peft replaces those layers in place, so ``model`` itself runs with the adapters."""
    from peft import LoraConfig, get_peft_model

    path = adapter.block_path(model)
    wanted = set(options.lora_modules or ())
    names = []
    for j in positions:
        for name, module in adapter.blocks(model)[j].named_modules():
            if isinstance(module, nn.Linear) and (not wanted or name.rpartition(".")[2] in wanted):
                names.append(f"{path}.{j}.{name}")
    if not names:
        raise InputError(
            f"--lora-modules {sorted(wanted)} names no linear layer of the chosen blocks.",
            fix="name layers the blocks have (e.g. q_proj, v_proj), or drop --lora-modules to adapt every linear layer.",
        )
    config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=0.0, bias="none", target_modules=names)
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing` (5.x)
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(model, config)
    return peft_model, {"rank": options.lora_rank, "alpha": options.lora_alpha, "modules": names, "merged": True}


def merge(trainable: Trainable) -> nn.Module | None:
    """Fold LoRA adapters into their layers (peft's merge_and_unload): the model is then plain."""
    if trainable.peft_model is None:
        return None
    base = trainable.peft_model.base_model.model
    tied = base.config.to_dict().get("tie_word_embeddings")
    with warnings.catch_warnings():
        # peft sets `tie_word_embeddings=False` on a root config that says True over untied weights
        # (LLaVA on transformers 4.57): the adapters never touch the embeddings, so the config
        # the student came with stays as it was, and the checkpoint's config stays PRUNED's.
        warnings.filterwarnings("ignore", message="Input and output embeddings are no longer tied")
        merged = trainable.peft_model.merge_and_unload()
    if tied is not None and merged.config.to_dict().get("tie_word_embeddings") != tied:
        merged.config.tie_word_embeddings = tied
    trainable.peft_model = None
    return merged
