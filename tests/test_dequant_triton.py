"""The fused 4-bit dequantization kernel (dequant_triton.py) against the torch path, bit for bit, run on this CPU by
Triton's interpreter (TRITON_INTERPRET=1). Where triton is not installed these check the fallback instead: the
kernel's own reference test then runs only where triton exists (the `test` extra installs it on Linux x86-64;
benchmarks/gpu_checks.py runs it on a GPU)."""

from __future__ import annotations

import importlib.util
import warnings
from types import SimpleNamespace

import pytest
import torch

from flexgen_lite.kernels import dequant_triton
from flexgen_lite.kernels.compression import (
    CompressionConfig,
    dequantize,
    dequantize_prefix,
    dequantize_reference,
    quantize,
)

HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed: test_fallback_* run instead")

CASES = [  # (shape, group dim, bits[, group size]): padded and unpadded groups, inner == 1 and > 1, odd code counts
    ((64, 128), 1, 4), ((130, 70), 1, 4), ((96, 200), 0, 4), ((3, 100, 7), 1, 4), ((2, 3, 5, 128), -1, 4),
    ((5, 33), 0, 4), ((7, 9), 1, 4), ((64, 96), 0, 8), ((40, 70), 1, 8), ((9, 100), 1, 4, 32), ((300, 5), 0, 4, 128),
]


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FLEXGEN_LITE_TRITON", raising=False)
    dequant_triton.reset()
    yield
    dequant_triton.reset()


@needs_triton
@pytest.mark.parametrize("dtype", dequant_triton.DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_equals_the_torch_path_bit_for_bit(interpret, case, dtype):
    """Exact, not close: both round `code * scale` and then `+ minimum` in fp32 (no FMA), clamp to +-65504 and
    round to nearest even."""
    shape, dim, bits, group = (*case, 64)[:4]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) * 7 + bits)) * 4
    q = quantize(x.to(dtype), CompressionConfig(bits, group, dim))
    want = dequantize_reference(q, dtype, None)
    assert torch.equal(dequant_triton.dequantize(q, dtype), want)
    out = torch.full(shape, float("nan"), dtype=dtype)
    assert dequant_triton.dequantize(q, dtype, out) is out and torch.equal(out, want)
    strided = torch.full((*shape[:-1], shape[-1] + 3), float("nan"), dtype=dtype)[..., :shape[-1]]
    dequant_triton.dequantize(q, dtype, strided)  # a view (the cache's prefix of a slot): through a temporary
    assert torch.equal(strided, want)


@needs_triton
@pytest.mark.parametrize("dtype", dequant_triton.DTYPES)
@pytest.mark.parametrize("d,group,length", [(128, 64, 5), (64, 64, 1), (256, 32, 9), (128, 128, 7)], ids=str)
@pytest.mark.parametrize("layout", ["in-place", "position-major"])
def test_prefix_kernel_reads_a_stored_prefix_into_a_slot_bit_for_bit(interpret, dtype, d, group, length, layout):
    """dequantize_prefix: a cache part's first positions as they are stored (in compute memory (A, B, P, .); across
    the link position-major (P, A, B, .)), each array by its own strides, into the first positions of a longer slot,
    without copies: the torch path's values over the same prefix made contiguous, the slot's rest untouched."""
    config = CompressionConfig(4, group, -1)
    x = torch.randn(3, 2, 11, d, generator=torch.Generator().manual_seed(d + length)) * 4
    if layout == "in-place":
        q = quantize(x.to(dtype), config)
        parts = (q.data.view(3, 2, 11, d // 2), q.scale, q.minimum)
        views = [a[:, :, :length] for a in parts]
    else:
        q = quantize(x.permute(2, 0, 1, 3).contiguous().to(dtype), config)
        parts = (q.data.view(11, 3, 2, d // 2), q.scale, q.minimum)
        views = [a[:length].permute(1, 2, 0, 3) for a in parts]
    slot = torch.full((3, 2, 13, d), float("nan"), dtype=dtype)
    assert dequant_triton.prefix_supported(*views, slot, config)
    got = dequant_triton.dequantize_prefix(*views, slot[:, :, :length], config)
    want = dequantize_reference(quantize(x[:, :, :length].to(dtype), config), dtype, None)
    assert torch.equal(got, want) and bool(slot[:, :, length:].isnan().all())
    fallback = torch.full((3, 2, length, d), float("nan"), dtype=dtype)  # the facade off CUDA: the torch path
    assert torch.equal(dequantize_prefix(*views, fallback, config), want)


@needs_triton
def test_kernel_saturates_like_the_torch_path(interpret):
    """Groups spanning fp16's whole range: min + 15 * scale overshoots 65504 and is clamped, every dtype."""
    x = torch.tensor([[-65504.0] * 32 + [65504.0] * 32, [60000.0] * 63 + [-1.0]])
    q = quantize(x, CompressionConfig(4, 64, 1))
    for dtype in dequant_triton.DTYPES:
        got = dequant_triton.dequantize(q, dtype)
        assert torch.equal(got, dequantize_reference(q, dtype, None))
        assert bool(got.isfinite().all())
        if dtype != torch.bfloat16:  # bf16 rounds 65504 to 65536, as the torch path does
            assert got.float().abs().max() <= 65504


@needs_triton
@pytest.mark.parametrize("shape,dim", [((3, 128), 1), ((3, 100), 1), ((128, 5), 0), ((2, 4, 6, 64), -1)])
def test_self_check_passes_per_kind_and_kernel_is_usable(interpret, shape, dim):
    for dtype in dequant_triton.DTYPES:
        assert dequant_triton.usable(quantize(torch.randn(shape), CompressionConfig(4, 64, dim)), dtype)


@needs_triton
def test_switched_off_by_the_environment(interpret, monkeypatch):
    monkeypatch.setenv("FLEXGEN_LITE_TRITON", "0")
    assert not dequant_triton.usable(quantize(torch.randn(3, 128), CompressionConfig(4, 64, 1)), torch.float16)


def cuda_codes() -> SimpleNamespace:
    """What `usable` reads of a QuantizedTensor on a GPU (only its device, shape and config)."""
    return SimpleNamespace(device=torch.device("cuda", 0), shape=(3, 128), config=CompressionConfig(4, 64, 1))


def test_a_failing_self_check_keeps_the_torch_path(monkeypatch):
    """A kernel that disagrees with the reference is not used; on CUDA that is said once with a warning."""
    monkeypatch.setattr(dequant_triton, "_self_check", lambda *kind: "self-check mismatch (test)")
    monkeypatch.setattr(dequant_triton, "_kernels", lambda interpret: None)
    dequant_triton.reset()
    try:
        with pytest.warns(UserWarning, match="torch path.*self-check mismatch"):
            assert not dequant_triton.usable(cuda_codes(), torch.float16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            assert not dequant_triton.usable(cuda_codes(), torch.bfloat16)
    finally:
        dequant_triton.reset()


@pytest.mark.skipif(HAVE_TRITON, reason="triton is installed: the kernel's tests run instead")
def test_fallback_without_triton():
    """Without triton the kernel is not usable (a warning on CUDA) and dequantize is the torch path."""
    dequant_triton.reset()
    with pytest.warns(UserWarning, match="triton unavailable"):
        assert not dequant_triton.usable(cuda_codes(), torch.float16)
    dequant_triton.reset()
    q = quantize(torch.randn(64, 128), CompressionConfig(4, 64, 1))
    assert torch.equal(dequantize(q, torch.float16), dequantize_reference(q, torch.float16, None))


def test_torch_paths_agree_bit_for_bit():
    """The chunked in-place path (weights) and the vectorized one (everything else) are the same reference."""
    for shape, dim, bits, group in ((*case, 64)[:4] for case in CASES):
        x = torch.randn(shape) * 4
        for dtype in dequant_triton.DTYPES:
            q = quantize(x.to(dtype), CompressionConfig(bits, group, dim))
            out = torch.empty(shape, dtype=dtype)
            assert torch.equal(dequantize(q, dtype, out=out), dequantize(q, dtype))
