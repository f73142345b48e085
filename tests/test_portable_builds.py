"""The C kernels on every kind of x86 CPU: built for this machine, for AVX2 without AVX-512 (`-march=x86-64-v3`:
most desktop CPUs, AMD before Zen 4) and for plain x86-64 (no vector extensions asked for), each build's 4-bit
dequantizations give the torch path's values bit for bit, and its products of a few rows (dense weights of every
dtype, 4-bit codes as stored) torch's within fp32 summation differences. And the 4-bit layout is `pack`'s own on
every CPU: torch packs AVX2 machines' codes otherwise (pairs of columns), so its int4 kernel is used only where it
reads the layout."""

from __future__ import annotations

import pytest
import torch

from flexgen_lite.kernels import int4_matmul, native
from flexgen_lite.kernels.compression import CompressionConfig, dequantize, dequantize_reference, grouped, quantize
from flexgen_lite.kernels.int4_matmul import BLOCK_N, Int4Weight, codes_of, pack
from flexgen_lite.kernels.int8_weight import Int8Weight

from .conftest import other_native_build
from .test_dequantize_native import assert_bits

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here")

BUILDS = {"native": None, "avx2": ["-march=x86-64-v3"], "plain": ["-march=x86-64"]}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}  # fp32 sums, then the output's rounding


def lib_of(build: str):
    return native.library() if BUILDS[build] is None else other_native_build(BUILDS[build])


def weight(n: int, k: int, group: int, seed: int) -> tuple[Int4Weight, torch.Tensor]:
    q = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), CompressionConfig(4, group, 1))
    return Int4Weight.from_bytes(pack(q), (n, k), group), dequantize(q, torch.float32)


def test_pack_writes_the_layout_the_kernels_read():
    """Byte (b, k, j) holds the codes of rows 64 b + j (low nibble) and 64 b + 32 + j (high) at column k."""
    q = quantize(torch.randn(128, 96, generator=torch.Generator().manual_seed(1)), CompressionConfig(4, 32, 1))
    codes = codes_of(q)
    packed = pack(q)[:128 * 48].view(2, 96, 32)
    for b, col, j in ((0, 0, 0), (1, 95, 31), (0, 17, 5), (1, 3, 20)):
        byte = int(packed[b, col, j])
        assert byte & 15 == int(codes[BLOCK_N * b + j, col]) and byte >> 4 == int(codes[BLOCK_N * b + 32 + j, col])


def test_torchs_int4_kernel_is_used_only_where_it_reads_the_layout():
    """Where torch packs the same bytes (AVX-512 CPUs) its kernel is available and multiplies them right; where it
    packs others (AVX2), it is not, and the weights still multiply by the C kernel."""
    q = quantize(torch.randn(128, 64, generator=torch.Generator().manual_seed(2)), CompressionConfig(4, 32, 1))
    by_torch = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes_of(q).to(torch.int32), 2)
    same = torch.equal(by_torch.view(-1).view(torch.uint8), pack(q)[:by_torch.numel()])
    assert int4_matmul.available() == same
    w, dense = weight(128, 256, 64, 3)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(w.matmul(x), x @ dense.t(), rtol=0, atol=1e-4 * float((x @ dense.t()).abs().max()))


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_build_dequantizes_the_layout_bit_for_bit(build, dtype):
    """int4_dequantize_t (slots and tiles) of two blocks, a whole weight and a range of its rows; group 32 and 128."""
    lib = lib_of(build)
    for n, k, group in ((128, 256, 32), (192, 384, 128)):
        w, _ = weight(n, k, group, 5)
        want = w.dequantize_t(torch.empty(k, n, dtype=dtype), use_native=False)
        out = torch.empty(k, n, dtype=dtype)
        lib.int4_dequantize_t(w.packed.data_ptr(), w.scale.data_ptr(), w.minimum.data_ptr(), n, k, group, 0, n,
                              out.data_ptr(), native.OUT_KIND[dtype], 0, -(-k // 16))
        assert_bits(out, want)
        part = torch.empty(k, 64, dtype=dtype)
        lib.int4_dequantize_t(w.packed.data_ptr(), w.scale.data_ptr(), w.minimum.data_ptr(), n, k, group, 64, 128,
                              part.data_ptr(), native.OUT_KIND[dtype], 0, -(-k // 16))
        assert_bits(part, want[:, 64:128].contiguous())


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_build_dequantizes_compressions_groups_bit_for_bit(build, dtype):
    """int4_dequantize_groups along the last dimension (a cache; 100 values: a tail past the vectors) and along a
    weight's output dimension (FlexGen's), with the rounding edges' values past fp16's range."""
    lib = lib_of(build)
    for shape, group, dim in (((6, 100), 50, -1), ((4, 130, 64), 64, -1), ((128, 72), 64, 0)):
        x = (torch.randn(shape, generator=torch.Generator().manual_seed(6)) * 3).to(dtype)
        x.view(-1)[7] = 70000.0 if dtype != torch.float16 else 60000.0
        q = quantize(x, CompressionConfig(4, group, dim))
        want = dequantize_reference(q, dtype, None)
        groups, g, inner = grouped(q)
        out = torch.empty(shape, dtype=dtype)
        lib.int4_dequantize_groups(q.data.data_ptr(), q.scale.data_ptr(), q.minimum.data_ptr(), g, inner,
                                   out.data_ptr(), native.OUT_KIND[dtype], 0, groups)
        assert_bits(out, want)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_every_builds_int4_gemv_multiplies_the_codes(build, rows):
    """x @ W.T by the codes as stored, one and two rows at a time over blocks, against float64."""
    lib = lib_of(build)
    for n, k, group in ((128, 256, 64), (192, 96, 32), (64, 512, 128)):
        w, dense = weight(n, k, group, 7 + rows)
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        out = torch.empty(rows, n)
        lib.int4_gemv(w.packed.data_ptr(), w.scale.data_ptr(), w.minimum.data_ptr(), n, k, group, x.data_ptr(), rows,
                      out.data_ptr(), 0, n // BLOCK_N)
        want = x.double() @ dense.double().t()
        torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_builds_dense_gemv_multiplies_each_dtype(build, dtype):
    """Weights of 77 and 1000 columns (tails past the vectors), 1 to 7 rows of x (every count of the tile's rows
    and a second tile), with a bias."""
    lib = lib_of(build)
    for rows, n, k in ((1, 33, 1000), (3, 40, 77), (4, 64, 576), (7, 20, 256)):
        g = torch.Generator().manual_seed(rows)
        x, w, b = (torch.randn(shape, generator=g).to(dtype) for shape in ((rows, k), (n, k), (n,)))
        out = torch.empty(rows, n, dtype=dtype)
        xf = x.float().contiguous()
        kind = native.OUT_KIND[dtype]
        lib.dense_gemv(w.data_ptr(), b.data_ptr(), kind, kind, n, k, x.data_ptr(), xf.data_ptr(), rows,
                       out.data_ptr(), 0, n)
        want = x.double() @ w.double().t() + b.double()
        torch.testing.assert_close(out.double(), want, rtol=0, atol=RTOL[dtype] * float(want.abs().max()))


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_builds_8_bit_head_kernels(build, dtype):
    """int8.c (the embedding and head in 8 bits): the dequantized rows are code * scale rounded to the dtype, bit for
    bit; the products of 1 to 6 rows (a second pass of rows) those of the dequantized values within fp32 sums."""
    lib = lib_of(build)
    g = torch.Generator().manual_seed(9)
    q = Int8Weight.quantize(torch.randn(70, 256, generator=g) * 0.05)
    values = q.codes.float() * q.scale.float().repeat_interleave(32, dim=1)
    out = torch.empty(20, 256, dtype=dtype)
    lib.int8_dequantize(q.codes.data_ptr(), q.scale.data_ptr(), 256, out.data_ptr(), native.OUT_KIND[dtype], 30, 50)
    assert_bits(out, values[30:50].to(dtype))
    for rows in (1, 4, 6):
        x = torch.randn(rows, 256, generator=g)
        y = torch.empty(rows, 70, dtype=dtype)
        lib.int8_gemv(q.codes.data_ptr(), q.scale.data_ptr(), 70, 256, x.data_ptr(), None, rows, y.data_ptr(),
                      native.OUT_KIND[dtype], 0, 70)
        want = x.double() @ values.double().t()
        torch.testing.assert_close(y.double(), want, rtol=0, atol=RTOL[dtype] * float(want.abs().max()))


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_every_builds_row_groups_product_multiplies_the_codes(build, rows):
    """FlexGen's grouping (along the output dimension) read as stored, fp32 x: blocks of 8 rows and a rest,
    columns past the vectors (100), groups of 32 to 128 rows, against float64."""
    lib = lib_of(build)
    for n, k, group in ((192, 768, 64), (128, 100, 32), (256, 520, 128)):
        g = torch.Generator().manual_seed(rows + n)
        q = quantize(torch.randn(n, k, generator=g) * 0.05, CompressionConfig(4, group, 0))
        dense = dequantize_reference(q, torch.float32, None)
        x, out = torch.randn(rows, k, generator=g), torch.empty(rows, n)
        lib.int4_gemv_row_groups(q.data.data_ptr(), q.scale.data_ptr(), q.minimum.data_ptr(), n, k, group,
                                 x.data_ptr(), native.OUT_KIND[torch.float32], rows, 0, out.data_ptr(), 0, n // group)
        want = x.double() @ dense.double().t()
        torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5 * float(want.abs().max()))
