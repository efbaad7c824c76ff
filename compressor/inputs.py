"""Small input files a user hands compressor (recipes, plans, calibration reports, data lines):
read as bounded UTF-8 text, and refused when they parse to text that is not Unicode.

Each failure names the file and what is wrong, as the caller's own error type, so that no
user mistake surfaces as a Python exception ("internal error")."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from .errors import CompressorError


def not_unicode(value: Any) -> bool:
    """Whether parsed JSON/YAML holds a string that is not valid Unicode: an escape such as
    ``"\\ud800"`` (a lone surrogate) parses, but no file, tokenizer or terminal can take it."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (TypeError, ValueError, RecursionError):  # not JSON-like (YAML dates, sets...): the schema says why
        return False
    return False


def read_input_text(path: Path, kind: str, *, max_bytes: int, error: type[CompressorError], fix: str) -> str:
    """The text of a small UTF-8 input file, or ``error`` naming the file and what is wrong.

    Shared by the loaders of recipes, plans and calibration reports. At most ``max_bytes + 1``
    bytes are read, so a huge file passed by mistake (a checkpoint shard) costs nothing.
    """
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise error(f"{kind} '{path}' is a directory, not a file.", fix=fix)
        if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
            raise error(f"{kind} '{path}' is not a regular file.", fix=fix)
        with path.open("rb") as stream:
            data = stream.read(max_bytes + 1)
    except FileNotFoundError:
        raise error(f"{kind} '{path}' does not exist.", fix=fix) from None
    except OSError as problem:
        raise error(f"{kind} '{path}' cannot be read ({problem.strerror or problem}).", fix=fix) from None
    if len(data) > max_bytes:
        raise error(f"{kind} '{path}' is over {max_bytes:,} bytes; no {kind.lower()} is that large.", fix=fix)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as problem:
        raise error(
            f"{kind} '{path}' is not UTF-8 text (byte {problem.start} is {data[problem.start]:#04x}): a binary file?",
            fix=fix,
        ) from None
    # Newlines as text mode reads them (what callers saw before files were read as bytes).
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_json_object(path: Path, kind: str, *, fmt: str, max_bytes: int, fix: str) -> dict[str, Any]:
    """A compressor JSON file (plan, calibration report) as a dict whose ``format`` is ``fmt``;
    an `InputError` naming the file otherwise: unreadable, not JSON, nested too deeply, not an
    object, text that is not Unicode, or another format."""
    from .errors import InputError

    text = read_input_text(path, kind, max_bytes=max_bytes, error=InputError, fix=fix)
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deeply
        raise InputError(f"{kind} '{path}' is not JSON ({error}).", fix=fix) from None
    if not isinstance(raw, dict):
        raise InputError(f"{kind} '{path}' is a JSON {type(raw).__name__}, not an object.", fix=fix)
    if not_unicode(raw):
        raise InputError(f"{kind} '{path}' holds a string that is not valid Unicode (a lone surrogate escape such as \\ud800).", fix=fix)
    if raw.get("format") != fmt:
        raise InputError(f"'{path}' is not a compressor {kind.lower()} (format is {raw.get('format')!r}, expected {fmt!r}).", fix=fix)
    return raw
