"""The C prefill attention (kernels/prefill_attention.py over native/prefill.c) against torch's
scaled_dot_product_attention, where it applies and where it must decline, and the engine prefilling through it
against transformers' model (via the SDPA run and the fp32 run)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import flexgen_lite.kernels.attention as attention
from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.kernels import native
from flexgen_lite.kernels import prefill_attention as prefill
from flexgen_lite.system.hardware import HardwareProfile

from .conftest import PROMPTS, other_native_build, synthetic_profile
from .test_decode_attention import _error, _exact_with_sinks
from .test_parity import LOGITS_ATOL, P

BF16, F32 = native.OUT_KIND[torch.bfloat16], native.OUT_KIND[torch.float32]
needs_kernel = pytest.mark.skipif(not (native.library() and native.library().prefill_available(BF16)),
                                  reason="this CPU lacks AVX512-BF16: the kernel declines (tested below)")
needs_fp32 = pytest.mark.skipif(not (native.library() and native.library().prefill_available(F32)),
                                reason="this CPU lacks AVX-512 and AVX2: the fp32 kernel declines (tested below)")

# (batch, query heads, kv heads, query rows, keys, head dim): ungrouped and grouped, a last partial block of
# rows and of keys, head dims 32 to 128, more keys than rows (a prefill after cached positions)
SHAPES = [(2, 4, 4, 16, 16, 64), (3, 6, 2, 37, 37, 64), (2, 8, 1, 50, 50, 128), (1, 2, 2, 5, 5, 32),
          (2, 4, 2, 33, 70, 80), (2, 3, 3, 130, 130, 128)]


def _case(shape, seed=0, pads=(0, 3, 11), dtype=torch.bfloat16):
    """q, k, v and the engine's mask: causal over the last `t` of `length` positions, each row's left padding
    hidden, a padding row seeing itself."""
    b, heads, kv_heads, t, length, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, t, d, generator=g).to(dtype)
    k, v = (torch.randn(b, kv_heads, length, d, generator=g).to(dtype) for _ in range(2))
    rows, keys = torch.arange(length - t, length)[:, None], torch.arange(length)[None]
    pad = torch.tensor([pads[i % len(pads)] for i in range(b)])[:, None, None]
    mask = (keys <= rows)[None] & ((keys >= pad) | (keys == rows)[None])
    return q, k, v, mask[:, None]


def _sdpa(q, k, v, mask, causal=False):
    grouped = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=grouped)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_sdpa_as_closely_as_torch(shape):
    """Within 1.25x of torch's own distance from the exact (fp32) result: both round the softmax weights to
    bf16 before multiplying the values, and the output once."""
    q, k, v, mask = _case(shape)
    out = prefill.prefill_attention(q, k, v, mask)
    assert out is not None and out.shape == q.shape and out.dtype == torch.bfloat16
    exact = _sdpa(q.float(), k.float(), v.float(), mask)
    ours, torchs = (out.float() - exact).abs().max(), (_sdpa(q, k, v, mask).float() - exact).abs().max()
    assert ours <= 1.25 * torchs, (float(ours), float(torchs))


@needs_fp32
@pytest.mark.parametrize("build", ["native", "avx2"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_matches_sdpa_as_closely_as_torch(shape, build, monkeypatch):
    """fp32 (a CPU without bf16 instructions): within 1e-5 of the exact (fp64) result, and at most twice
    torch's distance from it (measured: equal to 1.1x); built for this CPU and for AVX2 CPUs without AVX-512 (8
    rows in the lanes, blocks of 8 keys; without OpenMP, its ranges on Python threads)."""
    if build == "avx2":
        other = other_native_build(["-march=x86-64-v3"])
        monkeypatch.setattr(native, "library", lambda: other)
        monkeypatch.setattr(native, "team_threads", lambda: 0)
    q, k, v, mask = _case(shape, dtype=torch.float32)
    out = prefill.prefill_attention(q, k, v, mask)
    assert out is not None and out.shape == q.shape and out.dtype == torch.float32
    exact = _sdpa(q.double(), k.double(), v.double(), mask)
    ours, torchs = (out.double() - exact).abs().max(), (_sdpa(q, k, v, mask).double() - exact).abs().max()
    assert ours <= 1e-5 and ours <= 2 * torchs, (float(ours), float(torchs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "float32-avx2"], ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:5], ids=str)
def test_sinks_take_their_share_of_each_softmax(shape, dtype, monkeypatch):
    """With each head's sink logit in the denominator: fp32 within 1e-5 of the exact result (on this CPU's build
    and the AVX2 one); bf16 within 1.25x of torch's distance from it (scores and the sink's softmax in fp32,
    weights rounded to bf16)."""
    if dtype == "float32-avx2":
        other, dtype = other_native_build(["-march=x86-64-v3"]), torch.float32
        monkeypatch.setattr(native, "library", lambda: other)
        monkeypatch.setattr(native, "team_threads", lambda: 0)
    kind = BF16 if dtype == torch.bfloat16 else F32
    if not (native.library() and native.library().prefill_available(kind)):
        pytest.skip("this CPU lacks the instructions for this dtype (declining is tested below)")
    q, k, v, mask = _case(shape, dtype=dtype)
    sinks = torch.randn(shape[1], generator=torch.Generator().manual_seed(9)) * 3
    out = prefill.prefill_attention(q, k, v, mask, sinks)
    exact = _exact_with_sinks(q, k, v, mask, sinks)
    ours = (out.double() - exact).abs().max()
    assert (out.double() - _exact_with_sinks(q, k, v, mask, sinks - 20)).abs().max() > 100 * ours  # sinks count
    if dtype == torch.float32:
        assert ours <= 1e-5, float(ours)
    else:
        torchs = (attention.scored_attend(q, k, v, mask, sinks=sinks).double() - exact).abs().max()
        assert ours <= 1.25 * torchs, (float(ours), float(torchs))
    assert prefill.prefill_attention(q, k, v, mask, sinks[1:]) is None  # one per query head


@needs_kernel
def test_causal_without_a_mask_is_the_tril_mask():
    q, k, v, _ = _case((2, 4, 2, 45, 45, 64), pads=(0,))
    tril = torch.ones(45, 45, dtype=torch.bool).tril()[None, None].expand(2, 1, 45, 45)
    assert torch.equal(prefill.prefill_attention(q, k, v, None), prefill.prefill_attention(q, k, v, tril))
    assert prefill.prefill_attention(q, k[:, :, :30], v[:, :, :30], None) is None  # causal needs as many keys


@needs_kernel
def test_what_it_does_not_take_is_declined():
    q, k, v, mask = _case((2, 4, 2, 20, 20, 64))
    holes = mask.clone()
    holes[0, 0, 10, 2] = False  # row 10 sees keys 0-1 and 3-10: not one interval
    assert prefill.intervals(holes, 20, 20) is None and prefill.prefill_attention(q, k, v, holes) is None
    blind = mask.clone()
    blind[1, 0, 4] = False  # a row that sees nothing
    assert prefill.prefill_attention(q, k, v, blind) is None
    assert prefill.prefill_attention(q.half(), k.half(), v.half(), mask) is None  # bf16 and fp32 only
    assert prefill.prefill_attention(q[..., :24], k[..., :24], v[..., :24], mask) is None  # head dim 16k
    assert prefill.prefill_attention(q, k.transpose(-1, -2)[..., :20, :], v, mask) is None  # rows not contiguous


@needs_kernel
def test_a_mask_edited_in_place_is_read_again():
    """Intervals are kept for the mask a step's layers share; an in-place edit (a new version) reads it anew."""
    q, k, v, mask = _case((1, 2, 2, 12, 12, 32), pads=(0,))
    first = prefill.prefill_attention(q, k, v, mask)
    mask[0, 0, :, :4] = False
    mask[0, 0, torch.arange(4), torch.arange(4)] = True
    again = prefill.prefill_attention(q, k, v, mask)
    assert not torch.equal(first, again)
    assert torch.equal(again, prefill.prefill_attention(q, k, v, mask.clone()))


@needs_kernel
@pytest.mark.parametrize("threads", [4, 64], ids=["4-threads", "64-threads"])
def test_threads_split_the_work_and_change_no_value(monkeypatch, threads):
    """On the Python pool's ranges instead of OpenMP's, and with each head's rows dealt to several items (64
    threads for 2 sequences of 4 heads): the same bytes."""
    q, k, v, mask = _case((2, 4, 2, 70, 70, 64))
    one = prefill.prefill_attention(q, k, v, mask)
    monkeypatch.setattr(native, "team_threads", lambda: 0)
    monkeypatch.setattr(native, "threads", lambda: threads)
    monkeypatch.setattr(native, "MIN_WORK", 1)
    assert torch.equal(prefill.prefill_attention(q, k, v, mask), one)


@pytest.mark.parametrize("march", [["-march=x86-64-v3"], ["-march=native", "-mno-avx512bf16"], ["-march=x86-64"]],
                         ids=str)
def test_builds_without_the_bf16_instruction_decline(monkeypatch, march):
    """bf16 goes to torch; fp32 runs where the build has AVX-512 or AVX2 (as close to exact as on this build), not
    on plain x86-64."""
    here, other = native.library(), other_native_build(march)
    fp32 = march == ["-march=x86-64-v3"] or "-march=native" in march and bool(here and here.prefill_available(F32))
    monkeypatch.setattr(native, "library", lambda: other)
    assert other.prefill_available(BF16) == 0
    q, k, v, mask = _case(SHAPES[1])
    assert prefill.prefill_attention(q, k, v, mask) is None
    out, kernel = attention.attend_named(q, k, v, mask)
    assert kernel == "sdpa-cpu" and torch.equal(out, _sdpa(q, k, v, mask))
    assert other.prefill_available(F32) == int(fp32)
    monkeypatch.setattr(native, "team_threads", lambda: 0)
    q, k, v, mask = _case(SHAPES[1], dtype=torch.float32)
    out = prefill.prefill_attention(q, k, v, mask)
    assert (out is not None) == fp32
    if fp32:
        exact = _sdpa(q.double(), k.double(), v.double(), mask)
        assert (out.double() - exact).abs().max() <= 1e-5


def test_the_profile_decides(monkeypatch):
    """Used where the stored profile measured it faster than torch's, in that dtype; never without a profile."""
    hw = synthetic_profile()
    assert not hw.prefill_native_wins("bfloat16")
    assert hw.prefill_attention_rate("bfloat16") == hw.sdpa_prefill["bfloat16"]
    faster = dataclasses.replace(hw, prefill_native={"bfloat16": 3 * hw.sdpa_prefill["bfloat16"]})
    assert faster.prefill_native_wins("bfloat16") and not faster.prefill_native_wins("float32")
    assert faster.prefill_attention_rate("bfloat16") == 3 * hw.sdpa_prefill["bfloat16"]
    assert HardwareProfile.from_json(faster.to_json()).prefill_native == faster.prefill_native
    monkeypatch.setattr(prefill, "cpu_profile", lambda: faster)
    assert prefill.prefill_wins(torch.bfloat16) == prefill.prefill_agrees()
    assert not prefill.prefill_wins(torch.float32)
    monkeypatch.setattr(prefill, "cpu_profile", lambda: None)
    assert not prefill.prefill_wins(torch.bfloat16)


def _generate(model_dir, dtype: str):
    policy = dataclasses.replace(P((100, 0, 100, 0, 100, 0), gbs=2, nb=2), dtype=dtype)
    with FlexGenLite(str(model_dir), policy=policy) as m:
        return m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=5, stop_at_eos=False), return_logits=True)


@needs_kernel
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_the_engine_prefills_through_it_as_through_sdpa(tiny_models, monkeypatch, family):
    """bf16 prompts (some padded) through the kernel: the same tokens as through SDPA, and logits no further
    from the fp32 model's (whose tokens test_parity checks against transformers)."""
    calls = []
    real = prefill.prefill_attention
    monkeypatch.setattr(attention, "prefill_attention", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(attention, "prefill_wins", lambda dtype: dtype == torch.bfloat16)
    ids, logits = _generate(tiny_models[family][0], "bfloat16")
    prefills = 2 * -(-len(PROMPTS) // 2)  # two layers, each GPU batch of 2 prompts
    assert len(calls) == prefills
    monkeypatch.setattr(attention, "prefill_wins", lambda dtype: False)
    sdpa_ids, sdpa_logits = _generate(tiny_models[family][0], "bfloat16")
    assert len(calls) == prefills and ids == sdpa_ids
    exact = _generate(tiny_models[family][0], "float32")
    ours, torchs = _error((ids, logits), exact), _error((sdpa_ids, sdpa_logits), exact)
    assert ours <= 1.1 * torchs, (ours, torchs)


@needs_fp32
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_the_engine_prefills_fp32_through_it_as_transformers(tiny_models, references, monkeypatch, family):
    """fp32 prompts (some padded) through the kernel: transformers' tokens, logits within test_parity's
    tolerance."""
    calls = []
    real = prefill.prefill_attention
    monkeypatch.setattr(attention, "prefill_attention", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(attention, "prefill_wins", lambda dtype: dtype == torch.float32)
    ids, logits = _generate(tiny_models[family][0], "float32")
    assert len(calls) == 2 * -(-len(PROMPTS) // 2)
    ref_ids, ref_logits = references[family]
    assert ids == [row[:5] for row in ref_ids]
    for ours, theirs in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(ours, theirs[:5], atol=LOGITS_ATOL, rtol=0)
