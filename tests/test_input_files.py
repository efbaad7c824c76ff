"""Hostile, corrupt and hand-edited input files: recipes, plans and calibration reports.

Each is refused with the error type of its kind (exit code 2), naming the file and the field,
and never as another exception type (which the CLI would report as an internal error).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.calibrate import REPORT_FORMAT, CalibrationReport
from compressor.errors import InputError, PlanError, RecipeError
from compressor.planner import RemovedBlock, SurgeryPlan, plan
from compressor.recipe import MAX_RECIPE_BYTES, load_recipe, parse_recipe

from .conftest import run_cli

RECIPES = Path(__file__).parent.parent / "recipes"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"
EXPLICIT = "version: 1\nname: t\nselect: {op: explicit, blocks: [1, 3]}\n"


def alias_bomb(path: Path) -> Path:
    """Billion laughs in 10 lines: 9**8 (43 million) strings once the aliases are expanded."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for previous, name in zip("abcdefg", "bcdefgh"):
        lines.append(f"{name}: &{name} [{','.join([f'*{previous}'] * 9)}]")
    path.write_text("\n".join([*lines, "version: *h"]) + "\n")
    return path


@contextmanager
def memory_cap(extra: int):
    """Let this process map at most ``extra`` more bytes, so that a regression fails with
    MemoryError instead of exhausting the (shared) machine."""
    status = Path("/proc/self/status")
    if not status.exists():  # not Linux: no cheap way to read what is mapped
        yield
        return
    mapped = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra if hard == resource.RLIM_INFINITY else min(mapped + extra, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# -- recipes ---------------------------------------------------------------------------------------


def test_alias_bomb_refused_fast_in_little_memory(tmp_path):
    bomb = alias_bomb(tmp_path / "bomb.yaml")
    with memory_cap(1 << 30):
        tracemalloc.start()
        try:
            start = time.perf_counter()
            with pytest.raises(RecipeError) as error:
                load_recipe(bomb)
            seconds = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert seconds < 1.0
    assert peak < 10_000_000  # bytes allocated at the peak; expanding the bomb takes gigabytes
    assert str(bomb) in str(error.value) and "aliases are expanded" in str(error.value)


def test_alias_bomb_through_the_cli(tmp_path, capsys):
    bomb = alias_bomb(tmp_path / "bomb.yaml")
    with memory_cap(2 << 30):
        code, out, err = run_cli(capsys, "recipe", "check", bomb)
    assert code == 2
    assert "Traceback" not in out + err and "internal error" not in err
    assert str(bomb) in err and "aliases are expanded" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: &v [*v]\nname: t\nselect: {op: explicit, blocks: [1]}\n", "aliases are expanded"),  # recursive
        ("a: &a 1\nb: [" + ", ".join(["*a"] * 101) + "]\n", "more than 100 YAML aliases"),
        ("name: " + "[" * 5000 + "\n", "nested too deeply"),
        ("version: 1\nname: t\nselect: {op: explicit, blocks: [" + ", ".join(["1"] * 20_000) + "]}\n", "more than 10,000 YAML values"),
        ("? [a, b]\n: 1\n", "a key cannot be a list"),
        ("version: 1\x00\n", "not valid YAML"),
    ],
    ids=["recursive-alias", "many-aliases", "deep-nesting", "many-values", "list-key", "nul-char"],
)
def test_yaml_beyond_any_recipe_is_refused(text, expected):
    with pytest.raises(RecipeError) as error:
        parse_recipe(text, "r.yaml")
    assert str(error.value).startswith("r.yaml: ") and expected in str(error.value)


def test_anchors_and_merge_keys_within_limits_still_work():
    text = "version: 1\nname: t\nselect: {op: lowest, metric: block_influence, count: 1, protect: &p {first: 1}}\n"
    assert parse_recipe(text).select.protect.first == 1
    merged = "version: 1\nname: t\nselect: {<<: {op: explicit}, blocks: [2]}\n"
    assert parse_recipe(merged).select.blocks == [2]


def test_oversized_recipe_is_refused_by_name(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(EXPLICIT + "#" * MAX_RECIPE_BYTES + "\n")  # valid YAML: only its size is wrong
    with pytest.raises(RecipeError, match="is over 1,000,000 bytes") as error:
        load_recipe(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("content", [PNG, bytes(range(256)) * 4, EXPLICIT.encode() + b"\xff\xfe"], ids=["png", "bytes", "trailing"])
def test_binary_recipe_is_a_recipe_error(tmp_path, content):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match="is not UTF-8 text") as error:
        load_recipe(path)
    assert str(path) in str(error.value)


def test_directory_missing_or_unreadable_recipe(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="is a directory") as error:
        load_recipe(tmp_path)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    locked = tmp_path / "locked.yaml"
    locked.write_text(EXPLICIT)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads any file: refuse the open as the kernel would for others
        real_open = Path.open

        def refusing_open(self, *args, **kwargs):
            if self == locked:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", refusing_open)
    with pytest.raises(RecipeError, match="cannot be read"):
        load_recipe(locked)


def test_valid_recipe_text_is_kept(tmp_path):
    for path in RECIPES.glob("*.yaml"):
        assert load_recipe(path).text == path.read_text()
    crlf = tmp_path / "crlf.yaml"
    crlf.write_bytes(EXPLICIT.replace("\n", "\r\n").encode())
    assert load_recipe(crlf).text == EXPLICIT  # newlines as text mode reads them, as before


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200) | st.sampled_from(["{", "version: 1\nname: t\nselect: {op: ", "- &a [*a]", "? !!set {a}\n: 1"]))
def test_any_text_is_a_recipe_or_a_recipe_error(text):
    try:
        parse_recipe(text)
    except RecipeError:
        pass


# -- plans -----------------------------------------------------------------------------------------


KEYS = ["index", "reason", "metrics", "x"]


def valid_plan() -> SurgeryPlan:
    return SurgeryPlan(
        recipe="t",
        op="explicit",
        num_blocks=6,
        removed=(RemovedBlock(1, "listed in recipe", {"block_influence[all]": 0.1}), RemovedBlock(3, "listed in recipe")),
        protected=(0,),
    )


def write_plan(path: Path, change) -> Path:
    data = valid_plan().to_dict()
    change(data)
    path.write_text(json.dumps(data))
    return path


def index(k: int, value):
    return lambda d: d["removed"][k].__setitem__("index", value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (index(1, 60), "removed[1].index: block 60 is out of range for 6 blocks"),
        (index(0, -1), "removed[0].index: block -1 is out of range"),
        (index(1, 1), "removed[1].index: block 1 is already removed by removed[0]"),
        (index(0, True), "removed[0].index: Input should be a valid integer (got true)"),
        (index(0, "2"), 'removed[0].index: Input should be a valid integer (got "2")'),
        (lambda d: d.update(kept=[0, 1, 2, 4, 5]), "kept: [0, 1, 2, 4, 5] is not the blocks that removed leaves ([0, 2, 4, 5])"),
        (lambda d: d.update(protect=[0]), "unknown key 'protect' (did you mean 'protected'?)"),
        (lambda d: d["removed"][0].update(idx=1), "removed[0]: unknown key 'idx' (did you mean 'index'?)"),
        (lambda d: d["removed"][0].pop("reason"), "removed[0].reason: required field is missing"),
        (lambda d: d["removed"][0]["metrics"].update(x="high"), "removed[0].metrics.x: Input should be a valid number"),
        (lambda d: d.update(num_blocks=True), "num_blocks: Input should be a valid integer (got true)"),
        (lambda d: d.update(num_blocks=0), "num_blocks: Input should be greater than or equal to 1"),
        (lambda d: d.update(num_blocks=2, kept=[0]), "removed[1].index: block 3 is out of range for 2 blocks"),
        (lambda d: d.update(protected=[3]), "protected[0]: block 3 is protected but removed by removed[1]"),
        (lambda d: d.update(protected=[9]), "protected[0]: block 9 is out of range"),
        (lambda d: d.update(removed=[{"index": i, "reason": "r", "metrics": {}} for i in range(6)], kept=[]), "removes all 6 blocks"),
        (lambda d: d.update(op="lowst"), "op: unknown op 'lowst' (did you mean 'lowest'?)"),
        (lambda d: d.update(removed={"index": 1}), "removed: Input should be a valid list"),
    ],
    ids=[
        "out-of-range",
        "negative",
        "duplicate",
        "bool",
        "string",
        "kept-mismatch",
        "unknown-key",
        "unknown-entry-key",
        "missing-reason",
        "metric-not-number",
        "num-blocks-bool",
        "num-blocks-zero",
        "num-blocks-too-small",
        "protected-removed",
        "protected-out-of-range",
        "removes-all",
        "unknown-op",
        "removed-not-list",
    ],
)
def test_bad_plans_are_refused_by_field(tmp_path, change, expected):
    path = write_plan(tmp_path / "plan.json", change)
    with pytest.raises(InputError) as error:
        SurgeryPlan.load(path)
    assert str(path) in str(error.value) and expected in str(error.value)


def test_every_plan_problem_is_reported_at_once(tmp_path):
    def change(d):
        d["removed"][0]["index"] = "2"
        d["removed"][1]["index"] = 60
        d["extra"] = 1

    with pytest.raises(InputError, match=r"3 problem\(s\)") as error:
        SurgeryPlan.load(write_plan(tmp_path / "plan.json", change))
    for field in ("removed[0].index", "removed[1].index", "unknown key 'extra'"):
        assert field in str(error.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "does not exist"),
        (PNG, "is not UTF-8 text"),
        (b'{"format": "compressor.plan/1", "removed": [', "is not JSON"),
        (b"[" * 100_000, "is not JSON"),
        (b"[1, 2]", "is a JSON list, not an object"),
        (b'{"format": "compressor.calibration/1"}', "is not a compressor plan"),
    ],
    ids=["missing", "binary", "truncated", "deep", "list", "other-format"],
)
def test_plan_files_that_are_not_plans(tmp_path, content, expected):
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=expected) as error:
        SurgeryPlan.load(path)
    assert str(path) in str(error.value)


def test_plan_with_broken_recipe_text_is_refused(tmp_path):
    path = write_plan(tmp_path / "plan.json", lambda d: d.update(recipe_text="version: 1\nname: t\nselect: {op: explicit, blocs: [1]}\n"))
    with pytest.raises(InputError) as error:
        SurgeryPlan.load(path)
    assert "recipe_text: 2 problem(s)" in str(error.value) and "did you mean 'blocks'" in str(error.value)
    other = write_plan(tmp_path / "other.json", lambda d: d.update(recipe_text=EXPLICIT.replace("name: t", "name: u")))
    with pytest.raises(InputError, match="recipe_text: is recipe 'u', but the plan names recipe 't'"):
        SurgeryPlan.load(other)


def test_plan_round_trip_with_recipe_text(tmp_path):
    made = dataclasses.replace(plan(parse_recipe(EXPLICIT), 6), recipe_text=EXPLICIT)
    made.save(tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["recipe_text"] == EXPLICIT
    again = SurgeryPlan.load(tmp_path / "plan.json")
    assert again == made and again.recipe_text == EXPLICIT
    assert again.to_dict()["kept"] == [0, 2, 4, 5]
    assert again.describe() == made.describe()
    legacy = made.to_dict()
    del legacy["recipe_text"]  # written before plans carried their recipe
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    assert SurgeryPlan.load(tmp_path / "legacy.json").recipe_text is None


def test_check_model_refuses_another_block_count():
    valid_plan().check_model(6, "org/model")
    with pytest.raises(PlanError, match="made for a model with 6 blocks, but 'org/model' has 8"):
        valid_plan().check_model(8, "org/model")


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-3, 70) | st.floats(allow_nan=False) | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["index", "reason", "metrics", "x"]), inner, max_size=3)
        ),
        max_leaves=8,
    ),
    st.sampled_from(["removed", "protected", "kept", "num_blocks", "notes", "calibration", "recipe_text", "op"]),
)
def test_any_field_value_is_a_plan_or_an_input_error(tmp_path_factory, value, key):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    write_plan(path, lambda d: d.update({key: value}))
    try:
        loaded = SurgeryPlan.load(path)
    except InputError:
        return
    assert all(0 <= i < loaded.num_blocks for i in loaded.removed_indices) and loaded.kept


# -- calibration reports ---------------------------------------------------------------------------


def valid_report(n: int = 6) -> dict:
    per = lambda v: {"all": v, "text": v, "image": v}  # noqa: E731
    return CalibrationReport(
        model={"ref": "test", "num_blocks": n},
        data={"path": "d.jsonl", "sha256": "0" * 64, "num_samples": 1},
        options={},
        metrics={
            "block_influence": per([0.1] * n),
            "tail_probability": {"0.05": per([0.0] * n)},
            "adjacent_distance": per([None] * n),
            "angular_distance": {str(s): per([0.5] * (n - s + 1)) for s in (1, 2)},
            "ablation_kl": {"all": [0.2] * n},
            "greedy": {"order": [4, 2], "steps": [{"block": 4, "loss": 1.0, "kl": 0.1}, {"block": 2, "loss": 1.5, "kl": 0.2}]},
        },
        elapsed_s=0.0,
        format=REPORT_FORMAT,
    ).to_dict()


def test_valid_report_round_trip(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(valid_report()))
    again = CalibrationReport.load(tmp_path / "c.json")
    assert again.num_blocks == 6 and again.values("angular_distance", "all", span=2) == [0.5] * 5


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda r: r["metrics"]["block_influence"].update(all=[0.1] * 5), "metrics.block_influence.all: 5 values, expected 6"),
        (lambda r: r["metrics"]["angular_distance"]["2"].update(text=[0.5] * 6), "metrics.angular_distance.2.text: 6 values, expected 5"),
        (lambda r: r["metrics"]["ablation_kl"].update(all="x"), "metrics.ablation_kl.all: expected a list of 6 values, got string"),
        (
            lambda r: r["metrics"]["adjacent_distance"]["image"].__setitem__(0, "0.1"),
            "adjacent_distance.image: values must be numbers",
        ),
        (lambda r: r["model"].update(num_blocks="6"), 'model.num_blocks: expected a positive integer, got "6"'),
        (lambda r: r["model"].update(num_blocks=True), "model.num_blocks: expected a positive integer, got true"),
        (lambda r: r.update(model=[6]), "model: expected an object, got list"),
        (lambda r: r.update(metrics=[]), "metrics: expected an object, got list"),
        (lambda r: r["metrics"].pop("tail_probability"), "metrics.tail_probability: missing"),
        (lambda r: r["metrics"].update(tail_probability={"eps": {}}), "metrics.tail_probability: key 'eps' is not an epsilon"),
        (lambda r: r["metrics"].update(angular_distance={"7": {}}), "metrics.angular_distance: key '7' is not a span length 1..6"),
        (lambda r: r["metrics"]["block_influence"].pop("image"), "metrics.block_influence.image: expected a list of 6 values, got null"),
        (lambda r: r["metrics"]["greedy"].update(order=[9]), "metrics.greedy.order: expected a list of block indices 0..5"),
        (lambda r: r["metrics"]["greedy"].update(steps=[]), "metrics.greedy.steps: no step for block(s) [4, 2]"),
        (lambda r: r.update(elapsed="1"), "unknown key 'elapsed'"),
    ],
    ids=[
        "short-table",
        "span-table-length",
        "values-not-list",
        "value-not-number",
        "num-blocks-string",
        "num-blocks-bool",
        "model-not-object",
        "metrics-not-object",
        "metric-missing",
        "epsilon-key",
        "span-key",
        "modality-missing",
        "greedy-order",
        "greedy-steps",
        "unknown-key",
    ],
)
def test_hand_edited_reports_are_refused_by_field(tmp_path, change, expected):
    raw = valid_report()
    change(raw)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError) as error:
        CalibrationReport.load(path)
    assert str(path) in str(error.value) and expected in str(error.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (lambda text: text[: len(text) // 2], "is not JSON"),
        (lambda text: PNG + text.encode(), "is not UTF-8 text"),
        (lambda text: "[" + text + "]", "is a JSON list, not an object"),
    ],
    ids=["truncated", "binary", "list"],
)
def test_corrupt_reports_are_input_errors(tmp_path, content, expected):
    path = tmp_path / "c.json"
    written = content(json.dumps(valid_report()))
    path.write_bytes(written if isinstance(written, bytes) else written.encode())
    with pytest.raises(InputError, match=expected) as error:
        CalibrationReport.load(path)
    assert str(path) in str(error.value)


def test_directory_as_report(tmp_path):
    with pytest.raises(InputError, match="is a directory") as error:
        CalibrationReport.load(tmp_path)
    assert str(tmp_path) in str(error.value)
