"""`compressor arch probe`: an `Adapter` proposed for a model family compressor has none for.

Owns reading a family's block-tied knowledge off one model without its weights: the config (as
transformers reads it, defaults filled in), the model's skeleton built on the meta device (module
tree and tensor shapes, no memory), and the checkpoint's safetensors headers (on-disk names). From
them it finds the decoder block list (the longest `nn.ModuleList` of one block class whose length
is a decoder config int, preferring the one under ``get_decoder()``), the block count's key, the
on-disk name template of a block, the attributes holding a block's own index, and every field of
the decoder config, tensor of the decoder and index attribute of the decoder tied to the block
count — each classified into the `Adapter` rule kinds (`architectures.RULE_FIELDS`) on evidence,
strongest first: a written adapter states that rule for that name; the skeleton (which blocks
build which modules) or ``layer_types`` shows it; the field's name and value suggest it. What it
cannot classify is marked, with why.

Used by `compressor arch probe` (`probe_model`: a table and an ``Adapter(...)`` literal) and by
`compressor prune --probe-adapter` (`probed_adapter`): the proposal is used only when every
block-tied field is classified, and only with the export-time proof (`equivalence`) — a
classification is evidence, not knowledge, and the proof is what checks the rules on real inputs.
Not inferred: rules outside the decoder config (the vision config's, e.g. Qwen3-VL's DeepStack
indexes) and removal limits no field states (the layer type transformers forces last, a layer type
that must stay); only KV-sharing sources are protected, for a count a written adapter protects.
Those are left to the proof, which names the first block where the pruned model parts from the
original (or the reload that fails).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .architectures import ADAPTERS, RULE_FIELDS, Adapter, StepRule, adapter_for_config, probed_adapters
from .block_tensors import BlockTensor
from .errors import CheckpointError, InputError, UnsupportedArchitectureError, VerificationError
from .reindex import NOT_PER_BLOCK, layer_period

if TYPE_CHECKING:
    from torch import nn

    from .hub import ModelSource

log = logging.getLogger(__name__)

HIGH, MEDIUM = "high", "medium"
NO_RULE = "no rule needed"
ONNX_REFUSAL = "no written adapter: compressor exports to ONNX only families whose adapter was written and tested (this one was probed)"
# Config entries that describe the config itself, never blocks.
_METADATA = frozenset(
    {
        "architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype", "id2label", "label2id",
        "task_specific_params", "auto_map", "_commit_hash", "_attn_implementation_autoset", "quantization_config",
    }
)  # fmt: skip
_PERIOD = re.compile(r"(step|interval|pattern|period|every|frequency|freq)$")
_FROM_START = re.compile(r"(^|_)(first|start|begin|max)(_|$)")
_FROM_END = re.compile(r"(^|_)(last|tail)(_|$)")


def _blockish(name: str) -> bool:
    """Whether a name speaks of blocks ("mlp_only_layers", "num_kv_shared_layers"), not of a part
    of every block ("layer_norm_eps", "layerdrop")."""
    tokens = re.split(r"[._]", name.lower())
    words = {"layer", "layers", "block", "blocks"}
    return any(t in words and (i + 1 == len(tokens) or tokens[i + 1] not in {"norm", "scale", "drop"}) for i, t in enumerate(tokens))


def _sized(name: str) -> bool:
    """Whether an int's name says it is a size, not a number of blocks ("hidden_size_per_layer_input")."""
    return bool({"size", "dim", "width", "heads", "vocab", "features"} & set(re.split(r"[._]", name.lower())))


@dataclass(frozen=True)
class Finding:
    """One block-tied field of the probed model and what the proposal does with it: ``attr`` is
    the `Adapter` field it goes into (with ``item``: the key, a `StepRule`, a `BlockTensor`), ""
    when no rule is needed or none fits; ``confidence`` is "" when it could not be classified."""

    field: str
    value: Any
    attr: str
    confidence: str
    why: str
    item: Any = None
    where: str = "config"  # config (a decoder config key), tensor (of the decoder), attribute (of the decoder)

    @property
    def classified(self) -> bool:
        return bool(self.confidence)

    @property
    def rule(self) -> str:
        if not self.classified:
            return "UNCLASSIFIED"
        return RULE_FIELDS[self.attr].kind if self.attr else NO_RULE


@dataclass
class Probe:
    """What `probe_config` read off one model, and the adapter it proposes (None when it found
    no decoder block list: then ``problem`` says why)."""

    model: str
    architecture: str
    model_type: str
    transformers: str
    findings: list[Finding] = field(default_factory=list)
    adapter: Adapter | None = None
    written: Adapter | None = None
    facts: list[str] = field(default_factory=list)  # the layout found, one line each
    problem: str = ""
    config: Any = None  # the root config probed (rules are compared on it)

    @property
    def unclassified(self) -> list[Finding]:
        return [f for f in self.findings if not f.classified]

    @property
    def usable(self) -> bool:
        return self.adapter is not None and not self.unclassified

    def in_force(self) -> Adapter:
        """The proposal as `prune --probe-adapter` uses it: named so that every message, the
        manifest and the card say the adapter was probed."""
        assert self.adapter is not None
        return replace(self.adapter, family=f"{self.adapter.family} (probed)")

    def describe(self) -> str:
        lines = [f"probed {self.model}: {self.architecture} (model_type {self.model_type}), transformers {self.transformers}"]
        if self.written is not None:
            lines.append(f"  written adapter: {self.written.family} — compressor uses it; the proposal below is for comparison only")
        else:
            lines.append(
                "  written adapter: none — `compressor prune --probe-adapter` uses the proposal below (with the export-time proof)"
            )
        lines += [f"  {fact}" for fact in self.facts]
        if self.adapter is None:
            lines.append(f"\nno proposal: {self.problem}")
            return "\n".join(lines)
        lines.append("\nblock-tied fields:")
        rows = [("field", "value", "proposed rule", "confidence", "why")]
        rows += [(f.field, _short(f.value), f.rule, f.confidence or "-", f.why) for f in self.findings]
        if len(rows) == 1:
            rows.append(("(none)", "", "", "", "no decoder config field, decoder tensor or decoder attribute is tied to the block count"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, [*widths, 0])).rstrip() for r in rows]
        lines.append("\nproposed adapter (compressor/architectures.py):")
        lines.append(adapter_source(self.adapter))
        lines.append("")
        if self.written is not None:
            lines.append(self._compared())
        if not self.findings:
            lines.append(
                "no block-tied field beyond the block count: `compressor prune MODEL --probe-adapter ...` can prune with this "
                "proposal; the checkpoint is written only if the export-time proof passes."
            )
        elif self.unclassified:
            lines.append(
                f"{len(self.unclassified)} of {len(self.findings)} block-tied fields could not be classified "
                f"({', '.join(f.field for f in self.unclassified)}): `compressor prune --probe-adapter` refuses this model. "
                "Write an adapter for the family, starting from the proposal, with a rule for each UNCLASSIFIED field."
            )
        else:
            lines.append(
                f"every block-tied field is classified ({len(self.findings)}): `compressor prune MODEL --probe-adapter ...` can prune "
                "with this proposal; the checkpoint is written only if the export-time proof passes."
            )
        return "\n".join(lines)

    def _compared(self) -> str:
        """How the proposal's rules differ from the written adapter's, on this config."""
        assert self.adapter is not None and self.written is not None
        ours = {(r.field, r.kind) for r in self.adapter.rules(self.config)}
        theirs = {(r.field, r.kind) for r in self.written.rules(self.config)}
        if ours == theirs:
            return f"the proposal states the same rules as the written {self.written.family} adapter on this config."
        missing = ", ".join(f"{f} ({k})" for f, k in sorted(theirs - ours)) or "none"
        extra = ", ".join(f"{f} ({k})" for f, k in sorted(ours - theirs)) or "none"
        return f"against the written {self.written.family} adapter on this config: the proposal lacks {missing}; it adds {extra}."

    def refusal(self) -> UnsupportedArchitectureError:
        """Why `prune --probe-adapter` cannot use this probe, and what to do."""
        shown = f"{self.architecture} (model_type {self.model_type})"
        if self.adapter is None:
            return UnsupportedArchitectureError(
                f"No written adapter for {shown}, and `--probe-adapter` cannot propose one: {self.problem}",
                fix="write an adapter for this family in compressor/architectures.py (see `compressor arch list` for the rule kinds); "
                "nothing was written.",
            )
        listed = "\n".join(f"  - {f.field} = {_short(f.value)}: {f.why}" for f in self.unclassified)
        return UnsupportedArchitectureError(
            f"No written adapter for {shown}, and `--probe-adapter` cannot classify {len(self.unclassified)} of its "
            f"{len(self.findings)} block-tied fields, so removing blocks could leave them describing blocks that are gone:\n{listed}",
            fix=f"write an adapter for this family in compressor/architectures.py with a rule for each field above: "
            f"`compressor arch probe {self.model}` prints the proposal to start from (the classified fields' rules and the "
            "layout); nothing was written.",
        )


# -- probing ----------------------------------------------------------------------------------------


def probe_model(source: ModelSource) -> Probe:
    """Probe the model in ``source``'s folder: its config, its skeleton on the meta device and
    its safetensors headers (never its weights)."""
    from .loading import load_config

    config = load_config(source.path, trust_remote_code=source.trust_remote_code)
    return probe_config(config, disk=_disk_tensors(source.path), trust_remote_code=source.trust_remote_code, name=source.ref)


def probe_config(config: Any, *, disk: dict[str, tuple[int, ...]] | None = None, trust_remote_code: bool = False, name: str = "") -> Probe:
    """Probe a model from its root ``config`` (a transformers config) and, when given, the
    tensors its checkpoint holds on disk ({name: shape}: the block name template is read from
    them; without them it is the module path)."""
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    model_type = str(getattr(config, "model_type", "") or "")
    probe = Probe(
        model=name or model_type,
        architecture=names[0] if names else f"model_type {model_type}",
        model_type=model_type,
        transformers=transformers.__version__,
        config=config,
    )
    try:
        probe.written = adapter_for_config(config)
    except UnsupportedArchitectureError:
        pass
    model = _skeleton(config, trust_remote_code)
    text = config.get_text_config()
    text_path = _text_config_path(config, text)
    values = _config_fields(text)
    mixed: list[str] = []
    found = _block_list(model, values, mixed)
    if found is None:
        probe.problem = "no nn.ModuleList of one block class whose length is a decoder config int" + (
            f"; {'; '.join(mixed)}: the probe proposes rules for a list of one block class only."
            if mixed
            else f" (ints of the decoder config: {', '.join(sorted(k for k, v in values.items() if _is_int(v)))})."
        )
        return probe
    block_path, count_key, by_decoder = found
    blocks = model.get_submodule(block_path)
    count = len(blocks)
    probe.architecture = names[0] if names else type(model).__name__
    kinds = _kinds(blocks)
    renumber = _index_attrs(blocks)
    prefix, prefix_from = _tensor_prefix(block_path, blocks, count, disk)
    decoder = model.get_submodule(block_path.rpartition(".")[0])
    known = _known_names()
    findings = _config_findings(_Seen(count, count_key, values, known, blocks, kinds))
    findings += _tensor_findings(model, block_path, count, values, known)
    findings += _attribute_findings(decoder, count, known)
    probe.findings = findings
    probe.facts = [
        f"decoder blocks: {block_path}, {count} × {type(blocks[0]).__name__} ("
        + ("under get_decoder()" if by_decoder else "the longest block list")
        + f"); block count at {f'{text_path}.{count_key}'.lstrip('.')}",
        f"block kinds: {_describe_kinds(blocks, kinds)}",
        f"on disk: {prefix}* ({prefix_from})",
        f"a block's own index in: {', '.join(renumber) or 'no attribute'}",
    ]
    module = type(model).__module__.split(".")
    transformers_module = module[2] if len(module) > 2 and module[:2] == ["transformers", "models"] else ""
    chosen = [f for f in findings if f.classified and f.attr]

    def items(attr: str) -> tuple[Any, ...]:
        return tuple(dict.fromkeys(f.item for f in chosen if f.attr == attr))

    image_keys = tuple(k for k in ("image_token_id", "image_token_index") if _is_int(getattr(config, k, None)))
    # A count of KV-sharing blocks a written adapter protects the sources of (Gemma 4): protected here too.
    kv_keys = {a.kv_shared_key for a in ADAPTERS if a.kv_shared_key}
    kv_shared = next((f.field for f in chosen if f.attr == "tail_count_fields" and f.field in kv_keys), "")
    probe.adapter = Adapter(
        family=model_type or type(model).__name__.lower(),
        architectures=(probe.architecture,),
        model_types=(model_type,),
        block_paths=(block_path,),
        text_config_path=text_path,
        count_key=count_key,
        per_layer_lists=items("per_layer_lists"),
        index_fields=items("index_fields"),
        renumber_attrs=renumber,
        tensor_prefix=prefix,
        layer_period_fields=items("layer_period_fields"),
        index_lists=items("index_lists"),
        step_rules=items("step_rules"),
        block_dicts=items("block_dicts"),
        tail_count_fields=items("tail_count_fields"),
        block_tensors=items("block_tensors"),
        decoder_index_attrs=items("decoder_index_attrs"),
        kv_shared_key=kv_shared,
        image_token_keys=image_keys,
        multimodal=text is not config,
        onnx="",
        onnx_refusal=ONNX_REFUSAL,
        transformers_module=transformers_module if transformers_module not in ("", model_type) else "",
        notes=("proposed by `compressor arch probe`: no written adapter",),
    )
    return probe


def _skeleton(config: Any, trust_remote_code: bool) -> nn.Module:
    """The model ``config`` describes, built on the meta device: modules and shapes, no memory."""
    import torch
    import transformers

    classes = [getattr(transformers, n, None) for n in getattr(config, "architectures", None) or []]
    model_class = next((c for c in classes if isinstance(c, type)), None)
    errors: list[str] = []
    with torch.device("meta"):
        if model_class is not None:
            try:
                return model_class._from_config(config)
            except (ValueError, TypeError, AttributeError, KeyError, RuntimeError) as error:
                errors.append(f"{model_class.__name__}: {error}")
        for auto in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
            auto_class = getattr(transformers, auto, None)
            if auto_class is None:
                continue
            try:
                return auto_class.from_config(config, trust_remote_code=trust_remote_code)
            except (ValueError, TypeError, AttributeError, KeyError, RuntimeError) as error:
                errors.append(f"{auto}: {error}")
    raise UnsupportedArchitectureError(
        f"The model's skeleton could not be built from its config ({'; '.join(errors) or 'no model class named'}).",
        fix="the probe needs a config transformers can build a model from (pass --trust-remote-code for code in the folder, "
        "if you have read it); or write an adapter for this family.",
    )


def _text_config_path(config: Any, text: Any) -> str:
    if text is config:
        return ""
    for key, value in vars(config).items():
        if value is text:
            return key
    return "text_config"


def _config_fields(text: Any) -> dict[str, Any]:
    values = text.to_dict()
    return {k: v for k, v in values.items() if k not in _METADATA and not k.startswith("_name")}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _block_list(model: nn.Module, values: dict[str, Any], mixed: list[str]) -> tuple[str, str, bool] | None:
    """(dotted path of the decoder block list, its count key, whether it is under get_decoder());
    block lists of the right length that mix block classes are added to ``mixed``."""
    from torch import nn

    ints = {k: v for k, v in values.items() if _is_int(v) and v > 0}
    paths = {id(m): n for n, m in model.named_modules()}
    decoder_path = None
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder_path = paths.get(id(get_decoder()))
        except (AttributeError, NotImplementedError, TypeError):
            decoder_path = None
    candidates = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, nn.ModuleList):
            continue
        keys = [k for k, v in ints.items() if v == len(module)]
        if len({type(m) for m in module}) != 1:
            if keys:
                mixed.append(f"{name} ({len(module)} = {keys[0]}) mixes {', '.join(sorted({type(m).__name__ for m in module}))}")
        elif keys:
            under = decoder_path is not None and (decoder_path == "" or name.startswith(decoder_path + "."))
            candidates.append((under, len(module), name.endswith("layers"), name, keys))
    if not candidates:
        return None
    under, _, _, name, keys = max(candidates)
    count_key = "num_hidden_layers" if "num_hidden_layers" in keys else min(keys, key=lambda k: (not _blockish(k), k))
    return name, count_key, under


def _signature(block: nn.Module) -> tuple[Any, ...]:
    modules = tuple((n, type(m).__name__) for n, m in block.named_modules())
    return modules + tuple((n, tuple(p.shape)) for n, p in block.named_parameters())


def _kinds(blocks: nn.ModuleList) -> list[int]:
    """Block i's kind: blocks of one kind build the same modules with the same shapes."""
    seen: dict[tuple[Any, ...], int] = {}
    return [seen.setdefault(_signature(b), len(seen)) for b in blocks]


def _kind_name(blocks: nn.ModuleList, one: int, other: int) -> str:
    """What block ``one`` builds that block ``other`` does not: "a Qwen2MoeSparseMoeBlock as mlp",
    or "self_attn.q_proj.weight of shape (128, 32)" when only shapes differ."""
    theirs = dict(blocks[other].named_modules())
    for name, module in blocks[one].named_modules():
        if name and (name not in theirs or type(theirs[name]) is not type(module)):
            return f"a {type(module).__name__} as {name}"
    shapes = {name: tuple(p.shape) for name, p in blocks[other].named_parameters()}
    for name, parameter in blocks[one].named_parameters():
        if shapes.get(name) != tuple(parameter.shape):
            return f"{name} of shape {tuple(parameter.shape)}"
    return f"block {one}'s layout"


def _describe_kinds(blocks: nn.ModuleList, kinds: list[int]) -> str:
    if len(set(kinds)) == 1:
        return f"all {len(kinds)} blocks build the same modules"
    groups = {k: [i for i, kind in enumerate(kinds) if kind == k] for k in dict.fromkeys(kinds)}
    first = {k: members[0] for k, members in groups.items()}
    other = {k: next(first[o] for o in groups if o != k) for k in groups}
    return "; ".join(f"blocks {_listed(m)} build {_kind_name(blocks, first[k], other[k])}" for k, m in groups.items())


def _index_attrs(blocks: nn.ModuleList) -> tuple[str, ...]:
    """Int attributes that hold a block's own index on every block (``layer_idx``)."""
    found: set[str] | None = None
    for i, block in enumerate(blocks):
        values: dict[str, set[int]] = {}
        for module in block.modules():
            for attr, value in vars(module).items():
                if not attr.startswith("_") and _is_int(value):
                    values.setdefault(attr, set()).add(value)
        own = {attr for attr, seen in values.items() if seen == {i}}
        found = own if found is None else found & own
    return tuple(sorted(found or ())) if len(blocks) > 1 else ("layer_idx",)


def _disk_tensors(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """{tensor name: shape} from the folder's safetensors headers; None without weights."""
    from .checkpoint import read_checkpoint

    try:
        return {t.name: t.shape for t in read_checkpoint(folder).tensors}
    except CheckpointError:
        return None


def _tensor_prefix(block_path: str, blocks: nn.ModuleList, count: int, disk: dict[str, tuple[int, ...]] | None) -> tuple[str, str]:
    """The on-disk name template of a block and where it was read: the prefix under which the
    checkpoint holds tensors for exactly blocks 0..count-1 and the most of a block's own names."""
    in_memory = f"{block_path}.{{index}}."
    if not disk:
        return in_memory, "the module path: the folder has no safetensors weights to read names from"
    own = {name for name, _ in blocks[0].state_dict().items()}
    heads: dict[str, tuple[set[int], set[str]]] = {}
    for name in disk:
        for match in re.finditer(r"(?:^|\.)(\d+)\.", name):
            head, tail = name[: match.start(1)], name[match.end() :]
            indices, tails = heads.setdefault(head, (set(), set()))
            indices.add(int(match.group(1)))
            tails.add(tail)
    fitting = [
        (len(tails & own), head == block_path + ".", head) for head, (indices, tails) in heads.items() if indices == set(range(count))
    ]
    if not fitting:
        return in_memory, "the module path: no tensor names on disk number exactly the blocks"
    return max(fitting)[2] + "{index}.", "read from the safetensors headers"


def _known_names() -> dict[str, tuple[str, Any, list[str]]]:
    """{name: (Adapter field, item, families)} for every name a written adapter states a rule for."""
    table: dict[str, tuple[str, Any, list[str]]] = {}
    for adapter in ADAPTERS:
        for attr in ("per_layer_lists", "index_fields", "index_lists", "layer_period_fields", "block_dicts", "tail_count_fields"):
            for key in getattr(adapter, attr):
                table.setdefault(key, (attr, key, []))[2].append(adapter.family)
        for attr in ("decoder_index_attrs",):
            for key in getattr(adapter, attr):
                table.setdefault(key, (attr, key, []))[2].append(adapter.family)
        for rule in adapter.step_rules:
            table.setdefault(rule.step, ("step_rules", rule, []))[2].append(adapter.family)
        for tensor in adapter.block_tensors:
            table.setdefault(tensor.name, ("block_tensors", tensor, []))[2].append(adapter.family)
    return table


def _as_written(families: list[str]) -> str:
    """ "the written adapters of qwen2, qwen2_vl, … state": the evidence a known name gives."""
    shown = ", ".join(dict.fromkeys(families[:3])) + (", …" if len(families) > 3 else "")
    return f"the written adapter{'s' if len(families) > 1 else ''} of {shown} state{'' if len(families) > 1 else 's'}"


@dataclass(frozen=True)
class _Seen:
    """What the classification reads besides a field: the block count and its key, the decoder
    config's fields, the names the written adapters state rules for, and the skeleton's blocks
    with their kinds (`_kinds`)."""

    count: int
    count_key: str
    values: dict[str, Any]
    known: dict[str, tuple[str, Any, list[str]]]
    blocks: Any  # nn.ModuleList
    kinds: list[int]

    @property
    def layer_types(self) -> list[Any] | None:
        types = self.values.get("layer_types")
        return types if isinstance(types, list) and len(types) == self.count else None

    def kind_of(self, marked: Sequence[bool]) -> str:
        """What the marked blocks build that the others do not."""
        one, other = marked.index(True), marked.index(False)
        return _kind_name(self.blocks, one, other)

    def step(self, step: Any, exceptions: Any) -> tuple[str, list[bool]]:
        """How the skeleton's block kinds relate to "block i is of the kind iff i is not in
        ``exceptions`` and (i + 1) % ``step`` == 0": "confirms" (two kinds, split exactly so),
        "agrees" (one kind, and the rule marks every block or none), or "contradicts"."""
        excluded = set(exceptions or ()) if isinstance(exceptions, (list, tuple)) else set()
        marked = [_is_int(step) and step >= 1 and i not in excluded and (i + 1) % step == 0 for i in range(self.count)]
        if _split(self.kinds, marked):
            return "confirms", marked
        if len(set(self.kinds)) == 1 and len(set(marked)) == 1:
            return "agrees", marked
        return "contradicts", marked


def _split(kinds: list[int], marked: Sequence[bool]) -> bool:
    """Whether the skeleton's block kinds are exactly the split ``marked`` / not marked (and there
    are two kinds: one kind everywhere is no evidence)."""
    if len(set(kinds)) != 2 or len(set(marked)) != 2:
        return False
    return all((kinds[i] == kinds[j]) == (marked[i] == marked[j]) for i in range(len(kinds)) for j in range(len(kinds)))


def _config_findings(seen: _Seen) -> list[Finding]:
    """Every decoder config field tied to the block count, classified. Lists and dicts first: an
    int period needs the index lists found (its exceptions)."""
    findings: dict[str, Finding] = {}
    for key, value in seen.values.items():
        if key == seen.count_key or key in NOT_PER_BLOCK or value is None or isinstance(value, bool):
            continue
        if isinstance(value, (list, tuple, dict)):
            found = _known_finding(key, value, seen) or _collection_finding(key, value, seen.count)
            if found is not None:
                findings[key] = found
    index_lists = [k for k, f in findings.items() if f.attr == "index_lists"]
    for key, value in seen.values.items():
        if key == seen.count_key or not _is_int(value):
            continue
        found = _known_finding(key, value, seen) or _int_finding(key, value, seen, index_lists)
        if found is not None:
            findings[key] = found
    return [findings[k] for k in seen.values if k in findings]  # in the config's order


def _known_finding(key: str, value: Any, seen: _Seen) -> Finding | None:
    """A field a written adapter states a rule for: that rule, when the value has the rule's shape
    (Gemma 3n's `intermediate_size` is per block as a list, an int elsewhere); else None, and the
    field is classified as any other."""
    if key not in seen.known:
        return None
    attr, item, families = seen.known[key]
    why = f"{_as_written(families)} this rule for it"
    if attr == "per_layer_lists":
        if not (isinstance(value, (list, tuple)) and len(value) == seen.count):
            return None
    elif attr == "index_lists":
        if not (isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)):
            return None
    elif attr == "block_dicts":
        if not isinstance(value, dict):
            return None
    elif not _is_int(value):
        return None
    elif attr == "step_rules":
        if item.exceptions not in seen.values:
            return Finding(
                key, value, "", "", f"{_as_written(families)} a step with exceptions in {item.exceptions}, which this config lacks"
            )
        verdict, marked = seen.step(value, seen.values[item.exceptions])
        if verdict == "confirms":
            why += f"; the skeleton confirms: blocks {_listed([i for i, m in enumerate(marked) if m])} build {seen.kind_of(marked)}"
        elif verdict == "contradicts":
            return Finding(key, value, "", "", f"{_as_written(families)} a step rule, but the skeleton's block kinds do not follow it")
    elif attr == "layer_period_fields" and seen.layer_types is not None:
        period = layer_period([str(t) for t in seen.layer_types])
        if period != value:
            why += f" (this config's layer_types has period {period}: it is recomputed from them)"
    return Finding(key, value, attr, HIGH, why, item)


def _collection_finding(key: str, value: Any, count: int) -> Finding | None:
    """A list or dict of the decoder config: per block, naming blocks, keyed by block, or not tied."""
    named = _blockish(key)
    if isinstance(value, dict):
        indices = [_block_key(k) for k in value]
        if value and all(i is not None and 0 <= i < count for i in indices):
            why = f"keyed by block index ({_listed(sorted(indices))} of 0..{count - 1})" + ("" if named else "; its name does not say so")
            return Finding(key, value, "block_dicts", HIGH if named else MEDIUM, why, key)
        return None
    ints = all(_is_int(v) for v in value)
    if len(value) == count and count > 1:
        if ints and sorted(value) == list(range(count)) and named:
            return Finding(key, value, "index_lists", MEDIUM, f"lists every block by number (0..{count - 1}): renumbered", key)
        if ints and named and all(0 <= v < count for v in value) and max(value) > 1:
            why = (
                f"one entry per block whose values may also name blocks (all within 0..{count - 1}): selecting would keep "
                "numbers of removed blocks, renumbering would lose the per-block order"
            )
            return Finding(key, value, "", "", why)
        if all(v is None or isinstance(v, (str, int, float)) for v in value):
            strings = all(isinstance(v, str) for v in value)
            why = f"{count} entries for {count} blocks" + (
                "" if named else ", of kinds" if strings else ", its name does not say per block"
            )
            return Finding(key, value, "per_layer_lists", HIGH if named or strings else MEDIUM, why, key)
        if named:
            return Finding(key, value, "per_layer_lists", MEDIUM, f"{count} structured entries for {count} blocks, named per block", key)
        why = (
            f"{count} structured entries for {count} blocks, and its name does not say per block: per-block settings "
            f"(select per block) or a list that has {count} entries by chance — cannot tell"
        )
        return Finding(key, value, "", "", why)
    if ints and named:
        if all(0 <= v < count for v in value) and len(set(value)) == len(value):
            return Finding(key, value, "index_lists", MEDIUM, "lists blocks by number" if value else "an empty list of blocks", key)
        return Finding(key, value, "", "", f"names blocks by numbers outside 0..{count - 1} (counted from the end? from the embeddings?)")
    return None


def _block_key(key: Any) -> int | None:
    if _is_int(key):
        return key
    return int(key) if isinstance(key, str) and key.isdigit() else None


def _int_finding(key: str, value: int, seen: _Seen, index_lists: list[str]) -> Finding | None:
    """An int of the decoder config: a period, a count from the start or the end, or not tied."""
    named, count = _blockish(key) and not _sized(key), seen.count
    if _PERIOD.search(key) or (named and re.search(r"step|interval|pattern|period|every|freq", key)):
        return _period_finding(key, value, seen, index_lists)
    if not named or not 0 <= value <= count:
        return None  # not about blocks, or beyond them: every reading leaves it as it is
    if value == 0:
        return Finding(key, value, "", HIGH, "0: stays 0 whether it counts blocks from the start or from the end")
    if value == count:
        why = (
            "equals the block count: becomes the kept count (as an index field of every block, a tail count of every block "
            "or a copy of the count would)"
        )
        return Finding(key, value, "index_fields", MEDIUM, why, key)
    start = [i < value for i in range(count)]
    end = [i >= count - value for i in range(count)]
    types = seen.layer_types
    if types is not None and _types_split(types, start):
        return Finding(key, value, "index_fields", HIGH, f"layer_types changes kind at block {value}: the first {value} blocks differ", key)
    if types is not None and _types_split(types, end):
        why = f"layer_types changes kind at block {count - value}: the last {value} blocks differ"
        return Finding(key, value, "tail_count_fields", HIGH, why, key)
    if _split(seen.kinds, start):
        return Finding(key, value, "index_fields", HIGH, f"the first {value} blocks build {seen.kind_of(start)} (the skeleton)", key)
    if _split(seen.kinds, end):
        return Finding(key, value, "tail_count_fields", HIGH, f"the last {value} blocks build {seen.kind_of(end)} (the skeleton)", key)
    if _FROM_START.search(key):
        return Finding(key, value, "index_fields", MEDIUM, "its name says it counts blocks from the start", key)
    if _FROM_END.search(key):
        return Finding(key, value, "tail_count_fields", MEDIUM, "its name says it counts blocks from the end", key)
    why = (
        f"{value} of {count} blocks: could count blocks from the start (an index field, like max_window_layers), from the end "
        "(a tail count, like num_kv_shared_layers), or be unrelated to block positions; neither layer_types nor the skeleton "
        "shows which"
    )
    return Finding(key, value, "", "", why)


def _types_split(layer_types: list[Any], marked: list[bool]) -> bool:
    """Whether the marked blocks' layer types and the others' are two disjoint sets."""
    inside = {str(t) for t, m in zip(layer_types, marked) if m}
    outside = {str(t) for t, m in zip(layer_types, marked) if not m}
    return bool(inside) and bool(outside) and not inside & outside


def _period_finding(key: str, value: int, seen: _Seen, index_lists: list[str]) -> Finding | None:
    """An int period over blocks: the period of layer_types, a step with an exceptions list whose
    kinds the skeleton shows, or unclassified."""
    if value < 1:
        return None
    if seen.layer_types is not None and layer_period([str(t) for t in seen.layer_types]) == value:
        return Finding(key, value, "layer_period_fields", HIGH, f"layer_types is full attention every {value}-th block: its period", key)
    for exceptions in index_lists:
        verdict, marked = seen.step(value, seen.values.get(exceptions))
        if verdict == "contradicts":
            continue
        kind = seen.kind_of(marked) if verdict == "confirms" else "the other kind"
        rule = StepRule(step=key, exceptions=exceptions, kind=kind)
        if verdict == "confirms":
            blocks = _listed([i for i, m in enumerate(marked) if m])
            why = f"the skeleton: blocks {blocks} build {kind}, exactly those with (i + 1) % {value} == 0 not in {exceptions}"
            return Finding(key, value, "step_rules", HIGH, why, rule)
        why = f"every block builds the same, as (i + 1) % {value} == 0 outside {exceptions} says; a step with {exceptions} as exceptions"
        return Finding(key, value, "step_rules", MEDIUM, why, rule)
    marked = [(i + 1) % value == 0 for i in range(seen.count)]
    if _split(seen.kinds, marked):
        why = (
            f"every {value}-th block builds {seen.kind_of(marked)} (the skeleton), and the config has no list of blocks to restate "
            "the kinds with once renumbering breaks the period"
        )
        return Finding(key, value, "", "", why)
    why = (
        f"a period of {value} over blocks: which blocks it marks changes when blocks are removed, and neither layer_types "
        "nor the skeleton shows what it decides"
    )
    return Finding(key, value, "", "", why)


def _tensor_findings(model: nn.Module, block_path: str, count: int, values: dict[str, Any], known: dict[str, Any]) -> list[Finding]:
    """Tensors outside the blocks with one slice per block: a dimension of count × a config width."""
    decoder_path = block_path.rpartition(".")[0]
    widths = {k: v for k, v in values.items() if _is_int(v) and v > 0 and _blockish(k) and _sized(k)}  # hidden_size_per_layer_input
    findings = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(block_path + ".") or not _blockish(name):
            continue
        inside = not decoder_path or name.startswith(decoder_path + ".")
        local = name[len(decoder_path) + 1 :] if decoder_path and inside else name
        shape = tuple(tensor.shape)
        if inside and local in known and known[local][0] == "block_tensors":
            attr, item, families = known[local]
            findings.append(Finding(local, list(shape), attr, HIGH, f"{_as_written(families)} this rule for it", item, "tensor"))
            continue
        for axis, size in enumerate(shape):
            width = next((k for k, v in widths.items() if size == count * v), None)
            if width is None and size != count:
                continue
            if inside and width is not None:
                item = BlockTensor(name=local, axis=axis, width_key=width)
                why = f"axis {axis} has {count} × config.{width} entries: one slice per block"
                findings.append(Finding(local, list(shape), "block_tensors", MEDIUM, why, item, "tensor"))
            else:
                where = "outside the module holding the blocks, where no rule can name it" if not inside else "with no config width"
                why = f"axis {axis} has {size} entries ({count} blocks), {where}"
                findings.append(Finding(name, list(shape), "", "", why, None, "tensor"))
            break
    return findings


def _attribute_findings(decoder: nn.Module, count: int, known: dict[str, Any]) -> list[Finding]:
    """Ints the module holding the blocks computed from the config that index blocks."""
    findings = []
    for attr, value in vars(decoder).items():
        if attr.startswith("_") or not _is_int(value) or not _blockish(attr) or _sized(attr):
            continue
        if attr in known and known[attr][0] == "decoder_index_attrs":
            findings.append(
                Finding(attr, value, "decoder_index_attrs", HIGH, f"{_as_written(known[attr][2])} this rule for it", attr, "attribute")
            )
        elif 0 < value < count:
            why = f"an int the decoder holds ({value} of {count} blocks): may index blocks, computed when the model was built"
            findings.append(Finding(attr, value, "", "", why, None, "attribute"))
    return findings


# -- output -----------------------------------------------------------------------------------------


def adapter_source(adapter: Adapter) -> str:
    """``adapter`` as the Python literal a written adapter would be (fields left at their
    default omitted)."""
    lines = ["Adapter("]
    for spec in fields(adapter):
        value = getattr(adapter, spec.name)
        if value != _default(spec):
            lines.append(f"    {spec.name}={_py(value)},")
    return "\n".join([*lines, ")"])


def _default(spec: Any) -> Any:
    if spec.default is not MISSING:
        return spec.default
    return spec.default_factory() if spec.default_factory is not MISSING else MISSING


def _py(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        inner = ", ".join(_py(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if is_dataclass(value) and not isinstance(value, type):
        shown = [f"{s.name}={_py(getattr(value, s.name))}" for s in fields(value) if getattr(value, s.name) != _default(s)]
        return f"{type(value).__name__}({', '.join(shown)})"
    return repr(value)


def _short(value: Any, limit: int = 48) -> str:
    if isinstance(value, list) and len(value) > 1 and all(v == value[0] for v in value) and not isinstance(value[0], (list, dict)):
        return f"[{len(value)} × {value[0]!r}]"
    text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listed(indices: Sequence[int]) -> str:
    return ", ".join(map(str, indices))


# -- prune --probe-adapter ------------------------------------------------------------------------------


@contextmanager
def probed_adapter(source: ModelSource, *, verify: str | None, dry_run: bool = False) -> Iterator[str | None]:
    """`compressor prune --probe-adapter`: inside this block a model of a family without a written
    adapter is pruned with the adapter `probe_model` proposes; yields the verification mode to use.

    Opt-in, never a silent fallback: a proposal is evidence read from one config and skeleton, not
    a tested rule set. So it is used only when every block-tied field is classified (otherwise the
    unclassified fields are listed and nothing is written: exit 2), and the written checkpoint must
    pass the export-time proof (``--verify skip-equivalence``, the default; ``reload`` and ``none``
    are refused). A failed proof names the first diverging block and says to write an adapter.
    A family with a written adapter is pruned with that one, whatever the flag says.
    """
    from .loading import load_config

    config = load_config(source.path, trust_remote_code=source.trust_remote_code)
    try:
        written = adapter_for_config(config)
    except UnsupportedArchitectureError:
        written = None
    if written is not None:
        log.info("%s is a %s model, which has a written adapter: --probe-adapter changes nothing", source.public_name, written.family)
        yield verify
        return
    if verify not in (None, "skip-equivalence"):
        raise InputError(
            f"--probe-adapter needs the export-time proof, and --verify {verify} skips it: a probed adapter's rules are "
            "read from the config and the skeleton, and only the proof (the pruned checkpoint against the original with "
            "the same blocks skipped) checks them.",
            fix="drop --verify (the proof is the default), or write an adapter for this family (a replace plan, which "
            "cannot have the proof, needs one too).",
        )
    probe = probe_config(config, disk=_disk_tensors(source.path), trust_remote_code=source.trust_remote_code, name=source.ref)
    if not probe.usable:
        raise probe.refusal()
    adapter = probe.in_force()
    log.warning(
        "%s (%s) has no written adapter: pruning with the adapter `compressor arch probe` proposes (%s). The checkpoint is "
        "written only if the export-time proof passes (pruned == original with the blocks skipped); the proof runs on a few "
        "samples, so validate the result before shipping it.",
        source.public_name,
        probe.architecture,
        "; ".join(f"{r.field}: {r.kind}" for r in adapter.rules()),
    )
    with probed_adapters(adapter):
        try:
            yield verify if dry_run else "skip-equivalence"
        except VerificationError as error:
            raise VerificationError(
                error.message,
                fix=f"nothing was written. The adapter `compressor arch probe {probe.model}` proposes misses a rule of this "
                "family (a field it classified wrongly, or one outside the decoder config): write an adapter for it in "
                "compressor/architectures.py, starting from that proposal.",
            ) from None
