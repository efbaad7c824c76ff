"""Scoring one model (or a pair) on evaluation samples: accuracy, perplexity, fidelity.

Answer accuracy on labelled samples (greedy generation, normalised match) and multiple
choice by log-likelihood; perplexity of plain text; fidelity of a pruned model's next-token
distributions to the original's. The demo reports accuracy for the original and the pruned
model and the validation report builds on the same scoring, so both models are always
judged by one definition.

Which tokens are scored:

- a sample with an ``answer``: its answer tokens, teacher-forced after the prompt;
- a prompt-only text sample (no image, no answer): its text, as raw text by default (no
  chat template; the tokenizer's own special tokens, e.g. BOS, only), every token that has
  one before it (the first, usually BOS, has nothing to be predicted from);
- a prompt-only image sample: every text token of its (templated) prompt.

Perplexity reads prompt-only text samples only, and always as raw text: a chat template's
tokens (system prompt, role headers) are near-certain and would make any model look better
than it is on the text itself. Fidelity reads every sample, at every scored position.
"""

from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from .data import Sample, TextFormat, build_batch, tokenizer_of
from .loading import input_device

# --format: "auto" lays out prompt-only text samples raw and everything else (answers,
# images) through the chat template; "chat" and "raw" force one layout for every sample.
Format = Literal["auto", "chat", "raw"]
FORMATS = ("auto", "chat", "raw")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def is_text(sample: Sample) -> bool:
    """A prompt-only text sample: plain text to model, nothing to answer, no image."""
    return sample.image is None and sample.answer is None


def layout(sample: Sample, text_format: Format) -> TextFormat:
    """How ``sample`` is laid out under ``text_format``: auto is raw for prompt-only text only."""
    if text_format != "auto":
        return text_format
    return "raw" if is_text(sample) else "chat"


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def match(expected: str, prediction: str) -> tuple[bool, bool]:
    """(exact, contains): the normalised prediction equals the normalised answer, or holds it as
    whole words. The one definition of a correct answer, for every figure that scores answers."""
    expected, got = normalize_answer(expected), normalize_answer(prediction)
    return got == expected, bool(expected) and re.search(rf"\b{re.escape(expected)}\b", got) is not None


@dataclass
class AccuracyRecord:
    prompt: str
    image: str | None
    answer: str
    prediction: str
    exact: bool
    contains: bool


@dataclass
class AccuracyResult:
    """Exact-match and contains-match accuracy, with every sample kept for inspection."""

    records: list[AccuracyRecord] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(r.exact for r in self.records) / len(self.records) if self.records else float("nan")

    @property
    def contains_accuracy(self) -> float:
        return sum(r.contains for r in self.records) / len(self.records) if self.records else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": len(self.records),
            "exact_match": self.accuracy,
            "contains_match": self.contains_accuracy,
            "samples": [asdict(r) for r in self.records],
        }


@torch.no_grad()
def generate_answers(
    model: Any, processor: Any, samples: list[Sample], *, batch_size: int = 32, max_new_tokens: int = 8, text_format: Format = "auto"
) -> list[str]:
    """Greedy answers (decoded, special tokens dropped), one per sample, in order."""
    tokenizer = tokenizer_of(processor)
    device = input_device(model)
    answers: list[str] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        # Left padding: every row's prompt ends where generation starts.
        # Chat for questions (auto): the layout the model answers in.
        fmt = "chat" if text_format == "auto" else text_format
        batch = build_batch(processor, chunk, with_answer=False, padding_side="left", text_format=fmt).to(device)
        output = model.generate(
            **batch.inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, batch.inputs["input_ids"].shape[1] :]
        answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


def answer_accuracy(
    model: Any, processor: Any, samples: list[Sample], *, batch_size: int = 32, max_new_tokens: int = 8, text_format: Format = "auto"
) -> AccuracyResult:
    labelled = [s for s in samples if s.answer is not None]
    if not labelled:
        raise ValueError("answer_accuracy needs samples with an 'answer'")
    predictions = generate_answers(
        model, processor, labelled, batch_size=batch_size, max_new_tokens=max_new_tokens, text_format=text_format
    )
    result = AccuracyResult()
    for sample, prediction in zip(labelled, predictions):
        exact, contains = match(sample.answer or "", prediction)
        result.records.append(
            AccuracyRecord(
                prompt=sample.prompt,
                image=sample.image.name if sample.image else None,  # the report is published: no local path
                answer=sample.answer or "",
                prediction=prediction,
                exact=exact,
                contains=contains,
            )
        )
    return result


def _answer_logprobs(model: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (B, T-1, V) of each next token, and the mask of answer targets."""
    device = input_device(model)
    batch = batch.to(device)
    logits = model(**batch.inputs, use_cache=False).logits.float()
    return torch.log_softmax(logits[:, :-1], dim=-1), batch.answer_mask[:, 1:]


@torch.no_grad()
def choice_accuracy(
    model: Any, processor: Any, samples: list[Sample], *, batch_size: int = 16, text_format: Format = "auto"
) -> dict[str, Any]:
    """Multiple choice by log-likelihood: the choice whose tokens the model finds most likely."""
    labelled = [s for s in samples if s.choices]
    if not labelled:
        return {"n": 0, "accuracy": None, "samples": []}
    # One row per (sample, choice), scored teacher-forced as if the choice were the answer.
    rows = [(i, choice) for i, s in enumerate(labelled) for choice in s.choices or ()]
    scores: dict[tuple[int, str], float] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = build_batch(
            processor,
            [Sample(prompt=labelled[i].prompt, answer=c, image=labelled[i].image) for i, c in chunk],
            with_answer=True,
            text_format="chat" if text_format == "auto" else text_format,
        )
        logprobs, targets_mask = _answer_logprobs(model, batch)
        targets = batch.inputs["input_ids"][:, 1:].to(logprobs.device)
        token_logprobs = logprobs.gather(-1, targets[..., None])[..., 0]
        for row, key in enumerate(chunk):
            scores[key] = float(token_logprobs[row][targets_mask[row]].sum())
    records = []
    for i, sample in enumerate(labelled):
        best = max(sample.choices or (), key=lambda c: scores[(i, c)])
        records.append({"prompt": sample.prompt, "answer": sample.answer, "prediction": best, "correct": best == sample.answer})
    return {"n": len(records), "accuracy": sum(r["correct"] for r in records) / len(records), "samples": records}


@torch.no_grad()
def perplexity(model: Any, processor: Any, samples: list[Sample], *, batch_size: int = 16) -> dict[str, Any]:
    """Perplexity of the prompt-only text samples, as raw text, over every token but each one's first.

    ``n`` counts the samples, ``tokens`` the scored tokens (the positions the mean runs over).
    """
    texts = [s for s in samples if is_text(s)]
    device = input_device(model)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = build_batch(processor, texts[start : start + batch_size], with_answer=False, text_format="raw").to(device)
        logits = model(**batch.inputs, use_cache=False).logits.float()
        scored = _scored_targets(processor, batch)
        targets = batch.inputs["input_ids"][:, 1:]
        total_nll += float(torch.nn.functional.cross_entropy(logits[:, :-1][scored], targets[scored], reduction="sum"))
        total_tokens += int(scored.sum())
    value = float(torch.exp(torch.tensor(total_nll / total_tokens))) if total_tokens else None
    return {"n": len(texts), "tokens": total_tokens, "perplexity": value}


@torch.no_grad()
def fidelity(
    base: Any, pruned: Any, processor: Any, samples: list[Sample], *, batch_size: int = 16, text_format: Format = "auto"
) -> dict[str, Any]:
    """How closely the pruned model's next-token distributions follow the original's.

    Teacher-forced, at every scored position (the module docstring says which): the answer
    tokens of answered samples and every token of prompt-only ones. At each position,
    KL(base ‖ pruned) of the next-token distributions and whether both put the same token
    first; the figures are means over all positions. Labels are not needed: this measures
    drift from the original, not correctness.
    """
    kl_sum, agree = 0.0, 0
    positions = {"answer": 0, "prompt": 0}
    answered = [s for s in samples if s.answer is not None]
    # One layout per batch: under auto, prompt-only text (raw) and image prompts (chat) differ.
    groups = [("answer", [s for s in answered if layout(s, text_format) == f], f) for f in ("chat", "raw")]
    groups += [("prompt", [s for s in samples if s.answer is None and layout(s, text_format) == f], f) for f in ("chat", "raw")]
    for kind, group, fmt in groups:
        for start in range(0, len(group), batch_size):
            batch = build_batch(processor, group[start : start + batch_size], with_answer=kind == "answer", text_format=fmt)
            scored = batch.answer_mask[:, 1:] if kind == "answer" else _scored_targets(processor, batch)
            p, q = (_logprobs(m, batch) for m in (base, pruned))
            p, q = p[scored.to(p.device)], q[scored.to(q.device)].to(p.device)
            kl_sum += float((p.exp() * (p - q)).sum())
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            positions[kind] += int(scored.sum())
    total = sum(positions.values())
    return {
        "n_samples": len(samples),
        "n_positions": total,
        "answer_positions": positions["answer"],
        "prompt_positions": positions["prompt"],
        "kl_mean": kl_sum / total if total else None,
        "top1_agreement": agree / total if total else None,
    }


def _scored_targets(processor: Any, batch: Any) -> torch.Tensor:
    """(B, T-1) bool: the targets of a right-padded prompt-only batch that are scored — every
    real token after a real one, except image placeholders (the vision tower fills them; no
    model predicts them)."""
    mask = batch.inputs["attention_mask"].bool()
    scored = mask[:, 1:] & mask[:, :-1]
    image_token = getattr(processor, "image_token_id", None)
    if image_token is not None:
        scored &= batch.inputs["input_ids"][:, 1:] != image_token
    return scored


def _logprobs(model: Any, batch: Any) -> torch.Tensor:
    """Log-probabilities (B, T-1, V) of each next token, on the model's output device."""
    logits = model(**batch.to(input_device(model)).inputs, use_cache=False).logits.float()
    return torch.log_softmax(logits[:, :-1], dim=-1)
