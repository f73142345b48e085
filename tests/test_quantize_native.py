"""A CPU's 4-bit quantization in groups along the last dimension by the C kernel (native.int4_quantize_rows): the
torch path's codes, scales and minima bit for bit, the same rounding edges; compression.quantize takes it on a CPU
(a KV cache's new tokens in host RAM, each decode step, and its prefill), the torch path where it cannot."""

from __future__ import annotations

import pytest
import torch

from flexgen_lite.kernels import native
from flexgen_lite.kernels.compression import CompressionConfig, quantize, quantize_reference

from .test_quantize_triton import assert_same, edges

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,group", [((7, 4, 3, 128), 64), ((16, 56, 1, 128), 64), ((5, 256), 32),
                                          ((33, 1024), 1024), ((3, 2, 8), 2)], ids=str)
@pytest.mark.parametrize("spread", [1e-5, 4.0, 3e4])
def test_the_kernel_equals_the_torch_path_bit_for_bit(dtype, shape, group, spread):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * spread).to(dtype)
    found = native.int4_quantize_rows(x, group)
    assert found is not None
    want = quantize_reference(x, CompressionConfig(4, group, -1))
    codes, scale, minimum = found
    assert torch.equal(codes, want.data) and scale.shape == want.scale.shape
    assert torch.equal(scale.view(torch.int16), want.scale.view(torch.int16))
    assert torch.equal(minimum.view(torch.int16), want.minimum.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_kernel_rounds_the_edges_as_the_torch_path(dtype):
    """Ties at .5, a constant group, -0.0, subnormal minima, values past fp16's range, infinities."""
    x = edges(64)
    x[5, :2] = torch.tensor([float("inf"), -float("inf")])
    config = CompressionConfig(4, 64, -1)
    assert_same(quantize(x.to(dtype), config), quantize_reference(x.to(dtype), config))


def test_compression_quantize_takes_it_on_a_cpu(monkeypatch):
    """Groups along the last dimension (-1, or its index), any strides: the kernel; groups along another
    dimension, padded groups, 8 bits: the torch path, which the kernel refuses."""
    calls = []
    real = native.int4_quantize_rows
    monkeypatch.setattr(native, "int4_quantize_rows", lambda *a: calls.append(a[1]) or real(*a))
    x = torch.randn(6, 4, 128).transpose(0, 1)  # not contiguous
    for dim in (-1, 2):
        config = CompressionConfig(4, 32, dim)
        assert_same(quantize(x, config), quantize_reference(x, config))
    assert calls == [32, 32]
    for config in (CompressionConfig(4, 32, 0), CompressionConfig(8, 32, -1)):
        assert_same(quantize(x, config), quantize_reference(x, config))
    assert calls == [32, 32]
    assert native.int4_quantize_rows(torch.randn(1, 2 * native.ROW_VALUES), 64) is None  # a row past the stack's
    padded, config = torch.randn(4, 100), CompressionConfig(4, 64, -1)
    assert native.int4_quantize_rows(padded, 64) is None
    assert_same(quantize(padded, config), quantize_reference(padded, config))
