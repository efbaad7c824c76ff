"""Proof that exported ONNX graphs compute what the PyTorch model computes.

Every graph is run in ONNX Runtime on fresh random inputs — other batch sizes, lengths and
padding than it was traced with — and compared with the PyTorch model run *its own way*
(transformers' own masks, positions and cache), so a graph that silently computes something
else (FACTS.md: PaliGemma exported with a causal mask where PyTorch attends both ways) fails.
Decoders are checked on a left-padded prefill longer than any sliding window, then on two
cached decoding steps fed with the graph's own ``present`` outputs.

A graph that ONNX Runtime cannot run on such inputs (one traced for the example's shapes or
values) is a failed check carrying ONNX Runtime's message, not a crash.

Tolerance: for every output, max |onnx - torch| <= tolerance * max(1, max |torch|), with
tolerance 1e-4 for float32 (measured differences are ~1e-6). Padding rows are not compared:
what a model computes for a padding query is arbitrary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import VerificationError
from .onnx_runtime import empty_past, text_positions

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class OutputDiff:
    name: str
    max_abs_diff: float
    scale: float  # max |torch| of the output (the bound is tolerance * max(1, scale))
    passed: bool


@dataclass
class GraphCheck:
    graph: str
    case: str
    provider: str
    tolerance: float
    outputs: list[OutputDiff] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "max_abs_diff": self.max_abs_diff}


class OnnxParityError(VerificationError):
    """An exported graph disagrees with PyTorch beyond the tolerance; nothing was written."""

    def __init__(self, checks: list[GraphCheck]):
        failed = [c for c in checks if not c.passed]
        lines = []
        for check in failed:
            lines.append(f"  {check.graph} [{check.case}] on {check.provider}:")
            for o in check.outputs:
                bound = check.tolerance * max(1.0, o.scale)
                if o.name.startswith("run failed"):
                    lines.append(f"    FAIL {o.name}")
                    continue
                lines.append(
                    f"    {'FAIL' if not o.passed else 'ok  '} {o.name}: max |onnx - torch| = {o.max_abs_diff:.3g} (bound {bound:.3g})"
                )
        super().__init__(
            "The ONNX export does not compute what the PyTorch model computes:\n" + "\n".join(lines),
            fix="nothing was written. Run with -v and report it with the family and `pip show transformers torch`; "
            "if the graphs are right but the tolerance too strict for this model, pass --tolerance.",
        )
        self.checks = checks


def diff(name: str, got: np.ndarray, want: np.ndarray, tolerance: float) -> OutputDiff:
    if got.shape != want.shape:
        return OutputDiff(name, float("inf"), float(np.abs(want).max(initial=0.0)), False)
    delta = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max(initial=0.0))
    scale = float(np.abs(want).max(initial=0.0))
    return OutputDiff(name, delta, scale, bool(delta <= tolerance * max(1.0, scale)))


def raise_on_failure(checks: list[GraphCheck]) -> None:
    if not all(c.passed for c in checks):
        raise OnnxParityError(checks)


# -- decoder --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecoderProbe:
    """How to drive one decoder graph and its PyTorch reference."""

    graph: str
    first_input: str  # "input_ids" or "inputs_embeds"
    make_first: Callable[[int, int, torch.Generator], torch.Tensor]
    reference: Callable[..., Any]  # (first, mask, positions, token_types, cache) -> output with .logits, .past_key_values
    position_offset: int = 0
    mrope: bool = False
    token_types: bool = False
    prefill_length: int = 8


def _cache_tensors(cache: Any) -> list[np.ndarray]:
    out = []
    for layer in cache.layers:
        out.extend((layer.keys.float().numpy(), layer.values.float().numpy()))
    return out


@torch.no_grad()
def verify_decoder(session: Any, probe: DecoderProbe, *, tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> list[GraphCheck]:
    gen = torch.Generator().manual_seed(seed)
    provider = session.get_providers()[0]
    names = [s.name for s in session.get_inputs()]
    past_specs = [s for s in session.get_inputs() if s.name.startswith("past_key_values")]
    present_names = [o.name for o in session.get_outputs() if o.name.startswith("present")]
    batch, length = 2, probe.prefill_length
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1, :3] = 0  # left padding in the second row
    positions = torch.from_numpy(text_positions(mask.numpy(), probe.position_offset))
    if probe.mrope:
        positions = positions[None].repeat(3, 1, 1)
        positions[1:, :, 3:6] += torch.tensor([[[0, 1, 1]], [[1, 0, 1]]])  # image-like (h, w) offsets
    token_types = torch.zeros(batch, length, dtype=torch.int64)
    token_types[:, 4:7] = 1  # one image block per row (Gemma3's bidirectional rule)
    first = probe.make_first(batch, length, gen)
    feeds = {s.name: empty_past(s, batch) for s in past_specs}
    cache = None
    checks = []
    for case in ("prefill", "decode-1", "decode-2"):
        feeds[probe.first_input] = first.numpy()
        feeds["attention_mask"] = mask.numpy()
        if "position_ids" in names:
            feeds["position_ids"] = positions.numpy()
        if "token_type_ids" in names:
            feeds["token_type_ids"] = token_types.numpy()
        check = GraphCheck(probe.graph, case, provider, tolerance)
        try:
            got_logits, *got_present = session.run(None, feeds)
        except Exception as error:  # onnxruntime's own exception types: a graph that cannot run these inputs
            check.outputs.append(OutputDiff(f"run failed: {error}", float("inf"), 0.0, False))
            checks.append(check)
            break
        out = probe.reference(first, mask, positions, token_types if probe.token_types else None, cache)
        want_present = _cache_tensors(out.past_key_values)
        current = mask[:, -first.shape[1] :].bool().numpy()
        check.outputs.append(diff("logits", got_logits[current], out.logits.float().numpy()[current], tolerance))
        for name, got, want in zip(present_names, got_present, want_present):
            # A sliding-window layer of transformers' cache keeps only its window's tail.
            tail = want.shape[2]
            keep = mask[:, -tail:].bool().numpy()
            got_t, want_t = got[:, :, -tail:].transpose(0, 2, 1, 3)[keep], want.transpose(0, 2, 1, 3)[keep]
            check.outputs.append(diff(name, got_t, want_t, tolerance))
        checks.append(check)
        # Next step: one new token, fed the graph's own cache (and PyTorch its own).
        for spec, value in zip(past_specs, got_present):
            feeds[spec.name] = value
        cache = out.past_key_values
        first = probe.make_first(batch, 1, gen)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], dim=1)
        positions = positions[..., -1:] + 1
        token_types = torch.zeros(batch, 1, dtype=torch.int64)
    return checks


# -- single-output graphs -------------------------------------------------------------------
def verify_outputs(session: Any, graph: str, case: str, feeds: dict[str, np.ndarray], want: np.ndarray, *, tolerance: float) -> GraphCheck:
    got = session.run(None, feeds)[0]
    check = GraphCheck(graph, case, session.get_providers()[0], tolerance)
    check.outputs.append(diff(session.get_outputs()[0].name, got, want, tolerance))
    return check
