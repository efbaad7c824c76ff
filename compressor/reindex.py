"""Re-indexing a decoder config for the blocks a plan keeps: one set of rules for both paths.

Owns `reindex_config` — the block count at its key, per-layer lists *selected* by kept index,
index fields remapped, layer-period fields recomputed; `architectures.Adapter` says which keys
— and `layer_period`. The rules only get and set attributes, so they apply unchanged to a
transformers config in memory (`surgery.apply_plan`) and to config.json read as plain JSON
and wrapped in `JsonConfig` (`checkpoint.rewrite_checkpoint`, which must not import
transformers: it never builds a model). `read_config_json` says when the JSON alone is
enough; `write_config_json` writes the edited object back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SurgeryError

if TYPE_CHECKING:
    from .architectures import Adapter


def reindex_config(text_config: Any, adapter: Adapter, kept: Sequence[int]) -> None:
    """Rewrite one decoder config in place for a model that keeps blocks ``kept``."""
    old_count = int(getattr(text_config, adapter.count_key))
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
    layer_types = getattr(text_config, "layer_types", None)
    for key in adapter.layer_period_fields:
        if getattr(text_config, key, None) is not None and layer_types is not None:
            setattr(text_config, key, layer_period(layer_types))
    setattr(text_config, adapter.count_key, len(kept))


def layer_period(layer_types: Sequence[str]) -> int | None:
    """The smallest p with block i full attention iff (i + 1) % p == 0; None if there is none.

    With no full-attention block at all, any p beyond the last block fits: n + 1 is returned.
    """
    n = len(layer_types)
    for period in range(1, n + 2):
        expected = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
        if list(layer_types) == expected:
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
    if adapter.layer_period_fields and not any(key in stated for key in adapter.layer_period_fields):
        return None
    return raw


def write_config_json(path: Path, config: dict[str, Any]) -> None:
    """Write an edited config.json: the source's key order, an indent of 2, a final newline."""
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
