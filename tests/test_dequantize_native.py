"""A CPU's 4-bit dequantization as compression stores it, by the C kernel (native.int4_dequantize_groups): the
torch path's values bit for bit in every grouping (along the last dimension, a cache's; along a weight's output
dimension, FlexGen's), every output dtype, every rounding edge; compression.dequantize takes it on a CPU and the
torch path where it cannot."""

from __future__ import annotations

import pytest
import torch

from flexgen_lite.kernels import native
from flexgen_lite.kernels.compression import CompressionConfig, dequantize, dequantize_reference, grouped, quantize

from .test_quantize_triton import edges

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here")

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal as stored (a -0.0 against a 0.0 counts)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got.view(BITS[got.dtype]), want.view(BITS[want.dtype]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,group,dim", [((768, 3072), 64, 0), ((192, 100), 64, 0), ((3072, 768), 64, 1),
                                              ((4, 8, 130, 64), 64, -1), ((5, 96), 32, -1), ((64, 4200), 32, 0),
                                              ((3, 2, 8), 2, -1)], ids=str)
def test_the_kernel_equals_the_torch_path_bit_for_bit(dtype, shape, group, dim):
    """Rows of 64 values by vectors and the rest one by one (100 and 4200 columns: a tail past the last 64, and
    past the kernel's 2048-column passes)."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    q = quantize(x, CompressionConfig(4, group, dim))
    want = dequantize_reference(q, dtype, None)
    out = torch.empty(shape, dtype=dtype)
    assert native.int4_dequantize_groups(q.data, q.scale, q.minimum, grouped(q), out)
    assert_bits(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [0, -1])
def test_the_kernel_rounds_the_edges_as_the_torch_path(dtype, dim):
    """Ties, a constant group, -0.0, subnormal minima, values past fp16's range (clamped after the add)."""
    x = edges(128).repeat(11, 1)[:64]  # 64 rows: a whole group along dim 0
    q = quantize(x, CompressionConfig(4, 64, dim))
    assert_bits(dequantize(q, dtype), dequantize_reference(q, dtype, None))


def test_compression_dequantize_takes_it_on_a_cpu(monkeypatch):
    """A CPU's 4-bit tensors into a contiguous out (or a new one): the kernel; padded groups, 8 bits, an out that
    is not contiguous (a cache part's prefix in its slot): the torch path, with the same values."""
    calls = []
    real = native.int4_dequantize_groups
    monkeypatch.setattr(native, "int4_dequantize_groups", lambda *a: calls.append(a[3]) or real(*a))
    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    for dim, shape in ((0, (2, 64, 256)), (1, (512, 64, 1))):
        q = quantize(x, CompressionConfig(4, 64, dim))
        assert_bits(dequantize(q, torch.bfloat16), dequantize_reference(q, torch.bfloat16, None))
        out = torch.empty_like(x)
        assert dequantize(q, torch.bfloat16, out=out) is out
        assert_bits(out, dequantize_reference(q, torch.bfloat16, None))
        assert calls[-2:] == [shape, shape]
    calls.clear()
    for q in (quantize(x[:, :100], CompressionConfig(4, 64, 1)), quantize(x, CompressionConfig(8, 64, 0))):
        assert_bits(dequantize(q, torch.bfloat16), dequantize_reference(q, torch.bfloat16, None))
    slot = torch.empty(2, 3, 40, 64, dtype=torch.float32)
    q = quantize(torch.randn(2, 3, 24, 64), CompressionConfig(4, 64, -1))
    prefix = slot[:, :, :24]
    dequantize(q, torch.float32, out=prefix)
    assert_bits(prefix.contiguous(), dequantize_reference(q, torch.float32, None))
    assert calls == []


def test_the_kernel_refuses_what_it_cannot_read():
    """Rows of an odd number of values along FlexGen's grouping (a byte would hold two rows' codes), an out of
    another size, fp32 scales."""
    q = quantize(torch.randn(64, 6), CompressionConfig(4, 64, 0))
    odd = quantize(torch.randn(64, 3), CompressionConfig(4, 64, 0))
    assert native.int4_dequantize_groups(q.data, q.scale, q.minimum, grouped(q), torch.empty(64, 6))
    assert not native.int4_dequantize_groups(odd.data, odd.scale, odd.minimum, grouped(odd), torch.empty(64, 3))
    assert not native.int4_dequantize_groups(q.data, q.scale, q.minimum, grouped(q), torch.empty(64, 5))
    assert not native.int4_dequantize_groups(q.data, q.scale.float(), q.minimum, grouped(q), torch.empty(64, 6))
