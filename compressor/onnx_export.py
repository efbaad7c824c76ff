"""ONNX export of a checkpoint folder, verified against PyTorch before it is reported done.

Two layouts, chosen by the family's adapter (`Adapter.onnx`):
- ``text`` (a decoder with past; written as the ``genai`` layout): ``model.onnx`` —
  ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.N.key/value`` in,
  ``logits``, ``present.N.key/value`` out — with ``genai_config.json``, the tokenizer and
  config beside it, so ``onnxruntime_genai.Model(folder)`` loads and generates with it.
- ``split``: vision-language models as ``vision_encoder.onnx``, ``embed_tokens.onnx`` and
  ``decoder_model_merged.onnx`` (`onnx_graphs`), run by `onnx_runtime.SplitRunner`.

Both are traced by us (`onnx_graphs.Decoder`, TorchScript ``torch.onnx.export``) on
transformers 4.57 and 5.x alike. Why our own text graph, measured 2026-12-01 on the pruned
tiny llama / mistral (sliding window 6) / qwen2 (full + sliding blocks) of the tests, 6 -> 4
blocks, transformers 5.24, torch 2.13, onnxruntime-gpu 1.31.1, onnxruntime-genai-cuda 0.18.0
(greedy: 3 prompts of different lengths, 8 tokens, ``og.Model`` vs ``model.generate``):

- optimum-onnx 0.1.0 ``main_export``: does not import on 5.x (needs transformers < 4.58).
- onnxruntime-genai's model builder (fp32, cpu; 3.5 s): its fused GroupQueryAttention refuses
  head_dim 8 on CPU ("multiple of 16"); at head_dim 16 llama's tokens are equal, but mistral's
  sliding window is ignored (it generates llama's tokens, silently) and qwen2 fails in
  onnxruntime-genai (``seqlens_k ... too small``; fed left-padded by hand: logits off by 14).
- transformers.exporters (5.24, prefill + decode graphs; 29-45 s): llama's tokens equal;
  mistral and qwen2 fail in ONNX Runtime (an Identity node expecting a ``TensorSeq``).
- ours, dynamo ``torch.onnx.export`` (20-23 s): 1.4e-6 / 1.9e-6 / 2.4e-6, tokens equal.
- ours, TorchScript ``torch.onnx.export`` (0.5-1.4 s): 1.4e-6 / 1.9e-6 / 1.9e-6, tokens equal.

(numbers: max |onnx - torch| over `onnx_verify`'s left-padded prefill and two decode steps.)
Ours computes every mask in the graph from the 2-D padding mask (sliding windows included,
counted in real tokens so that onnxruntime-genai's right-padded batches see the window
transformers sees) and keeps the whole cache, so the runtime needs no knowledge of the
family's attention pattern; the builder's fused GroupQueryAttention needs it and got both
sliding-window configs wrong. TorchScript rather than dynamo: the same result 15-40x faster
(2 shared cores), and the exporter the split graphs need on 4.57 (FACTS.md).

Loading a text export (onnxruntime-genai; ``config.append_provider("cuda")`` on a GPU)::

    import onnxruntime_genai as og
    model = og.Model(og.Config("OUT"))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=64)
    generator = og.Generator(model, params)
    generator.append_tokens(og.Tokenizer(model).encode("prompt"))  # or ids from transformers
    while not generator.is_done():
        generator.generate_next_token()

A batch is padded on the right with ``pad_token_id`` (onnxruntime-genai's rule). The graph
alone also runs in a plain ``onnxruntime.InferenceSession`` fed as `onnx_verify` feeds it.

Either way the folder is written to a staging sibling; each graph is compared with PyTorch on
fresh inputs (`onnx_verify`) and greedy generation from the folder — by onnxruntime-genai
(text) or `SplitRunner` (VLMs) — is compared token for token with ``model.generate``; only
then does the folder take its name. ``compressor_onnx.json`` records the exporter, the
client that generated, and every check. A family that cannot be exported, or a text export
without onnxruntime-genai installed, is refused before any work. Graphs whose weights pass
2 GB (protobuf's limit) keep them in one external-data file beside the graph.
"""

from __future__ import annotations

import inspect
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .architectures import ADAPTERS, Adapter
from .data import build_batch, tokenizer_of
from .errors import InputError, UnsupportedArchitectureError, VerificationError
from .export import verification_samples
from .hub import ModelSource
from .loading import LoadedModel, load_model
from .onnx_graphs import Decoder, DecoderSpec, TokenEmbedding, VisionEncoder, decoder_io, decoder_spec, export_graph, image_features
from .onnx_runtime import GENAI_CONFIG, METADATA, METADATA_FORMAT, SplitRunner, genai_generate, genai_tokenizer_check, session
from .onnx_verify import DEFAULT_TOLERANCE, DecoderProbe, GraphCheck, raise_on_failure, verify_decoder, verify_outputs
from .provenance import environment
from .staging import refuse_existing, staged_dir

log = logging.getLogger(__name__)

TEXT_GRAPH = "model.onnx"
# The CUDA build: it depends on onnxruntime-gpu (ours); the CPU build pulls the CPU onnxruntime
# into the same folder (FACTS.md). Its CPU provider runs without a GPU.
GENAI_PACKAGE = "onnxruntime-genai-cuda==0.18.0"
EXPORTER = "torch.onnx.export (TorchScript), compressor graphs"
LAYOUTS = {"text": "genai", "split": "split"}  # Adapter.onnx -> the layout written
# rope_type values whose frequencies follow the sequence length at run time (`check_traceable` refuses them).
DYNAMIC_ROPE = frozenset({"dynamic", "longrope"})
SPLIT_GRAPHS = {"vision_encoder": "vision_encoder.onnx", "embed_tokens": "embed_tokens.onnx", "decoder": "decoder_model_merged.onnx"}
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf caps a file at 2 GiB; keep a margin for the graph
GREEDY_TOKENS = 6


@dataclass
class OnnxExportResult:
    path: Path
    layout: str
    graphs: dict[str, str]
    provider: str
    checks: list[GraphCheck]
    greedy_tokens: int
    export_seconds: float
    verify_seconds: float
    external_data: list[str] = field(default_factory=list)
    exporter: str = EXPORTER
    client: str = ""  # what generated the greedy tokens compared with PyTorch

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks), default=0.0)


def check_exportable(adapter: Adapter) -> None:
    ok, why = adapter.onnx_support
    if not ok:
        families = ", ".join(a.family for a in ADAPTERS if a.onnx)
        raise UnsupportedArchitectureError(
            f"Family '{adapter.family}' cannot be exported to ONNX: {why}",
            fix=f"export the Hugging Face checkpoint only; families that export: {families}.",
        )


def check_traceable(model: Any, adapter: Adapter) -> None:
    """Refuse, before any work, a model whose blocks run a Python loop over their experts (a
    mixture-of-experts block with one module per expert, as transformers < 5 writes them): the
    loop visits the experts the batch routes to, so a traced graph holds only the example's
    experts and fails on other tokens (Qwen3-MoE on 4.57: "Split size 1 exceeds the remaining
    size"). transformers 5 keeps the experts as one tensor, which `traceable` gathers by index.
    Also a rotary embedding whose frequencies follow the sequence length (`DYNAMIC_ROPE`: Phi-3.5 and
    Phi-4-mini's LongRoPE): the graph would keep the tracing example's frequencies."""
    from torch import nn

    for name, module in model.named_modules():
        # Rotary embeddings whose frequencies follow the sequence length (`dynamic_rope_update`): 4.57
        # picks LongRoPE's short or long factors, or rescales dynamic NTK, in a Python branch (traced: one
        # branch for every length); 5.x updates a buffer in place, which the exporter cannot write.
        rope = getattr(module, "rope_type", None)
        dynamic = sorted({kind for kind in (rope.values() if isinstance(rope, dict) else [rope]) if kind in DYNAMIC_ROPE})
        if dynamic:
            raise UnsupportedArchitectureError(
                f"'{adapter.family}' cannot be exported to ONNX: {name} is a rotary embedding of type {', '.join(dynamic)}, whose "
                "frequencies change with the sequence length at run time, and a traced graph would keep those of the tracing "
                "example.",
                fix="export the Hugging Face checkpoint only (a model of this family without rope scaling exports).",
            )
        if isinstance(getattr(module, "experts", None), nn.ModuleList):
            raise UnsupportedArchitectureError(
                f"'{adapter.family}' cannot be exported to ONNX with this transformers: {name} loops over its experts in Python, "
                "and a traced graph would keep only the experts of the tracing example.",
                fix="export with transformers >= 5 (its experts are one tensor, gathered by index), or export the Hugging Face "
                "checkpoint only.",
            )


def export_onnx(
    model_ref: str | Path | LoadedModel | ModelSource,
    out: Path | str,
    *,
    overwrite: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    prefer_cuda: bool = True,
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
) -> OnnxExportResult:
    """Export ``model_ref`` (a checkpoint folder, Hub id, or loaded model) to ``out``."""
    out = Path(out)
    refuse_existing(out, overwrite)
    if isinstance(model_ref, LoadedModel):
        loaded = model_ref
    else:
        loaded = load_model(model_ref if isinstance(model_ref, ModelSource) else str(model_ref), device="cpu", dtype="float32")
    check_exportable(loaded.adapter)
    check_traceable(loaded.model, loaded.adapter)
    if loaded.adapter.onnx == "text":
        genai_version()  # before any work: the export is verified by generating with it
    model = loaded.model.float().cpu().eval()
    with staged_dir(out, overwrite=overwrite) as staging:
        started = time.perf_counter()
        if loaded.adapter.onnx == "text":
            graphs, extra = _export_text(model, loaded.processor, loaded.adapter, staging, external_data_bytes)
        else:
            graphs, extra = _export_split(model, loaded.processor, loaded.adapter, staging, external_data_bytes)
        exported = time.perf_counter()
        meta = {
            "format": METADATA_FORMAT,
            "layout": LAYOUTS[loaded.adapter.onnx],
            "exporter": EXPORTER,
            "family": loaded.adapter.family,
            "source": loaded.source.public_name,  # published with the graphs: no local path
            "graphs": graphs,
            **extra,
            "external_data": sorted(p.name for p in staging.iterdir() if p.name.endswith(".onnx_data")),
        }
        (staging / METADATA).write_text(json.dumps(meta, indent=2) + "\n")  # the runner reads it while verifying
        checks, provider, greedy, client = _verify(loaded, staging, graphs, extra, tolerance=tolerance, prefer_cuda=prefer_cuda)
        verified = time.perf_counter()
        meta["verification"] = {
            "tolerance": tolerance,
            "provider": provider,
            "checks": [c.to_dict() for c in checks],
            "greedy_tokens_equal": greedy,
            "greedy_client": client,
        }
        meta.update(export_seconds=round(exported - started, 3), verify_seconds=round(verified - exported, 3), versions=environment())
        (staging / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    log.info(
        # No path: inside `prune --onnx`, `out` is a staging folder renamed before anyone reads this.
        "exported ONNX (%s layout, verified on %s, max |Δ| = %.3g, greedy tokens from %s)",
        LAYOUTS[loaded.adapter.onnx],
        provider,
        max(c.max_abs_diff for c in checks),
        client,
    )
    return OnnxExportResult(
        path=out.resolve(),
        layout=LAYOUTS[loaded.adapter.onnx],
        graphs=graphs,
        provider=provider,
        checks=checks,
        greedy_tokens=greedy,
        export_seconds=exported - started,
        verify_seconds=verified - exported,
        external_data=meta["external_data"],
        client=client,
    )


@contextmanager
def traceable(model: Any) -> Iterator[None]:
    """Implementations that trace to a graph valid for every input, restored afterwards.

    Attention: eager traces to plain MatMul/Softmax (SDPA with grouped KV heads does not
    export). Mixture-of-experts blocks (transformers 5's ``experts_implementation``):
    ``batched_mm`` gathers each token's expert weights by index, where the default loops over
    the experts a batch hits (traced, the loop would be fixed to the example's experts) or
    calls ``histc`` (no ONNX export: "aten::histc ... not supported").
    """
    attention = model.config._attn_implementation
    can_set_experts = getattr(model, "_can_set_experts_implementation", lambda: False)()
    experts = getattr(model.config, "_experts_implementation", None) if can_set_experts else None
    model.set_attn_implementation("eager")
    if can_set_experts:
        model.set_experts_implementation("batched_mm")
    try:
        yield
    finally:
        model.set_attn_implementation(attention)
        if can_set_experts and experts is not None:
            model.set_experts_implementation(experts)


# -- text decoders in onnxruntime-genai's layout ------------------------------------------
def genai_version() -> str:
    """The installed onnxruntime-genai's version; refuses, before any work, when it is missing:
    a text export is verified by generating with it, so without it nothing could be verified."""
    try:
        import onnxruntime_genai as og
    except ImportError as error:
        raise InputError(
            f"Exporting a text decoder to ONNX needs onnxruntime-genai, which does not import here ({error}).",
            fix=f"pip install {GENAI_PACKAGE} (beside onnxruntime-gpu; never the CPU 'onnxruntime-genai' package, "
            "which pulls the CPU onnxruntime into the same folder).",
        ) from error
    return og.__version__


def _export_text(
    model: Any, processor: Any, adapter: Adapter, staging: Path, external_data_bytes: int
) -> tuple[dict[str, str], dict[str, Any]]:
    spec = decoder_spec(model, adapter)
    with traceable(model):
        export_graph(Decoder(model, spec), _decoder_args(model, spec), staging / TEXT_GRAPH, *decoder_io(spec))
    _externalize_if_large(staging / TEXT_GRAPH, external_data_bytes)
    # The folder is self-contained: onnxruntime-genai reads genai_config.json and tokenizer.json
    # beside the graph; transformers users read config.json / generation_config.json.
    _write_beside_graphs(staging, model, processor)
    (staging / GENAI_CONFIG).write_text(json.dumps(genai_config(model, adapter, spec), indent=2) + "\n")
    text = adapter.text_config(model.config)
    meta = {
        "decoder": {
            "num_blocks": spec.num_blocks,
            "hidden_size": int(text.hidden_size),
            "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
            "position_offset": adapter.position_offset,
            "layer_types": list(spec.layer_types),
            "sliding_window": spec.sliding_window,
        },
        "client": {"name": "onnxruntime-genai", "config": GENAI_CONFIG},
    }
    return {"decoder": TEXT_GRAPH}, meta


def genai_config(model: Any, adapter: Adapter, spec: DecoderSpec) -> dict[str, Any]:
    """onnxruntime-genai's ``genai_config.json`` for our text graph.

    The graph takes ``position_ids`` and returns the whole cache (past + new) as ``present``,
    so the KV buffers are not shared between steps; sliding windows are applied inside the
    graph (its masks), so the runtime is told of none and keeps every block's full cache.
    """
    text = adapter.text_config(model.config)
    heads, head_dim = _kv_shape(model, adapter)
    generation = getattr(model, "generation_config", None)

    def token(name: str) -> Any:
        value = getattr(generation, name, None) if generation is not None else None
        return value if value is not None else getattr(text, name, None)

    context = int(getattr(text, "max_position_embeddings", 0) or 2048)
    return {
        "model": {
            # onnxruntime-genai's generic decoder-only type: it knows a fixed list of model types
            # ("Unsupported model_type in config.json: qwen3_moe"), and a family type would only
            # select the same decoder-only runtime for the same plain graph.
            "type": "decoder",
            "bos_token_id": token("bos_token_id"),
            "eos_token_id": token("eos_token_id"),
            "pad_token_id": pad_token_id(generation) if generation is not None else int(getattr(text, "pad_token_id", None) or 0),
            "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": TEXT_GRAPH,
                "head_size": head_dim,
                "hidden_size": int(text.hidden_size),
                "num_attention_heads": int(text.num_attention_heads),
                "num_key_value_heads": heads,
                "num_hidden_layers": spec.num_blocks,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": context,
            "min_length": 0,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


# -- vision-language models as split graphs -------------------------------------------------
def _example_inputs(processor: Any) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as scratch:
        samples = verification_samples(processor, Path(scratch))
        return build_batch(processor, samples[:1], with_answer=False).inputs


def _export_split(
    model: Any, processor: Any, adapter: Adapter, staging: Path, external_data_bytes: int
) -> tuple[dict[str, str], dict[str, Any]]:
    spec = decoder_spec(model, adapter)
    example = _example_inputs(processor)
    with traceable(model):
        vision = _export_vision(model, adapter, example, staging / SPLIT_GRAPHS["vision_encoder"])
        ids = example["input_ids"]
        export_graph(
            TokenEmbedding(model),
            (ids,),
            staging / SPLIT_GRAPHS["embed_tokens"],
            ["input_ids"],
            ["inputs_embeds"],
            {"input_ids": {0: "batch_size", 1: "sequence_length"}, "inputs_embeds": {0: "batch_size", 1: "sequence_length"}},
        )
        export_graph(Decoder(model, spec), _decoder_args(model, spec), staging / SPLIT_GRAPHS["decoder"], *decoder_io(spec))
    for name in SPLIT_GRAPHS.values():
        _externalize_if_large(staging / name, external_data_bytes)
    # The folder is self-contained: the runner needs the processor and config beside the graphs.
    _write_beside_graphs(staging, model, processor)
    text = adapter.text_config(model.config)
    meta = {
        "decoder": {
            "num_blocks": spec.num_blocks,
            "hidden_size": int(text.hidden_size),
            "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
            "image_token_id": spec.image_token_id,
            "position_offset": adapter.position_offset,
            "mrope": spec.mrope,
            "token_types": spec.token_types,
            "attention": spec.attention,
            "layer_types": list(spec.layer_types),
            "sliding_window": spec.sliding_window,
        },
        "vision": vision,
    }
    return dict(SPLIT_GRAPHS), meta


def _export_vision(model: Any, adapter: Adapter, example: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    kind = adapter.onnx_vision
    pixels = example["pixel_values"]
    module = VisionEncoder(model, kind)
    if kind == "grid":
        grid = example["image_grid_thw"][:1]
        pixels = pixels[: int(grid.prod())]
        export_graph(module, (pixels, grid), path, ["pixel_values", "image_grid_thw"], ["image_features"], {})
        merge = int(model.config.vision_config.spatial_merge_size)
        patch = int(model.config.vision_config.patch_size)
        _, h, w = (int(v) for v in grid[0])
        return {"kind": kind, "grid": [int(v) for v in grid[0]], "merge": merge, "image_size": [h * patch, w * patch]}
    if kind == "tiles":
        pixels = pixels.reshape(-1, *pixels.shape[-3:])
        pixels = pixels[pixels.flatten(1).ne(0).any(dim=1)]
    axes = {"pixel_values": {0: "num_images"}, "image_features": {0: "num_images"}}
    export_graph(module, (pixels,), path, ["pixel_values"], ["image_features"], axes)
    return {"kind": kind, "pixel_shape": list(pixels.shape[1:])}


def _kv_shape(model: Any, adapter: Adapter) -> tuple[int, int]:
    text = adapter.text_config(model.config)
    heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return heads, int(head_dim)


def _decoder_args(model: Any, spec: DecoderSpec) -> tuple:
    """Tracing inputs with a non-empty past, so the past length is a real (dynamic) axis."""
    from .architectures import adapter_for_model

    heads, head_dim = _kv_shape(model, adapter_for_model(model))
    batch, seq, past = 2, 4, 3
    vocab, hidden = model.get_input_embeddings().weight.shape
    embeds = torch.randint(0, vocab, (batch, seq)) if spec.text else torch.randn(batch, seq, hidden)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq).expand(batch, seq)
    if spec.mrope:
        positions = positions[None].expand(3, batch, seq)
    args = [embeds, mask, positions.contiguous()]
    if spec.token_types:
        args.append(torch.zeros(batch, seq, dtype=torch.int64))
    args += [torch.randn(batch, heads, past, head_dim) for _ in range(2 * spec.num_blocks)]
    return tuple(args)


def _write_beside_graphs(staging: Path, model: Any, processor: Any) -> None:
    """The processor, config and generation config beside the graphs: the folder is
    self-contained (runners and onnxruntime-genai read the tokenizer and eos / pad ids there)."""
    processor.save_pretrained(staging)
    model.config.save_pretrained(staging)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)


def _externalize_if_large(path: Path, threshold: int) -> None:
    """Move a graph's weights into ``<graph>_data`` when the file would pass ``threshold``."""
    import onnx

    siblings = set(path.parent.iterdir())
    if path.stat().st_size + sum(p.stat().st_size for p in siblings if p.suffix not in (".onnx", ".json")) < threshold:
        return
    graph = onnx.load(str(path))  # reads any external tensors the exporter already wrote
    strays = set(path.parent.iterdir()) - {path}
    onnx.save_model(
        graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}_data", size_threshold=1024
    )
    # The exporter may have written one file per tensor; they are now in the single data file.
    for stray in strays:
        if stray.is_file() and not stray.name.endswith((".onnx", ".onnx_data", ".json")):
            stray.unlink()


# -- verification ---------------------------------------------------------------------------
def _verify(
    loaded: LoadedModel, folder: Path, graphs: dict[str, str], extra: dict[str, Any], *, tolerance: float, prefer_cuda: bool
) -> tuple[list[GraphCheck], str, int, str]:
    model, processor, adapter = loaded.model, loaded.processor, loaded.adapter
    decoder = session(folder / graphs["decoder"], prefer_cuda=prefer_cuda)
    provider = decoder.get_providers()[0]
    window = extra.get("decoder", {}).get("sliding_window") or getattr(adapter.text_config(model.config), "sliding_window", None) or 0
    length = max(8, int(window) + 3)  # longer than any sliding window, so the window is exercised
    hidden = model.get_input_embeddings().weight.shape[1]
    vocab = model.get_input_embeddings().weight.shape[0]
    if adapter.onnx == "text":
        probe = DecoderProbe(
            graph="model.onnx",
            first_input="input_ids",
            make_first=lambda b, s, g: torch.randint(0, vocab, (b, s), generator=g),
            reference=lambda first, mask, pos, types, cache: model(
                input_ids=first, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
            ),
            prefill_length=length,
        )
        checks = verify_decoder(decoder, probe, tolerance=tolerance)
    else:
        d = extra["decoder"]

        # A model that takes token types gets them as its processor marks a prompt: all 0
        # (PaliGemma: 0 = the bidirectional prefix; transformers 5 attends causally without
        # them, 4.x ignores them outside training). Read from the model, not the adapter, so
        # an adapter claiming the wrong attention pattern is caught.
        takes_types = "token_type_ids" in inspect.signature(model.forward).parameters

        def reference(first, mask, pos, types, cache):
            if types is None and takes_types:
                types = torch.zeros_like(mask[:, -first.shape[1] :])
            kwargs = {"token_type_ids": types} if types is not None else {}
            return model(inputs_embeds=first, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, **kwargs)

        probe = DecoderProbe(
            graph=graphs["decoder"],
            first_input="inputs_embeds",
            make_first=lambda b, s, g: torch.randn(b, s, hidden, generator=g),
            reference=reference,
            position_offset=d["position_offset"],
            mrope=d["mrope"],
            token_types=d["token_types"],
            prefill_length=length,
        )
        checks = verify_decoder(decoder, probe, tolerance=tolerance)
        checks += _verify_embed_and_vision(model, adapter, processor, folder, graphs, extra, tolerance, prefer_cuda)
    raise_on_failure(checks)
    greedy, client = _verify_greedy(loaded, folder, prefer_cuda=prefer_cuda)
    return checks, provider, greedy, client


@torch.no_grad()
def _verify_embed_and_vision(model, adapter, processor, folder, graphs, extra, tolerance, prefer_cuda) -> list[GraphCheck]:
    gen = torch.Generator().manual_seed(1)
    vocab = model.get_input_embeddings().weight.shape[0]
    embed = session(folder / graphs["embed_tokens"], prefer_cuda=prefer_cuda)
    ids = torch.randint(0, vocab, (3, 7), generator=gen)
    checks = [
        verify_outputs(
            embed,
            graphs["embed_tokens"],
            "3x7 ids",
            {"input_ids": ids.numpy()},
            model.get_input_embeddings()(ids).numpy(),
            tolerance=tolerance,
        )
    ]
    vision = session(folder / graphs["vision_encoder"], prefer_cuda=prefer_cuda)
    kind = extra["vision"]["kind"]
    inner = model.model
    if kind == "grid":
        grid = torch.tensor([extra["vision"]["grid"]])
        dim = vision.get_inputs()[0].shape[1]
        pixels = torch.randn(int(grid.prod()), dim, generator=gen)
        want = torch.cat(list(image_features(inner.get_image_features(pixels, grid))))
        # The grid is a constant of the traced graph; 5.x's tower reads it as Python values, so
        # the exporter may drop the input.
        names = {i.name for i in vision.get_inputs()}
        feeds = {k: v for k, v in {"pixel_values": pixels.numpy(), "image_grid_thw": grid.numpy()}.items() if k in names}
    else:
        pixels = torch.randn(3, *extra["vision"]["pixel_shape"], generator=gen)  # 3 images: not the traced count
        if kind == "tiles":
            # transformers' own path: tiles of one sample, with its padding-tile and patch-mask logic.
            # 4.x returns the tiles' features (tiles, tokens, hidden); 5.x one flattened
            # (tiles * tokens, hidden) tensor per sample: compare in the graph's shape.
            want = image_features(inner.get_image_features(pixel_values=pixels[None]))
            if isinstance(want, (list, tuple)):
                want = torch.cat(list(want)).reshape(pixels.shape[0], -1, want[0].shape[-1])
        else:
            want = image_features(inner.get_image_features(pixel_values=pixels))
            if isinstance(want, (list, tuple)):
                want = torch.stack(list(want))
        feeds = {"pixel_values": pixels.numpy()}
    checks.append(
        verify_outputs(
            vision, graphs["vision_encoder"], f"random pixels {tuple(pixels.shape)}", feeds, want.float().numpy(), tolerance=tolerance
        )
    )
    return checks


@torch.no_grad()
def _verify_greedy(loaded: LoadedModel, folder: Path, *, prefer_cuda: bool) -> tuple[int, str]:
    """Greedy tokens from the exported folder == ``model.generate``'s; returns how many were
    compared and the client that generated them."""
    model, processor = loaded.model, loaded.processor
    text = loaded.adapter.onnx == "text"
    with tempfile.TemporaryDirectory() as scratch:
        # Text: two prompts of different lengths, so each side pads its own way (transformers on
        # the left, onnxruntime-genai on the right). VLMs: one image prompt (one traced grid).
        samples = verification_samples(processor, Path(scratch))[: 2 if text else 1]
        inputs = build_batch(processor, samples, with_answer=False, padding_side="left").inputs
    config = model.generation_config
    pad = pad_token_id(config)
    want = model.generate(**inputs, do_sample=False, max_new_tokens=GREEDY_TOKENS, pad_token_id=pad)[:, inputs["input_ids"].shape[1] :]
    if text:
        prompts = [row[mask.bool()].tolist() for row, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        got = genai_generate(folder, prompts, max_new_tokens=GREEDY_TOKENS, prefer_cuda=prefer_cuda, pad_token_id=pad).tokens
        tokenizer = genai_tokenizer_check(folder, tokenizer_of(processor), [s.prompt for s in samples])
        client = f"onnxruntime-genai {genai_version()} (og.Model; tokenizer: {tokenizer})"
    else:
        runner = SplitRunner(folder, prefer_cuda=prefer_cuda)
        got = runner.generate(
            {k: v.numpy() for k, v in inputs.items()},
            max_new_tokens=GREEDY_TOKENS,
            eos_token_id=config.eos_token_id,
            pad_token_id=pad,
        ).tokens
        client = "compressor SplitRunner (onnxruntime)"
    if not np.array_equal(got, want.numpy()):
        raise VerificationError(
            f"Greedy generation from the ONNX export by {client} gives {got.tolist()}, PyTorch gives {want.tolist()} "
            "(every graph matched on its own, so the difference is in how the graphs are driven).",
            fix="nothing was written; report it with -v output and the family.",
        )
    return int(want.shape[1]), client


def pad_token_id(generation_config: Any) -> int:
    """The pad id generation fills finished rows with (and onnxruntime-genai pads prompts with):
    the model's own, else its first end-of-sequence id (as ``generate`` does), else 0."""
    pad = getattr(generation_config, "pad_token_id", None)
    if pad is None:
        eos = getattr(generation_config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return int(pad) if pad is not None else 0
