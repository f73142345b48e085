"""A GGUF file's header read fast: its metadata as Python values, its tensors as memory-mapped numpy views.

gguf's own `GGUFReader` builds a numpy view per metadata element: ~4 s for SmolLM2's tokenizer (49k tokens,
49k merges) before a single weight is read, on every start. Here each value is one `struct` read (numeric
arrays one `frombuffer`): ~0.1 s. Layout (GGUF v2/v3, little-endian): magic, version, tensor count, metadata
count; the metadata (key, type, value); the tensor infos (name, dims fastest first, type, offset); the data,
aligned to `general.alignment`. Any read past the end, or a tensor whose bytes are not all in the file, raises
ValueError (gguf_file.py says which file and what to do).

`dequantize` turns the types flexgen_lite reads into float32 with torch, with the same float32 operations as
gguf's numpy code (equal bit for bit, tested), a chunk of blocks at a time: SmolLM2's tensors in 0.15-0.2 s against
gguf's 0.6 (2 cores, 2026-12-05); a 64M-value Q8_0 matrix at 590M values/s, the transient beyond the output ~7 MB,
where the whole matrix at once took 280M values/s and twice the output's size."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

from .gguf_quants import DEQUANTIZE, q4_k_groups

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                11: "<i8", 12: "<f8"}
TYPED_DATA = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
              GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
              GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
              GGMLQuantizationType.I64: np.int64}


@dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # dims as GGUF stores them, fastest first
    data: np.ndarray  # typed for float and int types; bytes (rows..., row bytes) for quantized ones
    mapping: mmap.mmap | None = None  # the file's mapping `data` views, at byte `offset` (release)
    offset: int = 0

    def rows(self, start: int, stop: int) -> GGUFTensor:
        """Rows start:stop of its HF shape's first dimension (GGUF's last) as a tensor of their own, a view of the
        same bytes: dequantized alone, a few rows of a large tensor are all placement holds at once."""
        if len(self.shape) == 1 and self.tensor_type not in TYPED_DATA:
            return self._values(start, stop)
        stop = min(stop, self.data.shape[0])
        row_bytes = self.data.nbytes // max(1, self.data.shape[0])
        shape = self.shape.copy()
        shape[-1] = stop - start
        return GGUFTensor(self.name, self.tensor_type, shape, self.data[start:stop], self.mapping,
                          self.offset + start * row_bytes)

    def _values(self, start: int, stop: int) -> GGUFTensor:
        """Values start:stop of a vector stored as bytes (BF16, or blocks: whole ones), where its bytes are no rows
        (helper-39: a BF16 norm's rows were its bytes, and it failed to load)."""
        block, size = GGML_QUANT_SIZES[self.tensor_type]
        n = int(self.shape[0])
        stop = min(stop, n)
        if start % block or (stop % block and stop != n):
            raise ValueError(f"values {start}:{stop} of {self.name!r} cut its blocks of {block}")
        first, last = start // block * size, -(-stop // block) * size
        shape = self.shape.copy()
        shape[0] = stop - start
        return GGUFTensor(self.name, self.tensor_type, shape, self.data[first:last], self.mapping, self.offset + first)

    def release(self) -> None:
        """Drop this tensor's pages from the process (they stay in the page cache): a file read through a
        mapping otherwise stays in RSS whole after loading, beyond any memory budget (Q4_K_M 8B: +4.9 GB).
        Pages shared with a neighbour are dropped too and read again if touched."""
        if self.mapping is None or self.data.nbytes == 0:
            return
        first = self.offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(self.mapping), -(-(self.offset + self.data.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
        try:
            self.mapping.madvise(mmap.MADV_DONTNEED, first, end - first)
        except (AttributeError, OSError, ValueError):  # a platform without madvise: the pages stay
            pass


class _Cursor:
    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise ValueError(f"the file ends at byte {len(self.buf)}, inside its header") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes runs past the end of the file")
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, kind: int) -> Any:
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, n = self.scalar("<I"), self.scalar("<Q")
            if item == STRING:
                return [self.string() for _ in range(n)]
            if item not in ARRAY_DTYPES:
                raise ValueError(f"metadata array of unknown type {item}")
            dtype = np.dtype(ARRAY_DTYPES[item])
            if self.pos + n * dtype.itemsize > len(self.buf):
                raise ValueError(f"an array of {n} values runs past the end of the file")
            values = np.frombuffer(self.buf, dtype, n, self.pos).tolist()
            self.pos += n * dtype.itemsize
            return values
        if kind not in SCALARS:
            raise ValueError(f"metadata value of unknown type {kind}")
        return self.scalar(SCALARS[kind])


class GGUFContents:
    """`metadata`: key -> value (arrays as lists); `tensors`: in file order, their data mapped, not read."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = memoryview(self._map)
        c = _Cursor(buf)
        if bytes(buf[:4]) != MAGIC:
            raise ValueError(f"it does not start with {MAGIC!r}")
        c.pos = 4
        version = c.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (little-endian versions 2 and 3 are read)")
        n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            self.metadata[key] = c.value(c.scalar("<I"))
        infos = [self._tensor_info(c) for _ in range(n_tensors)]
        align = self.metadata.get("general.alignment", 32)
        if type(align) is not int or align <= 0 or align & (align - 1):  # as gguf's reader and llama.cpp refuse it
            raise ValueError(f"its general.alignment is {align!r}, not a power of two")
        misplaced = next((info for info in infos if info[3] % align), None)
        if misplaced is not None:
            raise ValueError(f"tensor {misplaced[0]!r} is at offset {misplaced[3]}, not a multiple of the file's "
                             f"alignment {align}")
        start = -(-c.pos // align) * align
        data = np.frombuffer(self._map, np.uint8)
        self.tensors = [self._tensor(data, self._map, start, *info) for info in infos]

    @staticmethod
    def _tensor_info(c: _Cursor) -> tuple:
        name = c.string()
        dims = [c.scalar("<Q") for _ in range(c.scalar("<I"))]
        return name, dims, GGMLQuantizationType(c.scalar("<I")), c.scalar("<Q")

    @staticmethod
    def _tensor(data: np.ndarray, mapping: mmap.mmap, start: int, name: str, dims: list[int], kind,
                offset: int) -> GGUFTensor:
        block, type_size = GGML_QUANT_SIZES[kind]
        n_bytes = int(np.prod(dims)) * type_size // block
        first = start + offset
        if first + n_bytes > data.size:
            raise ValueError(f"tensor {name!r} ends at byte {first + n_bytes}, past the file's end ({data.size})")
        np_dims = tuple(reversed(dims))
        raw = data[first:first + n_bytes]
        if kind in TYPED_DATA:
            values = raw.view(TYPED_DATA[kind]).reshape(np_dims)
        else:
            values = raw.reshape(quant_shape_to_byte_shape(np_dims, kind))
        return GGUFTensor(name, kind, np.array(dims, dtype=np.uint64), values, mapping, first)


def dequantize(t: GGUFTensor) -> torch.Tensor:
    """t's values as float32, shaped as GGUF's dims reversed (rows last-but-one); a type not read here raises."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    kind = t.tensor_type
    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return _raw(t).float().reshape(shape)
    if kind == GGMLQuantizationType.BF16:
        return _raw(t).view(torch.bfloat16).float().reshape(shape)
    if kind in BLOCK_TYPES:  # a chunk of blocks at a time: the peak is the output, whatever the temporaries
        block_values, block_bytes = GGML_QUANT_SIZES[kind]
        return _by_chunks(BLOCK_TYPES[kind], np.asarray(t.data).reshape(-1, block_bytes), block_values).reshape(shape)
    raise ValueError(f"tensor {t.name!r} has type {kind.name}, which this reader does not dequantize")


GROUPS_OF_32 = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)  # held exactly by 4-bit groups of 32
# and these with each group's scale and minimum rounded to fp16 (Q4_K's are products of fp16 and 6-bit factors)
KEPT_GROUPS = (*GROUPS_OF_32, GGMLQuantizationType.Q4_K)


def groups_of_32(t: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A Q4_0, Q4_1 or Q4_K matrix's own groups as (codes (rows, cols) uint8 in 0..15, scale, minimum
    (rows, cols / 32) fp16) with value = code * scale + minimum, as flexgen_lite's 4-bit groups of 32 along the
    input dimension store them; None for other types. Q4_K's scale d * sc and minimum -dmin * m are rounded to
    fp16 (within 2^-11 of each; the rest is exact)."""
    if t.tensor_type not in KEPT_GROUPS or len(t.shape) != 2:
        return None
    cols, rows = (int(d) for d in t.shape.tolist())
    if t.tensor_type == GGMLQuantizationType.Q4_K:
        codes, scale, subtrahend = q4_k_groups(_blocks(t))
        scale, minimum = scale.half(), (-subtrahend).half()
    else:
        codes, scale, minimum = _groups(t)
    if not bool(torch.isfinite(minimum).all()):  # a Q4_0 scale of 8192 or more: its -8 d is past fp16's range
        return None
    return codes.reshape(rows, cols), scale.reshape(rows, cols // 32), minimum.reshape(rows, cols // 32)


def q8_0_blocks(t: GGUFTensor) -> torch.Tensor | None:
    """A Q8_0 matrix's blocks as stored (rows * cols / 32, 34 bytes: fp16 scale, 32 int8 codes), copied out of the
    mapping; None for other types."""
    if t.tensor_type != GGMLQuantizationType.Q8_0 or len(t.shape) != 2:
        return None
    return _blocks(t)  # _raw's copy


def _groups(t: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _block_groups(_blocks(t), t.tensor_type)


def _block_groups(blocks: torch.Tensor, kind) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block of 32: (codes (blocks, 32), scale, minimum (blocks, 1) fp16). Q4_1 stores d, m, then 16 bytes whose
    low nibbles are the first 16 codes and high nibbles the last 16; Q4_0 stores d and the bytes, value (code - 8)
    d: minimum -8 d, exact in fp16 (a power of two), and code * d - 8 d is exact in fp32 (at most 15 bits)."""
    scale = blocks[:, :2].contiguous().view(torch.float16)
    if kind == GGMLQuantizationType.Q4_1:
        return _nibbles(blocks[:, 4:]), scale, blocks[:, 2:4].contiguous().view(torch.float16)
    return _nibbles(blocks[:, 2:]), scale, scale * -8


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:  # d, 32 int8
    return blocks[:, 2:].contiguous().view(torch.int8).float() * blocks[:, :2].contiguous().view(torch.float16).float()


def _q4(kind):
    def values(blocks: torch.Tensor) -> torch.Tensor:  # code * scale + minimum: exact for Q4_0's (code - 8) d too
        codes, scale, minimum = _block_groups(blocks, kind)
        if kind == GGMLQuantizationType.Q4_0:  # -8 d in fp32: in fp16 it is inf from d = 8192 on (helper-39)
            minimum = scale.float() * -8
        return codes.float() * scale.float() + minimum.float()
    return values


BLOCK_TYPES = {GGMLQuantizationType.Q8_0: _q8_0, **{kind: _q4(kind) for kind in GROUPS_OF_32}, **DEQUANTIZE}


CHUNK_VALUES = 1 << 20  # per call of a block type's function: its temporaries stay small and are reused


def _by_chunks(fn, blocks: np.ndarray, block_values: int) -> torch.Tensor:
    """fn over the blocks (the file's bytes, mapped) a chunk at a time, each chunk copied out of the mapping
    as it is used, into one output: ~2x faster than over the whole tensor at once, whose temporaries (several
    times the output) are fresh memory, slow to touch the first time."""
    step = max(1, CHUNK_VALUES // block_values)
    if blocks.shape[0] <= step:
        return fn(torch.from_numpy(np.array(blocks)))
    out = torch.empty(blocks.shape[0], block_values)
    for i in range(0, blocks.shape[0], step):
        out[i:i + step] = fn(torch.from_numpy(np.array(blocks[i:i + step])))
    return out


def _raw(t: GGUFTensor) -> torch.Tensor:
    return torch.from_numpy(np.array(t.data, copy=True))


def _blocks(t: GGUFTensor) -> torch.Tensor:
    return _raw(t).reshape(-1, GGML_QUANT_SIZES[t.tensor_type][1])


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)
