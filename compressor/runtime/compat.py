"""Where transformers 4.57 and 5.x differ for run-time token participation, in one place.

- The KV cache's name: 5.24 passes it as ``cache`` (to ``generate``, the model and each decoder
  block) and returns it as ``GenerateDecoderOnlyOutput.cache``; 4.57 and 5.17 call it
  ``past_key_values`` everywhere (`CACHE_KWARG`, `generated_cache`, `block_cache`).
- A cache layer's mask size: 5.x asks ``get_mask_sizes(query_length)``, 4.57
  ``get_mask_sizes(cache_position)`` (a tensor of the query's positions); `query_length` reads either.
- A prefix-LM (PaliGemma) forward without cache: 4.57 reads ``token_type_ids`` only when training
  (with ``labels``) and otherwise attends both ways over *everything* it is given, so a pass over
  prompt and answer would let the prompt read the answer; its cached ``generate`` attends both
  ways over the prompt and causally after it. `prefix_lm_reference` gives 4.57 that mask itself,
  as a 4D additive mask (which 4.57's PaliGemma and Gemma take as it is). 5.x needs nothing.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
import transformers
from transformers.generation.utils import GenerateDecoderOnlyOutput

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

# The keyword of the KV cache in `generate`, the model's forward and its decoder blocks: renamed
# from ``past_key_values`` to ``cache`` within 5.x (5.17 still has the old name, 5.24 the new), so
# read from the installed release rather than its version number.
CACHE_KWARG = "cache" if "cache" in {f.name for f in fields(GenerateDecoderOnlyOutput)} else "past_key_values"


def generated_cache(output: Any) -> Any:
    """The KV cache ``generate(..., return_dict_in_generate=True)`` returned."""
    return getattr(output, CACHE_KWARG, None)


def block_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache a decoder block was called with (None: no cache)."""
    return kwargs.get(CACHE_KWARG)


def query_length(query: int | torch.Tensor) -> int:
    """``get_mask_sizes``' argument as a length: 5.x passes the query's length, 4.57 its cache positions."""
    return int(query.shape[0]) if torch.is_tensor(query) else int(query)


def prefix_lm_reference(model: Any, inputs: dict[str, torch.Tensor], prompt_length: int) -> dict[str, torch.Tensor]:
    """``inputs`` (one row: the prompt then generated tokens) for a cache-free forward of a prefix-LM
    that attends as its cached ``generate`` does: both ways within the first ``prompt_length``
    positions, causally after them, never to padding. Unchanged on 5.x."""
    if TRANSFORMERS_5:
        return inputs
    ids = inputs["input_ids"]
    length = ids.shape[1]
    rows = torch.arange(length, device=ids.device)
    allowed = (rows[None, :] <= rows[:, None]) | (rows[None, :] < prompt_length)
    padding = inputs.get("attention_mask")
    if padding is not None:
        allowed = allowed & padding[0].bool()[None, :]
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(length, length, dtype=dtype, device=ids.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return {**inputs, "attention_mask": mask[None, None]}
