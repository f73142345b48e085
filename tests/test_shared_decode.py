"""Decode attention reading a block's shared prompt prefix from one row (attention.c's rows_t): every row stores
the prefix alike (engine/shared_prefix.py), so the rows' shared positions are read from one source row, which
stays in cache, and the output is the same bits as reading each row's own. Checked by giving the other rows'
shared positions garbage: the output must not change."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.engine import cache_attention
from flexgen_lite.engine.decode_fused import FusedDecode
from flexgen_lite.engine.kv_cache import KVCache
from flexgen_lite.engine.shared_prefix import shared_rows
from flexgen_lite.engine.trace import NULL
from flexgen_lite.kernels import native
from flexgen_lite.models.presets import preset_config
from flexgen_lite.planning.cost_model import predict
from flexgen_lite.planning.layout import Workload

from .conftest import FAMILY_CONFIGS, hf_greedy, make_checkpoint, other_native_build, synthetic_profile
from .test_decode_fused import P, all_fused, assert_identical, few_rows_kernels  # noqa: F401 (a fixture)
from .test_parity import LOGITS_ATOL, POLICIES
from .test_shared_prefix import SHARED_PROMPTS, run


def _shared_case(dtype, heads, kv_heads, d, pads, shared, length, position_major, seed=0):
    """q, k, v, mask of len(pads) rows left-padded by `pads`, whose positions [pad, shared) hold one prefix's
    first shared - pad tokens (alike in every row, as a shared prefill writes them); the rest their own."""
    g = torch.Generator().manual_seed(seed)
    rows = len(pads)
    prefix = torch.randn(2, kv_heads, shared, d, generator=g)
    cache = torch.randn(2, rows, kv_heads, length + 3, d, generator=g)
    for r, pad in enumerate(pads):
        cache[:, r, :, :pad] = 0
        cache[:, r, :, pad:shared] = prefix[:, :, :shared - pad]
    cache = cache.to(dtype)
    if position_major:  # (2, L, rows, kv_heads, d) seen as (2, rows, kv_heads, L, d): the cache across a link
        cache = cache.permute(0, 3, 1, 2, 4).contiguous().permute(0, 2, 3, 1, 4)
    k, v = cache[0, :, :, :length], cache[1, :, :, :length]
    q = torch.randn(rows, heads, 1, d, generator=g).to(dtype)
    pad = torch.tensor(pads)
    mask = (torch.arange(length)[None] >= pad[:, None]).view(rows, 1, 1, length)
    return q, k, v, mask, pad


def _spoil(k, v, pad, shared, source):
    """Garbage in every other row's shared positions (NaN would poison the sums if any were read)."""
    for r in range(k.shape[0]):
        if r != source:
            k[r, :, int(pad[r]):shared] = float("nan")
            v[r, :, int(pad[r]):shared] = float("nan")


# (query heads, kv heads, head dim): grouped heads of 64 and 128 (their bf16 kernels), one kv head per query head
# (plain loops), a head dim off the 16 lanes
HEADS = [(6, 2, 64), (8, 2, 128), (4, 4, 32), (3, 1, 40)]


@pytest.mark.parametrize("position_major", [False, True], ids=["head-major", "position-major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads,kv_heads,d", HEADS, ids=str)
def test_shared_positions_read_from_the_source_row_give_the_same_bits(heads, kv_heads, d, dtype, position_major):
    pads, shared, length = [2, 0, 5, 1, 9], 12, 21  # one row padded past the shared columns: it shares nothing
    q, k, v, mask, pad = _shared_case(dtype, heads, kv_heads, d, pads, shared, length, position_major)
    expected = native.decode_attention(q, k, v, mask)
    source, shift, columns = rows = shared_rows(pad, shared)
    assert int(source[0]) == 1 and shift.tolist() == pads
    _spoil(k, v, pad, shared, 1)
    assert native.decode_attention(q, k, v, mask).isnan().any()  # reading its own rows, a row now gets NaN
    out = native.decode_attention(q, k, v, mask, rows)
    assert torch.equal(out, expected)


def test_a_source_row_that_is_padded_too(monkeypatch):
    """No row of the part starts at column 0: the source is the least padded, the others shifted from it."""
    pads, shared = [3, 6, 4], 10
    q, k, v, mask, pad = _shared_case(torch.bfloat16, 6, 2, 64, pads, shared, 17, False, seed=1)
    expected = native.decode_attention(q, k, v, mask)
    rows = shared_rows(pad, shared)
    assert rows[1].tolist() == [0, 3, 1]
    _spoil(k, v, pad, shared, 0)
    assert torch.equal(native.decode_attention(q, k, v, mask, rows), expected)


@pytest.mark.parametrize("march", [["-march=x86-64-v3"], ["-march=native", "-mno-avx512bf16"]],
                         ids=["no-avx512", "no-avx512-bf16"])
def test_other_builds_read_the_source_row_too(monkeypatch, march):
    """attention.c built for machines without AVX-512 (plain loops) or without its bf16 dot products (keys
    converted to fp32): CI's CPU varies."""
    other = other_native_build(march)
    monkeypatch.setattr(native, "library", lambda: other)
    monkeypatch.setattr(native, "team_threads", lambda: 0)
    for heads, kv_heads, d in HEADS:
        for position_major in (False, True):
            q, k, v, mask, pad = _shared_case(torch.bfloat16, heads, kv_heads, d, [1, 0, 4], 9, 15, position_major)
            expected = native.decode_attention(q, k, v, mask)
            _spoil(k, v, pad, 9, 1)
            assert torch.equal(native.decode_attention(q, k, v, mask, shared_rows(pad, 9)), expected)


# ---- the engine -----------------------------------------------------------------------------------------------

def _spoiling_kernel(monkeypatch) -> list[int]:
    """native.decode_attention over a copy of the cache with the shared positions it is told not to read
    spoiled (each row's first unmasked position is its pad); the calls that were told so are counted."""
    real, calls = native.decode_attention, []

    def spoiling(q, k, v, mask, shared=None):
        if shared is not None:
            pad = mask.reshape(len(mask), -1).int().argmax(1)
            k, v = k.clone(), v.clone()
            _spoil(k, v, pad, shared[2], int(shared[0][0]))
            calls.append(len(q))
        return real(q, k, v, mask, shared)

    monkeypatch.setattr(native, "decode_attention", spoiling)
    return calls


@pytest.fixture(scope="module")
def shared_references(tiny_models):
    return {family: hf_greedy(tiny_models[family][1], SHARED_PROMPTS, 6) for family in ("opt", "llama3")}


@pytest.mark.parametrize("family", ["opt", "llama3"])
@pytest.mark.parametrize("name", ["all-gpu", "cache-split-3-tiers", "cpu-attention-cache-split"])
def test_the_engine_reads_a_blocks_prefix_from_one_row(tiny_models, shared_references, monkeypatch, family, name):
    """Every decode step's attention on the CPU (compute memory, a mapped file, host RAM) reads the shared
    positions from one row: with the others' spoiled, the tokens and logits are still transformers'."""
    calls = _spoiling_kernel(monkeypatch)
    ids, logits, shared = run(tiny_models[family][0], POLICIES[name], "cpu")
    assert all(shared) and len(calls) >= 5 * tiny_models[family][1].config.num_hidden_layers
    want_ids, want_logits = shared_references[family]
    assert ids == want_ids
    for ours, theirs in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_the_source_row_finishes_and_another_takes_its_place(tiny_models, shared_references, monkeypatch,
                                                             tmp_path):
    """Rows that finish leave the batch's attention. EOS here: the token the longest prompt (the least padded
    row, the source) makes second; after it the shared positions come from a row still generating."""
    eos = shared_references["llama3"][0][2][1]
    make_checkpoint(tmp_path, "llama3", seed=list(FAMILY_CONFIGS).index("llama3"), eos_token_id=eos)
    sampling, policy = SamplingConfig(max_new_tokens=6, stop_at_eos=True), POLICIES["all-gpu"]
    calls = _spoiling_kernel(monkeypatch)
    with FlexGenLite(str(tmp_path), policy=policy, device="cpu") as m:
        ids = m.generate_ids(SHARED_PROMPTS[:4], sampling)
    monkeypatch.undo()
    with FlexGenLite(str(tmp_path), policy=dataclasses.replace(policy, share_prefix=False), device="cpu") as m:
        assert ids == m.generate_ids(SHARED_PROMPTS[:4], sampling)
    assert len(ids[2]) == 2 and max(map(len, ids)) == 6
    assert min(calls) < max(calls)  # steps after a row left attended over fewer rows


@pytest.mark.usefixtures("few_rows_kernels")
def test_the_fused_step_reads_a_blocks_prefix_from_one_row(tiny_models, monkeypatch):
    """decode_layer.c's steps: the other rows' shared positions spoiled before every step, the logits are still
    the eager path's bit for bit."""
    real = FusedDecode.run

    def spoiling(self, cache, block, b, start):
        pad = block.host_pad()[block.rows(b)]
        for index in range(self.config.num_layers):
            part = cache.parts[index][b][0]
            _spoil(part.k.tensor, part.v.tensor, pad, block.shared, int(pad.argmin()))
        return real(self, cache, block, b, start)

    def on_the_cpu(fused: bool):  # test_decode_fused.generate, on the CPU whatever the test device
        with FlexGenLite(str(tiny_models["llama3"][0]), policy=P(gbs=4, nb=2), device="cpu") as m:
            m.engine.fused_decode = fused and m.engine.fused_decode
            kernels = []
            ids, logits = m.generate_ids(SHARED_PROMPTS, SamplingConfig(max_new_tokens=8, stop_at_eos=False),
                                         return_logits=True,
                                         on_block=lambda _: kernels.append(list(m.engine.times.attention)))
            return ids, logits, kernels

    eager = on_the_cpu(False)
    monkeypatch.setattr(FusedDecode, "run", spoiling)
    fused = on_the_cpu(True)
    assert all_fused(fused[2])
    assert_identical(fused, eager)


def _spoiling_loads(monkeypatch) -> list[int]:
    """KVCache.load, spoiling first the home copies (host RAM) of the shared positions its prefix reads skip;
    the parts read with a prefix are counted."""
    real, reads = KVCache.load, []

    def spoiling(self, layer, batch, length, slots, parity, trace=NULL, prefixes=None):
        for i, prefix in (prefixes or {}).items():
            part = self.parts[layer][batch][i]
            for store in (part.k, part.v):
                for component in getattr(store, "stores", [store]):
                    for row in range(component.positions.shape[1]):
                        if row != prefix.source:  # its own padding included: masked
                            component.positions[:prefix.columns, row] = spoiled(component.dtype)
            reads.append(i)
        return real(self, layer, batch, length, slots, parity, trace, prefixes)

    monkeypatch.setattr(KVCache, "load", spoiling)
    return reads


def spoiled(dtype: torch.dtype):
    return float("nan") if dtype.is_floating_point else 255


@pytest.mark.parametrize("name,compress", [("cache-cpu", False), ("cache-split-3-tiers", False),
                                           ("cache-cpu", True)], ids=str)
def test_across_a_link_the_prefix_crosses_it_for_one_row(tiny_models, shared_references, compute_device,
                                                         monkeypatch, name, compress):
    """cpu+link: the cache parts in host RAM, attended on the device, bring the shared positions over the link
    for one row and spread them there: with the other rows' home copies spoiled (codes, scales and minima of a
    4-bit cache too), the tokens and logits are still transformers' (4-bit, or on a GPU: the same prompts
    computed whole there). Attention reads every row's own positions here, as on a GPU (on cpu+link the C kernel
    would read the source's). On a GPU (`pytest --device cuda`) the link is real."""
    device = "cpu+link" if compute_device == "cpu" else compute_device
    policy = dataclasses.replace(POLICIES[name], compress_cache=compress)
    whole = dataclasses.replace(policy, share_prefix=False)
    want_ids, want_logits = run(tiny_models["llama3"][0], whole, device)[:2] if compress or device != "cpu+link" \
        else shared_references["llama3"]
    reads = _spoiling_loads(monkeypatch)
    monkeypatch.setattr(cache_attention, "part_shared", lambda *_: (None, 0.0))  # as on a GPU: each row's own
    ids, logits, shared = run(tiny_models["llama3"][0], policy, device)
    assert all(shared) and reads
    assert ids == want_ids
    for ours, theirs in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_the_cost_model_reads_a_shared_prefix_at_its_measured_rate():
    """On a CPU, decode attention over a shared prefix's positions is costed as the profile measured reading them
    from one row (attention_shared times faster), the rest at each row's own rate; without that measurement, or
    when the policy does not share the prefix, all at the latter."""
    config, policy = preset_config("llama-3-8b"), Policy(gpu_batch_size=16, dtype="bfloat16")
    base = synthetic_profile()
    own = dataclasses.replace(base, attention={k: (0.0, rate) for k, (_, rate) in base.attention.items()})
    fast = dataclasses.replace(own, attention_shared={"bfloat16": 4.0})
    whole, shared = Workload(512, 32), Workload(512, 32, shared_len=448)

    def seconds(hw, workload, p=policy):
        return predict(config, workload, p, hw).decode_by["attention"]

    assert seconds(own, shared) == pytest.approx(seconds(own, whole))
    mean = 512 + 32 / 2  # the cache's mean length over the decode steps
    assert seconds(fast, shared) / seconds(fast, whole) == pytest.approx((1 - 448 / mean) + 448 / mean / 4)
    assert seconds(fast, shared, dataclasses.replace(policy, share_prefix=False)) == pytest.approx(seconds(fast, whole))
