"""`make bench-runtime`: what run-time visual-token reduction (`compressor.runtime`) buys on the
trained demo models, against and combined with permanent block removal.

On each demo task (`shapes`, and the harder `relations`; trained once and cached, as
`make bench-quality` does), the *original* model is the large model and its *pruned* checkpoint
(the demo's default recipe, `recipes/shortgpt.yaml`: a quarter of the blocks by lowest block
influence, through the real `prune` call on the demo's calibration split, into a temporary
folder) is SGL's guide. On the evaluation split, one greedy answer per question and per setting
through `compressor.runtime.generate` (one prompt at a time, ``MAX_NEW_TOKENS`` as
`make bench-heal`), scored by exact match after `accuracy.normalize_answer`, as `accuracy.py`
scores:

1. tokens: accuracy with 100 / 64 / 35 / 9 % of the image tokens kept from the cut on, ranked by
   the guide (SGL), by the model's own attention at the block before the cut (FastV), or at random
   (seeded by the question's index: a fixed seed would keep the same grid cells for every image).
   The cut is one depth for all three, ``DEPTH`` (block 3 of 8: SGL's ~1/3 of the depth), with
   ``OTHER_DEPTHS`` beside it (block 2: FastV's classic K = 2; block 1: the earliest FastV allows).
   Keeping 100 % is the plain run (a guide is refused where nothing uses it).
2. early exit: SGL returns the guide's answer, skipping the large model, when the guide's
   confidence reaches a threshold and its answer is consistent. One `generate` call per question
   at the lowest threshold gives the guide's answer, confidence and consistency verdict (checked
   whenever the confidence reaches that threshold, so for every higher one); the outcome at each
   higher threshold follows exactly from them and the plain answer (the test checks it against
   direct calls).
3. Skip-It bands: image tokens take part only in the band `choose_band` picks from the
   original's calibration report (the one `prune` measured, ε = 0.2 added) under ``BAND_CRITERIA``,
   against bands of the same width placed at random (a few seeds).
4. compute: the pruned model alone (6 blocks), with FastV token pruning on top, and the original
   with token pruning at about the pruned model's compute, each with a FLOPs estimate and a CPU
   latency ratio against the plain original.

FLOPs (`runtime.estimate_flops`: decoder blocks only, no vision tower or LM head) are relative
to the plain original on the same questions; a method's count includes what the method must run
(SGL: the guide's generation, and the consistency check when it is made), and "as run" adds the
ranking passes this implementation makes separately (FastV: the blocks before the cut once more;
SGL: one guide forward over prompt and answer), which a fused implementation reads during the
prefill. Latency: time to the large model's first token ("prefill": guide and ranking passes
included) and per decode step after it, ``LATENCY_NEW_TOKENS`` tokens forced, every setting run
in one loop over a few questions, interleaved and rotated, the median of the repeats; on CPU,
labelled so. The demo model is tiny (width 256, ~27-token prompts): its times are Python and
hook overhead more than arithmetic, so the latency ratios say what this implementation costs at
that size, not what a 7B VLM would gain.

Results: a markdown table per task on stdout, and results.{md,json} + runtime.png in the output
folder. ``--smoke`` runs the same code on a few questions at one keep ratio: a check that
everything runs, not a measurement. ``--render`` redraws from results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .accuracy import normalize_answer
from .bench_heal import MAX_NEW_TOKENS
from .data import Sample, build_batch, load_samples, tokenizer_of
from .demo.run import DEFAULT_RECIPE
from .demo.train import HARDER_TASK, DemoAssets, DemoSettings, default_cache_dir, ensure_demo_model, training_threads
from .errors import InputError
from .loading import load_model
from .recipe import load_recipe
from .runtime import BandChoice, Generation, Guide, GuideRun, RuntimeOptions, choose_band, estimate_flops, generate

log = logging.getLogger(__name__)

KEEPS = (1.0, 0.64, 0.35, 0.09)
DEPTH = 0.375  # cut = floor(3/8 · L): block 3 of 8, SGL's ~1/3 of the depth
# Beside it: block 2 of 8, FastV's K = 2; and block 1, the earliest cut FastV's ranking allows (it
# reads block 0's attention), where on the demo the ranking starts to matter.
OTHER_DEPTHS = (0.25, 0.125)
THRESHOLDS = (0.5, 0.7, 0.9, 0.99)
# The keep ratio of part 4: at DEPTH, about the pruned model's block FLOPs (3·P + 5·(P − 10 image tokens) vs 6·P).
MATCHED_KEEP = 0.35
# Ranking of each method (`RuntimeOptions.ranking`), in table order.
METHODS = {"sgl": "guide", "fastv": "self", "random": "random"}
METHOD_NAMES = {"sgl": "SGL (guide)", "fastv": "FastV (self)", "random": "random"}
# recipes/skipit.yaml's image-modality conditions, as written there; and the same with the
# influence threshold halved, which leaves image tokens in more blocks.
BAND_CRITERIA = {
    "skipit.yaml": (
        {"metric": "block_influence", "modality": "image", "below": 0.1},
        {"metric": "tail_probability", "modality": "image", "epsilon": 0.2, "below": 0.2},
    ),
    "skipit.yaml, influence < 0.05": (
        {"metric": "block_influence", "modality": "image", "below": 0.05},
        {"metric": "tail_probability", "modality": "image", "epsilon": 0.2, "below": 0.2},
    ),
}
CALIBRATION_EPSILONS = (0.01, 0.02, 0.05, 0.1, 0.2)  # calibrate's defaults and skipit.yaml's 0.2
RANDOM_BANDS = 3
LATENCY_NEW_TOKENS, LATENCY_REPEATS, LATENCY_QUESTIONS = 8, 9, 4
EVAL_SAMPLES = 192  # ~8 min for both tasks on one thread of a shared 2-core machine
SMOKE = {
    "eval_samples": 4,
    "keeps": (1.0, MATCHED_KEEP),
    "depths": (DEPTH,),
    "thresholds": (0.5, 0.9),
    "random_bands": 1,
    "latency_repeats": 1,
    "latency_questions": 1,
}


@dataclass
class Point:
    """One setting, scored on every evaluation question."""

    mode: str  # original | sgl | fastv | random | early-exit | band | random-band | pruned | pruned+fastv
    model: str  # the model that answers: "original" or "pruned"
    accuracy: float
    flops: float  # relative to the plain original on the same questions: what the method runs
    flops_as_run: float  # ... plus this implementation's separate ranking passes
    keep: float | None = None
    cut: int | None = None  # first block with fewer image tokens (the answering model's numbering)
    kept_tokens: int | None = None  # image tokens kept from the cut on, of ``image_tokens``
    threshold: float | None = None
    skip_rate: float | None = None  # early exit: share of questions where the large model did not run
    band: list[int] | None = None
    criterion: str | None = None
    seed: int | None = None
    latency: dict[str, float] | None = None  # CPU: prefill and decode-step ratios vs the plain original


@dataclass
class TaskResult:
    name: str
    num_blocks: int
    pruned_blocks: int
    removed: list[int]  # by the default recipe, original numbering
    eval_questions: int
    image_tokens: int  # per question (the demo's 4×4 grid)
    original_accuracy: float
    settings: dict[str, Any]
    points: list[Point] = field(default_factory=list)
    bands: dict[str, dict[str, Any]] = field(default_factory=dict)  # criterion -> the choice, or its refusal
    latency: dict[str, Any] = field(default_factory=dict)  # the medians the ratios come from
    seconds: float = 0.0

    def find(self, mode: str, **fields: Any) -> list[Point]:
        return [p for p in self.points if p.mode == mode and all(getattr(p, k) == v for k, v in fields.items())]


# -- one question, one setting -------------------------------------------------------------
@dataclass(frozen=True)
class Arm:
    """A setting run once per question: which model answers, with which options, guided or not.
    ``options`` takes the question's index (the seed of random rankings)."""

    mode: str
    model: str
    options: Callable[[int], RuntimeOptions]
    guided: bool = False
    keep: float | None = None
    cut: int | None = None
    band: tuple[int, int] | None = None
    criterion: str | None = None
    seed: int | None = None


@dataclass
class Tally:
    correct: int = 0
    flops: float = 0.0
    flops_as_run: float = 0.0
    skipped: int = 0
    questions: int = 0

    def add(self, correct: bool, flops: float, as_run: float, skipped: bool = False) -> None:
        self.correct += correct
        self.flops += flops
        self.flops_as_run += as_run
        self.skipped += skipped
        self.questions += 1


def _flops(model: Any, prompt_tokens: Sequence[int], new_tokens: int) -> float:
    return float(sum(estimate_flops(model, list(prompt_tokens), new_tokens)))


def _kept(count: int, keep: float) -> int:
    """Image tokens a keep share leaves of ``count`` (as `runtime.ranking.top` counts)."""
    return min(count, max(1, math.ceil(keep * count - 1e-9))) if count else 0


def guide_costs(guide: Any, run: GuideRun, image_tokens: int, *, checked: bool, consistency_keep: float) -> tuple[float, float]:
    """Block FLOPs of SGL's guide: (its plain generation, plus the early exit's consistency check
    when ``checked`` — the guide again with its top ``consistency_keep`` image tokens from block 0,
    counted at the answer's length; the ranking pass: one forward over prompt and answer)."""
    blocks, length = len(run.participation.sets), run.participation.prompt_length
    answer = len(run.decoded.tokens)
    method = _flops(guide, run.participation.prompt_tokens(), answer)
    if checked:
        method += _flops(guide, [length - image_tokens + _kept(image_tokens, consistency_keep)] * blocks, answer)
    # The answer is fed back up to any image placeholder in it: an upper bound.
    return method, _flops(guide, [length + answer] * blocks, 1)


def costs(model: Any, generation: Generation, options: RuntimeOptions, guide: Any | None) -> tuple[float, float]:
    """Block FLOPs of one generation: (what the method runs, as this implementation runs it).

    The large model's blocks as they ran, and with a guide `guide_costs`. As run adds the ranking
    passes: FastV's forward through the blocks before the cut, SGL's guide forward over prompt
    and answer."""
    blocks = len(generation.prompt_tokens_per_block)
    length = generation.participation.prompt_length
    method = 0.0 if generation.skipped else _flops(model, generation.prompt_tokens_per_block, len(generation.tokens))
    extra = 0.0
    cut = None if options.keep == 1 else options.cut if options.cut is not None else math.floor((options.depth or 0) * blocks)
    if cut is not None and options.ranking == "self":
        extra += _flops(model, [length] * cut + [0] * (blocks - cut), 1)
    if generation.guide is not None and guide is not None:
        checked = generation.guide.consistent is not None
        used, ranking = guide_costs(guide, generation.guide, generation.image_tokens, checked=checked,
                                    consistency_keep=options.consistency_keep)  # fmt: skip
        method, extra = method + used, extra + ranking
    return method, method + extra


class Scorer:
    """Exact match after `accuracy.normalize_answer`, on the decoded answer without special tokens."""

    def __init__(self, processor: Any):
        self.tokenizer = tokenizer_of(processor)

    def text(self, tokens: torch.Tensor) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def correct(self, sample: Sample, tokens: torch.Tensor) -> bool:
        return normalize_answer(self.text(tokens)) == normalize_answer(sample.answer or "")


@dataclass
class Models:
    original: Any
    pruned: Any
    processor: Any
    guide: Guide

    def get(self, name: str) -> Any:
        return self.original if name == "original" else self.pruned


def early_exit_outcomes(
    generation: Generation, plain: Generation, thresholds: Sequence[float]
) -> dict[float, tuple[bool, torch.Tensor, bool]]:
    """Per threshold: (skipped, answer tokens, consistency check made), from one generation at the
    lowest threshold. The check is made when the guide's confidence reaches the threshold it was
    called with, so it is known for every higher one; below it the large model answers, plainly."""
    run = generation.guide
    out = {}
    for threshold in thresholds:
        checked = run.confidence >= threshold
        skipped = checked and bool(run.consistent)
        out[threshold] = (skipped, run.decoded.tokens if skipped else plain.tokens, checked)
    return out


# -- one task ------------------------------------------------------------------------------
def prune_guide(assets: DemoAssets, folder: Path) -> Any:
    """The guide: the demo model pruned by the demo's default recipe through the real `prune` call
    (calibrated on the demo's calibration split, ε = 0.2 added for the Skip-It band), written to
    ``folder``. The `PruneResult` carries the plan and the original's calibration report."""
    from .pipeline import prune

    return prune(
        str(assets.model_dir),
        folder,
        recipe_file=load_recipe(DEFAULT_RECIPE),
        data=assets.calibration,
        device="cpu",
        dtype="float32",
        epsilons=CALIBRATION_EPSILONS,
    )


def smoke_options() -> dict[str, Any]:
    """`run_task`'s arguments for ``--smoke``."""
    return {("eval_limit" if k == "eval_samples" else k): v for k, v in SMOKE.items()}


def run_task(
    name: str,
    assets: DemoAssets,
    *,
    eval_limit: int | None = EVAL_SAMPLES,
    keeps: Sequence[float] = KEEPS,
    depths: Sequence[float] = (DEPTH, *OTHER_DEPTHS),
    thresholds: Sequence[float] = THRESHOLDS,
    random_bands: int = RANDOM_BANDS,
    latency_repeats: int = LATENCY_REPEATS,
    latency_questions: int = LATENCY_QUESTIONS,
) -> TaskResult:
    """Prune the demo model ``assets`` with the default recipe and measure every setting of the
    module docstring on its first ``eval_limit`` evaluation questions."""
    started = time.perf_counter()
    if 1.0 not in keeps or MATCHED_KEEP not in keeps or DEPTH not in depths:
        raise InputError(
            f"keeps {list(keeps)} / depths {list(depths)}: parts 1 and 4 compare against keep 1.0 and {MATCHED_KEEP} at depth {DEPTH}.",
            fix=f"include 1.0 and {MATCHED_KEEP} in keeps and {DEPTH} in depths.",
        )
    evaluation = [s for s in load_samples(assets.eval)[:eval_limit] if s.answer is not None]
    thresholds = sorted(thresholds)
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as scratch:
        pruned_dir = Path(scratch) / "pruned"
        pruned_run = prune_guide(assets, pruned_dir)
        original = load_model(str(assets.model_dir), device="cpu", dtype="float32")
        pruned = load_model(str(pruned_dir), device="cpu", dtype="float32")
        models = Models(original.model, pruned.model, original.processor, Guide(pruned.model, pruned.processor))
        num_blocks = original.adapter.num_blocks(original.model.config)
        pruned_blocks = pruned.adapter.num_blocks(pruned.model.config)
        bands = _bands(pruned_run.calibration, random_bands)
        arms = _arms(keeps, depths, bands, num_blocks, pruned_blocks)
        tallies, image_tokens = _evaluate(models, evaluation, arms, thresholds, name)
        latency = _latency(models, evaluation[:latency_questions], repeats=latency_repeats)
    plain = tallies["original"]
    result = TaskResult(
        name=name,
        num_blocks=num_blocks,
        pruned_blocks=pruned_blocks,
        removed=list(pruned_run.plan.removed_indices),
        eval_questions=len(evaluation),
        image_tokens=image_tokens,
        original_accuracy=plain.correct / plain.questions,
        settings={
            "keeps": list(keeps),
            "depths": list(depths),
            "cuts": [math.floor(d * num_blocks) for d in depths],
            "thresholds": list(thresholds),
            "max_new_tokens": MAX_NEW_TOKENS,
            "guide": f"the pruned model: {DEFAULT_RECIPE.name} ({pruned_blocks} of {num_blocks} blocks)",
            "calibration": f"{assets.calibration.name} of the demo, epsilons {list(CALIBRATION_EPSILONS)}",
            "random_seed": "the question's index",
            "threads": torch.get_num_threads(),
            "latency": {"new_tokens": LATENCY_NEW_TOKENS, "repeats": latency_repeats, "questions": latency_questions, "device": "cpu"},
        },
        bands={k: v["report"] for k, v in bands.items()},
        latency=latency["medians"],
    )
    for arm in arms:
        tally = tallies[_key(arm)]
        result.points.append(
            _point(
                arm.mode,
                arm.model,
                tally,
                plain,
                keep=arm.keep,
                cut=arm.cut,
                band=list(arm.band) if arm.band else None,
                criterion=arm.criterion,
                seed=arm.seed,
                kept_tokens=_kept(image_tokens, arm.keep) if arm.keep is not None else None,
            )
        )
    for threshold in thresholds:
        tally = tallies[("early-exit", threshold)]
        result.points.append(_point("early-exit", "original", tally, plain, threshold=threshold, skip_rate=tally.skipped / tally.questions))
    cuts = {"original": math.floor(DEPTH * num_blocks), "pruned": math.floor(DEPTH * pruned_blocks)}
    for point in result.points:
        point.latency = latency["ratios"].get(_latency_key(point, cuts))
    result.seconds = time.perf_counter() - started
    return result


def _point(mode: str, model: str, tally: Tally, plain: Tally, **fields: Any) -> Point:
    return Point(mode, model, tally.correct / tally.questions, tally.flops / plain.flops, tally.flops_as_run / plain.flops, **fields)


def _key(arm: Arm) -> Any:
    return (arm.mode, arm.model, arm.keep, arm.cut, arm.band, arm.criterion, arm.seed) if arm.mode != "original" else "original"


def _bands(report: Any, random_bands: int) -> dict[str, dict[str, Any]]:
    """Per criterion, the calibrated band and ``random_bands`` placements of its width elsewhere
    (seeded; every other placement when there are no more), or the refusal."""
    out = {}
    for label, where in BAND_CRITERIA.items():
        try:
            choice: BandChoice = choose_band(report, where)
        except InputError as error:
            out[label] = {"report": {"refused": error.message, "where": list(where)}}
            continue
        first, last = choice.band
        width = last - first + 1
        others = [(s, s + width - 1) for s in range(report.num_blocks - width + 1) if s != first]
        drawn = random.Random(0).sample(others, min(random_bands, len(others)))
        out[label] = {
            "band": choice.band,
            "random": drawn,
            "report": {"band": list(choice.band), "redundant": list(choice.redundant), "criterion": choice.criterion,
                       "where": list(where), "random": [list(b) for b in drawn]},
        }  # fmt: skip
    return out


def _arms(keeps: Sequence[float], depths: Sequence[float], bands: dict, num_blocks: int, pruned_blocks: int) -> list[Arm]:
    arms = [Arm("original", "original", lambda i: RuntimeOptions(), keep=1.0)]
    arms.append(Arm("pruned", "pruned", lambda i: RuntimeOptions(), keep=1.0))
    for depth in depths:
        cut = math.floor(depth * num_blocks)
        for keep in keeps:
            if keep == 1:
                continue
            for method, ranking in METHODS.items():
                arms.append(
                    Arm(
                        method,
                        "original",
                        lambda i, k=keep, d=depth, r=ranking: RuntimeOptions(keep=k, depth=d, ranking=r, seed=i),
                        guided=ranking == "guide",
                        keep=keep,
                        cut=cut,
                    )
                )
    cut = math.floor(DEPTH * pruned_blocks)
    for keep in keeps:
        if keep < 1:
            arms.append(
                Arm("pruned+fastv", "pruned", lambda i, k=keep: RuntimeOptions(keep=k, depth=DEPTH, ranking="self"), keep=keep, cut=cut)
            )
    for label, chosen in bands.items():
        if "band" not in chosen:
            continue
        arms.append(Arm("band", "original", lambda i, b=chosen["band"]: RuntimeOptions(band=b), band=chosen["band"], criterion=label))
        for seed, band in enumerate(chosen["random"]):
            arms.append(Arm("random-band", "original", lambda i, b=band: RuntimeOptions(band=b), band=band, criterion=label, seed=seed))
    return arms


def _evaluate(models: Models, evaluation: list[Sample], arms: list[Arm], thresholds: list[float], name: str) -> tuple[dict, int]:
    """Every arm and the early exit on every question: a tally per setting, and the image tokens
    per question (checked to be the same for all: the demo's grid)."""
    scorer = Scorer(models.processor)
    tallies: dict[Any, Tally] = {_key(a): Tally() for a in arms}
    tallies.update({("early-exit", t): Tally() for t in thresholds})
    image_tokens = None
    started = time.perf_counter()
    for index, sample in enumerate(evaluation):
        inputs = build_batch(models.processor, [sample], with_answer=False).inputs
        plain = None
        for arm in arms:
            model, options = models.get(arm.model), arm.options(index)
            generation = generate(
                model, models.processor, inputs, options, guide=models.guide if arm.guided else None, max_new_tokens=MAX_NEW_TOKENS
            )
            if arm.mode == "original":
                plain = generation
                if image_tokens is None:
                    image_tokens = generation.image_tokens
                elif image_tokens != generation.image_tokens:
                    raise RuntimeError(f"question {index} has {generation.image_tokens} image tokens, the first had {image_tokens}")
            tallies[_key(arm)].add(scorer.correct(sample, generation.tokens), *costs(model, generation, options, models.guide.model))
        options = RuntimeOptions(early_exit=thresholds[0])
        generation = generate(models.original, models.processor, inputs, options, guide=models.guide, max_new_tokens=MAX_NEW_TOKENS)
        plain_flops = _flops(models.original, plain.prompt_tokens_per_block, len(plain.tokens))
        for threshold, (skipped, tokens, checked) in early_exit_outcomes(generation, plain, thresholds).items():
            used, ranking = guide_costs(models.guide.model, generation.guide, generation.image_tokens, checked=checked,
                                        consistency_keep=options.consistency_keep)  # fmt: skip
            method = used + (0.0 if skipped else plain_flops)
            tallies[("early-exit", threshold)].add(scorer.correct(sample, tokens), method, method + ranking, skipped)
        if (index + 1) % 32 == 0 or index + 1 == len(evaluation):
            log.info("%s: %d/%d questions, %.0fs", name, index + 1, len(evaluation), time.perf_counter() - started)
    return tallies, image_tokens or 0


# -- latency -------------------------------------------------------------------------------
# (label, model, options, guided): the settings timed, the plain original first (the reference).
def _timed_settings() -> list[tuple[str, str, RuntimeOptions, bool]]:
    matched = dict(keep=MATCHED_KEEP, depth=DEPTH)
    return [
        ("original", "original", RuntimeOptions(), False),
        ("pruned", "pruned", RuntimeOptions(), False),
        ("fastv", "original", RuntimeOptions(**matched, ranking="self"), False),
        ("random", "original", RuntimeOptions(**matched, ranking="random"), False),
        ("sgl", "original", RuntimeOptions(**matched, ranking="guide"), True),
        ("pruned+fastv", "pruned", RuntimeOptions(**matched, ranking="self"), False),
    ]


def _latency_key(point: Point, cuts: dict[str, int]) -> str | None:
    """The timed setting a point is (`_timed_settings`), if it is one."""
    if point.mode in ("original", "pruned"):
        return point.mode
    if point.mode in ("fastv", "random", "sgl", "pruned+fastv") and point.keep == MATCHED_KEEP and point.cut == cuts[point.model]:
        return point.mode
    return None


@contextmanager
def _forced(model: Any, tokens: int) -> Iterator[list[float]]:
    """While active, ``model`` writes exactly ``tokens`` tokens (EOS suppressed until then) and
    the returned list gets a timestamp at the end of each of its forward passes (its LM head)."""
    marks: list[float] = []
    config = model.generation_config
    previous = config.min_new_tokens
    config.min_new_tokens = tokens
    handle = model.get_output_embeddings().register_forward_hook(lambda *_: marks.append(time.perf_counter()))
    try:
        yield marks
    finally:
        handle.remove()
        config.min_new_tokens = previous


def _latency(models: Models, questions: list[Sample], *, repeats: int) -> dict[str, Any]:
    """Per timed setting, the median over ``repeats`` rounds of the mean over ``questions`` of the
    time to the answering model's first token (prefill: guide and ranking passes included) and of
    one decode step after it; and the ratios to the plain original. Rounds run every setting on
    every question, in an order rotated by one each round (one warm-up round first)."""
    settings = _timed_settings()
    inputs = [build_batch(models.processor, [q], with_answer=False).inputs for q in questions]
    times: dict[str, dict[str, list[float]]] = {s[0]: {"prefill": [], "decode": []} for s in settings}
    for round_ in range(repeats + 1):
        order = settings[round_ % len(settings) :] + settings[: round_ % len(settings)]
        for label, model_name, options, guided in order:
            model = models.get(model_name)
            prefill, decode = [], []
            for one in inputs:
                with _forced(model, LATENCY_NEW_TOKENS) as marks:
                    start = time.perf_counter()
                    generate(
                        model, models.processor, one, options, guide=models.guide if guided else None, max_new_tokens=LATENCY_NEW_TOKENS
                    )
                if len(marks) != LATENCY_NEW_TOKENS:
                    raise RuntimeError(f"{label}: {len(marks)} forward passes of the answering model, {LATENCY_NEW_TOKENS} forced")
                prefill.append(marks[0] - start)
                decode.append((marks[-1] - marks[0]) / (len(marks) - 1))
            if round_:  # round 0 warms up
                times[label]["prefill"].append(statistics.fmean(prefill))
                times[label]["decode"].append(statistics.fmean(decode))
    medians = {label: {phase: statistics.median(values) for phase, values in t.items()} for label, t in times.items()}
    reference = medians["original"]
    ratios = {label: {phase: m[phase] / reference[phase] for phase in m} for label, m in medians.items()}
    return {"medians": {label: {f"{p}_ms": v * 1e3 for p, v in m.items()} for label, m in medians.items()}, "ratios": ratios}


# -- output --------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _cell(point: Point | None) -> str:
    return "—" if point is None else f"{point.accuracy:.1%} ({point.flops:.2f})"


def _one(points: list[Point]) -> Point | None:
    return points[0] if points else None


def markdown(results: list[TaskResult]) -> str:
    lines: list[str] = []
    for r in results:
        s = r.settings
        cuts = list(zip(s["depths"], s["cuts"]))
        original = _one(r.find("original"))
        guide = _one(r.find("pruned"))
        lines += [
            f"### {r.name}: {r.num_blocks} blocks, {r.image_tokens} image tokens per question, {r.eval_questions} evaluation questions",
            "",
            f"Original {r.original_accuracy:.1%}; guide = pruned model ({r.pruned_blocks} blocks, {DEFAULT_RECIPE.name} removed "
            f"{', '.join(map(str, r.removed))}) {_pct(guide.accuracy if guide else None)}. Cells: exact-match accuracy "
            "(block FLOPs relative to the plain original; SGL's include the guide's generation).",
            "",
            "**1. Image tokens kept from the cut on** (" + "; ".join(f"cut at block {c} = depth {d:g}" for d, c in cuts) + ")",
            "",
            "| ranking | cut | " + " | ".join(f"{k:.0%} ({_kept(r.image_tokens, k)}/{r.image_tokens})" for k in s["keeps"]) + " |",
            "|---|---:|" + "---:|" * len(s["keeps"]),
        ]
        for _, cut in cuts:
            for method in METHODS:
                cells = [_cell(original) if k == 1 else _cell(_one(r.find(method, keep=k, cut=cut))) for k in s["keeps"]]
                lines.append(f"| {METHOD_NAMES[method]} | {cut} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "100 %: nothing pruned, the plain run (the same for every ranking). Random: seeded by the question's index.",
            "",
            "**2. SGL early exit** (the guide answers when its confidence ≥ threshold and its answer survives keeping its top 5 % "
            "image tokens)",
            "",
            "| threshold | large model skipped | accuracy | rel. FLOPs |",
            "|---|---:|---:|---:|",
            f"| original alone | 0.0% | {_pct(r.original_accuracy)} | 1.00 |",
            f"| guide alone ({r.pruned_blocks} blocks) | 100.0% | {_pct(guide.accuracy if guide else None)} | "
            f"{guide.flops if guide else float('nan'):.2f} |",
        ]
        for p in sorted(r.find("early-exit"), key=lambda p: p.threshold):
            lines.append(f"| {p.threshold:g} | {_pct(p.skip_rate)} | {_pct(p.accuracy)} | {p.flops:.2f} |")
        lines += ["", "**3. Skip-It bands** (image tokens take part, and are attended, only inside the band)", ""]
        lines += ["| criterion | band | chosen by | accuracy | rel. FLOPs |", "|---|---|---|---:|---:|"]
        for label, chosen in r.bands.items():
            if "refused" in chosen:
                lines.append(f"| {label} | — | refused: {chosen['refused']} | — | — |")
                continue
            calibrated = _one(r.find("band", criterion=label))
            others = r.find("random-band", criterion=label)
            lines.append(f"| {label} | {_span(calibrated.band)} | calibrated: {chosen['criterion']} | {_pct(calibrated.accuracy)} | "
                         f"{calibrated.flops:.2f} |")  # fmt: skip
            for p in others:
                lines.append(f"| {label} | {_span(p.band)} | random, same width (#{p.seed}) | {_pct(p.accuracy)} | {p.flops:.2f} |")
            if len(others) > 1:
                mean = statistics.fmean(p.accuracy for p in others)
                lines.append(f"| {label} | | random mean | {_pct(mean)} | {statistics.fmean(p.flops for p in others):.2f} |")
        lines += [
            "",
            "**4. Against and with block removal** (rel. FLOPs: method / as run, with this implementation's separate ranking "
            "passes; CPU latency ratios vs the plain original: time to the first token, and per decode step)",
            "",
            "| model | image tokens | accuracy | rel. FLOPs | as run | CPU prefill | CPU decode step |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        rows = [(f"original ({r.num_blocks} blocks)", "all", original), (f"pruned ({r.pruned_blocks} blocks)", "all", guide)]
        for method in METHODS:
            found = _one(r.find(method, keep=MATCHED_KEEP, cut=s["cuts"][0]))
            rows.append((f"original + {METHOD_NAMES[method]}", f"{MATCHED_KEEP:.0%} from block {s['cuts'][0]}", found))
        for p in sorted(r.find("pruned+fastv"), key=lambda p: -p.keep):
            rows.append((f"pruned + {METHOD_NAMES['fastv']}", f"{p.keep:.0%} from block {p.cut}", p))
        for label, tokens, p in rows:
            if p is None:
                continue
            ratio = p.latency or {}
            prefill = f"{ratio['prefill']:.2f}" if "prefill" in ratio else "—"
            decode = f"{ratio['decode']:.2f}" if "decode" in ratio else "—"
            lines.append(f"| {label} | {tokens} | {_pct(p.accuracy)} | {p.flops:.2f} | {p.flops_as_run:.2f} | {prefill} | {decode} |")
        reference = r.latency.get("original", {})
        lat = s["latency"]
        lines += [
            "",
            f"CPU, {s['threads']} thread(s): plain original {reference.get('prefill_ms', float('nan')):.1f} ms to the first token, "
            f"{reference.get('decode_ms', float('nan')):.1f} ms per decode step; medians of {lat['repeats']} interleaved rounds over "
            f"{lat['questions']} question(s), {lat['new_tokens']} tokens forced. At this size the times are mostly Python, hooks "
            "and generate()'s bookkeeping, not arithmetic: read the ratios as this implementation's overhead on a tiny model, "
            "the FLOPs as what a large one would save.",
            f"Wall time: {r.seconds:.0f} s (pruning, calibration, {r.eval_questions} questions × every setting, latency).",
            "",
        ]
    return "\n".join(lines)


def _span(band: list[int] | None) -> str:
    return "—" if band is None else f"{band[0]}–{band[1]}"


def plot(results: list[TaskResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.4 * len(results)), squeeze=False)
    colours = {"sgl": "tab:blue", "fastv": "tab:orange", "random": "tab:gray", "early-exit": "tab:green", "band": "tab:red",
               "random-band": "tab:pink", "pruned": "tab:olive", "pruned+fastv": "tab:brown", "original": "black"}  # fmt: skip
    for (left, right), r in zip(axes, results):
        original = _one(r.find("original"))
        guide = _one(r.find("pruned"))
        for cut, style in zip(r.settings["cuts"], ("-", "--", ":")):
            for method in METHODS:
                points = sorted(r.find(method, cut=cut), key=lambda p: p.keep)
                xs = [p.keep for p in points] + [1.0]
                ys = [p.accuracy for p in points] + [r.original_accuracy]
                left.plot(xs, ys, marker="o", linestyle=style, color=colours[method], label=f"{METHOD_NAMES[method]} @{cut}")
        if guide is not None:
            left.axhline(guide.accuracy, color="black", linewidth=0.8, linestyle=":", label=f"pruned ({r.pruned_blocks} blocks)")
        left.set_title(f"{r.name}: accuracy vs image tokens kept")
        left.set_xlabel("share of image tokens kept from the cut on")
        left.set_ylabel("exact-match accuracy")
        left.grid(alpha=0.3)
        left.legend(fontsize=7)
        seen = set()
        for p in r.points:
            label = p.mode if p.mode not in seen else None
            seen.add(p.mode)
            right.scatter(p.flops, p.accuracy, color=colours.get(p.mode, "tab:purple"), label=label, s=28)
        right.scatter(1.0, original.accuracy if original else r.original_accuracy, color="black", marker="*", s=120)
        right.set_title(f"{r.name}: accuracy vs block FLOPs (relative to the original)")
        right.set_xlabel("relative FLOPs (decoder blocks; SGL and early exit include the guide)")
        right.set_ylabel("exact-match accuracy")
        right.grid(alpha=0.3)
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: list[TaskResult], output: Path) -> str:
    """results.md, results.json and runtime.png in ``output``; returns the markdown."""
    output.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    (output / "results.md").write_text(text + "\n")
    (output / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    plot(results, output / "runtime.png")
    return text


def load_results(path: Path) -> list[TaskResult]:
    """The results a run wrote to results.json, as the objects it wrote them from."""
    results = []
    for raw in json.loads(path.read_text()):
        points = [Point(**p) for p in raw.pop("points")]
        results.append(TaskResult(**raw, points=points))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("exports/bench-runtime"))
    parser.add_argument("--tasks", nargs="+", default=["shapes", HARDER_TASK.task], help="demo tasks (each trained once, cached)")
    parser.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES, help="evaluation questions per task")
    parser.add_argument("--smoke", action="store_true", help="a few questions, one keep ratio: runs, measures nothing")
    parser.add_argument("--render", action="store_true", help="only rewrite results.md and runtime.png from OUTPUT/results.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.render:
        print(write(load_results(args.output / "results.json"), args.output))
        return 0
    known = {"shapes": DemoSettings(), HARDER_TASK.task: HARDER_TASK}
    unknown = [t for t in args.tasks if t not in known]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {sorted(known)}")
    if args.eval_samples < 1:
        parser.error("--eval-samples must be at least 1")
    chosen = smoke_options() if args.smoke else {"eval_limit": args.eval_samples}
    results: list[TaskResult] = []
    with training_threads():  # capped, as the demo trains: a shared machine is not swamped
        torch.manual_seed(0)
        for task in args.tasks:
            assets = ensure_demo_model(default_cache_dir(), settings=known[task], progress=True)
            results.append(run_task(task, assets, **chosen))
            write(results, args.output)
    text = write(results, args.output)
    print(text)
    print(f"written: {args.output}/results.{{md,json}}, {args.output}/runtime.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
