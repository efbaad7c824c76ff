"""`make bench-heal`: how much of the accuracy block removal cost each healing method wins back.

On trained demo models (cached; trained first when missing, as `make bench-quality` does), for
every removal budget k from 1 block to half the blocks:

- the blocks go by the demo's default recipe (`recipes/shortgpt.yaml`: lowest block influence,
  its protected blocks) with ``count: k``, through the real `prune` call (calibrated on the
  demo's calibration split, a verified checkpoint written), the same blocks for every method;
- the pruned checkpoint is healed by each method `compressor.heal` offers (distill, lora, full,
  projector), through the real `heal` call with the original as teacher, on the demo's
  *training* split (never the evaluation split), for at most a tenth of the demo's own training
  steps (read from the demo's settings) at a batch no larger than the demo's: at most a tenth
  of the samples the model was trained on;
- the recipe op ``replace`` removes the same number of blocks its own way (one trained block
  for the k + 1 consecutive blocks of smallest angular distance, `replace_recipe_for`) through
  the real `prune` call, on the same samples, steps and batch; it is scored against the pruned
  model of the same depth;
- exact-match accuracy of greedy answers on the evaluation split for the original, the pruned
  model and each healed one, each method's training time, and the share of the lost accuracy
  it recovers: (healed − pruned) / (original − pruned), undefined (n/a) when nothing was lost.

The issue's target — ``distill`` recovers at least 80 % of the lost accuracy at k = L/4 — is
checked and printed. Results: a markdown table on stdout, and results.{md,json} + accuracy.png
in the output folder. Checkpoints are written to a temporary folder and deleted: only the
figures are kept. ``--smoke`` runs the same code at k = 1, 2 steps per method, a few
evaluation questions: a check that everything runs, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .accuracy import answer_accuracy
from .data import load_samples
from .demo.run import DEFAULT_RECIPE
from .demo.train import HARDER_TASK, DemoAssets, DemoSettings, default_cache_dir, ensure_demo_model, training_threads
from .errors import InputError
from .loading import load_model
from .recipe import load_recipe

log = logging.getLogger(__name__)

# In the order the table shows them; `replace` joins when compressor.heal offers it.
WANTED_METHODS = ("distill", "lora", "full", "projector", "replace")
# The target: distill recovers at least this share of the lost accuracy at k = L/4.
TARGET_METHOD, TARGET_SHARE = "distill", 0.8
# The healing budget: at most this share of the demo's own training steps.
BUDGET_SHARE = 0.1
# Samples held out of the healing data for heal's held-out KL (early stopping keeps the best
# weights it saw), measured this many times in a run: at heal's defaults (a tenth of the data,
# every tenth of the run) measuring cost more than training on the demo model (first trial: 64
# samples ten times, over half of 208 s for 60 steps at batch 4 on a loaded 2-core machine).
HELD_OUT_SAMPLES = 32
HELD_OUT_MEASUREMENTS = 4
# The same scoring as `make bench-quality` (greedy answers, exact match), so its no-healing
# figures and these are comparable.
EVAL_BATCH, MAX_NEW_TOKENS = 64, 6
SMOKE = {"steps": 2, "eval_samples": 8, "held_out_samples": 4}


@dataclass
class MethodResult:
    accuracy: float | None  # None when heal refused the method (see ``refused``)
    recovered: float | None  # share of the lost accuracy won back; None when nothing was lost
    seconds: float  # heal's own training time (the loop: steps and held-out measurements)
    steps: int
    best_step: int | None  # the step whose weights heal kept (held-out KL), 0 = the pruned weights
    kl_before: float | None
    kl_after: float | None
    trained_parameters: int
    refused: str | None = None
    span: list[int] | None = None  # replace: the blocks one trained block stands in for (original numbering)
    held_out_loss: dict[str, dict[str, float]] | None = None  # replace: the span mapping's held-out loss before/after


@dataclass
class BudgetResult:
    k: int
    removed: list[int]  # original numbering
    pruned_accuracy: float
    methods: dict[str, MethodResult] = field(default_factory=dict)


@dataclass
class TaskResult:
    name: str
    num_blocks: int
    eval_questions: int
    original_accuracy: float
    settings: dict[str, Any]  # the heal settings every method ran with
    budgets: list[BudgetResult] = field(default_factory=list)
    skipped_methods: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def target_k(self) -> int:
        return max(1, self.num_blocks // 4)

    def target(self) -> tuple[bool | None, str]:
        """Whether the issue's target is met, and the sentence that says so (None: not measurable)."""
        found = next((b for b in self.budgets if b.k == self.target_k), None)
        what = f"target ({TARGET_METHOD} recovers >= {TARGET_SHARE:.0%} of the lost accuracy at k = L/4 = {self.target_k})"
        if found is None or TARGET_METHOD not in found.methods:
            return None, f"{what}: not measured in this run"
        share = found.methods[TARGET_METHOD].recovered
        if share is None:
            return None, f"{what}: n/a, removing {self.target_k} blocks lost no accuracy"
        met = share >= TARGET_SHARE
        return met, f"{what}: {'MET' if met else 'NOT MET'} ({share:.0%})"


def recovered(original: float, pruned: float, healed: float) -> float | None:
    """The share of the accuracy removal lost that healing won back; None when nothing was lost
    (the ratio is then undefined, and a gain would be no recovery)."""
    lost = original - pruned
    return (healed - pruned) / lost if lost > 0 else None


def available_methods() -> tuple[list[str], list[str]]:
    """The wanted methods this compressor offers (heal's methods, and the recipe op ``replace``),
    and those it lacks."""
    from .heal import METHODS
    from .recipe import OPS

    offered = {*METHODS, *(["replace"] if "replace" in OPS else [])}
    return [m for m in WANTED_METHODS if m in offered], [m for m in WANTED_METHODS if m not in offered]


def heal_budget(settings: DemoSettings) -> int:
    """Healing steps allowed: a tenth of the demo's own training steps (at least one)."""
    return max(1, int(settings.steps * BUDGET_SHARE))


# -- pieces -------------------------------------------------------------------------------
def recipe_for(k: int, folder: Path) -> Path:
    """The demo's default recipe with its budget set to ``count: k`` (its metric, modality and
    protected blocks kept), written to ``folder``: what `prune` reads, and exports verbatim."""
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    select = {key: value for key, value in data["select"].items() if key not in ("fraction", "count")}
    data["select"] = {**select, "count": k}
    data["name"] = f"bench-heal-k{k}"
    data["description"] = f"{DEFAULT_RECIPE.name} with count {k} (make bench-heal)"
    data.pop("validate", None)  # the bench scores the models itself
    path = folder / f"k{k}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def replace_recipe_for(k: int, folder: Path, *, steps: int, batch_size: int, lr: float | None, rows: int, held_out: float) -> Path:
    """Op ``replace`` removing ``k`` blocks: one trained block stands in for the span of k + 1
    blocks with the smallest angular distance, with the default recipe's protected blocks, on
    the healing methods' samples (``rows``, the same share held out) and steps and batch."""
    protect = yaml.safe_load(DEFAULT_RECIPE.read_text())["select"].get("protect", {})
    train: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "seed": 0, "held_out": held_out}
    if lr is not None:
        train["lr"] = lr
    data = {
        "version": 1,
        "name": f"bench-heal-replace-k{k}",
        "description": f"op replace, n = {k + 1} (make bench-heal)",
        "calibration": {"num_samples": rows},
        "select": {"op": "replace", "n": k + 1, "protect": protect, "train": train},
    }
    path = folder / f"replace-k{k}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def heal_data(assets: DemoAssets, rows: int, folder: Path) -> Path:
    """The first ``rows`` samples of the demo's training split, as a JSONL in ``folder`` (images
    by absolute path): heal splits it into its training and held-out parts. A subset, because
    heal measures its held-out KL on a share of the whole file, and a share of 8,000 samples
    would cost more than the training."""
    lines = [line for line in assets.train.read_text().splitlines() if line.strip()][:rows]
    if len(lines) < rows:
        raise InputError(
            f"The demo's training split {assets.train} has {len(lines)} samples; healing needs {rows}.",
            fix="lower --steps or --batch-size.",
        )
    base = assets.train.parent.resolve()
    out = []
    for line in lines:
        record = json.loads(line)
        if record.get("image"):
            record["image"] = str(base / record["image"])
        out.append(json.dumps(record))
    path = folder / "heal-train.jsonl"
    path.write_text("\n".join(out) + "\n")
    return path


def _accuracy(model: Any, processor: Any, evaluation: list) -> float:
    return answer_accuracy(model, processor, evaluation, batch_size=EVAL_BATCH, max_new_tokens=MAX_NEW_TOKENS).accuracy


# -- one task -----------------------------------------------------------------------------
def run_task(
    name: str,
    assets: DemoAssets,
    *,
    ks: list[int] | None = None,
    methods: list[str] | None = None,
    steps: int | None = None,
    batch_size: int = 4,
    lr: dict[str, float] | None = None,
    hidden_loss: str = "none",
    eval_limit: int | None = None,
    held_out_samples: int = HELD_OUT_SAMPLES,
    on_budget: Callable[[TaskResult], None] | None = None,
) -> TaskResult:
    """Prune the demo model ``assets`` at every budget in ``ks`` (default 1 … L/2, in the order
    given), heal each prune with every method, and score them all on the evaluation split.
    ``on_budget(partial)`` runs after each budget: `main` rewrites the results files there, so
    an interrupted run keeps the budgets it finished."""
    from .heal import HealOptions, heal
    from .heal.replace import ReplaceOptions
    from .pipeline import prune

    started = time.perf_counter()
    budget = heal_budget(assets.settings)
    steps = budget if steps is None else steps
    if not 1 <= steps <= budget:
        raise InputError(
            f"--steps {steps}: the healing budget is at most {budget} steps ({BUDGET_SHARE:.0%} of the demo's {assets.settings.steps}).",
            fix=f"pass --steps between 1 and {budget}.",
        )
    if not 1 <= batch_size <= assets.settings.batch_size:
        raise InputError(
            f"--batch-size {batch_size}: above the demo's own batch ({assets.settings.batch_size}) the budget would exceed a "
            f"tenth of the samples it was trained on.",
            fix=f"pass --batch-size between 1 and {assets.settings.batch_size}.",
        )
    offered, missing = available_methods()
    methods = [m for m in (methods or offered) if m in offered]
    lr = lr or {}
    original = load_model(str(assets.model_dir), device="cpu", dtype="float32")
    num_blocks = original.adapter.num_blocks(original.model.config)
    ks = ks or list(range(1, num_blocks // 2 + 1))
    evaluation = load_samples(assets.eval)[:eval_limit]
    processor = original.processor
    original_accuracy = _accuracy(original.model, processor, evaluation)
    del original
    rows = steps * batch_size + held_out_samples
    settings = {
        "steps": steps,
        "budget_steps": budget,
        "demo_steps": assets.settings.steps,
        "batch_size": batch_size,
        "samples_trained": steps * batch_size,
        "held_out_samples": held_out_samples,
        "eval_every": max(1, steps // HELD_OUT_MEASUREMENTS),
        "hidden_loss": hidden_loss,
        "lr": {
            m: lr.get(m) or ReplaceOptions().lr if m == "replace" else HealOptions(method=m, lr=lr.get(m)).learning_rate for m in methods
        },
        "data": f"the first {rows} samples of the demo's training split",
        "selection": f"{DEFAULT_RECIPE.name} with count k",
    }
    result = TaskResult(name, num_blocks, len(evaluation), original_accuracy, settings, skipped_methods=missing)
    log.info(
        "%s: original %.1f%% on %d questions; healing %d steps at batch %d",
        name,
        original_accuracy * 100,
        len(evaluation),
        steps,
        batch_size,
    )
    with tempfile.TemporaryDirectory(prefix="bench-heal-") as scratch:
        work = Path(scratch)
        data = heal_data(assets, rows, work)
        for k in ks:
            pruned_dir = work / f"k{k}-pruned"
            pruned = prune(
                str(assets.model_dir),
                pruned_dir,
                recipe_file=load_recipe(recipe_for(k, work)),
                data=assets.calibration,
                device="cpu",
                dtype="float32",
            )
            loaded = load_model(str(pruned_dir), device="cpu", dtype="float32")
            entry = BudgetResult(k, list(pruned.plan.removed_indices), _accuracy(loaded.model, loaded.processor, evaluation))
            del loaded
            for method in methods:
                if method == "replace":  # a prune of its own: the trained block is part of the removal
                    entry.methods[method] = _replaced(assets, k, work, data, entry, original_accuracy, evaluation, processor,
                                                      steps=steps, batch_size=batch_size, lr=lr.get(method), rows=rows,
                                                      held_out=held_out_samples / rows)  # fmt: skip
                    continue
                options = HealOptions(
                    method=method,
                    steps=steps,
                    lr=lr.get(method),
                    batch_size=batch_size,
                    hidden_loss=hidden_loss,
                    held_out=held_out_samples / rows,
                    eval_every=max(1, steps // HELD_OUT_MEASUREMENTS),
                    seed=0,
                )
                target = work / f"k{k}-{method}"
                try:
                    healed = heal(
                        pruned_dir,
                        target,
                        teacher=assets.model_dir,
                        data=data,
                        options=options,
                        device="cpu",
                        resume=False,
                        resume_dir=work / f".k{k}-{method}.resume",
                        allow_outside_data=True,  # heal-train.jsonl names the demo's images by absolute path
                    )
                except InputError as error:  # a method this model cannot take (no projector, say): recorded, not hidden
                    entry.methods[method] = MethodResult(None, None, 0.0, 0, None, None, None, 0, refused=error.message)
                    log.warning("%s k=%d %s refused: %s", name, k, method, error.message)
                    continue
                # The tokenizer is the original's byte for byte (heal checks the vocabularies).
                accuracy = _accuracy(healed.model, processor, evaluation)
                entry.methods[method] = MethodResult(
                    accuracy=accuracy,
                    recovered=recovered(original_accuracy, entry.pruned_accuracy, accuracy),
                    seconds=healed.seconds,
                    steps=healed.steps,
                    best_step=_best_step(healed.curve.held_out),
                    kl_before=healed.kl_before,
                    kl_after=healed.kl_after,
                    trained_parameters=healed.trained_parameters,
                )
                log.info(
                    "%s k=%d %s: %.1f%% (pruned %.1f%%) in %.1fs",
                    name,
                    k,
                    method,
                    accuracy * 100,
                    entry.pruned_accuracy * 100,
                    healed.seconds,
                )
                shutil.rmtree(target)  # only the figures are kept
            shutil.rmtree(pruned_dir)
            result.budgets.append(entry)
            result.seconds = time.perf_counter() - started
            if on_budget is not None:
                on_budget(result)
    result.seconds = time.perf_counter() - started
    return result


def _replaced(
    assets: DemoAssets,
    k: int,
    work: Path,
    data: Path,
    entry: BudgetResult,
    original_accuracy: float,
    evaluation: list,
    processor: Any,
    *,
    steps: int,
    batch_size: int,
    lr: float | None,
    rows: int,
    held_out: float,
) -> MethodResult:
    """Op replace at budget ``k`` through the real `prune` call, trained on the healing data;
    compared with the same budget's pruned model (the same depth, other blocks removed)."""
    from .pipeline import prune

    target = work / f"k{k}-replace"
    result = prune(
        str(assets.model_dir),
        target,
        recipe_file=load_recipe(replace_recipe_for(k, work, steps=steps, batch_size=batch_size, lr=lr, rows=rows, held_out=held_out)),
        data=data,
        device="cpu",
        dtype="float32",
        allow_outside_data=True,
    )
    replaced = result.replacement
    loaded = load_model(str(target), device="cpu", dtype="float32")
    accuracy = _accuracy(loaded.model, processor, evaluation)
    del loaded
    shutil.rmtree(target)
    held = replaced.held_out[replaced.options.loss]
    log.info(
        "k=%d replace (span %s): %.1f%% (pruned %.1f%%) in %.1fs",
        k,
        list(replaced.span),
        accuracy * 100,
        entry.pruned_accuracy * 100,
        replaced.seconds,
    )
    return MethodResult(
        accuracy=accuracy,
        recovered=recovered(original_accuracy, entry.pruned_accuracy, accuracy),
        seconds=replaced.seconds,
        steps=len(replaced.curve),
        best_step=None,
        kl_before=None,
        kl_after=None,
        trained_parameters=sum(t.numel() for t in replaced.state.values()),
        span=list(replaced.span),
        held_out_loss={replaced.options.loss: held},
    )


def _best_step(held_out: list[tuple[int, float]]) -> int | None:
    """The step whose weights heal kept: the first lowest held-out KL (step 0 = the pruned weights)."""
    return min(held_out, key=lambda entry: entry[1])[0] if held_out else None


# -- output -------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _methods_of(r: TaskResult) -> list[str]:
    return [m for m in WANTED_METHODS if any(m in b.methods for b in r.budgets)]


def markdown(results: list[TaskResult]) -> str:
    lines: list[str] = []
    for r in results:
        s, methods = r.settings, _methods_of(r)
        rates = ", ".join(f"{m} {s['lr'][m]:g}" for m in methods if m in s["lr"])
        lines += [
            f"**{r.name}** ({r.num_blocks} blocks, {r.eval_questions} evaluation questions, original {r.original_accuracy:.1%}): "
            f"accuracy after removing k blocks ({s['selection']}), then healing {s['steps']} steps "
            f"(budget {s['budget_steps']} = {BUDGET_SHARE:.0%} of the demo's {s['demo_steps']}) at batch {s['batch_size']} "
            f"on {s['data']} ({s['held_out_samples']} held out), hidden loss {s['hidden_loss']}, lr {rates}. "
            "In brackets: the share of the lost accuracy recovered.",
            "",
            "| k | removed | no healing | " + " | ".join(methods) + " |",
            "|---:|---|---:|" + "---:|" * len(methods),
        ]
        for b in _by_k(r):
            cells = []
            for m in methods:
                found = b.methods.get(m)
                if found is None:
                    cells.append("—")
                elif found.accuracy is None:
                    cells.append("refused")
                else:
                    span = f" [{found.span[0]}–{found.span[-1]}]" if found.span else ""  # replace: the span it stands in for
                    cells.append(f"{found.accuracy:.1%} ({_pct(found.recovered)}){span}")
            lines.append(f"| {b.k} | {', '.join(map(str, b.removed))} | {b.pruned_accuracy:.1%} | " + " | ".join(cells) + " |")
        if "replace" in methods:
            lines += ["", "replace: one trained block stands in for the span in brackets (k + 1 blocks, chosen by angular distance), "
                      "trained on the same samples and steps; compared with the pruned model of the same depth."]  # fmt: skip
        lines += ["", "Training time (heal's loop, seconds; best step kept by held-out KL, 0 = the pruned weights):", ""]
        lines += ["| k | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
        for b in _by_k(r):
            cells = []
            for m in methods:
                found = b.methods.get(m)
                if found is None or found.accuracy is None:
                    cells.append("—")
                else:
                    cells.append(f"{found.seconds:.1f}" + (f" (step {found.best_step})" if found.best_step is not None else ""))
            lines.append(f"| {b.k} | " + " | ".join(cells) + " |")
        refusals = {f"{m}: {f.refused}" for b in r.budgets for m, f in b.methods.items() if f.refused}
        lines.append("")
        for refusal in sorted(refusals):
            lines.append(f"Refused by heal — {refusal}")
        if r.skipped_methods:
            lines.append(f"Not offered by this compressor.heal (skipped): {', '.join(r.skipped_methods)}.")
        lines += [r.target()[1], f"Wall time: {r.seconds / 60:.1f} min for the budgets above (loading, pruning, healing, scoring).", ""]
    return "\n".join(lines)


def _by_k(r: TaskResult) -> list[BudgetResult]:
    """The budgets in order of k (a run may measure them in any order: the target's first)."""
    return sorted(r.budgets, key=lambda b: b.k)


def plot(results: list[TaskResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        budgets = _by_k(r)
        ks = [b.k for b in budgets]
        ax.plot(ks, [b.pruned_accuracy for b in budgets], marker="o", color="black", linestyle="--", label="no healing")
        for m in _methods_of(r):
            points = [(b.k, b.methods[m].accuracy) for b in budgets if m in b.methods and b.methods[m].accuracy is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=m)
        ax.axhline(r.original_accuracy, color="black", linewidth=0.8, linestyle=":", label="original")
        ax.set_title(f"{r.name} ({r.num_blocks} blocks, {r.settings['steps']} heal steps)")
        ax.set_xlabel("blocks removed")
        ax.set_ylabel("exact-match accuracy")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: list[TaskResult], output: Path) -> str:
    """results.md, results.json and accuracy.png in ``output``; returns the markdown."""
    output.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    (output / "results.md").write_text(text + "\n")
    payload = [{**asdict(r), "target": dict(zip(("met", "summary"), r.target()))} for r in results]
    (output / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(results, output / "accuracy.png")
    return text


def load_results(path: Path) -> list[TaskResult]:
    """The results a run wrote to results.json, as the objects it wrote them from."""
    results = []
    for raw in json.loads(path.read_text()):
        raw.pop("target", None)
        budgets = [
            BudgetResult(b["k"], b["removed"], b["pruned_accuracy"], {m: MethodResult(**f) for m, f in b["methods"].items()})
            for b in raw.pop("budgets")
        ]
        results.append(TaskResult(**raw, budgets=budgets))
    return results


def _rates(given: list[str]) -> dict[str, float]:
    rates = {}
    for item in given:
        method, _, value = item.partition("=")
        if method not in WANTED_METHODS or not value:
            raise argparse.ArgumentTypeError(f"--lr {item!r}: write METHOD=RATE, METHOD one of {', '.join(WANTED_METHODS)}")
        rates[method] = float(value)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("exports/bench-heal"))
    parser.add_argument("--tasks", nargs="+", default=["shapes", HARDER_TASK.task], help="demo tasks (each trained once, cached)")
    parser.add_argument("--ks", nargs="+", type=int, help="removal budgets (default 1 … L/2)")
    parser.add_argument("--methods", nargs="+", choices=WANTED_METHODS, help="healing methods (default: every one heal offers)")
    parser.add_argument("--steps", type=int, help="healing steps (default and maximum: a tenth of the demo's training steps)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per healing step (default: heal's)")
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=RATE", help="learning rates (default: heal's per method)")
    parser.add_argument("--hidden-loss", default="none", choices=("none", "mse", "cosine"))
    parser.add_argument("--eval-samples", type=int, default=512, help="evaluation questions per task")
    parser.add_argument("--smoke", action="store_true", help="k=1, 2 steps per method, 8 questions: runs, measures nothing")
    parser.add_argument("--render", action="store_true", help="only rewrite results.md and accuracy.png from OUTPUT/results.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.render:
        print(write(load_results(args.output / "results.json"), args.output))
        return 0
    try:
        rates = _rates(args.lr)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    known = {"shapes": DemoSettings(), HARDER_TASK.task: HARDER_TASK}
    unknown = [t for t in args.tasks if t not in known]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {sorted(known)}")
    smoke = dict(ks=[1], steps=SMOKE["steps"], eval_limit=SMOKE["eval_samples"], held_out_samples=SMOKE["held_out_samples"])
    results: list[TaskResult] = []
    # Training threads as the demo trains: capped, so a shared machine is not swamped.
    with training_threads():
        torch.manual_seed(0)
        for task in args.tasks:
            assets = ensure_demo_model(default_cache_dir(), settings=known[task], progress=True)
            chosen = dict(ks=args.ks, steps=args.steps, eval_limit=args.eval_samples, held_out_samples=HELD_OUT_SAMPLES)
            done = list(results)
            results.append(
                run_task(
                    task,
                    assets,
                    methods=args.methods,
                    batch_size=args.batch_size,
                    lr=rates,
                    hidden_loss=args.hidden_loss,
                    on_budget=lambda partial, done=done: write([*done, partial], args.output),
                    **(smoke if args.smoke else chosen),
                )
            )
    text = write(results, args.output)
    print(text)
    print(f"written: {args.output}/results.{{md,json}}, {args.output}/accuracy.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
