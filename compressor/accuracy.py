"""Answer accuracy of a model on labelled samples (greedy generation, normalised match).

The demo reports it for the original and the pruned model; the validation report builds on
the same scoring, so both models are always judged by one definition.
"""

from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .data import Sample, build_batch, tokenizer_of

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


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
def generate_answers(model: Any, processor: Any, samples: list[Sample], *, batch_size: int = 32, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers (decoded, special tokens dropped), one per sample, in order."""
    tokenizer = tokenizer_of(processor)
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        # Left padding: every row's prompt ends where generation starts.
        batch = build_batch(processor, chunk, with_answer=False, padding_side="left").to(device)
        output = model.generate(
            **batch.inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, batch.inputs["input_ids"].shape[1] :]
        answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


def answer_accuracy(model: Any, processor: Any, samples: list[Sample], *, batch_size: int = 32, max_new_tokens: int = 8) -> AccuracyResult:
    labelled = [s for s in samples if s.answer is not None]
    if not labelled:
        raise ValueError("answer_accuracy needs samples with an 'answer'")
    predictions = generate_answers(model, processor, labelled, batch_size=batch_size, max_new_tokens=max_new_tokens)
    result = AccuracyResult()
    for sample, prediction in zip(labelled, predictions):
        expected, got = normalize_answer(sample.answer or ""), normalize_answer(prediction)
        result.records.append(
            AccuracyRecord(
                prompt=sample.prompt,
                image=str(sample.image) if sample.image else None,
                answer=sample.answer or "",
                prediction=prediction,
                exact=got == expected,
                contains=bool(expected) and re.search(rf"\b{re.escape(expected)}\b", got) is not None,
            )
        )
    return result
