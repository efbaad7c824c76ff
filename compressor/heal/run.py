"""`heal`: the library call behind `compressor heal` — check, load, train, merge, write.

Order matters for the user: the output is claimed (policy and lock) and every input is read and
checked — PRUNED a prune of BASE, the data and what the method needs of it, the options — before
either model loads; then the vocabularies and weights are compared, the student trains
(`loop.train`, resumable), LoRA adapters are merged and the merge checked, and the checkpoint is
written all-or-nothing (`export.write_healed`). The resume folder (hidden, beside OUT) goes
once OUT exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import file_sha256, load_samples
from ..distributed import Group
from ..equivalence import LOGITS_TOLERANCE, logits_of
from ..errors import VerificationError
from ..hub import ModelSource, resolve_model_ref
from ..manifest import Check, load_manifest
from ..provenance import source_facts
from ..staging import check_output, output_lock
from .export import write_healed
from .inputs import Pair, Split, check_pair, check_vocabularies, check_weights, split_samples
from .loop import Context, Curve, train
from .methods import Trainable, chosen_blocks, merge, prepare
from .options import HealOptions
from .parallel import Team
from .sharding import check_supported, shard

log = logging.getLogger(__name__)

# A merged LoRA layer computes W + BA in one weight: exact up to float32 rounding, but in a
# 16-bit weight the sum is rounded to bf16/fp16 resolution.
MERGE_TOLERANCE_16BIT = 2e-2


@dataclass
class HealResult:
    path: Path
    method: str
    trained: str  # what trained, in words
    trained_parameters: int
    steps: int
    tokens: int
    seconds: float
    kl_before: float | None  # mean held-out KL(teacher || student) per scored token
    kl_after: float | None
    stopped_early: bool
    resumed_from: int  # the step a checkpoint let this run start at (0: from scratch)
    curve: Curve
    checks: list[Check]
    model: Any = field(default=None, repr=False)  # the healed model in memory (merged, in the written dtype)

    def describe(self) -> str:
        lines = [
            f"healed with --method {self.method}: {self.trained} ({self.trained_parameters:,} parameters trained)",
            f"{self.steps} steps, {self.tokens:,} tokens in {self.seconds:.1f}s"
            + (f" (resumed at step {self.resumed_from})" if self.resumed_from else "")
            + (" (stopped early: held-out KL stopped improving)" if self.stopped_early else ""),
        ]
        if self.kl_before is not None and self.kl_after is not None:
            lines.append(f"held-out KL(teacher || student) per token: {self.kl_before:.4g} -> {self.kl_after:.4g}")
        lines += [f"verified: {check.detail}" for check in self.checks]
        lines.append(f"wrote {self.path}")
        return "\n".join(lines)


def resume_folder(out: Path) -> Path:
    """Where an interrupted run's checkpoint waits: hidden, beside OUT, named apart from
    staging's ``.NAME.tmp-*`` folders so nothing takes it for an output or for litter."""
    out = Path(out).expanduser().resolve()
    return out.parent / f".{out.name}.heal-resume"


def heal(
    pruned: str | Path | ModelSource,
    out: str | Path,
    *,
    teacher: str | Path | ModelSource,
    data: str | Path,
    options: HealOptions | None = None,
    overwrite: bool = False,
    device: str | None = "auto",
    resume: bool = True,
    resume_dir: Path | None = None,
    progress: bool = False,
    allow_outside_data: bool = False,
    trust_remote_code: bool = False,
    on_step: Callable[[int], None] | None = None,
    group: Group | None = None,
) -> HealResult:
    """Train the pruned checkpoint ``pruned`` towards its original ``teacher`` (folders, Hub ids,
    or resolved sources) on ``data`` and write the result to ``out`` (see the module docstring).
    ``resume_dir`` (default `resume_folder`) holds the checkpoints of an interrupted run.
    ``on_step(step)`` runs after each step and its checkpoint: a test seam.

    ``group`` (joined: `distributed.current`): data-parallel healing, every process calling this
    with the same arguments; each trains on its slice of every step's samples on its own device,
    gradients are summed (`parallel`), and rank 0 alone takes the output lock and writes the
    resume checkpoints and the output. Every process returns once the output is written, or
    raises when any of them failed."""
    options = options or HealOptions()
    team = Team(group)  # a collective: every process gets here together
    device = team.group.device(device)  # each process its own GPU
    out, data = Path(out), Path(data)
    given = [ref.path if isinstance(ref, ModelSource) else Path(ref) for ref in (pruned, teacher)]
    check_output(out, overwrite=overwrite, sources=[*given, data])  # before a Hub download
    student_source, teacher_source = (
        ref if isinstance(ref, ModelSource) else resolve_model_ref(str(ref), trust_remote_code=trust_remote_code)
        for ref in (pruned, teacher)
    )
    sources: list[Path | None] = [student_source.path, teacher_source.path, data]
    check_output(out, overwrite=overwrite, sources=sources)
    with output_lock(out) if team.is_main else nullcontext():  # one writer; a second run fails here
        pair = check_pair(student_source, teacher_source)
        chosen_blocks(pair.plan, options)  # a wrong --blocks is refused before minutes of loading
        samples = load_samples(data, allow_outside=allow_outside_data)
        split = split_samples(samples, options, data=data, multimodal=pair.adapter.multimodal)
        data_sha = file_sha256(data)
        return _heal_loaded(
            pair,
            split,
            out,
            options,
            sources=sources,
            data_sha=data_sha,
            data_name=data.name,
            device=device,
            overwrite=overwrite,
            resume=resume,
            resume_dir=resume_dir or resume_folder(out),
            progress=progress and team.is_main,
            on_step=on_step,
            team=team,
        )


def _heal_loaded(
    pair: Pair,
    split: Split,
    out: Path,
    options: HealOptions,
    *,
    sources: list[Path | None],
    data_sha: str,
    data_name: str,
    device: str | None,
    overwrite: bool,
    resume: bool,
    resume_dir: Path,
    progress: bool,
    on_step: Callable[[int], None] | None,
    team: Team,
) -> HealResult:
    from ..loading import load_model, resolve_device, resolve_dtype

    torch_device = resolve_device(device)
    compute = resolve_dtype(options.dtype, device=torch_device, auto="compute")
    name = str(compute).removeprefix("torch.")
    if options.fsdp:
        check_supported(compute, torch_device, team.distributed)
    # Sharded, each process reads the models into host memory and keeps its shards on its device (`sharding.shard`).
    load_device = "cpu" if options.fsdp else str(torch_device)
    teacher = load_model(pair.teacher, device=load_device, dtype=name)
    student = load_model(pair.student, device=load_device, dtype=name)
    check_vocabularies(student.processor, teacher.processor, pair)
    check_weights(student.model, teacher.model, pair)
    teacher.model.requires_grad_(False)
    # Seeded before LoRA's random initialisation of its A matrices.
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    trainable = prepare(student.model, pair.adapter, pair.plan, options)
    if options.gradient_checkpointing:
        student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if options.fsdp:
        for model in (student.model, teacher.model):
            shard(model, pair.adapter, torch_device, team.group.world_size)
        trainable.rebind(student.model)
    inputs = {"student": _fingerprint(pair.student), "teacher": _fingerprint(pair.teacher), "data": data_sha, "kept": str(pair.plan.kept)}
    key = options.key(inputs)
    if not resume and team.is_main:
        shutil.rmtree(resume_dir, ignore_errors=True)
    context = Context(
        student=student.model,
        teacher=teacher.model,
        adapter=pair.adapter,
        processor=student.processor,
        kept=pair.plan.kept,
        trainable=trainable,
        train=split.train,
        held_out=split.held_out,
        text_format=split.text_format,
        device=torch_device,
        compute_dtype=compute,
        max_length=options.max_length,
        team=team,
    )
    outcome = train(context, options, key=key, resume_dir=resume_dir, resume=resume, progress=progress, on_step=on_step)
    if options.gradient_checkpointing:
        student.model.gradient_checkpointing_disable()
    del teacher, context  # the teacher's memory goes before the export's reload
    checks: list[Check] = []
    model = student.model
    # Rank 0 merges, writes and verifies; the others wait here for how it went (`Team.together`).
    with team.together("while writing the healed checkpoint"):
        if team.is_main:
            if outcome.weights is not None:  # sharded: a plain student with the gathered weights is what gets written
                student, trainable = _unsharded(pair, options, outcome.weights, dtype=name)
                model = student.model
            checks_samples = (split.held_out or split.train)[:2]
            if trainable.lora:
                model, merge_check = _merge_checked(trainable, student.model, student.processor, checks_samples)
                checks.append(merge_check)
            model.requires_grad_(False)
            model.to(dtype=_dtype(pair.checkpoint_dtype))  # written as PRUNED was stored; trained parameters were float32
            healing = {
                "method": options.method,
                "trained": trainable.record(),
                "trained_description": trainable.described,
                "teacher": source_facts(pair.teacher),
                "student": pair.student.public_name,
                "data": {
                    "name": data_name,
                    "sha256": data_sha,
                    "train_samples": len(split.train),
                    "held_out_samples": len(split.held_out),
                    "format": split.text_format,
                },
                "steps": outcome.steps,
                "tokens": outcome.tokens,
                "seconds": outcome.seconds,
                "stopped_early": outcome.stopped_early,
                "best_step": outcome.best_step,
                "resumed_from": outcome.resumed_from,
                "held_out_kl": {"before": outcome.kl_before, "after": outcome.kl_after},
                "loss": {"kl": 1.0, "hidden": options.hidden_loss, "hidden_weight": options.hidden_weight, "ce_weight": options.ce_weight},
                "options": options.record(),
                "device": torch_device.type,
                "processes": team.group.world_size,  # data-parallel processes that trained
                "sharded": options.fsdp,  # FSDP: each process held a shard of both models
                "compute_dtype": name,
            }
            checks = write_healed(
                model,
                student.processor,
                out,
                pair=pair,
                healing=healing,
                curve=outcome.curve,
                samples=checks_samples,
                checks=checks,
                overwrite=overwrite,
                sources=sources,
            )
            shutil.rmtree(resume_dir, ignore_errors=True)
    return HealResult(
        path=out.resolve(),
        method=options.method,
        trained=trainable.described,
        trained_parameters=trainable.count,
        steps=outcome.steps,
        tokens=outcome.tokens,
        seconds=outcome.seconds,
        kl_before=outcome.kl_before,
        kl_after=outcome.kl_after,
        stopped_early=outcome.stopped_early,
        resumed_from=outcome.resumed_from,
        curve=outcome.curve,
        checks=checks,
        model=model,
    )


def _unsharded(pair: Pair, options: HealOptions, weights: dict[str, torch.Tensor], *, dtype: str) -> tuple[Any, Trainable]:
    """PRUNED loaded again, whole and on the CPU, with the trained parameters of a sharded run set
    (LoRA layers added as in training, so the merge and its check run as in one process)."""
    from ..loading import load_model

    student = load_model(pair.student, device="cpu", dtype=dtype)
    torch.manual_seed(options.seed)  # LoRA's initial A matrices; overwritten by `weights` next
    trainable = prepare(student.model, pair.adapter, pair.plan, options)
    trainable.load(weights)
    return student, trainable


def _merge_checked(trainable: Trainable, model: torch.nn.Module, processor: Any, samples: list) -> tuple[torch.nn.Module, Check]:
    """Merge the LoRA adapters and check the merged model computes what the adapted one did."""
    from ..data import build_batch

    inputs = build_batch(processor, samples, with_answer=False).inputs
    expected = logits_of(model, inputs)  # peft's layers are in place: this is the adapter model
    merged = merge(trainable)
    assert merged is not None
    got = logits_of(merged, inputs)
    diff = float((expected - got).abs().max())
    frozen = next(p for n, p in merged.named_parameters()).dtype
    bound = (LOGITS_TOLERANCE if frozen == torch.float32 else MERGE_TOLERANCE_16BIT) * max(1.0, float(expected.abs().max()))
    if not diff <= bound:
        raise VerificationError(
            f"The LoRA adapters merged into their layers do not reproduce the adapted model: max |Δlogits| = {diff:.3g} "
            f"(tolerance {bound:.3g}).",
            fix="this is a bug in compressor's merge (or peft's); nothing was written.",
        )
    leftovers = [n for n, _ in merged.named_parameters() if "lora_" in n]
    if leftovers:
        raise VerificationError(f"LoRA parameters remain after merging ({leftovers[:3]}).", fix="this is a bug; nothing was written.")
    return merged, Check(
        check="lora-merge",
        max_abs_diff=diff,
        tolerance=bound,
        samples=f"{len(samples)} sample{'s' * (len(samples) != 1)}",
        detail=f"The LoRA adapters were merged into their layers and the merged model's logits compared with the adapted "
        f"model's on {len(samples)} sample{'s' * (len(samples) != 1)}: max |Δlogits| = {diff:.3g} (tolerance {bound:.3g}).",
    )


def _fingerprint(source: ModelSource) -> str:
    """Cheap identity of a checkpoint for the resume key: the hashes its manifest lists for the
    weights and config (not the manifest itself, nor calibration.json: their times differ
    between identical exports, and `run` writes the pruned checkpoint again before it resumes),
    else its config and the size of each weight file."""
    manifest = load_manifest(source.path)
    if manifest is not None and manifest.get("files"):
        weights = {name: entry for name, entry in manifest["files"].items() if name.endswith(".safetensors") or name == "config.json"}
        return hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()
    digest = hashlib.sha256((source.path / "config.json").read_bytes())
    for weights in sorted(source.path.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()


def _dtype(name: str) -> torch.dtype:
    found = getattr(torch, name, None)
    return found if isinstance(found, torch.dtype) else torch.float32
