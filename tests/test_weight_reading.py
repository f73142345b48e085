"""Placement compresses a weight a chunk of rows at a time (engine/weight_reading.py): bit for bit what the
whole matrix quantized at once gives, read from its source a chunk at a time."""

import pytest
import torch

from flexgen_lite.engine import weight_reading, weights
from flexgen_lite.engine.storage import DiskStore, MemoryLedger
from flexgen_lite.engine.weight_reading import packed_rows, quantized_rows
from flexgen_lite.engine.weight_sources import WeightSource
from flexgen_lite.kernels.compression import CompressionConfig, quantize, to_bytes
from flexgen_lite.kernels.int4_matmul import quantize_packed
from flexgen_lite.models.specs import WeightSpec
from flexgen_lite.system.devices import ComputeDevice
from flexgen_lite.system.host_memory import HostArena


class TensorSource(WeightSource):
    """A matrix's rows as a checkpoint yields them (fp32), recording each read's row count."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values, self.reads = values, []

    def read(self, spec: WeightSpec, start: int, stop: int) -> torch.Tensor:
        self.reads.append(stop - start)
        return self.values[start:stop].clone()


def spec_and_source(n: int, k: int, seed: int = 0) -> tuple[WeightSpec, TensorSource]:
    values = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    values[3] *= 40  # a row of outliers: each group's own scale
    return WeightSpec("w.weight", "w.weight", (n, k)), TensorSource(values)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(weight_reading, "READ_CHUNK", 4096)  # a few rows at a time at these widths


@pytest.mark.parametrize(("shape", "config"), [
    ((300, 64), CompressionConfig(4, 64, -1)),
    ((300, 96), CompressionConfig(4, 64, 1)),  # rows padded to whole groups
    ((331, 40), CompressionConfig(4, 16, 0)),  # groups along the rows: chunks of whole groups, the last padded
    ((200, 48), CompressionConfig(8, 32, 0)),
    ((130, 33), CompressionConfig(4, 8, 1)),  # an odd row length
])
def test_quantized_by_chunks_is_the_whole_matrix_quantized(small_chunks, shape, config):
    spec, source = spec_and_source(*shape)
    whole = quantize(source.values.to(torch.bfloat16), config)
    chunked = quantized_rows(spec, source, torch.bfloat16, config)
    assert len(source.reads) > 2 and max(source.reads) < shape[0]
    assert chunked.shape == whole.shape
    assert torch.equal(to_bytes(chunked), to_bytes(whole))


def test_packed_by_chunks_is_the_whole_matrix_packed(small_chunks):
    config = CompressionConfig(4, 32, 1)
    spec, source = spec_and_source(320, 64)
    chunked = packed_rows(spec, source, torch.bfloat16, config)
    assert len(source.reads) > 2 and all(r % 64 == 0 for r in source.reads)
    assert torch.equal(chunked, quantize_packed(source.values.to(torch.bfloat16), config))


@pytest.mark.parametrize(("tier", "device_name"), [("gpu", "cpu"), ("cpu", "cpu"), ("disk", "cpu"),
                                                   ("gpu", "cpu+link"), ("cpu", "cpu+link")])
def test_placement_reads_a_compressed_weight_a_chunk_at_a_time(small_chunks, tier, device_name, tmp_path):
    """Every tier's compressed weight was read and quantized whole (a 235M-value matrix: 2.8 GB of fp32 beside
    it); it now holds a chunk, and the stored weight gives back the same values."""
    config = CompressionConfig(4, 64, 1)
    spec, source = spec_and_source(256, 128)
    device, ledger, store = ComputeDevice(device_name), MemoryLedger(), DiskStore(str(tmp_path))
    file = store.create(1 << 20) if tier == "disk" else None
    arena = HostArena(1 << 20, pin=False) if device.host_is_separate else None  # a link's host RAM
    stored = weights.place_tensor(spec, tier, source, torch.bfloat16, device, ledger, config, file=file,
                                  compressible=True, arena=arena)
    assert len(source.reads) > 2 and max(source.reads) < 256
    expected = weights.dequantize(quantize(source.values.to(torch.bfloat16), config), torch.bfloat16)
    if stored.int4:
        values = stored.int4_weight().dequantize_t(torch.empty(128, 256, dtype=torch.bfloat16)).t()
    else:
        values = stored.fetch(device, torch.empty(spec.shape, dtype=torch.bfloat16), None)
    assert torch.equal(values, expected)
    store.close()
