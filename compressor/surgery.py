"""Surgery: apply a `SurgeryPlan` to a model in memory, and check every invariant after.

The exact procedure (FACTS.md): delete the blocks from the block list; renumber each kept
block's index attributes 0..n-1 (the KV cache is indexed by them — without this, cached
generation breaks); set the block count at its dotted config key; *select* per-layer config
lists by kept index (truncating silently changes which blocks slide); remap index-valued
fields such as `max_window_layers` to the number of kept blocks below the old value (and the
other rule kinds of `reindex`). Every config object holding the decoder's block count is
updated, since some families keep copies. A config the rules cannot re-index, or a plan that
leaves no block of a layer type the family needs, is refused before the model changes.

`skip_blocks` is the reference surgery is checked against: the original model, with the
same blocks turned into the identity at run time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from . import block_tensors
from .architectures import Adapter
from .errors import PlanError, SurgeryError
from .planner import SurgeryPlan
from .reindex import check_reindex, layer_period, reindex_config  # the config rules, shared with the out-of-core rewrite


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
    plan.check_fixed(adapter.fixed_blocks(model.config))
    configs = _decoder_configs(model, adapter)
    for config in configs:  # before anything changes: a refused model stays as it was
        check_reindex(config, adapter, kept)
    new_blocks = nn.ModuleList([blocks[i] for i in kept])
    for new_index, block in enumerate(new_blocks):
        _renumber(block, new_index, adapter.renumber_attrs)
    adapter.set_blocks(model, new_blocks)
    block_tensors.slice_in_memory(model, adapter, kept, plan.num_blocks)  # per-layer embeddings, decoder index attributes
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
        for key in adapter.index_lists:
            stray = [i for i in getattr(config, key, None) or () if not 0 <= i < count]
            if stray:
                problems.append(f"config {key} names blocks {stray}, beyond the {count} blocks")
        layer_types = getattr(config, "layer_types", None)
        for key in adapter.layer_period_fields:
            value = getattr(config, key, None)
            if value is not None and layer_types is not None and value != layer_period(layer_types):
                problems.append(f"config {key} = {value} does not describe layer_types {list(layer_types)}")
    for index, block in enumerate(blocks):
        for module_name, module in block.named_modules():
            for attr in adapter.renumber_attrs:
                value = getattr(module, attr, index)
                if value != index:
                    where = f"{module_name}.{attr}" if module_name else attr
                    problems.append(f"block {index}: {where} = {value}, expected {index}")
    problems += block_tensors.problems(model, adapter, adapter.text_config(model.config), count)
    if problems:
        raise SurgeryError(
            "The pruned model breaks surgery invariants:\n" + "\n".join(f"  - {p}" for p in problems),
            fix="this is a bug in the family's adapter; nothing was written.",
        )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _pass_input_through(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook: the block's output with its hidden states replaced by its input."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def skip_blocks(model: nn.Module, adapter: Adapter, indices: Sequence[int]) -> Iterator[None]:
    """Run ``model`` with blocks ``indices`` acting as the identity; restored on exit.

    A forward hook hands each skipped block's input on as its output, in the output's own
    structure: blocks return a tensor in some families and a tuple in others (Qwen2-VL and
    Gemma3 on 4.57), and the decoder loop unpacks accordingly. The blocks stay in place, so
    loops that read block attributes (``attention_type``) and caches indexed by block work
    as before, with or without a KV cache. Skipped blocks still compute, and their result is
    dropped: this is the reference surgery is checked against, not a speed-up.
    """
    blocks = adapter.blocks(model)
    handles = [blocks[i].register_forward_hook(_pass_input_through, with_kwargs=True) for i in indices]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
