"""The fused 4-bit quantization kernel (quantize_triton.py) against the torch path, bit for bit: on this CPU by
Triton's interpreter, with a CPU's division; under `--device cuda` compiled, against torch's own CUDA path."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from flexgen_lite.kernels import quantize_triton
from flexgen_lite.kernels.compression import CompressionConfig, quantize, quantize_reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
FP16_MAX = 65504.0


@pytest.fixture
def device(monkeypatch, compute_device) -> str:
    """Where the kernel runs: the GPU under `--device cuda` (compiled), else the CPU (Triton's interpreter, which
    conftest chose for the session)."""
    monkeypatch.delenv("FLEXGEN_LITE_TRITON", raising=False)
    quantize_triton.reset()
    yield "cuda" if compute_device.startswith("cuda") else "cpu"
    quantize_triton.reset()


def assert_same(got, want) -> None:
    for name in ("data", "scale", "minimum"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and torch.equal(a, b), name
    assert got.shape == want.shape


def edges(d: int) -> torch.Tensor:
    """Groups that test each rounding: ties at .5 (min 0, max 15: scale 1), a constant group (scale 0), -0.0,
    tiny values (subnormal fp16 minima), values past fp16's range (clamped), a minimum that rounds down."""
    i = torch.arange(d)
    rows = [i % 14 + torch.where(i % 2 == 1, 0.5, 0.0),
            torch.full((d,), 1.5), torch.full((d,), -0.0), torch.linspace(-1e-6, 3e-7, d),
            torch.linspace(-7e4, 9e4, d), torch.linspace(-0.1 / 3, 1 / 3, d)]
    rows[0][0], rows[0][-1] = 0.0, 15.0
    return torch.stack(rows).float()


@pytest.mark.parametrize("dtype", quantize_triton.DTYPES)
@pytest.mark.parametrize("shape,group", [((7, 4, 3, 128), 64), ((5, 256), 32), ((2, 3, 1, 64), 64),
                                          ((33, 1024), 128), ((1, 8), 8)], ids=str)
def test_kernel_equals_the_torch_path_bit_for_bit(device, dtype, shape, group):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 4).to(dtype).to(device)
    config = CompressionConfig(4, group, -1)
    assert quantize_triton.supported(x, config)
    assert_same(quantize_triton.quantize(x, config), quantize_reference(x, config))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_rounds_the_edges_as_the_torch_path(device, dtype):
    x = edges(64).to(dtype).to(device)
    config = CompressionConfig(4, 64, -1)
    got, want = quantize_triton.quantize(x, config), quantize_reference(x, config)
    assert_same(got, want)
    assert want.scale[0].item() == 1.0 and want.scale[1].item() == 0  # ties were tested; a constant group too


def test_on_cuda_the_range_is_divided_as_torch_does_there(device):
    """torch divides a tensor by a scalar on CUDA as `x * fp32(1 / levels)`, on a CPU truly: scales rounded up to
    fp16 then differ where the two land either side of an fp16 value. The kernel's switch follows each: groups
    [0, spread] for spreads where they differ get the CPU's scale without it, the reciprocal's with it."""
    from flexgen_lite.kernels.quantization import _fp16_round

    spread = torch.arange(1, 200_000, dtype=torch.float32) * (2.0**-12)
    pairs = torch.stack([torch.zeros_like(spread), spread], 1)  # groups of two: minimum 0, maximum the spread
    true_div = quantize_reference(pairs, CompressionConfig(4, 2, -1)).scale[:, 0]
    by_reciprocal = _fp16_round(spread * torch.tensor(np.float32(1) / np.float32(15)), up=True)
    differ = (true_div != by_reciprocal).nonzero().squeeze(1)[:8]
    assert len(differ) == 8  # such spreads exist
    x = torch.stack([torch.zeros(len(differ)), spread[differ]], 1).repeat_interleave(4, 1).to(device)  # groups of 8
    config = CompressionConfig(4, 8, -1)
    got = {way: quantize_triton.quantize(x, config, reciprocal=way).scale[:, 0].cpu() for way in (False, True)}
    assert torch.equal(got[False], true_div[differ]) and torch.equal(got[True], by_reciprocal[differ])


def test_compression_quantize_uses_the_kernel_on_cuda_only(device, monkeypatch):
    """compression.quantize (the cache's and weights' entry) takes the kernel for CUDA tensors it supports, after
    its self-check; a CPU tensor, or padded groups, take the torch path."""
    calls = []
    real = quantize_triton.quantize
    monkeypatch.setattr(quantize_triton, "quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = CompressionConfig(4, 64, -1)
    cpu = torch.randn(4, 128)
    assert_same(quantize(cpu, config), quantize_reference(cpu, config))
    assert not calls
    assert not quantize_triton.supported(torch.randn(4, 100), config)  # a padded group
    if device == "cuda":
        x = cpu.cuda()
        assert_same(quantize(x, config), quantize_reference(x, config))
        assert calls


def test_self_check_passes_and_can_be_switched_off(device, monkeypatch):
    x = torch.zeros(2, 64, device=device)
    config = CompressionConfig(4, 64, -1)
    assert quantize_triton.usable(x, config)
    monkeypatch.setenv("FLEXGEN_LITE_TRITON", "0")
    quantize_triton.reset()
    assert not quantize_triton.usable(x, config)
