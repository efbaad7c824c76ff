"""Each metric against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from compressor import metrics


def hs(*vectors):
    """One sequence (batch 1) of hidden states from literal vectors."""
    return torch.tensor([vectors], dtype=torch.float32)


def test_block_influence_by_hand():
    h_in = hs([1.0, 0.0], [1.0, 0.0], [0.0, 2.0])
    h_out = hs([2.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    # same direction -> 0; orthogonal -> 1; 45 degrees -> 1 - 1/sqrt(2)
    expected = torch.tensor([[0.0, 1.0, 1.0 - 1.0 / math.sqrt(2.0)]])
    assert torch.allclose(metrics.block_influence(h_in, h_out), expected, atol=1e-6)


def test_block_influence_opposite_and_zero_vectors():
    h_in = hs([1.0, 1.0], [0.0, 0.0])
    h_out = hs([-1.0, -1.0], [3.0, 4.0])
    result = metrics.block_influence(h_in, h_out)
    assert result[0, 0].item() == pytest.approx(2.0)
    assert result[0, 1].item() == pytest.approx(1.0)  # a zero vector is treated as orthogonal, not NaN


def test_bf16_inputs_are_computed_in_float32():
    a = hs([1.0, 2.0, 3.0]).bfloat16()
    assert metrics.block_influence(a, a).dtype == torch.float32


def test_tail_indicator_and_probability():
    distances = torch.tensor([[0.01, 0.2, 0.05, 0.3]])
    indicator = metrics.tail_indicator(distances, 0.05)
    assert indicator.tolist() == [[0.0, 1.0, 0.0, 1.0]]  # strictly above epsilon
    assert indicator.mean().item() == pytest.approx(0.5)


def test_adjacent_distance_and_pairs():
    h = hs([1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0])
    assert torch.allclose(metrics.adjacent_distance(h), torch.tensor([[0.0, 1.0, 2.0]]), atol=1e-6)
    mask = torch.tensor([[True, True, False, True]])
    assert metrics.adjacent_pairs(mask).tolist() == [[True, False, False]]


def test_angular_distance_by_hand():
    start = hs([1.0, 0.0], [1.0, 0.0], [1.0, 0.0])
    end = hs([5.0, 0.0], [0.0, 1.0], [-1.0, 0.0])
    # 0 degrees -> 0, 90 degrees -> 1/2, 180 degrees -> 1
    assert torch.allclose(metrics.angular_distance(start, end), torch.tensor([[0.0, 0.5, 1.0]]), atol=1e-6)
