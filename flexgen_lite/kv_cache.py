"""The KV cache of one block, preallocated for prompt + generation length, split over tiers by sequence.

Sequence s of the block lives on one tier (the cache percentages split the block's sequences), so a
GPU batch has up to three parts. Attention is independent per sequence, so each part is attended to
on its own and the outputs are joined by row: no part ever needs another's data.

Memory tiers hold K and V as (rows, kv_heads, max_len, head_dim); disk files hold them position-major,
(max_len, rows, kv_heads, head_dim), so reading a prefix or appending a token is one contiguous I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .devices import ComputeDevice
from .policy import split_counts
from .storage import DiskFile, DiskStore, MemoryLedger, Staging


@dataclass
class CachePart:
    tier: str
    rows: slice  # rows of the GPU batch
    k: torch.Tensor | DiskFile
    v: torch.Tensor | DiskFile
    direct: bool  # compute can use k and v in place (they are in compute-device memory)


@dataclass
class CacheView:
    """One part's K and V on the compute device for one (layer, batch), and where to store new tokens."""

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
    def __init__(self, num_layers: int, num_batches: int, gpu_batch_size: int, max_len: int,
                 kv_heads: int, head_dim: int, dtype: torch.dtype, percents, device: ComputeDevice,
                 disk: DiskStore, ledger: MemoryLedger, pin: bool) -> None:
        self.max_len, self.dtype, self.device = max_len, dtype, device
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.tier_rows = split_counts(num_batches * gpu_batch_size, percents)
        self.parts: list[list[list[CachePart]]] = []  # [layer][batch] -> parts
        for _layer in range(num_layers):
            per_batch = []
            for b in range(num_batches):
                per_batch.append([self._alloc(tier, rows, disk, ledger, pin)
                                  for tier, rows in batch_parts(b, gpu_batch_size, self.tier_rows)])
            self.parts.append(per_batch)

    def _alloc(self, tier: str, rows: slice, disk: DiskStore, ledger: MemoryLedger, pin: bool) -> CachePart:
        n = rows.stop - rows.start
        shape = (n, self.kv_heads, self.max_len, self.head_dim)
        nbytes = torch.Size(shape).numel() * self.dtype.itemsize
        ledger.add(tier, 2 * nbytes)
        if tier == "disk":
            return CachePart(tier, rows, disk.create(nbytes, "k"), disk.create(nbytes, "v"), False)
        on_device = tier == "gpu" or not self.device.is_cuda
        where = self.device.device if on_device else "cpu"
        pinned = pin and not on_device
        k = torch.zeros(shape, dtype=self.dtype, device=where, pin_memory=pinned)
        v = torch.zeros(shape, dtype=self.dtype, device=where, pin_memory=pinned)
        return CachePart(tier, rows, k, v, on_device)

    def load(self, layer: int, batch: int, length: int, slots: CacheSlots, parity: int) -> list[CacheView]:
        """K and V of every part of (layer, batch) on the compute device, positions [0, length) filled."""
        views = []
        for i, part in enumerate(self.parts[layer][batch]):
            if part.direct:
                views.append(CacheView(part, part.k, part.v))
                continue
            shape = (part.rows.stop - part.rows.start, self.kv_heads, self.max_len, self.head_dim)
            k_buf, v_buf = slots.get((i, parity, shape))
            if length:
                for src, dst in ((part.k, k_buf), (part.v, v_buf)):
                    self._read(src, dst, length, slots.staging)
            views.append(CacheView(part, k_buf, v_buf))
        return views

    def _read(self, src, dst: torch.Tensor, length: int, staging: Staging) -> None:
        if isinstance(src, DiskFile):
            rows = dst.shape[0]
            host = staging.take(length * rows * self.kv_heads * self.head_dim, self.dtype)
            src.read_into(host)
            dst[:, :, :length].copy_(host.view(length, rows, self.kv_heads, self.head_dim).permute(1, 2, 0, 3),
                                     non_blocking=True)
            staging.release()
        else:
            dst[:, :, :length].copy_(src[:, :, :length], non_blocking=True)

    def store(self, view: CacheView, k_new: torch.Tensor, v_new: torch.Tensor, start: int) -> None:
        """Write new tokens (rows, kv_heads, t, hd), already on the host for disk parts, to the part's home."""
        part = view.part
        t = k_new.shape[2]
        for home, new in ((part.k, k_new), (part.v, v_new)):
            if isinstance(home, DiskFile):
                token_bytes = new.shape[0] * self.kv_heads * self.head_dim * self.dtype.itemsize
                home.write(new.permute(2, 0, 1, 3).contiguous(), start * token_bytes)
            else:
                home[:, :, start:start + t].copy_(new, non_blocking=True)

    def bytes_per_tier(self) -> dict[str, int]:
        out = dict.fromkeys(("gpu", "cpu", "disk"), 0)
        for per_batch in self.parts:
            for parts in per_batch:
                for p in parts:
                    n = (p.rows.stop - p.rows.start) * self.kv_heads * self.max_len * self.head_dim
                    out[p.tier] += 2 * n * self.dtype.itemsize
        return out


class CacheSlots:
    """Compute-device buffers for cache parts that do not live there; alternate by parity for prefetch."""

    def __init__(self, device: ComputeDevice, dtype: torch.dtype, ledger: MemoryLedger, staging: Staging) -> None:
        self.device, self.dtype, self.ledger, self.staging = device, dtype, ledger, staging
        self.buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers for key (part index, parity, shape)."""
        bufs = self.buffers.get(key)
        if bufs is None:
            shape = key[-1]
            bufs = tuple(torch.empty(shape, dtype=self.dtype, device=self.device.device) for _ in range(2))
            self.buffers[key] = bufs
            self.ledger.add("gpu", 2 * bufs[0].numel() * bufs[0].element_size())
        return bufs
