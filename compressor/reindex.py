"""Re-indexing a decoder config for the blocks a plan keeps: one set of rules for both paths.

Owns `reindex_config` — the block count at its key, per-layer lists *selected* by kept index,
index fields remapped, index lists renumbered, layer-period fields recomputed, step rules kept
or restated as a list, tail counts recounted, dicts keyed by block re-keyed (`per_layer_config`);
`architectures.Adapter` says which keys. Also `layer_period`, and `check_reindex`, which
refuses a per-block list no rule names and a plan that leaves no block of a layer type the
family needs. The rules only get and set attributes, so they apply unchanged to a
transformers config in memory (`surgery.apply_plan`) and to config.json read as plain JSON
and wrapped in `JsonConfig` (`checkpoint.rewrite_checkpoint`, which must not import
transformers: it never builds a model). `read_config_json` says when the JSON alone is
enough; `write_config_json` writes the edited object back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .block_limits import check_kept
from .errors import PlanError, SurgeryError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from .architectures import Adapter, StepRule

log = logging.getLogger(__name__)


# Config lists that can have one entry per block by coincidence, never per-block data.
NOT_PER_BLOCK = frozenset(
    {"architectures", "bos_token_id", "eos_token_id", "pad_token_id", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens"}
)


def check_per_block_fields(text_config: Any, adapter: Adapter) -> None:
    """Refuse a decoder config holding a list with one entry per block that no rule of the
    adapter names: surgery would leave it describing the removed blocks (at best the config
    then fails to load; at worst the kept blocks silently take the removed ones' settings)."""
    count = int(getattr(text_config, adapter.count_key))
    named = {*adapter.per_layer_lists, *adapter.index_lists, *NOT_PER_BLOCK}
    fields = text_config._data if isinstance(text_config, JsonConfig) else vars(text_config)
    for key, value in fields.items():
        if key not in named and isinstance(value, (list, tuple)) and len(value) == count > 1:
            where = f"{adapter.text_config_path}.{key}".lstrip(".")
            raise UnsupportedArchitectureError(
                f"This {adapter.family} model keeps per-block data in config.{where} ({count} entries for "
                f"{count} blocks), which no rule of the '{adapter.family}' adapter re-indexes: removing blocks "
                "would leave it describing blocks that are gone.",
                fix=f"it needs an adapter rule: name '{key}' in the '{adapter.family}' Adapter (compressor/architectures.py), "
                "e.g. in per_layer_lists to select it by kept block; report the model if it is a released family.",
            )


def check_reindex(text_config: Any, adapter: Adapter, kept: Sequence[int]) -> None:
    """Refuse, before anything changes, a config the rules cannot re-index (an unnamed per-block
    list) or a plan that leaves no block of the layer type the family needs (`Adapter.required_layer_type`)
    or a block of another type than the one transformers forces last (`block_limits.check_kept`)."""
    check_per_block_fields(text_config, adapter)
    check_kept(adapter, text_config, kept)
    required = adapter.required_layer_type
    layer_types = getattr(text_config, "layer_types", None)
    if required and layer_types is not None and not any(layer_types[i] == required for i in kept):
        blocks = [i for i, kind in enumerate(layer_types) if kind == required]
        where = f"{adapter.text_config_path}.layer_types".lstrip(".")
        raise PlanError(
            f"The plan removes every '{required}' block of this {adapter.family} model (blocks {blocks} in "
            f"config.{where}): {adapter.required_reason}.",
            fix=f"keep at least one of blocks {blocks} (protect it in the recipe, or leave it out of an explicit list).",
        )


def reindex_config(text_config: Any, adapter: Adapter, kept: Sequence[int]) -> None:
    """Rewrite one decoder config in place for a model that keeps blocks ``kept``."""
    check_reindex(text_config, adapter, kept)
    old_count = int(getattr(text_config, adapter.count_key))
    # Step rules judge the kept blocks' kinds by the old numbering, before index lists change.
    kinds = {rule: [block_of_kind(text_config, rule, i) for i in kept] for rule in adapter.step_rules}
    new_index = {old: new for new, old in enumerate(kept)}
    for key in adapter.per_layer_lists:
        values = getattr(text_config, key, None)
        if values is None:
            continue
        if len(values) != old_count:
            raise SurgeryError(
                f"config.{key} has {len(values)} entries for {old_count} blocks before surgery.",
                fix="the source checkpoint's config is inconsistent; fix it first.",
            )
        setattr(text_config, key, [values[i] for i in kept])
    for key in adapter.index_fields:
        value = getattr(text_config, key, None)
        if isinstance(value, int):
            setattr(text_config, key, sum(1 for i in kept if i < value))
    for key in adapter.index_lists:
        values = getattr(text_config, key, None)
        if values is not None:
            setattr(text_config, key, sorted(new_index[i] for i in values if i in new_index))
    for key in adapter.tail_count_fields:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(text_config, key, sum(1 for i in kept if i >= old_count - value))
    for rule, wanted in kinds.items():
        if None not in wanted:
            _restate_step(text_config, rule, wanted)
    layer_types = getattr(text_config, "layer_types", None)
    for key in adapter.layer_period_fields:
        if getattr(text_config, key, None) is not None and layer_types is not None:
            setattr(text_config, key, layer_period(layer_types))
    setattr(text_config, adapter.count_key, len(kept))
    for key in adapter.block_dicts:  # after the count: transformers checks the keys against it
        _rekey(text_config, key, new_index)


def _rekey(config: Any, key: str, new_index: dict[int, int]) -> None:
    """Re-key the dict ``config.<key>`` (block index -> settings) to the kept blocks' new indices.

    In memory transformers 5 shows `per_layer_config` as a per-block view of configs and takes a
    dict when set; its own serialisation (`to_dict`) is the dict as config.json holds it, keys as
    zero-padded strings ("05"), which the JSON path writes back the same way so that both paths
    produce the same file.
    """
    is_json = isinstance(config, JsonConfig)
    entries = config._data.get(key) if is_json else config.to_dict().get(key)
    if not isinstance(entries, dict):
        return
    kept = {new_index[int(k)]: v for k, v in entries.items() if int(k) in new_index}
    kept = dict(sorted(kept.items()))
    if is_json:
        digits = len(str(max(kept))) if kept else 1
        config._data[key] = {str(k).zfill(digits): v for k, v in kept.items()}
    else:
        setattr(config, key, kept)


def block_of_kind(config: Any, rule: StepRule, index: int) -> bool | None:
    """Whether block ``index`` is of ``rule``'s kind under ``config``; None when the config does
    not state the step (then the rule does not apply)."""
    step = getattr(config, rule.step, None)
    if not isinstance(step, int) or step < 1:
        return None
    return index not in (getattr(config, rule.exceptions, None) or ()) and (index + 1) % step == 0


def _restate_step(config: Any, rule: StepRule, wanted: Sequence[bool]) -> None:
    """Keep ``rule``'s step when it (with the renumbered exceptions) still gives each kept block
    the kind it had; else state the kinds as a list: step 1, exceptions = the other blocks."""
    if [block_of_kind(config, rule, i) for i in range(len(wanted))] == list(wanted):
        return
    step = getattr(config, rule.step)
    exceptions = [i for i, of_kind in enumerate(wanted) if not of_kind]
    log.info(
        "config.%s = %d no longer says which kept blocks build %s (renumbering broke the period): "
        "stated as %s = 1, %s = %s",
        rule.step, step, rule.kind, rule.step, rule.exceptions, exceptions,
    )  # fmt: skip
    setattr(config, rule.step, 1)
    setattr(config, rule.exceptions, exceptions)


def layer_period(layer_types: Sequence[str]) -> int | None:
    """The smallest p with block i full attention iff (i + 1) % p == 0 and every other block of
    one other type (sliding in Gemma3, linear attention in Qwen3.5); None if there is none.

    With no full-attention block at all, any p beyond the last block fits: n + 1 is returned.
    """
    n = len(layer_types)
    if len({t for t in layer_types if t != "full_attention"}) > 1:
        return None
    full = [t == "full_attention" for t in layer_types]
    for period in range(1, n + 2):
        if full == [(i + 1) % period == 0 for i in range(n)]:
            return period
    return None


class JsonConfig:
    """Attribute access to a JSON object, read and written in place, nested objects included:
    ``JsonConfig(d).text_config.num_hidden_layers = 3`` sets ``d["text_config"]["num_hidden_layers"]``.
    A missing key is an AttributeError, so ``getattr(config, key, None)`` reads as on a config."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]):
        object.__setattr__(self, "_data", data)

    def __getattr__(self, name: str) -> Any:
        try:
            value = self._data[name]
        except KeyError:
            raise AttributeError(name) from None
        return JsonConfig(value) if isinstance(value, dict) else value

    def __setattr__(self, name: str, value: Any) -> None:
        self._data[name] = value  # an existing key keeps its place in the file


def load_config_json(folder: Path) -> dict[str, Any] | None:
    """``folder/config.json`` as a JSON object, or None when it is not one or names code of its
    own (``auto_map``: then the trust policy and transformers decide, `loading.load_config`)."""
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return raw if isinstance(raw, dict) and "auto_map" not in raw else None


def read_config_json(folder: Path, adapter: Adapter) -> dict[str, Any] | None:
    """``folder/config.json`` as parsed JSON when the re-indexing rules can be applied to it as
    written, else None: then only transformers' config class knows what it means (`loading.load_config`).

    That is the case when the file cannot be read as a JSON object, names code of its own
    (``auto_map``: the trust policy and that code decide), or leaves to the config class's
    defaults anything the rules read — the block count, a per-layer list, an index field, or
    the layer period (its names are aliases of one value: one of them must be stated).
    """
    raw = load_config_json(folder)
    if raw is None:
        return None
    try:
        text = adapter.text_config(JsonConfig(raw))
    except AttributeError:
        return None
    if not isinstance(text, JsonConfig):
        return None
    stated = text._data
    count = stated.get(adapter.count_key)
    if not isinstance(count, int) or isinstance(count, bool):
        return None
    if any(stated.get(key) is None for key in adapter.per_layer_lists):
        return None
    if any(key not in stated for key in adapter.index_fields):
        return None
    if any(key not in stated for key in adapter.index_lists) or any(
        rule.step not in stated or rule.exceptions not in stated for rule in adapter.step_rules
    ):
        return None
    if adapter.layer_period_fields and not any(key in stated for key in adapter.layer_period_fields):
        return None
    if any(key not in stated for key in adapter.tail_count_fields):
        return None
    return raw


def write_config_json(path: Path, config: dict[str, Any]) -> None:
    """Write an edited config.json: the source's key order, an indent of 2, a final newline."""
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
