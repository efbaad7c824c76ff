"""Surgery: apply a `SurgeryPlan` to a model in memory, and check every invariant after.

The exact procedure (FACTS.md): delete the blocks from the block list; renumber each kept
block's index attributes 0..n-1 (the KV cache is indexed by them — without this, cached
generation breaks); set the block count at its dotted config key; *select* per-layer config
lists by kept index (truncating silently changes which blocks slide); remap index-valued
fields such as `max_window_layers` to the number of kept blocks below the old value. Every
config object holding the decoder's block count is updated, since some families keep copies.

`skip_blocks` is the reference surgery is checked against: the original model, with the
same blocks replaced at run time by the identity.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from .architectures import Adapter
from .errors import PlanError, SurgeryError
from .planner import SurgeryPlan


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
    setattr(text_config, adapter.count_key, len(kept))


def _decoder_configs(model: nn.Module, adapter: Adapter) -> list[Any]:
    """The decoder config and every copy of it held by a submodule (e.g. Gemma3's rotary)."""
    main = adapter.text_config(model.config)
    found = {id(main): main}
    for module in model.modules():
        config = getattr(module, "config", None)
        if (
            isinstance(config, PretrainedConfig)
            and type(config) is type(main)
            and getattr(config, adapter.count_key, None) == getattr(main, adapter.count_key)
        ):
            found.setdefault(id(config), config)
    return list(found.values())


def _renumber(block: nn.Module, index: int, attrs: Sequence[str]) -> None:
    for module in block.modules():
        for attr in attrs:
            if hasattr(module, attr):
                setattr(module, attr, index)


def apply_plan(model: nn.Module, plan: SurgeryPlan, adapter: Adapter) -> nn.Module:
    """Remove ``plan.removed`` blocks from ``model`` in place, keeping every invariant."""
    blocks = adapter.blocks(model)
    if len(blocks) != plan.num_blocks:
        raise PlanError(
            f"The plan is for a model with {plan.num_blocks} blocks; this model has {len(blocks)}.",
            fix="make the plan from this model's calibration (or an explicit recipe).",
        )
    kept = plan.kept
    if not kept:
        raise PlanError("The plan removes every block.", fix="keep at least one block.")
    configs = _decoder_configs(model, adapter)
    new_blocks = nn.ModuleList([blocks[i] for i in kept])
    for new_index, block in enumerate(new_blocks):
        _renumber(block, new_index, adapter.renumber_attrs)
    adapter.set_blocks(model, new_blocks)
    for config in configs:
        reindex_config(config, adapter, kept)
    check_invariants(model, adapter)
    return model


def check_invariants(model: nn.Module, adapter: Adapter) -> None:
    """Block list, config count, per-layer lists and index attributes all agree."""
    blocks = adapter.blocks(model)
    count = len(blocks)
    problems: list[str] = []
    for config in _decoder_configs(model, adapter) or [adapter.text_config(model.config)]:
        declared = getattr(config, adapter.count_key)
        if declared != count:
            problems.append(f"{adapter.count_path} = {declared} but the model has {count} blocks")
        for key in adapter.per_layer_lists:
            values = getattr(config, key, None)
            if values is not None and len(values) != count:
                problems.append(f"config {key} has {len(values)} entries for {count} blocks")
    for index, block in enumerate(blocks):
        for module_name, module in block.named_modules():
            for attr in adapter.renumber_attrs:
                value = getattr(module, attr, index)
                if value != index:
                    where = f"{module_name}.{attr}" if module_name else attr
                    problems.append(f"block {index}: {where} = {value}, expected {index}")
    if problems:
        raise SurgeryError(
            "The pruned model breaks surgery invariants:\n" + "\n".join(f"  - {p}" for p in problems),
            fix="this is a bug in the family's adapter; nothing was written.",
        )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _Identity(nn.Module):
    """Stands in for a skipped block: returns its hidden-state input unchanged.

    Other attributes are read from the replaced block, since decoder loops consult them
    (Qwen2 picks each block's attention mask by ``block.attention_type``).
    """

    def __init__(self, block: nn.Module, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple
        object.__setattr__(self, "_block", block)  # not a submodule: no parameters here

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if self.returns_tuple else hidden


@contextmanager
def skip_blocks(model: nn.Module, adapter: Adapter, indices: Sequence[int], *, returns_tuple: bool = False) -> Iterator[None]:
    """Run ``model`` with blocks ``indices`` replaced by the identity; restored on exit.

    Meant for cache-free forward passes (the reference for surgery, ablation scans): the
    skipped blocks' cache slots stay empty, so use it with ``use_cache=False``.
    """
    blocks = adapter.blocks(model)
    originals = {i: blocks[i] for i in indices}
    try:
        for i in indices:
            blocks[i] = _Identity(blocks[i], returns_tuple)
        yield
    finally:
        for i, block in originals.items():
            blocks[i] = block
