"""Out-of-core checkpoint surgery: prune a safetensors checkpoint without loading the model.

Owns: parsing safetensors headers; mapping tensor names through a `SurgeryPlan` (drop the
removed blocks' tensors, renumber the kept blocks' tensors, cut tensors with one slice per
block to the kept slices (`block_tensors`), keep everything else); writing new safetensors
files whose tensor bytes are copied from the source by offset in bounded chunks (strided
slices a chunk of rows at a time, `HashingWriter.copy_columns`); the shard index; and the rest of the output folder (config re-indexed with
`reindex.reindex_config`, tokenizer/processor/generation files copied, plan, recipe,
calibration and model card through `provenance.write_provenance`), staged so nothing is
half-written.

Neither torch nor transformers is imported: config.json is edited as JSON by the same rules
as a config in memory (`reindex.read_config_json` says when that is enough; otherwise
transformers reads and writes it, and its import is paid).

Memory stays at `HASH_DEPTH` copy buffers (``chunk_size`` bytes each) per shard being written
(at most `MAX_PARALLEL_SHARDS` at once) plus the headers, whatever the model size: no tensor
is deserialised, no torch storage is created, and no GPU is needed. Each source byte is read
once: the writer hashes what it writes (`HashingWriter`), so the manifest
(`manifest.write_manifest`) does not read the weight files again.

The safetensors layout (https://huggingface.co/docs/safetensors): an 8-byte little-endian
header length N; N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}``; then the data buffer, which the offsets index (relative to its
start) contiguously, without gaps or overlaps.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .architectures import Adapter
from .block_tensors import SlicedTensor, resizer
from .calibration_report import CalibrationReport
from .errors import CheckpointError, InputError, InsufficientSpaceError, PlanError, SurgeryError
from .hub import ModelSource
from .manifest import FileHash
from .planner import SurgeryPlan
from .provenance import copy_tokenizer_files, strip_remote_code, write_provenance
from .reindex import JsonConfig, check_reindex, read_config_json, reindex_config, write_config_json
from .staging import refuse_existing, staged_dir

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors refuses headers above 100 MB; a bigger length field means a corrupt file.
HEADER_LIMIT = 100_000_000
# Big enough that syscall overhead vanishes (about 1000 reads and writes per GB), small enough
# that the HASH_DEPTH buffers stay in the CPU caches while two threads hand them over: 8 MiB
# chunks measured slow more often (1.3 GB in 0.65 to 2.5 s, against 0.65 to 1.3 s).
DEFAULT_CHUNK_SIZE = 1 << 20

# Element sizes of the safetensors dtypes. Output tensors are ordered by decreasing element
# size (as safetensors itself writes them) so that, with an 8-byte aligned data buffer, every
# tensor starts at a multiple of its element size. Sub-byte dtypes (F4, F6_*) count as 1.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}

# Top-level files that are not carried over: weights in any format (stale copies of the
# unpruned model would be loaded or shipped by mistake) and the source's own lineage files
# (they describe how the *source* was made; the output gets its own).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data", ".npz")
_WEIGHT_INDEX = re.compile(r".+\.(safetensors|bin)\.index(\.\w+)?\.json$")
_LINEAGE_FILES = frozenset({"README.md", "plan.json", "recipe.yaml", "calibration.json", "compressor.json"})
_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")

# Copy buffers in flight between the copying thread and the hashing one: one is hashed while
# the next ones are read and written. Measured (1.3 GB, 0.5 to 4 MiB chunks): 2 buffers leave
# one thread waiting on the other (0.9 to 1.5 s), 3 and 4 reach the hash-bound 0.66 s; 4 also
# held up best with another process busy on the second core.
HASH_DEPTH = 4
# Shards written side by side (`_write_weights`): enough for every core of a large machine,
# few enough that their buffers (HASH_DEPTH x chunk each) and open files stay small.
MAX_PARALLEL_SHARDS = 8

Progress = Callable[[int, int], None]  # (tensor bytes copied so far, tensor bytes in total)


# -- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One header entry. ``begin``/``end`` are byte offsets relative to the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsFile:
    """A parsed safetensors header: where the data starts and each tensor, in data order."""

    path: Path
    data_start: int  # absolute file offset of the data buffer: 8 + header length
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] | None

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def read_header(path: Path) -> SafetensorsFile:
    """Parse and validate ``path``'s header (reads only the header, never tensor data)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            _corrupt(path, f"it has {size} bytes, fewer than the 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > HEADER_LIMIT or 8 + length > size:
            _corrupt(path, f"the header length field says {length} bytes but the file has {size}")
        raw = handle.read(length)
    try:
        header = json.loads(raw)  # trailing alignment spaces are valid JSON whitespace
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        _corrupt(path, f"the header is not JSON ({error})")
    if not isinstance(header, dict):
        _corrupt(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        _corrupt(path, "__metadata__ is not a mapping of strings to strings")
    tensors = sorted((_tensor_info(path, name, entry) for name, entry in header.items()), key=lambda t: (t.begin, t.end))
    _check_contiguous(path, tensors, buffer_size=size - 8 - length)
    return SafetensorsFile(path=path, data_start=8 + length, tensors=tuple(tensors), metadata=metadata)


def _tensor_info(path: Path, name: str, entry: Any) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        valid = (
            isinstance(dtype, str)
            and isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and all(isinstance(o, int) for o in (begin, end))
            and 0 <= begin <= end
        )
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        _corrupt(path, f"tensor '{name}' has a malformed entry {entry!r}")
    info = TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)
    itemsize = DTYPE_BYTES.get(dtype)
    if itemsize is not None and info.numel * itemsize != info.nbytes:
        _corrupt(path, f"tensor '{name}' ({dtype} {list(shape)}) spans {info.nbytes} bytes, expected {info.numel * itemsize}")
    return info


def _check_contiguous(path: Path, tensors: Sequence[TensorInfo], buffer_size: int) -> None:
    expected = 0
    for tensor in tensors:
        if tensor.begin != expected:
            _corrupt(path, f"tensor '{tensor.name}' starts at byte {tensor.begin} of the data, expected {expected} (overlap or gap)")
        expected = tensor.end
    if expected > buffer_size:
        _corrupt(path, f"the header describes {expected} bytes of tensor data but the file holds {buffer_size} (truncated)")


def _corrupt(path: Path, detail: str) -> NoReturn:
    raise CheckpointError(
        f"Checkpoint file '{path}' is not a valid safetensors file: {detail}.",
        fix="copy or download the checkpoint again (a truncated or hand-edited file cannot be pruned).",
    )


@dataclass(frozen=True)
class SourceCheckpoint:
    """The weight files of a model folder, sharded (with an index) or single."""

    folder: Path
    files: tuple[SafetensorsFile, ...]
    index: dict[str, Any] | None  # the parsed index when sharded

    @property
    def tensors(self) -> Iterable[TensorInfo]:
        return (t for f in self.files for t in f.tensors)


def read_checkpoint(folder: Path) -> SourceCheckpoint:
    """The headers of ``folder``'s safetensors weights, following its index when there is one."""
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        index = _read_index(index_path)
        names = sorted(set(index["weight_map"].values()))
        for name in names:
            if not (folder / name).is_file():
                raise CheckpointError(
                    f"'{index_path}' maps tensors to '{name}', which is not in '{folder}'.",
                    fix="copy the missing shard next to the index (a partial download?).",
                )
        files = tuple(read_header(folder / name) for name in names)
        _check_index(index_path, index["weight_map"], files)
        return SourceCheckpoint(folder=folder, files=files, index=index)
    if (folder / SINGLE_NAME).is_file():
        return SourceCheckpoint(folder=folder, files=(read_header(folder / SINGLE_NAME),), index=None)
    raise CheckpointError(
        f"'{folder}' has neither {SINGLE_NAME} nor {INDEX_NAME}; only safetensors weights can be rewritten out of core.",
        fix="re-save the model with save_pretrained(..., safe_serialization=True), or prune it in memory.",
    )


def _read_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"'{path}' is not JSON ({error}).", fix="copy or download the checkpoint again.") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"'{path}' has no 'weight_map' mapping tensor names to shard files.",
            fix="copy or download the checkpoint again; save_pretrained writes this index.",
        )
    return index


def _check_index(path: Path, weight_map: Mapping[str, str], files: Sequence[SafetensorsFile]) -> None:
    where: dict[str, str] = {}
    for file in files:
        for tensor in file.tensors:
            if tensor.name in where:
                raise CheckpointError(
                    f"Tensor '{tensor.name}' is stored twice, in '{where[tensor.name]}' and '{file.path.name}'.",
                    fix="the shards belong to different saves; copy the checkpoint again.",
                )
            where[tensor.name] = file.path.name
    for name, shard in weight_map.items():
        if where.get(name) != shard:
            raise CheckpointError(
                f"'{path}' says tensor '{name}' is in '{shard}', but "
                + (f"it is in '{where[name]}'." if name in where else "no shard holds it."),
                fix="the index and the shards belong to different saves; copy the checkpoint again.",
            )
    unindexed = sorted(set(where) - set(weight_map))
    if unindexed:
        log.warning("%d tensor(s) in the shards are not in %s (kept): %s", len(unindexed), path.name, unindexed[:3])


# -- renaming -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockNames:
    """Maps on-disk tensor names through a plan: kept blocks renumbered, removed ones dropped.

    A tensor belongs to block ``i`` when its name starts with the adapter's ``tensor_prefix``
    for ``i`` (the template is anchored at the start, so the vision tower's own ``layers.N``
    never match the text decoder's).
    """

    template: str
    pattern: re.Pattern[str]
    new_index: Mapping[int, int]  # original block index -> index after surgery; absent = removed

    @classmethod
    def for_plan(cls, adapter: Adapter, plan: SurgeryPlan) -> BlockNames:
        template = adapter.tensor_prefix
        if template.count("{index}") != 1:
            raise SurgeryError(
                f"Adapter '{adapter.family}' has tensor_prefix '{template}', which must contain '{{index}}' exactly once.",
                fix="this is a bug in the family's adapter (compressor/architectures.py).",
            )
        before, after = template.split("{index}")
        pattern = re.compile(re.escape(before) + r"(\d+)" + re.escape(after))
        return cls(template=template, pattern=pattern, new_index={old: new for new, old in enumerate(plan.kept)})

    def block_of(self, name: str) -> int | None:
        match = self.pattern.match(name)
        return int(match.group(1)) if match else None

    def rename(self, name: str) -> str | None:
        """The output name of tensor ``name``, or None when its block is removed."""
        match = self.pattern.match(name)
        if match is None:
            return name
        new = self.new_index.get(int(match.group(1)))
        return None if new is None else self.template.format(index=new) + name[match.end() :]


def check_blocks(checkpoint: SourceCheckpoint, names: BlockNames, num_blocks: int) -> None:
    """The block tensors on disk are exactly blocks 0..num_blocks-1 under the adapter's prefix.

    Without this a wrong prefix would match nothing and the "pruned" output would silently
    keep every block.
    """
    found = {i for t in checkpoint.tensors if (i := names.block_of(t.name)) is not None}
    if not found:
        examples = [t.name for t in checkpoint.tensors][:4]
        guesses = _guess_templates(t.name for t in checkpoint.tensors)
        hint = f" Block tensors here look like: {', '.join(guesses)}." if guesses else ""
        raise CheckpointError(
            f"No tensor in '{checkpoint.folder}' starts with the block prefix '{names.template}' "
            f"(examples of its names: {', '.join(examples)}).{hint}",
            fix="the checkpoint uses another tensor layout than this family's adapter expects; "
            "prune it in memory, or report the layout so the adapter can learn it.",
        )
    expected = set(range(num_blocks))
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise CheckpointError(
            f"'{checkpoint.folder}' has tensors for blocks {_ranges(found)} under '{names.template}', but its config and the plan "
            f"have {num_blocks} blocks"
            + (f" (missing: {missing[:8]})" if missing else "")
            + (f" (unexpected: {extra[:8]})" if extra else "")
            + ".",
            fix="the weights and config.json belong to different models; copy the checkpoint again.",
        )


def _guess_templates(names: Iterable[str]) -> list[str]:
    """Distinct ``<prefix>{index}.`` templates of names that look like ``...layers.N.``."""
    pattern = re.compile(r"^(.*?\b(?:layers|h|blocks|layer)\.)\d+\.")
    return sorted({m.group(1) + "{index}." for name in names if (m := pattern.match(name))})[:4]


def _ranges(indices: Iterable[int]) -> str:
    values = sorted(indices)
    return f"{values[0]}..{values[-1]}" if values == list(range(values[0], values[-1] + 1)) else str(values)


# -- planning the output ------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputShard:
    """One output file: a subset of one source file's tensors, renamed, in output order."""

    name: str
    source: SafetensorsFile
    tensors: tuple[tuple[str, TensorInfo], ...]  # (output name, source entry)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for _, t in self.tensors)

    @property
    def header(self) -> bytes:
        return encode_header(self.tensors, self.source.metadata)


def plan_shards(
    checkpoint: SourceCheckpoint, names: BlockNames, resize: Callable[[TensorInfo], TensorInfo] | None = None
) -> tuple[list[OutputShard], list[str]]:
    """Output shards (one per source file that keeps a tensor) and the names of dropped files.
    ``resize`` maps a kept tensor to what the output holds (`block_tensors.resizer`: a tensor
    with one slice per block becomes a `SlicedTensor` of the kept blocks' slices)."""
    kept: list[tuple[SafetensorsFile, list[tuple[str, TensorInfo]]]] = []
    dropped: list[str] = []
    for file in checkpoint.files:
        renamed = [(new, resize(t) if resize else t) for t in file.tensors if (new := names.rename(t.name)) is not None]
        if renamed:
            # Stable sort: source order (sequential reads) within each element size.
            renamed.sort(key=lambda pair: -DTYPE_BYTES.get(pair[1].dtype, 1))
            kept.append((file, renamed))
        else:
            dropped.append(file.path.name)
    new_names = shard_names([file.path.name for file, _ in kept]) if checkpoint.index is not None else {SINGLE_NAME: SINGLE_NAME}
    shards = [OutputShard(name=new_names[file.path.name], source=file, tensors=tuple(t)) for file, t in kept]
    return shards, dropped


def shard_names(names: Sequence[str]) -> dict[str, str]:
    """Renumber ``stem-00002-of-00005.safetensors`` names so the surviving shards read 1..n of n.

    Names in another pattern are kept as they are (the index maps them anyway).
    """
    matches = [_SHARD_NAME.match(name) for name in names]
    stems = {(m.group("stem"), len(m.group("n"))) for m in matches if m}
    if not names or None in matches or len(stems) != 1:
        return {name: name for name in names}
    (stem, width), total = stems.pop(), len(names)
    return {name: f"{stem}-{i:0{width}d}-of-{total:0{width}d}.safetensors" for i, name in enumerate(names, start=1)}


def encode_header(tensors: Iterable[tuple[str, TensorInfo]], metadata: Mapping[str, str] | None) -> bytes:
    """Length field + JSON header for ``tensors`` laid out back to back in the given order."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, tensor in tensors:
        header[name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    # Pad with spaces (valid JSON whitespace) so the data buffer starts 8-byte aligned, as
    # safetensors does: with tensors ordered by element size, each tensor is then aligned.
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


# -- copying bytes ------------------------------------------------------------------------------


class HashingWriter:
    """Appends bytes to an open output file and computes the file's SHA-256 on the way.

    Why a user-space copy, when the kernel can copy file to file (``copy_file_range``,
    ``sendfile``) without the bytes ever entering this process: the manifest records every
    written byte's hash, so the bytes must enter the process once anyway. A kernel copy then a
    hashing read of the output costs the copy plus the hash; reading each chunk into a buffer,
    writing it, and hashing it in a second thread (hashlib releases the GIL) while the next
    chunks are read and written costs about the larger of the two. Measured on the 1.3 GB
    checkpoint of `bench_checkpoint` (2 cores, ext4, warm page cache, median of 3-5): with the
    second core free, 1.02 s for kernel copy + hash against 0.65 s for this, SHA-256 (1.9 GB/s
    with SHA-NI) being the bound, though this VM now and then gives 1.3 s (two threads touch
    each chunk: likely costly when its vCPUs sit far apart); with another process busy on the
    second core, everything runs on one core and kernel copy + hash (1.0 to 1.1 s) is up to
    1.3x faster. A free core is the usual case for a batch job like this one, hence this
    design. It also never reads a byte twice, where the hashing read of a kernel copy could
    go back to the disk for shards bigger than the free page cache (checkpoints bigger than
    RAM are what this module is for), and it needs no fallbacks for file systems or kernels
    that refuse in-kernel copies.
    """

    def __init__(self, dst: io.FileIO, chunk_size: int = DEFAULT_CHUNK_SIZE):
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.dst = dst
        self.chunk_size = chunk_size
        self.size = 0
        self._sha = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")  # one worker: chunks hashed in order
        self._pending: deque[tuple[Future[None], bytearray | None]] = deque()  # (hash of a chunk, its buffer)
        self._buffers = 0

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *error: object) -> None:
        self._hasher.shutdown(wait=True, cancel_futures=True)  # after an error: no hashing of the rest

    def write(self, data: bytes) -> None:
        """Append ``data`` (immutable: the hasher may still read it after this returns)."""
        self._append(memoryview(data), None)

    def copy(self, src: io.FileIO, offset: int, length: int) -> None:
        """Append ``length`` bytes of ``src`` starting at ``offset``."""
        src.seek(offset)
        while length:
            buffer = self._free_buffer()
            n = src.readinto(memoryview(buffer)[: min(length, self.chunk_size)])
            if not n:
                raise CheckpointError(
                    f"'{src.name}' ended {length} bytes early while being copied.",
                    fix="the file changed or is truncated; copy the checkpoint again.",
                )
            self._append(memoryview(buffer)[:n], buffer)
            length -= n

    def copy_columns(self, src: io.FileIO, offset: int, rows: int, row_bytes: int, keep: Sequence[tuple[int, int]]) -> None:
        """Append, from each of ``rows`` consecutive rows of ``row_bytes`` bytes at ``offset``,
        the byte ranges ``keep`` of the row, in order: the kept columns of a row-major tensor.

        Such a slice is strided, so it cannot be copied as one range; reading it range by range
        would cost a system call per row and range (millions for a [262144, L·d] embedding).
        Instead a chunk of whole rows is read into one scratch buffer and its kept ranges are
        gathered into a hashing buffer: memory stays at one more chunk than `copy` needs.
        """
        per_chunk = self.chunk_size // row_bytes
        if per_chunk == 0:  # rows longer than a chunk: their kept ranges are long enough to copy one by one
            for row in range(rows):
                for begin, end in keep:
                    self.copy(src, offset + row * row_bytes + begin, end - begin)
            return
        scratch = memoryview(bytearray(per_chunk * row_bytes))
        src.seek(offset)
        done = 0
        while done < rows:
            n = min(per_chunk, rows - done)
            rows_in = scratch[: n * row_bytes]
            filled = 0
            while filled < len(rows_in):  # unbuffered reads may be partial
                got = src.readinto(rows_in[filled:])
                if not got:
                    raise CheckpointError(
                        f"'{src.name}' ended {(rows - done) * row_bytes - filled} bytes early while being copied.",
                        fix="the file changed or is truncated; copy the checkpoint again.",
                    )
                filled += got
            buffer = self._free_buffer()
            out = memoryview(buffer)
            at = 0
            for row in range(n):
                base = row * row_bytes
                for begin, end in keep:
                    out[at : at + end - begin] = rows_in[base + begin : base + end]
                    at += end - begin
            self._append(out[:at], buffer)
            done += n

    def finish(self) -> FileHash:
        """The size and SHA-256 of everything appended, once the last chunks are hashed."""
        while self._pending:
            self._pending.popleft()[0].result()
        return FileHash(size=self.size, sha256=self._sha.hexdigest())

    def _append(self, view: memoryview, buffer: bytearray | None) -> None:
        write_all(self.dst, view)
        self.size += len(view)
        # Hashed in the other thread while the next chunks are read and written.
        self._pending.append((self._hasher.submit(self._sha.update, view), buffer))

    def _free_buffer(self) -> bytearray:
        """A buffer no pending hash reads: a new one until there are `HASH_DEPTH`, then the
        oldest, once its chunk is hashed (which also re-raises the hasher's errors here)."""
        if self._buffers < HASH_DEPTH:
            self._buffers += 1
            return bytearray(self.chunk_size)
        while True:
            future, buffer = self._pending.popleft()
            future.result()
            if buffer is not None:
                return buffer


def write_all(dst: io.FileIO, data: bytes | memoryview) -> None:
    """Unbuffered writes may be partial; loop until every byte is out."""
    view = memoryview(data)
    while view:
        view = view[dst.write(view) :]


def write_shard(
    shard: OutputShard, path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE, on_tensor: Callable[[int], None] | None = None
) -> FileHash:
    """Write ``shard`` to ``path``; returns the file's size and SHA-256, hashed as it was written."""
    header = shard.header
    with open(shard.source.path, "rb", buffering=0) as src, open(path, "wb", buffering=0) as dst, HashingWriter(dst, chunk_size) as out:
        out.write(header)
        for _, tensor in shard.tensors:
            if isinstance(tensor, SlicedTensor):
                tensor.copy_to(out, src, shard.source.data_start)
            else:
                out.copy(src, shard.source.data_start + tensor.begin, tensor.nbytes)
            if on_tensor is not None:
                on_tensor(tensor.nbytes)
        written = out.finish()
    size = len(header) + shard.data_bytes
    if path.stat().st_size != size or written.size != size:
        raise SurgeryError(
            f"'{path}' has {path.stat().st_size} bytes after writing, expected {size}.",
            fix="this is a bug in compressor's checkpoint rewrite (or the disk filled up); nothing was written.",
        )
    return written


# -- the folder ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointResult:
    path: Path
    weight_files: tuple[str, ...]  # written, in order
    dropped_files: tuple[str, ...]  # source shards that held only removed blocks
    copied_files: tuple[str, ...]  # other source files carried over unchanged
    skipped_files: tuple[str, ...]  # source files deliberately not carried over
    tensors_in: int
    tensors_out: int
    tensors_renamed: int
    bytes_read: int  # headers + tensor data read from the source
    bytes_written: int  # weight files written, headers included
    params_before: int
    params_after: int
    # Size and SHA-256 of the weight files and the index (paths relative to ``path``), hashed as
    # they were written: the manifest takes them instead of reading those files again.
    file_hashes: Mapping[str, FileHash]

    @property
    def tensors_dropped(self) -> int:
        return self.tensors_in - self.tensors_out


VERIFIED_OUT_OF_CORE = (
    "The weights were rewritten out of core (tensors copied byte for byte from the original, block tensors "
    "renumbered, no model loaded); every written header was re-read and checked against the plan."
)


def rewrite_checkpoint(
    source_dir: Path | str,
    out: Path | str,
    plan: SurgeryPlan,
    adapter: Adapter,
    *,
    recipe_text: str | None = None,
    calibration: CalibrationReport | None = None,
    source: ModelSource | None = None,
    overwrite: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
) -> CheckpointResult:
    """Write ``source_dir`` pruned by ``plan`` to ``out`` without loading the model.

    The output is what `export_hf` writes for the same plan (same tensors, names, dtypes and
    values; same config), except that it is not verified by a reload with logits: that would
    need the model in memory, which is what this path exists to avoid.
    """
    source_dir, out = Path(source_dir).resolve(), Path(out).resolve()
    if out == source_dir:
        raise InputError(f"Output '{out}' is the source checkpoint itself.", fix="write the pruned checkpoint to another folder.")
    refuse_existing(out, overwrite)  # before reading any header
    trusted = source is not None and source.trust_remote_code
    raw = read_config_json(source_dir, adapter)
    config = JsonConfig(raw) if raw is not None else _transformers_config(source_dir, trusted)
    _check_plan(config, plan, adapter, source_dir)
    checkpoint = read_checkpoint(source_dir)
    names = BlockNames.for_plan(adapter, plan)
    check_blocks(checkpoint, names, plan.num_blocks)
    shards, dropped = plan_shards(checkpoint, names, resizer(adapter, plan.num_blocks, plan.kept))
    copied, skipped = _other_files(source_dir, checkpoint, code=trusted)
    _check_space(out, sum(len(s.header) + s.data_bytes for s in shards) + sum(p.stat().st_size for p in copied))

    params_before = sum(t.numel for t in checkpoint.tensors)
    params_after = sum(t.numel for s in shards for _, t in s.tensors)
    with staged_dir(out, overwrite=overwrite) as staging:
        hashes = _write_weights(shards, staging, chunk_size, progress)
        if checkpoint.index is not None:
            hashes[INDEX_NAME] = _write_index(staging / INDEX_NAME, checkpoint.index, shards)
        reindex_config(adapter.text_config(config), adapter, plan.kept)
        if raw is not None:
            write_config_json(staging / "config.json", raw)
        else:
            config.save_pretrained(staging)
        strip_remote_code(staging, trusted=trusted)
        for path in copied:
            shutil.copyfile(path, staging / path.name)
        copy_tokenizer_files(source_dir, staging)  # also those in subfolders (additional chat templates)
        write_provenance(
            staging,
            name=out.name,
            adapter=adapter,
            plan=plan,
            params_before=params_before,
            params_after=params_after,
            source=source,
            recipe_text=recipe_text,
            calibration=calibration,
            verification=VERIFIED_OUT_OF_CORE,
        )
        verify_output(staging, shards, names, len(plan.kept))

    tensors_out = sum(len(s.tensors) for s in shards)
    result = CheckpointResult(
        path=out,
        weight_files=tuple(s.name for s in shards),
        dropped_files=tuple(dropped),
        copied_files=tuple(p.name for p in copied),
        skipped_files=tuple(skipped),
        tensors_in=sum(len(f.tensors) for f in checkpoint.files),
        tensors_out=tensors_out,
        tensors_renamed=sum(1 for s in shards for new, t in s.tensors if new != t.name),
        bytes_read=sum(f.data_start for f in checkpoint.files) + sum(s.data_bytes for s in shards),
        bytes_written=sum(hashes[s.name].size for s in shards),
        params_before=params_before,
        params_after=params_after,
        file_hashes=hashes,
    )
    log.info(
        "rewrote the checkpoint out of core: %d -> %d tensors in %d file(s), %.3g GB written",
        result.tensors_in,
        tensors_out,
        len(shards),
        result.bytes_written / 1e9,
    )
    return result


def _transformers_config(folder: Path, trusted: bool) -> Any:
    """The config as transformers reads it, for a config.json that leaves something the rules
    read to its class's defaults (or ships code): imported here, since only then is it needed."""
    from .loading import load_config

    return load_config(folder, trust_remote_code=trusted)


def _check_plan(config: Any, plan: SurgeryPlan, adapter: Adapter, folder: Path) -> None:
    declared = adapter.num_blocks(config)
    if declared != plan.num_blocks:
        raise PlanError(
            f"The plan is for a model with {plan.num_blocks} blocks; '{folder / 'config.json'}' declares "
            f"{adapter.count_path} = {declared}.",
            fix="make the plan from this model's calibration (or an explicit recipe).",
        )
    if not plan.kept:
        raise PlanError("The plan removes every block.", fix="keep at least one block.")
    plan.check_fixed(adapter.fixed_blocks(config))
    check_reindex(adapter.text_config(config), adapter, plan.kept)  # before any byte is written


def _other_files(folder: Path, checkpoint: SourceCheckpoint, *, code: bool = False) -> tuple[list[Path], list[str]]:
    """Top-level files to copy unchanged, and the names of those deliberately left out (the
    model's Python files too, unless its ``code`` is trusted)."""
    consumed = {f.path.name for f in checkpoint.files} | {INDEX_NAME, "config.json"}
    copied: list[Path] = []
    skipped: list[str] = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name in consumed:
            continue
        if path.is_dir():
            skipped.append(name + "/")  # e.g. `original/` with the unpruned consolidated weights
        elif (
            name.startswith(".")
            or name in _LINEAGE_FILES
            or name.endswith(_WEIGHT_SUFFIXES)
            or _WEIGHT_INDEX.match(name)
            or (name.endswith(".py") and not code)
        ):
            skipped.append(name)
        elif path.is_file():  # follows symlinks: Hub cache snapshots are links to blobs
            copied.append(path)
    if skipped:
        log.info("not copied from %s: %s", folder, ", ".join(skipped))
    return copied, skipped


def _check_space(out: Path, needed: int) -> None:
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise InsufficientSpaceError(
            f"Writing '{out}' needs {human_bytes(needed)} but its file system has {human_bytes(free)} free.",
            fix="free some space or write the pruned checkpoint to another disk.",
        )


def human_bytes(n: int) -> str:
    """``n`` bytes in the unit that shows it best: 512 B, 3.4 kB, 17.2 MB, 1.31 GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _write_weights(shards: Sequence[OutputShard], folder: Path, chunk_size: int, progress: Progress | None) -> dict[str, FileHash]:
    """Write every shard, several at once (`parallel_shards`); their sizes and SHA-256s by file name.

    Why at once: SHA-256 is sequential within a file, so one file is hashed at the speed of one
    core (about 2 GB/s with SHA-NI), twice what `cp` needs to copy it; the files of a sharded
    checkpoint are independent, so writing them side by side spreads the hashing over every
    core. All of them start together rather than a pool's worth at a time, so the one or two
    shards a small core count leaves over do not finish alone (3 shards on 2 cores: 1.5 shard
    times, not 2). On the first failure the other writers stop at their next tensor.
    """
    total = sum(s.data_bytes for s in shards)
    done = 0
    lock = threading.Lock()
    failed = threading.Event()

    def advance(nbytes: int) -> None:
        nonlocal done
        if failed.is_set():
            raise _Stopped
        with lock:
            done += nbytes
            if progress is not None:
                progress(done, total)

    def write(shard: OutputShard) -> FileHash:
        try:
            written = write_shard(shard, folder / shard.name, chunk_size, advance)
        except BaseException:
            failed.set()
            raise
        log.debug("wrote %s (%d tensors from %s)", shard.name, len(shard.tensors), shard.source.path.name)
        return written

    pool = ThreadPoolExecutor(max_workers=parallel_shards(len(shards)), thread_name_prefix="shard")
    try:
        futures = {shard.name: pool.submit(write, shard) for shard in shards}
        wait(futures.values())
    except BaseException:  # Ctrl-C while waiting: the writers stop too, before the staging folder goes
        failed.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    errors = [e for f in futures.values() if (e := f.exception()) is not None and not isinstance(e, _Stopped)]
    if errors:
        raise errors[0]  # the first real failure; the others only stopped because of it
    return {name: future.result() for name, future in futures.items()}


def parallel_shards(count: int) -> int:
    """How many shards are written at once: all of them, up to `MAX_PARALLEL_SHARDS`, which
    bounds memory (each writer holds `HASH_DEPTH` chunks) and the files open on one disk."""
    return max(1, min(count, MAX_PARALLEL_SHARDS))


class _Stopped(Exception):
    """Raised in a shard writer because another one failed."""


def _write_index(path: Path, source_index: Mapping[str, Any], shards: Sequence[OutputShard]) -> FileHash:
    """The source index with its weight map and totals recomputed (other fields kept); returns its hash."""
    metadata = dict(source_index.get("metadata") or {})
    metadata["total_size"] = sum(s.data_bytes for s in shards)
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(t.numel for s in shards for _, t in s.tensors)
    weight_map = {name: s.name for s in shards for name, _ in s.tensors}
    index = {**source_index, "metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    data = (json.dumps(index, indent=2) + "\n").encode()
    path.write_bytes(data)
    return FileHash.of(data)


def verify_output(folder: Path, shards: Sequence[OutputShard], names: BlockNames, kept: int) -> None:
    """Re-read every written header and check it against the plan. `read_header` validates as
    strictly as safetensors' reader (layout, offsets, sizes); that reader itself is not used
    here because it imports numpy (40 ms of a 0.6 s prune); the tests load every output with it."""
    problems: list[str] = []
    blocks: set[int] = set()
    for shard in shards:
        path = folder / shard.name
        written = read_header(path)
        expected = [(new, t.dtype, t.shape, t.nbytes) for new, t in shard.tensors]
        got = [(t.name, t.dtype, t.shape, t.nbytes) for t in written.tensors]
        if got != expected:
            problems.append(f"{shard.name}: header differs from the planned one")
        blocks.update(i for t in written.tensors if (i := names.block_of(t.name)) is not None)
        if written.metadata != shard.source.metadata:
            problems.append(f"{shard.name}: __metadata__ was not preserved")
    if blocks != set(range(kept)):
        problems.append(f"block tensors cover blocks {sorted(blocks)}, expected 0..{kept - 1}")
    if problems:
        raise SurgeryError(
            "The rewritten checkpoint does not match the plan:\n" + "\n".join(f"  - {p}" for p in problems),
            fix="this is a bug in compressor's checkpoint rewrite; nothing was written.",
        )
