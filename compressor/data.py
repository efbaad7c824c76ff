"""Calibration/evaluation samples: the JSONL format and turning samples into model inputs.

One sample per line: ``{"image": "path relative to the file", "prompt": "...", "answer": "..."}``
(``image`` optional, ``answer`` optional). Inputs are always built with the model's own
processor or tokenizer, through its chat template when it has one: families differ in how
image tokens are expanded (FACTS.md), and only the processor knows.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InputError


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
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_samples(path: Path | str, limit: int | None = None) -> list[Sample]:
    """Read a JSONL data file; every malformed line is reported with its line number."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"Data file '{path}' does not exist.",
            fix='pass a JSONL file with one {"prompt": ..., "answer": ..., "image": ...} per line.',
        )
    samples: list[Sample] = []
    problems: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if limit is not None and len(samples) >= limit:
                break
            try:
                samples.append(_parse_line(line, path.parent))
            except ValueError as error:
                problems.append(f"  line {number}: {error}")
    if problems:
        listed = "\n".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
        raise InputError(
            f"Data file '{path}' has {len(problems)} malformed line(s):\n{listed}",
            fix="each line must be a JSON object with a string 'prompt', and optional string "
            "'answer' and 'image' (a path relative to the data file).",
        )
    if not samples:
        raise InputError(f"Data file '{path}' holds no samples.", fix="add at least one JSONL line.")
    return samples


def _parse_line(line: str, base: Path) -> Sample:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
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
        image_path = (base / image).resolve()
        if not image_path.is_file():
            raise ValueError(f"image '{image}' not found (looked for {image_path})")
    choices = record.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("'choices' must be a list of at least two non-empty strings")
        if answer not in choices:
            raise ValueError("with 'choices', 'answer' must be one of them")
        choices = tuple(choices)
    return Sample(prompt=prompt, answer=answer, image=image_path, choices=choices)


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
    try:
        annotation = inspect.signature(processor_class.__call__).parameters["kwargs"].annotation
        declared = typing.get_args(annotation)[0]  # Unpack[XProcessorKwargs]
        text_kwargs = typing.get_type_hints(declared)["text_kwargs"]
        return "suffix" in typing.get_type_hints(text_kwargs)
    except (KeyError, IndexError, TypeError, ValueError, NameError, AttributeError):
        return False


def format_prompt(processor: Any, sample: Sample, *, with_answer: bool) -> str:
    """The text of one sample, through the chat template when the model has one.

    For a processor that `takes_suffix`, this is the prompt alone: the answer goes separately.
    """
    tokenizer = tokenizer_of(processor)
    multimodal = is_multimodal(processor)
    if takes_suffix(processor):
        # The processor expands the image token and puts BOS after it: <image>…<bos>prompt\n
        return f"{processor.image_token}{sample.prompt}" if multimodal and sample.image else sample.prompt
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
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
    # No template: the plain layout most base models were trained on.
    text = sample.prompt
    if multimodal and sample.image:
        text = f"{processor.image_token}\n{text}"
    if answer is not None:
        text = f"{text}\n{answer}{tokenizer.eos_token or ''}"
    return text


def build_batch(
    processor: Any,
    samples: list[Sample],
    *,
    with_answer: bool,
    max_length: int | None = None,
    padding_side: str = "right",
    mark_answer: bool = True,
) -> Batch:
    """Tokenise ``samples`` (and their images) into one padded batch.

    With ``with_answer`` the answer is part of the sequence and ``answer_mask`` marks it: the
    prompt alone is tokenised too, and its length is where the answer starts. Without
    ``mark_answer`` that second pass (images included) is skipped and the mask stays empty.
    """
    tokenizer = tokenizer_of(processor)
    tokenizer.padding_side = padding_side
    full = _encode(processor, samples, with_answer=with_answer)
    answer_mask = torch.zeros_like(full["input_ids"], dtype=torch.bool)
    if with_answer and mark_answer and any(s.answer is not None for s in samples):
        prompt_only = _encode(processor, samples, with_answer=False)
        prompt_lengths = prompt_only["attention_mask"].sum(dim=1)
        valid = full["attention_mask"].bool()
        # Rank of each real token within its row: 0 for the first non-pad token.
        rank = valid.long().cumsum(dim=1) - 1
        answer_mask = valid & (rank >= prompt_lengths[:, None])
    if max_length is not None and full["input_ids"].shape[1] > max_length:
        full, answer_mask = _truncate(processor, full, answer_mask, max_length, padding_side)
    return Batch(dict(full), answer_mask)


def _encode(processor: Any, samples: list[Sample], *, with_answer: bool) -> dict[str, torch.Tensor]:
    texts = [format_prompt(processor, s, with_answer=with_answer) for s in samples]
    tokenizer = tokenizer_of(processor)
    has_template = bool(getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None))
    # A chat template already writes the special tokens (BOS...) it wants.
    kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True, "add_special_tokens": not has_template}
    if with_answer and takes_suffix(processor) and any(s.answer is not None for s in samples):
        kwargs["suffix"] = [s.answer or "" for s in samples]  # no answer: an empty suffix (just EOS)
    if is_multimodal(processor):
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
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise InputError(f"Image '{path}' cannot be read ({error}).", fix="replace or remove it.") from None


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
