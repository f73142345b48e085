"""Prefill attention with sinks from a fused SDPA kernel's log-sum-exp (kernels/sink_attention.py): against fp64
attention with the sink beside the scores, on the CPU (torch's flash attention) and under --device cuda on the GPU
(its memory-efficient kernel); declined, with one warning, where the kernel fails its check. The engine's gpt-oss
prefills go through it wherever the C kernel does not run (tests/test_gpt_oss.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from flexgen_lite.kernels import attention, sink_attention

from .test_decode_attention import _exact_with_sinks


def _case(b, heads, kv_heads, t, length, d, dtype, seed=0):
    """q, k, v and a mask as the engine's: causal over the last t of `length` keys, left padding hidden (a
    padded row seeing itself), a window of 9."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, t, d, generator=g).to(dtype)
    k, v = (torch.randn(b, kv_heads, length, d, generator=g).to(dtype) for _ in "kv")
    rows, keys = torch.arange(length - t, length)[:, None], torch.arange(length)[None]
    pad = torch.tensor([3 * (i % 2) for i in range(b)])[:, None, None]
    mask = ((keys <= rows) & (keys > rows - 9))[None] & ((keys >= pad) | (keys == rows)[None])
    return q, k, v, mask[:, None]


@pytest.fixture
def device(compute_device) -> torch.device:
    return torch.device(compute_device if compute_device.startswith("cuda") else "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 2, 21, 21, 64), (3, 8, 1, 17, 30, 64), (2, 2, 2, 40, 40, 128)], ids=str)
def test_matches_attention_with_the_sink_beside_the_scores(device, shape, dtype):
    """fp32 within 1e-5 of the exact result; bf16 no further from it than the whole-score path in bf16 (as
    transformers' eager attention computes it). Grouped heads, more keys than queries, a length that is not a
    multiple of the bias's alignment."""
    q, k, v, mask = _case(*shape, dtype)
    sinks = torch.linspace(-2, 4, shape[1])
    assert sink_attention.agrees(device, dtype)
    out = sink_attention.attend(*(x.to(device) for x in (q, k, v, mask, sinks))).cpu()
    assert out.dtype == dtype and out.shape == q.shape
    exact = _exact_with_sinks(q, k, v, mask, sinks)
    error = (out.double() - exact).abs().max()
    if dtype == torch.float32:
        assert error <= 1e-5, float(error)
    else:
        theirs = (attention.scored_attend(q, k, v, mask, sinks=sinks).double() - exact).abs().max()
        assert error <= theirs * 1.25 + 1e-6, (float(error), float(theirs))
    assert (out.double() - _exact_with_sinks(q, k, v, mask, sinks - 20)).abs().max() > 100 * error  # sinks count


def test_causal_without_a_mask(device):
    q, k, v, _ = _case(2, 4, 2, 12, 12, 64, torch.float32)
    tril = torch.ones(12, 12, dtype=torch.bool).tril()[None, None]
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    got = sink_attention.attend(*(x.to(device) for x in (q, k, v)), None, sinks.to(device)).cpu()
    torch.testing.assert_close(got.double(), _exact_with_sinks(q, k, v, tril, sinks), atol=1e-5, rtol=0)


def test_a_kernel_that_fails_its_check_is_declined_with_a_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no such kernel here")

    monkeypatch.setattr(sink_attention, "_attend", broken)
    sink_attention.agrees.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q, k, v, mask = _case(1, 2, 2, 5, 5, 64, torch.float32)
            assert sink_attention.attend(q, k, v, mask, torch.zeros(2)) is None
            assert sink_attention.attend(q, k, v, mask, torch.zeros(2)) is None  # checked once
        assert len(caught) == 1 and "no such kernel here" in str(caught[0].message)
        out, kernel = attention.attend_named(q, k, v, mask, native_prefill=False, sinks=torch.zeros(2))
        assert kernel == "sinks"  # the whole scores, as before
    finally:
        sink_attention.agrees.cache_clear()
