"""The healing objective: how far the student's outputs are from the teacher's.

- KL(teacher || student) of the next-token distributions at the scored positions
  (`functional.scored_positions`: the answer tokens where the batch has answers, else every next
  text token; padding and image placeholders never), summed over the vocabulary;
- optionally, per kept block j, the student block j's output against the output of the
  teacher's block ``plan.kept[j]`` (MSE, or 1 − cosine per token) over the real tokens;
- optionally, cross-entropy of the answer tokens.

Both models' LM heads run on the scored rows alone (`run` empties the head's input during the
forward pass and keeps the final norm's output), so neither model forms a
(batch × tokens × vocabulary) logits tensor.
Every term is a sum over the step's scored rows divided by their number (`Terms`), so gradient
accumulation over micro-batches of different sizes weighs every token alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import Adapter, _walk
from ..data import Batch
from ..functional import scored_positions
from .sharding import release


@dataclass
class Outputs:
    """One model's run on one batch, as far as the losses need it."""

    final: torch.Tensor  # the final norm's output, (batch, tokens, hidden)
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)  # block index -> its output


def run(model: nn.Module, adapter: Adapter, inputs: dict[str, torch.Tensor], block_indices: Sequence[int] = ()) -> Outputs:
    """Run ``model``, keeping its final norm's output and the outputs of blocks ``block_indices``.

    The LM head is handed zero positions during the pass (a pre-hook), so the model's own logits
    are empty; `head` later runs it on the scored rows. The forward pass itself runs to its end:
    ending it early (an exception from a hook) would skip the post-forward hooks FSDP's sharded
    modules rely on."""
    blocks = adapter.blocks(model)
    norm = getattr(_walk(model, adapter.block_path(model).rpartition(".")[0]), adapter.final_norm)
    kept: dict[int, torch.Tensor] = {}
    final: list[torch.Tensor] = []

    def keep(index: int, module: nn.Module, args: Any, output: Any) -> None:
        # A copy (differentiable): the model's loop may add to a block's output in place (DeepStack).
        kept[index] = (output[0] if isinstance(output, tuple) else output).clone()

    def remember(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        final.append(output)

    def no_positions(module: nn.Module, args: tuple) -> tuple:
        return (args[0][..., :0, :], *args[1:])

    handles = [blocks[i].register_forward_hook(partial(keep, i)) for i in block_indices]
    handles.append(norm.register_forward_hook(remember))
    handles.append(model.get_output_embeddings().register_forward_pre_hook(no_positions))
    try:
        model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if not final:
        raise RuntimeError("the forward pass never reached the final norm")
    return Outputs(final[0], kept)


def head(model: nn.Module, adapter: Adapter, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (float32) of final-norm outputs ``hidden``: the LM head and, where the family has
    one, the final logit softcap (Gemma 2/3), as `functional.Head` minus the norm."""
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(adapter.text_config(model.config), "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


@dataclass(frozen=True)
class Weights:
    hidden_loss: str = "none"  # "mse", "cosine" or "none"
    hidden_weight: float = 1.0
    ce_weight: float = 0.0


@dataclass
class Terms:
    """Sums over scored rows (KL, CE) and over the micro-batches' row-weighted hidden terms."""

    kl: torch.Tensor
    hidden: torch.Tensor
    ce: torch.Tensor
    rows: int
    tokens: int  # real tokens the student ran on

    def total(self, weights: Weights, step_rows: int) -> torch.Tensor:
        """The loss to back-propagate: this micro-batch's share of the step's mean."""
        loss = self.kl
        if weights.hidden_loss != "none":
            loss = loss + weights.hidden_weight * self.hidden
        if weights.ce_weight:
            loss = loss + weights.ce_weight * self.ce
        return loss / max(1, step_rows)


def scored(batch: Batch, adapter: Adapter, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return scored_positions(batch, adapter.image_token_id(model.config))


def terms(
    student: nn.Module,
    teacher: nn.Module,
    adapter: Adapter,
    batch: Batch,
    kept: Sequence[int],
    weights: Weights,
) -> Terms:
    """The loss terms of one micro-batch; ``kept`` maps student block j to teacher block kept[j]."""
    rows, targets = scored(batch, adapter, student)
    hidden_pairs = weights.hidden_loss != "none"
    with torch.no_grad():
        reference = run(teacher, adapter, batch.inputs, kept if hidden_pairs else ())
        teacher_logp = F.log_softmax(head(teacher, adapter, reference.final[rows[:, 0], rows[:, 1]]), dim=-1)
        release(teacher)
    mine = run(student, adapter, batch.inputs, range(len(kept)) if hidden_pairs else ())
    logits = head(student, adapter, mine.final[rows[:, 0], rows[:, 1]])
    logp = F.log_softmax(logits, dim=-1)
    # KL(teacher || student) = Σ p_t (log p_t − log p_s), summed over the rows.
    kl = F.kl_div(logp, teacher_logp.to(logp.device), log_target=True, reduction="sum")
    zero = logits.new_zeros(())
    ce = F.cross_entropy(logits, targets.to(logits.device), reduction="sum") if weights.ce_weight else zero
    hidden = zero
    if hidden_pairs:
        mask = batch.inputs["attention_mask"].bool()
        per_block = [
            _hidden_distance(mine.blocks[j], reference.blocks[original].to(mine.blocks[j].device), mask, weights.hidden_loss)
            for j, original in enumerate(kept)
        ]
        # A mean per token over the blocks, weighted by this micro-batch's rows like the sums above.
        hidden = torch.stack(per_block).mean() * len(rows)
    tokens = int(batch.inputs["attention_mask"].sum())
    return Terms(kl=kl, hidden=hidden, ce=ce, rows=len(rows), tokens=tokens)


def _hidden_distance(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    mine, theirs = student[mask].float(), teacher[mask].float()
    if kind == "mse":
        return F.mse_loss(mine, theirs)
    return (1 - F.cosine_similarity(mine, theirs, dim=-1)).mean()


@torch.no_grad()
def mean_kl(student: nn.Module, teacher: nn.Module, adapter: Adapter, batches: Sequence[Batch], device: torch.device) -> float | None:
    """Mean KL(teacher || student) per scored position over ``batches`` (the held-out set)."""
    total, rows = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        found = terms(student, teacher, adapter, batch, (), Weights())
        total += float(found.kl)
        rows += found.rows
    return total / rows if rows else None
