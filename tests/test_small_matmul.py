"""Dense products of a few rows by the C kernel (native.dense_gemv, small_matmul): the same products as torch's
matmul in every dtype, shape and bias case the layers give it, the same on torch's OpenMP pool and on the
fallback's threads, the same from a portable (no AVX-512) build, and chosen where the profile says it wins (without
one, where it won when both were timed on the shape)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from flexgen_lite.kernels import native, small_matmul
from flexgen_lite.kernels.compression import CompressionConfig, dequantize, quantize
from flexgen_lite.kernels.int4_matmul import Int4Weight, pack
from flexgen_lite.system.hardware import HardwareProfile

from .conftest import forget_profile, other_native_build
from .test_parity import POLICIES, check_against_reference

# each output against torch's fp32 product of the same values, as a share of the row's largest |output|: fp32
# sums in another order (fp32), or the output's own rounding (bf16: 2^-8, fp16: 2^-11)
RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _case(dtype, rows, n, k, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    return x, w, b, want


def _close(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    scale = want.abs().amax(-1, keepdim=True)
    assert bool(((got.float() - want).abs() <= RTOL[dtype] * scale).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k", [(1, 64, 64), (2, 100, 96), (3, 576, 576), (5, 33, 40), (8, 1536, 576),
                                      (1, 7, 17), (16, 70, 100), (6, 130, 1536)])  # bf16 tiles: 4 x 4 and tails
@pytest.mark.parametrize("bias", [False, True])
def test_products_equal_torchs(dtype, rows, n, k, bias):
    x, w, b, want = _case(dtype, rows, n, k, bias)
    _close(native.dense_gemv(x, w, b), want, dtype)


def test_the_fallback_threads_give_the_same_bytes(monkeypatch):
    """Without torch's OpenMP pool (team_threads 0) ranges go to the Python pool: each output is the same sum."""
    x, w, b, _ = _case(torch.bfloat16, 3, 1000, 576, True)
    on_team = native.dense_gemv(x, w, b)
    monkeypatch.setattr(native, "team_threads", lambda: 0)
    monkeypatch.setattr(native, "MIN_WORK", 1)  # the fallback splits even this small product
    assert torch.equal(native.dense_gemv(x, w, b), on_team)


def test_refuses_what_it_cannot_multiply():
    x, w, _, _ = _case(torch.float32, 2, 64, 64, False)
    assert native.dense_gemv(x.double(), w.double()) is None
    assert native.dense_gemv(x, w.to(torch.bfloat16)) is None
    assert native.dense_gemv(x.t(), w) is None  # not contiguous (the layers make it so first)
    assert native.dense_gemv(x, w[:, :32]) is None


@pytest.mark.parametrize("march", [["-march=x86-64-v3"], ["-march=native", "-mno-avx512bf16"]])
def test_other_builds_match(march):
    """gemv.c built for machines without AVX-512 (its plain C loop) and with AVX-512 but without its bf16 dot
    products (bf16 weights converted to fp32 instead) gives the same products."""
    lib = other_native_build(march)
    _int4_blocks_match(lib)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, w, b, want = _case(dtype, 3, 70, 100, True, seed=3)
        out = torch.empty(3, 70, dtype=dtype)
        xf = x.float().contiguous()
        kind = native.OUT_KIND[dtype]
        lib.dense_gemv(w.data_ptr(), b.data_ptr(), kind, kind, 70, 100, x.data_ptr(), xf.data_ptr(), 3,
                       out.data_ptr(), 0, 70)
        _close(out, want, dtype)


def _int4_blocks_match(lib) -> None:
    """The build's int4_gemv_blocks with bf16 rows (by pairs of columns where it has the bf16 dot instruction,
    else as fp32) gives this build's product within fp32 summation differences."""
    q = quantize(torch.randn(128, 192, generator=torch.Generator().manual_seed(11)), CompressionConfig(4, 32, 1))
    weight = Int4Weight.from_bytes(pack(q), (128, 192), 32)
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    xf, out = x.float(), torch.empty(3, 128)
    lib.int4_gemv_blocks(weight.packed.data_ptr(), weight.scale.data_ptr(), weight.minimum.data_ptr(), 128, 192, 32,
                         xf.data_ptr(), x.data_ptr(), 3, out.data_ptr(), 0, 2)
    want = xf @ dequantize(q, torch.float32).t()
    assert float((out - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_linear_takes_any_leading_shape_and_strides(monkeypatch):
    """The layers pass (B, T, K) hidden states and (B, K) slices of them (the head's last position)."""
    monkeypatch.setattr(small_matmul, "gemv_wins", lambda *a: True)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 3, 96, generator=g)
    w, b = torch.randn(40, 96, generator=g), torch.randn(40, generator=g)
    for x in (h[:, :1], h[:, -1], h[:1]):
        got = small_matmul.linear(x, w, b)
        assert got.shape == (*x.shape[:-1], 40)
        _close(got.reshape(-1, 40), F.linear(x, w, b).reshape(-1, 40), torch.float32)


def _profile(gemv_rate: float, dense_rate: float) -> HardwareProfile:
    """A profile with flat rates: the kernel at `gemv_rate` FLOP/s up to 4 rows, torch at `dense_rate`."""
    fields = {f.name: None for f in dataclasses.fields(HardwareProfile) if f.default is dataclasses.MISSING}
    return HardwareProfile(**{**fields, "matmul_shape": (2048, 4096),
                              "matmul": {"bfloat16": [(m, dense_rate, 0.0) for m in (1, 4, 16)]},
                              "gemv": {"bfloat16": [(m, gemv_rate, 0.0) for m in (1, 2, 4)]}})


def test_the_profile_chooses_the_kernel_where_it_measured_it_faster():
    fast, slow = _profile(2e10, 1e10), _profile(1e10, 2e10)
    assert fast.gemv_wins("bfloat16", 1, 576, 576) and fast.gemv_wins("bfloat16", 4, 4096, 4096)
    assert not fast.gemv_wins("bfloat16", 5, 576, 576)  # beyond the rows it was measured at
    assert not fast.gemv_wins("float32", 1, 576, 576)  # a dtype it was not measured in
    assert not slow.gemv_wins("bfloat16", 1, 576, 576)
    # the cost model's time is the kernel's where the engine runs it, torch's elsewhere
    assert fast.matmul_time("bfloat16", 2, 576, 576) == pytest.approx(2 * 2 * 576 * 576 / 2e10)
    assert fast.matmul_time("bfloat16", 8, 576, 576) == pytest.approx(2 * 8 * 576 * 576 / 1e10)
    assert slow.matmul_time("bfloat16", 2, 576, 576) == pytest.approx(2 * 2 * 576 * 576 / 2e10)


def test_without_a_profile_the_kernel_is_chosen_where_it_won_when_timed_once(tmp_path, monkeypatch):
    monkeypatch.delenv("FLEXGEN_LITE_PROFILE")
    monkeypatch.setenv("FLEXGEN_LITE_CACHE", str(tmp_path))  # no stored profile, nor verdicts
    monkeypatch.setattr(small_matmul, "_timed", {})
    forget_profile()
    timed = []
    monkeypatch.setattr(small_matmul, "_kernel_faster",
                        lambda x, w: timed.append((x.shape[0], *w.shape, x.dtype)) or x.shape[0] <= 4)
    try:
        wins = [small_matmul.gemv_wins(torch.bfloat16, rows, 96, 64) for rows in (1, 3, 4, 5, 16, 65)]
        assert wins == [True, True, True, False, False, False]  # one row: always; past 64: torch's
        assert timed == [(4, 96, 64, torch.bfloat16), (8, 96, 64, torch.bfloat16), (16, 96, 64, torch.bfloat16)]
        stored = small_matmul._stored()  # for the next process
        assert stored == {"bfloat16 4 96x64": True, "bfloat16 8 96x64": False, "bfloat16 16 96x64": False}
        big = small_matmul.gemv_wins(torch.float32, 2, 1 << 15, 1024)  # timed on as much of it as TIMED_BYTES
        assert big and timed[-1] == (2, small_matmul.TIMED_BYTES // 4096, 1024, torch.float32)
        monkeypatch.setattr(small_matmul, "_timed", {})
        forget_profile()
        assert small_matmul.gemv_wins(torch.bfloat16, 3, 96, 64) and len(timed) == 4  # the stored verdict
        x, w = torch.randn(3, 64).to(torch.bfloat16), torch.randn(96, 64).to(torch.bfloat16)
        if native.library() is not None:  # the kernel's fp32 sums handed out as asked
            assert small_matmul.linear(x, w, sums_dtype=torch.float32).dtype == torch.float32
    finally:
        monkeypatch.undo()
        forget_profile()


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("name", ["all-gpu", "one-row-batches", "cpu-attention-cache-split", "weights-disk"])
def test_the_engine_with_the_kernel_at_every_row_count_matches_transformers(tiny_models, references, monkeypatch,
                                                                           family, name):
    """The tests' profile never picks the kernel (its fixed rates have none): here it multiplies every dense
    product of the model (biases: OPT), prefill included, and greedy outputs stay token-identical to
    transformers, logits within fp32 summation-order differences."""
    monkeypatch.setattr(small_matmul, "gemv_wins", lambda *a: True)
    check_against_reference(tiny_models[family][0], references[family], POLICIES[name])
