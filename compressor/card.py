"""The model card (README.md) of an exported checkpoint: lineage, what was removed, and why.

The card states only what compressor measured or did. It claims no accuracy: that belongs
to the validation report, which is linked when one exists.
"""

from __future__ import annotations

from typing import Any

import yaml

from .hub import ModelSource
from .planner import SurgeryPlan

# How the weights were checked, stated on the card; each export path says what it did.
RELOAD_VERIFIED = (
    "The exported weights were reloaded and their logits compared with the in-memory pruned model before this folder was written."
)


def render_card(
    *,
    name: str,
    source: ModelSource | None,
    family: str,
    multimodal: bool,
    plan: SurgeryPlan,
    params_before: int,
    params_after: int,
    versions: dict[str, str],
    calibration: dict[str, Any] | None = None,
    verification: str = RELOAD_VERIFIED,
) -> str:
    front: dict[str, Any] = {}
    if source is not None and source.hub_id:
        front["base_model"] = source.hub_id
    front["library_name"] = "transformers"
    front["pipeline_tag"] = "image-text-to-text" if multimodal else "text-generation"
    front["tags"] = ["pruned", "depth-pruning", "compressor", family]
    base = (source.hub_id or source.ref) if source else "an unnamed model"
    removed = plan.removed_indices
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {name}",
        "",
        f"`{base}` with {len(removed)} of its {plan.num_blocks} text-decoder blocks removed "
        f"(depth pruning with compressor, recipe `{plan.recipe}`, op `{plan.op}`).",
        "",
        "| | original | pruned |",
        "|---|---:|---:|",
        f"| decoder blocks | {plan.num_blocks} | {len(plan.kept)} |",
        f"| parameters | {params_before:,} | {params_after:,} ({params_after / params_before:.1%}) |",
        "",
        "## Removed blocks",
        "",
        f"Selection: {plan.criterion or plan.op}. Indices are 0-based, in the original numbering.",
        "",
        "| block | reason |",
        "|---:|---|",
        *(f"| {b.index} | {b.reason} |" for b in sorted(plan.removed, key=lambda b: b.index)),
        "",
        f"Kept blocks (original numbering): {plan.kept}.",
        "",
        "## How it was made",
        "",
    ]
    if calibration:
        data = calibration.get("data", {})
        lines.append(
            f"- Calibration: {data.get('num_samples')} samples from `{data.get('path')}` "
            f"(sha256 `{str(data.get('sha256'))[:16]}…`), metrics in `calibration.json`."
        )
    else:
        lines.append("- No calibration: the recipe lists the blocks explicitly.")
    lines += [
        "- `recipe.yaml` is the recipe used; `plan.json` lists the removed blocks with the metric values that chose them.",
        f"- {verification}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".",
        "",
        "## Limitations",
        "",
        "Removing blocks changes the model's behaviour. This card makes no accuracy claim; "
        "compare the original and the pruned model on your own task before relying on it.",
        "",
    ]
    return "\n".join(lines)
