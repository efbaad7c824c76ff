"""Property-based tests: generated recipes, plans and JSONL data lines, valid and mutated,
driven through the real CLI (in process) and `load_samples`.

What every property asserts, whatever the input:
- the CLI never fails as a bug: exit 0 or 2 (a user error, printed as "error: ...\\nFix: ..."),
  never 1 with "internal error", never a traceback;
- nothing is written outside the -o target (the example's folder tree, names, sizes and
  mtimes, is compared before and after), and no staging leftovers (`.NAME.tmp-*`,
  `.NAME.lock`) remain; a refused command writes nothing at all;
- `prune --plan` that exits 0 did exactly what the plan says (config block count, plan.json,
  compressor.json); an invalid plan exits 2;
- `load_samples` returns samples or raises InputError, and refuses images outside the data
  file's folder unless `allow_outside=True`.

Every example works in its own folder (`tempfile.mkdtemp(dir=tmp_path)`); the session's tiny
models are only read. Settings are derandomized (the same examples on every run) and keep
no example database, so a run leaves no files behind.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st
from PIL import Image

from compressor.data import load_samples
from compressor.errors import InputError

from .conftest import run_cli

NUM_BLOCKS = 6  # depth of every tiny model (conftest.build_tiny)
PLAN_FORMAT = "compressor.plan/1"
OPS = ("explicit", "lowest", "conditions", "span", "greedy")
METRICS = (
    "block_influence",
    "tail_probability",
    "adjacent_distance",
    "angular_distance",
    "ablation_loss",
    "ablation_kl",
    "visual_attention",
)
FUNCTIONAL = ("ablation_loss", "ablation_kl", "visual_attention")  # measured over all tokens only
MODALITIES = ("all", "text", "image")


def examples(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- what every CLI call must satisfy ------------------------------------------------------------------


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (symlinks not followed): files by type, size and mtime; folders by name."""
    found: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            info = path.lstat()
            key = str(path.relative_to(root))
            found[key] = ("dir",) if stat.S_ISDIR(info.st_mode) else (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns)
    return found


def assert_only_target_written(before: dict, after: dict, target: str, *, written: bool) -> None:
    """Only ``target`` (relative to the snapshot root) may differ, and only when the command succeeded."""
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    outside = sorted(k for k in changed if k != target and not k.startswith(target + "/"))
    assert not outside, f"written outside the -o target {target!r}: {outside}"
    name = Path(target).name
    leftovers = sorted(k for k in after if Path(k).name.startswith((f".{name}.tmp-", f".{name}.lock", f".{name}.old-")))
    assert not leftovers, f"staging leftovers: {leftovers}"
    if not written:
        assert not changed, f"a refused command changed {sorted(changed)}"


# An input given as a path to something other than a file with content.
NOT_A_FILE = ("<missing>", "<directory>", "<fifo>")


def put_input(path: Path, content: bytes | str) -> None:
    """Write ``content`` at ``path``, or make it missing, a folder or a FIFO (NOT_A_FILE)."""
    if content == "<directory>":
        path.mkdir()
    elif content == "<fifo>":
        os.mkfifo(path)
    elif content != "<missing>":
        path.write_bytes(content)


def assert_clean_exit(code: int, out: str, err: str) -> None:
    """0, or 2 with a one-paragraph user error; never an internal error or a traceback."""
    assert "Traceback" not in out + err, err
    assert "internal error" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert "error: " in err and "\nFix: " in err, err


# -- JSON values and text ---------------------------------------------------------------------------------

# Unicode text as editors write it (Hypothesis leaves lone surrogates out by default).
texts = st.text(max_size=12)
# Any JSON value, nested a little: the filler of wrong-typed fields and unknown keys.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
# Strings a JSON file may hold that no UTF-8 editor writes: lone surrogates ("\ud800" escapes).
LONE_SURROGATES = ("\ud800", "a\udc80b", "\udfff\ud800")
surrogate_texts = st.sampled_from(LONE_SURROGATES) | st.builds(lambda a, s, b: a + s + b, texts, st.sampled_from(LONE_SURROGATES), texts)


# -- recipes --------------------------------------------------------------------------------------------

recipe_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}", fullmatch=True)
open_fraction = st.floats(min_value=0.001, max_value=0.999)  # in (0, 1)
block_indices = st.integers(-8, 8)


def maybe(draw, target: dict, key: str, strategy) -> None:
    """Set ``target[key]`` to a drawn value, or leave the optional field out."""
    if draw(st.booleans()):
        target[key] = draw(strategy)


@st.composite
def metric_refs(draw) -> dict:
    """metric / modality / epsilon as the schema allows them together."""
    metric = draw(st.sampled_from(METRICS))
    ref: dict[str, Any] = {"metric": metric}
    if metric in FUNCTIONAL:
        maybe(draw, ref, "modality", st.just("all"))
    else:
        maybe(draw, ref, "modality", st.sampled_from(MODALITIES))
    if metric == "tail_probability":
        ref["epsilon"] = draw(st.floats(min_value=1e-6, max_value=10))
    return ref


@st.composite
def how_many(draw) -> dict:
    """Exactly one of count / fraction."""
    return {"count": draw(st.integers(1, 50))} if draw(st.booleans()) else {"fraction": draw(open_fraction)}


@st.composite
def selections(draw) -> dict:
    """A valid `select:` of every op, with optional protect and budget."""
    op = draw(st.sampled_from(OPS))
    select: dict[str, Any] = {"op": op}
    if op == "explicit":
        select["blocks"] = draw(st.lists(block_indices, min_size=1, max_size=5))
    elif op == "lowest":
        select |= draw(metric_refs()) | draw(how_many())
    elif op == "conditions":
        where = []
        for ref in draw(st.lists(metric_refs(), min_size=1, max_size=3)):
            bound = draw(st.sampled_from(["below", "above"]))
            where.append(ref | {bound: draw(st.floats(-10, 10))})
        if draw(st.booleans()):
            where.append(where[0])  # the same object twice: safe_dump writes an anchor and an alias
        select["where"] = where
    elif op == "span":
        select["n"] = draw(st.integers(1, 5))
        maybe(draw, select, "modality", st.sampled_from(MODALITIES))
    else:
        select |= draw(how_many())
    if draw(st.booleans()):
        protect: dict[str, Any] = {}
        maybe(draw, protect, "first", st.integers(0, 3))
        maybe(draw, protect, "last", st.integers(0, 3))
        maybe(draw, protect, "blocks", st.lists(block_indices, max_size=3))
        if op == "explicit" and draw(st.booleans()):
            protect["blocks"] = select["blocks"]  # shared list: an alias (the planner, not the schema, refuses the clash)
        select["protect"] = protect
    if draw(st.booleans()):
        budget: dict[str, Any] = {}
        maybe(draw, budget, "max_blocks", st.integers(1, 10))
        maybe(draw, budget, "max_fraction", open_fraction)
        select["budget"] = budget
    return select


@st.composite
def recipes(draw) -> dict:
    """A recipe dict the schema accepts: every top-level section, each optional one sometimes."""
    recipe: dict[str, Any] = {"version": 1, "name": draw(recipe_names)}
    maybe(draw, recipe, "description", texts)
    maybe(draw, recipe, "model", st.sampled_from(["org/model", "./models/tiny"]))
    if draw(st.booleans()):
        calibration: dict[str, Any] = {}
        maybe(draw, calibration, "data", st.sampled_from(["calib.jsonl", "../data/x.jsonl"]))
        maybe(draw, calibration, "num_samples", st.integers(1, 10**6))
        maybe(draw, calibration, "batch_size", st.integers(1, 64))
        maybe(draw, calibration, "token_budget", st.integers(8, 10**5))
        maybe(draw, calibration, "max_length", st.integers(8, 4096))
        maybe(draw, calibration, "epsilons", st.lists(st.floats(0.001, 1.0), min_size=1, max_size=3))
        maybe(draw, calibration, "max_span", st.integers(1, 8))
        maybe(draw, calibration, "ablation", st.booleans())
        maybe(draw, calibration, "greedy", st.integers(0, 8))
        maybe(draw, calibration, "attention", st.booleans())
        recipe["calibration"] = calibration
    recipe["select"] = draw(selections())
    if draw(st.booleans()):
        gates: dict[str, Any] = {}
        maybe(draw, gates, "max_accuracy_drop", st.floats(0, 1))
        maybe(draw, gates, "max_relative_drop", st.floats(0, 1))
        maybe(draw, gates, "min_speedup", st.floats(0.01, 10))
        recipe["validate"] = gates
    if draw(st.booleans()):
        export: dict[str, Any] = {"formats": draw(st.sampled_from([["hf"], ["hf", "onnx"], ["onnx", "hf"]]))}
        maybe(draw, export, "onnx_tolerance", st.floats(1e-8, 1))
        recipe["export"] = export
    return recipe


def dump(recipe: Any, *, flow: bool = False, unicode: bool = True) -> bytes:
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=flow, allow_unicode=unicode).encode("utf-8")


def mappings_in(value: Any) -> list[dict]:
    """Every mapping of a recipe dict, nested ones (select.where[i]) included."""
    found = []
    if isinstance(value, dict):
        found.append(value)
        for child in value.values():
            found += mappings_in(child)
    elif isinstance(value, list):
        for child in value:
            found += mappings_in(child)
    return found


def numeric_fields(value: Any) -> list[tuple[dict, str]]:
    """(mapping, key) of every int or float field (bools aside)."""
    return [(m, k) for m in mappings_in(value) for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)]


def copy(value: Any) -> Any:
    return json.loads(json.dumps(value))  # also unshares aliased objects, so a mutation hits one place


# Whole texts: each (bytes, expectation); "refused" must exit 2, "either" may be 0 or 2.
SYNTAX_CASES = [
    (b"", "refused"),  # empty file
    (b"\n\n", "refused"),
    (b"# just a comment\n", "refused"),
    (b"---\n...\n", "refused"),
    (b"[1, 2, 3]\n", "refused"),  # not a mapping
    (b"just a string\n", "refused"),
    (b"version: 1\nname: a\nselect: {op: explicit, blocks: [1]}\n---\nversion: 1\n", "refused"),  # two documents
    (b"version: 1\nname: a\nselect: {op: explicit, blocks: *nowhere}\n", "refused"),  # undefined alias
    (b"version: 1\nname: a\nselect: &s {op: explicit, blocks: [1], protect: *s}\n", "refused"),  # alias to an ancestor
    (b"version: 1\nname: a\nselect: !!python/object/apply:os.system ['true']\n", "refused"),
    (b"version: 1\nname: a\nselect: {op: explicit, blocks: [1], protect: {<<: {first: 1}, last: 1}}\n", "either"),  # merge key
    (b"version: 1\nname: a\nselect:\n  op: explicit\n  blocks: &b [1, 2]\n  protect: {blocks: *b}\n", "either"),
    (b"\xef\xbb\xbfversion: 1\nname: bom\nselect: {op: explicit, blocks: [1]}\n", "either"),  # a byte-order mark
    (b"version: 1\r\nname: crlf\r\nselect: {op: explicit, blocks: [1]}\r\n", "either"),
    (b"version: 1\nname: a\nselect: {op: explicit, blocks: [1]}\n? [a, b]\n: 1\n", "refused"),  # unhashable key
    (b"version: 1\nname: a\nselect: {op: explicit, blocks: [1]}\n" + b"#" * 1_000_001 + b"\n", "refused"),  # over 1 MB
]


def alias_bomb(levels: int, width: int) -> bytes:
    lines = ["version: 1", "name: bomb", "a0: &a0 [x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    lines.append("select: {op: explicit, blocks: [1]}")
    return ("\n".join(lines) + "\n").encode()


@st.composite
def recipe_files(draw) -> tuple[bytes | str, str]:
    """(file content or a NOT_A_FILE marker, "ok" | "refused" | "either"): a valid recipe, or one mutated on purpose."""
    recipe = draw(recipes())
    kind = draw(
        st.sampled_from(
            [
                "valid",
                "valid-flow-style",
                "unknown-key",
                "non-string-key",
                "wrong-type",
                "number-mutated",
                "missing-field",
                "unknown-op",
                "duplicate-key",
                "non-utf8",
                "deep-nesting",
                "alias-bomb",
                "syntax-case",
                "not-a-file",
                "byte-edit",
            ]
        )
    )
    note(f"mutation: {kind}")
    if kind == "valid":
        return dump(recipe, unicode=draw(st.booleans())), "ok"
    if kind == "valid-flow-style":
        return dump(recipe, flow=True), "ok"
    if kind in ("unknown-key", "non-string-key"):  # at any level: top, select, protect, where[i], ...
        recipe = copy(recipe)
        target = draw(st.sampled_from(mappings_in(recipe)))
        key = draw(st.from_regex(r"x_[a-z]{1,8}", fullmatch=True)) if kind == "unknown-key" else draw(st.sampled_from([True, None, 1, 2.5]))
        target[key] = draw(json_values)
        return dump(recipe), "refused"
    if kind == "wrong-type":  # any field, replaced by a value no field accepts
        recipe = copy(recipe)
        target = draw(st.sampled_from(mappings_in(recipe)))
        target[draw(st.sampled_from(sorted(target)))] = draw(st.sampled_from([{"x_wrong": [1]}, [{"x_wrong": 1}]]))
        return dump(recipe), "refused"
    if kind == "number-mutated":  # negative, huge, bool, numeric string, word, nan/inf for a number
        recipe = copy(recipe)
        target, key = draw(st.sampled_from(numeric_fields(recipe)))
        value = draw(
            st.sampled_from([True, False, 0, -1, 10**30, -(10**30), 1e308, float("inf"), float("-inf"), float("nan"), 0.5, "many"])
            | st.integers(-(10**9), -1)
            | st.builds(str, st.integers(-5, 50))
        )
        target[key] = value
        return dump(recipe), "refused" if value == "many" else "either"
    if kind == "missing-field":
        recipe = copy(recipe)
        if draw(st.booleans()):
            del recipe[draw(st.sampled_from(["version", "name", "select"]))]
        else:
            del recipe["select"]["op"]
        return dump(recipe), "refused"
    if kind == "unknown-op":
        recipe = copy(recipe)
        recipe["select"]["op"] = draw(st.sampled_from(["explict", "lowst", "all", "", "EXPLICIT"]) | st.integers())
        return dump(recipe), "refused"
    if kind == "duplicate-key":  # block style: a top-level key again at the end
        return dump(recipe) + f"{draw(st.sampled_from(['version', 'name', 'select']))}: again\n".encode(), "refused"
    if kind == "non-utf8":
        content = dump(recipe)
        at = draw(st.integers(0, len(content)))
        return content[:at] + draw(st.sampled_from([b"\xff", b"\xfe\xfe", b"\xc0\xaf", b"\xed\xa0\x80"])) + content[at:], "refused"
    if kind == "deep-nesting":
        depth = draw(st.integers(50, 20_000))
        shape = draw(st.sampled_from(["open", "closed", "as-value", "mapping"]))
        if shape == "open":
            return b"[" * depth, "refused"
        if shape == "closed":
            return b"[" * depth + b"]" * depth, "refused"
        if shape == "mapping":
            return b"{a: " * depth + b"1" + b"}" * depth, "refused"
        return b"version: 1\nname: deep\nselect: {op: explicit, blocks: " + b"[" * depth + b"1" + b"]" * depth + b"}\n", "refused"
    if kind == "alias-bomb":
        return alias_bomb(draw(st.integers(3, 12)), draw(st.integers(2, 10))), "refused"  # small ones: unknown keys a0, a1, ...
    if kind == "syntax-case":
        return draw(st.sampled_from(SYNTAX_CASES))
    if kind == "not-a-file":
        return draw(st.sampled_from(NOT_A_FILE)), "refused"
    content = bytearray(dump(recipe))  # byte-edit: a few random deletions, insertions, replacements
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(len(content) - 1, 0)))
        action = draw(st.sampled_from(["delete", "insert", "replace"]))
        byte = draw(st.sampled_from(b":-[]{}&*!|>'\"#\n \t0x"))
        if action == "delete":
            del content[at : at + 1]
        elif action == "insert":
            content.insert(at, byte)
        elif content:
            content[at] = byte
    return bytes(content), "either"


@examples(150)
@given(files=st.lists(recipe_files(), min_size=1, max_size=3))
def test_recipe_check_exits_0_or_2_fast_and_reports_every_file(tmp_path, capsys, files):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    paths = []
    for k, (content, _) in enumerate(files):
        paths.append(folder / f"recipe{k}.yaml")
        put_input(paths[-1], content)
    before = tree(folder)
    started = time.perf_counter()
    code, out, err = run_cli(capsys, "recipe", "check", *paths)
    elapsed = time.perf_counter() - started
    assert_clean_exit(code, out, err)
    assert elapsed < 5, f"recipe check took {elapsed:.1f}s"
    assert_only_target_written(before, tree(folder), "<none>", written=False)  # check writes nothing
    for path, (content, expectation) in zip(paths, files):
        accepted = f"ok: {path} (" in out
        event(f"{expectation}: {'accepted' if accepted else 'refused'}")
        if expectation == "ok":
            recipe = yaml.safe_load(content)
            assert f"ok: {path} ({recipe['name']}: {recipe['select']['op']})" in out, err
        elif expectation == "refused":
            assert not accepted and str(path) in err, (out, err)
        else:
            assert accepted or str(path) in err
    assert code == (0 if all(f"ok: {p} (" in out for p in paths) else 2)


# -- plan from a generated explicit recipe --------------------------------------------------------------


@st.composite
def explicit_recipes(draw) -> dict:
    """Explicit recipes with indices in and out of range, repeats, protection and budgets."""
    select: dict[str, Any] = {"op": "explicit", "blocks": draw(st.lists(block_indices, min_size=1, max_size=7))}
    if draw(st.booleans()):
        select["protect"] = {
            "first": draw(st.integers(0, 2)),
            "last": draw(st.integers(0, 2)),
            "blocks": draw(st.lists(block_indices, max_size=2)),
        }
    if draw(st.booleans()):
        select["budget"] = {"max_blocks": draw(st.integers(1, 7))}
    return {"version": 1, "name": draw(recipe_names), "select": select}


@examples(60)
@given(recipe=explicit_recipes())
def test_plan_of_an_explicit_recipe_is_exactly_its_blocks_or_refused(tmp_path, capsys, tiny_models, recipe):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    (folder / "recipe.yaml").write_bytes(dump(recipe))
    before = tree(folder)
    code, out, err = run_cli(
        capsys, "plan", "--recipe", folder / "recipe.yaml", "--model", tiny_models["llama"].path, "-o", folder / "plan.json"
    )
    event(f"exit {code}")
    assert_clean_exit(code, out, err)
    assert_only_target_written(before, tree(folder), "plan.json", written=code == 0)
    select = recipe["select"]
    in_range = all(-NUM_BLOCKS <= i < NUM_BLOCKS for i in select["blocks"])
    wanted = sorted({i % NUM_BLOCKS for i in select["blocks"]})
    plain = in_range and len(wanted) == len(select["blocks"]) < NUM_BLOCKS and "protect" not in select and "budget" not in select
    if plain:  # nothing in the way: the plan must be made
        assert code == 0, err
    if code == 0:
        saved = json.loads((folder / "plan.json").read_text())
        assert in_range and sorted(b["index"] for b in saved["removed"]) == wanted
        assert saved["num_blocks"] == NUM_BLOCKS and saved["kept"] == [i for i in range(NUM_BLOCKS) if i not in wanted]
        assert set(wanted).isdisjoint(saved["protected"]) and saved["kept"]


# -- prune --plan -----------------------------------------------------------------------------------------

metric_values = st.none() | st.floats() | st.integers(-(10**6), 10**6)  # NaN and ±inf included: JSON as Python writes it


@st.composite
def valid_plans(draw, text=texts) -> dict:
    """A plan `prune --plan` must apply: 1..5 of the 6 blocks, in any order, optional fields in or out.

    ``text`` draws the free-text fields (reasons, metric names, notes, recipe names)."""
    removed = draw(st.lists(st.integers(0, NUM_BLOCKS - 1), min_size=1, max_size=NUM_BLOCKS - 1, unique=True))
    kept = [i for i in range(NUM_BLOCKS) if i not in removed]
    plan: dict[str, Any] = {"format": PLAN_FORMAT}
    if draw(st.booleans()):  # the plan carries its recipe: then name and op must agree with it
        recipe = draw(recipes())
        plan |= {"recipe": recipe["name"], "op": recipe["select"]["op"], "recipe_text": dump(recipe).decode()}
    else:
        plan |= {"recipe": draw(text), "op": draw(st.sampled_from(OPS))}
    plan["num_blocks"] = NUM_BLOCKS
    plan["removed"] = [
        {"index": i, "reason": draw(text), "metrics": draw(st.dictionaries(text, metric_values, max_size=3))} for i in removed
    ]
    maybe(draw, plan, "protected", st.lists(st.sampled_from(kept), unique=True))
    maybe(draw, plan, "criterion", text)
    maybe(draw, plan, "notes", st.lists(text, max_size=2))
    maybe(
        draw, plan, "calibration", st.none() | st.dictionaries(st.sampled_from(["model", "data", "sha256"]) | text, json_values, max_size=3)
    )
    maybe(draw, plan, "kept", st.just(kept))
    if "recipe_text" in plan and draw(st.booleans()):
        del plan["recipe_text"]
    return plan


def complement(plan: dict, n: int) -> list[int]:
    gone = {e["index"] for e in plan["removed"]}
    return [i for i in range(n) if i not in gone]


@st.composite
def mutated_plans(draw, refused_only: bool = False) -> tuple[dict | bytes | str, str]:
    """(plan, expectation): the plan as a dict (written as JSON), raw bytes or a NOT_A_FILE marker; "ok" or "refused".

    A third of them valid (unless ``refused_only``), the rest broken in one way each."""
    plan = draw(valid_plans())
    if not refused_only and draw(st.integers(0, 2)) == 0:
        note("mutation: none")
        return plan, "ok"
    kind = draw(
        st.sampled_from(
            [
                "index-out-of-range",
                "index-negative",
                "index-duplicated",
                "index-wrong-type",
                "removes-all",
                "removes-none",
                "kept-mismatch",
                "unknown-key",
                "unknown-entry-key",
                "missing-key",
                "missing-entry-key",
                "wrong-format",
                "num-blocks-mismatch",
                "num-blocks-wrong",
                "unknown-op",
                "protected-removed",
                "protected-out-of-range",
                "metric-not-number",
                "reason-not-string",
                "removed-not-list",
                "recipe-text-mismatch",
                "recipe-text-broken",
                "not-json",
                "not-an-object",
                "not-a-file",
            ]
        )
    )
    note(f"mutation: {kind}")
    entry = draw(st.sampled_from(plan["removed"]))
    if kind == "index-out-of-range":
        entry["index"] = draw(st.integers(NUM_BLOCKS, 10**30))
    elif kind == "index-negative":
        entry["index"] = draw(st.integers(-(10**30), -1))
    elif kind == "index-duplicated":
        plan["removed"].insert(draw(st.integers(0, len(plan["removed"]))), {**entry, "reason": draw(texts)})
    elif kind == "index-wrong-type":  # bools, numeric strings, floats, null are not block indices
        i = entry["index"]
        entry["index"] = draw(st.sampled_from([True, False, str(i), float(i), i + 0.5, None, [i], {"i": i}]))
    elif kind == "removes-all":
        plan["removed"] = [{"index": i, "reason": "r", "metrics": {}} for i in draw(st.permutations(range(NUM_BLOCKS)))]
        plan.pop("protected", None)
        if "kept" in plan:
            plan["kept"] = []
    elif kind == "removes-none":  # loads, but there is nothing to export
        plan["removed"] = []
        plan.pop("protected", None)
        if "kept" in plan:
            plan["kept"] = list(range(NUM_BLOCKS))
    elif kind == "kept-mismatch":
        right = complement(plan, NUM_BLOCKS)
        plan["kept"] = draw(st.lists(st.integers(-1, NUM_BLOCKS), max_size=NUM_BLOCKS).filter(lambda k: k != right))
    elif kind == "unknown-key":
        plan[draw(st.from_regex(r"x_[a-z]{1,8}", fullmatch=True) | st.sampled_from(["protect", "keep", "blocks", "Removed"]))] = draw(
            json_values
        )
    elif kind == "unknown-entry-key":
        entry[draw(st.sampled_from(["idx", "block", "x", "Index"]))] = draw(json_values)
    elif kind == "missing-key":
        del plan[draw(st.sampled_from(["format", "recipe", "op", "num_blocks", "removed"]))]
    elif kind == "missing-entry-key":
        del entry[draw(st.sampled_from(["index", "reason", "metrics"]))]
    elif kind == "wrong-format":
        plan["format"] = draw(
            st.sampled_from(["compressor.plan/2", "compressor.calibration/1", "compressor.export/1", "", None, 1, ["compressor.plan/1"]])
            | texts.filter(lambda t: t != PLAN_FORMAT)
        )
    elif kind == "num-blocks-mismatch":  # a plan for another model: indices in range, block count not this model's
        highest = max(e["index"] for e in plan["removed"])
        plan["num_blocks"] = n = draw(st.integers(highest + 1, 40).filter(lambda n: n != NUM_BLOCKS))
        if "kept" in plan:
            plan["kept"] = complement(plan, n)
    elif kind == "num-blocks-wrong":
        plan["num_blocks"] = draw(st.sampled_from([0, -6, 100_001, 10**12, "6", 6.0, True, None, [6]]))
    elif kind == "unknown-op":
        plan["op"] = draw(st.sampled_from(["explict", "lowst", "all", "", "EXPLICIT"]))
    elif kind == "protected-removed":
        plan["protected"] = [*plan.get("protected", []), entry["index"]]
    elif kind == "protected-out-of-range":
        plan["protected"] = [*plan.get("protected", []), draw(st.integers(NUM_BLOCKS, 100) | st.integers(-100, -1))]
    elif kind == "metric-not-number":
        entry["metrics"][draw(texts)] = draw(st.sampled_from(["high", "0.1", True, [], {}, [0.1]]))
    elif kind == "reason-not-string":
        entry["reason"] = draw(st.sampled_from([None, 1, True, [], {"why": "x"}]))
    elif kind == "removed-not-list":
        plan["removed"] = draw(st.sampled_from([{"index": 1}, "1,2", 3, None, {}]))
    elif kind == "recipe-text-mismatch":  # the carried recipe names another recipe (or another op)
        other = draw(recipes())
        other["name"] = "other" if plan["recipe"] != "other" else "another"
        plan["recipe_text"] = dump(other).decode()
    elif kind == "recipe-text-broken":
        plan["recipe_text"] = draw(
            st.sampled_from(["", "[", "version: 2\n", "{op: explicit}", "version: 1\nname: t\nselect: {op: explicit, blocs: [1]}\n"])
        )
    elif kind == "not-json":
        text = json.dumps(plan)
        return draw(
            st.sampled_from([b"", b"\xff\xfe{}", b"{,}", b"NaN]"])
            | st.integers(0, len(text) - 1).map(lambda k: text[:k].encode())  # every proper prefix is broken JSON
            | st.binary(max_size=30).map(lambda b: b"\xff" + b)
        ), "refused"
    elif kind == "not-an-object":
        return json.dumps(draw(st.sampled_from([[plan], [], 6, "plan", None, True, 1.5]))).encode(), "refused"
    elif kind == "not-a-file":
        return draw(st.sampled_from(NOT_A_FILE)), "refused"
    return plan, "refused"


def plan_bytes(plan: dict | bytes | str, style: int) -> bytes | str:
    if not isinstance(plan, dict):
        return plan
    if style == 0:
        return json.dumps(plan).encode()
    if style == 1:
        return (json.dumps(plan, indent=1) + "\n").encode()
    return json.dumps(plan, indent=2, ensure_ascii=False).replace("\n", "\r\n").encode()  # CRLF, raw UTF-8


def assert_pruned_as_planned(out: Path, plan: dict) -> None:
    removed = sorted(e["index"] for e in plan["removed"])
    kept = [i for i in range(NUM_BLOCKS) if i not in removed]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == NUM_BLOCKS - len(removed) == len(kept)
    for key in ("layer_types",):  # per-layer lists follow the block count
        if config.get(key) is not None:
            assert len(config[key]) == len(kept)
    written = json.loads((out / "plan.json").read_text())
    assert sorted(e["index"] for e in written["removed"]) == removed
    assert written["num_blocks"] == NUM_BLOCKS and written["kept"] == kept
    manifest = json.loads((out / "compressor.json").read_text())
    assert manifest["blocks"] == {"before": NUM_BLOCKS, "after": len(kept), "removed": removed}
    assert set(manifest["files"]) <= {p.name for p in out.iterdir()}


def prune_with(
    capsys, tmp_path, model, plan_content: bytes | str, *, out_of_core: bool, existing: str, target: str = "out", dry_run: bool = False
):
    """Run `prune MODEL --plan P -o OUT` in a fresh folder; returns (code, out, err, folder, before, after).

    ``existing``: what is at OUT before: "none", "previous-output", "user-folder", or "plan-file"
    (OUT is the plan itself)."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    put_input(folder / "plan.json", plan_content)
    out = folder / ("plan.json" if existing == "plan-file" else target)
    extra = (["--out-of-core"] if out_of_core else []) + (["--dry-run"] if dry_run else [])
    if existing == "previous-output":  # an earlier compressor output: --overwrite may replace it
        out.mkdir(parents=True)
        (out / ".compressor-output").write_text("written by compressor\n")
        (out / "old.txt").write_text("old")
        extra.append("--overwrite")
    elif existing == "user-folder":  # a folder compressor did not write: never replaced
        out.mkdir(parents=True)
        (out / "notes.txt").write_text("mine")
        extra.append("--overwrite")
    before = tree(folder)
    code, stdout, stderr = run_cli(capsys, "prune", model, "--plan", folder / "plan.json", "-o", out, *extra)
    return code, stdout, stderr, folder, before, tree(folder)


SMALL_PLAN = {
    "format": PLAN_FORMAT,
    "recipe": "t",
    "op": "explicit",
    "num_blocks": NUM_BLOCKS,
    "removed": [{"index": 1, "reason": "r", "metrics": {}}],
}


@examples(40)
# Every kind of existing output at least once, whatever the generator draws.
@example(case=(SMALL_PLAN, "ok"), style=0, family="llama", out_of_core=False, dry_run=False, existing="previous-output")
@example(case=(SMALL_PLAN, "ok"), style=0, family="qwen2", out_of_core=True, dry_run=False, existing="user-folder")
@example(case=(SMALL_PLAN, "ok"), style=0, family="llama", out_of_core=False, dry_run=False, existing="plan-file")
@given(
    case=mutated_plans(),
    style=st.integers(0, 2),
    family=st.sampled_from(["llama", "qwen2"]),  # qwen2: per-layer layer_types to slice
    out_of_core=st.booleans(),
    dry_run=st.sampled_from([False, False, False, True]),
    existing=st.sampled_from(["none", "none", "previous-output", "user-folder", "plan-file"]),
)
def test_prune_plan_does_exactly_the_plan_or_refuses_writing_nothing(
    tmp_path, capsys, tiny_models, case, style, family, out_of_core, dry_run, existing
):
    plan, expectation = case
    model = tiny_models[family].path
    model_before = tree(model)
    code, out, err, folder, before, after = prune_with(
        capsys, tmp_path, model, plan_bytes(plan, style), out_of_core=out_of_core, existing=existing, dry_run=dry_run
    )
    event(f"{expectation} plan, {existing}{', dry run' if dry_run else ''}: exit {code}")
    assert_clean_exit(code, out, err)
    assert tree(model) == model_before, "the model folder changed"
    target = "plan.json" if existing == "plan-file" else "out"
    assert_only_target_written(before, after, target, written=code == 0 and not dry_run)
    # A dry run claims no output, so only the plan decides; otherwise a user's folder and the
    # plan itself are never written over.
    blocked = not dry_run and existing in ("user-folder", "plan-file")
    if expectation == "ok" and not blocked:
        assert code == 0, err
    if expectation == "refused" or blocked:
        assert code == 2, out
    if code != 0:
        assert "wrote" not in out, out  # no claim of a checkpoint that is not there
    if code == 0 and dry_run:
        assert "dry run: nothing written" in out
    elif code == 0:
        assert isinstance(plan, dict)
        assert_pruned_as_planned(folder / "out", plan)
        assert not (folder / "out" / "old.txt").exists()


SURROGATE_PLAN = {**SMALL_PLAN, "removed": [{"index": 1, "reason": "\ud800", "metrics": {}}]}


@examples(12)
@example(plan=SURROGATE_PLAN, out_of_core=False)
@given(plan=valid_plans(text=surrogate_texts), out_of_core=st.booleans())
def test_prune_plan_with_lone_surrogates_in_its_text_is_not_an_internal_error(tmp_path, capsys, tiny_models, plan, out_of_core):
    """JSON may escape lone surrogates ("\\ud800") in any string of a plan: a user error or a
    checkpoint, never an internal error. (Found failing: the model card and the printed plan
    cannot encode them.)"""
    code, out, err, _, before, after = prune_with(
        capsys, tmp_path, tiny_models["llama"].path, json.dumps(plan).encode(), out_of_core=out_of_core, existing="none"
    )
    assert_clean_exit(code, out, err)
    assert_only_target_written(before, after, "out", written=code == 0)


@examples(10)
@example(depth=1, plan=b"[]")
@given(depth=st.integers(1, 3), plan=mutated_plans(refused_only=True).map(lambda case: case[0]))
def test_refused_prune_into_a_new_nested_folder_creates_no_folders(tmp_path, capsys, tiny_models, depth, plan):
    """A refused prune writes nothing, not even the -o target's missing parent folders.
    (Found failing: the output lock creates them before the plan is read.)"""
    target = "/".join(f"new{k}" for k in range(depth)) + "/out"
    code, out, err, _, before, after = prune_with(
        capsys, tmp_path, tiny_models["llama"].path, plan_bytes(plan, 0), out_of_core=False, existing="none", target=target
    )
    assert_clean_exit(code, out, err)
    assert code == 2
    assert after == before, f"a refused prune left {sorted(after.keys() - before.keys())}"


# -- JSONL data ------------------------------------------------------------------------------------------

# Image references a line may hold -> (resolves inside the data folder, is a readable image).
# ABS_INSIDE / ABS_OUTSIDE become absolute paths of the layout's images.
IMAGES: dict[str, tuple[bool, bool]] = {
    "img.png": (True, True),
    "./sub/img.png": (True, True),
    "sub/../img.png": (True, True),
    "../data/img.png": (True, True),  # leaves the folder and comes back
    "link_in.png": (True, True),  # symlink to img.png
    "ABS_INSIDE": (True, True),
    "../outside.png": (False, True),
    "link_out.png": (False, True),  # symlink inside that points outside
    "sub/link_up.png": (False, True),  # ../../outside.png, through a sub-folder
    "ABS_OUTSIDE": (False, True),
    "/dev/null": (False, False),
    "../nowhere.png": (False, False),
    "missing.png": (True, False),
    "adir": (True, False),
    "": (True, False),  # the data folder itself
    "notimg.txt": (True, False),
    "truncated.png": (True, False),
    "loop": (True, False),  # a symlink to itself
    "fifo": (True, False),
    "bad\x00name.png": (True, False),
    "x" * 300 + ".png": (True, False),  # a name longer than any file system allows
    "up/outside.png": (False, True),  # through a symlink to the parent folder
    "up/data/img.png": (True, True),  # ... and back into the data folder
}


def make_layout(root: Path) -> Path:
    """root/outside.png beside root/data/ (the data folder) with images, links and traps; returns data/."""
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    (data / "adir").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    for path in (root / "outside.png", data / "img.png", data / "sub" / "img.png"):
        Image.fromarray(pixels).save(path)
    (data / "truncated.png").write_bytes((data / "img.png").read_bytes()[:40])
    (data / "notimg.txt").write_text("not an image\n")
    (data / "link_in.png").symlink_to("img.png")
    (data / "link_out.png").symlink_to("../outside.png")
    (data / "sub" / "link_up.png").symlink_to("../../outside.png")
    (data / "loop").symlink_to("loop")
    (data / "up").symlink_to("..")
    os.mkfifo(data / "fifo")
    return data


def image_ref(ref: str, data: Path) -> str:
    return {"ABS_INSIDE": str(data / "img.png"), "ABS_OUTSIDE": str(data.parent / "outside.png")}.get(ref, ref)


# A line: (text or bytes, what it is). What it is: ("blank",), ("junk",) for non-UTF-8 bytes,
# ("bad",) for a malformed line, or ("sample", prompt, answer, choices, image reference).
prompts = st.text(min_size=1, max_size=20).filter(str.strip)


@st.composite
def sample_records(draw) -> tuple[dict, tuple]:
    record: dict[str, Any] = {"prompt": draw(prompts)}
    choices = None
    if draw(st.booleans()):
        choices = draw(st.lists(st.text(min_size=1, max_size=6), min_size=2, max_size=4))
        record["choices"] = choices
        record["answer"] = draw(st.sampled_from(choices))
    elif draw(st.booleans()):
        record["answer"] = draw(st.none() | st.text(max_size=10))  # null is "no answer"
    ref = None
    if draw(st.booleans()):
        # Half of them images that exist (inside or outside), half any reference.
        ref = draw(st.sampled_from(sorted(r for r, (_, readable) in IMAGES.items() if readable)) | st.sampled_from(sorted(IMAGES)))
        record["image"] = ref  # placeholder; resolved per layout when written
    keys = list(record)
    order = draw(st.permutations(keys))
    return {k: record[k] for k in order}, ("sample", record["prompt"], record.get("answer"), choices, ref)


blank_lines = st.sampled_from(["", "   ", "\t"]).map(lambda text: (text, ("blank",)))


@st.composite
def data_lines(draw) -> tuple[Any, tuple]:
    kind = draw(
        st.sampled_from(
            ["sample", "sample", "sample", "wrong-type", "unknown-key", "bad-choices", "not-json", "not-object", "junk", "blank"]
        )
    )
    if kind == "sample":
        return draw(sample_records())
    if kind == "blank":
        return draw(blank_lines)
    if kind == "junk":  # \xff is never UTF-8: the whole file is refused
        return draw(st.binary(max_size=20)).replace(b"\n", b"") + b"\xff", ("junk",)
    if kind == "not-json":
        return draw(
            st.sampled_from(["{", '{"prompt": "x",}', "{'prompt': 'x'}", '{"prompt": "x"', "prompt: x", "NaN]", '"unterminated'])
        ), ("bad",)
    if kind == "not-object":
        return json.dumps(draw(st.sampled_from([[], [{"prompt": "x"}], 1, "prompt", None, True, 2.5]))), ("bad",)
    record, _ = draw(sample_records())
    if kind == "unknown-key":
        record[draw(st.sampled_from(["question", "Prompt", "images", "x", ""]))] = draw(json_values)
    elif kind == "bad-choices":
        record["choices"], record["answer"] = draw(
            st.sampled_from(
                [
                    ("ab", "a"),
                    ([], None),
                    (["only"], "only"),
                    ([1, 2], 1),
                    (["a", ""], "a"),
                    (["a", "b"], "c"),
                    (["a", "b"], None),
                    ({"a": 1}, "a"),
                ]
            )
        )
    else:  # wrong-type
        field = draw(st.sampled_from(["prompt", "answer", "image", "choices"]))
        record[field] = draw(
            {
                "prompt": st.sampled_from([None, 1, [], {}, True, "", "  \n "]),
                "answer": st.sampled_from([1, [], {}, True, 1.5]),
                "image": st.sampled_from([1, [], {}, True, ["img.png"]]),
                "choices": st.sampled_from(["a,b", 1, True]),
            }[field]
        )
    return record, ("bad",)


def write_jsonl(path: Path, lines: list[tuple[Any, tuple]], *, bom: bool, newline: str, final_newline: bool) -> None:
    encoded = []
    for content, _ in lines:
        if isinstance(content, dict):
            record = dict(content)
            if isinstance(record.get("image"), str) and record["image"] in IMAGES:
                record["image"] = image_ref(record["image"], path.parent)
            content = json.dumps(record, ensure_ascii=False)
        encoded.append(content if isinstance(content, bytes) else content.encode("utf-8"))
    data = newline.encode().join(encoded) + (newline.encode() if final_newline else b"")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)


def expected_load(lines: list[tuple[Any, tuple]], *, allow_outside: bool, limit: int | None) -> tuple[list[tuple] | None, bool]:
    """What `load_samples` must do: (the samples, or None for an InputError; whether an image
    outside the folder is among the refused lines). Lines are read in order and reading stops at
    the line after the ``limit``-th sample, as the loader does."""
    samples, problems, outside = [], 0, False
    for _, what in lines:
        if what[0] == "junk":
            return None, False  # the whole file is refused as not UTF-8, whatever came before
        if what[0] == "blank":
            continue
        if limit is not None and len(samples) >= limit:
            break
        if what[0] == "bad":
            problems += 1
            continue
        ref = what[4]
        if ref is not None:
            inside, readable = IMAGES[ref]
            if not inside and not allow_outside:
                problems, outside = problems + 1, True
                continue
            if not readable:
                problems += 1
                continue
        samples.append(what)
    return (samples if samples and not problems else None), outside


jsonl_files = st.fixed_dictionaries(
    {
        # Half of the files hold only samples and blank lines (images may still be refused),
        # half any kind of line.
        "lines": st.lists(sample_records() | blank_lines, min_size=1, max_size=8) | st.lists(data_lines(), min_size=1, max_size=8),
        "bom": st.booleans(),
        "newline": st.sampled_from(["\n", "\r\n"]),
        "final_newline": st.booleans(),
    }
)


@examples(200)
@given(file=jsonl_files, allow_outside=st.booleans(), limit=st.none() | st.integers(1, 4))
def test_load_samples_returns_samples_or_an_input_error(tmp_path, file, allow_outside, limit):
    data = Path(tmp_path, "layout", "data")
    if not data.exists():  # one layout for every example: load_samples only reads it
        make_layout(data.parent)
    path = data / "data.jsonl"
    write_jsonl(path, **file)
    expected, outside = expected_load(file["lines"], allow_outside=allow_outside, limit=limit)
    try:
        samples = load_samples(path, limit=limit, allow_outside=allow_outside)
    except InputError as error:
        event("InputError" + (" (outside)" if outside else ""))
        assert expected is None, f"refused a valid file: {error}"
        if outside:
            assert "outside the data file's folder" in str(error) and "--allow-outside-data" in str(error)
        return
    assert expected is not None, f"accepted: {samples}"
    event("samples" + (" with images" if any(s.image for s in samples) else ""))
    base = data.resolve()
    assert len(samples) == len(expected)
    for sample, (_, prompt, answer, choices, ref) in zip(samples, expected):
        assert (sample.prompt, sample.answer) == (prompt, answer)
        assert sample.choices == (tuple(choices) if choices is not None else None)
        if ref is None:
            assert sample.image is None
        else:
            assert sample.image == (data / image_ref(ref, data)).resolve()
            assert allow_outside or sample.image.is_relative_to(base)


@examples(40)
@example(depth=100_000, where="line")
@given(depth=st.integers(1, 200_000), where=st.sampled_from(["line", "prompt", "unknown-key"]))
def test_load_samples_deeply_nested_json_line_is_an_input_error(tmp_path, depth, where):
    """A JSONL line of deeply nested JSON is a malformed line, like any other.
    (Found failing: json.loads raises RecursionError, which escapes load_samples.)"""
    nested = "[" * depth + "]" * depth
    line = {"line": nested, "prompt": f'{{"prompt": {nested}}}', "unknown-key": f'{{"prompt": "p", "x": {nested}}}'}[where]
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "data.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(InputError):
        load_samples(path)


def calibrate_in_fresh_folder(capsys, tmp_path, model, file: dict, *, allow_outside: bool):
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    data = make_layout(root)
    write_jsonl(data / "data.jsonl", **file)
    before = tree(root)
    extra = ["--allow-outside-data"] if allow_outside else []
    code, out, err = run_cli(
        capsys, "calibrate", model, "--data", data / "data.jsonl", "-o", root / "report.json", "--device", "cpu", *extra
    )
    return code, out, err, root, before, tree(root)


@examples(20)
@given(file=jsonl_files, allow_outside=st.booleans())
def test_calibrate_on_generated_data_reports_or_refuses_writing_nothing(tmp_path, capsys, tiny_models, file, allow_outside):
    code, out, err, root, before, after = calibrate_in_fresh_folder(
        capsys, tmp_path, tiny_models["llama"].path, file, allow_outside=allow_outside
    )
    assert_clean_exit(code, out, err)
    assert_only_target_written(before, after, "report.json", written=code == 0)
    expected, outside = expected_load(file["lines"], allow_outside=allow_outside, limit=None)
    event(f"exit {code}")
    assert code == (0 if expected is not None else 2), err
    if code == 0:
        report = json.loads((root / "report.json").read_text())
        assert report["data"]["num_samples"] == len(expected)
    elif outside:
        assert "outside the data file's folder" in err


@examples(8)
@example(prompt="\ud800", answer=None)
@given(prompt=surrogate_texts, answer=st.none() | surrogate_texts)
def test_calibrate_on_lone_surrogates_is_not_an_internal_error(tmp_path, capsys, tiny_models, prompt, answer):
    """JSON may escape lone surrogates ("\\ud800") in a prompt: refused as a malformed line or
    calibrated, never an internal error. (Found failing: load_samples accepts them and the
    tokenizer raises TypeError.)"""
    record = {"prompt": prompt} if answer is None else {"prompt": prompt, "answer": answer}
    file = {"lines": [(json.dumps(record), ("bad",))], "bom": False, "newline": "\n", "final_newline": True}
    code, out, err, _, before, after = calibrate_in_fresh_folder(capsys, tmp_path, tiny_models["llama"].path, file, allow_outside=False)
    assert_clean_exit(code, out, err)
    assert_only_target_written(before, after, "report.json", written=code == 0)
