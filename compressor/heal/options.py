"""What a healing run is asked to do: the methods, and every knob of the training in one frozen
value (`HealOptions`), checked all at once before anything is loaded.

Owns the defaults and the resume key: a checkpoint left by an interrupted run is resumed only by
a run whose options (and inputs) would produce the same weights (`HealOptions.key`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..errors import InputError

# Which parameters train (the loss is always the distillation objective, `losses`):
# distill: every kept decoder block; full: the chosen blocks; lora: low-rank adapters on the
# chosen blocks' linear layers, merged into them at the end; projector: the multimodal projector.
Method = Literal["distill", "lora", "full", "projector"]
METHODS: tuple[str, ...] = ("distill", "lora", "full", "projector")
HIDDEN_LOSSES: tuple[str, ...] = ("mse", "cosine", "none")
FORMATS: tuple[str, ...] = ("auto", "chat", "raw")
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
# Steps when neither --steps nor --token-budget is given. A starting point, not a measured
# optimum: the held-out KL (and early stopping on it) says whether a run needs more.
DEFAULT_STEPS = 100
# Conventional starting rates, not tuned here: LoRA's update starts at zero (B = 0) and is scaled
# by alpha / rank, so it takes a larger step size than full-weight training of the same blocks.
# (Measured on the tests' tiny random Llama, batch 2: distill at 1e-3 took the held-out KL from
# 0.080 to 0.179 in 12 steps; at 1e-4, to 0.027 in 20.)
DEFAULT_LR = {"distill": 1e-5, "full": 5e-5, "lora": 1e-3, "projector": 1e-4}


@dataclass(frozen=True)
class HealOptions:
    method: str = "distill"
    steps: int | None = None  # optimizer steps; None with a token budget (else DEFAULT_STEPS)
    token_budget: int | None = None  # stop once this many real (non-padding) tokens were trained on
    lr: float | None = None  # None: DEFAULT_LR[method]
    batch_size: int = 4  # samples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    held_out: float = 0.1  # share of the data kept apart to measure KL to the teacher
    hidden_loss: str = "none"  # per kept block: student block j's output vs teacher block kept[j]'s
    hidden_weight: float = 1.0
    ce_weight: float = 0.0  # cross-entropy on the answers, besides the KL
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    max_length: int | None = 512
    text_format: str = "auto"
    blocks: tuple[int, ...] | None = None  # original numbering; None: the kept blocks beside each removed span
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_modules: tuple[str, ...] | None = None  # linear-layer names (q_proj, ...); None: every linear layer
    eval_every: int | None = None  # steps between held-out KL measurements; None: a tenth of the run
    patience: int = 3  # measurements without improvement before stopping; 0: never stop early
    checkpoint_every: int = 50
    gradient_checkpointing: bool = False
    dtype: str = "auto"
    fsdp: bool = False  # shard both models over the processes (`sharding`) instead of a whole copy on each

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            listed = "\n".join(f"  - {p}" for p in problems)
            raise InputError(f"Healing options: {len(problems)} problem(s):\n{listed}", fix="correct the options listed.")

    def problems(self) -> list[str]:
        found = []
        if self.method not in METHODS:
            found.append(f"--method '{self.method}' is not one of {', '.join(METHODS)}")
        if self.steps is not None and self.token_budget is not None:
            found.append("--steps and --token-budget both say when to stop: give one")
        if self.steps is not None and self.steps < 1:
            found.append(f"--steps {self.steps}: healing needs at least 1 step")
        if self.token_budget is not None and self.token_budget < 1:
            found.append(f"--token-budget {self.token_budget}: healing needs at least 1 token")
        for name in ("batch_size", "grad_accum", "checkpoint_every", "lora_rank"):
            if getattr(self, name) < 1:
                found.append(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.lr is not None and not self.lr > 0:
            found.append(f"--lr must be positive (got {self.lr})")
        if not 0 <= self.held_out < 1:
            found.append(f"--held-out is a share of the data, 0 <= x < 1 (got {self.held_out})")
        if self.hidden_loss not in HIDDEN_LOSSES:
            found.append(f"--hidden-loss '{self.hidden_loss}' is not one of {', '.join(HIDDEN_LOSSES)}")
        for name in ("hidden_weight", "ce_weight", "weight_decay", "warmup_steps", "patience", "max_grad_norm"):
            if getattr(self, name) < 0:
                found.append(f"--{name.replace('_', '-')} must not be negative (got {getattr(self, name)})")
        if self.eval_every is not None and self.eval_every < 1:
            found.append(f"--eval-every must be at least 1 (got {self.eval_every})")
        if self.max_length is not None and self.max_length < 8:
            found.append(f"--max-length must be at least 8 (got {self.max_length})")
        if self.text_format not in FORMATS:
            found.append(f"--format '{self.text_format}' is not one of {', '.join(FORMATS)}")
        if self.dtype not in DTYPES:
            found.append(f"--dtype '{self.dtype}' is not one of {', '.join(DTYPES)}")
        if self.fsdp and self.dtype == "float16":
            found.append("--fsdp with --dtype float16: each process would check only its own shards for overflow; use bfloat16")
        if self.fsdp and self.method == "projector":
            found.append(
                "--fsdp with --method projector: a batch without images leaves the projector out of one process's "
                "backward pass and the others would wait for it; train the projector without --fsdp"
            )
        if self.blocks is not None and self.method in ("distill", "projector"):
            found.append(f"--blocks chooses the blocks of --method full or lora; --method {self.method} trains {_TRAINS[self.method]}")
        return found

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def max_steps(self) -> int | None:
        """The step limit; None when the token budget alone decides."""
        if self.token_budget is not None:
            return None
        return self.steps if self.steps is not None else DEFAULT_STEPS

    def evaluation_interval(self) -> int:
        if self.eval_every is not None:
            return self.eval_every
        return max(1, (self.max_steps or 250) // 10)

    def record(self) -> dict[str, Any]:
        data = asdict(self)
        data["lr"] = self.learning_rate
        data["steps"] = self.max_steps
        return data

    def key(self, inputs: dict[str, str]) -> str:
        """A hash of everything that decides the trained weights (and ``inputs``: the hashes of
        the student, the teacher and the data); how often checkpoints are written does not."""
        settings = {k: v for k, v in self.record().items() if k != "checkpoint_every"}
        payload = json.dumps({"format": 1, "options": settings, "inputs": inputs}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


_TRAINS = {"distill": "every kept block", "projector": "the multimodal projector only"}
