"""Recipes: the strict YAML schema that says which blocks may go, and loading it.

The schema is pydantic v2 with ``extra="forbid"`` everywhere and a discriminated union on
``select.op``. Loading reports *every* problem at once, each with its location
(``select.where[0].below``), and unknown keys or ops get a "did you mean" suggestion: a
misspelt ``protect`` must never silently un-protect a block.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .inputs import not_unicode, read_input_text

Metric = Literal[
    "block_influence", "tail_probability", "adjacent_distance", "angular_distance", "ablation_loss", "ablation_kl", "visual_attention"
]
# Measured by extra calibration passes (functional.py), over all tokens only; the option that
# turns each on.
FUNCTIONAL_METRICS = {"ablation_loss": "ablation", "ablation_kl": "ablation", "visual_attention": "attention"}
Modality = Literal["all", "text", "image"]


class _Strict(BaseModel):
    # strict: a recipe says 2, not "2" or true; YAML already gives numbers and booleans their types.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


class Protect(_Strict):
    """Blocks that are never removed: the first/last ``k`` and any listed indices."""

    first: int = Field(0, ge=0)
    last: int = Field(0, ge=0)
    blocks: list[int] = Field(default_factory=list)


class Budget(_Strict):
    """An upper bound on how many blocks the selection may remove."""

    max_blocks: int | None = Field(None, ge=1)
    max_fraction: float | None = Field(None, gt=0, lt=1)


class _Select(_Strict):
    protect: Protect = Protect()
    budget: Budget | None = None


class _MetricRef(_Strict):
    metric: Metric
    modality: Modality = "all"
    epsilon: float | None = Field(None, gt=0, description="threshold for tail_probability")

    @model_validator(mode="after")
    def _epsilon_matches_metric(self) -> Any:
        if self.metric == "tail_probability" and self.epsilon is None:
            raise ValueError("metric tail_probability needs an 'epsilon' (e.g. epsilon: 0.05)")
        if self.metric != "tail_probability" and self.epsilon is not None:
            raise ValueError(f"'epsilon' only applies to tail_probability, not {self.metric}")
        if self.metric in FUNCTIONAL_METRICS and self.modality != "all":
            raise ValueError(f"{self.metric} is measured over all tokens: use modality 'all' (or leave it out)")
        return self


class Explicit(_Select):
    """Remove exactly these blocks (0-based, original numbering; negatives count from the end)."""

    op: Literal["explicit"]
    blocks: list[int] = Field(min_length=1)


class _HowMany(_Strict):
    """How many blocks a ranking op removes: a ``count`` or a ``fraction`` of the blocks."""

    count: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _count_or_fraction(self) -> Any:
        if (self.count is None) == (self.fraction is None):
            raise ValueError("give exactly one of 'count' or 'fraction'")
        return self


class Lowest(_HowMany, _Select, _MetricRef):
    """Remove the ``count`` (or ``fraction``) of blocks with the lowest metric value (ShortGPT)."""

    op: Literal["lowest"]


class Condition(_MetricRef):
    """One threshold: the metric value must be strictly ``below`` or ``above`` a number."""

    below: float | None = None
    above: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> Any:
        if (self.below is None) == (self.above is None):
            raise ValueError("give exactly one of 'below' or 'above'")
        return self

    def holds(self, value: float) -> bool:
        return value < self.below if self.below is not None else value > self.above  # type: ignore[operator]


class Conditions(_Select):
    """Remove every block for which all conditions hold (Skip-It style); a budget keeps the lowest."""

    op: Literal["conditions"]
    where: list[Condition] = Field(min_length=1)


class Span(_Select):
    """Remove the contiguous run of ``n`` blocks with the smallest angular distance (Gromov et al.)."""

    op: Literal["span"]
    n: int = Field(ge=1)
    modality: Modality = "all"


class ReplaceTraining(_Strict):
    """How the one block that stands in for a replaced span trains (`heal.replace`): on the
    calibration samples, span input -> span output, a seeded share held out to measure it."""

    steps: int = Field(100, ge=1)
    lr: float = Field(1e-4, gt=0, description="YAML reads 1e-4 as text: write 1.0e-4")
    batch_size: int = Field(4, ge=1)
    seed: int = 0
    loss: Literal["mse", "cosine"] = "mse"
    held_out: float = Field(0.25, gt=0, lt=1, description="share of the samples kept apart to measure the mapping")
    max_length: int | None = Field(512, ge=8)


class Replace(_Select):
    """Replace a contiguous run of ``n`` blocks by ONE block of the same architecture, trained to
    map the span's input hidden states to its output (LLM-Streamline): the span at ``start``, or
    the one with the smallest angular distance (as ``span``)."""

    op: Literal["replace"]
    n: int
    # The span's first block (negatives count from the end); None: chosen by angular distance.
    start: int | None = None
    modality: Modality = "all"
    train: ReplaceTraining = ReplaceTraining()

    @field_validator("n")
    @classmethod
    def _shortens(cls, n: int) -> int:
        if n < 2:
            raise ValueError(
                f"replace needs n >= 2 (got {n}): one trained block stands in for n, so n = {n} removes nothing; "
                "to remove single blocks use op explicit, lowest or span"
            )
        return n


class Greedy(_HowMany, _Select):
    """Remove the first ``count`` (or ``fraction``) blocks of the greedy order (SLEB-style):
    each removal measured with the earlier ones already gone (calibrate with ``greedy``)."""

    op: Literal["greedy"]


Selection = Annotated[Union[Explicit, Lowest, Conditions, Span, Greedy, Replace], Field(discriminator="op")]
OPS = ("explicit", "lowest", "conditions", "span", "greedy", "replace")


class CalibrationDefaults(_Strict):
    """Calibration settings a recipe carries; command-line options override them."""

    data: str | None = Field(None, description="JSONL file, relative to the recipe")
    num_samples: int | None = Field(128, ge=1)
    batch_size: int = Field(8, ge=1)
    token_budget: int | None = Field(None, ge=8, description="pack length-sorted batches to this many padded tokens")
    max_length: int | None = Field(512, ge=8)
    epsilons: list[float] = Field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1], min_length=1)
    max_span: int = Field(4, ge=1)
    ablation: bool = Field(False, description="skip-one scan: ablation_loss, ablation_kl")
    greedy: int = Field(0, ge=0, description="greedy removal order up to this many blocks")
    attention: bool = Field(False, description="visual_attention per block")


class ValidateThresholds(_Strict):
    """Release gates used by `compressor validate` (the CLI's values win); each needs data
    that can evaluate it (`validate.check_gates` says which)."""

    data: str | None = Field(None, description="evaluation JSONL for `compressor run`, relative to the recipe")
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="absolute, 0.05 = five points")
    max_relative_drop: float | None = Field(None, ge=0, le=1, description="fraction of the original accuracy")
    max_perplexity_increase: float | None = Field(None, ge=0, description="relative, 0.1 = at most 10 % above the base's")
    max_kl: float | None = Field(None, ge=0, description="mean KL(base || pruned) over every scored position")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="share of positions where both models agree")
    min_speedup: float | None = Field(None, gt=0)
    max_runtime_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="the original's exact-match drop under the runtime: modes vs plain"
    )


class RuntimeSection(_Strict):
    """Run-time visual-token modes (`compressor.runtime`) that `compressor validate` (and so
    `compressor run`) measures on the answered samples besides plain generation, for the original
    model and the pruned one; validate's --visual-keep, --visual-cut, --visual-depth, --ranking,
    --guide, --early-exit and --visual-band override these fields. Blocks are 0-based in the
    original numbering (negatives count from the end), as everywhere in a recipe."""

    keep: float = Field(1.0, gt=0, le=1, description="share of image tokens kept from the cut on; 1.0 prunes none")
    cut: int | None = Field(None, description="first block where image tokens are pruned")
    depth: float | None = Field(None, ge=0, lt=1, description="the cut as a fraction of the depth (block floor(depth * L))")
    ranking: Literal["guide", "self", "random"] = "self"
    self_queries: Literal["last", "text"] = "text"
    seed: int = Field(0, description="for ranking: random")
    band: list[int] | None = Field(None, min_length=2, max_length=2, description="[first, last]: image tokens take part only there")
    band_where: list[Condition] | None = Field(
        None, min_length=1, description="Skip-It: the band holds every block where these conditions do not all hold for image tokens"
    )
    early_exit: float | None = Field(None, gt=0, le=1, description="SGL: the guide answers when its confidence reaches this")
    consistency_keep: float = Field(0.05, gt=0, le=1, description="share of image tokens of SGL's consistency check")
    guide: Literal["pruned"] | None = Field(None, description="'pruned': the pruned checkpoint guides the original (SGL)")

    @model_validator(mode="after")
    def _coherent(self) -> Any:
        if self.cut is not None and self.depth is not None:
            raise ValueError("give one of 'cut' or 'depth': both say where image tokens start being pruned")
        if self.keep < 1 and self.cut is None and self.depth is None:
            raise ValueError(f"keep = {self.keep:g} prunes image tokens from some block on: give 'cut' (a block) or 'depth' (a fraction)")
        if self.band is not None and self.band_where is not None:
            raise ValueError("give one of 'band' or 'band_where': both say where image tokens take part")
        if self.band is not None and (self.band[0] < 0) == (self.band[1] < 0) and self.band[0] > self.band[1]:
            raise ValueError(f"band {self.band}: its first block comes after its last (an empty band); write [first, last]")
        needs = self.early_exit is not None or (self.keep < 1 and self.ranking == "guide")
        if needs and self.guide is None:
            what = "early_exit" if self.early_exit is not None else "ranking: guide"
            raise ValueError(f"{what} needs a guide model: add 'guide: pruned' (the pruned checkpoint guides the original, as in SGL)")
        if self.guide is not None and not needs:
            raise ValueError("'guide' is read only by 'ranking: guide' with keep < 1, and by 'early_exit': drop it or set one of them")
        return self


class ExportOptions(_Strict):
    """What `compressor prune --recipe` / `compressor run` write besides the HF checkpoint."""

    formats: list[Literal["hf", "onnx"]] = Field(default_factory=lambda: ["hf"], min_length=1)
    onnx_tolerance: float = Field(1e-4, gt=0, le=1, description="ONNX-vs-PyTorch bound (onnx_verify)")

    @model_validator(mode="after")
    def _hf_first(self) -> Any:
        if "hf" not in self.formats:
            raise ValueError("'hf' must be among the formats: every other format is exported from the HF checkpoint")
        return self

    @property
    def onnx(self) -> bool:
        return "onnx" in self.formats


class HealSection(_Strict):
    """`compressor run` heals the pruned checkpoint (`compressor.heal`) before validating it: the
    run's ``hf/`` is then the healed checkpoint, ``pruned/`` the one before healing. The fields
    are `compressor heal`'s options (its defaults where left out)."""

    data: str = Field(description="training JSONL, relative to the recipe")
    method: Literal["distill", "lora", "full", "projector"] = "distill"
    steps: int | None = Field(None, ge=1)
    token_budget: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0, description="YAML reads 1e-4 as text: write 1.0e-4")
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    held_out: float = Field(0.1, ge=0, lt=1)
    eval_every: int | None = Field(None, ge=1)
    patience: int = Field(3, ge=0)
    hidden_loss: Literal["mse", "cosine", "none"] = "none"
    hidden_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0)
    blocks: list[int] | None = Field(None, description="blocks full/lora train, original numbering")
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_modules: list[str] | None = None
    max_length: int | None = Field(512, ge=8)
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(50, ge=1, description="steps between resume checkpoints")

    @model_validator(mode="after")
    def _one_limit(self) -> Any:
        if self.steps is not None and self.token_budget is not None:
            raise ValueError("'steps' and 'token_budget' both say when healing stops: give one")
        return self

    def options(self) -> dict[str, Any]:
        """The section as `heal.HealOptions` keywords (the data aside)."""
        given = self.model_dump(exclude={"data"})
        for key in ("blocks", "lora_modules"):
            given[key] = tuple(given[key]) if given[key] is not None else None
        return given


class Recipe(_Strict):
    version: Literal[1]
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=96)
    description: str | None = None
    model: str | None = Field(None, description="default model folder or Hub id")
    calibration: CalibrationDefaults = CalibrationDefaults()
    select: Selection
    thresholds: ValidateThresholds | None = Field(None, alias="validate")
    export: ExportOptions = ExportOptions()
    heal: HealSection | None = None
    runtime: RuntimeSection | None = None

    @property
    def needs_calibration(self) -> bool:
        # A replace at a given start needs data to train on, but no metric to choose by.
        if isinstance(self.select, Replace):
            return self.select.start is None
        return self.select.op != "explicit"


@dataclass(frozen=True)
class RecipeFile:
    """A validated recipe with the file it came from (its text is exported verbatim)."""

    recipe: Recipe
    path: Path
    text: str

    def resolve(self, relative: str) -> Path:
        return (self.path.parent / relative).resolve()


# Recipes are small hand-written files; these bounds are far above any of them and far below
# what a hostile or mistaken input (a checkpoint passed as a recipe, an alias bomb) needs.
MAX_RECIPE_BYTES = 1_000_000
MAX_YAML_NODES = 10_000  # values, keys and containers, counted with every alias expanded
MAX_YAML_ALIASES = 100


class _RecipeLoader(yaml.SafeLoader):
    """YAML loader that refuses duplicate keys (PyYAML silently keeps the last one), and stops
    composing at the first alias or node past the limits: parsing is lazy, so a large document
    is refused after reading only its first ``MAX_YAML_NODES`` values."""

    def __init__(self, stream: str, source: str):
        super().__init__(stream)
        self.source = source
        self.aliases = 0
        self.nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise RecipeError(
                    f"{self.source}: more than {MAX_YAML_ALIASES} YAML aliases (*name); no recipe needs that many.",
                    fix="write the values out instead of aliasing them.",
                )
        else:
            self.nodes += 1
            if self.nodes > MAX_YAML_NODES:
                raise _too_large(self.source)
        return super().compose_node(parent, index)


def _too_large(source: str) -> RecipeError:
    return RecipeError(
        f"{source}: more than {MAX_YAML_NODES:,} YAML values once its aliases are expanded "
        "(an alias bomb, or an alias inside the node it names?); no recipe is that large.",
        fix="write the values out instead of aliasing them.",
    )


def _construct_mapping(loader: _RecipeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults`, merged by construct_mapping
        key = loader.construct_object(key_node)
        if not isinstance(key, typing.Hashable):  # `? [a, b]: 1`; SafeLoader refuses it too, later
            raise yaml.constructor.ConstructorError(None, None, f"a key cannot be a {type(key).__name__}", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_recipe(path: Path | str) -> RecipeFile:
    path = Path(path)
    text = read_input_text(path, "Recipe", max_bytes=MAX_RECIPE_BYTES, error=RecipeError, fix="pass a YAML recipe file (see recipes/).")
    return RecipeFile(recipe=parse_recipe(text, str(path)), path=path.resolve(), text=text)


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    raw = _load_yaml(text, source)
    if not_unicode(raw):
        raise RecipeError(
            f"{source}: holds a string that is not valid Unicode (a lone surrogate escape such as \\ud800).", fix="remove it."
        )
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{source}: a recipe is a YAML mapping (version, name, select, ...), got {type(raw).__name__}.",
            fix="start from one of the recipes in recipes/.",
        )
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        problems = [_describe(e) for e in error.errors()]
        listed = "\n".join(f"  - {p}" for p in problems)
        raise RecipeError(
            f"{source}: {len(problems)} problem(s):\n{listed}",
            fix="correct the fields listed above (`compressor recipe check FILE` re-checks).",
        ) from None


def _load_yaml(text: str, source: str) -> Any:
    """The one YAML document in ``text``, or a `RecipeError` saying why there is none."""
    try:
        return _construct_bounded(text, source)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise RecipeError(f"{source}: not valid YAML{where}: {problem}.", fix="fix the YAML syntax.") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise RecipeError(f"{source}: YAML nested too deeply to be a recipe.", fix="start from one of the recipes in recipes/.") from None


def _construct_bounded(text: str, source: str) -> Any:
    """Compose the document, check its size with aliases expanded, and only then construct it.

    Composing shares an aliased node instead of copying it, so a dozen lines of nested aliases
    (a "billion laughs") compose instantly but would construct billions of values.
    """
    loader = _RecipeLoader(text, source)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_NODES:
            raise _too_large(source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node) -> float:
    """How many nodes the document has once every alias is expanded; infinite when an alias
    names a node that contains it. Memoised per node, so this costs the composed graph's size."""
    sizes: dict[int, float] = {}

    def size(node: yaml.Node) -> float:
        key = id(node)
        if key not in sizes:
            sizes[key] = math.inf  # reached again before it is counted: an alias to an ancestor
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [child for pair in node.value for child in pair]
            else:
                children = []
            sizes[key] = 1 + sum(size(child) for child in children)
        return sizes[key]

    return size(root)


# -- error messages ---------------------------------------------------------------------------


def _describe(error: dict[str, Any]) -> str:
    model, path = _walk(error["loc"])
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden" and model is not None:
        key = str(error["loc"][-1])
        allowed = _field_names(model)
        return f"{path}: unknown key '{key}'{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}"
    if kind == "union_tag_invalid":
        tag = str(error.get("ctx", {}).get("tag", ""))
        return f"{path}.op: unknown op '{tag}'{did_you_mean(tag, OPS)}; ops: {', '.join(OPS)}"
    if kind == "union_tag_not_found":
        return f"{path}: missing 'op' (one of: {', '.join(OPS)})"
    if kind == "literal_error":
        expected = [v.strip(" '") for v in str(error.get("ctx", {}).get("expected", "")).replace(" or ", ",").split(",")]
        given = str(error.get("input"))
        return f"{path}: {message}{did_you_mean(given, [e for e in expected if e])}"
    if kind == "missing":
        return f"{path}: required field is missing"
    return f"{path}: {message.removeprefix('Value error, ')}"


def did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or nothing; the planner uses it too."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _walk(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, str]:
    """Follow an error location through the schema: the model it ends in, and a readable path.

    Discriminated-union tags that pydantic inserts into locations are skipped in the path.
    """
    model: type[BaseModel] | None = Recipe
    path = ""
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        fields = {info.alias or name: info for name, info in model.model_fields.items()} if model else {}
        if part not in fields:
            if model is not None and not parts:
                break  # the last part is an unknown key of `model`
            path += f".{part}" if path else str(part)
            model = None
            continue
        path += f".{part}" if path else str(part)
        candidates = _models_in(fields[part].annotation)
        if len(candidates) > 1 and parts and isinstance(parts[0], str):
            tag = parts.pop(0)
            candidates = [c for c in candidates if _op_of(c) == tag] or candidates
        model = candidates[0] if len(candidates) == 1 else None
    return model, path or "(top level)"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType, list):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _op_of(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("op")
    return typing.get_args(field.annotation)[0] if field else None
