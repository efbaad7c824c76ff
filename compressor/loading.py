"""Loading a model, its processor and its adapter from a resolved model folder.

Checkpoint files are checked before transformers sees them (every safetensors header is
read), so a corrupt or truncated file is reported by name instead of as a deep traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from transformers.models.auto.image_processing_auto import AutoImageProcessor
from transformers.models.auto.processing_auto import processor_class_from_name
from transformers.utils import is_torchvision_available

from .architectures import Adapter, adapter_for_config
from .errors import InputError, UnsupportedArchitectureError
from .hub import ModelSource, resolve_model_ref
from .reindex import JsonConfig, load_config_json
from .versions import check_family_available

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


def resolve_dtype(dtype: str | None, *, device: torch.device | None = None, auto: str = "checkpoint") -> torch.dtype | str:
    """The dtype to load in. ``auto`` is the checkpoint's own dtype when the loaded weights are
    exported (prune: a cast would change what is written), and for measurements
    (``auto="compute"``: calibrate, and prune/run models spread by a device map — only measured)
    bfloat16 on a GPU that has it, float32 on the CPU (fast there, and exact)."""
    if dtype in (None, "auto"):
        if auto == "checkpoint":
            return "auto"
        on_gpu = device is not None and device.type == "cuda"
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if on_gpu else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"Unknown --dtype '{dtype}'.", fix=f"use one of: auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Placement:
    """How to spread a model that does not fit one device (accelerate's ``device_map``)."""

    device_map: str | None = None  # one of DEVICE_MAPS; None: the whole model on `device`
    max_memory: dict[int | str, str] | None = None  # per device: {0: "70GiB", "cpu": "200GiB"}
    offload_folder: Path | None = None  # where weights go that fit neither GPUs nor RAM

    @classmethod
    def parse(cls, device_map: str | None, max_memory: str | None = None, offload_folder: Path | str | None = None) -> Placement:
        if device_map is not None and device_map not in DEVICE_MAPS:
            raise InputError(f"Unknown --device-map '{device_map}'.", fix=f"use one of: {', '.join(DEVICE_MAPS)}.")
        if (max_memory or offload_folder) and device_map is None:
            raise InputError("--max-memory and --offload-folder shape a device map.", fix="add --device-map auto.")
        budget: dict[int | str, str] = {}
        for item in filter(None, (max_memory or "").split(",")):
            key, _, value = item.partition("=")
            key = key.strip()
            if not value.strip() or not (key.isdigit() or key in ("cpu", "mps")):
                raise InputError(
                    f"--max-memory item '{item}' is not DEVICE=SIZE.",
                    fix="write e.g. 0=70GiB,1=70GiB,cpu=200GiB (GPU index or cpu, then a size).",
                )
            budget[int(key) if key.isdigit() else key] = value.strip()
        return cls(device_map, budget or None, Path(offload_folder) if offload_folder else None)

    def for_process(self, gpus: list[int]) -> dict[int | str, Any] | None:
        """The memory budget of a process that may use ``gpus`` only (a data-parallel share, or none for
        --device cpu); None: accelerate's default."""
        if torch.cuda.device_count() == 0 or len(gpus) == torch.cuda.device_count():
            return self.max_memory
        budget: dict[int | str, Any] = {i: 0 for i in range(torch.cuda.device_count())}
        for i in gpus:
            budget[i] = (self.max_memory or {}).get(i, torch.cuda.get_device_properties(i).total_memory)
        budget["cpu"] = (self.max_memory or {}).get("cpu", _available_ram())
        return budget


def _available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available * 0.9)


def load_config(path: Path, *, trust_remote_code: bool = False) -> Any:
    """The folder's config. Code in the folder (``auto_map``) runs only with ``trust_remote_code``:
    transformers would otherwise ask on stdin, and a piped "y" would run it. A family this
    transformers lacks is refused first, with the version to install."""
    _check_family(path)
    try:
        return transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, json.JSONDecodeError, KeyError) as error:
        if not trust_remote_code and _asks_for_code(path):
            raise InputError(
                f"'{path / 'config.json'}' needs the Python code shipped in its folder (auto_map), and compressor "
                "never runs code from a model folder unless asked.",
                fix="use a model of a supported family (see `compressor arch list`), or pass --trust-remote-code "
                "if you have read that code and trust it.",
            ) from None
        raise InputError(
            f"'{path / 'config.json'}' cannot be read as a model config ({error}).",
            fix="pass a folder written by save_pretrained.",
        ) from None


def _check_family(path: Path) -> None:
    """A known family whose code the installed transformers lacks (e.g. Gemma 4 under 4.57):
    refused with the transformers to install, instead of transformers' "not recognized"."""
    raw = load_config_json(path)
    if raw is None:
        return
    try:
        adapter = adapter_for_config(JsonConfig(raw))
    except UnsupportedArchitectureError:
        return  # unknown families are refused after loading, with the supported list
    check_family_available(adapter, path)


def _asks_for_code(path: Path) -> bool:
    try:
        return "auto_map" in json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


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


def load_processor(path: Path, adapter: Adapter, *, trust_remote_code: bool = False) -> Any:
    try:
        if adapter.multimodal:
            return with_pad_token(_assemble_processor(path, trust_remote_code), path)
        return with_pad_token(transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code), path)
    except ImportError as error:
        # A processor class or part that needs a missing package (torchvision, for some families in some
        # transformers releases): saving the processor again would not help, installing would.
        reason = " ".join(f"{error} {error.__cause__ or ''}".split())
        other = ", or a transformers release whose processor for this family runs without it" if "torchvision" in reason.lower() else ""
        raise InputError(
            f"The {'processor' if adapter.multimodal else 'tokenizer'} in '{path}' cannot be loaded with transformers "
            f"{transformers.__version__} ({reason}).",
            fix=f"install the package it names{other}.",
        ) from None
    except (OSError, ValueError, TypeError) as error:
        raise InputError(
            f"No usable {'processor' if adapter.multimodal else 'tokenizer'} in '{path}' ({error}).",
            fix="save the processor/tokenizer next to the weights (processor.save_pretrained(folder)).",
        ) from None


def with_pad_token(processor: Any, path: Path) -> Any:
    """``processor`` with a pad token: many Llama/Mistral tokenizers ship without one, and every
    batch compressor builds is padded. Padded positions are masked out everywhere (attention
    mask, loss and metric masks), so which token fills them does not change any figure; EOS,
    else UNK, is the usual choice. Only the loaded object changes: exports copy the source's
    tokenizer files byte for byte."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if getattr(tokenizer, "pad_token", None) is not None:
        return processor
    fallback = tokenizer.eos_token or tokenizer.unk_token
    if fallback is None:
        raise InputError(
            f"The tokenizer in '{path}' has no pad, EOS or UNK token, so batches cannot be padded.",
            fix="set pad_token in its tokenizer_config.json (any token id: padded positions are masked).",
        )
    tokenizer.pad_token = fallback
    log.info("the tokenizer has no pad token: padding with %r (masked, so no figure depends on it)", fallback)
    return processor


def _assemble_processor(path: Path, trust_remote_code: bool) -> Any:
    """The model's processor, assembled part by part with each part's own Auto class.

    ``AutoProcessor`` alone does not do: it passes one ``use_fast`` to every part, and the slow
    tokenizers that ``use_fast=False`` picks for Qwen2-VL and PaliGemma need vocabulary files
    that fast-only checkpoints lack; and it loads a video processor even for image-only use,
    which needs torchvision (transformers#48558). Here image processors are the PIL ones (the
    same pixels with or without torchvision; `PIL_BACKEND`), tokenizers the fast ones, and
    without torchvision the video processor is a placeholder that refuses videos. Anything
    else falls back to ``AutoProcessor``.
    """
    name = _saved_processor_class(path)
    processor_class = find_processor_class(name) if name else None
    code = {"trust_remote_code": trust_remote_code}
    _export_misfiled_pil_classes()  # before AutoImageProcessor looks a PIL class up by name
    loaders = {
        "image_processor": lambda: AutoImageProcessor.from_pretrained(path, **PIL_BACKEND, **code),
        "tokenizer": lambda: transformers.AutoTokenizer.from_pretrained(path, **code),
        # Audio-capable processors (Gemma 4) have one even when only images are used.
        "feature_extractor": lambda: transformers.AutoFeatureExtractor.from_pretrained(path, **code),
        "video_processor": lambda: (
            transformers.AutoVideoProcessor.from_pretrained(path, **code) if is_torchvision_available() else video_processor_placeholder()
        ),
    }
    attributes = _processor_parts(processor_class) if processor_class is not None else None
    if attributes is None or any(part not in loaders for part in attributes):
        return transformers.AutoProcessor.from_pretrained(path, **code)
    parts = [loaders[part]() for part in attributes]
    processor_dict, _ = processor_class.get_processor_dict(path)  # chat template, image_seq_len, ...
    return processor_class.from_args_and_dict(parts, processor_dict)


# How to ask AutoImageProcessor for the PIL backend: transformers 5.x (5.17, 5.24) takes `backend="pil"`
# and deprecates `use_fast` (a warning on every load); 4.57 knows only `use_fast=False`, and ignores a
# `backend` (it then loads whichever class was saved, a fast one included). 5.x is told apart by its
# image-processing backends module, which 4.57 lacks.
PIL_BACKEND: dict[str, Any] = (
    {"backend": "pil"} if importlib.util.find_spec("transformers.image_processing_backends") else {"use_fast": False}
)


def pil_image_processor_class(name: str) -> type:
    """The PIL-backed image processor class of the family whose default class is ``name`` (e.g.
    "Idefics3ImageProcessor"): ``<name>Pil`` in transformers 5.x, where ``<name>`` is the torchvision one,
    and ``name`` itself in 4.x, where it is the PIL one."""
    _export_misfiled_pil_classes()
    pil = getattr(transformers, f"{name}Pil", None)
    return pil if pil is not None else getattr(transformers, name)


@cache
def _export_misfiled_pil_classes() -> None:
    """Make transformers 5.17 export, without torchvision, the classes that need none but that it files
    as needing it.

    5.17 decides what a module needs from its text: an ``image_processing_*`` file that merely mentions
    ``TorchvisionBackend`` counts as torchvision-only. That files ``image_processing_auto`` (so
    ``transformers.AutoImageProcessor``) and the PIL image processors whose docstrings name the
    torchvision class they mirror (Idefics3, SmolVLM, Idefics2, Ovis2, …) as torchvision-only: without
    torchvision they are placeholders that raise "requires the Torchvision library", though their modules
    import and run without it, and AutoImageProcessor, looking a saved "Idefics3ImageProcessorPil" up on
    the family's package, finds only the placeholder. 5.24 reads subclassing instead, and exports them.
    Here each such name is imported from its own module and set on the lazy package that exports it,
    which is what transformers does itself on the first access to a name it files correctly. Nothing
    changes with torchvision installed, nor in a transformers without the misfiling (4.57, 5.24): there
    no PIL class or AutoImageProcessor is a placeholder.
    """
    if is_torchvision_available():
        return
    missing = getattr(transformers, "_object_missing_backend", {})
    modules = getattr(transformers, "_class_to_module", {})
    for name, backends in list(missing.items()):
        where = modules.get(name)
        if list(backends) != ["torchvision"] or where is None:
            continue
        package, _, leaf = where.rpartition(".")
        if not (leaf.startswith("image_processing_pil_") or leaf == "image_processing_auto"):
            continue
        try:
            real = getattr(importlib.import_module(f"transformers.{where}"), name)
        except (ImportError, AttributeError):
            continue  # truly needs torchvision: its placeholder says so
        # The top-level package and the family's own (`transformers.models.idefics3`, where
        # AutoImageProcessor looks) each keep a lazy export table.
        for lazy in (transformers, sys.modules.get(f"transformers.{package}")):
            if lazy is not None and name in getattr(lazy, "_object_missing_backend", {}):
                setattr(lazy, name, real)


def find_processor_class(name: str) -> type | None:
    """The processor class saved under ``name`` ("Gemma4Processor"), None for a name transformers lacks.

    transformers 5.17's ``processing_gemma4`` (likewise Emu3's and Pixtral's) imports two torch-free
    helpers, the image kwargs type and a size function, from the torchvision image processor's module, so
    without torchvision the processor class cannot even be imported, though nothing it runs needs
    torchvision; 5.24 defines the helpers in the processing module itself. The family's PIL module
    (``image_processing_pil_gemma4``) defines the same helpers, so without torchvision that one import is
    served from it: it stands in under the torchvision module's name only while the processing module is
    imported. A processing module that needs more than the PIL module has still fails, and its error
    names torchvision.

    5.24 files some such modules (Pixtral's) as needing torchvision as a whole: the name then resolves,
    without an error, to a placeholder that raises on use. Served the same way, the module's own class
    is returned instead.
    """
    try:
        found = processor_class_from_name(name)
    except ImportError:
        where = getattr(transformers, "_class_to_module", {}).get(name)
        if is_torchvision_available() or where is None or not _import_with_pil_helpers(where):
            raise
        return processor_class_from_name(name)
    where = getattr(transformers, "_class_to_module", {}).get(name)
    if type(found).__name__ == "DummyObject" and where is not None and not is_torchvision_available():
        if f"transformers.{where}" in sys.modules or _import_with_pil_helpers(where):
            return getattr(sys.modules[f"transformers.{where}"], name, found)
    return found


def _import_with_pil_helpers(where: str) -> bool:
    """Import ``transformers.<where>`` (a ``models.<family>.processing_<family>`` module) with the family's
    PIL image-processing module standing in for the torchvision one (see `find_processor_class`);
    False where the family has no PIL module or the stand-in does not do."""
    package, _, leaf = where.rpartition(".")
    family = leaf.removeprefix("processing_")
    stand_in = f"transformers.{package}.image_processing_{family}"
    if leaf == family or stand_in in sys.modules:
        return False
    try:
        pil_module = importlib.import_module(f"transformers.{package}.image_processing_pil_{family}")
    except ImportError:
        return False
    sys.modules[stand_in] = pil_module
    try:
        importlib.import_module(f"transformers.{where}")
    except ImportError:
        return False
    finally:
        del sys.modules[stand_in]
    return True


def _processor_parts(processor_class: type) -> list[str]:
    """The names of a processor's parts in constructor order: the ``attributes`` class list in
    transformers 4.x, ``get_attributes()`` (read from ``__init__``'s signature) in 5.x."""
    getter = getattr(processor_class, "get_attributes", None)
    return list(getter() if getter is not None else processor_class.attributes)


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


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: its input embeddings' device (the first device under a device
    map; accelerate's hooks move activations on from there). A weight offloaded to CPU or disk
    is a meta tensor: execution then happens on the CPU."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if getter is not None else None
    parameter = next(embeddings.parameters(), None) if embeddings is not None else None
    device = parameter.device if parameter is not None else next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def _summarise(device_map: dict[str, Any]) -> str:
    """{module: device} as 'device: n modules' (the full map of a 72B model is hundreds of lines)."""
    counts: dict[str, int] = {}
    for where in device_map.values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return ", ".join(f"{where}: {n} module(s)" for where, n in counts.items())


def _video_processor_base() -> type:
    """The class a processor checks its ``video_processor`` argument against.

    transformers 4.x checks against ``transformers.BaseVideoProcessor`` (without torchvision, a
    dummy that must not be initialised). 5.x checks against ``VideoProcessorMixin``, which
    ``transformers.video_processing_utils`` defines without torchvision, but which the top-level
    ``transformers`` module exports only with torchvision; the processor's class check then looks
    the name up in ``VIDEO_PROCESSOR_MAPPING``, itself a torchvision placeholder, and fails with
    "type object 'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'" for any argument.
    Exporting the genuine class under the name the check asks for is what transformers does
    itself when torchvision is installed, so nothing else changes.
    """
    from transformers import processing_utils, video_processing_utils

    mixin = getattr(video_processing_utils, "VideoProcessorMixin", None)
    if mixin is None:  # 4.x
        return transformers.BaseVideoProcessor
    # The check looks the name up on a second lazy module object that processing_utils imports
    # for itself (not `transformers` as imported here): export it on both.
    for module in (transformers, getattr(processing_utils, "transformers_module", None)):
        if module is not None and not hasattr(module, "VideoProcessorMixin"):
            module.VideoProcessorMixin = mixin
    return mixin


def _video_processor_bases() -> tuple[type, ...]:
    """`_video_processor_base`, plus PushToHubMixin where that base is not one: transformers 5.x
    before VideoProcessorMixin (5.17) serialises every processor attribute into
    processor_config.json and calls ``to_dict`` only on PushToHubMixin instances."""
    from transformers.utils import PushToHubMixin

    base = _video_processor_base()
    if issubclass(base, PushToHubMixin) or int(transformers.__version__.split(".")[0]) < 5:
        return (base,)
    return (base, PushToHubMixin)


class ImageOnlyVideoProcessor(*_video_processor_bases()):
    """A video processor for image-only use where torchvision is missing; it refuses videos.

    Processors such as Qwen2-VL's require a video processor object, and every real one needs
    torchvision. This one subclasses the class transformers checks against (see
    `_video_processor_base`; never initialised), saves nothing, and fails clearly if it is ever
    given a video.
    """

    model_input_names: list[str] = []
    _auto_class = None  # 5.17's processor.save_pretrained reads it (a registered custom class)

    def __init__(self) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise InputError("Video inputs need torchvision, which is not installed.", fix="pip install torchvision.")

    def save_pretrained(self, *args: Any, **kwargs: Any) -> list[str]:
        return []

    def to_dict(self) -> dict[str, Any]:
        return {}  # nothing to reload: a processor without torchvision gets this placeholder again

    def _set_processor_class(self, processor_class: str) -> None:
        pass

    def __repr__(self) -> str:
        return "ImageOnlyVideoProcessor()"


def video_processor_placeholder() -> ImageOnlyVideoProcessor:
    return ImageOnlyVideoProcessor()


def load_model(
    ref: str | ModelSource,
    *,
    device: str | None = "cpu",
    dtype: str | None = "auto",
    placement: Placement | None = None,
    gpus: list[int] | None = None,
    auto_dtype: str = "checkpoint",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Resolve ``ref``, check its files, and load model + processor in eval mode.

    With a ``placement`` device map, accelerate spreads the blocks over the GPUs (``gpus``: this
    process's share of them), then CPU RAM, then the offload folder; ``device`` is then unused.
    ``auto_dtype`` says what ``dtype="auto"`` means (see `resolve_dtype`). Code shipped with the
    model runs only with ``trust_remote_code`` (or a source resolved with it)."""
    source = ref if isinstance(ref, ModelSource) else resolve_model_ref(ref, trust_remote_code=trust_remote_code)
    config = load_config(source.path, trust_remote_code=source.trust_remote_code)
    adapter = adapter_for_config(config)
    check_safetensors(source.path)
    # The transformers class of the family (a custom name listed first would not be one).
    named = [name for name in getattr(config, "architectures", None) or [] if name in adapter.architectures]
    architecture = (named or [adapter.architectures[0]])[0]
    model_class = getattr(transformers, architecture)
    spread = placement is not None and placement.device_map is not None
    if spread and device not in (None, "auto", "cpu"):
        raise InputError(
            f"--device {device} and --device-map both say where the model goes.",
            fix="drop --device (limit the GPUs with --max-memory 0=70GiB,...), or drop --device-map.",
        )
    if spread and device == "cpu":
        gpus = []  # a device map over CPU RAM (and the offload folder) only
    torch_device = resolve_device("auto" if spread and device != "cpu" else device)
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(dtype, device=torch_device, auto=auto_dtype),
        "trust_remote_code": source.trust_remote_code,
    }
    if spread:
        assert placement is not None
        kwargs["device_map"] = placement.device_map
        budget = placement.for_process(gpus if gpus is not None else list(range(torch.cuda.device_count())))
        if budget:
            kwargs["max_memory"] = budget
        if placement.offload_folder is not None:
            kwargs["offload_folder"] = str(placement.offload_folder)
    try:
        model = model_class.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        raise InputError(
            f"Model in '{source.path}' failed to load ({type(error).__name__}: {error}).",
            fix="check that the checkpoint is complete and matches its config.json"
            + (" (and that --max-memory plus --offload-folder leave room for it)." if spread else "."),
        ) from None
    if spread:
        log.info("device map: %s", _summarise(getattr(model, "hf_device_map", {})))
    else:
        model.to(torch_device)
    model.eval()
    processor = load_processor(source.path, adapter, trust_remote_code=source.trust_remote_code)
    # The name, not the path: an export's own check loads from a staging folder renamed later.
    log.info("loaded %s (%s, %d blocks) from %s", architecture, adapter.family, adapter.num_blocks(model.config), source.public_name)
    return LoadedModel(model=model, processor=processor, adapter=adapter, source=source)
