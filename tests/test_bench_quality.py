"""The quality benchmark's pieces that need no trained model: rank correlation, and every
method's selection at every budget (through the real recipe path)."""

from __future__ import annotations

import pytest

from compressor.bench_quality import METHODS, TaskResult, markdown, selections, spearman
from compressor.calibrate import CalibrationOptions, calibrate
from compressor.data import load_samples


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # ties take mean ranks
    assert spearman([1, None, 2], [1, 2, None]) is None  # too few pairs
    assert spearman([1, 1, 1, 1], [1, 2, 3, 4]) is None  # constant: undefined


def test_every_method_selects_k_unprotected_blocks(tiny_models):
    tiny = tiny_models["llava"]
    loaded = tiny.load()
    options = CalibrationOptions(batch_size=6, ablation=True, greedy=5, attention=True, max_span=4)
    report = calibrate(loaded.model, loaded.processor, loaded.adapter, load_samples(tiny.data), options=options)
    for k in (1, 2, 3):
        chosen = selections(report, k, seeds=3)
        assert set(chosen) == set(METHODS)
        for method, lists in chosen.items():
            assert len(lists) == (3 if method == "random" else 1)
            for blocks in lists:
                assert len(blocks) == len(set(blocks)) == k, (method, blocks)
                assert 0 not in blocks and 5 not in blocks, (method, blocks)  # first and last are kept
        span = chosen["gromov"][0]
        assert span == list(range(span[0], span[0] + k))
        assert chosen["last_k"][0] == list(range(5 - k, 5))
        kl = report.values("ablation_kl", "all")
        assert chosen["ablation_kl"][0] == sorted(sorted(range(1, 5), key=lambda i: kl[i])[:k])


def test_markdown_marks_the_best_method():
    result = TaskResult("t", {}, 8, 0.8, 100)
    for i, method in enumerate(METHODS):
        result.accuracy[method] = {1: 0.5 + i / 100, 2: 0.4}
    result.spearman = {"block_influence[all]": {"ablation_kl": 0.5, "ablation_loss": None}}
    text = markdown([result])
    assert f"| {METHODS[-1]} | **56.0%** | **40.0%** |" in text
    assert "| block_influence[all] | +0.50 | — |" in text
