"""Placing every weight on its home tier, from a checkpoint or as dummy values; a stored weight fetched to the
compute device (weight_slots.py holds the buffers it is fetched into)."""

from __future__ import annotations

import functools

import torch

from ..kernels.compression import (
    CompressionConfig,
    QuantizedTensor,
    compressed_nbytes,
    dequantize,
    from_bytes,
    to_bytes,
)
from ..kernels.int4_gemv_triton import row_groups_of
from ..kernels.int4_matmul import Int4Weight, eligible, pack
from ..kernels.int8_weight import fits as int8_fits
from ..kernels.int8_weight import head_wins, int8_nbytes
from ..models.specs import LayerSpec, WeightSpec
from ..system.devices import ComputeDevice
from ..system.host_memory import HostArena, padded
from ..system.memory import return_freed_memory
from .storage import DiskFile, DiskStore, MemoryLedger, page_aligned
from .weight_reading import filled, packed_rows, quantized_rows, read_chunk_rows, read_in_chunks
from .weight_sources import RoundedRows, WeightSource

DECODER_KINDS = ("attention", "mlp")


def weight_tiers(layers: list[LayerSpec], percents, dtype: torch.dtype,
                 compression: CompressionConfig | None = None) -> dict[str, str]:
    """The tier of every stored weight (by checkpoint name; tied weights once). Whole tensors, so one in
    compute memory is used where it lives, with no copy.

    The shares apply to the decoder layers' matrices. The embedding and head live in compute memory: homed
    anywhere else, their slots would keep a full copy there anyway (WeightSlots), so other tiers would only
    add disk space and a read. So do the decoder layers' vectors (norms, biases: about 0.3% of OPT's bytes and
    0.01% of Llama's, but 6 of the 10 tensors of an OPT attention layer): fetched, each would cost a copy,
    its events and host work every layer and step. Each decoder layer kind (attention, mlp) lays out its
    matrices name by name, each name across all layers, and cuts them at the shares; a tensor goes where its
    middle falls. So every layer keeps the same names in compute memory (they need no weight slot), one name
    may change tier part-way through the layers, and each tier's matrix bytes are within half a tensor per kind
    of its share."""
    by_kind: dict[str, dict[str, list[WeightSpec]]] = {}
    seen = set()
    for layer in layers:
        for spec in layer.weights:
            if spec.hf_name not in seen:
                seen.add(spec.hf_name)
                by_kind.setdefault(layer.kind, {}).setdefault(spec.name, []).append(spec)
    tiers = {}
    for kind, names in by_kind.items():
        specs = [spec for same_name in names.values() for spec in same_name]
        if kind not in DECODER_KINDS:
            tiers.update(dict.fromkeys((spec.hf_name for spec in specs), "gpu"))
            continue
        tiers.update({spec.hf_name: "gpu" for spec in specs if len(spec.shape) < 2})
        specs = [spec for spec in specs if len(spec.shape) >= 2]
        size = [stored_nbytes(spec.shape, dtype, matrix_compression(kind, spec, compression)) for spec in specs]
        cuts = (percents[0] / 100 * sum(size), (percents[0] + percents[1]) / 100 * sum(size))
        placed = 0
        for spec, nbytes in zip(specs, size, strict=True):
            middle = placed + nbytes / 2
            tiers[spec.hf_name] = "gpu" if middle < cuts[0] else "cpu" if middle < cuts[1] else "disk"
            placed += nbytes
    return tiers


ROUTERS = ("router.weight", "shared_gate.weight")  # a MoE's routing: kept dense, as llama.cpp keeps it


def compressed_matrix(kind: str, spec: WeightSpec) -> bool:
    """Whether a weight of a layer of `kind` is one that compression rounds (matrix_compression)."""
    return kind in DECODER_KINDS and len(spec.shape) >= 2 and spec.name not in ROUTERS


def matrix_compression(kind: str, spec: WeightSpec,
                       compression: CompressionConfig | None) -> CompressionConfig | None:
    """What compresses a weight of a layer of `kind`: the decoder layers' matrices but a MoE's router (a rounded
    one would send tokens to other experts; it is tiny). Vectors, the embedding
    and the head stay in the compute dtype, as GPTQ, AWQ and llama.cpp keep them (FlexGen rounds them too):
    on SmolLM2-135M, 4-bit groups of 64 raised perplexity by 41% with them rounded, 28% without; a Q4_1 file's
    own groups (STORED_GROUPS) by 5% with them rounded, 0% without. They live in compute memory, a small share
    of a large model's bytes (OPT-175B: 1.4% in fp16). On a CPU the embedding and head go to 8 bits
    (rounded_to_8_bits)."""
    return compression if compressed_matrix(kind, spec) else None


EIGHT_BIT = ("tokens", "lm_head")  # the embedding and head: in 8 bits where weights are compressed on a CPU


def rounded_to_8_bits(spec: WeightSpec, compression: CompressionConfig | None, cpu: bool) -> bool:
    """Whether a weight's values are its 8-bit form's (int8_weight.py): the embedding and the head when weights
    are compressed and a CPU (not across a link) computes, whatever the batch, so that a prompt's text does not
    depend on how many rows run beside it; stored in 8 bits where in_8_bits, else those values in the compute
    dtype (a GGUF's Q8_0 ones are the file's)."""
    return compression is not None and cpu and spec.name in EIGHT_BIT and int8_fits(spec.shape)


def in_8_bits(spec: WeightSpec, compression: CompressionConfig | None, cpu_rows: int, dtype: torch.dtype) -> bool:
    """Whether a weight is stored in 8 bits: rounded_to_8_bits where a CPU computes decode steps of `cpu_rows`
    rows (the policy's GPU batch; 0: not a CPU) faster by the 8-bit kernel than with the head in the compute
    `dtype` (int8_weight.head_wins: a step reads the head whole, a 128,256-word head is half a 1B model's 4-bit
    step; at more rows the products compute, and the head read dense wins)."""
    return rounded_to_8_bits(spec, compression, cpu_rows > 0) and head_wins(dtype, cpu_rows, *spec.shape)


def weight_nbytes(spec: WeightSpec, kind: str, dtype: torch.dtype, compression: CompressionConfig | None,
                  cpu_rows: int) -> int:
    """Bytes of a weight of a layer of `kind` as placed (cpu_rows: in_8_bits)."""
    if in_8_bits(spec, compression, cpu_rows, dtype):
        return int8_nbytes(spec.shape)
    return stored_nbytes(spec.shape, dtype, matrix_compression(kind, spec, compression))


@functools.lru_cache(maxsize=4096)  # a policy search asks for the same few shapes millions of times
def stored_nbytes(shape: tuple[int, ...], dtype: torch.dtype, compression: CompressionConfig | None) -> int:
    """Bytes of a weight as stored: 4-bit codes for compressed matrices."""
    if compression is not None and len(shape) >= 2:
        return compressed_nbytes(shape, compression)
    return torch.Size(shape).numel() * dtype.itemsize


class StoredWeight:
    """A weight in its home tier: a tensor in compute memory or host RAM, 4-bit codes, or bytes at `offset`
    in its layer's offload file (`mapped`: a CPU computes on the file's pages in place)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, tier: str,
                 data: torch.Tensor | QuantizedTensor | DiskFile, nbytes: int,
                 compression: CompressionConfig | None = None, resident: bool = False, offset: int = 0,
                 int4: bool = False) -> None:
        self.shape, self.dtype, self.tier, self.data = tuple(shape), dtype, tier, data
        self.nbytes, self.compression, self.offset = nbytes, compression, offset
        self.int4 = int4  # stored for the CPU's int4 matmul kernel (int4_matmul.pack): multiplied as it is
        self.resident = resident  # usable as is on the compute device: fetched without a copy
        self.mapped: torch.Tensor | None = None  # on a CPU, disk bytes as a tensor (codes when compressed)
        self._int4_views: Int4Weight | None = None  # int4_weight() of `data` (made once; mapped pages change)

    def map(self) -> None:
        if self.compression is None:
            self.mapped = self.data.map(self.dtype, self.shape, self.offset)
        else:
            self.mapped = self.data.map(torch.uint8, (self.nbytes,), self.offset)

    def fetch(self, device: ComputeDevice, out: torch.Tensor | None, host: torch.Tensor | None,
              codes: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor on the compute device: itself when resident or mapped (uncompressed), else copied or
        decompressed into `out`. `host`: this weight's bytes as read with its layer (across the link);
        `codes`: a compute-device buffer its stored bytes are copied into before decompression."""
        if self.resident:
            return self.data
        if self.mapped is not None and self.compression is None:
            return self.mapped
        assert out is not None and out.shape == self.shape, "fetch needs a buffer of the tensor's shape"
        if self.compression is not None:
            return dequantize(self._quantized(device, host, codes), self.dtype, out=out)
        if host is not None:
            return out.copy_(host.view(self.dtype).view(out.shape), non_blocking=True)
        return out.copy_(self.data, non_blocking=True)

    @functools.cached_property
    def row_groups(self):
        """A CPU's product of this weight in FlexGen's grouping read as stored (int4_gemv_triton.row_groups_of),
        checked once; None where the kernel does not read it."""
        return row_groups_of(self.data) if isinstance(self.data, QuantizedTensor) else None

    def int4_weight(self) -> Int4Weight:
        """Views into the stored bytes, for the kernel (or for dequantizing them)."""
        if self.mapped is not None:
            return Int4Weight.from_bytes(self.mapped, self.shape, self.compression.group_size)
        if self._int4_views is None:
            self._int4_views = Int4Weight.from_bytes(self.data, self.shape, self.compression.group_size)
        return self._int4_views

    def _quantized(self, device: ComputeDevice, host: torch.Tensor | None,
                   codes: torch.Tensor | None) -> QuantizedTensor:
        """The 4-bit codes on the compute device (decompressed only there, just before use)."""
        if self.mapped is not None:
            return from_bytes(self.mapped, self.shape, self.compression)
        if isinstance(self.data, QuantizedTensor):  # in compute memory
            return self.data
        on_device = self.copy_codes(codes, host) if codes is not None else self._stored(host).to(device.device)
        return from_bytes(on_device, self.shape, self.compression)

    def copy_codes(self, codes: torch.Tensor, host: torch.Tensor | None) -> torch.Tensor:
        """The stored bytes of a compressed weight homed off compute memory, copied into `codes`."""
        return codes.copy_(self._stored(host), non_blocking=True)

    def _stored(self, host: torch.Tensor | None) -> torch.Tensor:
        return host if host is not None else self.data  # bytes in staging, or in the host arena


def place_tensor(spec: WeightSpec, tier: str, source: WeightSource, dtype: torch.dtype, device: ComputeDevice,
                 ledger: MemoryLedger, compression: CompressionConfig | None = None,
                 file: DiskFile | None = None, offset: int = 0, compressible: bool = False,
                 arena: HostArena | None = None, cpu_rows: int = 0) -> StoredWeight:
    """Read one weight from `source` into its home tier (compressing it once, here, when `compression` is set
    and it is `compressible` (compressed_matrix): for the CPU's int4 kernel where it can multiply it; the
    embedding and head in 8 bits on a CPU); a disk-homed one into `file` at `offset`; a cpu-homed one across the
    link into a view of `arena`. cpu_rows: in_8_bits."""
    if rounded_to_8_bits(spec, compression, on_cpu(device)):
        data = source.int8(spec, dtype)
        if tier == "gpu" and in_8_bits(spec, compression, cpu_rows, dtype):
            ledger.add(tier, data.nbytes)
            return StoredWeight(spec.shape, dtype, tier, data, data.nbytes, resident=True)
        source = RoundedRows(data)  # the same values on whatever tier, in the compute dtype
    rows, compression = spec.shape[0], compression if compressible else None
    nbytes = stored_nbytes(spec.shape, dtype, compression)
    int4 = compressible and not device.host_is_separate and eligible(spec.shape, compression, device.device)

    exact = source.groups(spec, compression) if compression is not None else None

    def quantized() -> QuantizedTensor:
        return exact if exact is not None else quantized_rows(spec, source, dtype, compression)

    def as_stored() -> torch.Tensor:
        if int4:
            return pack(exact) if exact is not None else packed_rows(spec, source, dtype, compression)
        return to_bytes(quantized())

    if tier == "disk":
        data = file
        if compression is not None:
            data.write(as_stored(), offset)
        else:
            row_bytes = nbytes // max(rows, 1)
            for s, rows_read in read_in_chunks(spec, source, dtype):
                data.write(rows_read.contiguous(), offset + s * row_bytes)
        resident = False
    elif tier == "cpu" and device.host_is_separate:
        view = arena.take(nbytes)
        if compression is not None:  # bytes as to_bytes lays them out: one copy across the link
            data = view.copy_(to_bytes(quantized()))
        else:
            data = filled(view.view(dtype).view(spec.shape), spec, source)
        resident = False
    else:
        where = device.device
        if int4:
            data = as_stored()
        elif compression is not None:
            data = quantized().to(where)
        elif rows <= read_chunk_rows(spec, dtype):  # one read (on a CPU in the compute dtype: the tensor itself)
            data = source.read(spec, 0, rows).to(dtype).to(where)
        else:
            data = filled(torch.empty(spec.shape, dtype=dtype, device=where), spec, source)
        # without a link, compute memory and host RAM are the same memory: both are used in place
        resident = compression is None
    weight = StoredWeight(spec.shape, dtype, tier, data, nbytes, compression, resident, offset, int4)
    if tier == "disk" and not device.host_is_separate:
        weight.map()
    taken = {"disk": page_aligned(nbytes), "cpu": padded(nbytes) if arena is not None else nbytes}
    ledger.add(tier, taken.get(tier, nbytes))
    return weight


def on_cpu(device: ComputeDevice) -> bool:
    """Whether `device` computes on a CPU with its host RAM (not across a link)."""
    return device.device.type == "cpu" and not device.host_is_separate


def place_weights(layers: list[LayerSpec], percents, source: WeightSource, dtype: torch.dtype,
                  device: ComputeDevice, disk: DiskStore, ledger: MemoryLedger, pin: bool,
                  compression: CompressionConfig | None = None, progress=None,
                  cpu_rows: int = 0) -> list[dict[str, StoredWeight]]:
    """Every layer's weights by canonical name, on the tiers `weight_tiers` gives them. Tied weights (same
    checkpoint name) are stored once. A layer's disk-homed weights are one file, each at a page-aligned
    offset: one extent to read (CUDA) or to map and prefetch (CPU). Across a link the cpu-homed ones share
    one host arena of their exact size, page-locked when `pin` (CUDA)."""
    tiers = weight_tiers(layers, percents, dtype, compression)
    arena = None
    if device.host_is_separate:
        arena = HostArena(host_arena_bytes(layers, tiers, dtype, compression), pin and device.is_cuda)
    by_hf_name: dict[str, StoredWeight] = {}
    placed = []
    for layer in layers:
        new = [spec for spec in layer.weights if spec.hf_name not in by_hf_name]
        offsets, extent = {}, 0
        for spec in new:
            if tiers[spec.hf_name] == "disk":
                offsets[spec.hf_name] = extent
                extent += page_aligned(stored_nbytes(spec.shape, dtype,
                                                     matrix_compression(layer.kind, spec, compression)))
        file = disk.create(extent, f"{layer.kind}{layer.index}") if extent else None
        for spec in new:
            by_hf_name[spec.hf_name] = place_tensor(spec, tiers[spec.hf_name], source, dtype, device, ledger,
                                                    compression, file, offsets.get(spec.hf_name, 0),
                                                    compressed_matrix(layer.kind, spec), arena, cpu_rows)
        placed.append({spec.name: by_hf_name[spec.hf_name] for spec in layer.weights})
        return_freed_memory()  # the layer's read buffers: freed heap holes would pile up as resident memory
        if progress:
            progress(len(placed), len(layers))
    return placed


def host_arena_bytes(layers: list[LayerSpec], tiers: dict[str, str], dtype: torch.dtype,
                     compression: CompressionConfig | None) -> int:
    """Bytes of the cpu-homed weights' arena: each stored weight once, at an aligned offset."""
    specs = {s.hf_name: (layer.kind, s) for layer in layers for s in layer.weights if tiers[s.hf_name] == "cpu"}
    return sum(padded(stored_nbytes(s.shape, dtype, matrix_compression(kind, s, compression)))
               for kind, s in specs.values())


def weight_bytes(layers: list[dict[str, StoredWeight]], tier: str) -> int:
    seen = {id(t): t for layer in layers for t in layer.values()}
    return sum(t.nbytes for t in seen.values() if t.tier == tier)


def planned_bytes(layers: list[LayerSpec], percents, dtype: torch.dtype,
                  compression: CompressionConfig | None = None, cpu_rows: int = 0) -> dict[str, int]:
    """Bytes per tier that placing these weights by `percents` will take (tied weights once; cpu_rows:
    in_8_bits)."""
    out = dict.fromkeys(("gpu", "cpu", "disk"), 0)
    specs = {s.hf_name: (layer.kind, s) for layer in layers for s in layer.weights}
    for hf_name, tier in weight_tiers(layers, percents, dtype, compression).items():
        kind, spec = specs[hf_name]
        nbytes = weight_nbytes(spec, kind, dtype, compression, cpu_rows)
        out[tier] += page_aligned(nbytes) if tier == "disk" else nbytes
    return out
