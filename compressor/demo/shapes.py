"""The demo's synthetic visual question set: coloured shapes on a grid.

This module owns the task the demo model is trained and evaluated on: it draws images of
coloured shapes placed in the cells of a small grid, asks questions about them (counting,
colour, shape), and writes the train / calibration / evaluation splits as PNG files plus
JSONL files in the layout `compressor.data.load_samples` reads. Everything is drawn from a
seeded generator, so a seed always gives byte-identical files, offline.

The task is chosen so that a small model learns it well in minutes but needs its depth:
plain counting is easy, while questions that bind a colour to a shape in the same cell
("what color is the circle ?", "how many red squares are there ?") take several layers of
attention, so removing decoder blocks costs visible accuracy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

GRID = 4  # cells per side
CELL = 8  # pixels per cell side; the vision tower's patch size must equal this
IMAGE_SIZE = GRID * CELL
MIN_OBJECTS, MAX_OBJECTS = 1, 6

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
PLURAL = {shape: shape + "s" for shape in SHAPES}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")

# An object is (cell index, colour name, shape name); an image is a tuple of objects
# sorted by cell, which is also its identity for keeping the splits disjoint.
Obj = tuple[int, str, str]
Scene = tuple[Obj, ...]
T = TypeVar("T")


@dataclass(frozen=True)
class DemoSplits:
    """Where `generate_dataset` wrote the three splits."""

    train: Path
    calibration: Path
    eval: Path


@dataclass(frozen=True)
class Question:
    """One question about a scene.

    The answer repeats the question's subject before the value ("red two", "circle red"):
    the value is then predicted at the position of the words it depends on, so the model
    reads the question there directly instead of first learning to fetch it from across
    the prompt. Without this echo, a model this small sits on the answer priors
    for minutes; with it, question-conditioned counting is learnt in a few hundred steps.
    """

    task: str
    prompt: str
    subject: str
    value: str

    @property
    def answer(self) -> str:
        return f"{self.subject} {self.value}"


def _shape_masks() -> dict[str, np.ndarray]:
    """Boolean CELL×CELL masks, with a one-pixel margin so neighbours never touch."""
    rows, cols = np.mgrid[0:CELL, 0:CELL]
    centre = (CELL - 1) / 2
    inner = (rows >= 1) & (rows <= CELL - 2) & (cols >= 1) & (cols <= CELL - 2)
    # Radius chosen so each row differs from the square's (widths 2, 4, 6, 6, 4, 2).
    circle = (rows - centre) ** 2 + (cols - centre) ** 2 <= 8
    # Apex at the top; the half-width grows by half a pixel per row.
    triangle = inner & (np.abs(cols - centre) <= (rows - 0.5) / 2)
    return {"circle": circle & inner, "square": inner, "triangle": triangle}


MASKS = _shape_masks()


def vocabulary() -> list[str]:
    """Every word a prompt or an answer of this task uses (punctuation included)."""
    words = {"how", "many", "shapes", "are", "there", "what", "color", "is", "the", "shape", "one", "a", "yes", "no", "?"}
    words.update(COLORS, SHAPES, PLURAL.values(), NUMBERS)
    return sorted(words)


def render(scene: Scene) -> Image.Image:
    """Draw a scene: black background, one shape per occupied cell."""
    pixels = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for cell, color, shape in scene:
        top, left = divmod(cell, GRID)
        block = pixels[top * CELL : (top + 1) * CELL, left * CELL : (left + 1) * CELL]
        block[MASKS[shape]] = COLORS[color]
    return Image.fromarray(pixels)


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


def random_scene(rng: np.random.Generator) -> Scene:
    count = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = sorted(rng.choice(GRID * GRID, size=count, replace=False).tolist())
    colors = list(COLORS)
    return tuple((cell, colors[int(rng.integers(len(colors)))], SHAPES[int(rng.integers(len(SHAPES)))]) for cell in cells)


def _count_all(scene: Scene, rng: np.random.Generator) -> Question | None:
    return Question("count_all", "how many shapes are there ?", "shapes", NUMBERS[len(scene)])


def _count_color(scene: Scene, rng: np.random.Generator) -> Question | None:
    color = _pick(rng, list(COLORS))
    n = sum(c == color for _, c, _ in scene)
    return Question("count_color", f"how many {color} shapes are there ?", color, NUMBERS[n])


def _count_shape(scene: Scene, rng: np.random.Generator) -> Question | None:
    shape = _pick(rng, SHAPES)
    n = sum(s == shape for _, _, s in scene)
    return Question("count_shape", f"how many {PLURAL[shape]} are there ?", PLURAL[shape], NUMBERS[n])


def _count_both(scene: Scene, rng: np.random.Generator) -> Question | None:
    # Half the time a pair that is present: asked blindly, most answers would be "zero".
    if rng.integers(2):
        _, color, shape = _pick(rng, scene)
    else:
        color, shape = _pick(rng, list(COLORS)), _pick(rng, SHAPES)
    n = sum(c == color and s == shape for _, c, s in scene)
    subject = f"{color} {PLURAL[shape]}"
    return Question("count_both", f"how many {subject} are there ?", subject, NUMBERS[n])


def _color_of(scene: Scene, rng: np.random.Generator) -> Question | None:
    # Only asked about a shape that occurs exactly once, so the answer is unambiguous.
    unique = [(c, s) for _, c, s in scene if sum(s2 == s for _, _, s2 in scene) == 1]
    if not unique:
        return None
    color, shape = _pick(rng, unique)
    return Question("color_of", f"what color is the {shape} ?", shape, color)


def _shape_of(scene: Scene, rng: np.random.Generator) -> Question | None:
    unique = [(c, s) for _, c, s in scene if sum(c2 == c for _, c2, _ in scene) == 1]
    if not unique:
        return None
    color, shape = _pick(rng, unique)
    return Question("shape_of", f"what shape is the {color} one ?", color, shape)


def _exists(scene: Scene, rng: np.random.Generator) -> Question | None:
    # Half the questions name a present pair; the other half a pair that is absent, so
    # "yes" and "no" are equally likely and a colour or a shape alone does not decide it.
    present = sorted({(c, s) for _, c, s in scene})
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    want_yes = bool(rng.integers(2))
    color, shape = _pick(rng, present if want_yes else absent)
    return Question("exists", f"is there a {color} {shape} ?", f"{color} {shape}", "yes" if want_yes else "no")


QUESTION_TYPES: dict[str, Callable[[Scene, np.random.Generator], Question | None]] = {
    "count_all": _count_all,
    "count_color": _count_color,
    "count_shape": _count_shape,
    "count_both": _count_both,
}


def _samples(rng: np.random.Generator) -> Iterator[tuple[Scene, Question]]:
    """An endless stream of (scene, question), question types in equal shares.

    No scene is ever repeated, so the splits cut from this stream share no image.
    """
    seen: set[Scene] = set()
    kinds = list(QUESTION_TYPES)
    while True:
        scene = random_scene(rng)
        if scene in seen:
            continue
        question = QUESTION_TYPES[kinds[int(rng.integers(len(kinds)))]](scene, rng)
        if question is None:
            continue
        seen.add(scene)
        yield scene, question


def _write_split(out_dir: Path, name: str, items: list[tuple[Scene, Question]]) -> Path:
    image_dir = out_dir / "images" / name
    image_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{name}.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        for i, (scene, question) in enumerate(items):
            image = image_dir / f"{i:05d}.png"
            render(scene).save(image)
            record = {
                "image": image.relative_to(out_dir).as_posix(),
                "prompt": question.prompt,
                "answer": question.answer,
            }
            f.write(json.dumps(record) + "\n")
    return jsonl


def generate_dataset(out_dir: Path, *, seed: int, n_train: int, n_calibration: int, n_eval: int) -> DemoSplits:
    """Write the three splits (PNG images + JSONL) into ``out_dir``; deterministic in ``seed``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stream = _samples(np.random.default_rng(seed))
    sizes = {"train": n_train, "calibration": n_calibration, "eval": n_eval}
    paths = {name: _write_split(out_dir, name, [next(stream) for _ in range(size)]) for name, size in sizes.items()}
    logger.info("wrote demo dataset to %s (%s)", out_dir, sizes)
    return DemoSplits(**paths)
