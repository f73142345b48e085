"""The fast GGUF header reader (models/gguf_reader.py) against gguf's own GGUFReader: every metadata value, and
every tensor's name, type, dims and bytes, on a file with every metadata type and several tensor types, and on
the shipped SmolLM2 file (a real tokenizer: 49k-entry string arrays)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from flexgen_lite.models import gguf_reader
from flexgen_lite.models.gguf_file import GGUFError, default_model_path, read_gguf_config
from flexgen_lite.models.gguf_reader import GGUFContents, dequantize

Q = gguf.GGMLQuantizationType


def reference(path: Path) -> tuple[dict, list[tuple]]:
    reader = gguf.GGUFReader(str(path), "r")
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = [(t.name, t.tensor_type, t.shape.tolist(), t.data.shape, t.data.dtype, t.data.tobytes())
               for t in reader.tensors]
    return meta, tensors


def ours(path: Path) -> tuple[dict, list[tuple]]:
    c = GGUFContents(str(path))
    tensors = [(t.name, t.tensor_type, t.shape.tolist(), t.data.shape, t.data.dtype, t.data.tobytes())
               for t in c.tensors]
    return c.metadata, tensors


def write_every_kind(path: Path, alignment: int | None = None) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo, wörld")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1 / 3)
    w.add_array("t.strings", ["a", "", "ß" * 40, "<|im_start|>"])
    w.add_array("t.ints", list(range(-5, 300)))
    w.add_array("t.floats", [0.5, -1.25, 3.0])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.empty", [])
    for name, kind, shape in [("f32", Q.F32, (3, 64)), ("f16", Q.F16, (5, 32)), ("bf16", Q.BF16, (2, 64)),
                              ("q8", Q.Q8_0, (4, 64)), ("q4_0", Q.Q4_0, (6, 96)), ("q4_1", Q.Q4_1, (2, 128)),
                              ("vec", Q.F32, (7,))]:
        values = rng.standard_normal(shape).astype(np.float32)
        if kind == Q.F32:
            w.add_tensor(name, values)
        else:
            w.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_reads_what_gguf_reads(tmp_path: Path, alignment) -> None:
    path = tmp_path / "every.gguf"
    write_every_kind(path, alignment)
    meta, tensors = ours(path)
    want_meta, want_tensors = reference(path)
    assert meta == want_meta
    assert tensors == want_tensors
    assert meta["t.strings"][2] == "ß" * 40 and meta["t.u64"] == 2**63 + 5


def test_reads_the_shipped_model_as_gguf_does() -> None:
    path = Path(default_model_path())
    meta, tensors = ours(path)
    want_meta, want_tensors = reference(path)
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta == want_meta
    assert [t[:5] for t in tensors] == [t[:5] for t in want_tensors]
    assert all(a[5] == b[5] for a, b in zip(tensors[:8], want_tensors[:8], strict=False))


@pytest.mark.parametrize("cut", [3, 30, 200, -20])
def test_a_cut_file_is_refused(tmp_path: Path, cut: int) -> None:
    """Cut in the magic, the counts, the metadata, or the last tensor's bytes (-20: 4 bytes of padding and 16 of its
    28): a ValueError, and from gguf_file one GGUFError that names the file."""
    full = tmp_path / "full.gguf"
    write_every_kind(full)
    data = full.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError):
        GGUFContents(str(path))
    with pytest.raises(GGUFError, match="is not a readable GGUF file"):
        read_gguf_config(path)


def test_another_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v1.gguf"
    path.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(ValueError, match="version 1"):
        GGUFContents(str(path))


@pytest.mark.parametrize("chunk", [None, 40], ids=["whole", "chunks-of-40-values"])
def test_dequantizes_as_gguf_does(tmp_path: Path, chunk, monkeypatch) -> None:
    """Every type flexgen_lite reads, bit for bit what gguf's numpy dequantization gives, whole or a few blocks
    at a time (the last chunk short)."""
    if chunk:
        monkeypatch.setattr(gguf_reader, "CHUNK_VALUES", chunk)
    path = tmp_path / "every.gguf"
    write_every_kind(path)
    for t in GGUFContents(str(path)).tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        got = dequantize(t)
        assert got.dtype == torch.float32 and tuple(got.shape) == want.shape, t.name
        assert np.array_equal(got.numpy(), want), t.name
