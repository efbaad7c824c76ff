"""Bad data files and images are refused up front, by `load_samples`, with an InputError
naming the file or line: before the model loads, never as an internal error at batch time."""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compressor import data
from compressor.data import Sample, build_batch, file_sha256, load_samples
from compressor.demo.processor import build_llava_processor, build_tokenizer
from compressor.errors import InputError

AS_ROOT = os.geteuid() == 0  # root reads any file whatever its mode: chmod cannot make one unreadable


def _png(path: Path, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path, format="PNG")
    return path


def _jsonl(folder: Path, *images: str) -> Path:
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": "what color?", "answer": "red", "image": image}) + "\n" for image in images))
    return path


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _black_png(path: Path, width: int, height: int) -> Path:
    """A valid greyscale PNG of one colour: tiny on disk, huge once decoded. Written by hand,
    as PIL would first allocate the whole image."""
    compressor = zlib.compressobj(9)
    rows = bytes(width + 1) * 1000  # each row: filter byte 0, then black pixels
    body = b"".join(compressor.compress(rows) for _ in range(height // 1000)) + compressor.compress(bytes(width + 1) * (height % 1000))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body + compressor.flush()) + _chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


def _refused(path: Path, **kwargs) -> str:
    with pytest.raises(InputError) as caught:
        load_samples(path, **kwargs)
    assert caught.value.exit_code == 2
    return str(caught.value)


def _unreadable(path: Path, monkeypatch) -> None:
    """Make ``path`` unreadable to compressor.data: by its mode, or (as root) by refusing to open it."""
    if not AS_ROOT:
        path.chmod(0)
        return
    real_open = open

    def refusing_open(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(data, "open", refusing_open, raising=False)


def test_binary_data_file(tmp_path):
    path = _png(tmp_path / "data.jsonl")
    message = _refused(path)
    assert f"'{path}' is not UTF-8 text (line 1: byte 0x89 at column 1)" in message and "Fix:" in message


def test_bad_byte_names_its_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "hi"}\n{"prompt": "caf\xe9"}\n')
    assert "line 2: byte 0xe9 at column 16" in _refused(path)


def test_data_file_is_a_directory(tmp_path):
    assert f"'{tmp_path}' is a directory" in _refused(tmp_path)


def test_unreadable_data_file(tmp_path, monkeypatch):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "hi"}\n')
    _unreadable(path, monkeypatch)
    assert f"'{path}' cannot be read (Permission denied)" in _refused(path)


def test_unreadable_file_hash(tmp_path, monkeypatch):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "hi"}\n')
    _unreadable(path, monkeypatch)
    with pytest.raises(InputError, match="cannot be read"):
        file_sha256(path)


def test_empty_data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"")
    assert "holds no samples" in _refused(path)


def test_images_outside_the_folder_are_refused_all_at_once(tmp_path):
    outside = _png(tmp_path / "outside.png")
    folder = tmp_path / "data"
    folder.mkdir()
    _png(folder / "inside.png")
    (folder / "link.png").symlink_to(outside)
    path = _jsonl(folder, "inside.png", "../outside.png", str(outside), "link.png", "../../../../etc/passwd")
    message = _refused(path)
    assert "4 malformed line(s)" in message
    for line, image in ((2, "../outside.png"), (3, str(outside)), (4, "link.png"), (5, "../../../../etc/passwd")):
        assert f"line {line}: image '{image}' is outside the data file's folder" in message
    assert "--allow-outside-data" in message


def test_allow_outside_accepts_them(tmp_path):
    outside = _png(tmp_path / "outside.png")
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "link.png").symlink_to(outside)
    samples = load_samples(_jsonl(folder, "../outside.png", str(outside), "link.png"), allow_outside=True)
    assert [s.image for s in samples] == [outside.resolve()] * 3


def test_outside_file_that_is_not_an_image_is_reported_only_as_outside(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    message = _refused(_jsonl(folder, "/etc/passwd"))
    assert "outside the data file's folder" in message and "PIL" not in message


@pytest.mark.parametrize("size", [(20000, 20000), (9000, 8000)])
def test_huge_image_is_refused_from_its_header(tmp_path, size):
    # 20000x20000 is beyond what PIL will open; 9000x8000 (72 MP) is only beyond our cap.
    _black_png(tmp_path / "huge.png", *size)
    path = _jsonl(tmp_path, "huge.png")
    start = time.perf_counter()
    message = _refused(path)
    assert time.perf_counter() - start < 1.0
    pixels = f"{size[0] * size[1]} pixels" if size == (20000, 20000) else f"{size[0]}x{size[1]} pixels"
    assert f"image 'huge.png' is too large: {pixels}, above the 64 megapixel limit" in message
    assert "resize it" in message


def test_our_cap_holds_whatever_pil_allows(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    _black_png(tmp_path / "huge.png", 20000, 20000)
    assert "is too large: 20000x20000 pixels" in _refused(_jsonl(tmp_path, "huge.png"))


def test_truncated_png(tmp_path):
    whole = _png(tmp_path / "whole.png", size=64).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "no-end.png").write_bytes(whole[:-6])
    message = _refused(_jsonl(tmp_path, "cut.png", "no-end.png"))
    assert "line 1: image 'cut.png' is truncated or corrupt" in message
    assert "line 2: image 'no-end.png' is truncated or corrupt" in message


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    assert "image 'notes.png' is not an image PIL can read" in _refused(_jsonl(tmp_path, "notes.png"))


def test_image_that_is_a_directory(tmp_path):
    (tmp_path / "pictures").mkdir()
    assert "image 'pictures' is a directory" in _refused(_jsonl(tmp_path, "pictures"))


def test_image_broken_after_loading_is_an_input_error(tmp_path):
    """The file changed between load_samples and the batch (the model loads in between)."""
    image = _png(tmp_path / "a.png")
    processor = build_llava_processor(build_tokenizer(["what", "color", "red"]), image_size=16, patch_size=4)
    (sample,) = load_samples(_jsonl(tmp_path, "a.png"))
    image.write_text("not an image any more")
    with pytest.raises(InputError, match=f"Image '{image}' is not an image PIL can read"):
        build_batch(processor, [sample], with_answer=True)
    _black_png(image, 20000, 20000)
    with pytest.raises(InputError, match="is too large"):
        build_batch(processor, [sample], with_answer=True)


def test_valid_image_still_builds_a_batch(tmp_path):
    _png(tmp_path / "a.png")
    processor = build_llava_processor(build_tokenizer(["what", "color", "red"]), image_size=16, patch_size=4)
    samples = load_samples(_jsonl(tmp_path, "a.png"))
    assert samples == [Sample(prompt="what color?", answer="red", image=(tmp_path / "a.png").resolve())]
    batch = build_batch(processor, samples, with_answer=True)
    assert batch.inputs["pixel_values"].shape == (1, 3, 16, 16)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch.inputs["input_ids"] == image_token).sum()) == 16
    assert batch.answer_mask.any()
