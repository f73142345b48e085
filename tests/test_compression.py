"""Tests for flexgen_lite.kernels.compression (group-wise min-max quantization)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgen_lite.kernels.compression import (
    CompressionConfig,
    QuantizedTensor,
    compressed_nbytes,
    dequantize,
    quantize,
)

FP16_MAX = 65504.0
# Slack for fp32 arithmetic on top of half a step (see the module docstring):
# eps = 2**-20 * (|x| + |min| + levels * scale).
ARITH_EPS = 2.0**-20
# Unit roundoff of bf16 (8 significant bits): casting y to bf16 moves it by <= |y| * 2**-8.
BF16_U = 2.0**-8

shapes = st.lists(st.integers(1, 24), min_size=1, max_size=3).map(tuple)
configs = st.builds(
    CompressionConfig,
    bits=st.sampled_from([4, 8]),
    group_size=st.sampled_from([1, 2, 3, 5, 7, 16, 64]),
    group_dim=st.sampled_from([0, -1]),
)


def make_input(
    shape: tuple[int, ...], seed: int, kind: str, dtype: torch.dtype
) -> torch.Tensor:
    """Random test data: ``kind`` picks the value distribution."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "tiny":
        x = x * 1e-7
    elif kind == "huge":
        x = x * 2e4
    elif kind == "mixed":  # per-element magnitudes from 1e-7 to 1e4
        exps = torch.randint(-7, 5, shape, generator=gen).double()
        x = x * 10.0**exps
    elif kind == "offset":  # narrow range far from zero
        x = 1000.0 + x * 0.01
    return x.clamp(-6e4, 6e4).to(dtype)


def per_element(stat: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """Broadcast per-group ``scale``/``minimum`` (as fp32) to the original shape."""
    dim = q.config.group_dim % len(q.shape)
    full = stat.float().repeat_interleave(q.config.group_size, dim=dim)
    return full.narrow(dim, 0, q.shape[dim])


def check_bound(x: torch.Tensor, q: QuantizedTensor) -> None:
    """|dequantize(q) - x| <= scale/2 + eps elementwise, in fp32 and bf16 output."""
    xf = x.float()
    scale, minimum = per_element(q.scale, q), per_element(q.minimum, q)
    levels = 2**q.config.bits - 1
    bound = scale / 2 + ARITH_EPS * (xf.abs() + minimum.abs() + levels * scale)
    y = dequantize(q, torch.float32)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    err = (y - xf).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    y16 = dequantize(q, torch.bfloat16)
    assert y16.dtype == torch.bfloat16
    assert ((y16.float() - xf).abs() <= bound + y.abs() * BF16_U).all()


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    config=configs,
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["normal", "tiny", "huge", "mixed", "offset"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_roundtrip_error_within_half_step(shape, config, seed, kind, dtype):
    x = make_input(shape, seed, kind, dtype)
    q = quantize(x, config)
    assert q.data.dtype == torch.uint8
    assert q.scale.dtype == q.minimum.dtype == torch.float16
    assert q.shape == shape
    check_bound(x, q)


@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    config=configs,
    value=st.sampled_from([0.0, -0.0, 1.0, -3.5, 1e-7, -6e4, 6e4, 65504.0]),
)
def test_constant_groups_exact(shape, config, value):
    x = torch.full(shape, value)
    q = quantize(x, config)
    assert torch.isfinite(q.scale).all() and torch.isfinite(q.minimum).all()
    y = dequantize(q, torch.float32)
    exact = torch.tensor(value, dtype=torch.float16).float()  # value as stored in fp16
    if exact == value:
        assert torch.equal(y, x)
    else:  # not fp16-representable (1e-7): still within the bound, no NaN/inf
        check_bound(x, q)


def test_extreme_mixture():
    x = torch.tensor(
        [
            [-6e4, 6e4, 1e-7, -1e-7],
            [0.0, 1e-7, 2e-7, 3e-7],
            [65504.0, -65504.0, 0.0, 1.0],
        ]
    )
    for config in (
        CompressionConfig(4, 4, -1),
        CompressionConfig(8, 2, 0),
        CompressionConfig(4, 3, 0),
    ):
        check_bound(x, quantize(x, config))


def test_out_of_fp16_range_saturates():
    x = torch.tensor([-1e6, 0.0, 1e6, 5.0])
    y = dequantize(quantize(x, CompressionConfig(8, 4, 0)), torch.float32)
    assert torch.isfinite(y).all()
    assert y[0] == -FP16_MAX and y[2] == FP16_MAX


@pytest.mark.parametrize("bits", [4, 8])
def test_fp16_output_never_overflows(bits):
    # the top code times the rounded-up scale can land above 65504 before clamping
    x = torch.tensor([-65504.0, 65504.0, 65000.0, -100.0])
    q = quantize(x, CompressionConfig(bits, 4, 0))
    y = dequantize(q, torch.float16)
    assert torch.isfinite(y).all()
    check_bound(x, q)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_dim", [0, 1, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grid_values_exact(bits, group_dim, dtype):
    """Values on the quantization grid (each group spans all codes) round-trip exactly."""
    levels = 2**bits - 1
    gen = torch.Generator().manual_seed(bits + group_dim)
    n_groups, other = 3, 5
    # each group along group_dim is a permutation of 0..levels, mapped to -3 + 0.5 * k
    groups = torch.stack(
        [torch.randperm(levels + 1, generator=gen) for _ in range(n_groups * other)]
    )
    x = (-3 + 0.5 * groups.float()).view(other, n_groups * (levels + 1))
    x = x.movedim(1, group_dim) if group_dim == 0 else x.contiguous()
    x = x.to(dtype)
    q = quantize(x, CompressionConfig(bits, levels + 1, group_dim))
    assert torch.equal(q.scale, torch.full_like(q.scale, 0.5))
    assert torch.equal(q.minimum, torch.full_like(q.minimum, -3.0))
    assert torch.equal(dequantize(q, dtype), x)


def test_nibble_layout():
    x = torch.arange(16.0)
    q = quantize(x, CompressionConfig(4, 16, 0))
    assert q.data.tolist() == [k | (k + 1) << 4 for k in range(0, 16, 2)]
    # odd number of codes: the last byte holds one code in its low nibble
    q3 = quantize(torch.tensor([0.0, 15.0, 7.0]), CompressionConfig(4, 3, 0))
    assert q3.data.tolist() == [0 | 15 << 4, 7]
    assert dequantize(q3, torch.float32).tolist() == [0.0, 15.0, 7.0]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 20), min_size=1, max_size=4).map(tuple),
    config=configs,
)
def test_compressed_nbytes_matches(shape, config):
    q = quantize(torch.randn(shape), config)
    assert compressed_nbytes(shape, config) == q.nbytes
    assert compressed_nbytes(torch.Size(shape), config) == q.nbytes
    assert dequantize(q, torch.float32).shape == shape


def test_compression_ratio_4bit_group64():
    shape, config = (2048, 2048), CompressionConfig(bits=4, group_size=64, group_dim=0)
    n = math.prod(shape)
    nbytes = compressed_nbytes(shape, config)
    assert nbytes == n // 2 + 4 * n // 64  # 4 bits per code + two fp16 per 64 elements
    ratio = 2 * n / nbytes
    assert ratio == pytest.approx(16 / 4.5)
    assert 3.5 < ratio < 4


def test_out_buffer_is_written():
    x = torch.randn(6, 10)
    q = quantize(x, CompressionConfig(4, 4, -1))
    for dtype in (torch.float32, torch.bfloat16):
        buf = torch.full((6, 10), float("nan"), dtype=dtype)
        res = dequantize(q, dtype, out=buf)
        assert res is buf
        assert torch.equal(buf, dequantize(q, dtype))
    with pytest.raises(ValueError):
        dequantize(q, torch.float32, out=torch.empty(6, 11))
    with pytest.raises(ValueError):
        dequantize(q, torch.float32, out=torch.empty(6, 10, dtype=torch.float16))


def test_to_and_device():
    x = torch.randn(4, 8)
    q = quantize(x, CompressionConfig(4, 8, 0))
    assert q.device == torch.device("cpu")
    moved = q.to("meta")
    assert moved is not q and moved.device.type == "meta"
    assert all(
        t.device.type == "meta" for t in (moved.data, moved.scale, moved.minimum)
    )
    assert (
        moved.shape == q.shape and moved.config == q.config and moved.nbytes == q.nbytes
    )
    back = q.to(torch.device("cpu"), non_blocking=True)
    assert torch.equal(dequantize(back, torch.float32), dequantize(q, torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory():
    q = quantize(torch.randn(4, 8), CompressionConfig(4, 8, 0)).pin_memory()
    assert q.data.is_pinned() and q.scale.is_pinned() and q.minimum.is_pinned()


def test_config_validation():
    with pytest.raises(ValueError, match="bits"):
        CompressionConfig(bits=3)
    with pytest.raises(ValueError, match="bits"):
        CompressionConfig(bits=4.0)
    with pytest.raises(ValueError, match="group_size"):
        CompressionConfig(group_size=0)
    with pytest.raises(ValueError, match="group_size"):
        CompressionConfig(group_size=-4)
    with pytest.raises(ValueError, match="group_dim"):
        quantize(torch.randn(4, 4), CompressionConfig(group_dim=2))
    with pytest.raises(ValueError):
        quantize(torch.tensor(1.0), CompressionConfig())
    with pytest.raises(TypeError):
        quantize(torch.arange(8), CompressionConfig(4, 4, 0))
    assert CompressionConfig() == CompressionConfig(4, 64, 0)
