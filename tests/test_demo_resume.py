"""Demo training survives Ctrl-C: checkpoints, exact resumption, and the thread count.

Tiny settings (six steps on a few dozen questions) keep each training to a few seconds;
the interruption is a KeyboardInterrupt raised from the `on_step` seam, as Ctrl-C would.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.demo import train as demo_train
from compressor.demo.train import CHECKPOINT_FILE, DemoAssets, DemoSettings, ensure_demo_model

TINY = DemoSettings(n_train=48, n_calibration=4, n_eval=4, steps=6, batch_size=8, warmup_steps=2)
EVERY = 3  # checkpoints after steps 3 and 6


def _partial(cache: Path) -> Path:
    return cache / f".demo-{TINY.key()}.partial"


def _weights(assets: DemoAssets) -> dict[str, torch.Tensor]:
    return load_file(assets.model_dir / "model.safetensors")


def _train(cache: Path, **kwargs) -> DemoAssets:
    return ensure_demo_model(cache, settings=TINY, progress=False, checkpoint_every=EVERY, **kwargs)


def _interrupt(cache: Path, at: int) -> None:
    """Train until step ``at`` is done, then stop as Ctrl-C would."""

    def stop(step: int) -> None:
        if step == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(cache, on_step=stop)


def _assert_same_model(assets: DemoAssets, reference: DemoAssets) -> None:
    ours, theirs = _weights(assets), _weights(reference)
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
    assert (assets.summary.first_loss, assets.summary.final_loss) == (reference.summary.first_loss, reference.summary.final_loss)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> DemoAssets:
    """An uninterrupted training with the same settings."""
    return _train(tmp_path_factory.mktemp("reference"))


def test_partial_folder_is_removed_after_success(reference):
    cache = reference.root.parent
    assert sorted(p.name for p in cache.iterdir()) == [reference.root.name], "no checkpoint or staging folder may be left"


@pytest.mark.parametrize("at", [4, 3], ids=["between-checkpoints", "at-a-checkpoint"])
def test_interrupted_training_resumes_to_the_same_model(reference, tmp_path, caplog, at):
    _interrupt(tmp_path, at=at)
    assert (_partial(tmp_path) / CHECKPOINT_FILE).is_file()
    assert not (tmp_path / f"demo-{TINY.key()}").exists(), "an interrupted training must not look finished"
    steps: list[int] = []
    with caplog.at_level(logging.INFO, logger=demo_train.__name__):
        assets = _train(tmp_path, on_step=steps.append)
    assert f"resuming demo training at step 3 of {TINY.steps}" in caplog.text
    assert steps == [4, 5, 6], "training continues after the last checkpoint"
    _assert_same_model(assets, reference)
    assert not _partial(tmp_path).exists()


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a checkpoint")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _other_settings(path: Path) -> None:
    record = torch.load(path, weights_only=True)
    torch.save({**record, "key": DemoSettings(steps=7).key()}, path)


@pytest.mark.parametrize("spoil", [_garbage, _truncated, _other_settings])
def test_unusable_checkpoint_is_ignored_with_a_warning(reference, tmp_path, caplog, spoil):
    _interrupt(tmp_path, at=4)
    spoil(_partial(tmp_path) / CHECKPOINT_FILE)
    steps: list[int] = []
    with caplog.at_level(logging.INFO, logger=demo_train.__name__):
        assets = _train(tmp_path, on_step=steps.append)
    assert "ignoring the demo training checkpoint" in caplog.text and "training from step 0" in caplog.text
    assert "resuming" not in caplog.text
    assert steps == list(range(1, TINY.steps + 1))
    _assert_same_model(assets, reference)
    assert not _partial(tmp_path).exists()


def test_force_discards_the_checkpoint(reference, tmp_path, caplog):
    _interrupt(tmp_path, at=4)
    steps: list[int] = []
    with caplog.at_level(logging.INFO, logger=demo_train.__name__):
        assets = _train(tmp_path, force=True, on_step=steps.append)
    assert "resuming" not in caplog.text and "ignoring" not in caplog.text
    assert steps == list(range(1, TINY.steps + 1))
    _assert_same_model(assets, reference)
    assert not _partial(tmp_path).exists()


def test_thread_count_is_set_for_training_and_restored(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    seen: list[int] = []

    def record_then_stop(step: int) -> None:
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt

    monkeypatch.setenv("COMPRESSOR_THREADS", "1")
    torch.set_num_threads(2)
    try:
        with pytest.raises(KeyboardInterrupt):
            _train(tmp_path, on_step=record_then_stop)
        assert seen == [1], "COMPRESSOR_THREADS sets the training's threads"
        assert torch.get_num_threads() == 2, "restored even when training is interrupted"
    finally:
        torch.set_num_threads(before)


def test_thread_policy(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("COMPRESSOR_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(64)
        with demo_train.training_threads() as threads:
            assert threads == torch.get_num_threads() <= demo_train.MAX_TRAINING_THREADS
        assert torch.get_num_threads() == 64
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        with demo_train.training_threads() as threads:
            assert threads == 3, "the user's OMP_NUM_THREADS is respected"
        monkeypatch.setenv("COMPRESSOR_THREADS", "zero")
        with pytest.raises(demo_train.CompressorError, match="COMPRESSOR_THREADS"):
            with demo_train.training_threads():
                pass
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
