"""Blocks a family's config forbids removing, and why: rules stated as data on the `Adapter`.

Two kinds of limit. Single blocks (`fixed_blocks`): `Adapter.fixed_blocks` merges them into the
blocks it fixes, so every user of that answer — the planner (skips them, refuses a recipe listing
one), `SurgeryPlan.check_fixed` in memory and out of core, calibration's ablation scans — applies
them. Whole-removal rules, which no single block decides: the planner judges each candidate set
with `BlockLimits.breach` (skips the block that would break a rule, refuses an explicit list that
does); surgery judges the final removal (`check_kept` and `reindex.check_reindex`, before anything
changes), so a saved or hand-written plan is held to the same rules.

- KV sharing (``Adapter.kv_shared_key``, Gemma 4's ``num_kv_shared_layers``): the last N blocks
  compute no keys or values; each reuses those of the last earlier block of its layer type.
  Removing a shared block (with N decremented, `Adapter.tail_count_fields`) or another early
  block is exact; removing a source block hands its readers another block's keys and values
  (measured 0.324 off in logits, FACTS.md), so a source with readers is fixed. This also keeps
  the model in memory valid: each attention module decided when it was built whether it stores,
  reuses or computes keys and values, and under these rules every kept block reads the same
  keys and values as before (only which block stores those of a type nobody reuses can differ
  from a reloaded model, which matters to `return_shared_kv_states` alone).
- Last layer type (``Adapter.last_layer_type``): transformers forces the last block to
  ``full_attention`` when it loads the config, so a removal may not leave a block of another
  type last (a whole-removal rule: every block of the trailing run of that type goes). When the
  run is the last block alone (Gemma 4: the block before it slides), removing it breaks the rule
  unless a whole stretch of sliding blocks goes with it, so it is also fixed outright; a longer
  run can lose all but one of its blocks, which the planner allows and no further.
- Fixed lists (``Adapter.fixed_lists``, Mllama's ``cross_attention_layers``): the blocks a config
  list names are of another kind than the rest (cross-attention blocks, where the image enters
  the decoder) and are fixed; the list is renumbered for the kept blocks (``Adapter.index_lists``).
- First block (``Adapter.fixed_first``): transformers' cache reads the cached length from block 0,
  so where some blocks cache something else (Mllama's cross-attention blocks cache the image),
  block 0 is fixed: removing every block before the first such block would put it first, and
  cached generation then reads the image's length as the text's (measured: a shape error).
- Required layer type (``Adapter.required_layer_type``, Qwen3.5's ``full_attention``): at least
  one block of that type must stay (a whole-removal rule; why is ``Adapter.required_reason``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import InputError, PlanError

if TYPE_CHECKING:
    from .architectures import Adapter


class Breach(NamedTuple):
    """A whole-removal rule a set of removed blocks breaks: the adapter field that states the
    rule, what would go wrong (a clause: "block 3 (sliding_attention) would be last, ..."), and
    which blocks to keep instead."""

    rule: str
    problem: str
    fix: str


@dataclass(frozen=True)
class BlockLimits:
    """All that a family's config forbids a plan to remove, as the planner needs it, with no model
    at hand: the fixed blocks ({index: why}) and the whole-removal rules over ``layer_types``.

    Built from an adapter and a config (`of`), or from what a calibration report recorded
    (`from_report`), so `compressor plan --calibration` applies the rules without the model.
    A rule is empty ("") when it does not apply to this config."""

    fixed: Mapping[int, str] = field(default_factory=dict)
    layer_types: tuple[str, ...] = ()
    types_key: str = "layer_types"  # where layer_types is in the root config, for messages
    required_type: str = ""  # `Adapter.required_layer_type`
    required_reason: str = ""
    last_type: str = ""  # `Adapter.last_layer_type`

    @classmethod
    def of(cls, adapter: Adapter, config: Any) -> BlockLimits:
        """The limits ``adapter``'s rules set on the model ``config`` (root config) describes."""
        types = tuple(getattr(adapter.text_config(config), "layer_types", None) or ())
        if len(types) != adapter.num_blocks(config):
            types = ()  # inconsistent configs are refused by surgery with their own message
        # A rule the unpruned model already breaks cannot guide a choice (surgery says why).
        required = adapter.required_layer_type if adapter.required_layer_type in types else ""
        last = adapter.last_layer_type if types and types[-1] == adapter.last_layer_type else ""
        return cls(
            fixed=adapter.fixed_blocks(config),
            layer_types=types if required or last else (),
            types_key=f"{adapter.text_config_path}.layer_types".lstrip("."),
            required_type=required,
            required_reason=adapter.required_reason if required else "",
            last_type=last,
        )

    def rules(self) -> dict[str, Any]:
        """The whole-removal rules as JSON, for a calibration report's ``model.block_rules``
        ({} when none applies); `from_report` reads them back."""
        if not self.layer_types:
            return {}
        return {
            "layer_types": list(self.layer_types),
            "layer_types_key": self.types_key,
            "required_layer_type": self.required_type,
            "required_reason": self.required_reason,
            "last_layer_type": self.last_type,
        }

    @classmethod
    def from_report(cls, model: Mapping[str, Any], num_blocks: int) -> BlockLimits:
        """The limits a calibration report recorded in its ``model`` section (``fixed_blocks``,
        ``block_rules``); reports written before the rules were recorded have fixed blocks only."""
        found = model.get("fixed_blocks")
        fixed = {int(k): str(v) for k, v in found.items() if str(k).isdigit()} if isinstance(found, dict) else {}
        rules = model.get("block_rules") or {}
        if not rules:
            return cls(fixed=fixed)
        if not _recorded_rules(rules, num_blocks):
            raise InputError(
                "The calibration report's model.block_rules is not what `compressor calibrate` writes: it needs "
                f"layer_types (a list of {num_blocks} strings, one per block) and the strings {', '.join(_RULE_TEXTS)}.",
                fix="calibrate the model again (or pass --model so that the rules are read from its config).",
            )
        return cls(
            fixed=fixed,
            layer_types=tuple(rules["layer_types"]),
            types_key=rules["layer_types_key"],
            required_type=rules["required_layer_type"],
            required_reason=rules["required_reason"],
            last_type=rules["last_layer_type"],
        )

    def breach(self, removed: Collection[int]) -> Breach | None:
        """The first whole-removal rule that removing ``removed`` breaks, or None."""
        if not self.layer_types:
            return None
        types, gone = self.layer_types, set(removed)
        kept = [i for i in range(len(types)) if i not in gone]
        if self.required_type and not any(types[i] == self.required_type for i in kept):
            blocks = [i for i, kind in enumerate(types) if kind == self.required_type]
            return Breach(
                "required_layer_type",
                f"no {self.required_type} block would remain (blocks {_listed(blocks)} in config.{self.types_key}): {self.required_reason}",
                f"keep at least one of blocks {_listed(blocks)}",
            )
        if self.last_type and kept and types[kept[-1]] != self.last_type:
            run = [i for i in range(kept[-1] + 1, len(types)) if types[i] == self.last_type]
            return Breach(
                "last_layer_type",
                f"block {kept[-1]} ({types[kept[-1]]}) would be last, but transformers forces the last block to "
                f"{self.last_type} (config.{self.types_key}), so the pruned model would compute something else",
                f"keep one of the {self.last_type} blocks {_listed(run)}",
            )
        return None

    def check(self, removed: Collection[int], where: str) -> None:
        """Refuse an explicit removal (``where`` names it: "select.blocks") that breaks a rule."""
        found = self.breach(removed)
        if found is not None:
            raise PlanError(
                f"{where} removes blocks {_listed(sorted(removed))}: then {found.problem} (rule {found.rule}).",
                fix=f"{found.fix}: leave it out of {where}.",
            )


def rule_notes(adapter: Adapter) -> list[str]:
    """One sentence per removal limit ``adapter`` states, for `compressor arch list`."""
    decoder = f"{adapter.text_config_path}.".lstrip(".")  # "" for text-only models

    def key(name: str) -> str:
        return f"config.{decoder}{name}"

    notes = []
    if adapter.fixed_leading_key:
        notes.append(f"the first len(config.{adapter.fixed_leading_key}) blocks cannot be removed ({adapter.fixed_reason})")
    for list_key, reason in adapter.fixed_lists:
        notes.append(f"the blocks listed in {key(list_key)} cannot be removed ({reason})")
    if adapter.fixed_first:
        notes.append(f"block 0 cannot be removed ({adapter.fixed_first})")
    if adapter.kv_shared_key:
        notes.append(
            f"KV sharing: the last {key(adapter.kv_shared_key)} blocks reuse the keys and values of the last earlier block "
            "of their layer type; those source blocks cannot be removed"
        )
    if adapter.last_layer_type:
        notes.append(
            f"last layer type: transformers forces the last block to {adapter.last_layer_type}, so a plan must leave a "
            f"{adapter.last_layer_type} block last ({key('layer_types')}); selections skip a block that would break this, "
            "a list of blocks that breaks it is refused"
        )
    if adapter.required_layer_type:
        notes.append(
            f"required layer type: a plan must keep at least one {adapter.required_layer_type} block ({key('layer_types')}): "
            f"{adapter.required_reason}; selections skip a block that would break this, a list that breaks it is refused"
        )
    return notes


_RULE_TEXTS = ("layer_types_key", "required_layer_type", "required_reason", "last_layer_type")


def _recorded_rules(rules: Any, num_blocks: int) -> bool:
    """Whether ``rules`` has the layout `BlockLimits.rules` writes, for a model of ``num_blocks``."""
    if not isinstance(rules, dict):
        return False
    types = rules.get("layer_types")
    return (
        isinstance(types, list)
        and len(types) == num_blocks
        and all(isinstance(t, str) for t in types)
        and all(isinstance(rules.get(key), str) for key in _RULE_TEXTS)
    )


def fixed_blocks(adapter: Adapter, config: Any) -> dict[int, str]:
    """{block index: why it cannot be removed} under the adapter's fixed lists, KV-sharing and last-type rules."""
    listed = _listed_blocks(adapter, config)
    if not (adapter.kv_shared_key or adapter.last_layer_type):
        return listed
    text = adapter.text_config(config)
    count = adapter.num_blocks(config)
    types = list(getattr(text, "layer_types", None) or [])
    if len(types) != count:
        return listed  # inconsistent configs are refused by surgery with their own message
    fixed = _kv_sources(adapter.kv_shared_key, getattr(text, adapter.kv_shared_key, 0), types) if adapter.kv_shared_key else {}
    fixed.update(listed)
    kind = adapter.last_layer_type
    if kind and len(types) > 1 and types[-1] == kind and types[-2] != kind:
        fixed.setdefault(
            count - 1,
            f"layer_types: transformers forces the last block to {kind}; removing it would leave block {count - 2} ({types[-2]}) last",
        )
    return fixed


def _listed_blocks(adapter: Adapter, config: Any) -> dict[int, str]:
    """The blocks named by the adapter's `fixed_lists` (Mllama's cross-attention blocks) and block 0
    when `Adapter.fixed_first` says why, with why."""
    if not (adapter.fixed_lists or adapter.fixed_first):
        return {}
    text = adapter.text_config(config)
    count = adapter.num_blocks(config)
    fixed: dict[int, str] = {0: adapter.fixed_first} if adapter.fixed_first else {}
    for key, reason in adapter.fixed_lists:
        for index in getattr(text, key, None) or ():
            if isinstance(index, int) and 0 <= index < count:
                fixed.setdefault(index, f"{key}: {reason}")
    return fixed


def check_kept(adapter: Adapter, text_config: Any, kept: Sequence[int]) -> None:
    """Refuse a removal that leaves a block of another type than ``Adapter.last_layer_type`` last."""
    kind = adapter.last_layer_type
    types = getattr(text_config, "layer_types", None)
    if not kind or not kept or types is None or len(types) <= kept[-1] or types[kept[-1]] == kind:
        return
    run = [i for i in range(kept[-1] + 1, len(types))]
    raise PlanError(
        f"The plan removes blocks {_listed(run)} and leaves block {kept[-1]} ({types[kept[-1]]}) last, but transformers "
        f"forces the last block to {kind} (config layer_types), so the pruned model would compute something else.",
        fix=f"keep one of the {kind} blocks among {_listed([i for i in run if types[i] == kind])}.",
    )


def _kv_sources(key: str, shared: Any, types: list[str]) -> dict[int, str]:
    count = len(types)
    if not isinstance(shared, int) or not 0 < shared < count:  # none shared, or all fed from outside the model
        return {}
    first = count - shared
    fixed: dict[int, str] = {}
    for kind in sorted(set(types[first:])):
        readers = [i for i in range(first, count) if types[i] == kind]
        sources = [i for i in range(first) if types[i] == kind]
        if sources:
            fixed[sources[-1]] = (
                f"{key} = {shared}: {kind} block(s) {_listed(readers)} reuse this block's keys and values, so without it "
                f"they would read another block's; removing those blocks instead is exact, {key} is lowered to match"
            )
    return fixed


def _listed(indices: list[int]) -> str:
    """``4, 5`` or, for three or more in a row, ``4..7``."""
    if len(indices) > 2 and indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}..{indices[-1]}"
    return ", ".join(map(str, indices))
