"""Loading a model, its processor and its adapter from a resolved model folder.

Checkpoint files are checked before transformers sees them (every safetensors header is
read), so a corrupt or truncated file is reported by name instead of as a deep traceback.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open

from .architectures import Adapter, adapter_for_config
from .errors import InputError
from .hub import ModelSource, resolve_model_ref

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    adapter: Adapter
    source: ModelSource


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} asked for, but no CUDA device is available.", fix="use --device cpu.")
    return torch.device(device)


def resolve_dtype(dtype: str | None) -> torch.dtype | str:
    if dtype in (None, "auto"):
        return "auto"
    if dtype not in DTYPES:
        raise InputError(f"Unknown --dtype '{dtype}'.", fix=f"use one of: auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def load_config(path: Path) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (ValueError, OSError, json.JSONDecodeError, KeyError) as error:
        raise InputError(
            f"'{path / 'config.json'}' cannot be read as a model config ({error}).",
            fix="pass a folder written by save_pretrained.",
        ) from None


def check_safetensors(path: Path) -> list[Path]:
    """Open every safetensors file's header; name the first one that is corrupt."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(
            f"Model folder '{path}' has no *.safetensors weights.",
            fix="re-save the model with save_pretrained(..., safe_serialization=True).",
        )
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own error types and OSError
            raise InputError(
                f"Checkpoint file '{file}' is corrupt or truncated ({error}).",
                fix="download or copy the checkpoint again.",
            ) from None
    return files


def load_processor(path: Path, adapter: Adapter) -> Any:
    try:
        if adapter.multimodal:
            return transformers.AutoProcessor.from_pretrained(path, use_fast=False)
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise InputError(
            f"No usable {'processor' if adapter.multimodal else 'tokenizer'} in '{path}' ({error}).",
            fix="save the processor/tokenizer next to the weights (processor.save_pretrained(folder)).",
        ) from None


def load_model(ref: str | ModelSource, *, device: str | None = "cpu", dtype: str | None = "auto") -> LoadedModel:
    """Resolve ``ref``, check its files, and load model + processor in eval mode."""
    source = ref if isinstance(ref, ModelSource) else resolve_model_ref(ref)
    config = load_config(source.path)
    adapter = adapter_for_config(config)
    check_safetensors(source.path)
    architecture = (getattr(config, "architectures", None) or [adapter.architectures[0]])[0]
    model_class = getattr(transformers, architecture)
    torch_device = resolve_device(device)
    try:
        model = model_class.from_pretrained(source.path, dtype=resolve_dtype(dtype))
    except (OSError, ValueError, RuntimeError) as error:
        raise InputError(
            f"Model in '{source.path}' failed to load ({type(error).__name__}: {error}).",
            fix="check that the checkpoint is complete and matches its config.json.",
        ) from None
    model.to(torch_device).eval()
    processor = load_processor(source.path, adapter)
    log.info("loaded %s (%s, %d blocks) from %s", architecture, adapter.family, adapter.num_blocks(model.config), source.path)
    return LoadedModel(model=model, processor=processor, adapter=adapter, source=source)
