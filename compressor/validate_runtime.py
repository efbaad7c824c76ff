"""Run-time visual-token modes in a validation report: what `compressor validate` measures when it
is asked for visual-token pruning (FastV, SGL), SGL's early exit or a Skip-It band
(`compressor.runtime`), besides plain generation.

Owns the request (`RuntimeRequest`: the options as validate's flags and a recipe's ``runtime:``
section give them, the flags winning), every check of it against the data and the models, each
naming the option and the fix, and the report's ``runtime`` section. Blocks are given in the
original model's numbering. The pruned model runs the same request with its blocks mapped to its
own numbering: a cut moves to the first kept block at or after it, a band shrinks to the kept
blocks inside it, a depth stays a fraction of the depth.

What is measured, per model, on the answered samples (those the VQA task scores), one prompt at a
time, greedy: the answer under the mode and the plain answer (`runtime.generate` without options:
the model's own ``generate``), both scored as the VQA task scores (`accuracy.match`); how often
SGL's early exit fired; the image tokens that took part per block; and the FLOPs estimate of the
mode over plain (`runtime.estimate_flops`: decoder blocks only, each generation at its own
length). The mode's cost includes the guide's generation and SGL's consistency check. It leaves
out the ranking read-outs (FastV reads attention during its prefill, SGL during the guide's
generation; here each is a separate eager pass, a cost of this implementation, not of the method)
and the vision tower (the same with and without the mode).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .accuracy import Format, match
from .calibration_report import CalibrationReport
from .data import Sample, build_batch, tokenizer_of
from .errors import CompressorError, InputError
from .loading import input_device
from .recipe import Condition, RuntimeSection
from .runtime import BandChoice, Guide, RuntimeOptions, choose_band, estimate_flops, generate, resolve
from .runtime.ranking import kept_count
from .runtime.request import BAND_PATTERN

# The flag of each field that validate's command line sets; the others come from a recipe only.
FLAGS = {
    "keep": "--visual-keep",
    "cut": "--visual-cut",
    "depth": "--visual-depth",
    "ranking": "--ranking",
    "guide": "--guide",
    "early_exit": "--early-exit",
    "band": "--visual-band",
}
MODES = ("keep", "band", "early_exit")  # what asks for a mode; the other flags refine one
PRUNED_GUIDE = "pruned"  # --guide pruned / runtime.guide: pruned: the pruned checkpoint guides the original
MODES_FIX = (
    "ask for a mode with --visual-keep R (and --visual-cut K or --visual-depth F), --visual-band A-B or --early-exit T, "
    "or a recipe's runtime: section"
)


def option_name(field: str) -> str:
    """How messages name a field: its flag and its recipe key, or the recipe key alone."""
    return f"{FLAGS[field]} (runtime.{field})" if field in FLAGS else f"runtime.{field}"


@dataclass(frozen=True)
class RuntimeRequest:
    """The run-time modes to measure: `runtime.RuntimeOptions` in the original model's numbering,
    plus where the band comes from (``band_where``: chosen from the calibration report exported with
    the pruned model) and the guide (``"pruned"`` or a model folder / Hub id)."""

    keep: float = 1.0
    cut: int | None = None
    depth: float | None = None
    ranking: str = "self"
    self_queries: str = "text"
    seed: int = 0
    band: tuple[int, int] | None = None
    band_where: tuple[Condition, ...] | None = None
    early_exit: float | None = None
    consistency_keep: float = 0.05
    guide: str | None = None
    origin: str = "command line"

    @property
    def needs_guide(self) -> bool:
        return self.early_exit is not None or (self.keep < 1 and self.ranking == "guide")

    @property
    def visual(self) -> bool:
        """Whether anything acts on image tokens (keep 1.0 alone is plain generation)."""
        return self.keep < 1 or self.band is not None or self.band_where is not None or self.early_exit is not None

    def options(self, *, cut: int | None = None, band: tuple[int, int] | None = None, depth: float | None = None) -> RuntimeOptions:
        """`RuntimeOptions` with the given (already mapped and normalised) cut, band and depth."""
        return RuntimeOptions(
            keep=self.keep,
            cut=cut,
            depth=depth,
            ranking=self.ranking,  # type: ignore[arg-type]
            self_queries=self.self_queries,  # type: ignore[arg-type]
            seed=self.seed,
            band=band,
            early_exit=self.early_exit,
            consistency_keep=self.consistency_keep,
        )

    def flags(self) -> str:
        """The request as validate's flags (recipe-only fields as key=value)."""
        parts = [f"--visual-keep {self.keep:g}"] if self.keep < 1 or not self.visual else []
        if self.cut is not None:
            parts.append(f"--visual-cut {self.cut}")
        if self.depth is not None:
            parts.append(f"--visual-depth {self.depth:g}")
        if self.keep < 1:
            parts.append(f"--ranking {self.ranking}")
            if self.ranking == "self" and self.self_queries != "text":
                parts.append(f"self_queries={self.self_queries}")
            if self.ranking == "random":
                parts.append(f"seed={self.seed}")
        if self.band_where is not None:  # (the band it chose, if chosen, is in the report's band_choice)
            parts.append("band_where=" + " and ".join(_condition_text(c) for c in self.band_where))
        elif self.band is not None:
            parts.append(f"--visual-band {self.band[0]}-{self.band[1]}")
        if self.early_exit is not None:
            parts.append(f"--early-exit {self.early_exit:g}")
            if self.consistency_keep != 0.05:
                parts.append(f"consistency_keep={self.consistency_keep:g}")
        if self.guide is not None:
            parts.append(f"--guide {self.guide}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        found = asdict(self)
        del found["origin"]  # the section states it beside the options
        found["band"] = list(self.band) if self.band is not None else None
        found["band_where"] = [c.model_dump(exclude_none=True) for c in self.band_where] if self.band_where else None
        return found


def _condition_text(condition: Condition) -> str:
    bound = f"< {condition.below:g}" if condition.below is not None else f"> {condition.above:g}"
    epsilon = f"@{condition.epsilon:g}" if condition.epsilon is not None else ""
    return f"{condition.metric}{epsilon}[{condition.modality}] {bound}"


def parse_band(text: str) -> tuple[int, int]:
    """``A-B`` (also ``A:B``, ``A..B``): the first and last block, inclusive; ``2--1`` is 2 to the last."""
    found = BAND_PATTERN.match(str(text))  # the syntax of `compressor generate --visual-band`
    if found is None:
        raise InputError(
            f"{option_name('band')} = '{text}' is not a band of blocks.",
            fix="write FIRST-LAST, inclusive, 0-based in the original numbering (e.g. --visual-band 1-4; 2--1 ends at the last block).",
        )
    return int(found.group(1)), int(found.group(2))


def runtime_request(
    section: RuntimeSection | None,
    *,
    recipe: str | None = None,
    keep: float | None = None,
    cut: int | None = None,
    depth: float | None = None,
    ranking: str | None = None,
    guide: str | None = None,
    early_exit: float | None = None,
    band: str | tuple[int, int] | None = None,
) -> RuntimeRequest | None:
    """The modes to measure: the recipe's ``runtime:`` ``section`` (from the file named ``recipe``)
    with every flag that is not None taking precedence, or None when neither asks for any.

    Flags override by concept: ``cut`` or ``depth`` replaces the section's cut and depth, ``band``
    its band and band_where; a guide the result no longer needs is dropped when it came from the
    section and refused when it came from a flag. Every problem is reported at once."""
    given = dict(keep=keep, cut=cut, depth=depth, ranking=ranking, guide=guide, early_exit=early_exit, band=band)
    flags = {k: v for k, v in given.items() if v is not None}
    if section is None and not flags:
        return None
    if section is None and not set(MODES) & set(flags):
        named = ", ".join(FLAGS[k] for k in flags)
        verb = "refines" if len(flags) == 1 else "refine"
        raise InputError(f"{named} only {verb} a run-time mode, and none was asked for.", fix=MODES_FIX + ".")
    problems: list[str] = []
    values = (section or RuntimeSection()).model_dump()
    merged: dict[str, Any] = {k: values[k] for k in ("keep", "cut", "depth", "ranking", "self_queries", "seed", "early_exit")}
    merged["consistency_keep"] = values["consistency_keep"]
    merged["guide"] = values["guide"]
    merged["band"] = tuple(values["band"]) if values["band"] is not None else None
    merged["band_where"] = tuple(section.band_where) if section is not None and section.band_where else None
    if "cut" in flags or "depth" in flags:
        if "cut" in flags and "depth" in flags:
            problems.append(f"{option_name('cut')} and {option_name('depth')} were both given: they say the same thing; give one")
        merged["cut"], merged["depth"] = flags.get("cut"), flags.get("depth")
    if "band" in flags:
        try:
            merged["band"] = flags["band"] if isinstance(flags["band"], tuple) else parse_band(flags["band"])
        except InputError as error:
            problems.append(f"{error.message} {error.fix}")
            merged["band"] = None
        merged["band_where"] = None
    for key in ("keep", "ranking", "early_exit", "guide"):
        if key in flags:
            merged[key] = flags[key]
    keep_value = merged["keep"]
    if isinstance(keep_value, bool) or not isinstance(keep_value, int | float) or not 0 < keep_value <= 1:
        problems.append(
            f"{option_name('keep')} = {keep_value!r}: the share of image tokens kept lies in (0, 1]; "
            "use e.g. 0.5 (half of them), or 1.0 to prune none"
        )
        merged["keep"] = keep_value = 1.0
    if merged["depth"] is not None and not 0 <= merged["depth"] < 1:
        problems.append(
            f"{option_name('depth')} = {merged['depth']!r}: a fraction of the depth lies in [0, 1); "
            "use e.g. 0.25 (a quarter of the way down)"
        )
    if keep_value < 1 and merged["cut"] is None and merged["depth"] is None:
        problems.append(
            f"{option_name('keep')} = {keep_value:g} prunes image tokens from some block on, and none was given: "
            f"add {option_name('cut')} K (a block) or {option_name('depth')} F (a fraction of the depth)"
        )
    if merged["early_exit"] is not None and not 0 < merged["early_exit"] <= 1:
        problems.append(f"{option_name('early_exit')} = {merged['early_exit']!r}: a confidence threshold lies in (0, 1]; use e.g. 0.9")
    first_last = merged["band"]
    if first_last is not None and (first_last[0] < 0) == (first_last[1] < 0) and first_last[0] > first_last[1]:
        problems.append(
            f"{option_name('band')} = {first_last[0]}-{first_last[1]}: its first block comes after its last (an empty band); "
            f"write FIRST-LAST, e.g. {first_last[1]}-{first_last[0]}"
        )
    request = RuntimeRequest(**merged, origin=_origin(section, recipe, flags))
    if request.needs_guide and request.guide is None:
        what = option_name("early_exit") if request.early_exit is not None else f"{option_name('ranking')} guide"
        problems.append(
            f"{what} needs a guide model (SGL), and none was given: pass {FLAGS['guide']} pruned (the pruned checkpoint guides "
            f"the original) or {FLAGS['guide']} MODEL (a smaller model of the same family and tokenizer); in a recipe, guide: pruned"
        )
    if request.guide is not None and not request.needs_guide:
        if "guide" in flags:
            problems.append(
                f"{option_name('guide')} {request.guide} was given, but nothing uses a guide: it ranks image tokens for "
                f"{FLAGS['ranking']} guide with {FLAGS['keep']} < 1, and decides {FLAGS['early_exit']}; drop it or ask for one of them"
            )
        request = replace(request, guide=None)  # the section's guide, for modes the flags replaced
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise InputError(
            f"{len(problems)} problem(s) with the run-time modes ({request.origin}):\n{listed}",
            fix="correct the options listed above (validate's flags, or the recipe's runtime: section).",
        )
    return request


def _origin(section: RuntimeSection | None, recipe: str | None, flags: dict[str, Any]) -> str:
    named = ", ".join(FLAGS[k] for k in flags)
    if section is None:
        return "command line"
    where = f"the runtime: section of {recipe}" if recipe else "the recipe's runtime: section"
    return f"{where}, overridden by {named}" if named else where


# -- checks before any model loads ----------------------------------------------------------------
def answered(samples: list[Sample]) -> list[Sample]:
    """The samples the run-time modes are measured on: the VQA task's (an answer, no choices)."""
    return [s for s in samples if s.answer is not None and not s.choices]


def check_data(request: RuntimeRequest, samples: list[Sample]) -> None:
    """Refuse data the modes cannot be measured on: no answered sample, or (for modes that act on
    image tokens) no answered sample with an image."""
    scored = answered(samples)
    if not scored:
        raise InputError(
            f"The run-time modes ({request.flags()}) are measured on answered samples (an 'answer', no 'choices'), "
            f"and none of the {len(samples)} samples has one.",
            fix="evaluate on VQA data (an image, a prompt and an 'answer' per sample), or drop the run-time options "
            "(validate --no-runtime ignores a recipe's runtime: section).",
        )
    if request.visual and not any(s.image is not None for s in scored):
        raise InputError(
            f"The run-time modes ({request.flags()}) act on image tokens, and no answered sample has an image "
            f"({len(scored)} text-only samples).",
            fix="evaluate on data with images, or drop the run-time options (validate --no-runtime ignores a recipe's runtime: section).",
        )


def choose(request: RuntimeRequest, pruned_dir: Path) -> tuple[RuntimeRequest, BandChoice | None]:
    """The request with its band chosen from the calibration report exported with the pruned
    model, when it gives ``band_where``; and that choice."""
    if request.band_where is None:
        return request, None
    path = Path(pruned_dir) / "calibration.json"
    if not path.is_file():
        raise InputError(
            f"{option_name('band_where')} chooses the band from the calibration report exported with the pruned model, "
            f"and '{Path(pruned_dir).name}' has no calibration.json (its recipe selected blocks without calibrating).",
            fix=f"give the band itself ({FLAGS['band']} A-B or runtime.band), or prune with a recipe that calibrates.",
        )
    report = CalibrationReport.load(path)
    try:
        choice = choose_band(report, request.band_where)
    except CompressorError as error:
        raise InputError(f"{option_name('band_where')}: {error.message}", fix=error.fix) from None
    return replace(request, band=choice.band), choice


# -- checks against the loaded models -------------------------------------------------------------
@dataclass(frozen=True)
class ModelRun:
    """One model's run: its options in its own numbering and guide, or why it is not measured."""

    name: str
    loaded: Any
    options: RuntimeOptions | None
    guide: Guide | None
    guide_name: str | None
    skipped: str | None = None


def plan_runs(
    request: RuntimeRequest,
    band_choice: BandChoice | None,
    base: Any,
    pruned: Any,
    guide: Any | None,
    removed: list[int],
    samples: list[Sample],
    text_format: Format,
) -> list[ModelRun]:
    """The base model's run (every refusal is an input error naming the option) and the pruned
    model's (blocks mapped to its numbering; not measured, with the reason, where the mapping or
    the guide leaves nothing to compare). The options are checked on one sample's inputs."""
    scored = answered(samples)
    probe = next((s for s in scored if s.image is not None), scored[0])
    num_blocks = base.adapter.num_blocks(base.model.config)
    if request.visual and base.adapter.image_token_id(base.model.config) is None:
        raise InputError(
            f"The run-time modes ({request.flags()}) act on image tokens, and the base model is a text-only {base.adapter.family} model.",
            fix="validate a vision-language model, or drop the run-time options "
            "(validate --no-runtime ignores a recipe's runtime: section).",
        )
    if band_choice is not None and len(band_choice.redundant) != num_blocks:
        raise InputError(
            f"{option_name('band_where')}: the calibration report exported with the pruned model measured "
            f"{len(band_choice.redundant)} blocks, and the base model has {num_blocks}.",
            fix="validate the pruned model against the model it was cut from.",
        )
    span = f"the base model's {num_blocks} blocks (0..{num_blocks - 1}, or negative from the end)"
    problems = []
    cut = None
    if request.cut is not None:
        if -num_blocks <= request.cut < num_blocks:
            cut = request.cut % num_blocks
        else:
            problems.append(f"{option_name('cut')} = {request.cut} is beyond {span}")
    band = None
    if request.band is not None:
        outside = [b for b in request.band if not -num_blocks <= b < num_blocks]
        if outside:
            problems.append(f"{option_name('band')} = {request.band[0]}-{request.band[1]}: block {outside[0]} is beyond {span}")
        else:
            band = (request.band[0] % num_blocks, request.band[1] % num_blocks)
            if band[0] > band[1]:
                problems.append(
                    f"{option_name('band')} = {request.band[0]}-{request.band[1]} is blocks {band[0]}..{band[1]} of this model: "
                    "its first block comes after its last (an empty band)"
                )
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise InputError(
            f"{len(problems)} problem(s) with the run-time modes ({request.origin}):\n{listed}",
            fix=f"give blocks of the base model, in its original numbering (0..{num_blocks - 1}).",
        )
    guide_of_base = _guide(request, pruned, guide)
    base_options = _options(request, cut=cut, band=band, depth=request.depth)
    try:
        resolve(base_options, base.model, base.processor, base.adapter, inputs_of(base, probe, text_format), guide=guide_of_base)
    except InputError as error:
        raise InputError(f"Run-time modes ({request.flags()}) on the base model: {error.message}", fix=error.fix) from None
    guide_name = None if guide_of_base is None else ("the pruned checkpoint" if request.guide == PRUNED_GUIDE else guide.source.public_name)
    runs = [ModelRun("base", base, base_options, guide_of_base, guide_name)]
    runs.append(_pruned_run(request, pruned, guide, removed, num_blocks, cut, band, inputs_of(pruned, probe, text_format)))
    return runs


def _options(request: RuntimeRequest, **blocks: Any) -> RuntimeOptions:
    try:
        return request.options(**blocks)
    except InputError as error:  # what `runtime_request` lets through and RuntimeOptions refuses
        raise InputError(f"Run-time modes ({request.flags()}): {error.message}", fix=error.fix) from None


def _guide(request: RuntimeRequest, pruned: Any, guide: Any | None) -> Guide | None:
    if not request.needs_guide:
        return None
    loaded = pruned if request.guide == PRUNED_GUIDE else guide
    return Guide(loaded.model, loaded.processor)


def _pruned_run(
    request: RuntimeRequest,
    pruned: Any,
    guide: Any | None,
    removed: list[int],
    num_blocks: int,
    cut: int | None,
    band: tuple[int, int] | None,
    probe: dict[str, torch.Tensor],
) -> ModelRun:
    def skip(why: str) -> ModelRun:
        return ModelRun("pruned", pruned, None, None, None, skipped=why)

    if request.needs_guide and request.guide == PRUNED_GUIDE:
        return skip("the pruned checkpoint is the guide; it does not guide itself")
    kept = [i for i in range(num_blocks) if i not in set(removed)]
    mapped_cut = None
    if cut is not None and request.keep < 1:
        after = [j for j, original in enumerate(kept) if original >= cut]
        if not after:
            return skip(f"the pruned model keeps no block from the cut (block {cut}) on")
        mapped_cut = after[0]
    mapped_band = None
    if band is not None:
        inside = [j for j, original in enumerate(kept) if band[0] <= original <= band[1]]
        if not inside:
            return skip(f"the pruned model keeps no block of the band {band[0]}..{band[1]}")
        mapped_band = (inside[0], inside[-1])
    options = _options(request, cut=mapped_cut, band=mapped_band, depth=request.depth if request.keep < 1 else None)
    guide_of_pruned = _guide(request, pruned, guide)
    try:
        resolve(options, pruned.model, pruned.processor, pruned.adapter, probe, guide=guide_of_pruned)
    except InputError as error:
        return skip(f"{error.message} (in the pruned model's numbering: cut {mapped_cut}, band {mapped_band})")
    name = None if guide_of_pruned is None else guide.source.public_name
    return ModelRun("pruned", pruned, options, guide_of_pruned, name)


# -- measuring -------------------------------------------------------------------------------------
def inputs_of(loaded: Any, sample: Sample, text_format: Format) -> dict[str, torch.Tensor]:
    """One prompt's inputs, laid out as the VQA task lays out questions."""
    fmt = "chat" if text_format == "auto" else text_format
    batch = build_batch(loaded.processor, [sample], with_answer=False, text_format=fmt)
    return batch.to(input_device(loaded.model)).inputs


def measure(runs: list[ModelRun], samples: list[Sample], *, max_new_tokens: int, text_format: Format) -> dict[str, Any]:
    """Per run: the figures of the report's ``runtime.models`` (see the module docstring)."""
    scored = answered(samples)
    models: dict[str, Any] = {}
    for run in runs:
        if run.skipped is not None:
            models[run.name] = {"measured": False, "why": run.skipped}
            continue
        models[run.name] = _measure_model(run, scored, max_new_tokens=max_new_tokens, text_format=text_format)
    base_plain = models["base"]["flops"]["plain"]
    for figures in models.values():
        if figures["measured"]:
            figures["flops_ratio_vs_base"] = (figures["flops"]["mode"] + figures["flops"]["guide"]) / base_plain if base_plain else None
    return models


def _measure_model(run: ModelRun, samples: list[Sample], *, max_new_tokens: int, text_format: Format) -> dict[str, Any]:
    loaded, options = run.loaded, run.options
    tokenizer = tokenizer_of(loaded.processor)
    num_blocks = loaded.adapter.num_blocks(loaded.model.config)
    records = []
    totals = {"plain": 0.0, "mode": 0.0, "guide": 0.0}
    kept_sums = [0.0] * num_blocks
    ran, image_tokens_ran, confidences = 0, 0, []
    for sample in samples:
        inputs = inputs_of(loaded, sample, text_format)
        plain = generate(loaded.model, loaded.processor, inputs, None, max_new_tokens=max_new_tokens)
        mode = generate(loaded.model, loaded.processor, inputs, options, guide=run.guide, max_new_tokens=max_new_tokens)
        flops = {
            "plain": sum(estimate_flops(loaded.model, plain.prompt_tokens_per_block, len(plain.tokens))),
            "mode": sum(estimate_flops(loaded.model, mode.prompt_tokens_per_block, len(mode.tokens))),
            "guide": _guide_flops(run, mode, inputs["input_ids"].shape[1]),
        }
        for key, value in flops.items():
            totals[key] += value
        if not mode.skipped:
            ran += 1
            image_tokens_ran += mode.image_tokens
            kept_sums = [total + kept for total, kept in zip(kept_sums, mode.kept_per_block)]
        if mode.guide_confidence is not None:
            confidences.append(mode.guide_confidence)
        prediction = tokenizer.decode(mode.tokens, skip_special_tokens=True).strip()
        plain_prediction = tokenizer.decode(plain.tokens, skip_special_tokens=True).strip()
        exact, contains = match(sample.answer or "", prediction)
        plain_exact, plain_contains = match(sample.answer or "", plain_prediction)
        records.append(
            {
                "prompt": sample.prompt,
                "image": sample.image.name if sample.image else None,  # the report is published: no local path
                "answer": sample.answer,
                "plain_prediction": plain_prediction,
                "prediction": prediction,
                "plain_exact": plain_exact,
                "exact": exact,
                "plain_contains": plain_contains,
                "contains": contains,
                "same_answer": torch.equal(plain.tokens.cpu(), mode.tokens.cpu()),
                "skipped": mode.skipped,
                "guide_confidence": mode.guide_confidence,
                "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "plain_new_tokens": len(plain.tokens),
                "new_tokens": len(mode.tokens),
                "image_tokens": mode.image_tokens,
                "kept_per_block": list(mode.kept_per_block),
                "flops_ratio": (flops["mode"] + flops["guide"]) / flops["plain"] if flops["plain"] else None,
            }
        )
    n = len(records)
    plain_accuracy = sum(r["plain_exact"] for r in records) / n
    accuracy = sum(r["exact"] for r in records) / n
    kept_by_block = [total / ran for total in kept_sums] if ran else None
    return {
        "measured": True,
        "n": n,
        "options": {"cut": options.cut, "depth": options.depth, "band": list(options.band) if options.band else None},
        "guide": run.guide_name,
        "metric": "exact_match",
        "plain_accuracy": plain_accuracy,
        "accuracy": accuracy,
        "accuracy_drop": plain_accuracy - accuracy,
        "plain_contains": sum(r["plain_contains"] for r in records) / n,
        "contains": sum(r["contains"] for r in records) / n,
        "same_answer": sum(r["same_answer"] for r in records) / n,
        "early_exit_rate": sum(r["skipped"] for r in records) / n if options.early_exit is not None else None,
        "guide_confidence": statistics.fmean(confidences) if confidences else None,
        "image_tokens": sum(r["image_tokens"] for r in records) / n,
        # Over the samples the model answered itself (an early exit runs none of its blocks).
        "kept_per_block": statistics.fmean(kept_by_block) if kept_by_block else None,
        "kept_by_block": kept_by_block,
        "kept_share": sum(kept_sums) / (image_tokens_ran * num_blocks) if image_tokens_ran else None,
        "flops": totals,
        "flops_ratio": (totals["mode"] + totals["guide"]) / totals["plain"] if totals["plain"] else None,
        "flops_ratio_model": totals["mode"] / totals["plain"] if totals["plain"] else None,
        "samples": records,
    }


def _guide_flops(run: ModelRun, mode: Any, prompt_length: int) -> float:
    """The guide's share of one generation: its plain answer, and SGL's consistency check when it
    ran (text plus the top ``consistency_keep`` image tokens in every block, counted at the length
    of the guide's answer, which the check reproduces when it passes)."""
    if mode.guide is None:
        return 0.0
    model, answer = run.guide.model, mode.guide.decoded
    total = sum(estimate_flops(model, mode.guide.participation.prompt_tokens(), len(answer.tokens)))
    if mode.guide.consistent is not None:
        images = mode.image_tokens
        kept = kept_count(images, run.options.consistency_keep)
        blocks = len(mode.guide.participation.sets)
        total += sum(estimate_flops(model, (prompt_length - images + kept,) * blocks, len(answer.tokens)))
    return total


def section(request: RuntimeRequest, band_choice: BandChoice | None, models: dict[str, Any]) -> dict[str, Any]:
    """The report's ``runtime`` section."""
    return {
        "options": request.to_dict(),
        "flags": request.flags(),
        "origin": request.origin,
        "band_choice": (
            {"band": list(band_choice.band), "criterion": band_choice.criterion, "redundant": list(band_choice.redundant)}
            if band_choice is not None
            else None
        ),
        "models": models,
    }
