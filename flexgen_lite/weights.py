"""Placing every weight on its home tiers, from a checkpoint or as dummy values, and fetching a layer's
weights to the compute device."""

from __future__ import annotations

import zlib

import torch

from .compression import CompressionConfig, compressed_nbytes, quantize, to_bytes
from .config import ModelError
from .devices import ComputeDevice
from .models import LayerSpec, WeightSpec
from .policy import split_counts
from .storage import DiskStore, MemoryLedger, Part, Staging, TieredTensor

ROW_GRANULARITY = 64  # split points are multiples of 64 rows: whole quantization groups


class WeightSource:
    """Where weight values come from: `read(spec, start, stop)` returns rows of one tensor."""

    def read(self, spec: WeightSpec, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError


class CheckpointSource(WeightSource):
    def __init__(self, checkpoint) -> None:
        self.checkpoint = checkpoint

    def read(self, spec: WeightSpec, start: int, stop: int) -> torch.Tensor:
        shape = self.checkpoint.shape(spec.hf_name)
        if shape != spec.shape:
            raise ModelError(f"{spec.hf_name} has shape {shape}, the config implies {spec.shape}")
        return self.checkpoint.read(spec.hf_name, start, stop)


class GGUFSource(WeightSource):
    """Tensors of a GGUF file, dequantized one at a time as placement asks for them."""

    def __init__(self, path: str) -> None:
        from .gguf_file import gguf_tensors

        self.path, self.plan = path, gguf_tensors(path)
        self.last: tuple[str, torch.Tensor] | None = None

    def read(self, spec: WeightSpec, start: int, stop: int) -> torch.Tensor:
        from .gguf_file import read_gguf_tensor

        if self.last is None or self.last[0] != spec.hf_name:
            if spec.hf_name not in self.plan:
                raise ModelError(f"{self.path} lacks the tensor {spec.hf_name!r}")
            self.last = (spec.hf_name, read_gguf_tensor(self.plan[spec.hf_name]))
        return self.last[1][start:stop]


class DummySource(WeightSource):
    """Reproducible random weights (norm scales are ones), made row range by row range."""

    def read(self, spec: WeightSpec, start: int, stop: int) -> torch.Tensor:
        shape = (stop - start, *spec.shape[1:])
        if spec.name == "norm.weight":
            return torch.ones(shape)
        gen = torch.Generator().manual_seed(zlib.crc32(f"{spec.hf_name}:{start}".encode()))
        return torch.empty(shape).normal_(0, 0.02, generator=gen)


def place_tensor(spec: WeightSpec, percents, source: WeightSource, dtype: torch.dtype, device: ComputeDevice,
                 disk: DiskStore, ledger: MemoryLedger, pin: bool,
                 compression: CompressionConfig | None = None) -> TieredTensor:
    """Split one weight's rows over the tiers and fill each part from `source` (compressing 2-D weights
    once, here, when `compression` is set)."""
    rows = spec.shape[0]
    counts = split_counts(rows, percents, ROW_GRANULARITY)
    if compression is not None and len(spec.shape) >= 2:
        return _place_compressed(spec, counts, source, dtype, device, disk, ledger, pin, compression)
    n_gpu, n_cpu, n_disk = counts
    row_bytes = dtype.itemsize * (torch.Size(spec.shape[1:]).numel())
    parts: list[Part] = []
    resident = None
    if not device.is_cuda and n_gpu + n_cpu:
        # compute memory and host RAM are the same memory here: one tensor, no copies between them
        host = torch.empty((n_gpu + n_cpu, *spec.shape[1:]), dtype=dtype)
        host.copy_(source.read(spec, 0, n_gpu + n_cpu))
        for tier, lo, hi in (("gpu", 0, n_gpu), ("cpu", n_gpu, n_gpu + n_cpu)):
            if hi > lo:
                parts.append(Part(tier, lo, hi, host[lo:hi], (hi - lo) * row_bytes))
        resident = host if n_disk == 0 else None
    else:
        if n_gpu:
            t = source.read(spec, 0, n_gpu).to(device.device, dtype)
            parts.append(Part("gpu", 0, n_gpu, t, n_gpu * row_bytes))
            resident = t if n_gpu == rows else None
        if n_cpu:
            t = source.read(spec, n_gpu, n_gpu + n_cpu).to(dtype)
            t = t.pin_memory() if pin and device.is_cuda else t
            parts.append(Part("cpu", n_gpu, n_gpu + n_cpu, t, n_cpu * row_bytes))
    if n_disk:
        lo = n_gpu + n_cpu
        f = disk.create(n_disk * row_bytes, spec.name)
        chunk = max(1, (64 << 20) // max(row_bytes, 1))  # write 64 MiB at a time
        for s in range(lo, rows, chunk):
            e = min(rows, s + chunk)
            f.write(source.read(spec, s, e).to(dtype).contiguous(), (s - lo) * row_bytes)
        parts.append(Part("disk", lo, rows, f, n_disk * row_bytes))
    for p in parts:
        ledger.add(p.tier, p.nbytes)
    return TieredTensor(spec.shape, dtype, parts, resident)


def _place_compressed(spec, counts, source, dtype, device, disk, ledger, pin, compression) -> TieredTensor:
    """Each tier's rows quantized once; they stay compressed on every tier, disk included."""
    parts, lo = [], 0
    for tier, n in zip(("gpu", "cpu", "disk"), counts, strict=True):
        if not n:
            continue
        q = quantize(source.read(spec, lo, lo + n).to(dtype), compression)
        if tier == "disk":
            data = to_bytes(q)
            f = disk.create(data.numel(), spec.name)
            f.write(data)
            parts.append(Part(tier, lo, lo + n, f, data.numel()))
        else:
            where = device.device if tier == "gpu" else "cpu"
            q = q.to(where)
            parts.append(Part(tier, lo, lo + n, q.pin_memory() if pin and device.is_cuda and tier == "cpu" else q,
                              q.nbytes))
        ledger.add(tier, parts[-1].nbytes)
        lo += n
    return TieredTensor(spec.shape, dtype, parts, None, compression)


def place_weights(layers: list[LayerSpec], percents, source: WeightSource, dtype: torch.dtype,
                  device: ComputeDevice, disk: DiskStore, ledger: MemoryLedger, pin: bool,
                  compression: CompressionConfig | None = None, progress=None) -> list[dict[str, TieredTensor]]:
    """Every layer's weights by canonical name. Tied weights (same checkpoint name) are stored once."""
    by_hf_name: dict[str, TieredTensor] = {}
    placed = []
    for layer in layers:
        weights = {}
        for spec in layer.weights:
            if spec.hf_name not in by_hf_name:
                by_hf_name[spec.hf_name] = place_tensor(spec, percents, source, dtype, device, disk, ledger, pin,
                                                        compression)
            weights[spec.name] = by_hf_name[spec.hf_name]
        placed.append(weights)
        if progress:
            progress(len(placed), len(layers))
    return placed


class WeightSlots:
    """Compute-device buffers that non-resident weights are assembled in: two per layer kind
    (the layer being computed and the one being prefetched), allocated on first use."""

    def __init__(self, device: ComputeDevice, ledger: MemoryLedger, staging: Staging) -> None:
        self.device, self.ledger, self.staging = device, ledger, staging
        self.buffers: dict[tuple, torch.Tensor] = {}

    def fetch(self, weights: dict[str, TieredTensor], slot_key: tuple) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in weights.items():
            buf = None
            if t.resident is None:
                key = (*slot_key, name)
                buf = self.buffers.get(key)
                if buf is None:
                    buf = torch.empty(t.shape, dtype=t.dtype, device=self.device.device)
                    self.buffers[key] = buf
                    self.ledger.add("gpu", buf.numel() * buf.element_size())
            out[name] = t.fetch(self.device, buf, self.staging)
        return out


def weight_bytes(layers: list[dict[str, TieredTensor]], tier: str) -> int:
    seen = {id(t): t for layer in layers for t in layer.values()}
    return sum(t.nbytes(tier) for t in seen.values())


def planned_bytes(layers: list[LayerSpec], percents, dtype: torch.dtype,
                  compression: CompressionConfig | None = None) -> dict[str, int]:
    """Bytes per tier that placing these weights by `percents` will take (tied weights once)."""
    out = dict.fromkeys(("gpu", "cpu", "disk"), 0)
    specs = {s.hf_name: s for layer in layers for s in layer.weights}
    for spec in specs.values():
        for tier, rows in zip(out, split_counts(spec.shape[0], percents, ROW_GRANULARITY), strict=True):
            shape = (rows, *spec.shape[1:])
            if compression is not None and len(shape) >= 2:
                out[tier] += compressed_nbytes(shape, compression) if rows else 0
            else:
                out[tier] += torch.Size(shape).numel() * dtype.itemsize
    return out
