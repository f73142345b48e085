"""The KV cache of one block, preallocated for prompt + generation length, split over tiers by sequence.

Sequence s of the block lives on one tier (the cache percentages split the block's sequences), so a
GPU batch has up to three parts. Attention is independent per sequence, so each part is attended to
on its own and the outputs are joined by row: no part ever needs another's data.

Memory tiers hold arrays as (rows, kv_heads, max_len, D); disk files hold them position-major,
(max_len, rows, kv_heads, D), so reading a prefix or appending a token is one contiguous I/O.
A compressed cache keeps 4-bit codes, scales and minima as three such arrays, grouped along head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .compression import CompressionConfig, QuantizedTensor, compressed_nbytes, dequantize, quantize
from .devices import ComputeDevice
from .policy import split_counts
from .storage import DiskStore, MemoryLedger, Staging
from .trace import CACHE_LOAD, NULL


class Store:
    """One (rows, kv_heads, max_len, D) array of a tier: a host/device tensor, or a file. On a CPU the file
    is memory-mapped in that layout and used as the tensor (`mapped`); elsewhere it is position-major."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, tier: str, where: torch.device | str,
                 disk: DiskStore, pin: bool, mapped: bool = False) -> None:
        self.shape, self.dtype = shape, dtype
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        self.tensor = self.file = None
        self.mapped = tier == "disk" and mapped and nbytes > 0
        if tier == "disk":
            self.file = disk.create(nbytes, "kv")
            if self.mapped:
                self.tensor = self.file.map(dtype, shape)
        else:
            self.tensor = torch.zeros(shape, dtype=dtype, device=where, pin_memory=pin)
        self.nbytes = nbytes

    def read(self, dst: torch.Tensor, length: int, staging: Staging) -> None:
        """Copy positions [0, length) into dst (rows, kv_heads, >= length, D)."""
        if self.tensor is not None:
            dst[:, :, :length].copy_(self.tensor[:, :, :length], non_blocking=True)
            return
        rows, heads, _, d = self.shape
        host = staging.take(length * rows * heads * d, self.dtype)
        self.file.read_into(host)
        dst[:, :, :length].copy_(host.view(length, rows, heads, d).permute(1, 2, 0, 3), non_blocking=True)
        staging.release()

    def write(self, new: torch.Tensor, start: int) -> None:
        """Store new positions (rows, kv_heads, t, D) at [start, start + t)."""
        if self.tensor is not None:
            self.tensor[:, :, start:start + new.shape[2]].copy_(new.to(self.dtype), non_blocking=True)
            return
        rows, heads, _, d = self.shape
        new = new.to(self.dtype).permute(2, 0, 1, 3).contiguous()
        self.file.write(new, start * rows * heads * d * self.dtype.itemsize)

    def prefetch(self) -> None:
        if self.mapped:
            self.file.prefetch()

    def release(self) -> None:
        if self.mapped:
            self.file.release()


class QuantizedStore:
    """Codes, scales and minima of a group-wise quantized (rows, kv_heads, max_len, head_dim) array."""

    def __init__(self, shape, config: CompressionConfig, tier, where, disk, pin, mapped: bool = False) -> None:
        self.shape, self.config = shape, config
        probe = quantize(torch.zeros(shape[0], shape[1], 1, shape[3]), config)
        code_bytes = probe.data.numel() // (shape[0] * shape[1])
        groups = probe.scale.shape[-1]
        rows, heads, max_len, _ = shape
        self.codes = Store((rows, heads, max_len, code_bytes), torch.uint8, tier, where, disk, pin, mapped)
        self.scale = Store((rows, heads, max_len, groups), torch.float16, tier, where, disk, pin, mapped)
        self.minimum = Store((rows, heads, max_len, groups), torch.float16, tier, where, disk, pin, mapped)
        self.nbytes = self.codes.nbytes + self.scale.nbytes + self.minimum.nbytes

    def read(self, dst: torch.Tensor, length: int, staging: Staging, scratch: list[torch.Tensor]) -> None:
        """Dequantize positions [0, length) into dst; `scratch` holds one buffer per component."""
        parts = []
        for store, buf in zip((self.codes, self.scale, self.minimum), scratch, strict=True):
            if store.tensor is not None and store.tensor.device == dst.device:
                parts.append(store.tensor[:, :, :length])
            else:
                store.read(buf, length, staging)
                parts.append(buf[:, :, :length])
        rows, heads, _, d = self.shape
        q = QuantizedTensor(parts[0].reshape(-1), parts[1], parts[2], (rows, heads, length, d), self.config)
        dequantize(q, dst.dtype, out=dst[:, :, :length])

    def write(self, new: torch.Tensor, start: int) -> None:
        q = quantize(new, self.config)
        rows, heads, t, _ = new.shape
        self.codes.write(q.data.view(rows, heads, t, -1), start)
        self.scale.write(q.scale, start)
        self.minimum.write(q.minimum, start)

    def prefetch(self) -> None:
        for store in (self.codes, self.scale, self.minimum):
            store.prefetch()

    def release(self) -> None:
        for store in (self.codes, self.scale, self.minimum):
            store.release()

    def scratch_shapes(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(n, s.shape, s.dtype) for n, s in (("codes", self.codes), ("scale", self.scale),
                                                      ("min", self.minimum))]


@dataclass
class CachePart:
    tier: str
    rows: slice  # rows of the GPU batch
    k: Store | QuantizedStore
    v: Store | QuantizedStore
    on_cpu: bool  # attention over this part runs on the CPU (cpu_cache_compute), in cpu_dtype
    direct: bool  # attention can use k.tensor and v.tensor in place

    def release(self) -> None:
        """Unmap a memory-mapped disk part's pages after use (no-op for other parts)."""
        self.k.release()
        self.v.release()

    def nbytes_at(self, positions: int) -> int:
        """Stored bytes of K and V for `positions` positions of all its rows (what a load or store moves)."""
        return (self.k.nbytes + self.v.nbytes) // self.k.shape[2] * positions


@dataclass
class CacheView:
    """One part's K and V where its attention runs, for one (layer, batch)."""

    part: CachePart
    k: torch.Tensor
    v: torch.Tensor


def batch_parts(batch: int, gpu_batch_size: int, tier_rows: tuple[int, int, int]) -> list[tuple[str, slice]]:
    """The (tier, rows within the batch) parts of GPU batch `batch`, given the block's per-tier counts."""
    lo, hi = batch * gpu_batch_size, (batch + 1) * gpu_batch_size
    parts, start = [], 0
    for tier, count in zip(("gpu", "cpu", "disk"), tier_rows, strict=True):
        a, b = max(lo, start), min(hi, start + count)
        if b > a:
            parts.append((tier, slice(a - lo, b - lo)))
        start += count
    return parts


class KVCache:
    def __init__(self, num_layers: int, num_batches: int, gpu_batch_size: int, max_len: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, percents, device: ComputeDevice, disk: DiskStore,
                 ledger: MemoryLedger, compression: CompressionConfig | None = None,
                 cpu_attention_dtype: torch.dtype | None = None) -> None:
        """cpu_attention_dtype: when set, attention over cpu and disk parts runs on the CPU in that dtype."""
        self.max_len, self.dtype, self.device = max_len, dtype, device
        self.kv_heads, self.head_dim, self.compression = kv_heads, head_dim, compression
        self.cpu_dtype = cpu_attention_dtype
        self.tier_rows = split_counts(num_batches * gpu_batch_size, percents)
        self.parts = [[[self._alloc(tier, rows, disk, ledger)
                        for tier, rows in batch_parts(b, gpu_batch_size, self.tier_rows)]
                       for b in range(num_batches)] for _ in range(num_layers)]  # [layer][batch] -> parts

    def _alloc(self, tier: str, rows: slice, disk: DiskStore, ledger: MemoryLedger) -> CachePart:
        shape = (rows.stop - rows.start, self.kv_heads, self.max_len, self.head_dim)
        on_cpu = self.cpu_dtype is not None and tier != "gpu"
        in_compute_memory = tier == "gpu" or not self.device.is_cuda
        where = self.device.device if in_compute_memory else "cpu"
        pin = self.device.is_cuda and not in_compute_memory
        dtype = self.cpu_dtype if on_cpu else self.dtype
        mapped = not self.device.is_cuda  # a CPU computes on a disk part's mapped pages
        if self.compression is not None:
            k, v = (QuantizedStore(shape, self.compression, tier, where, disk, pin, mapped) for _ in range(2))
        else:
            k, v = (Store(shape, dtype, tier, where, disk, pin, mapped) for _ in range(2))
        direct = self.compression is None and (tier != "disk" or mapped) and (in_compute_memory or on_cpu)
        for store in (k, v):  # off the ledger (and its files off the disk) when a longer cache replaces this one
            ledger.track(store, tier, store.nbytes)
        return CachePart(tier, rows, k, v, on_cpu, direct)

    def load(self, layer: int, batch: int, length: int, slots: CacheSlots, parity: int,
             trace=NULL) -> list[CacheView]:
        """K and V of every part of (layer, batch) where its attention runs, positions [0, length) filled.
        `trace` gets a span per part read, copied or decompressed (bytes: its stored K and V up to length)."""
        views = []
        for i, part in enumerate(self.parts[layer][batch]):
            if part.direct and not (part.k.mapped or part.v.mapped):  # used in place: nothing moves
                views.append(CacheView(part, part.k.tensor, part.v.tensor))
                continue
            stream = None if part.on_cpu else "copy:cache"  # CPU attention's parts are read on the host
            with trace.span(CACHE_LOAD[part.tier], part.nbytes_at(length), stream=stream):
                views.append(self._load_part(i, part, length, slots, parity))
        return views

    def _load_part(self, i: int, part: CachePart, length: int, slots: CacheSlots, parity: int) -> CacheView:
        """One part: a mapped disk part's pages faulted in; any other read, copied or decompressed into slots."""
        shape = (part.rows.stop - part.rows.start, self.kv_heads, self.max_len, self.head_dim)
        if part.direct:
            for store, half in zip((part.k, part.v), "kv", strict=True):
                if store.mapped:  # its pages are in this process until released: counted like a slot
                    slots.window((i, parity, half, "values", shape), store.nbytes)
                    store.prefetch()
            return CacheView(part, part.k.tensor, part.v.tensor)
        where = "cpu" if part.on_cpu else self.device.device
        tier = "cpu" if part.on_cpu and self.device.is_cuda else "gpu"
        dtype = self.cpu_dtype if part.on_cpu else self.dtype
        bufs = [slots.get((i, parity, half, "values", shape), shape, dtype, where, tier) for half in "kv"]
        for store, buf, half in zip((part.k, part.v), bufs, "kv", strict=True):
            if length and isinstance(store, QuantizedStore):
                scratch = [slots.get((i, parity, half, name, shape), shape, dt, where, tier)
                           for name, shape, dt in store.scratch_shapes()]
                store.read(buf, length, slots.staging, scratch)
            elif length:
                store.read(buf, length, slots.staging)
            store.release()
        return CacheView(part, *bufs)

    def store(self, part: CachePart, k_new: torch.Tensor, v_new: torch.Tensor, start: int) -> None:
        """Write new positions (rows, kv_heads, t, head_dim) of one part to its home."""
        part.k.write(k_new, start)
        part.v.write(v_new, start)
        part.release()

    def bytes_per_tier(self) -> dict[str, int]:
        out = dict.fromkeys(("gpu", "cpu", "disk"), 0)
        for per_batch in self.parts:
            for parts in per_batch:
                for p in parts:
                    out[p.tier] += p.k.nbytes + p.v.nbytes
        return out


def cache_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                          compression: CompressionConfig | None) -> int:
    """Bytes of K and V for one token of one sequence over all layers."""
    if compression is None:
        return 2 * num_layers * kv_heads * head_dim * dtype.itemsize
    return 2 * num_layers * kv_heads * compressed_nbytes((1, head_dim), compression)


class CacheSlots:
    """Buffers where attention runs, for cache parts not usable in place; alternate by parity for prefetch."""

    def __init__(self, ledger: MemoryLedger, staging: Staging) -> None:
        self.ledger, self.staging = ledger, staging
        self.buffers: dict[tuple, torch.Tensor] = {}

    def window(self, key: tuple, nbytes: int) -> None:
        """Count a mapped disk part's pages, in flight while it is used, as the slot `key` would be."""
        if key not in self.buffers:
            self.buffers[key] = marker = torch.empty(0)
            self.ledger.track(marker, "gpu", nbytes)

    def get(self, key: tuple, shape: tuple[int, ...], dtype: torch.dtype, where, tier: str) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None:
            buf = torch.empty(shape, dtype=dtype, device=where)
            self.buffers[key] = buf
            self.ledger.track(buf, tier, buf.numel() * buf.element_size())  # until the buffers are cleared
        return buf
