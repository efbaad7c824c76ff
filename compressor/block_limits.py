"""Blocks a family's config forbids removing, and why: rules stated as data on the `Adapter`.

`Adapter.fixed_blocks` merges what this module finds into the blocks it fixes, so every user
of that answer — the planner (skips them, refuses a recipe listing one), `SurgeryPlan.check_fixed`
in memory and out of core, calibration's ablation scans — applies these rules too; `check_kept`
(called by `reindex.check_reindex`, before anything changes) judges a whole removal.

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
  type last: `check_kept` refuses exactly those removals (every block of the trailing run of
  that type goes). When the run is the last block alone (Gemma 4: the block before it slides),
  removing it breaks the rule unless a whole stretch of sliding blocks goes with it, so it is
  fixed, which the planner honours; a longer run is left to `check_kept`, so a metric-chosen
  plan that takes all of it is refused at surgery (exit 2) rather than skipped by the planner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import PlanError

if TYPE_CHECKING:
    from .architectures import Adapter


def fixed_blocks(adapter: Adapter, config: Any) -> dict[int, str]:
    """{block index: why it cannot be removed} under the adapter's KV-sharing and last-type rules."""
    if not (adapter.kv_shared_key or adapter.last_layer_type):
        return {}
    text = adapter.text_config(config)
    count = adapter.num_blocks(config)
    types = list(getattr(text, "layer_types", None) or [])
    if len(types) != count:
        return {}  # inconsistent configs are refused by surgery with their own message
    fixed = _kv_sources(adapter.kv_shared_key, getattr(text, adapter.kv_shared_key, 0), types) if adapter.kv_shared_key else {}
    kind = adapter.last_layer_type
    if kind and len(types) > 1 and types[-1] == kind and types[-2] != kind:
        fixed.setdefault(
            count - 1,
            f"layer_types: transformers forces the last block to {kind}; removing it would leave block {count - 2} ({types[-2]}) last",
        )
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
