"""What the installed transformers can do, read without importing it.

Owns the installed versions compressor reports (`--version`, `arch list`, manifests read them
elsewhere) and whether a family's modeling code is present: a family added to transformers in
5.x (Qwen3.5, Gemma 4) cannot load under 4.57, and the user should hear which version to
install rather than "model type not recognized"; a family whose code an older release ships in a
form compressor's rules do not handle names its minimum (`Adapter.min_transformers`, with a
"needs transformers ..." note saying why). Both answers come from package metadata and
the package's folder (transformers/models/<module>), so `compressor --version` and
`compressor arch list` stay fast: importing transformers takes seconds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from .architectures import Adapter

# The transformers releases the project supports (pyproject.toml); the install hint names it.
SUPPORTED_TRANSFORMERS = ">=4.57.6,<6"


def installed(package: str) -> str | None:
    """The installed version of ``package``, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@cache
def _models_dir() -> Path | None:
    spec = importlib.util.find_spec("transformers")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def family_available(adapter: Adapter) -> bool:
    """Whether the installed transformers ships this family's modeling code, in a release the family
    supports (`Adapter.min_transformers`: an older release may ship the code and still not do)."""
    models = _models_dir()
    module = adapter.transformers_module or adapter.model_types[0]
    if models is None or not (models / module / "__init__.py").is_file():
        return False
    version = installed("transformers")
    return not (adapter.min_transformers and version) or _release(version) >= _release(adapter.min_transformers)


def _release(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: "5.24.0rc1" -> (5, 24, 0)."""
    numbers = []
    for part in version.split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
        if digits.group() != part:
            break
    return tuple(numbers)


def requirement(adapter: Adapter) -> str:
    """The pip requirement that brings a transformers with this family."""
    return f"transformers>={adapter.min_transformers},<6" if adapter.min_transformers else f"transformers{SUPPORTED_TRANSFORMERS}"


def check_family_available(adapter: Adapter, where: Path | str) -> None:
    """Refuse, before transformers is asked, a family the installed transformers lacks."""
    if family_available(adapter):
        return
    why = next((note for note in adapter.notes if note.startswith("needs transformers")), "")
    raise UnsupportedArchitectureError(
        f"'{where}' is a {adapter.family} model ({', '.join(adapter.architectures)}), whose code this "
        f"transformers ({installed('transformers') or 'not installed'}) does not have"
        + (f" in a release compressor supports ({why})." if why else "."),
        fix=f"install a transformers that has it: pip install '{requirement(adapter)}'.",
    )


def version_line() -> str:
    """`compressor --version`: compressor, transformers and torch versions, and the families."""
    from .architectures import ADAPTERS

    ready = [a.family for a in ADAPTERS if family_available(a)]
    missing = [f"{a.family} (needs {requirement(a)})" for a in ADAPTERS if not family_available(a)]
    lines = [
        f"compressor {installed('compressor') or 'unknown'}, transformers {installed('transformers') or 'not installed'}, "
        f"torch {installed('torch') or 'not installed'}",
        f"families this transformers can handle ({len(ready)}): {', '.join(ready)}",
    ]
    if missing:
        lines.append(f"not with this transformers: {', '.join(missing)}")
    return "\n".join(lines)
