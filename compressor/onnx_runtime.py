"""Running exported graphs the way a deployment does, with no torch model involved: provider
choice; greedy generation with the split VLM layout (vision encoder, token embedding, decoder
with past) in NumPy and ONNX Runtime (`SplitRunner`); and greedy generation of a text export
by onnxruntime-genai itself (`genai_generate`: ``og.Model`` reading our ``genai_config.json``).

Provider: CUDA when the installed onnxruntime has the CUDA provider *and* a CUDA device is
present, CPU otherwise; the provider that actually runs is reported (a CUDA provider that
cannot load its libraries falls back to CPU inside ONNX Runtime).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

METADATA = "compressor_onnx.json"
METADATA_FORMAT = "compressor.onnx/1"
GENAI_CONFIG = "genai_config.json"
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


def cuda_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # the runner needs no torch; without it, ask ONNX Runtime alone
        return True


def providers(prefer_cuda: bool = True) -> list[str]:
    import onnxruntime as ort

    chosen = ["CPUExecutionProvider"]
    if prefer_cuda and "CUDAExecutionProvider" in ort.get_available_providers() and cuda_present():
        chosen.insert(0, "CUDAExecutionProvider")
    return chosen


def session(path: Path | str, *, prefer_cuda: bool = True, threads: int | None = None) -> Any:
    """An InferenceSession on the best provider; ``session.get_providers()[0]`` is the one used."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # a CUDA provider that cannot load falls back; we report which ran
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=providers(prefer_cuda))
    except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
        raise InputError(f"ONNX Runtime cannot load '{path}': {error}", fix="re-export it with `compressor export-onnx`.") from error


def empty_past(spec: Any, batch: int) -> np.ndarray:
    """A past key/value tensor with no tokens: static dims from the graph, batch, 0 length."""
    shape, seen_batch = [], False
    for dim in spec.shape:
        if isinstance(dim, int):
            shape.append(dim)
        elif not seen_batch:
            shape.append(batch)
            seen_batch = True
        else:
            shape.append(0)
    return np.zeros(shape, dtype=_NP_TYPES.get(spec.type, np.float32))


def read_metadata(folder: Path | str) -> dict[str, Any]:
    path = Path(folder) / METADATA
    if not path.is_file():
        raise InputError(f"'{folder}' has no {METADATA}: not an ONNX export of compressor.", fix="export it with `compressor export-onnx`.")
    meta = json.loads(path.read_text())
    if meta.get("format") != METADATA_FORMAT:
        raise InputError(f"'{path}' has format {meta.get('format')!r}, expected {METADATA_FORMAT}.", fix="re-export with this version.")
    return meta


# -- positions ------------------------------------------------------------------------------
def text_positions(mask: np.ndarray, offset: int = 0) -> np.ndarray:
    """0-based positions of the non-padding tokens (padding gets 1), as transformers' generate."""
    positions = np.cumsum(mask, axis=-1) - 1
    positions[mask == 0] = 1
    return positions + offset


def padded_rope_delta() -> bool:
    """Whether the installed transformers counts Qwen2-VL's rope delta against the padded
    prompt length (4.x: decoding adds it to the cache position) rather than the sample's own
    token count (5.x: decoding adds it to the padding-mask cumsum). Both give the same decode
    positions; only the delta differs (a left-padded row: ``-padding`` in 4.x, 0 in 5.x).
    Detected by the 5.x ``get_rope_index`` signature, which takes ``mm_token_type_ids``;
    without transformers (a deployment), the 4.x convention the runner uses."""
    try:
        import inspect

        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel
    except ImportError:
        return True
    return "mm_token_type_ids" not in inspect.signature(Qwen2VLModel.get_rope_index).parameters


def mrope_positions(
    ids: np.ndarray, mask: np.ndarray, grids: np.ndarray, *, image_token_id: int, merge: int, padded_delta: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2-VL's 3-D rotary positions (time, height, width) for a prompt with images, and the
    per-sample delta that continues them while decoding (``get_rope_index``, images only).

    Text tokens advance all three axes together; an image's tokens take their (t, h, w)
    coordinates in the merged patch grid, offset by where the image starts. The delta is
    next position minus the padded length (``padded_delta``) or minus the sample's token
    count; ``None``: as the installed transformers (`padded_rope_delta`).
    """
    if padded_delta is None:
        padded_delta = padded_rope_delta()
    batch, length = ids.shape
    positions = np.ones((3, batch, length), dtype=np.int64)
    deltas = np.zeros(batch, dtype=np.int64)
    image = 0
    for b in range(batch):
        tokens = ids[b][mask[b] == 1]
        chunks, start = [], 0
        while True:
            found = np.flatnonzero(tokens[start:] == image_token_id)
            if found.size == 0:
                break
            first = start + int(found[0])
            t, h, w = (int(v) for v in grids[image])
            h, w = h // merge, w // merge
            base = (chunks[-1].max() + 1) if chunks else 0
            chunks.append(np.broadcast_to(np.arange(first - start), (3, first - start)) + base)
            base += first - start
            grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1)
            chunks.append(grid + base)
            start = first + t * h * w
            image += 1
        base = (chunks[-1].max() + 1) if chunks else 0
        chunks.append(np.broadcast_to(np.arange(len(tokens) - start), (3, len(tokens) - start)) + base)
        row = np.concatenate(chunks, axis=1)
        positions[:, b, mask[b] == 1] = row
        deltas[b] = row.max() + 1 - (length if padded_delta else len(tokens))
    return positions, deltas


# -- the split runner -----------------------------------------------------------------------
@dataclass
class Generation:
    tokens: np.ndarray  # (batch, new) generated ids; pad after a sequence's end-of-sequence
    provider: str


class SplitRunner:
    """Greedy generation with ``vision_encoder.onnx`` + ``embed_tokens.onnx`` +
    ``decoder_model_merged.onnx`` and the processor outputs of a prompt (NumPy arrays)."""

    def __init__(self, folder: Path | str, *, prefer_cuda: bool = True, threads: int | None = None):
        self.folder = Path(folder)
        self.meta = read_metadata(self.folder)
        if self.meta["layout"] != "split":
            raise InputError(
                f"'{folder}' holds a {self.meta['layout']} export, not the split VLM layout.", fix="load it with ORTModelForCausalLM."
            )
        graphs = self.meta["graphs"]
        self.vision = session(self.folder / graphs["vision_encoder"], prefer_cuda=prefer_cuda, threads=threads)
        self.embed = session(self.folder / graphs["embed_tokens"], prefer_cuda=prefer_cuda, threads=threads)
        self.decoder = session(self.folder / graphs["decoder"], prefer_cuda=prefer_cuda, threads=threads)
        self.provider = self.decoder.get_providers()[0]
        self.d = self.meta["decoder"]

    # -- prompt ----------------------------------------------------------------------------
    def image_features(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        kind = self.meta["vision"]["kind"]
        pixels = np.asarray(inputs["pixel_values"], dtype=np.float32)
        if kind == "grid":
            grids = np.asarray(inputs["image_grid_thw"], dtype=np.int64)
            traced = self.meta["vision"]["grid"]
            # The graph holds its grid as a constant; it may take no image_grid_thw input (5.x).
            takes_grid = "image_grid_thw" in {i.name for i in self.vision.get_inputs()}
            parts, start = [], 0
            for grid in grids:
                if grid.tolist() != traced:
                    raise InputError(
                        f"An image has patch grid {grid.tolist()}; the vision graph was exported for {traced}.",
                        fix="resize images to the export's size (vision.image_size in compressor_onnx.json), or re-export for this size.",
                    )
                n = int(np.prod(grid))
                feeds = {"pixel_values": pixels[start : start + n]} | ({"image_grid_thw": grid[None]} if takes_grid else {})
                parts.append(self.vision.run(None, feeds)[0])
                start += n
            return np.concatenate(parts)
        if kind == "tiles":
            tiles = pixels.reshape(-1, *pixels.shape[-3:])
            real = np.any(tiles != 0, axis=(1, 2, 3))  # padding tiles are all zeros (as transformers drops them)
            if "pixel_attention_mask" in inputs:
                masks = np.asarray(inputs["pixel_attention_mask"]).reshape(-1, *tiles.shape[-2:])[real]
                if not masks.all():
                    raise InputError(
                        "An image tile is partly padding; the exported vision graph takes whole tiles.",
                        fix="use images the processor splits into whole tiles.",
                    )
            tiles = tiles[real]
            return self.vision.run(None, {"pixel_values": tiles})[0].reshape(-1, self.d["hidden_size"])
        return self.vision.run(None, {"pixel_values": pixels})[0].reshape(-1, self.d["hidden_size"])

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        # An image placeholder may lie outside the embedding table (as transformers, embed it as
        # id 0: its row is replaced by image features). Inside it, it embeds as itself — a
        # model may generate that id.
        safe = np.where(ids >= self.d["vocab_size"], 0, ids).astype(np.int64)
        return self.embed.run(None, {"input_ids": safe})[0]

    def prompt_embeddings(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        ids = np.asarray(inputs["input_ids"], dtype=np.int64)
        embeds = self.embed_ids(ids)
        slots = ids == self.d["image_token_id"]
        if slots.any():
            if "pixel_values" not in inputs:
                raise InputError("The prompt has image tokens but no pixel_values were given.", fix="pass the processor's full output.")
            features = self.image_features(inputs)
            if features.shape[0] != int(slots.sum()):
                raise InputError(
                    f"The prompt holds {int(slots.sum())} image tokens but the images give {features.shape[0]} features.",
                    fix="build inputs with the checkpoint's own processor.",
                )
            embeds[slots] = features.astype(embeds.dtype)
        return embeds

    # -- decoding --------------------------------------------------------------------------
    def generate(
        self, inputs: dict[str, Any], *, max_new_tokens: int, eos_token_id: int | list[int] | None = None, pad_token_id: int = 0
    ) -> Generation:
        inputs = {k: np.asarray(v) for k, v in inputs.items()}
        ids = inputs["input_ids"].astype(np.int64)
        batch = ids.shape[0]
        mask = inputs.get("attention_mask", np.ones_like(ids)).astype(np.int64)
        embeds = self.prompt_embeddings(inputs)
        if self.d["mrope"]:
            positions, deltas = mrope_positions(
                ids,
                mask,
                inputs["image_grid_thw"] if "image_grid_thw" in inputs else np.zeros((0, 3), np.int64),
                image_token_id=self.d["image_token_id"],
                merge=self.meta["vision"]["merge"],
                padded_delta=True,  # decoding below adds it to the padded length
            )
        else:
            positions = text_positions(mask, self.d["position_offset"])
        token_types = (ids == self.d["image_token_id"]).astype(np.int64)
        past_specs = [s for s in self.decoder.get_inputs() if s.name.startswith("past_key_values")]
        feeds: dict[str, np.ndarray] = {s.name: empty_past(s, batch) for s in past_specs}
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        done = np.zeros(batch, dtype=bool)
        out = []
        for _ in range(max_new_tokens):
            feeds.update(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
            if self.d["token_types"]:
                feeds["token_type_ids"] = token_types
            logits, *present = self.decoder.run(None, feeds)
            token = logits[:, -1].argmax(-1).astype(np.int64)
            token = np.where(done, pad_token_id, token)
            out.append(token)
            done |= np.isin(token, list(eos))
            if done.all():
                break
            for spec, value in zip(past_specs, present):
                feeds[spec.name] = value
            embeds = self.embed_ids(token[:, None])
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            if self.d["mrope"]:
                total = mask.shape[1] - 1
                positions = np.broadcast_to((total + deltas)[None, :, None], (3, batch, 1)).copy()
            else:
                positions = positions[:, -1:] + 1
            token_types = np.zeros((batch, 1), np.int64)
        return Generation(tokens=np.stack(out, axis=1), provider=self.provider)


# -- onnxruntime-genai ----------------------------------------------------------------------
def genai_generate(
    folder: Path | str, prompts: list[list[int]], *, max_new_tokens: int, prefer_cuda: bool = True, pad_token_id: int | None = None
) -> Generation:
    """Greedy tokens from ``og.Model(folder)`` for a batch of prompts (token ids, unpadded).

    The batch is padded as onnxruntime-genai reads it: on the right, with the config's pad id
    (it masks the pad ids after each row's last real token and numbers positions from the
    left; a left-padded row would be read as text). The mask and positions are then built by
    onnxruntime-genai itself, as for any client of the folder. Rows that end early are filled
    with the pad id, as ``model.generate`` does.
    """
    import onnxruntime_genai as og

    if pad_token_id is None:
        pad_token_id = json.loads((Path(folder) / GENAI_CONFIG).read_text())["model"]["pad_token_id"]
    config = og.Config(str(folder))
    config.clear_providers()
    provider = "CPUExecutionProvider"
    if "CUDAExecutionProvider" in providers(prefer_cuda):
        config.append_provider("cuda")
        provider = "CUDAExecutionProvider"
    model = og.Model(config)
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_token_id, dtype=np.int32)
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)] = prompt
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=length + max_new_tokens, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    rows = [np.asarray(generator.get_sequence(i))[length:] for i in range(len(prompts))]
    del generator, params, model  # generator before the model it runs on
    width = max(len(r) for r in rows)
    tokens = np.full((len(prompts), width), pad_token_id, dtype=np.int64)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return Generation(tokens=tokens, provider=provider)


def genai_tokenizer_check(folder: Path | str, tokenizer: Any, texts: list[str]) -> str:
    """Whether ``og.Tokenizer`` loads the folder's tokenizer and encodes ``texts`` as
    ``tokenizer`` (transformers) does, in words for the metadata. Not a refusal: onnxruntime-
    genai's tokenizer library reads BPE and SentencePiece tokenizers but not every kind (a
    WordLevel tokenizer fails with "Cannot know how to parse line"); ids from transformers'
    tokenizer then drive the graph as well.

    Run in a child process: on a tokenizer it cannot read, onnxruntime-genai 0.18 sometimes
    crashes the process (a segmentation fault in ``og.Tokenizer``, 2 of 8 runs of the tests)
    instead of raising, and an export must not die of a check that only reports."""
    probe = (
        "import json, sys\nimport onnxruntime_genai as og\n"
        "config = og.Config(sys.argv[1]); config.clear_providers()\n"
        "model = og.Model(config); tokenizer = og.Tokenizer(model)\n"
        "print(json.dumps([[int(t) for t in tokenizer.encode(text)] for text in json.loads(sys.argv[2])]))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(folder), json.dumps(texts)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        why = lines[-1] if done.returncode > 0 and lines else f"the process died with signal {-done.returncode}"
        return f"og.Tokenizer cannot load it ({why}): tokenize with transformers and pass ids"
    for text, got in zip(texts, json.loads(done.stdout.strip().splitlines()[-1])):
        want = list(tokenizer(text)["input_ids"])
        if got != want:
            return f"og.Tokenizer encodes {text!r} as {got}, transformers as {want}: tokenize with transformers"
    return "og.Tokenizer encodes as transformers"
