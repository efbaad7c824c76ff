"""`make bench-quality`: which block-selection method keeps the most accuracy.

On trained demo models (the demo's shapes task and a harder one; trained once and cached),
for every removal budget k from 1 block to half the blocks, the evaluation accuracy (exact
match of greedy answers) after removing the k blocks each method selects:

- shortgpt: lowest block influence over all tokens (`lowest`, ShortGPT);
- gromov: the contiguous span of k blocks with the smallest angular distance (`span`);
- skipit: lowest image-token block influence among the blocks where text reads little from
  the image (visual attention ratio at most the median block's), then the others by image
  influence (the Skip-It conditions, ranked so that every budget gets k blocks);
- ablation_kl: lowest KL when the block alone is skipped (`lowest`, metric ablation_kl);
- greedy: the SLEB-style greedy order (`greedy`);
- last_k: the k blocks before the last one;
- random: mean over seeds of k random blocks.

Every method keeps the first and the last block (as the shipped recipes do). The report
also gives the Spearman rank agreement of each cheap metric with the ablation ground truth,
and the ablation scan's cost in forward passes (replays over the recording pass; a naive
scan costs L). Results: a table on stdout, and quality.{json,md,png} in the output folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .accuracy import answer_accuracy
from .calibrate import CalibrationOptions, CalibrationReport, calibrate
from .data import load_samples
from .demo.train import HARDER_TASK, DemoSettings, default_cache_dir, ensure_demo_model
from .loading import load_model
from .planner import RemovedBlock, SurgeryPlan, plan
from .recipe import parse_recipe
from .surgery import apply_plan

log = logging.getLogger(__name__)

METHODS = ("shortgpt", "gromov", "skipit", "ablation_kl", "greedy", "last_k", "random")
CHEAP_METRICS = (
    ("block_influence", "all"),
    ("block_influence", "image"),
    ("block_influence", "text"),
    ("adjacent_distance", "image"),
    ("visual_attention", "all"),
)
PROTECT = "{first: 1, last: 1}"


@dataclass
class TaskResult:
    name: str
    settings: dict[str, Any]
    num_blocks: int
    full_accuracy: float
    eval_questions: int
    accuracy: dict[str, dict[int, float]] = field(default_factory=dict)  # method -> k -> accuracy
    selections: dict[str, dict[int, list[int]]] = field(default_factory=dict)  # method -> k -> blocks
    random_spread: dict[int, list[float]] = field(default_factory=dict)
    spearman: dict[str, dict[str, float | None]] = field(default_factory=dict)
    scan_forward_passes: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


# -- selections -----------------------------------------------------------------------------
def _recipe(select: str) -> Any:
    return parse_recipe(f"version: 1\nname: bench\nselect: {{{select}, protect: {PROTECT}}}\n")


def selections(report: CalibrationReport, k: int, seeds: int) -> dict[str, list[list[int]]]:
    """Each method's blocks at budget ``k`` (random: one list per seed)."""
    n = report.num_blocks
    unprotected = list(range(1, n - 1))
    through = lambda select: list(plan(_recipe(select), n, report).removed_indices)  # noqa: E731 - the real recipe path
    image = report.values("block_influence", "image")
    ratio = report.values("visual_attention", "all")
    median = statistics.median(r for r in ratio if r is not None) if any(r is not None for r in ratio) else None
    quiet = [i for i in unprotected if median is None or (ratio[i] is not None and ratio[i] <= median)]
    loud = [i for i in unprotected if i not in quiet]
    skipit = (sorted(quiet, key=lambda i: image[i]) + sorted(loud, key=lambda i: image[i]))[:k]
    rng = random.Random(0)
    return {
        "shortgpt": [through(f"op: lowest, metric: block_influence, modality: all, count: {k}")],
        "gromov": [through(f"op: span, n: {k}, modality: all")],
        "skipit": [sorted(skipit)],
        "ablation_kl": [through(f"op: lowest, metric: ablation_kl, count: {k}")],
        "greedy": [through(f"op: greedy, count: {k}")],
        "last_k": [list(range(n - 1 - k, n - 1))],
        "random": [sorted(rng.sample(unprotected, k)) for _ in range(seeds)],
    }


# -- statistics -----------------------------------------------------------------------------
def _ranks(values: list[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for value in set(values):  # ties share their mean rank
        tied = [i for i, v in enumerate(values) if v == value]
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: list[float | None], b: list[float | None]) -> float | None:
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if len(pairs) < 3:
        return None
    ra, rb = _ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs])
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


# -- one task -------------------------------------------------------------------------------
def run_task(name: str, settings: DemoSettings, *, cache: Path, eval_limit: int | None, seeds: int) -> TaskResult:
    torch.manual_seed(0)
    assets = ensure_demo_model(cache, settings=settings, progress=True)
    loaded = load_model(str(assets.model_dir), dtype="float32")
    model, processor, adapter = loaded.model, loaded.processor, loaded.adapter
    n = adapter.num_blocks(model.config)
    half = n // 2
    calib = load_samples(assets.calibration)
    evaluation = load_samples(assets.eval)[:eval_limit]
    started = time.perf_counter()
    options = CalibrationOptions(
        num_samples=len(calib), batch_size=16, ablation=True, greedy=half, greedy_keep=(0, -1), attention=True, max_span=half
    )
    report = calibrate(model, processor, adapter, calib, options=options)
    calibration_s = time.perf_counter() - started
    cache_acc: dict[tuple[int, ...], float] = {}

    def accuracy(blocks: list[int]) -> float:
        key = tuple(sorted(blocks))
        if key not in cache_acc:
            pruned = copy.deepcopy(model)
            if key:
                apply_plan(pruned, _plan(key, n), adapter)
            cache_acc[key] = answer_accuracy(pruned, processor, evaluation, batch_size=64, max_new_tokens=6).accuracy
        return cache_acc[key]

    result = TaskResult(name, settings.__dict__, n, accuracy([]), len(evaluation))
    for method in METHODS:
        result.accuracy[method], result.selections[method] = {}, {}
    for k in range(1, half + 1):
        for method, chosen in selections(report, k, seeds).items():
            scores = [accuracy(blocks) for blocks in chosen]
            result.accuracy[method][k] = float(np.mean(scores))
            result.selections[method][k] = chosen[0]
            if method == "random":
                result.random_spread[k] = scores
        log.info("%s k=%d done (%d distinct evaluations so far)", name, k, len(cache_acc))
    truth = {"ablation_kl": report.values("ablation_kl", "all"), "ablation_loss": report.values("ablation_loss", "all")}
    for metric, modality in CHEAP_METRICS:
        values = report.values(metric, modality)
        result.spearman[f"{metric}[{modality}]"] = {t: spearman(values, v) for t, v in truth.items()}
    result.spearman["angular_distance(n=1)[all]"] = {
        t: spearman(report.values("angular_distance", "all", span=1), v) for t, v in truth.items()
    }
    t = report.timings
    result.scan_forward_passes = t["ablation_replay_s"] / t["ablation_forward_s"]
    result.timings = {**t, "calibration_s": calibration_s, "evaluations": len(cache_acc), "total_s": time.perf_counter() - started}
    return result


def _plan(blocks: tuple[int, ...], n: int) -> SurgeryPlan:
    return SurgeryPlan(recipe="bench", op="explicit", num_blocks=n, removed=tuple(RemovedBlock(index=i, reason="bench") for i in blocks))


# -- output ---------------------------------------------------------------------------------
def markdown(results: list[TaskResult]) -> str:
    lines = []
    for r in results:
        ks = sorted(next(iter(r.accuracy.values())))
        lines += [
            f"**{r.name}** ({r.num_blocks} blocks, {r.eval_questions} questions, full model {r.full_accuracy:.1%}): "
            "accuracy after removing k blocks",
            "",
            "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---|" + "---:|" * len(ks),
        ]
        for method in METHODS:
            row = r.accuracy[method]
            best = {k: max(r.accuracy[m][k] for m in METHODS) for k in ks}
            cells = [(f"**{row[k]:.1%}**" if row[k] == best[k] else f"{row[k]:.1%}") for k in ks]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Spearman rank agreement with the ablation ground truth:",
            "",
            "| metric | vs ablation_kl | vs ablation_loss |",
            "|---|---:|---:|",
        ]
        for metric, rho in r.spearman.items():
            fmt = lambda v: "—" if v is None else f"{v:+.2f}"  # noqa: E731
            lines.append(f"| {metric} | {fmt(rho['ablation_kl'])} | {fmt(rho['ablation_loss'])} |")
        lines += [
            "",
            f"Ablation scan: {r.scan_forward_passes:.1f} forward passes for {r.num_blocks} blocks (a naive scan: {r.num_blocks}).",
            "",
        ]
    return "\n".join(lines)


def plot(results: list[TaskResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        for method in METHODS:
            ks = sorted(r.accuracy[method])
            ax.plot(ks, [r.accuracy[method][k] for k in ks], marker="o", label=method, linestyle="--" if method == "random" else "-")
        ax.axhline(r.full_accuracy, color="black", linewidth=0.8, linestyle=":", label="full model")
        ax.set_title(f"{r.name} ({r.num_blocks} blocks)")
        ax.set_xlabel("blocks removed")
        ax.set_ylabel("exact-match accuracy")
        ax.set_xticks(sorted(r.accuracy["random"]))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("exports/bench-quality"))
    parser.add_argument("--eval-samples", type=int, default=512, help="evaluation questions per task")
    parser.add_argument("--seeds", type=int, default=5, help="random selections averaged per budget")
    parser.add_argument("--tasks", nargs="+", default=["shapes", HARDER_TASK.task], help="demo tasks to run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    known: dict[str, DemoSettings] = {"shapes": DemoSettings(), HARDER_TASK.task: HARDER_TASK}
    unknown = [t for t in args.tasks if t not in known]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {sorted(known)}")
    results = []
    for task in args.tasks:
        results.append(run_task(task, known[task], cache=default_cache_dir(), eval_limit=args.eval_samples, seeds=args.seeds))
    args.output.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    (args.output / "quality.md").write_text(text + "\n")
    (args.output / "quality.json").write_text(json.dumps([r.__dict__ for r in results], indent=1, default=str) + "\n")
    plot(results, args.output / "quality.png")
    print(text)
    print(f"written: {args.output}/quality.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
