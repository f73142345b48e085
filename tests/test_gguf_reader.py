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


def test_vectors_stored_as_bytes_are_read_by_their_values(tmp_path: Path) -> None:
    """helper-39: a BF16 vector's (a norm's) `rows` sliced its bytes, so a file with BF16 norms failed to load
    ("shape '[64]' is invalid for input of size 32"); a vector of blocks likewise. Values a:b, as gguf reads them."""
    from flexgen_lite.models.gguf_weights import read_gguf_rows

    rng = np.random.default_rng(3)
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "llama")
    values = {"bf16": rng.standard_normal(64).astype(np.float32), "q8": rng.standard_normal(96).astype(np.float32)}
    w.add_tensor("bf16", gguf.quants.quantize(values["bf16"], Q.BF16), raw_dtype=Q.BF16)
    w.add_tensor("q8", gguf.quants.quantize(values["q8"], Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for t in GGUFContents(str(tmp_path / "v.gguf")).tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        spans = [(0, len(want)), (0, 32), (32, 64)] + ([(10, 20)] if t.tensor_type == Q.BF16 else [])
        for a, b in spans:
            assert np.array_equal(read_gguf_rows((t, None, 0.0), a, b).numpy(), want[a:b]), (t.name, a, b)
        if t.tensor_type == Q.Q8_0:
            with pytest.raises(ValueError, match="cut its blocks of 32"):
                t.rows(10, 20)


def test_a_q4_0_scale_past_fp16s_reach_of_minus_8_d(tmp_path: Path) -> None:
    """helper-39: Q4_0's value (code - 8) d took -8 d in fp16, inf from d = 8192: a block of d = 16384 read -inf
    where gguf reads -131072; its groups are then not kept as stored (their minimum cannot be fp16)."""
    from flexgen_lite.models.gguf_reader import groups_of_32

    block = np.zeros(18, dtype=np.uint8)
    block[:2] = np.frombuffer(np.float16(16384).tobytes(), np.uint8)
    block[2:] = 0x80  # codes 0 (value -8 d) and 8 (value 0)
    w = gguf.GGUFWriter(str(tmp_path / "big.gguf"), "llama")
    w.add_tensor("m", np.tile(block, (2, 1)), raw_dtype=Q.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (t,) = GGUFContents(str(tmp_path / "big.gguf")).tensors
    want = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    assert want.min() == -131072 and np.array_equal(dequantize(t).numpy(), want)
    assert groups_of_32(t) is None


@pytest.mark.parametrize("what", ["alignment 7", "alignment 0", "offset"])
def test_a_bad_alignment_or_a_misplaced_tensor_is_refused(tmp_path: Path, what) -> None:
    """helper-39: an alignment of 7 (gguf's reader and llama.cpp refuse it) was taken, 0 divided by zero, and a
    tensor moved off its alignment was read shifted, without a word."""
    path = tmp_path / "every.gguf"
    write_every_kind(path, 64)
    data = bytearray(path.read_bytes())
    if what.startswith("alignment"):
        key = data.index(b"general.alignment") + len("general.alignment")
        data[key + 4:key + 8] = int(what.split()[1]).to_bytes(4, "little")  # after the value's type: a uint32
        message = "not a power of two"
    else:
        reader = gguf.GGUFReader(str(path))
        field = next(t for t in reader.tensors if t.name == "vec")
        at = data.index(b"vec") + 3 + 4 + 8 + 4  # the name, its dims count, one dim, its type: then the offset
        data[at:at + 8] = (int(field.data_offset - reader.data_offset) + 4).to_bytes(8, "little")
        message = "not a multiple of the file's alignment 64"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=message):
        GGUFContents(str(path))
