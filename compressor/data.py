"""Calibration/evaluation samples: the JSONL format and turning samples into model inputs.

One sample per line: ``{"image": "path relative to the file", "prompt": "...", "answer": "..."}``
(``image`` optional, ``answer`` optional). Inputs are always built with the model's own
processor or tokenizer, through its chat template when it has one: families differ in how
image tokens are expanded (FACTS.md), and only the processor knows. Evaluation may ask for
the raw text instead (`TextFormat`): plain text is scored as written, without a template.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import re
import stat
import struct
import typing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import InputError
from .inputs import not_unicode

# The largest image accepted, in pixels. VLM processors resize their input to a few
# megapixels at most, so this admits any photo a camera or phone writes (48 MP sensors
# included) while refusing, from the header alone, a file whose decode would need gigabytes
# (a 20000x20000 RGB image is 1.2 GB) and would fail minutes in, after the model loaded.
# Ours rather than PIL's MAX_IMAGE_PIXELS: that is process-global and anyone may change it.
MAX_IMAGE_PIXELS = 64_000_000

DATA_FIX = (
    "each line must be a JSON object with a string 'prompt', and optional string 'answer' and 'image' (a path relative to the data file)."
)


# How a sample's text reaches the model: through its chat template ("chat", what calibration
# and answered samples use) or as the raw text with the tokenizer's own special tokens ("raw").
TextFormat = Literal["chat", "raw"]


@dataclass(frozen=True)
class Sample:
    prompt: str
    answer: str | None = None
    image: Path | None = None
    choices: tuple[str, ...] | None = None  # multiple choice: `answer` is one of them


@dataclass
class Batch:
    """Model inputs plus the positions of answer tokens (for answer-only losses)."""

    inputs: dict[str, torch.Tensor]
    answer_mask: torch.Tensor  # bool (B, T): tokens that belong to the answer

    def to(self, device: torch.device | str) -> Batch:
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.answer_mask.to(device))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as error:
        raise InputError(
            f"File '{path}' cannot be read ({error.strerror or error}).", fix="check that it exists and is readable."
        ) from None
    return digest.hexdigest()


def load_samples(path: Path | str, limit: int | None = None, *, allow_outside: bool = False) -> list[Sample]:
    """Read a JSONL data file and check every image it names, before any model is loaded.

    Every malformed line is reported at once with its line number. An image must lie inside
    the data file's folder (after following symlinks) unless ``allow_outside``: a data file
    from elsewhere must not make compressor read, say, ``/etc/shadow`` into a model input.
    """
    path = Path(path)
    base = path.parent.resolve()
    samples: list[Sample] = []
    problems: list[str] = []
    fixes: dict[str, None] = {DATA_FIX: None}  # ordered, without repeats
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        if limit is not None and len(samples) >= limit:
            break
        try:
            samples.append(_parse_line(line, base, allow_outside=allow_outside))
        except _ImageProblem as error:
            problems.append(f"  line {number}: {error}")
            fixes[error.fix] = None
        except ValueError as error:
            problems.append(f"  line {number}: {error}")
    if problems:
        listed = "\n".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
        raise InputError(f"Data file '{path}' has {len(problems)} malformed line(s):\n{listed}", fix=" ".join(fixes))
    if not samples:
        raise InputError(f"Data file '{path}' holds no samples.", fix="add at least one JSONL line.")
    return samples


def _read_lines(path: Path) -> Iterator[str]:
    """The file's lines as text; a missing, unreadable or binary file is an InputError."""
    fix = 'pass a JSONL text file (UTF-8) with one {"prompt": ..., "answer": ..., "image": ...} per line.'
    if not path.exists():
        raise InputError(f"Data file '{path}' does not exist.", fix=fix)
    if path.is_dir():
        raise InputError(f"Data file '{path}' is a directory, not a file.", fix=fix)
    if not path.is_file():
        raise InputError(f"Data file '{path}' is not a regular file.", fix=fix)
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise InputError(f"Data file '{path}' cannot be read ({error.strerror or error}).", fix="check its permissions.") from None
    # Streamed: a multi-gigabyte file passed by mistake fails at its first bad byte.
    with handle:
        for number, line in enumerate(handle, start=1):
            try:
                # utf-8-sig: editors on Windows start a UTF-8 file with a byte-order mark.
                text = line.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                # A bad byte means a binary file or another encoding: every line would be wrong.
                raise InputError(
                    f"Data file '{path}' is not UTF-8 text (line {number}: byte 0x{line[error.start]:02x} at column {error.start + 1}).",
                    fix=f"{fix} If it is text in another encoding, convert it to UTF-8.",
                ) from None
            yield text


def _parse_line(line: str, base: Path, *, allow_outside: bool) -> Sample:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply to be a sample") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if not_unicode(record):
        raise ValueError("holds a string that is not valid Unicode (a lone surrogate escape such as \\ud800)")
    unknown = set(record) - {"prompt", "answer", "image", "choices"}
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; allowed: prompt, answer, image, choices")
    prompt, answer, image = record.get("prompt"), record.get("answer"), record.get("image")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("'prompt' must be a non-empty string")
    if answer is not None and not isinstance(answer, str):
        raise ValueError("'answer' must be a string")
    image_path = None
    if image is not None:
        if not isinstance(image, str):
            raise ValueError("'image' must be a path string")
        image_path = _check_image(image, base, allow_outside=allow_outside)
    choices = record.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("'choices' must be a list of at least two non-empty strings")
        if answer not in choices:
            raise ValueError("with 'choices', 'answer' must be one of them")
        choices = tuple(choices)
    return Sample(prompt=prompt, answer=answer, image=image_path, choices=choices)


class _ImageProblem(ValueError):
    """What is wrong with one image (a phrase after its name) and how to fix it."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


def _check_image(image: str, base: Path, *, allow_outside: bool) -> Path:
    """The resolved path of a line's ``image``, once it is known to be a readable, intact image
    within MAX_IMAGE_PIXELS: it is decoded only at batch time, minutes later, after the model loaded."""
    try:
        path = (base / image).resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
        raise ValueError(f"image '{image}' cannot be resolved ({error})") from None
    if not allow_outside and not path.is_relative_to(base):
        raise _ImageProblem(
            f"image '{image}' is outside the data file's folder (it is {path})",
            f"keep images in '{base}' or below, or pass --allow-outside-data if you trust this data file.",
        )
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ValueError(f"image '{image}' not found (looked for {path})") from None
    except OSError as error:
        raise ValueError(f"image '{image}' cannot be accessed ({error.strerror or error})") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"image '{image}' is a directory ({path}), not an image file")
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end when read
        raise ValueError(f"image '{image}' is not a regular file ({path})")
    try:
        with _open_image(path) as opened:
            opened.verify()  # the file's structure (PNG chunk checksums, ...), without decoding it
    except _ImageProblem as problem:
        raise _ImageProblem(f"image '{image}' {problem}", problem.fix) from None
    return path


@contextlib.contextmanager
def _open_image(path: Path) -> Iterator[Any]:
    """``Image.open(path)`` (the header only) of an image within MAX_IMAGE_PIXELS. Every way the
    file can fail, on opening or in the caller's block, becomes an _ImageProblem."""
    from PIL import Image, UnidentifiedImageError

    replace = "replace it (export or download it again) or remove its line."
    try:
        with warnings.catch_warnings():
            # PIL warns from its own MAX_IMAGE_PIXELS on; our cap, below, decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise _too_large(f"{width}x{height} pixels")
            yield image
    except _ImageProblem:
        raise
    except FileNotFoundError:
        raise _ImageProblem("does not exist", "restore it or remove its line.") from None
    except IsADirectoryError:
        raise _ImageProblem("is a directory, not an image file", "point 'image' at a file.") from None
    except PermissionError:
        raise _ImageProblem("cannot be read (permission denied)", "make it readable by this user.") from None
    except UnidentifiedImageError:
        raise _ImageProblem("is not an image PIL can read (a wrong extension, or not an image at all)", replace) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Beyond twice its own limit PIL refuses to open the file at all, so only its
        # message tells the size.
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise _too_large(f"{int(pixels[1])} pixels" if pixels else "more pixels than PIL will open") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        # PIL's ways to say truncated or corrupt: "broken PNG file" is a SyntaxError.
        raise _ImageProblem(f"is truncated or corrupt ({error})", replace) from None


def _too_large(size: str) -> _ImageProblem:
    return _ImageProblem(
        f"is too large: {size}, above the {MAX_IMAGE_PIXELS // 1_000_000} megapixel limit",
        "resize it to a few megapixels (the model's processor shrinks it to less than that anyway).",
    )


def tokenizer_of(processor: Any) -> Any:
    """The text tokenizer behind a processor (or the tokenizer itself for text models)."""
    return getattr(processor, "tokenizer", processor)


def is_multimodal(processor: Any) -> bool:
    return hasattr(processor, "image_processor")


def takes_suffix(processor: Any) -> bool:
    """Whether the processor takes the answer apart from the prompt, as ``suffix=`` (PaliGemma).

    Such a model is a prefix-LM: it attends both ways over the prompt and causally over the
    answer, and only the processor's ``token_type_ids`` (with ``labels``) for a suffix switch
    its mask to that form. An answer written into the prompt text would be attended both ways,
    each answer token seeing the ones after it. Read from the keyword arguments the processor
    declares, so any processor that declares ``suffix`` is treated so, whatever its family.
    """
    return _declares_suffix(type(processor))


@functools.cache
def _declares_suffix(processor_class: type) -> bool:
    # transformers 5 names ``suffix`` in the signature; 4.x declares it in the typed text kwargs.
    try:
        parameters = inspect.signature(processor_class.__call__).parameters
    except (TypeError, ValueError):
        return False
    if "suffix" in parameters:
        return True
    try:
        annotation = parameters["kwargs"].annotation
        declared = typing.get_args(annotation)[0]  # Unpack[XProcessorKwargs]
        text_kwargs = typing.get_type_hints(declared)["text_kwargs"]
        return "suffix" in typing.get_type_hints(text_kwargs)
    except (KeyError, IndexError, TypeError, ValueError, NameError, AttributeError):
        return False


def format_prompt(processor: Any, sample: Sample, *, with_answer: bool, text_format: TextFormat = "chat") -> str:
    """The text of one sample: through the chat template when the model has one and
    ``text_format`` is ``"chat"``; the plain layout (no template) with ``"raw"``.

    For a processor that `takes_suffix`, this is the prompt alone: the answer goes separately.
    """
    tokenizer = tokenizer_of(processor)
    multimodal = is_multimodal(processor)
    if takes_suffix(processor):
        # The processor expands the image token and puts BOS after it: <image>…<bos>prompt\n
        return f"{processor.image_token}{sample.prompt}" if multimodal and sample.image else sample.prompt
    template = _chat_template(processor) if text_format == "chat" else None
    answer = sample.answer if with_answer else None
    if template:
        if multimodal:
            parts: list[dict[str, str]] = [{"type": "image"}] if sample.image else []
            user: Any = [*parts, {"type": "text", "text": sample.prompt}]
        else:
            user = sample.prompt
        messages = [{"role": "user", "content": user}]
        if answer is not None:
            reply: Any = [{"type": "text", "text": answer}] if multimodal else answer
            messages.append({"role": "assistant", "content": reply})
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)
    # No template (or raw asked for): the plain layout most base models were trained on.
    text = sample.prompt
    if multimodal and sample.image:
        text = f"{processor.image_token}\n{text}"
    if answer is not None:
        text = f"{text}\n{answer}{tokenizer.eos_token or ''}"
    return text


def _chat_template(processor: Any) -> str | None:
    return getattr(processor, "chat_template", None) or getattr(tokenizer_of(processor), "chat_template", None)


def build_batch(
    processor: Any,
    samples: list[Sample],
    *,
    with_answer: bool,
    max_length: int | None = None,
    padding_side: str = "right",
    mark_answer: bool = True,
    text_format: TextFormat = "chat",
) -> Batch:
    """Tokenise ``samples`` (and their images) into one padded batch.

    With ``with_answer`` the answer is part of the sequence and ``answer_mask`` marks it: the
    prompt alone is tokenised too, and its length is where the answer starts. Without
    ``mark_answer`` that second pass (images included) is skipped and the mask stays empty.
    ``text_format`` is `format_prompt`'s: the chat template, or the raw text.
    """
    tokenizer = tokenizer_of(processor)
    tokenizer.padding_side = padding_side
    full = _encode(processor, samples, with_answer=with_answer, text_format=text_format)
    answer_mask = torch.zeros_like(full["input_ids"], dtype=torch.bool)
    if with_answer and mark_answer and any(s.answer is not None for s in samples):
        prompt_only = _encode(processor, samples, with_answer=False, text_format=text_format)
        prompt_lengths = prompt_only["attention_mask"].sum(dim=1)
        valid = full["attention_mask"].bool()
        # Rank of each real token within its row: 0 for the first non-pad token.
        rank = valid.long().cumsum(dim=1) - 1
        answer_mask = valid & (rank >= prompt_lengths[:, None])
    if max_length is not None and full["input_ids"].shape[1] > max_length:
        full, answer_mask = _truncate(processor, full, answer_mask, max_length, padding_side)
    return Batch(dict(full), answer_mask)


def _encode(processor: Any, samples: list[Sample], *, with_answer: bool, text_format: TextFormat = "chat") -> dict[str, torch.Tensor]:
    texts = [format_prompt(processor, s, with_answer=with_answer, text_format=text_format) for s in samples]
    tokenizer = tokenizer_of(processor)
    templated = text_format == "chat" and bool(_chat_template(processor))
    # A chat template already writes the special tokens (BOS...) it wants; raw text gets the tokenizer's own.
    kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True, "add_special_tokens": not templated}
    if with_answer and takes_suffix(processor) and any(s.answer is not None for s in samples):
        kwargs["suffix"] = [s.answer or "" for s in samples]  # no answer: an empty suffix (just EOS)
    raw_text = text_format == "raw" and all(s.image is None for s in samples)
    if is_multimodal(processor) and not raw_text:  # raw text needs no processor: the tokenizer alone, as for an LLM
        # One list of images per sample: a flat list is read as one sample's images by some
        # processors (Gemma3), as one image per sample by others.
        images = [[_load_image(s.image)] if s.image is not None else [] for s in samples]
        encoded = processor(images=images if any(images) else None, text=texts, **kwargs)
    else:
        encoded = tokenizer(texts, **kwargs)
        # Some tokenizers add token_type_ids unasked; decoder models reject them in generate().
        encoded.pop("token_type_ids", None)
    # A processor's token_type_ids (and labels) mean something and stay: Gemma3 marks image
    # tokens, which attend each other both ways; PaliGemma marks the suffix, and with labels
    # present attends causally there and both ways over the prompt.
    return dict(encoded)


def _load_image(path: Path):
    # load_samples checked the file, but it may have changed since: the model took minutes to load.
    try:
        with _open_image(path) as image:
            return image.convert("RGB")
    except _ImageProblem as problem:
        raise InputError(f"Image '{path}' {problem}.", fix=problem.fix) from None


def _truncate(
    processor: Any,
    encoded: dict[str, torch.Tensor],
    answer_mask: torch.Tensor,
    max_length: int,
    padding_side: str,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    window = slice(0, max_length) if padding_side == "right" else slice(-max_length, None)
    image_token = getattr(processor, "image_token_id", None)
    if image_token is not None:
        before = (encoded["input_ids"] == image_token).sum()
        after = (encoded["input_ids"][:, window] == image_token).sum()
        if before != after:
            raise InputError(
                f"--max-length {max_length} cuts through image tokens (a sample needs {encoded['input_ids'].shape[1]} tokens).",
                fix="raise --max-length (or the recipe's calibration.max_length).",
            )
    truncated = {
        key: value[:, window] if value.dim() == 2 and value.shape == encoded["input_ids"].shape else value for key, value in encoded.items()
    }
    return truncated, answer_mask[:, window]


def sample_length(processor: Any, sample: Sample, *, max_length: int | None = None) -> int:
    """Tokens of one sample with its answer, image tokens included (what a batch row costs)."""
    length = int(_encode(processor, [sample], with_answer=True)["attention_mask"].sum())
    return min(length, max_length) if max_length is not None else length


def plan_batches(
    processor: Any,
    samples: list[Sample],
    *,
    batch_size: int,
    token_budget: int | None = None,
    max_length: int | None = None,
) -> list[list[Sample]]:
    """Group ``samples`` into batches: ``batch_size`` at a time in file order or, with a
    ``token_budget``, sorted by length (longest first) and packed so that a batch's padded
    size, rows × longest row, stays within the budget (at most ``batch_size`` rows; a sample
    longer than the budget gets a batch of its own). Sorting keeps short samples away from
    long ones, so little of a batch is padding."""
    if token_budget is None:
        return [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    lengths = [sample_length(processor, s, max_length=max_length) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: -lengths[i])
    batches: list[list[Sample]] = []
    current: list[int] = []
    for i in order:
        # Longest first: the batch's first row sets its padded width.
        if current and (len(current) + 1 > batch_size or (len(current) + 1) * lengths[current[0]] > token_budget):
            batches.append([samples[j] for j in current])
            current = []
        current.append(i)
    if current:
        batches.append([samples[j] for j in current])
    return batches
