"""`compressor demo`: the whole chain on the built-in model, ending in a validation verdict.

Trains (or loads from the cache) the demo LLaVA model, runs a shipped recipe through
`pipeline.run` — calibrate → plan → prune → verified export → validation of the pruned
checkpoint against the original on the evaluation split — and summarises the report. Every
figure it prints is read from that report, so the demo and `compressor validate` can never
disagree.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..pipeline import run
from ..recipe import RecipeFile, load_recipe
from ..staging import check_output
from .train import DemoAssets, ensure_demo_model, training_threads

log = logging.getLogger(__name__)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# The recommended recipe for the demo model; see the README's demo section for the numbers.
DEFAULT_RECIPE = RECIPES / "shortgpt.yaml"
# Small latency workloads: the demo runs on a laptop CPU in a few minutes.
LATENCY = {"prompt_lengths": (32,), "new_tokens": 8, "repeats": 5, "warmup": 1, "share_repeats": 2}


@dataclass
class DemoSummary:
    output: Path
    plan_text: str
    report: dict[str, Any]
    verdict_line: str
    calibration_s: float
    healing: str | None = None  # heal's own account, when the recipe has a heal: section

    @property
    def passed(self) -> bool:
        return bool(self.report["verdict"]["passed"])

    def describe(self) -> str:
        models = self.report["models"]
        vqa = self.report["accuracy"]["tasks"]["vqa"]
        fidelity = self.report["accuracy"]["fidelity"]
        lines = [
            self.plan_text,
            "",
            f"evaluation accuracy on {vqa['n']} questions (greedy, exact match):",
            f"  original  {models['base']['num_blocks']} blocks  {vqa['base']:.1%}",
            f"  {'healed' if self.healing else 'pruned':<8}  {models['pruned']['num_blocks']} blocks  {vqa['pruned']:.1%}  "
            f"({(vqa['pruned'] - vqa['base']) * 100:+.1f} points)",
            f"fidelity: top-1 agreement {fidelity['top1_agreement']:.1%}, mean KL {fidelity['kl_mean']:.4f}",
            f"parameters: {models['base']['params']:,} -> {models['pruned']['params']:,}",
        ]
        comparison = (self.report.get("latency") or {}).get("comparison") or {}
        for kind in ("prefill", "decode"):
            for key, row in comparison.get(kind, {}).items():
                ideal = f" (ideal {row['ideal_speedup']:.2f}x)" if row.get("ideal_speedup") else ""
                lines.append(f"{kind} {key}: {row['speedup']:.2f}x faster{ideal}, {self.report['environment']['device']}")
        lines += [
            f"calibration took {self.calibration_s:.2f}s",
            *([self.healing, f"checkpoint before healing: {self.output / 'pruned'}"] if self.healing else []),
            f"{'healed' if self.healing else 'pruned'} checkpoint: {self.output / 'hf'}",
            f"report: {self.output / 'report'}/report.{{json,md,html}}",
            f"publish: compressor push {self.output} --repo-id ORG/NAME --dry-run",
            self.report["verdict"]["summary"],
        ]
        return "\n".join(lines)


def run_demo(
    output: Path | str,
    *,
    recipe: Path | str | None = None,
    retrain: bool = False,
    overwrite: bool = True,
    progress: bool = True,
    assets: Any = None,
) -> DemoSummary:
    output = Path(output)
    recipe_path = Path(recipe) if recipe else DEFAULT_RECIPE
    if not recipe_path.is_file():
        raise InputError(f"Recipe '{recipe_path}' does not exist.", fix="pass --recipe with a file from recipes/.")
    recipe_file = load_recipe(recipe_path)
    # Before minutes of training: the demo replaces only its own earlier output (staging policy).
    check_output(output, overwrite=overwrite, sources=[recipe_path])
    assets = assets or ensure_demo_model(force=retrain, progress=progress)
    recipe_file = with_demo_data(recipe_file, assets)
    heals = recipe_file.recipe.heal is not None
    # Healing trains: with the demo training's thread cap (a busy machine is not swamped);
    # without it, the run (and its latency figures) keeps torch's own thread count.
    with training_threads() if heals else nullcontext():
        result = run(
            recipe_file,
            output,
            model_ref=str(assets.model_dir),
            data=assets.calibration,
            eval_data=assets.eval,
            validate_options={"batch_size": 64, "max_new_tokens": 4, "latency_options": LATENCY},
            overwrite=overwrite,
            device="cpu",
            dtype="float32",
            progress=progress,
        )
    return DemoSummary(
        output=output.resolve(),
        plan_text=result.plan.describe(),
        report=result.validation.report,
        verdict_line=result.validation.verdict_line(),
        calibration_s=result.calibration.elapsed_s if result.calibration else 0.0,
        healing=result.healing.describe() if result.healing is not None else None,
    )


def with_demo_data(recipe_file: RecipeFile, assets: DemoAssets) -> RecipeFile:
    """``recipe_file`` with its heal: section (if any) training on the demo's own training split.

    The demo passes its calibration and evaluation splits to `run` in place of the recipe's; a
    heal: section's ``data`` has no such override, and the demo's data lives in the cache, not
    beside the recipe: so it is replaced by the training split, as the others are. (The text
    exported with the checkpoint stays the recipe's own.)
    """
    section = recipe_file.recipe.heal
    if section is None:
        return recipe_file
    healing = section.model_copy(update={"data": str(assets.train)})
    return replace(recipe_file, recipe=recipe_file.recipe.model_copy(update={"heal": healing}))
