"""What a pruned checkpoint says about where it came from, written without torch or transformers.

Owns: the versions a checkpoint, calibration or report records (`environment`, read from the
installed packages' metadata, so nothing is imported for it); what the manifest and the card
say about the base model (`source_facts`); the lineage files beside the weights — recipe.yaml,
plan.json, calibration.json and the model card (`write_provenance`); the tokenizer/processor
files carried byte for byte from the source (`copy_tokenizer_files`); and dropping ``auto_map``
from an exported config.json whose code is not trusted (`strip_remote_code`).

Shared by the in-memory export (`export.py`) and the out-of-core rewrite (`checkpoint.py`), so
both folders carry the same files; kept out of `export.py`, which needs torch, so that the
out-of-core path (`prune --out-of-core`) starts in a fraction of a second.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .card import RELOAD_VERIFIED, CardFacts, render_card
from .hub import ModelSource, base_license

if TYPE_CHECKING:
    from .architectures import Adapter
    from .calibration_report import CalibrationReport
    from .planner import SurgeryPlan

log = logging.getLogger(__name__)

# The tokenizer and processor files a checkpoint may carry. They reach the export byte for byte
# from the source: `save_pretrained` of a loaded tokenizer drops files it does not use (a
# SentencePiece `tokenizer.model` beside `tokenizer.json`), and clients such as llama.cpp's
# converter build their vocabulary from exactly those files.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "*.model",  # SentencePiece: tokenizer.model, spiece.model, ...
    "*.tiktoken",
    "*.jinja",
    "additional_chat_templates/*.jinja",
)


def environment() -> dict[str, str]:
    """The versions of Python, torch and transformers installed here (their distributions'
    metadata: the same strings as ``torch.__version__``, without the seconds of importing them)."""
    return {"python": platform.python_version(), "torch": _installed("torch"), "transformers": _installed("transformers")}


def _installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def write_provenance(
    folder: Path,
    *,
    name: str,
    adapter: Adapter,
    plan: SurgeryPlan,
    params_before: int,
    params_after: int,
    source: ModelSource | None = None,
    recipe_text: str | None = None,
    calibration: CalibrationReport | None = None,
    verification: str = RELOAD_VERIFIED,
) -> None:
    """Write what explains a pruned checkpoint: recipe.yaml, plan.json, calibration.json, README.md.

    Shared by the in-memory export and the out-of-core rewrite (`checkpoint.py`), so both
    folders carry the same lineage files and the same model card.
    """
    if recipe_text is not None:
        (folder / "recipe.yaml").write_text(recipe_text)
    plan.save(folder / "plan.json")
    if calibration is not None:
        calibration.save(folder / "calibration.json")
    facts = CardFacts(
        name=name,
        plan=plan,
        family=adapter.family,
        multimodal=adapter.multimodal,
        params_before=params_before,
        params_after=params_after,
        source=source_facts(source),
        versions=environment(),
        checks=[{"detail": verification}],
        calibration=calibration.to_dict() if calibration else None,
        recipe_text=recipe_text,
    )
    (folder / "README.md").write_text(render_card(facts))


def source_facts(source: ModelSource | None) -> dict[str, Any]:
    """What the manifest and the card say about the base model (never a local path)."""
    if source is None:
        return {}
    return {
        "ref": source.public_name,
        "hub_id": source.hub_id,
        "revision": source.revision,
        "license": base_license(source.path),
        "trust_remote_code": source.trust_remote_code,
    }


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer/processor files of ``folder`` (`TOKENIZER_FILES`), as paths relative to it."""
    found = {path for pattern in TOKENIZER_FILES for path in folder.glob(pattern) if path.is_file()}
    return sorted(path.relative_to(folder) for path in found)


def copy_tokenizer_files(source: Path, out: Path) -> list[Path]:
    """Copy every tokenizer/processor file of ``source`` into ``out``, byte for byte, replacing
    what `save_pretrained` wrote there; returns the copied relative paths."""
    copied = tokenizer_files(source)
    for relative in copied:
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, out / relative)
    return copied


def strip_remote_code(folder: Path, *, trusted: bool) -> None:
    """Drop ``auto_map`` from the exported config.json unless the user trusted the model's code:
    an export must not point loaders at Python files it does not carry (or that nobody vetted)."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if trusted or "auto_map" not in config:
        return
    del config["auto_map"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("dropped auto_map from the exported config.json (the model's own code is not trusted)")
