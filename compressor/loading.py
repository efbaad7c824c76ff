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
from transformers.models.auto.processing_auto import processor_class_from_name
from transformers.utils import is_torchvision_available

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
            return _assemble_processor(path)
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, ImportError) as error:
        raise InputError(
            f"No usable {'processor' if adapter.multimodal else 'tokenizer'} in '{path}' ({error}).",
            fix="save the processor/tokenizer next to the weights (processor.save_pretrained(folder)).",
        ) from None


def _assemble_processor(path: Path) -> Any:
    """The model's processor, assembled part by part with each part's own Auto class.

    ``AutoProcessor`` alone does not do: it passes one ``use_fast`` to every part, and the slow
    tokenizers that ``use_fast=False`` picks for Qwen2-VL and PaliGemma need vocabulary files
    that fast-only checkpoints lack; and it loads a video processor even for image-only use,
    which needs torchvision (transformers#48558). Here image processors are the slow (PIL)
    ones, tokenizers the fast ones, and without torchvision the video processor is a
    placeholder that refuses videos. Anything else falls back to ``AutoProcessor``.
    """
    name = _saved_processor_class(path)
    processor_class = processor_class_from_name(name) if name else None
    loaders = {
        "image_processor": lambda: transformers.AutoImageProcessor.from_pretrained(path, use_fast=False),
        "tokenizer": lambda: transformers.AutoTokenizer.from_pretrained(path),
        "video_processor": lambda: (
            transformers.AutoVideoProcessor.from_pretrained(path) if is_torchvision_available() else video_processor_placeholder()
        ),
    }
    if processor_class is None or any(part not in loaders for part in processor_class.attributes):
        return transformers.AutoProcessor.from_pretrained(path)
    parts = [loaders[part]() for part in processor_class.attributes]
    processor_dict, _ = processor_class.get_processor_dict(path)  # chat template, image_seq_len, ...
    return processor_class.from_args_and_dict(parts, processor_dict)


def _saved_processor_class(path: Path) -> str | None:
    """The processor class name that save_pretrained recorded in the folder, if any."""
    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            name = json.loads((path / file).read_text()).get("processor_class")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if name:
            return name
    return None


class ImageOnlyVideoProcessor(transformers.BaseVideoProcessor):
    """A video processor for image-only use where torchvision is missing; it refuses videos.

    Processors such as Qwen2-VL's require a video processor object, and every real one needs
    torchvision. This one subclasses the class transformers checks against (without
    torchvision, a dummy that must not be initialised), saves nothing, and fails clearly if
    it is ever given a video.
    """

    model_input_names: list[str] = []

    def __init__(self) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise InputError("Video inputs need torchvision, which is not installed.", fix="pip install torchvision.")

    def save_pretrained(self, *args: Any, **kwargs: Any) -> list[str]:
        return []

    def _set_processor_class(self, processor_class: str) -> None:
        pass

    def __repr__(self) -> str:
        return "ImageOnlyVideoProcessor()"


def video_processor_placeholder() -> ImageOnlyVideoProcessor:
    return ImageOnlyVideoProcessor()


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
