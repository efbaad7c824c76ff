"""Redundancy metric definitions: pure functions over hidden-state tensors.

Shapes: hidden states are (batch, tokens, hidden); per-token results are (batch, tokens).
All arithmetic is float32 whatever the model dtype, so bf16 models get stable cosines.

Sources:
- block influence / proximal distance: ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large
  Language Models are More Redundant Than You Expect"), and the proximal condition of Skip-It
  ("Skip-It? Theoretical Conditions for Layer Skipping in Vision-Language Models"):
  d_l(t) = 1 - cos(h_l[t], h_{l+1}[t]).
- tail probability: Skip-It, P_t(d_l(t) > eps) — a mean can hide a few tokens the block changes a lot.
- adjacent-token (geometric) distance: Skip-It, 1 - cos(h[t], h[t+1]) over neighbouring tokens
  of one modality: how collapsed the representation is.
- angular distance of a span of n blocks: Gromov et al., 2024 ("The Unreasonable Ineffectiveness
  of the Deeper Layers"), arccos(cos(h_l, h_{l+n})) / pi.
"""

from __future__ import annotations

import math

import torch

_EPS = 1e-8


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last axis, in float32, clamped to [-1, 1]."""
    a, b = a.float(), b.float()
    dot = (a * b).sum(dim=-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return (dot / norms.clamp_min(_EPS)).clamp(-1.0, 1.0)


def unit(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` scaled to unit length along the last axis, in float32: normalised once, a
    tensor's cosines with several others cost one product each (see `unit_cosine`)."""
    hidden = hidden.float()
    return hidden / hidden.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def unit_cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two `unit` tensors, clamped to [-1, 1]."""
    return (u * v).sum(dim=-1).clamp(-1.0, 1.0)


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """Per-token 1 - cos(h_in, h_out): 0 when the block leaves the token's direction unchanged."""
    return 1.0 - cosine_similarity(h_in, h_out)


def tail_indicator(distances: torch.Tensor, epsilon: float) -> torch.Tensor:
    """1.0 where the per-token distance exceeds ``epsilon``; its mean is the tail probability."""
    return (distances > epsilon).float()


def adjacent_distance(hidden: torch.Tensor) -> torch.Tensor:
    """Per-pair 1 - cos(h[t], h[t+1]); shape (batch, tokens - 1)."""
    return 1.0 - cosine_similarity(hidden[:, :-1], hidden[:, 1:])


def adjacent_pairs(mask: torch.Tensor) -> torch.Tensor:
    """Pairs (t, t+1) whose two tokens are both in ``mask``; shape (batch, tokens - 1)."""
    return mask[:, :-1] & mask[:, 1:]


def angular_distance(h_start: torch.Tensor, h_end: torch.Tensor) -> torch.Tensor:
    """Per-token arccos(cos(h_start, h_end)) / pi, in [0, 1]."""
    return torch.arccos(cosine_similarity(h_start, h_end)) / math.pi
