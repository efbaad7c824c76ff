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
    # Whether code shipped with the model (``auto_map`` + *.py) may run: only when the user
    # said so (--trust-remote-code). Every transformers load passes it explicitly.
    trust_remote_code: bool = False

    @property
    def public_name(self) -> str:
        """How published files name this model: the Hub id, or just the folder's name (a
        local path says things about the machine, such as a user name)."""
        return self.hub_id or self.path.name


def resolve_model_ref(ref: str, *, revision: str | None = None, trust_remote_code: bool = False) -> ModelSource:
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
        return ModelSource(ref=ref, path=local.resolve(), trust_remote_code=trust_remote_code)
    if not _HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise InputError(
            f"Model path '{ref}' does not exist.",
            fix="pass an existing model folder, or a Hugging Face Hub id such as 'org/name'.",
        )
    path = _download(ref, revision, code=trust_remote_code)
    return ModelSource(ref=ref, path=path, hub_id=ref, revision=revision, trust_remote_code=trust_remote_code)


def _download(hub_id: str, revision: str | None, *, code: bool = False) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        # The model's own Python files only when the user trusts them; never otherwise.
        patterns = [*_CHECKPOINT_FILES, "*.py"] if code else _CHECKPOINT_FILES
        folder = snapshot_download(hub_id, revision=revision, allow_patterns=patterns)
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
