"""How one K or V array of a cache part is stored where it lives, and moved.

What attention uses in place (compute memory, a CPU's mapped files) holds arrays as (rows, kv_heads,
positions, D). What crosses the link (host RAM with a GPU, disk files) holds them position-major,
(positions, rows, kv_heads, D), so reading a prefix or appending a token is one contiguous copy or I/O.
A compressed cache keeps 4-bit codes, scales and minima as three such arrays, grouped along head_dim.
"""

from __future__ import annotations

import functools

import torch

from ..kernels.compression import CompressionConfig, dequantize_prefix, quantize
from ..system.host_memory import HostArena
from .shared_prefix import PrefixRead
from .storage import DiskStore, Staging


def component_specs(shape: tuple[int, ...], dtype: torch.dtype,
                    compression: CompressionConfig | None) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The (rows, kv_heads, positions, last) arrays one K or V is stored as: its values, or 4-bit codes,
    scales and minima grouped along head_dim."""
    if compression is None:
        return [(shape, dtype)]
    rows, heads, positions, d = shape
    code_bytes, groups = _row_layout(d, compression)
    codes, stats = (rows, heads, positions, code_bytes), (rows, heads, positions, groups)
    return [(codes, torch.uint8), (stats, torch.float16), (stats, torch.float16)]


@functools.cache
def _row_layout(d: int, compression: CompressionConfig) -> tuple[int, int]:
    """Bytes of codes and groups of one row of `d` values, as quantize lays them out (asked of it once)."""
    probe = quantize(torch.zeros(1, 1, 1, d), compression)
    return probe.data.numel(), probe.scale.shape[-1]


class Store:
    """One (rows, kv_heads, positions, D) array of K or V (or of their 4-bit form). Where attention runs on it
    in place (compute memory, a CPU's memory-mapped file) it is stored in that layout. Across the link
    (host RAM with a GPU, files) it is position-major, (positions, rows, kv_heads, D), so a prefix or new
    positions are one contiguous range: one DMA from page-locked memory, or one file I/O. `tensor` is then
    a (rows, kv_heads, positions, D) view of it."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, home: str, where: torch.device | str = "cpu",
                 disk: DiskStore | None = None, arena: HostArena | None = None) -> None:
        """home: "device" (a tensor on `where`), "host" (a view of `arena`), "mapped" or "file" (on disk)."""
        self.shape, self.dtype = shape, dtype
        self.nbytes = torch.Size(shape).numel() * dtype.itemsize
        rows, heads, positions, d = shape
        self.position_shape = (positions, rows, heads, d)
        self.position_bytes = rows * heads * d * dtype.itemsize
        self.tensor = self.positions = self.file = None
        if home == "device":
            self.tensor = torch.zeros(shape, dtype=dtype, device=where)
        elif home == "host":
            self.positions = arena.tensor(self.position_shape, dtype)
            self.tensor = self.positions.permute(1, 2, 0, 3)
        else:
            self.file = disk.create(self.nbytes, "kv")
            if home == "mapped":
                self.tensor = self.file.map(dtype, shape)
        self.mapped = home == "mapped"
        self.position_major = home in ("host", "file")

    def read(self, dst: torch.Tensor, length: int, staging: Staging | None, to_device: bool,
             prefix: PrefixRead | None = None) -> None:
        """Copy positions [0, length) into `dst`, laid out as `position_shape`: one contiguous copy from host
        RAM, or a file read (`to_device`: into staging, then one copy to the compute device). From host RAM
        with a shared `prefix`, its positions are copied for one row and spread to the others on the device."""
        assert self.position_major, "read() is for stores across the link; the others are used in place"
        if self.positions is not None and prefix is not None and length > prefix.columns:
            c = prefix.columns
            dst[c:length].copy_(self.positions[c:length], non_blocking=True)
            one = self.positions[:c, prefix.source].to(dst.device, non_blocking=True)  # (c, kv_heads, D)
            torch.index_select(one, 0, prefix.index.view(-1), out=dst[:c].view(-1, *dst.shape[2:]))
        elif self.positions is not None:
            dst[:length].copy_(self.positions[:length], non_blocking=True)
        elif not to_device:
            self.file.read_into(dst[:length])
        else:
            buf = staging.take("cache", self.nbytes)  # its whole size: a prefix that grows each step fits
            host = buf.data[:length * self.position_bytes]
            self.file.read_into(host)
            dst[:length].copy_(host.view(self.dtype).view(dst[:length].shape), non_blocking=True)
            staging.release(buf, dst.device)

    def stage(self, new: torch.Tensor) -> torch.Tensor:
        """New positions (rows, kv_heads, t, D) as they are stored, on their device."""
        new = new.to(self.dtype)
        return new.permute(2, 0, 1, 3).contiguous() if self.position_major else new

    def write(self, new: torch.Tensor, start: int) -> None:
        """Store new positions (rows, kv_heads, t, D) at [start, start + t)."""
        self.write_staged(self.stage(new), start, None)

    def write_staged(self, staged: torch.Tensor, start: int, staging: Staging | None) -> None:
        """Store what stage() made at [start, start + t): into host RAM, one contiguous copy (from a GPU:
        asynchronous, into page-locked memory); into a file (from a GPU through staging, which waits here
        for the copy: run it on an I/O thread)."""
        if not self.position_major:
            self.tensor[:, :, start:start + staged.shape[2]].copy_(staged, non_blocking=True)
        elif self.positions is not None:
            self.positions[start:start + staged.shape[0]].copy_(staged, non_blocking=True)
        elif staging is None:
            self.file.write(staged, start * self.position_bytes)
        else:
            staging.write_out("store", self.file, staged, start * self.position_bytes)

    def prefetch(self) -> None:
        if self.mapped:
            self.file.prefetch()

    def release(self) -> None:
        if self.mapped:
            self.file.release()


class QuantizedStore:
    """Codes, scales and minima of a group-wise quantized (rows, kv_heads, positions, head_dim) array."""

    def __init__(self, shape, config: CompressionConfig, home: str, where="cpu", disk=None, arena=None) -> None:
        self.shape, self.config = shape, config
        self.codes, self.scale, self.minimum = self.stores = [
            Store(s, dt, home, where, disk, arena) for s, dt in component_specs(shape, torch.float16, config)]
        self.nbytes = sum(s.nbytes for s in self.stores)
        self.mapped = home == "mapped"

    @property
    def device(self) -> torch.device:
        return self.codes.tensor.device if self.codes.tensor is not None else torch.device("cpu")

    def arrays(self, length: int) -> tuple[torch.Tensor, ...]:
        """Codes, scales and minima of positions [0, length), (rows, kv_heads, length, last) views where they
        are stored (quantized_attention reads them so)."""
        return tuple(store.tensor[:, :, :length] for store in self.stores)

    def read(self, dst: torch.Tensor, length: int, staging: Staging | None, scratch: list[torch.Tensor],
             to_device: bool, prefix: PrefixRead | None = None) -> None:
        """Dequantize positions [0, length) into dst; `scratch` holds one buffer per component stored
        across the link (in its position_shape)."""
        parts = []
        for store, buf in zip(self.stores, scratch, strict=True):
            if store.position_major:
                store.read(buf, length, staging, to_device, prefix)
                parts.append(buf[:length].permute(1, 2, 0, 3))
            else:
                parts.append(store.tensor[:, :, :length])
        dequantize_prefix(*parts, dst[:, :, :length], self.config)

    def stage(self, new: torch.Tensor) -> list[torch.Tensor]:
        q = quantize(new, self.config)
        rows, heads, t, _ = new.shape
        parts = (q.data.view(rows, heads, t, -1), q.scale, q.minimum)
        return [store.stage(x) for store, x in zip(self.stores, parts, strict=True)]

    def write(self, new: torch.Tensor, start: int) -> None:
        self.write_staged(self.stage(new), start, None)

    def write_staged(self, staged: list[torch.Tensor], start: int, staging: Staging | None) -> None:
        for store, x in zip(self.stores, staged, strict=True):
            store.write_staged(x, start, staging)

    def prefetch(self) -> None:
        for store in self.stores:
            store.prefetch()

    def release(self) -> None:
        for store in self.stores:
            store.release()

    def scratch_shapes(self, max_len: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """Each component's buffer across the link: position-major, `max_len` positions."""
        return [(n, (max_len, *s.position_shape[1:]), s.dtype)
                for n, s in zip(("codes", "scale", "min"), self.stores, strict=True)]
