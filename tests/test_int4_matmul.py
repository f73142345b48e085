"""The CPU's int4 weight-only matmul: weights stored in its layout dequantize exactly like `dequantize`, its
products match a dense matmul of the dequantized weights, and a bf16 model computed through it stays close to
the plain 4-bit path (whose fp32 output equals transformers on the same quantized weights, test_offload_features)
and through the dequantization of its layout (the path of large batches) equals it."""

from __future__ import annotations

import ctypes
import dataclasses

import pytest
import torch

import flexgen_lite.engine.weight_slots as slots_module
import flexgen_lite.engine.weights as weights_module
import flexgen_lite.kernels.int4_matmul as int4_matmul
from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.kernels import native
from flexgen_lite.kernels.compression import CompressionConfig, compressed_nbytes, dequantize, quantize
from flexgen_lite.kernels.int4_matmul import Int4Weight, eligible, native_agrees, pack

from .conftest import PROMPTS, forget_native, other_native_build
from .test_parity import P

CPU = torch.device("cpu")
# bf16 activations against an fp32 reference: the product's relative error (measured 0.2-0.7%)
PRODUCT_RTOL = 1e-2
# the kernel (bf16 scales, its own summation order) against dense bf16 matmuls of the same dequantized weights:
# each step's logits within this share of the row's largest |logit| (measured 1.5-2.9% on the tiny models; by
# tiles, whose bias is added after rounding to bf16, about 1%)
LOGITS_RTOL = 0.05
# one tiled product against a dense matmul of the same dequantized weight (bf16 outputs)
TILES_RTOL = 1e-2


def test_the_layout_is_multiplied_here():
    """CI's machines build the C kernels, which multiply the layout on any x86 CPU (torch's int4 kernel only where
    it reads the layout: test_portable_builds)."""
    assert native_agrees() and eligible((128, 256), CompressionConfig(4, 64, 1), CPU)


@pytest.mark.parametrize("shape,group", [((128, 96), 32), ((64, 256), 64), ((192, 512), 128), ((64, 256), 256)])
def test_packed_weight_dequantizes_like_dequantize_and_multiplies_like_it(shape, group):
    config = CompressionConfig(4, group, 1)
    q = quantize(torch.randn(shape, generator=torch.Generator().manual_seed(0)), config)
    stored = pack(q)
    assert stored.dtype == torch.uint8 and stored.numel() == compressed_nbytes(shape, config)
    w = Int4Weight.from_bytes(stored, shape, group)
    assert w.shape == shape
    expected = dequantize(q, torch.float32)
    dense_t = w.dequantize_t(torch.empty(shape[1], shape[0]))
    torch.testing.assert_close(dense_t.t(), expected, rtol=1e-6, atol=1e-6)
    for rows in (1, 7, 64):
        x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
        product, reference = w.matmul(x).float(), x.float() @ expected.t()
        assert float((product - reference).norm() / reference.norm()) < PRODUCT_RTOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,group", [((128, 96), 32), ((192, 512), 128), ((64, 4096), 256)])
def test_c_dequantization_is_bit_identical_to_the_torch_path(shape, group, dtype):
    """The built C kernel (flexgen_lite.kernels.native) against the torch path it replaces, in every output dtype; the
    torch path is exact against `dequantize` (above). Random scales and minimums, so rounding to bf16/fp16 is
    exercised everywhere."""
    assert native.build.compiler() is not None, "this test needs a C compiler (CI has one)"
    assert native.library() is not None and native_agrees()
    q = quantize(torch.randn(shape, generator=torch.Generator().manual_seed(3)), CompressionConfig(4, group, 1))
    w = Int4Weight.from_bytes(pack(q), shape, group)
    by_c = torch.full((shape[1], shape[0]), float("nan"), dtype=dtype)
    assert native.int4_dequantize_t(w.packed, w.scale, w.minimum, group, by_c)
    by_torch = w.dequantize_t(torch.empty_like(by_c), use_native=False)
    assert torch.equal(by_c.view(-1).view(torch.uint8), by_torch.view(-1).view(torch.uint8))
    assert not native.int4_dequantize_t(w.packed, w.scale, w.minimum, group, by_c.t())  # non-contiguous: refused


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,group", [((128, 96), 32), ((192, 512), 128), ((64, 4096), 256)])
def test_c_quantization_is_bit_identical_to_the_torch_path(shape, group, dtype):
    """Values over ten orders of magnitude, a constant group, a zero row and (beyond fp16) a clamped one: the same
    codes, scales and minimums as `pack(quantize(...))`."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * torch.logspace(-6, 4, shape[1])
    x[3, :group], x[5], x[7, -group:] = 0.5, 0.0, -3.0
    if dtype != torch.float16:
        x[9, 0] = 1e6
    x = x.to(dtype)
    by_c = native.int4_quantize_pack(x, group)
    assert by_c is not None and torch.equal(by_c, pack(quantize(x, CompressionConfig(4, group, 1))))
    assert native.int4_quantize_pack(x[:, :group], group) is None  # not contiguous: refused
    assert native.int4_quantize_pack(x[:63], group) is None  # not a whole block of 64 rows: refused


@pytest.mark.parametrize("tile_bytes", [1, 64 * 1024, 2 << 20])
def test_the_tiled_product_equals_a_dense_matmul_of_the_dequantized_weight(monkeypatch, tile_bytes):
    """Tiles of 64 rows, of some, and of all of W (the last tile short): the dense product of each slice."""
    monkeypatch.setattr(int4_matmul, "TILE_BYTES", tile_bytes)
    shape = (320, 512)
    q = quantize(torch.randn(shape, generator=torch.Generator().manual_seed(5)), CompressionConfig(4, 64, 1))
    w = Int4Weight.from_bytes(pack(q), shape, 64)
    slot = torch.full(shape, float("nan"), dtype=torch.bfloat16)
    x = torch.randn(2, 3, shape[1], dtype=torch.bfloat16)
    tiled = dataclasses.replace(w, tiles=slot.view(-1)).matmul(x)
    dense = x @ dequantize(q, torch.bfloat16).t()
    assert tiled.shape == (2, 3, shape[0])
    torch.testing.assert_close(tiled, dense, rtol=TILES_RTOL, atol=TILES_RTOL * float(dense.abs().max()))


def test_without_the_c_kernel_the_torch_path_dequantizes(monkeypatch):
    monkeypatch.setenv("FLEXGEN_LITE_NATIVE", "0")
    forget_native()
    try:
        assert native.library() is None
        q = quantize(torch.randn(128, 256), CompressionConfig(4, 64, 1))
        w = Int4Weight.from_bytes(pack(q), (128, 256), 64)
        out = torch.empty(256, 128, dtype=torch.bfloat16)
        assert not native.int4_dequantize_t(w.packed, w.scale, w.minimum, 64, out)
        assert native.int4_quantize_pack(torch.randn(128, 256), 64) is None
        torch.testing.assert_close(w.dequantize_t(out).t().float(), dequantize(q, torch.bfloat16).float())
    finally:
        forget_native()  # read again lazily, after the environment is restored


def test_only_what_the_kernel_can_multiply_is_eligible():
    g64 = CompressionConfig(4, 64, 1)
    assert eligible((128, 256), g64, CPU)
    assert not eligible((96, 256), g64, CPU)  # N not a multiple of the kernel's 64-row block
    assert not eligible((128, 96), g64, CPU)  # K not a multiple of the group
    assert not eligible((128, 256), CompressionConfig(4, 64, 0), CPU)  # groups along N
    assert not eligible((128, 256), CompressionConfig(8, 64, 1), CPU)
    assert not eligible((128, 256), CompressionConfig(4, 16, 1), CPU)
    assert not eligible((128, 256), g64, torch.device("cuda"))
    assert not eligible((128,), g64, CPU) and not eligible((128, 256), None, CPU)


def _run(model_dir, percent, monkeypatch, path: str, dtype: str = "bfloat16"):
    """Greedy ids and logits with 4-bit weights; path: "kernel", "dequantized" (the int4 layout unpacked
    for a dense matmul) or "plain" (not stored for the kernel: `dequantize`, tested against transformers)."""
    policy = dataclasses.replace(P(percent, gbs=2, nb=2, compress_weight=True), dtype=dtype)
    with monkeypatch.context() as patch:
        patch.setattr(slots_module, "int4_path", lambda *a: {"dequantized": "dense"}.get(path, path))
        patch.setattr(int4_matmul, "TILE_BYTES", 1)  # tiles of 64 rows: several per matrix
        if path == "plain":
            patch.setattr(weights_module, "eligible", lambda *a: False)
        with FlexGenLite(str(model_dir), policy=policy) as m:
            decoder = [t for layer in m.engine.weights for t in layer.values() if t.int4]
            assert bool(decoder) == (path != "plain")
            return m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=4, stop_at_eos=False), return_logits=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])  # float32: the machines without fast bfloat16
@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("percent", [(100, 0, 100, 0, 100, 0), (0, 0, 100, 0, 100, 0)], ids=["memory", "disk"])
def test_a_model_through_the_int4_layout_matches_the_plain_4bit_path(tiny_models, monkeypatch, family, percent,
                                                                      dtype):
    model_dir, rtol = tiny_models[family][0], {"bfloat16": LOGITS_RTOL, "float32": 1e-4}[dtype]
    plain_ids, plain_logits = _run(model_dir, percent, monkeypatch, "plain", dtype)
    ids, logits = _run(model_dir, percent, monkeypatch, "dequantized", dtype)
    # the same weight values multiplied transposed (W.T as the layout unpacks it): in float32 another sum order; in
    # bfloat16 the same where the CPU has bf16 units, while torch's emulation on AVX2 CPUs rounds OPT's (biased)
    # products of W and of W.T apart (measured 0.5% of the largest logit; Llama's 0)
    exact = 1e-5 if dtype == "float32" else 0 if int4_matmul.available() else 2**-6
    assert ids == plain_ids and all((a - b).abs().max() <= exact * b.abs().max()
                                    for a, b in zip(logits, plain_logits, strict=True))
    for path in ("kernel", "tiles"):  # tiles: dense products a slice of rows at a time, the bias added after
        ids, logits = _run(model_dir, percent, monkeypatch, path, dtype)
        ties = 0
        for row, (ours, theirs) in enumerate(zip(logits, plain_logits, strict=True)):
            for step in range(len(theirs)):
                scale = float(theirs[step].abs().max())
                assert (ours[step] - theirs[step]).abs().max() < rtol * scale
                if ids[row][step] != plain_ids[row][step]:  # another kernel's rounding may only break a near-tie
                    top = theirs[step].topk(2).values
                    assert float(top[0] - top[1]) < rtol * scale, (row, step)
                    ties += 1
                    break  # the rows' inputs differ from here on
        assert ties <= 2, f"{ties} of {len(ids)} rows parted at near-ties"


GEMV_RTOL = 1e-5  # fp32 sums of the same fp32 weight values, in another order
OUT_RTOL = {torch.float32: GEMV_RTOL, torch.bfloat16: 2**-8, torch.float16: 2**-11}  # and the output's rounding


@pytest.mark.parametrize("shape,group", [((128, 96), 32), ((576, 1536), 64), ((192, 512), 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_or_two_rows_are_multiplied_by_the_codes_themselves(shape, group, dtype):
    """native.int4_gemv: each column's codes dequantized in registers, fp32 sums: x @ W.T of the dequantized
    weight within fp32 rounding, then rounded to x's dtype; Int4Weight.matmul uses it for up to GEMV_ROWS rows."""
    g = torch.Generator().manual_seed(5)
    q = quantize(torch.randn(*shape, generator=g), CompressionConfig(4, group, 1))
    weight, dense = Int4Weight.from_bytes(pack(q), shape, group), dequantize(q, torch.float32)
    for rows in (1, 2, 3):
        x = torch.randn(rows, shape[1], generator=g).to(dtype)
        want = x.float() @ dense.t()
        got = native.int4_gemv(weight.packed, weight.scale, weight.minimum, group, x)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=OUT_RTOL[dtype], atol=GEMV_RTOL * float(want.abs().max()))
    x = torch.randn(2, 1, shape[1], generator=g).to(dtype)
    product = weight.matmul(x)
    assert product.dtype == dtype and product.shape == (2, 1, shape[0])
    torch.testing.assert_close(product, native.int4_gemv(weight.packed, weight.scale, weight.minimum, group,
                                                         x.view(2, -1)).view(2, 1, -1))


def test_the_dequantization_is_the_same_on_either_pool(monkeypatch):
    """int4_dequantize_t on torch's OpenMP pool (team) and on the Python pool: the same bytes, whole or a tile."""
    q = quantize(torch.randn(256, 320, generator=torch.Generator().manual_seed(10)), CompressionConfig(4, 64, 1))
    weight = Int4Weight.from_bytes(pack(q), (256, 320), 64)
    outs = []
    for team in (True, False):
        if not team:
            monkeypatch.setattr(native, "team_threads", lambda: 0)
            monkeypatch.setattr(native, "MIN_WORK", 1)
        whole, tile = torch.empty(320, 256, dtype=torch.bfloat16), torch.empty(320 * 128, dtype=torch.bfloat16)
        assert native.int4_dequantize_t(weight.packed, weight.scale, weight.minimum, 64, whole)
        assert native.int4_dequantize_t(weight.packed, weight.scale, weight.minimum, 64, tile, (64, 192))
        outs.append((whole, tile))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(outs[0][0], weight.dequantize_t(torch.empty(320, 256, dtype=torch.bfloat16), use_native=False))


def test_the_fallback_threads_give_the_same_bytes(monkeypatch):
    """Without torch's OpenMP pool (team_threads 0) the kernel's blocks go to the Python pool: the same sums."""
    q = quantize(torch.randn(640, 512, generator=torch.Generator().manual_seed(8)), CompressionConfig(4, 64, 1))
    weight = Int4Weight.from_bytes(pack(q), (640, 512), 64)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    on_team = native.int4_gemv(weight.packed, weight.scale, weight.minimum, 64, x)
    monkeypatch.setattr(native, "team_threads", lambda: 0)
    monkeypatch.setattr(native, "MIN_WORK", 1)
    assert torch.equal(native.int4_gemv(weight.packed, weight.scale, weight.minimum, 64, x), on_team)


def test_the_portable_gemv_matches_the_avx512_one():
    """int4.c's plain C loop (machines without AVX-512), built here without it, gives the same products."""
    lib = other_native_build(["-march=x86-64-v3"])
    q = quantize(torch.randn(128, 256, generator=torch.Generator().manual_seed(6)), CompressionConfig(4, 64, 1))
    weight = Int4Weight.from_bytes(pack(q), (128, 256), 64)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(7))
    out = torch.empty(3, 128)
    lib.int4_gemv(weight.packed.data_ptr(), weight.scale.data_ptr(), weight.minimum.data_ptr(), 128, 256, 64,
                  x.data_ptr(), 3, out.data_ptr(), 0, 2)
    want = native.int4_gemv(weight.packed, weight.scale, weight.minimum, 64, x)
    torch.testing.assert_close(out, want, rtol=0, atol=GEMV_RTOL * float(want.abs().max()))


PASS_ROWS = (1, 2, 5, 6, 7, 12, 13, 64)  # one pass of rows, a full pass, passes split as evenly as they divide


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_bf16_rows_by_the_codes_at_any_count_and_alone_or_batched(group):
    """native.int4_gemv of bf16 rows (gemv.c's pairs kernel where the CPU has the bf16 dot instruction): at every
    row count a pass takes or is split into, x @ W.T of the dequantized weight within fp32 rounding; and each row's
    product is the one it gets alone, bit for bit (the fused decode step and the eager path rely on it). 5 blocks of
    64 output rows, fewer than the team's work items want: passes become work items of their own."""
    g = torch.Generator().manual_seed(21)
    q = quantize(torch.randn(320, 512, generator=g), CompressionConfig(4, group, 1))
    weight, dense = Int4Weight.from_bytes(pack(q), (320, 512), group), dequantize(q, torch.float32)
    x = torch.randn(64, 512, generator=g).to(torch.bfloat16)
    for rows in PASS_ROWS:
        got = native.int4_gemv(weight.packed, weight.scale, weight.minimum, group, x[:rows])
        want = x[:rows].float() @ dense.t()
        torch.testing.assert_close(got.float(), want, rtol=OUT_RTOL[torch.bfloat16],
                                   atol=GEMV_RTOL * float(want.abs().max()))
        for r in {0, rows // 2, rows - 1}:
            alone = native.int4_gemv(weight.packed, weight.scale, weight.minimum, group, x[r:r + 1].contiguous())
            assert torch.equal(got[r:r + 1], alone), (rows, r)


def test_weights_sharing_x_in_one_team_multiply_as_each_alone():
    """int4_gemv_team_many (the fused decode step's q, k, v and gate, up): one team over the blocks of all the
    weights gives each weight's product of a team of its own, bit for bit."""
    lib = native.library()
    fn = lib.int4_gemv_team_many
    fn.restype, fn.argtypes = None, [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + \
        [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    g = torch.Generator().manual_seed(22)
    weights = [Int4Weight.from_bytes(pack(quantize(torch.randn(n, 256, generator=g), CompressionConfig(4, 64, 1))),
                                     (n, 256), 64) for n in (64, 192, 128)]
    for dtype, rows in ((torch.bfloat16, 9), (torch.bfloat16, 64), (torch.float32, 3)):
        x = torch.randn(rows, 256, generator=g).to(dtype)
        outs = [torch.empty(rows, w.shape[0], dtype=dtype) for w in weights]
        array = ctypes.c_void_p * len(weights)
        fn(len(weights), array(*(w.packed.data_ptr() for w in weights)), array(*(w.scale.data_ptr() for w in weights)),
           array(*(w.minimum.data_ptr() for w in weights)),
           (ctypes.c_int64 * len(weights))(*(w.shape[0] for w in weights)), 256, 64, x.data_ptr(),
           native.OUT_KIND[dtype], rows, array(*(o.data_ptr() for o in outs)), native.threads())
        for w, out in zip(weights, outs, strict=True):
            assert torch.equal(out, native.int4_gemv(w.packed, w.scale, w.minimum, 64, x)), (dtype, rows)


def test_the_pairs_kernel_without_the_byte_permute_gives_the_same_products():
    """A build for a CPU with the bf16 dot instruction but without AVX512-VBMI's byte permute (Cooper Lake) turns
    the codes into bf16 pairs by unpacking instead: the same pairs, so the same products bit for bit (on a CPU
    without the bf16 instruction both builds take the fp32 kernel, and still agree)."""
    other = other_native_build(["-march=native", "-mno-avx512vbmi"])
    here = native.library()
    g = torch.Generator().manual_seed(23)
    q = quantize(torch.randn(192, 320, generator=g), CompressionConfig(4, 32, 1))
    weight = Int4Weight.from_bytes(pack(q), (192, 320), 32)
    x = torch.randn(8, 320, generator=g).to(torch.bfloat16)
    xf = x.float()
    outs = []
    for lib in (here, other):
        out = torch.empty(8, 192)
        lib.int4_gemv_blocks(weight.packed.data_ptr(), weight.scale.data_ptr(), weight.minimum.data_ptr(), 192, 320,
                             32, xf.data_ptr(), x.data_ptr(), 8, out.data_ptr(), 0, 3)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], xf @ dequantize(q, torch.float32).t(), rtol=0,
                               atol=GEMV_RTOL * float(outs[0].abs().max()))
