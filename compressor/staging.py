"""Every output compressor writes: the policy that decides whether it may be written, and the
all-or-nothing way it is written.

The policy, in one place (`check_output`):
- an existing output is replaced only with ``overwrite``, and only when it is empty or was
  written by compressor earlier (a folder carries the hidden marker `MARKER`, or an export
  manifest; a file is a compressor JSON report/plan or JUnit file) — never a user's folder;
- an output that is, contains or lies inside a source of the command (model folder, data,
  recipe, plan, calibration report) is refused, so no command can delete or alter its inputs;
- one writer per target (`output_lock`): an exclusive lock held for the whole command, so a
  second writer fails at once with a message naming the first.

Writing (`staged_dir`, `staged_file`): into a temporary sibling, renamed into place only when
complete. A crash, a failed verification or Ctrl-C leaves the target exactly as it was: absent
or the previous version. Permissions follow the umask (temporary files are created private),
and a read-only or full disk is a user error naming the path, not a crash.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import CompressorError, InputError, InsufficientSpaceError, OutputExistsError

# Written into every folder compressor stages: what makes `--overwrite` allowed to replace it.
MARKER = ".compressor-output"
# Exports written before the marker existed still carry their manifest (manifest.MANIFEST).
_MANIFEST = "compressor.json"
# What a file output of compressor starts with: its JSON reports and plans, its JUnit files.
_FILE_FORMAT_PREFIX = "compressor."
_JUNIT_MARK = b'<testsuite name="compressor.'

# Errors of the file system under the output, not of compressor: reported as user errors.
_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}
_ACCESS_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EEXIST: "a file is in the way of a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "a folder is in the way of a file",
    errno.ENAMETOOLONG: "the name is too long",
    errno.ELOOP: "too many symbolic links",
}

_held: dict[Path, int] = {}  # targets this process holds the lock of -> nesting depth


def check_output(
    target: Path | str, *, overwrite: bool, sources: Iterable[Path | str | None] = (), hosts: Iterable[Path | str] = ()
) -> Path:
    """Refuse ``target`` (before any expensive work) when the policy forbids writing it.

    ``hosts`` are source folders that may hold the output as a new entry (export-onnx writes
    MODEL/onnx), though it may still not be, contain or replace them. Returns the resolved target."""
    resolved = Path(target).expanduser().resolve()
    hosted = {Path(h).expanduser().resolve() for h in hosts}
    for source in [*sources, *hosted]:
        if source is None:
            continue
        src = Path(source).expanduser().resolve()
        if not src.exists():
            continue
        inside = resolved.is_relative_to(src) and not (src in hosted and resolved.parent == src)
        if resolved == src or inside or src.is_relative_to(resolved):
            relation = "is" if resolved == src else "lies inside" if resolved.is_relative_to(src) else "contains"
            raise InputError(
                f"Output '{target}' {relation} the input '{source}'; writing it could destroy or alter that input.",
                fix="choose an -o path outside every input (model folder, data, recipe, plan, calibration report).",
            )
    if resolved.exists() and not (resolved.is_dir() or resolved.is_file()):
        raise InputError(f"Output '{target}' is not a regular file or folder.", fix="choose another -o path.")
    if resolved.exists():
        if not overwrite:
            raise OutputExistsError(f"Output '{target}' already exists.", fix="choose another -o path, delete it, or pass --overwrite.")
        if not written_by_compressor(resolved):
            raise OutputExistsError(
                f"Output '{target}' exists and was not written by compressor, so --overwrite will not replace it "
                "(it would delete whatever it holds).",
                fix="choose another -o path, or empty or remove it yourself if its contents can go.",
            )
    return resolved


def written_by_compressor(path: Path) -> bool:
    """Whether ``path`` is an output compressor wrote earlier (or an empty folder)."""
    if path.is_dir():
        if not any(path.iterdir()):
            return True
        return (path / MARKER).is_file() or (path / _MANIFEST).is_file() or (path / "hf" / _MANIFEST).is_file()
    try:
        with path.open("rb") as handle:
            head = handle.read(1 << 16)
    except OSError:
        return False
    if not head:
        return True
    if _JUNIT_MARK in head:
        return True
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith(_FILE_FORMAT_PREFIX)


@contextmanager
def output_lock(target: Path | str) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` (a lock file beside it) for the block.

    The lock dies with its process (``flock``), so a crash never leaves a stale lock. Nested
    use by the same process (the pipeline around a writer that locks again) is a no-op."""
    resolved = Path(target).expanduser().resolve()
    if resolved in _held:
        _held[resolved] += 1
        try:
            yield
        finally:
            _held[resolved] -= 1
        return
    created = [p for p in resolved.parents if not p.exists()]  # the folders -o asks for, deepest first
    with _disk_errors(resolved):
        resolved.parent.mkdir(parents=True, exist_ok=True)
    lock = resolved.parent / f".{resolved.name}.lock"
    try:
        handle = _acquire(lock, resolved)
    except BaseException:
        _remove_empty(created)
        raise
    _held[resolved] = 1
    try:
        yield
    finally:
        del _held[resolved]
        with suppress(OSError):
            lock.unlink()
        os.close(handle)
        if not resolved.exists():  # a refused or failed command leaves no empty folders behind
            _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with suppress(OSError):
            folder.rmdir()


def _acquire(lock: Path, target: Path) -> int:
    while True:
        with _disk_errors(target):
            handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(handle)
            raise InputError(
                f"Output '{target}' is being written by another compressor process ({holder}).",
                fix="wait for it to finish, or write to another -o path.",
            ) from None
        # The previous holder may have unlinked the file between our open and our lock: then
        # we hold a lock on a file nobody else can find. Retry on the file at the path.
        try:
            same = os.stat(lock).st_ino == os.fstat(handle).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(handle, 0)
            os.pwrite(handle, _holder_line().encode(), 0)
            return handle
        os.close(handle)


def _holder_line() -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return f"pid {os.getpid()}, started {started}: {shlex.join(['compressor', *sys.argv[1:]])[:300]}"


@contextmanager
def staged_dir(
    target: Path | str, *, overwrite: bool = False, sources: Iterable[Path | str | None] = (), only_owned: bool = True
) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; it becomes ``target`` on success.

    ``only_owned=False`` lets ``overwrite`` replace any existing folder: for compressor's own
    cache folders, never for a user-given output."""
    sources = list(sources)
    target = _checked(target, overwrite, sources, only_owned)
    with output_lock(target), _disk_errors(target):
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            (staging / MARKER).write_text("written by compressor; `--overwrite` may replace this folder\n")
            yield staging
            _checked(target, overwrite, sources, only_owned)  # nothing else appeared there meanwhile
            _follow_umask(staging)
            _replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


@contextmanager
def staged_file(target: Path | str, *, overwrite: bool = False, sources: Iterable[Path | str | None] = ()) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; it becomes ``target`` on success."""
    sources = list(sources)
    target = _checked(target, overwrite, sources, True)
    with output_lock(target), _disk_errors(target):
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(handle)
        staging = Path(name)
        try:
            yield staging
            _checked(target, overwrite, sources, True)
            staging.chmod(0o666 & ~_umask())  # mkstemp makes it private
            os.replace(staging, target)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise


def refuse_existing(target: Path, overwrite: bool) -> None:
    """Fail early (before any expensive work) when ``target`` may not be written."""
    check_output(target, overwrite=overwrite)


def _checked(target: Path | str, overwrite: bool, sources: list[Path | str | None], only_owned: bool) -> Path:
    if only_owned:
        return check_output(target, overwrite=overwrite, sources=sources)
    resolved = Path(target).expanduser().resolve()
    if resolved.exists() and not overwrite:
        raise OutputExistsError(f"Output '{target}' already exists.", fix="choose another -o path, delete it, or pass --overwrite.")
    return resolved


def _follow_umask(folder: Path) -> None:
    """Give the staged folder and everything in it the modes the umask asks for: mkdtemp makes
    folders private, and some writers (safetensors) create their files 0600."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextmanager
def _disk_errors(target: Path) -> Iterator[None]:
    """A full or read-only disk while writing ``target`` is the user's to fix: say so by path."""
    try:
        yield
    except OSError as error:
        if isinstance(error, CompressorError):  # pragma: no cover - CompressorError is not an OSError
            raise
        where = error.filename or target
        if error.errno in _DISK_ERRNOS:
            raise InsufficientSpaceError(
                f"Writing '{target}' failed: {_DISK_ERRNOS[error.errno]} ('{where}'). Nothing was written.",
                fix="free some space, or write to another disk with -o.",
            ) from None
        if error.errno in _ACCESS_ERRNOS:
            raise InputError(
                f"Writing '{target}' failed: {_ACCESS_ERRNOS[error.errno]} ('{where}'). Nothing was written.",
                fix="choose an -o path you can write to (a folder that exists or can be created, on a writable disk).",
            ) from None
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
