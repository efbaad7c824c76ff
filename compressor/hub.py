"""Model references: a local folder or a Hugging Face Hub id, resolved to a local folder.

A Hub id is downloaded with ``snapshot_download`` (weights, configs, tokenizer and processor
files only). Tests never take this path: they build local folders. ``HF_HUB_OFFLINE=1`` makes
a cached id resolve without the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import InputError

# What a checkpoint needs to load and to be re-exported; no optimizer states, no other formats.
_CHECKPOINT_FILES = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "README.md",  # the base model's card: its licence is inherited by the pruned model's card
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: its local folder, and its Hub id when it was one."""

    ref: str
    path: Path
    hub_id: str | None = None
    revision: str | None = None


def resolve_model_ref(ref: str, *, revision: str | None = None) -> ModelSource:
    local = Path(ref).expanduser()
    if local.exists():
        if not local.is_dir():
            raise InputError(
                f"Model path '{ref}' is a file, not a model folder.",
                fix="pass the folder that holds config.json and the *.safetensors files.",
            )
        if not (local / "config.json").is_file():
            raise InputError(
                f"Model folder '{ref}' has no config.json.",
                fix="pass a folder written by save_pretrained (config.json + *.safetensors).",
            )
        return ModelSource(ref=ref, path=local.resolve())
    if not _HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise InputError(
            f"Model path '{ref}' does not exist.",
            fix="pass an existing model folder, or a Hugging Face Hub id such as 'org/name'.",
        )
    return ModelSource(ref=ref, path=_download(ref, revision), hub_id=ref, revision=revision)


def _download(hub_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(hub_id, revision=revision, allow_patterns=_CHECKPOINT_FILES)
    except RepositoryNotFoundError:
        raise InputError(
            f"'{hub_id}' is neither a local folder nor a Hub repository you can access.",
            fix="check the id (and `huggingface-cli login` for gated or private models).",
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise InputError(
            f"Could not download '{hub_id}' from the Hugging Face Hub ({type(error).__name__}: {error}).",
            fix="check the network, or download it once and pass the local folder.",
        ) from None
    return Path(folder)


def base_license(folder: Path) -> str | None:
    """The ``license`` in the front matter of ``folder/README.md`` (a Hub model card), if any."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        license_ = (metadata_load(card) or {}).get("license")
    except (OSError, ValueError, yaml.YAMLError):  # an unreadable card, or broken front matter, states no licence
        return None
    return str(license_) if license_ else None
