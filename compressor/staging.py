"""All-or-nothing outputs: write into a temporary sibling, rename into place when complete.

A crash, a failed verification or Ctrl-C leaves the target exactly as it was: either absent
or the previous version (with ``overwrite``). Nothing half-written ever carries the real name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError


def refuse_existing(target: Path, overwrite: bool) -> None:
    """Fail early (before any expensive work) when ``target`` exists and may not be replaced."""
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"Output '{target}' already exists.",
            fix="choose another -o path, delete it, or pass --overwrite.",
        )


@contextmanager
def staged_dir(target: Path | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; it becomes ``target`` on success."""
    target = Path(target).resolve()
    refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def staged_file(target: Path | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; it becomes ``target`` on success."""
    target = Path(target).resolve()
    refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def _replace(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    # Move the old output aside first, so a failure between the renames loses nothing.
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    backup.rmdir()
    target.rename(backup)
    staging.rename(target)
    if backup.is_dir():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink(missing_ok=True)
