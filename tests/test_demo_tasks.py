"""The demo's tasks: "shapes" unchanged by the task switch, and the harder "relations" task.

Fast tests only check data generation and settings; the slow one trains `HARDER_TASK` and
checks that it learns the task and that removing decoder blocks visibly costs accuracy.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compressor.data import format_prompt, load_samples
from compressor.demo.model import build_demo_model
from compressor.demo.shapes import (
    RELATION_TYPES,
    TASKS,
    generate_dataset,
    neighbour,
    vocabulary,
)
from compressor.demo.train import HARDER_TASK, DemoSettings, ensure_demo_model

SPLITS = ("train", "calibration", "eval")
# Computed with the code from before tasks existed: these must never change, or caches of
# the default demo model would silently stop matching their settings.
SHAPES_KEY = "012538d99d8b"
SHAPES_DIGEST = "3864bb1aee9eab1456237bfa474f3ca3febf035c5f7034cd409f38e530490122"  # seed 7, 24/4/4
SHAPES_WORDS = [
    *("?", "a", "are", "blue", "circle", "circles", "color", "five", "four", "green", "how", "is", "many", "no"),
    *("one", "red", "shape", "shapes", "six", "square", "squares", "the", "there", "three", "triangle"),
    *("triangles", "two", "what", "yellow", "yes", "zero"),
]


def _digest(folder: Path) -> str:
    """JSONL lines and decoded pixels (not PNG bytes, which depend on the zlib build)."""
    h = hashlib.sha256()
    for split in SPLITS:
        for line in (folder / f"{split}.jsonl").read_text().splitlines():
            h.update(line.encode())
            h.update(np.asarray(Image.open(folder / json.loads(line)["image"])).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def relations(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("relations")
    generate_dataset(folder, seed=3, n_train=400, n_calibration=20, n_eval=40, task="relations")
    return folder


def test_shapes_task_is_unchanged(tmp_path):
    assert DemoSettings().key() == SHAPES_KEY
    assert DemoSettings(task="shapes").key() == SHAPES_KEY
    assert vocabulary() == vocabulary("shapes") == SHAPES_WORDS
    generate_dataset(tmp_path, seed=7, n_train=24, n_calibration=4, n_eval=4)
    assert _digest(tmp_path) == SHAPES_DIGEST


def test_relations_has_its_own_key_and_unknown_tasks_are_refused(tmp_path):
    assert DemoSettings(task="relations").key() != SHAPES_KEY
    assert HARDER_TASK.task == "relations" and HARDER_TASK.key() != DemoSettings(task="relations", steps=1).key()
    with pytest.raises(ValueError, match="known tasks: shapes, relations"):
        DemoSettings(task="binding")
    with pytest.raises(ValueError, match="unknown demo task"):
        generate_dataset(tmp_path, seed=0, n_train=1, n_calibration=1, n_eval=1, task="binding")
    with pytest.raises(ValueError, match="unknown demo task"):
        vocabulary("binding")
    assert not list(tmp_path.iterdir()), "a refused task must write nothing"


def test_relations_data_is_deterministic(relations, tmp_path):
    generate_dataset(tmp_path / "same", seed=3, n_train=400, n_calibration=20, n_eval=40, task="relations")
    generate_dataset(tmp_path / "other", seed=4, n_train=400, n_calibration=20, n_eval=40, task="relations")
    assert _digest(tmp_path / "same") == _digest(relations)
    assert _digest(tmp_path / "other") != _digest(relations)


def test_relations_questions_are_balanced_short_and_varied(relations):
    samples = load_samples(relations / "train.jsonl")
    answers = [s.answer for s in samples]
    assert max(len(a.split()) for a in answers) <= 3, "the demo scores with max_new_tokens=4"
    assert max(answers.count(a) for a in set(answers)) / len(answers) < 0.05
    # Each of the four question types gets about a quarter, the rarely possible ones included.
    kinds = Counter(("next_to" if len(s.answer.split()) == 3 else "of") + " " + s.prompt.split()[1] for s in samples)
    assert len(kinds) == len(RELATION_TYPES) and min(kinds.values()) > 0.18 * len(samples)
    images = {hashlib.sha256(s.image.read_bytes()).hexdigest() for split in SPLITS for s in load_samples(relations / f"{split}.jsonl")}
    assert len(images) == 460, "no image may repeat within or across splits"


def test_relations_vocabulary_covers_every_word(relations):
    words = vocabulary("relations")
    assert set(SHAPES_WORDS) < set(words) and set(words) - set(SHAPES_WORDS) == {"left", "of", "above"}
    _, processor = build_demo_model(words, seed=0)
    tokenizer = processor.tokenizer
    for split in SPLITS:
        for sample in load_samples(relations / f"{split}.jsonl"):
            assert set(sample.prompt.split()) | set(sample.answer.split()) <= set(words)
            ids = tokenizer(format_prompt(processor, sample, with_answer=True))["input_ids"]
            assert tokenizer.unk_token_id not in ids


def test_neighbours_stay_on_the_grid():
    scene = ((3, "red", "circle"), (4, "blue", "square"), (7, "green", "triangle"))
    # Cells 3 and 4 are adjacent in raster order but at opposite ends of two rows.
    assert neighbour(scene, 4, "left") is None
    assert neighbour(scene, 7, "above") == (3, "red", "circle")
    assert neighbour(scene, 3, "above") is None and neighbour(scene, 7, "left") is None


def _ask(kind: str, scene: tuple) -> set[tuple[str, str] | None]:
    """Every (prompt, answer) that ``kind`` asks about ``scene``, over a few seeds."""
    return {(q.prompt, q.answer) if (q := RELATION_TYPES[kind](scene, np.random.default_rng(seed))) else None for seed in range(16)}


def test_relation_answers_with_a_single_choice():
    # The circle and the red one (cell 2) are unique; only their left neighbour exists.
    scene = ((1, "blue", "square"), (2, "red", "circle"), (3, "blue", "square"))
    assert _ask("color_of", scene) == {("what color is the circle ?", "circle red")}
    assert _ask("shape_of", scene) == {("what shape is the red one ?", "red circle")}
    assert _ask("color_next_to", scene) == {("what color is left of the circle ?", "left circle blue")}
    assert _ask("shape_next_to", scene) == {("what shape is left of the red one ?", "left red square")}
    # Nothing is unique, so nothing can be asked: the generator then draws another scene.
    twins = ((0, "red", "circle"), (1, "red", "circle"))
    assert all(_ask(kind, twins) == {None} for kind in RELATION_TYPES)


def test_relation_answers_with_several_choices():
    # Unique: the square (3), the triangle (4); blue (0), green (4), yellow (8). Cell 3 is
    # no left neighbour of cell 4 (it ends the row above), nor cell 7 of cell 8.
    scene = ((0, "blue", "circle"), (3, "red", "square"), (4, "green", "triangle"), (8, "yellow", "circle"), (9, "red", "circle"))
    assert _ask("color_of", scene) == {("what color is the square ?", "square red"), ("what color is the triangle ?", "triangle green")}
    assert _ask("shape_of", scene) == {
        ("what shape is the blue one ?", "blue circle"),
        ("what shape is the green one ?", "green triangle"),
        ("what shape is the yellow one ?", "yellow circle"),
    }
    assert _ask("color_next_to", scene) == {("what color is above the triangle ?", "above triangle blue")}
    assert _ask("shape_next_to", scene) == {
        ("what shape is above the green one ?", "above green circle"),
        ("what shape is above the yellow one ?", "above yellow triangle"),
    }


def test_every_task_is_known_to_the_settings():
    for task in TASKS:
        assert DemoSettings(task=task).task == task


@pytest.mark.slow
def test_harder_task_learns_and_suffers_from_pruning():
    """`HARDER_TASK` trained once into the user cache: well above chance, and depth matters."""
    from compressor.accuracy import answer_accuracy
    from compressor.loading import load_model
    from compressor.planner import RemovedBlock, SurgeryPlan
    from compressor.surgery import apply_plan

    assets = ensure_demo_model(settings=HARDER_TASK, progress=False)
    loaded = load_model(str(assets.model_dir), dtype="float32")
    samples = load_samples(assets.eval)

    def accuracy(removed: list[int]) -> float:
        model = copy.deepcopy(loaded.model)
        if removed:
            plan = SurgeryPlan("test", "explicit", 8, tuple(RemovedBlock(i, "test") for i in removed))
            apply_plan(model, plan, loaded.adapter)
        return answer_accuracy(model, loaded.processor, samples, batch_size=64, max_new_tokens=4).accuracy

    full = accuracy([])
    assert 0.5 <= full <= 0.95, "well above chance, yet not saturated"
    # The early blocks carry the most (64.5 % -> 33.6 % in the measured run), the late ones less.
    assert full - accuracy([1, 2, 3, 4]) >= 0.2, "removing half the blocks must cost a lot"
    assert full - accuracy([3, 4, 5, 6]) >= 0.04, "even the later half must cost visibly"
