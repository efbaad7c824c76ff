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
from .loading import input_device

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
    device = input_device(model)
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
                image=sample.image.name if sample.image else None,  # the report is published: no local path
                answer=sample.answer or "",
                prediction=prediction,
                exact=got == expected,
                contains=bool(expected) and re.search(rf"\b{re.escape(expected)}\b", got) is not None,
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
def choice_accuracy(model: Any, processor: Any, samples: list[Sample], *, batch_size: int = 16) -> dict[str, Any]:
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
    """Perplexity of the text-only samples (prompt and answer as formatted), over every token."""
    texts = [s for s in samples if s.image is None]
    if not texts:
        return {"n": 0, "perplexity": None}
    device = input_device(model)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = build_batch(processor, texts[start : start + batch_size], with_answer=True).to(device)
        logits = model(**batch.inputs, use_cache=False).logits.float()
        targets = batch.inputs["input_ids"][:, 1:]
        valid = batch.inputs["attention_mask"][:, 1:].bool() & batch.inputs["attention_mask"][:, :-1].bool()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1][valid], targets[valid], reduction="sum")
        total_nll += float(nll)
        total_tokens += int(valid.sum())
    return {"n": len(texts), "tokens": total_tokens, "perplexity": float(torch.exp(torch.tensor(total_nll / total_tokens)))}


@torch.no_grad()
def fidelity(base: Any, pruned: Any, processor: Any, samples: list[Sample], *, batch_size: int = 16) -> dict[str, Any]:
    """How closely the pruned model's next-token distributions follow the original's.

    Teacher-forced on the reference answers: at every answer position (or, for samples
    without an answer, the position that predicts the first answer token), KL(base || pruned)
    of the next-token distributions and whether both put the same token first. Labels are
    not needed: this measures drift from the original, not correctness.
    """
    kl_sum, agree, positions = 0.0, 0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = build_batch(processor, chunk, with_answer=True)
        if not batch.answer_mask.any():
            # No answers: compare the distribution for the first token after each prompt.
            batch = build_batch(processor, chunk, with_answer=False, padding_side="left")
            batch.answer_mask[:, -1] = True
            targets_mask = batch.answer_mask
            p, q = (_last_logprobs(m, batch) for m in (base, pruned))
        else:
            p, targets_mask = _answer_logprobs(base, batch)
            q, _ = _answer_logprobs(pruned, batch)
            q = q.to(p.device)
            targets_mask = targets_mask.to(p.device)
        p, q = p[targets_mask], q[targets_mask]
        kl_sum += float((p.exp() * (p - q)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        positions += int(targets_mask.sum())
    return {
        "n_positions": positions,
        "kl_mean": kl_sum / positions if positions else None,
        "top1_agreement": agree / positions if positions else None,
    }


def _last_logprobs(model: Any, batch: Any) -> torch.Tensor:
    device = input_device(model)
    logits = model(**batch.to(device).inputs, use_cache=False).logits.float()
    return torch.log_softmax(logits, dim=-1).cpu()
