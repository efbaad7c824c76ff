"""The model card (README.md) of a pruned checkpoint: lineage, what was removed and why, how it
was verified, and — when a validation report exists — its accuracy and latency tables, also as
``model-index`` metadata.

One renderer serves both places a card is written: the export (from what it has in memory,
`CardFacts` built by `provenance.write_provenance`) and `push` (from what the folder holds,
`facts_from_folder`). The card states only what compressor measured or did; without a
validation report it makes no accuracy claim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .manifest import load_manifest
from .planner import SurgeryPlan
from .report_render import markdown_excerpt

# How the weights were checked, stated on the card; each export path says what it did.
RELOAD_VERIFIED = (
    "The exported weights were reloaded and their logits compared with the in-memory pruned model before this folder was written."
)
# The Hub knows four relations (adapter, merge, quantized, finetune). A depth-pruned model is
# the base's own weights, fewer of them, with no training: the Hub lists such compressed,
# untrained derivatives under "quantized", and the card's text says what was really done.
BASE_MODEL_RELATION = "quantized"


@dataclass(frozen=True)
class CardFacts:
    """Everything a card states, wherever it was read from."""

    name: str
    plan: SurgeryPlan
    family: str
    multimodal: bool
    params_before: int
    params_after: int
    source: dict[str, Any] = field(default_factory=dict)  # ref, hub_id, revision, license
    versions: dict[str, str] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)  # each with a "detail" sentence
    calibration: dict[str, Any] | None = None
    recipe_text: str | None = None
    command: str | None = None
    architecture: str | None = None
    report: dict[str, Any] | None = None
    report_path: str | None = None  # where the full report sits in the pushed repo
    healing: dict[str, Any] | None = None  # the manifest's record of `compressor heal`, when it trained the weights
    replacement: dict[str, Any] | None = None  # the manifest's record of op replace: a span stood in for by a trained block

    @property
    def pipeline_tag(self) -> str:
        return "image-text-to-text" if self.multimodal else "text-generation"


def facts_from_folder(folder: Path, *, name: str, report: dict[str, Any] | None = None, report_path: str | None = None) -> CardFacts:
    """Read a checkpoint folder written by compressor (its manifest, plan, calibration, recipe, config)."""
    manifest = load_manifest(folder)
    if manifest is None:
        raise InputError(f"'{folder}' has no compressor.json.", fix="pass a folder written by `compressor prune` or `compressor run`.")
    plan = SurgeryPlan.load(folder / "plan.json")
    calibration = folder / "calibration.json"
    recipe = folder / "recipe.yaml"
    config = json.loads((folder / "config.json").read_text())
    return CardFacts(
        name=name,
        plan=plan,
        family=manifest["family"],
        multimodal=bool(manifest["multimodal"]),
        params_before=manifest["params"]["before"],
        params_after=manifest["params"]["after"],
        source=manifest.get("source") or {},
        versions=manifest.get("versions") or {},
        checks=manifest.get("verification") or [],
        calibration=json.loads(calibration.read_text()) if calibration.is_file() else None,
        recipe_text=recipe.read_text() if recipe.is_file() else None,
        command=manifest.get("command"),
        architecture=(config.get("architectures") or [None])[0],
        report=report,
        report_path=report_path,
        healing=manifest.get("healing"),
        replacement=manifest.get("replacement"),
    )


def front_matter(facts: CardFacts, *, license: str | None = None) -> str:
    """The card's YAML metadata, in the Hub's schema (the fields and ``model-index`` layout of
    huggingface_hub's ModelCardData, which tests parse it back with). Written here rather than
    through ModelCardData because importing huggingface_hub's card module costs 0.1 s, a sixth
    of a whole out-of-core prune of a 1 GB checkpoint."""
    import yaml

    hub_id = facts.source.get("hub_id")
    data: dict[str, Any] = {
        "base_model": hub_id or None,
        "library_name": "transformers",
        "license": license or facts.source.get("license") or None,
        "pipeline_tag": facts.pipeline_tag,
        "tags": [
            "pruned",
            "depth-pruning",
            "compressor",
            facts.family,
            *(["healed", "distillation"] if facts.healing else []),
            *(["layer-replacement"] if facts.replacement else []),
        ],
        # Healed weights, or a replaced span's block, were trained: the Hub's relation for a trained derivative.
        "base_model_relation": ("finetune" if facts.healing or facts.replacement else BASE_MODEL_RELATION) if hub_id else None,
    }
    results = eval_results(facts)
    if results:
        data["model-index"] = [{"name": facts.name, "results": results}]
    return yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False, allow_unicode=True).strip()


def eval_results(facts: CardFacts) -> list[dict[str, Any]]:
    """The pruned model's validation figures as ``model-index`` results (accuracies in %): one
    entry for the evaluation dataset, holding every metric."""
    if not facts.report:
        return []
    data = facts.report.get("data") or {}
    dataset = Path(str(data.get("path") or "evaluation data")).name
    metrics = []
    tasks = (facts.report.get("accuracy") or {}).get("tasks") or {}
    for task, entry in tasks.items():
        if not entry or entry.get("pruned") is None:
            continue
        metric = entry.get("metric") or task
        percent = task != "perplexity"
        value = round(100 * entry["pruned"], 2) if percent else round(entry["pruned"], 4)
        metrics.append({"type": metric, "value": value, "name": f"{task} {metric}" + (" (%)" if percent else "")})
    agreement = ((facts.report.get("accuracy") or {}).get("fidelity") or {}).get("top1_agreement")
    if agreement is not None:
        metrics.append({"type": "top1_agreement", "value": round(100 * agreement, 2), "name": "top-1 agreement with the base model (%)"})
    if not metrics:
        return []
    return [{"task": {"type": facts.pipeline_tag}, "dataset": {"name": dataset, "type": "json"}, "metrics": metrics}]


def render_card(facts: CardFacts, *, license: str | None = None, repo_id: str | None = None, warnings: list[str] | None = None) -> str:
    """The README.md; ``warnings`` (a push forced past a failed check) go right under the title."""
    plan = facts.plan
    removed = plan.removed_indices
    base = facts.source.get("hub_id") or facts.source.get("ref") or "an unnamed model"
    lines = [
        "---",
        front_matter(facts, license=license).strip(),
        "---",
        "",
        f"# {facts.name}",
        "",
        *(f"> **Warning:** {w}\n" for w in warnings or []),
        f"`{base}` with {len(removed)} of its {plan.num_blocks} text-decoder blocks removed "
        f"(depth pruning with compressor, recipe `{plan.recipe}`, op `{plan.op}`). "
        + (
            "The pruned model was then healed: trained to match the base model's outputs (see Healing below)."
            if facts.healing
            else "One block was trained to stand in for a span of blocks (see Replaced span below); the other weights are the "
            "base model's own, unchanged."
            if facts.replacement
            else "The remaining weights are the base model's own, unchanged and not retrained."
        ),
        "",
        "| | original | pruned |",
        "|---|---:|---:|",
        f"| decoder blocks | {plan.num_blocks} | {len(plan.kept)} |",
        f"| parameters | {facts.params_before:,} | {facts.params_after:,} ({facts.params_after / facts.params_before:.1%}) |",
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
        *_replacement(facts),
        *_healing(facts),
        *_evaluation(facts),
        *_usage(facts, repo_id),
        "## How it was made",
        "",
        *_making(facts),
        "## Limitations",
        "",
        "Removing blocks changes the model's behaviour. "
        + (
            "The figures above hold for the evaluation data named there; "
            if facts.report
            else "This card makes no accuracy claim (no validation report was published with it); "
        )
        + "compare the original and the pruned model on your own task before relying on it.",
        "",
    ]
    return "\n".join(lines)


def _replacement(facts: CardFacts) -> list[str]:
    """What op replace trained, and how well the stand-in maps its span (measured on held-out samples)."""
    r = facts.replacement
    if not r:
        return []
    span, options = r.get("span") or [], r.get("options") or {}
    lines = [
        "## Replaced span",
        "",
        f"- Blocks {span[0]}..{span[-1]} (original numbering) were replaced by ONE block of the same architecture, "
        f"initialised from block {r.get('initialised_from')} and trained to map the hidden state entering block {span[0]} "
        f"to the one leaving block {span[-1]} (LLM-Streamline). The export was verified by reload against the in-memory model, "
        "not against the original with blocks skipped: the trained block computes something else by design.",
        f"- Objective: {r.get('objective')}; {options.get('steps')} steps, learning rate {options.get('lr')}, batch "
        f"{options.get('batch_size')}, seed {options.get('seed')}; {r.get('train_samples')} training and "
        f"{r.get('held_out_samples')} held-out calibration samples.",
    ]
    for key, values in (r.get("held_out") or {}).items():
        lines.append(f"- Held-out {key} per token (the untrained copy = the plain removal of blocks {span[0]}..{span[-2]}): "
                     f"{values['before']:.4g} before training, {values['after']:.4g} after.")  # fmt: skip
    if r.get("improved") is False:
        lines.append("- Training did not lower the held-out loss: the block keeps its initial (copied) weights.")
    return [*lines, ""]


def _healing(facts: CardFacts) -> list[str]:
    """What `compressor heal` did, as its manifest record states it (figures measured, not claimed)."""
    h = facts.healing
    if not h:
        return []
    data, trained, loss = h.get("data") or {}, h.get("trained") or {}, h.get("loss") or {}
    kl = h.get("held_out_kl") or {}
    objective = "KL(base ‖ healed) of the next-token distributions"
    if loss.get("hidden") not in (None, "none"):
        objective += f" + {loss.get('hidden_weight')} × {loss['hidden']} between each kept block's output and the base model's"
    if loss.get("ce_weight"):
        objective += f" + {loss['ce_weight']} × cross-entropy on the answers"
    lines = [
        "## Healing",
        "",
        f"- Method `{h.get('method')}`: trained {h.get('trained_description', '')} "
        f"({trained.get('parameters', 0):,} parameters); everything else frozen."
        + (" LoRA adapters were merged into their layers: this is a plain checkpoint." if trained.get("lora") else ""),
        f"- Teacher: `{(h.get('teacher') or {}).get('hub_id') or (h.get('teacher') or {}).get('ref')}` (the base model). "
        f"Objective: {objective}.",
        f"- Data: `{data.get('name')}` (sha256 `{str(data.get('sha256'))[:16]}…`), {data.get('train_samples')} training and "
        f"{data.get('held_out_samples')} held-out samples.",
        f"- {h.get('steps')} steps, {h.get('tokens'):,} tokens"
        + (" (stopped early: the held-out KL stopped improving)" if h.get("stopped_early") else "")
        + f"; learning rate {(h.get('options') or {}).get('lr')}, seed {(h.get('options') or {}).get('seed')}.",
    ]
    if kl.get("before") is not None:
        lines.append(f"- Held-out KL(base ‖ model) per token: {kl['before']:.4g} before healing, {kl['after']:.4g} after.")
    if h.get("loss_curve"):
        lines.append(f"- Loss curve: `{h['loss_curve']}`.")
    return [*lines, ""]


def _evaluation(facts: CardFacts) -> list[str]:
    if not facts.report:
        return []
    data = facts.report.get("data") or {}
    env = facts.report.get("environment") or {}
    lines = [
        "## Evaluation",
        "",
        f"Measured by `compressor validate` against `{facts.report.get('models', {}).get('base', {}).get('ref', 'the base model')}` "
        f"on {data.get('num_samples', '?')} samples of `{Path(str(data.get('path', '?'))).name}` "
        f"({env.get('device', '?')}, {env.get('dtype', '?')}).",
        "",
        markdown_excerpt(facts.report, level=3),
    ]
    if facts.report_path:
        link = f"[`{facts.report_path}`]({facts.report_path})"
        lines += [f"The whole report (per-sample results, calibration metrics, environment): {link}.", ""]
    return lines


def _usage(facts: CardFacts, repo_id: str | None) -> list[str]:
    if not facts.architecture:
        return []
    where = repo_id or facts.name
    loader = "AutoProcessor" if facts.multimodal else "AutoTokenizer"
    return [
        "## Use",
        "",
        "```python",
        f"from transformers import {loader}, {facts.architecture}",
        "",
        f'model = {facts.architecture}.from_pretrained("{where}")',
        f'{loader.removeprefix("Auto").lower()} = {loader}.from_pretrained("{where}")',
        "```",
        "",
    ]


def _making(facts: CardFacts) -> list[str]:
    lines = []
    if facts.calibration:
        data = facts.calibration.get("data", {})
        lines.append(
            f"- Calibration: {data.get('num_samples')} samples from `{data.get('path')}` "
            f"(sha256 `{str(data.get('sha256'))[:16]}…`), metrics in `calibration.json`."
        )
    else:
        lines.append("- No calibration: the blocks were listed explicitly.")
    lines.append("- `recipe.yaml` is the recipe used; `plan.json` lists the removed blocks with the metric values that chose them.")
    if facts.source.get("trust_remote_code"):
        lines.append("- Made with `--trust-remote-code`: Python code shipped with the base model ran while it was loaded.")
    lines += [f"- {check['detail']}" for check in facts.checks if check.get("detail")]
    if facts.versions:
        lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(facts.versions.items())) + ".")
    lines.append("")
    if facts.command or facts.recipe_text:
        lines += ["### Reproduce", ""]
        if facts.command:
            lines += ["```bash", facts.command, "```", ""]
        if facts.recipe_text:
            lines += ["with `recipe.yaml`:", "", "```yaml", facts.recipe_text.rstrip(), "```", ""]
    return lines
