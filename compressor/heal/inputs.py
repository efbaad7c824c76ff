"""Everything healing reads besides the weights, read and checked before the models load.

Owns the question "is PRUNED a prune of BASE?" (`check_pair`): PRUNED must carry the manifest
and plan that `compressor prune` writes; the plan's original block count must be BASE's; BASE's
config, re-indexed by the plan exactly as surgery re-indexes it, must equal PRUNED's config;
and (`check_weights`, once loaded) the token embeddings, which no healing method trains, must be
BASE's own. Also the data: the samples, the held-out split, and what the method needs of them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..architectures import Adapter
from ..data import Sample
from ..errors import InputError, PlanError
from ..hub import ModelSource
from ..manifest import MANIFEST, load_manifest
from ..planner import SurgeryPlan
from ..reindex import reindex_config
from .options import HealOptions

# Config keys that say how or when a config was written, not what model it describes.
_METADATA = frozenset(
    {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "auto_map", "_commit_hash", "_attn_implementation_autoset"}
)
_PRUNE_FIX = (
    "pass as PRUNED a folder written by `compressor prune BASE ...` (or `run`'s hf/ folder), and as --teacher the BASE it was pruned from."
)


@dataclass(frozen=True)
class Pair:
    """A student checked to be a prune of its teacher."""

    student: ModelSource
    teacher: ModelSource
    adapter: Adapter
    plan: SurgeryPlan
    manifest: dict[str, Any]  # the student's compressor.json
    checkpoint_dtype: str  # the dtype PRUNED's weights are stored in: the healed ones are written so


def check_pair(student: ModelSource, teacher: ModelSource) -> Pair:
    """Refuse (InputError, naming what differs) a student that is not a prune of ``teacher``."""
    from ..architectures import adapter_for_config
    from ..loading import load_config

    manifest = load_manifest(student.path)
    if manifest is None or not (student.path / "plan.json").is_file():
        missing = MANIFEST if manifest is None else "plan.json"
        raise InputError(f"'{student.public_name}' has no {missing}, so nothing says which blocks of which model it kept.", fix=_PRUNE_FIX)
    plan = SurgeryPlan.load(student.path / "plan.json")
    student_config = load_config(student.path, trust_remote_code=student.trust_remote_code)
    teacher_config = load_config(teacher.path, trust_remote_code=teacher.trust_remote_code)
    adapter, teacher_adapter = adapter_for_config(student_config), adapter_for_config(teacher_config)
    if adapter.family != teacher_adapter.family:
        raise InputError(
            f"The student '{student.public_name}' is a {adapter.family} model and the teacher '{teacher.public_name}' a "
            f"{teacher_adapter.family} model: healing distils a model into its own prune.",
            fix=_PRUNE_FIX,
        )
    teacher_blocks, student_blocks = adapter.num_blocks(teacher_config), adapter.num_blocks(student_config)
    if plan.num_blocks != teacher_blocks:
        raise PlanError(
            f"'{student.public_name}/plan.json' was made for a model with {plan.num_blocks} blocks, but the teacher "
            f"'{teacher.public_name}' has {teacher_blocks}.",
            fix=_PRUNE_FIX,
        )
    if student_blocks != len(plan.kept):
        raise InputError(
            f"'{student.public_name}' has {student_blocks} blocks, but its plan.json keeps {len(plan.kept)} of {plan.num_blocks}.",
            fix=_PRUNE_FIX,
        )
    expected = copy.deepcopy(teacher_config)
    reindex_config(adapter.text_config(expected), adapter, plan.kept)
    differences = _differences(expected.to_dict(), student_config.to_dict())
    if differences:
        shown = "; ".join(f"{key}: teacher {a!r}, student {b!r}" for key, a, b in differences[:5])
        more = f" (and {len(differences) - 5} more)" if len(differences) > 5 else ""
        raise InputError(
            f"The student '{student.public_name}' is not the teacher '{teacher.public_name}' with blocks {plan.removed_indices} "
            f"removed: their configs differ beyond the removal ({shown}{more}).",
            fix=_PRUNE_FIX,
        )
    return Pair(student, teacher, adapter, plan, manifest, _stored_dtype(student_config))


def _differences(expected: Any, got: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, teacher's value, student's value) for every key both configs state differently."""
    if isinstance(expected, dict) and isinstance(got, dict):
        found = []
        for key in sorted(set(expected) & set(got), key=str):
            if key in _METADATA:
                continue
            found += _differences(expected[key], got[key], f"{prefix}{key}.")
        return found
    return [] if expected == got else [(prefix.rstrip("."), expected, got)]


def _stored_dtype(config: Any) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(dtype).removeprefix("torch.")


def check_vocabularies(student_processor: Any, teacher_processor: Any, pair: Pair) -> None:
    """The KL compares distributions token by token: both tokenizers must number tokens alike."""
    from ..data import tokenizer_of

    mine, theirs = tokenizer_of(student_processor).get_vocab(), tokenizer_of(teacher_processor).get_vocab()
    if mine == theirs:
        return
    differing = sorted({t for t in set(mine) | set(theirs) if mine.get(t) != theirs.get(t)}, key=str)
    raise InputError(
        f"The tokenizers of the student '{pair.student.public_name}' ({len(mine)} tokens) and the teacher "
        f"'{pair.teacher.public_name}' ({len(theirs)} tokens) number tokens differently (e.g. {differing[:3]}), so their "
        "next-token distributions cannot be compared.",
        fix=_PRUNE_FIX,
    )


def check_weights(student: torch.nn.Module, teacher: torch.nn.Module, pair: Pair) -> None:
    """A config can match by chance (two random inits of one architecture, a fine-tune of the
    base): the token embeddings, which pruning keeps and healing never trains, must be BASE's."""
    mine, theirs = student.get_input_embeddings().weight, teacher.get_input_embeddings().weight
    if mine.shape == theirs.shape and torch.equal(mine.to(theirs.dtype), theirs):
        return
    raise InputError(
        f"The token embeddings of the student '{pair.student.public_name}' differ from those of the teacher "
        f"'{pair.teacher.public_name}': the student was not pruned from this teacher.",
        fix=_PRUNE_FIX,
    )


@dataclass(frozen=True)
class Split:
    train: list[Sample]
    held_out: list[Sample]
    text_format: str  # "chat" or "raw": one layout for the whole run


def split_samples(samples: list[Sample], options: HealOptions, *, data: Path, multimodal: bool) -> Split:
    """Check the data against what ``options`` need, and split off the held-out share (seeded)."""
    if options.method == "projector":
        if not multimodal:
            raise InputError(
                "--method projector trains the multimodal projector, and this is a text-only model (it has none).",
                fix="use --method lora, full or distill for a text model.",
            )
        if not any(s.image is not None for s in samples):
            raise InputError(
                f"--method projector trains what maps images into the decoder, and '{data}' has no sample with an image.",
                fix="add samples with an 'image' to the data, or use --method lora, full or distill.",
            )
    if options.ce_weight > 0 and not any(s.answer is not None for s in samples):
        raise InputError(
            f"--ce-weight {options.ce_weight} adds cross-entropy on answers, and '{data}' has no sample with an 'answer'.",
            fix="add answers to the data, or drop --ce-weight (the KL to the teacher needs no labels).",
        )
    held = 0
    if options.held_out > 0:
        if len(samples) < 2:
            raise InputError(
                f"--held-out {options.held_out} keeps part of the data apart, and '{data}' holds {len(samples)} sample.",
                fix="add samples, or pass --held-out 0 (then no held-out KL is measured and there is no early stopping).",
            )
        held = min(len(samples) - 1, max(1, round(len(samples) * options.held_out)))
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(options.seed)).tolist()
    held_out = [samples[i] for i in sorted(order[:held])]
    train = [samples[i] for i in sorted(order[held:])]
    return Split(train, held_out, _layout(samples, options.text_format))


def _layout(samples: list[Sample], text_format: str) -> str:
    """auto: raw text (no chat template, so no template tokens to score) when every sample is a
    prompt-only text; the chat template otherwise (answers and images need it)."""
    if text_format != "auto":
        return text_format
    return "raw" if all(s.image is None and s.answer is None for s in samples) else "chat"
