"""`compressor demo`: the whole chain on the built-in model, with accuracy before and after.

Trains (or loads from the cache) the demo LLaVA model, runs the recommended shipped recipe
through `pipeline.run` (calibrate → plan → prune → verified export) and scores the original
and the pruned checkpoint on the evaluation split with the same `answer_accuracy` the
validation report uses. The accuracy figures go to ``OUT/demo.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..accuracy import answer_accuracy
from ..data import load_samples
from ..errors import InputError
from ..loading import load_model
from ..pipeline import run
from ..recipe import load_recipe
from ..staging import staged_file
from .train import ensure_demo_model

log = logging.getLogger(__name__)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# The default recipe: lowest block influence over all tokens, a quarter of the blocks, first
# and last protected (see the note in the README on how it compares with the others).
DEFAULT_RECIPE = RECIPES / "shortgpt.yaml"


@dataclass
class DemoSummary:
    output: Path
    recipe: str
    removed: list[int]
    num_blocks: int
    accuracy_before: float
    accuracy_after: float
    n_eval: int
    params_before: int
    params_after: int
    calibration_s: float
    plan_text: str

    def describe(self) -> str:
        drop = self.accuracy_before - self.accuracy_after
        return "\n".join(
            [
                self.plan_text,
                "",
                f"evaluation accuracy on {self.n_eval} questions (exact match, greedy):",
                f"  original  {self.num_blocks} blocks  {self.accuracy_before:.1%}",
                f"  pruned    {self.num_blocks - len(self.removed)} blocks  {self.accuracy_after:.1%}  (change {-drop:+.1%} points)",
                f"parameters: {self.params_before:,} -> {self.params_after:,} ({self.params_after / self.params_before:.1%})",
                f"calibration took {self.calibration_s:.2f}s",
                f"pruned checkpoint: {self.output / 'hf'}",
            ]
        )


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
    assets = assets or ensure_demo_model(force=retrain, progress=progress)
    result = run(
        recipe_file,
        output,
        model_ref=str(assets.model_dir),
        data=assets.calibration,
        overwrite=overwrite,
        progress=progress,
    )
    eval_samples = load_samples(assets.eval)
    started = time.perf_counter()
    scores = {}
    for name, folder in (("original", assets.model_dir), ("pruned", output / "hf")):
        loaded = load_model(str(folder), device="cpu", dtype="float32")
        scores[name] = answer_accuracy(loaded.model, loaded.processor, eval_samples, batch_size=64)
    log.info("evaluated both models in %.1fs", time.perf_counter() - started)
    summary = DemoSummary(
        output=output.resolve(),
        recipe=recipe_file.recipe.name,
        removed=result.plan.removed_indices,
        num_blocks=result.plan.num_blocks,
        accuracy_before=scores["original"].accuracy,
        accuracy_after=scores["pruned"].accuracy,
        n_eval=len(eval_samples),
        params_before=result.export.params_before,
        params_after=result.export.params_after,
        calibration_s=result.calibration.elapsed_s if result.calibration else 0.0,
        plan_text=result.plan.describe(),
    )
    with staged_file(output / "demo.json", overwrite=True) as staging:
        staging.write_text(
            json.dumps(
                {
                    "recipe": summary.recipe,
                    "removed": summary.removed,
                    "accuracy": {name: score.to_dict() for name, score in scores.items()},
                    "calibration_s": summary.calibration_s,
                },
                indent=1,
            )
        )
    return summary
