"""Training the demo model once, and caching it with its data under the user's cache folder.

`ensure_demo_model` generates the shapes dataset, trains the small LLaVA on the answer
tokens only (deterministic seed, AdamW with warm-up and cosine decay) and saves model,
processor, data and a training summary into a cache folder whose name carries a hash of the
settings: changed settings train a new model, unchanged ones reuse the cached one. The folder
is staged, so an interrupted training never leaves a cache entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import build_batch, load_samples
from ..staging import staged_dir
from .model import build_demo_model
from .shapes import DemoSplits, generate_dataset, vocabulary

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the dataset or model code changes what a setting means


@dataclass(frozen=True)
class DemoSettings:
    seed: int = 0
    n_train: int = 8000
    n_calibration: int = 64
    n_eval: int = 500
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01

    def key(self) -> str:
        payload = json.dumps({"version": CACHE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class DemoAssets:
    root: Path
    model_dir: Path
    train: Path
    calibration: Path
    eval: Path
    summary: dict[str, Any] = field(default_factory=dict)


def cache_root() -> Path:
    if os.environ.get("COMPRESSOR_CACHE"):
        return Path(os.environ["COMPRESSOR_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "compressor"


def _assets(root: Path) -> DemoAssets:
    data = root / "data"
    summary = json.loads((root / "training.json").read_text())
    return DemoAssets(
        root=root,
        model_dir=root / "model",
        train=data / "train.jsonl",
        calibration=data / "calibration.jsonl",
        eval=data / "eval.jsonl",
        summary=summary,
    )


def ensure_demo_model(
    cache_dir: Path | None = None, *, settings: DemoSettings = DemoSettings(), force: bool = False, progress: bool = True
) -> DemoAssets:
    """The trained demo model and its data: from the cache, or made now (minutes on a CPU)."""
    root = (cache_dir or cache_root()) / "demo" / f"v{CACHE_VERSION}-{settings.key()}"
    if root.is_dir() and (root / "training.json").is_file() and not force:
        log.info("using the cached demo model in %s", root)
        return _assets(root)
    log.info("training the demo model (once; cached in %s)", root)
    with staged_dir(root, overwrite=True) as staging:
        splits = generate_dataset(
            staging / "data",
            seed=settings.seed,
            n_train=settings.n_train,
            n_calibration=settings.n_calibration,
            n_eval=settings.n_eval,
        )
        model, processor = build_demo_model(vocabulary(), settings.seed)
        summary = train(model, processor, splits, settings, progress=progress)
        model.save_pretrained(staging / "model")
        processor.save_pretrained(staging / "model")
        (staging / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return _assets(root)


def _encode(processor: Any, samples: list, chunk: int = 256) -> dict[str, torch.Tensor]:
    """All training samples as padded tensors, encoded once (the processor is the slow part)."""
    parts = [build_batch(processor, samples[i : i + chunk], with_answer=True) for i in range(0, len(samples), chunk)]
    width = max(p.inputs["input_ids"].shape[1] for p in parts)

    def pad(t: torch.Tensor, value: int | bool) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)

    pad_id = processor.tokenizer.pad_token_id
    return {
        "input_ids": torch.cat([pad(p.inputs["input_ids"], pad_id) for p in parts]),
        "attention_mask": torch.cat([pad(p.inputs["attention_mask"], 0) for p in parts]),
        "pixel_values": torch.cat([p.inputs["pixel_values"] for p in parts]),
        "answer_mask": torch.cat([pad(p.answer_mask, False) for p in parts]),
    }


def train(model: Any, processor: Any, splits: DemoSplits, settings: DemoSettings, *, progress: bool = True) -> dict[str, Any]:
    """Train on the answer tokens of the train split; returns a summary (steps, seconds, loss)."""
    from tqdm.auto import tqdm

    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    data = _encode(processor, load_samples(splits.train))
    encoded_s = time.perf_counter() - started
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        # Linear warm-up, then cosine decay to zero: stable from a random start in few steps.
        return min(1.0, (step + 1) / settings.warmup) * 0.5 * (1 + math.cos(math.pi * step / settings.steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(settings.seed)
    n = data["input_ids"].shape[0]
    smoothed = None
    model.train()
    with tqdm(total=settings.steps, desc="train demo model", unit="step", disable=not progress) as bar:
        for _ in range(settings.steps):
            index = torch.randint(0, n, (settings.batch_size,), generator=generator)
            mask = data["attention_mask"][index]
            width = int(mask.sum(dim=1).max())  # right-padded: drop all-padding columns
            ids, mask, answer = data["input_ids"][index, :width], mask[:, :width], data["answer_mask"][index, :width]
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=data["pixel_values"][index], use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1][answer[:, 1:]], ids[:, 1:][answer[:, 1:]])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
            bar.set_postfix(loss=f"{smoothed:.3f}")
            bar.update()
    model.eval()
    return {
        "settings": asdict(settings),
        "train_samples": n,
        "encode_s": round(encoded_s, 2),
        "train_s": round(time.perf_counter() - started - encoded_s, 2),
        "final_loss": round(smoothed or float("nan"), 4),
        "threads": torch.get_num_threads(),
    }
