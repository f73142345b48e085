"""The C decode attention (`native.decode_attention`, used by `attention.attend` for one new token on a CPU)
against torch's scaled_dot_product_attention, and the engine decoding through it. Its agreement with
transformers end to end is test_parity's (every placement decodes through it on a CPU)."""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing

import pytest
import torch
import torch.nn.functional as F

import flexgen_lite.kernels.attention as attention
from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.kernels import native

from .conftest import PROMPTS, forget_native, other_native_build
from .test_parity import P

# (batch, query heads, kv heads, head dim, positions seen, cache capacity): grouped heads, a head dim that is
# not a multiple of the 16 lanes, a single position, a longer cache, grouped heads of 64 and 128 (whose bf16 value
# sums stay in registers)
SHAPES = [(4, 8, 8, 64, 13, 16), (3, 6, 2, 72, 9, 11), (2, 4, 1, 128, 1, 4), (5, 2, 2, 16, 40, 40),
          (3, 12, 4, 64, 37, 40), (2, 6, 2, 128, 21, 24)]


def _case(shape, dtype, seed=0):
    b, heads, kv_heads, d, seen, capacity = shape
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, b, kv_heads, capacity, d, generator=g).to(dtype)
    q = torch.randn(b, heads, 1, d, generator=g).to(dtype)
    mask = torch.rand(b, 1, 1, seen, generator=g) > 0.3
    mask[..., -1] = True  # the new token always sees itself
    return q, cache[0, :, :, :seen], cache[1, :, :, :seen], mask  # k, v: views of a longer cache, as the engine's


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_c_decode_attention_matches_sdpa(shape, dtype):
    q, k, v, mask = _case(shape, dtype)
    out = native.decode_attention(q, k, v, mask)
    assert out is not None and out.dtype == dtype and out.shape == q.shape
    exact = _sdpa(q.float(), k.float(), v.float(), mask)
    if dtype == torch.float32:
        torch.testing.assert_close(out, exact, rtol=1e-4, atol=1e-5)
    else:  # fp32 inside, one rounding at the end: no further from the exact result than torch's own kernel
        ours, torchs = (out.float() - exact).abs().max(), (_sdpa(q, k, v, mask).float() - exact).abs().max()
        assert ours <= torchs * 1.01 + 1e-6


def _exact_with_sinks(q, k, v, mask, sinks):
    """fp64: each head's sink logit beside its scores in the softmax, its share dropped (gpt-oss)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
    sink = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    return torch.cat((scores, sink), -1).softmax(-1)[..., :-1] @ v


@pytest.mark.parametrize("position_major", [False, True], ids=["head-major", "position-major"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_sinks_take_their_share_of_each_softmax(shape, dtype, position_major):
    """Every path of the kernel (one head per kv head, grouped heads of 64 and 128, position-major blocks of
    heads, fp32) with each head's sink logit in its denominator: within 1e-5 of the exact result in fp32, no
    further from it than transformers' eager attention in 16 bits; a row with every position masked: zeros."""
    q, k, v, mask = _case(shape, dtype)
    if position_major:
        k, v = (x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) for x in (k, v))
    mask[0] = False
    sinks = torch.randn(shape[1], generator=torch.Generator().manual_seed(4)) * 2
    out = native.decode_attention(q, k, v, mask, sinks=sinks)
    exact = _exact_with_sinks(q, k, v, mask, sinks)
    exact[0] = 0
    error = (out.double() - exact).abs()
    assert (out.double() - _exact_with_sinks(q, k, v, mask, sinks + 20)).abs().max() > 100 * error.max()  # they count
    if dtype == torch.float32:
        assert error.max() <= 1e-5, float(error.max())
    else:  # no further from it than transformers' eager attention in the same dtype (scored_attend computes it)
        theirs = (attention.scored_attend(q, k, v, mask, sinks=sinks).double() - exact)[1:].abs().max()
        assert error.max() <= theirs * 1.01 + 1e-6, (float(error.max()), float(theirs))
    assert native.decode_attention(q, k, v, mask, sinks=sinks[1:]) is None  # one per query head


@pytest.mark.parametrize("march", [["-march=x86-64-v3"], ["-march=native", "-mno-avx512bf16"]], ids=str)
def test_other_builds_match_sdpa(monkeypatch, march):
    """attention.c built for machines without AVX-512 (AVX2's 8 lanes: fp32 grouped heads read once for the group,
    plain C loops for the rest) and with AVX-512 but without its bf16 dot products (grouped heads' keys converted to
    fp32) is as close to the exact result as torch's kernel, in bf16 and fp32."""
    other = other_native_build(march)
    monkeypatch.setattr(native, "library", lambda: other)
    monkeypatch.setattr(native, "team_threads", lambda: 0)  # built without OpenMP: its ranges on Python threads
    for shape, dtype, position_major in itertools.product(SHAPES, (torch.bfloat16, torch.float32), (False, True)):
        q, k, v, mask = _case(shape, dtype)
        if position_major:  # the cache across a link: (L, rows, kv_heads, d) seen as (rows, kv_heads, L, d)
            k, v = (x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) for x in (k, v))
        out, exact = native.decode_attention(q, k, v, mask), _sdpa(q.float(), k.float(), v.float(), mask)
        ours, torchs = (out.float() - exact).abs().max(), (_sdpa(q, k, v, mask).float() - exact).abs().max()
        assert ours <= torchs * 1.01 + 1e-6, (shape, position_major)
        sinks = torch.linspace(-2, 2, shape[1])
        out, exact = native.decode_attention(q, k, v, mask, sinks=sinks), _exact_with_sinks(q, k, v, mask, sinks)
        theirs = (attention.scored_attend(q, k, v, mask, sinks=sinks).double() - exact).abs().max()
        assert (out.double() - exact).abs().max() <= theirs * 1.01 + 1e-6, (shape, position_major, "sinks")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 12, 4, 64, 7, 8), (2, 8, 2, 128, 5, 5)], ids=str)
def test_a_row_with_every_position_masked_gets_zeros_with_grouped_heads(shape, dtype):
    q, k, v, mask = _case(shape, dtype)
    mask[1] = False
    out = native.decode_attention(q, k, v, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and bool(out[0].abs().sum() > 0)


def test_a_row_with_every_position_masked_gets_zeros():
    q, k, v, mask = _case((3, 4, 4, 32, 6, 6), torch.float32)
    mask[1] = False
    out = native.decode_attention(q, k, v, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[[0, 2]], _sdpa(q, k, v, mask)[[0, 2]], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (40, 20), (12, 3), (32, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d,seen", [(48, 21), (64, 70), (128, 21), (128, 77)])
def test_position_major_cache_walked_by_blocks_of_heads(heads, kv_heads, dtype, d, seen):
    """The cache across a link, (max_len, rows, kv_heads, d) attended through a (rows, kv_heads, L, d) view: kv
    heads walked in blocks (a last partial one; one kv head with 32 query heads); bf16 in two passes (keys, then
    values, the latter 32 positions at a time: lengths past that, an odd one), other dtypes in one with online
    softmax. A row with every position masked gets zeros."""
    g = torch.Generator().manual_seed(heads)
    b = 3
    k_pos, v_pos = (torch.randn(seen + 5, b, kv_heads, d, generator=g).to(dtype) for _ in range(2))
    k, v = k_pos.permute(1, 2, 0, 3)[:, :, :seen], v_pos.permute(1, 2, 0, 3)[:, :, :seen]
    q = torch.randn(b, heads, 1, d, generator=g).to(dtype)
    mask = torch.rand(b, 1, 1, seen, generator=g) > 0.3
    mask[0, ..., -1], mask[2] = True, False
    out = native.decode_attention(q, k, v, mask)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    q, k, v, mask, out = q[:2], k[:2], v[:2], mask[:2], out[:2]
    exact = _sdpa(q.float(), k.float(), v.float(), mask)
    if dtype == torch.float32:
        torch.testing.assert_close(out, exact, rtol=1e-4, atol=1e-5)
    else:
        ours, torchs = (out.float() - exact).abs().max(), (_sdpa(q, k, v, mask).float() - exact).abs().max()
        assert ours <= torchs * 1.01 + 1e-6


@pytest.mark.parametrize("position_major", [False, True])
def test_threads_split_the_work_and_change_no_value(monkeypatch, position_major):
    """Work items handed out in chunks to pool threads (here 4, whatever the cores) give what one thread gives,
    bit for bit: each item is computed alone."""
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(2, 30, 6, 2, 32, generator=g).to(torch.bfloat16)  # position-major: (L, rows, heads, d)
    if position_major:
        k, v = cache[0].permute(1, 2, 0, 3), cache[1].permute(1, 2, 0, 3)
    else:
        k, v = cache[0].permute(1, 2, 0, 3).contiguous(), cache[1].permute(1, 2, 0, 3).contiguous()
    q = torch.randn(6, 4, 1, 32, generator=g).to(torch.bfloat16)
    mask = torch.ones(6, 1, 1, 30, dtype=torch.bool)
    one = native.decode_attention(q, k, v, mask)
    monkeypatch.setattr(native, "threads", lambda: 4)
    monkeypatch.setattr(native, "MIN_WORK", 1)
    assert torch.equal(native.decode_attention(q, k, v, mask), one)


def test_parallel_covers_every_item_once(monkeypatch):
    monkeypatch.setattr(native, "threads", lambda: 3)
    seen = []
    native.parallel(lambda begin, end: seen.extend(range(begin, end)), 37)
    assert sorted(seen) == list(range(37))
    seen.clear()
    native.parallel(lambda begin, end: seen.extend(range(begin, end)), 37, cost=10)  # too little: one thread
    assert seen == list(range(37))


def _covered_in_child() -> list[int]:
    seen = []
    native.parallel(lambda begin, end: seen.extend(range(begin, end)), 12)
    return sorted(seen)


def test_a_forked_child_makes_a_pool_of_its_own(monkeypatch):
    """The parent's pool threads do not exist in a forked child: it must not queue work for them."""
    monkeypatch.setattr(native, "threads", lambda: 3)
    assert _covered_in_child() == list(range(12))  # the pool is made here
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_covered_in_child).get(timeout=60) == list(range(12))


def test_what_the_kernel_does_not_take_is_left_to_sdpa():
    q, k, v, mask = _case(SHAPES[0], torch.float32)
    assert native.decode_attention(q.expand(-1, -1, 2, -1), k, v, mask) is None  # two query positions (prefill)
    assert native.decode_attention(q, k.to(torch.bfloat16), v, mask) is None  # mixed dtypes
    assert native.decode_attention(q, k.transpose(-1, -2), v, mask) is None  # rows of the head dim not contiguous


def test_without_the_library_attend_is_sdpa(monkeypatch):
    monkeypatch.setenv("FLEXGEN_LITE_NATIVE", "0")
    forget_native()
    try:
        q, k, v, mask = _case(SHAPES[1], torch.float32)
        assert native.decode_attention(q, k, v, mask) is None
        assert not attention.native_decode_agrees()
        assert torch.equal(attention.attend(q, k, v, mask), _sdpa(q, k, v, mask))
    finally:
        forget_native()  # read again lazily, after the environment is restored


def _generate(model_dir, dtype: str):
    policy = dataclasses.replace(P((100, 0, 100, 0, 100, 0), gbs=2, nb=2), dtype=dtype)
    with FlexGenLite(str(model_dir), policy=policy) as m:
        return m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=5, stop_at_eos=False), return_logits=True)


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_decodes_through_it_as_through_sdpa(tiny_models, monkeypatch, family, dtype):
    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a: calls.append(1) or real(*a))
    ids, logits = _generate(tiny_models[family][0], dtype)
    assert calls  # every decode step of every layer
    monkeypatch.setattr(attention, "native_decode_agrees", lambda: False)
    calls.clear()
    sdpa_ids, sdpa_logits = _generate(tiny_models[family][0], dtype)
    assert not calls and ids == sdpa_ids
    if dtype == "float32":
        for ours, theirs in zip(logits, sdpa_logits, strict=True):
            for step in range(len(theirs)):  # within 1e-5 of each step's largest |logit|
                assert (ours[step] - theirs[step]).abs().max() <= 1e-5 * theirs[step].abs().max()
        return
    # bf16: the two round differently (ours once, from fp32); ours is no further from the fp32 model's logits
    exact = _generate(tiny_models[family][0], "float32")
    ours, torchs = _error((ids, logits), exact), _error((sdpa_ids, sdpa_logits), exact)
    print(f"bf16 logits off the fp32 model's: {ours:.4f} (ours), {torchs:.4f} (SDPA)")
    assert ours <= 1.1 * torchs


def _error(run, exact) -> float:
    """The largest |difference| of a step's logits from the fp32 run's, as a share of that step's largest |logit|,
    over the steps whose context (the tokens generated before) is the same in both runs."""
    worst = 0.0
    for ids, logits, exact_ids, exact_logits in zip(*run, *exact, strict=True):
        for step in range(len(exact_logits)):
            if ids[:step] != exact_ids[:step]:
                break
            diff = (logits[step].float() - exact_logits[step]).abs().max() / exact_logits[step].abs().max()
            worst = max(worst, float(diff))
    return worst
