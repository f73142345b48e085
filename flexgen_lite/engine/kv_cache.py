"""The KV cache of one block, preallocated for prompt + generation length, split over tiers by sequence.

Sequence s of the block lives on one tier (the cache percentages split the block's sequences), so a
GPU batch has up to three parts. Attention is independent per sequence, so each part is attended to
on its own and the outputs are joined by row: no part ever needs another's data. A part's K and V are each a
Store (or a QuantizedStore), laid out for where they live (cache_store.py).

A layer with a sliding window shorter than max_len keeps only its window: a ring of `window` positions, position p
at p % window (`ring_placed`). Keys are stored rotated, and attention is a sum over keys in any order, so decode
attends over the whole ring under a mask of the slots' positions (`ring_positions`) that hides left padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.compression import CompressionConfig, compressed_nbytes
from ..system.devices import ComputeDevice
from ..system.host_memory import HostArena, padded
from .cache_store import QuantizedStore, Store, component_specs
from .policy import host_attended_rows, split_counts
from .shared_prefix import PrefixRead
from .storage import DiskStore, MemoryLedger, Staging
from .trace import CACHE_LOAD, NULL


def ring_placed(new: torch.Tensor, start: int, capacity: int) -> tuple[torch.Tensor, int]:
    """New positions (rows, kv_heads, t, D) from `start`, and where they go in a cache of `capacity` positions kept
    as a ring: a step's one position at start % capacity; a prompt's last `capacity` positions turned so that
    position p lands at p % capacity."""
    t = new.shape[2]
    if start + t <= capacity:
        return new, start
    if t == 1:
        return new, start % capacity
    if start:
        raise ValueError(f"positions [{start}, {start + t}) cannot be written into a ring of {capacity}")
    return new[:, :, -capacity:].roll(t % capacity, dims=2), 0


def ring_positions(written: int, capacity: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The position each slot of a ring of `capacity` holds once position `written` is in it (negative: none yet),
    made on `device` (no copy from the host in a GPU's step)."""
    slots = torch.arange(capacity, device=device)
    return written - (written - slots) % capacity


@dataclass
class CachePart:
    tier: str
    rows: slice  # rows of the GPU batch
    k: Store | QuantizedStore
    v: Store | QuantizedStore
    on_cpu: bool  # attention over this part runs on the CPU (cpu_cache_compute), in cpu_dtype
    direct: bool  # attention uses it where it is (a compressed part: its codes, by quantized_attention)
    dtype: torch.dtype | None = None  # the dtype attention over it runs in

    @property
    def quantized(self) -> bool:
        return isinstance(self.k, QuantizedStore)

    def in_place(self) -> CacheView:
        """The part where it is stored: its K and V, or for a compressed part its QuantizedStores."""
        if self.quantized:
            return CacheView(self, self.k, self.v)
        return CacheView(self, self.k.tensor, self.v.tensor)

    def release(self) -> None:
        """Unmap a memory-mapped disk part's pages after use (no-op for other parts)."""
        self.k.release()
        self.v.release()

    @property
    def capacity(self) -> int:
        """Positions it keeps: max_len, or a windowed layer's window (a ring)."""
        return self.k.shape[2]

    def placed(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """New positions' k, v (rows, kv_heads, t, D) from `start` as this part keeps them, and the slot they
        start at (ring_placed)."""
        (k, slot), (v, _) = ring_placed(k, start, self.capacity), ring_placed(v, start, self.capacity)
        return k, v, slot

    def nbytes_at(self, positions: int) -> int:
        """Stored bytes of K and V for `positions` positions of all its rows (what a load or store moves)."""
        return (self.k.nbytes + self.v.nbytes) // self.capacity * positions


@dataclass
class CacheView:
    """One part's K and V where its attention runs, for one (layer, batch): tensors, or a compressed part's
    QuantizedStores attended as stored (direct)."""

    part: CachePart
    k: torch.Tensor | QuantizedStore
    v: torch.Tensor | QuantizedStore


def batch_parts(batch: int, gpu_batch_size: int, tier_rows: tuple[int, int, int],
                host_attended: int | None = None) -> list[tuple[str, slice, bool]]:
    """The (tier, rows within the batch, attended on the CPU) parts of GPU batch `batch`, given the block's
    per-tier counts. host_attended (host_attended_rows): of the cpu tier's sequences, the first so many are
    attended on the CPU, the rest across the link; with it, disk parts are attended on the CPU; None: none is."""
    lo, hi = batch * gpu_batch_size, (batch + 1) * gpu_batch_size
    gpu, cpu, disk = tier_rows
    attended = host_attended or 0
    segments = (("gpu", gpu, False), ("cpu", attended, True), ("cpu", cpu - attended, False),
                ("disk", disk, host_attended is not None))
    parts, start = [], 0
    for tier, count, attended in segments:
        a, b = max(lo, start), min(hi, start + count)
        if b > a:
            parts.append((tier, slice(a - lo, b - lo), attended))
        start += count
    return parts


class KVCache:
    def __init__(self, num_layers: int, num_batches: int, gpu_batch_size: int, max_len: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, percents, device: ComputeDevice, disk: DiskStore,
                 ledger: MemoryLedger, compression: CompressionConfig | None = None,
                 cpu_attention_dtype: torch.dtype | None = None, positions: list[int] | None = None,
                 attend_codes: bool = False, cpu_attention_percent: float = 100.0, device_codes: bool = False) -> None:
        """cpu_attention_dtype: when set, attention over disk parts and cpu_attention_percent of the cpu tier's
        runs on the CPU in that dtype (the rest of the cpu tier's across the link, host_attended_rows).
        positions: per layer the positions it keeps (ModelConfig.cached_positions; default max_len each).
        attend_codes: compressed parts attended on the CPU where they live are read as stored (codes_attended);
        device_codes: so are those in compute memory, by Triton's kernel (device_codes_attended).
        Across a link the cpu tier's parts share one host arena of their exact size (page-locked with CUDA)."""
        self.max_len, self.dtype, self.device = max_len, dtype, device
        self.kv_heads, self.head_dim, self.compression = kv_heads, head_dim, compression
        self.cpu_dtype, self.attend_codes, self.device_codes = cpu_attention_dtype, attend_codes, device_codes
        self.tier_rows = split_counts(num_batches * gpu_batch_size, percents)
        self.host_attended = host_attended_rows(self.tier_rows[1], None if cpu_attention_dtype is None
                                                else cpu_attention_percent)
        self.positions = positions or [max_len] * num_layers
        layout = [[batch_parts(b, gpu_batch_size, self.tier_rows, self.host_attended)
                   for b in range(num_batches)]] * num_layers
        self.arena = None
        if device.host_is_separate:
            host = [(rows, n, on_cpu) for per_batch, n in zip(layout, self.positions, strict=True)
                    for parts in per_batch for tier, rows, on_cpu in parts if tier == "cpu"]
            self.arena = HostArena(sum(self._host_bytes(*part) for part in host), device.is_cuda)
            ledger.track(self.arena.buffer, "cpu", self.arena.nbytes)  # until a longer cache replaces it
        self.parts = [[[self._alloc(*part, n, disk, ledger) for part in parts] for parts in per_batch]
                      for per_batch, n in zip(layout, self.positions, strict=True)]  # [layer][batch] -> parts

    def _home(self, tier: str) -> str:
        if tier == "gpu" or (tier == "cpu" and not self.device.host_is_separate):
            return "device"
        if tier == "cpu":
            return "host"
        return "file" if self.device.host_is_separate else "mapped"  # a CPU computes on the mapped pages

    def _shape_dtype(self, rows: slice, positions: int, on_cpu: bool) -> tuple[tuple[int, ...], torch.dtype]:
        shape = (rows.stop - rows.start, self.kv_heads, positions, self.head_dim)
        return shape, self.cpu_dtype if on_cpu else self.dtype

    def _host_bytes(self, rows: slice, positions: int, on_cpu: bool) -> int:
        """Arena bytes of a cpu-tier part's K and V."""
        shape, dtype = self._shape_dtype(rows, positions, on_cpu)
        return 2 * sum(padded(torch.Size(s).numel() * dt.itemsize)
                       for s, dt in component_specs(shape, dtype, self.compression))

    def _alloc(self, tier: str, rows: slice, on_cpu: bool, positions: int, disk: DiskStore,
               ledger: MemoryLedger) -> CachePart:
        shape, dtype = self._shape_dtype(rows, positions, on_cpu)
        home = self._home(tier)
        args = (home, self.device.device, disk, self.arena)
        if self.compression is not None:
            k, v = (QuantizedStore(shape, self.compression, *args) for _ in range(2))
        else:
            k, v = (Store(shape, dtype, *args) for _ in range(2))
        # used in place by attention: in compute memory, or in host RAM by CPU attention; compressed, where a CPU
        # attends it (CPU attention, or a CPU computes) and it is not in a file, or in a GPU's memory (Triton's)
        if self.compression is None:
            direct = home != "file" and (home != "host" or on_cpu)
        else:
            direct = home != "file" and ((self.attend_codes and (on_cpu or not self.device.host_is_separate))
                                         or (self.device_codes and home == "device"))
        if home != "host":  # off the ledger (and its files off the disk) when a longer cache replaces this one
            for store in (k, v):
                ledger.track(store, tier, store.nbytes)
        return CachePart(tier, rows, k, v, on_cpu, direct, dtype)

    def load(self, layer: int, batch: int, length: int, slots: CacheSlots, parity: int,
             trace=NULL, prefixes: dict[int, PrefixRead] | None = None) -> list[CacheView]:
        """K and V of every part of (layer, batch) where its attention runs, positions [0, length) filled (a ring:
        its slots). `trace` gets a span per part read, copied or decompressed (bytes: its stored K and V up to
        length). prefixes: by part index, a shared prefix of its rows (`prefix_reads`), read so until a ring wraps."""
        views = []
        for i, part in enumerate(self.parts[layer][batch]):
            if part.direct and not (part.k.mapped or part.v.mapped):  # used in place: nothing moves
                views.append(part.in_place())
                continue
            prefix = (prefixes or {}).get(i) if length <= part.capacity else None
            filled = min(length, part.capacity)
            nbytes = part.nbytes_at(filled) * (1 if prefix is None else prefix.moved(filled))
            stream = None if part.on_cpu else "copy:cache"  # CPU attention's parts are read on the host
            with trace.span(CACHE_LOAD[part.tier], int(nbytes), stream=stream):
                views.append(self._load_part(i, part, filled, slots, parity, prefix))
        return views

    def prefix_reads(self, batch: int, pad: torch.Tensor, columns: int) -> dict[int, PrefixRead]:
        """The parts of `batch` (rows left-padded by `pad`, on the host) read from host RAM across the link, whose
        rows share a prompt prefix of `columns` columns: each its PrefixRead (the same for every layer)."""
        out = {}
        for i, part in enumerate(self.parts[0][batch]):
            if not part.direct and not part.on_cpu and part.tier == "cpu" and self.device.host_is_separate:
                prefix = PrefixRead.of_rows(pad[part.rows], columns, self.device.device)
                if prefix is not None:
                    out[i] = prefix
        return out

    def _load_part(self, i: int, part: CachePart, length: int, slots: CacheSlots, parity: int,
                   prefix: PrefixRead | None = None) -> CacheView:
        """One part: a mapped disk part's pages faulted in; any other read, copied or decompressed into slots.
        A part across the link is copied position-major (contiguous) and attended through a strided view."""
        if part.direct:
            for store in self._slots(i, part, parity, slots):
                store.prefetch()
            return part.in_place()
        views = []
        for store, (buf, scratch) in zip((part.k, part.v), self._slots(i, part, parity, slots), strict=True):
            if isinstance(store, QuantizedStore):
                view = buf
                if length:
                    store.read(buf, length, slots.staging, scratch, not part.on_cpu, prefix)
            else:
                view = buf.permute(1, 2, 0, 3)
                if length:
                    store.read(buf, length, slots.staging, not part.on_cpu, prefix)
            store.release()
            views.append(view)
        return CacheView(part, *views)

    def _slots(self, i: int, part: CachePart, parity: int, slots: CacheSlots) -> list:
        """The slots part `i` of a batch uses at `parity`: per half, (buffer, scratch) for a part read into
        them; for a direct part its mapped stores (their pages counted like slots while in the process). Slots are
        max_len long: a ring's part uses their first `capacity` positions."""
        shape = (part.rows.stop - part.rows.start, self.kv_heads, self.max_len, self.head_dim)
        if part.direct:
            mapped = []
            for store, half in zip((part.k, part.v), "kv", strict=True):
                if store.mapped:
                    slots.window((i, parity, half, "values", shape), store.nbytes // part.capacity * self.max_len)
                    mapped.append(store)
            return mapped
        where = torch.device("cpu") if part.on_cpu else self.device.device
        tier = "cpu" if part.on_cpu and self.device.host_is_separate else "gpu"
        dtype = self.cpu_dtype if part.on_cpu else self.dtype
        out = []
        for store, half in zip((part.k, part.v), "kv", strict=True):
            # tier, where and dtype in the key: a part attended on the CPU and one on the device, of the same index
            # and rows (in different batches), need buffers of their own
            key = (i, parity, half, tier, str(where), str(dtype))
            if isinstance(store, QuantizedStore):
                buf = slots.get((*key, "values", shape), shape, dtype, where, tier)
                scratch = [slots.get((*key, name, s), s, dt, where, tier) if c.position_major else None
                           for c, (name, s, dt) in zip(store.stores, store.scratch_shapes(self.max_len), strict=True)]
                out.append((buf, scratch))
            else:
                s = (self.max_len, *store.position_shape[1:])
                out.append((slots.get((*key, "positions", s), s, dtype, where, tier), None))
        return out

    def reserve_slots(self, slots: CacheSlots) -> None:
        """Take every slot decode may use now (loads alternate two parities, and over a run, with a shorter
        last block or batches that finish early, a part may meet either): memory known from the start."""
        for per_batch in self.parts[:1]:  # every layer has the same parts
            for parts in per_batch:
                for i, part in enumerate(parts):
                    if not part.direct or part.k.mapped or part.v.mapped:
                        for parity in (0, 1):
                            self._slots(i, part, parity, slots)

    def store(self, part: CachePart, k_new: torch.Tensor, v_new: torch.Tensor, start: int) -> None:
        """Write new positions (rows, kv_heads, t, head_dim) of one part to its home."""
        part.k.write(k_new, start)
        part.v.write(v_new, start)
        part.release()

    def stage(self, part: CachePart, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple:
        """New positions laid out as the part stores them, on their device (for write_staged elsewhere)."""
        return part.k.stage(k_new), part.v.stage(v_new)

    def write_staged(self, part: CachePart, staged: tuple, start: int, staging: Staging) -> None:
        part.k.write_staged(staged[0], start, staging)
        part.v.write_staged(staged[1], start, staging)

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
