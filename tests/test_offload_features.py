"""CPU attention, sparse attention and 4-bit compression, end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.engine.cache_store import QuantizedStore, Store
from flexgen_lite.kernels.attention import attend
from flexgen_lite.kernels.compression import CompressionConfig, dequantize, quantize
from flexgen_lite.kernels.int8_weight import Int8Weight

from .conftest import PROMPTS, hf_greedy
from .test_parity import LOGITS_ATOL, POLICIES, P

GREEDY = SamplingConfig(max_new_tokens=8, stop_at_eos=False)


def run(model_dir, policy, sampling=GREEDY, device=None):
    with FlexGenLite(str(model_dir), policy=policy, device=device) as m:
        return m.generate_ids(PROMPTS, sampling, return_logits=True)


# ---- CPU attention ------------------------------------------------------------------------------

@pytest.mark.parametrize("percent", [(100, 0, 0, 100, 100, 0), (100, 0, 0, 0, 100, 0), (100, 0, 34, 33, 100, 0)])
def test_cpu_attention_equals_plain_path(tiny_models, percent):
    plain_ids, plain_logits = run(tiny_models["opt"][0], P(percent, gbs=3, nb=3))
    cpu_ids, cpu_logits = run(tiny_models["opt"][0], P(percent, gbs=3, nb=3, cpu_cache_compute=True))
    assert cpu_ids == plain_ids
    for a, b in zip(cpu_logits, plain_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", [None, "cpu+link"])
def test_cpu_attention_places_cache_off_compute_parts(tiny_models, device):
    """With cpu_cache_compute, cpu-tier parts are attended to in place, and so are disk parts through their
    memory map when there is no GPU; across a link (CUDA, or cpu+link) disk parts are read into host buffers."""
    with FlexGenLite(str(tiny_models["opt"][0]), policy=POLICIES["cpu-attention-cache-split"], device=device) as m:
        m.generate_ids(PROMPTS[:3], SamplingConfig(max_new_tokens=2, stop_at_eos=False))
        parts = [p for per_batch in m.engine.cache.parts for batch in per_batch for p in batch]
        link = m.engine.device.host_is_separate
    assert {p.tier for p in parts} == {"gpu", "cpu", "disk"}
    assert all(p.on_cpu == (p.tier != "gpu") for p in parts)
    assert all(p.direct == (p.tier != "disk" or not link) for p in parts)
    assert all(p.k.mapped == (p.tier == "disk" and not link) for p in parts)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("percent,share,compress", [
    ((100, 0, 0, 100, 100, 0), 50, False),  # the Llama-2-7B suite row's placement, half of the rows each way
    ((100, 0, 20, 50, 100, 0), 40, False),  # three tiers; the split falls inside a GPU batch
    ((100, 0, 20, 50, 100, 0), 40, True),  # the same over a 4-bit cache: codes as stored, and dequantized slots
])
def test_cpu_attention_shared_with_the_link_equals_transformers(tiny_models, references, compute_device, family,
                                                                percent, share, compress):
    """cpu_attention_percent: of the cpu tier's sequences the first `share` % are attended on the CPU in place, the
    rest copied across the link each step and attended on the device (a GPU under --device cuda); the parts'
    outputs join by row, and the tokens are transformers' (uncompressed: the logits too, within the parity
    tolerance)."""
    device = compute_device if compute_device.startswith("cuda") else "cpu+link"
    policy = P(percent, gbs=3, nb=3, cpu_cache_compute=True, cpu_attention_percent=share, compress_cache=compress)
    with FlexGenLite(str(tiny_models[family][0]), policy=policy, device=device) as m:
        ids, logits = m.generate_ids(PROMPTS, GREEDY, return_logits=True)
        cache = m.engine.cache
        parts = [p for batch in cache.parts[0] for p in batch]
    tiers = cache.tier_rows
    assert cache.host_attended == round(tiers[1] * share / 100) > 0
    assert sum(p.rows.stop - p.rows.start for p in parts if p.tier == "cpu" and p.on_cpu) == cache.host_attended
    across = [p for p in parts if p.tier == "cpu" and not p.on_cpu]
    assert sum(p.rows.stop - p.rows.start for p in across) == tiers[1] - cache.host_attended
    assert across and not any(p.direct for p in across)  # read into the device's slots every step
    assert all(p.direct for p in parts if p.tier == "cpu" and p.on_cpu)
    assert all(p.on_cpu for p in parts if p.tier == "disk")
    if compress:
        baseline = run(tiny_models[family][0], P(percent, gbs=3, nb=3, cpu_cache_compute=True, compress_cache=True),
                       device=device)
        assert ids == baseline[0]
        for a, b in zip(logits, baseline[1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        return
    ref_ids, ref_logits = references[family]
    assert ids == ref_ids
    for a, b in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(a, b, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("overlap", [True, False], ids=["on-the-worker", "in-the-schedule"])
def test_cpu_attention_starts_before_the_links_copy_is_waited_for(tiny_models, monkeypatch, overlap):
    """A batch with a CPU part and a part across the link waits for the link's copy (a CUDA stream wait on the
    load's event) only before that part's attention: the CPU's part, first, is handed to the CPU worker (overlap
    on: pending_attention.py) or attended in the schedule's thread (off) without waiting for it. Copies and waits
    are marked here as a GPU's would be (events stand for CUDA's)."""
    import contextlib
    import threading

    from flexgen_lite.engine import decode_attention
    from flexgen_lite.system.devices import ComputeDevice

    log, schedule = [], threading.current_thread()

    @contextlib.contextmanager
    def on_copy_stream(self, after=None, lane="weights"):
        yield lambda: ("copied", lane)

    def wait_for(self, event):
        if event is not None:
            log.append(event)

    def attend_part(view, *args, **kwargs):
        if threading.current_thread() is schedule:
            log.append(("attend", view.part.rows.start, view.part.on_cpu, view.part.direct))
        return real(view, *args, **kwargs)

    real = decode_attention.attend_part
    monkeypatch.setattr(ComputeDevice, "on_copy_stream", on_copy_stream)
    monkeypatch.setattr(ComputeDevice, "wait_for", wait_for)
    monkeypatch.setattr(decode_attention, "attend_part", attend_part)
    policy = P((100, 0, 0, 100, 100, 0), gbs=4, nb=2, cpu_cache_compute=True, cpu_attention_percent=25,
               overlap=overlap)
    with FlexGenLite(str(tiny_models["llama"][0]), policy=policy, device="cpu+link") as m:
        submit = m.engine.cpu_worker.submit

        def handed(fn, view, *args):
            log.append(("worker", view.part.rows.start, view.part.on_cpu, view.part.direct))
            return submit(fn, view, *args)

        m.engine.cpu_worker.submit = handed
        m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=3, stop_at_eos=False))
    # batch 0: rows 0-1 attended on the CPU, rows 2-3 across the link; batch 1: all four across the link
    waits = [i for i, e in enumerate(log) if e == ("copied", "cache")]
    mixed = [i for i in waits if log[i + 1] == ("attend", 2, False, False)]
    assert len(mixed) == 2 * 2  # two decode steps of two layers
    first = ("worker" if overlap else "attend", 0, True, True)
    assert all(log[i - 1] == first for i in mixed)  # the CPU's part went first, unwaited
    assert all(log[i + 1] == ("attend", 0, False, False) for i in waits if i not in mixed)  # batch 1
    assert any(e[0] == "worker" for e in log) == overlap  # the CPU's parts on the worker only with overlap


@pytest.mark.parametrize("percent,compress", [((100, 0, 0, 100, 100, 0), False), ((100, 0, 30, 70, 100, 0), True)])
def test_cpu_attention_on_the_worker_equals_the_schedules_own(tiny_models, percent, compress):
    """Beside a GPU (here across the simulated link) the CPU's parts are attended on the worker while the schedule
    goes on (overlap on), their outputs finished when the next layer takes them: the very logits of attending them
    in the schedule's thread (overlap off), with rows finishing at eos, over dense and 4-bit parts."""
    from flexgen_lite.engine.pending_attention import PendingAttention

    out, pending = {}, []
    for overlap in (True, False):
        policy = P(percent, gbs=3, nb=3, cpu_cache_compute=True, compress_cache=compress, overlap=overlap)
        with FlexGenLite(str(tiny_models["llama"][0]), policy=policy, device="cpu+link") as m:
            real = m.engine._compute

            def compute(*args, real=real):
                result = real(*args)
                pending.append(isinstance(result, PendingAttention))
                return result

            m.engine._compute = compute
            out[overlap] = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=8), return_logits=True)
        assert any(pending) == overlap
        pending.clear()
    assert out[True][0] == out[False][0]
    for a, b in zip(out[True][1], out[False][1], strict=True):
        assert torch.equal(a, b)


def test_a_step_that_fails_waits_for_the_cpu_worker_before_it_raises(tiny_models, monkeypatch):
    """A step that raises while the worker still attends a part (and writes the new token into it) drains the
    worker first: the error reaches the caller only once no thread touches the cache it may reuse."""
    import time

    from flexgen_lite.engine import decode_attention

    done, real = [], decode_attention.attend_part

    def slow(*args, **kwargs):
        time.sleep(0.2)
        found = real(*args, **kwargs)
        done.append(time.perf_counter())
        return found

    monkeypatch.setattr(decode_attention, "attend_part", slow)
    policy = P((100, 0, 0, 100, 100, 0), gbs=3, nb=2, cpu_cache_compute=True)
    with FlexGenLite(str(tiny_models["llama"][0]), policy=policy, device="cpu+link") as m:
        real_compute = m.engine._compute

        def failing(spec, *args):
            if any(not f.done() for f in m.engine._worker_tasks):  # batch 0's CPU parts still on the worker
                raise RuntimeError("a failure while the worker attends")
            return real_compute(spec, *args)

        m.engine._compute = failing
        with pytest.raises(RuntimeError, match="while the worker attends"):
            m.generate_ids(PROMPTS[:6], SamplingConfig(max_new_tokens=3, stop_at_eos=False))
        raised = time.perf_counter()
    assert done and max(done) <= raised  # the worker's parts finished before the error surfaced


def test_cpu_attention_percent_needs_cpu_attention():
    with pytest.raises(ValueError, match="needs cpu_cache_compute"):
        P((100, 0, 0, 100, 100, 0), cpu_attention_percent=50)
    with pytest.raises(ValueError, match="within 0..100"):
        P((100, 0, 0, 100, 100, 0), cpu_cache_compute=True, cpu_attention_percent=120)


# ---- sparse attention ---------------------------------------------------------------------------

def reference_topk_attention(q, k, v, mask, top):
    """Plain loops: for each row and head, softmax over the `top` best-scoring unmasked positions."""
    b, heads, _, hd = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(b, heads, 1, hd)
    for i in range(b):
        for h in range(heads):
            kh, vh = k[i, h // group], v[i, h // group]
            scores = (kh @ q[i, h, 0]) / math.sqrt(hd)
            scores[~mask[i, 0, 0]] = float("-inf")
            best = torch.topk(scores, top).indices
            weights = torch.softmax(scores[best], 0)
            out[i, h, 0] = weights @ vh[best]
    return out


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_topk_attention_matches_plain_reference(kv_heads):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 1, 16, generator=gen)
    k, v = torch.randn(3, kv_heads, 20, 16, generator=gen), torch.randn(3, kv_heads, 20, 16, generator=gen)
    mask = torch.ones(3, 1, 1, 20, dtype=torch.bool)
    mask[1, ..., :6] = False  # left padding of row 1
    got = attend(q, k, v, mask, sparsity=0.3)
    torch.testing.assert_close(got, reference_topk_attention(q, k, v, mask, 6), atol=1e-5, rtol=1e-5)


def test_topk_attention_over_all_positions_equals_dense():
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 1, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen), torch.randn(2, 2, 9, 8)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    dense = attend(q, k, v, mask)
    from flexgen_lite.kernels.attention import topk_attend

    torch.testing.assert_close(topk_attend(q, k, v, mask, 9), dense, atol=1e-5, rtol=1e-5)


def test_sparsity_one_equals_dense_and_below_one_changes_output(tiny_models):
    dense_ids, dense_logits = run(tiny_models["opt"][0], P((100, 0, 100, 0, 100, 0)))
    one_ids, one_logits = run(tiny_models["opt"][0], P((100, 0, 100, 0, 100, 0), attn_sparsity=1.0))
    assert one_ids == dense_ids and all(torch.equal(a, b) for a, b in zip(one_logits, dense_logits, strict=True))
    _, sparse_logits = run(tiny_models["opt"][0], P((100, 0, 0, 100, 100, 0), attn_sparsity=0.2,
                                                    cpu_cache_compute=True))
    # first token comes from the prefill (dense); later ones attend to a fifth of the positions
    assert all(torch.equal(a[0], b[0]) for a, b in zip(sparse_logits, dense_logits, strict=True))
    assert any(not torch.allclose(a[1], b[1]) for a, b in zip(sparse_logits, dense_logits, strict=True))


# ---- compression --------------------------------------------------------------------------------

def fake_quantized(model, config: CompressionConfig, ends_in_8_bits: bool = True):
    """A copy of a transformers model whose decoder layers' 2-D weights went through quantize -> dequantize, and
    its token embedding and head through 8-bit groups where `ends_in_8_bits` (weights.in_8_bits: on a CPU, not on
    a GPU; positions are not rounded)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("embed_tokens" in name or "lm_head" in name):
                if not ends_in_8_bits:
                    continue
                p.copy_(Int8Weight.quantize(p.data).dequantize())
            elif p.dim() == 2 and "embed" not in name:
                p.copy_(dequantize(quantize(p.data, config), torch.float32))
    return model


@pytest.fixture(scope="module")
def quantized_references(tiny_models, compute_device):
    """{(family, group_dim): transformers' greedy ids and logits on the quantize->dequantize of its weights},
    computed on first use: the same for every placement of the codes (the embedding and head in 8 bits on a CPU)."""
    out = {}

    def get(family: str, group_dim: int):
        if (family, group_dim) not in out:
            hf = fake_quantized(tiny_models[family][1], CompressionConfig(4, 64, group_dim), compute_device == "cpu")
            out[family, group_dim] = hf_greedy(hf, PROMPTS, 8)
        return out[family, group_dim]

    return get


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("percent", [(100, 0, 100, 0, 100, 0), (30, 40, 100, 0, 100, 0), (0, 0, 0, 100, 100, 0)])
def test_compressed_weights_equal_transformers_on_the_same_quantized_weights(tiny_models, quantized_references,
                                                                             compute_device, family, percent):
    """Weights are quantized once and decompressed exactly: output equals transformers running the
    quantize->dequantize of the same weights, whichever tiers hold the codes; the embedding and head in 8 bits
    (their lookups and products by int8_weight's kernels) equal transformers' on the 8-bit values."""
    model_dir = tiny_models[family][0]
    for group_dim in (0, 1):
        ref_ids, ref_logits = quantized_references(family, group_dim)
        ids, logits = run(model_dir, P(percent, gbs=2, nb=2, compress_weight=True, weight_group_dim=group_dim),
                          device=compute_device)
        assert ids == ref_ids
        for a, b in zip(logits, ref_logits, strict=True):
            torch.testing.assert_close(a, b, atol=LOGITS_ATOL, rtol=0)


def test_compressed_weights_take_a_quarter_of_the_bytes(tiny_models):
    with FlexGenLite("facebook/opt-125m", policy=P((0, 100, 100, 0, 100, 0))) as plain:
        full = plain.memory_report()["current"]["cpu"]
    with FlexGenLite("facebook/opt-125m", policy=P((0, 100, 100, 0, 100, 0), compress_weight=True)) as small:
        packed = small.memory_report()["current"]["cpu"]
    # the cpu tier holds the decoder's matrices only (vectors live in compute memory): fp32 -> 4.5 bits a value
    assert full / packed == pytest.approx(32 / 4.5, rel=1e-3)


@pytest.mark.parametrize("home", ["device", "host", "file"])
def test_quantized_cache_store_round_trips_like_quantize(tmp_path, home):
    from flexgen_lite.engine.storage import DiskStore, Staging
    from flexgen_lite.system.host_memory import HostArena

    config, disk = CompressionConfig(4, 64, -1), DiskStore(str(tmp_path))
    store = QuantizedStore((2, 3, 10, 32), config, home, "cpu", disk, HostArena(1 << 16, pin=False))
    new = torch.randn(2, 3, 4, 32)
    store.write(new, 5)
    dst = torch.zeros(2, 3, 10, 32)
    scratch = [torch.empty(s, dtype=d) for _, s, d in store.scratch_shapes(store.shape[2])]
    store.read(dst, 9, Staging(pin=False), scratch, to_device=True)
    torch.testing.assert_close(dst[:, :, 5:9], dequantize(quantize(new, config), torch.float32), atol=0, rtol=0)
    disk.close()


@pytest.mark.parametrize("home", ["file", "mapped", "host"])
@pytest.mark.parametrize("to_device", [False, True])
def test_plain_cache_store_round_trips(tmp_path, home, to_device):
    """Position-major stores (a file or host RAM across the link) and memory-mapped ones (a CPU) give back
    what was written, in the store's dtype: float16 k/v written into a bfloat16 part (CPU attention beside
    fp16 compute) are cast."""
    from flexgen_lite.engine.storage import DiskStore, Staging
    from flexgen_lite.system.host_memory import HostArena

    disk, arena = DiskStore(str(tmp_path)), HostArena(1 << 16, pin=False)
    for dtype, new_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float16)):
        store = Store((2, 3, 10, 8), dtype, home, "cpu", disk, arena)
        assert store.mapped == (home == "mapped") and store.position_major == (home != "mapped")
        new = torch.randn(2, 3, 4, 8).to(new_dtype)
        store.write(new[:, :, :1], 0)
        store.write(new[:, :, 1:], 1)
        assert torch.equal(store.tensor[:, :, :4], new.to(dtype)) if store.tensor is not None else True
        if store.position_major:
            dst = torch.zeros(store.position_shape, dtype=dtype)
            store.read(dst, 4, Staging(pin=False), to_device)
            assert torch.equal(dst[:4].permute(1, 2, 0, 3), new.to(dtype))
            assert not dst[4:].any()  # only the prefix asked for moved
    disk.close()


@pytest.fixture(scope="module")
def compressed_cache_in_memory(tiny_models):
    """Greedy ids and logits with a 4-bit cache all in compute memory, per device: the baseline of every
    placement below (a link run against a link baseline: on a GPU machine the other is CUDA's)."""
    done = {}

    def baseline(device):
        if device not in done:
            done[device] = run(tiny_models["opt"][0], P((100, 0, 100, 0, 100, 0), compress_cache=True), device=device)
        return done[device]

    return baseline


@pytest.mark.parametrize("device", [None, "cpu+link"])
@pytest.mark.parametrize("percent", [(0, 0, 0, 0, 100, 0), (100, 0, 34, 33, 100, 0)])
def test_compressed_cache_same_under_every_placement(tiny_models, compressed_cache_in_memory, percent, device):
    """The cache is quantized identically wherever it lives, and read back through the CPU or the device (with
    the cache split 3/3/3, a device part and a CPU-attended part of the same rows: slots of their own, fix 5)."""
    base_ids, base_logits = compressed_cache_in_memory(device)
    for cpu_attention in (False, True):
        ids, logits = run(tiny_models["opt"][0], P(percent, gbs=3, nb=3, compress_cache=True,
                                                   cpu_cache_compute=cpu_attention), device=device)
        assert ids == base_ids
        for a, b in zip(logits, base_logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_compressed_cache_logits_close_to_uncompressed(tiny_models, references):
    """One decode step over a 4-bit cache: relative logit error small (these random models amplify
    error; a trained model's answers are checked in the real-model tests)."""
    _, ref_logits = references["opt"]
    _, logits = run(tiny_models["opt"][0], P((100, 0, 100, 0, 100, 0), compress_cache=True),
                    SamplingConfig(max_new_tokens=2, stop_at_eos=False))
    for a, b in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(a[0], b[0], atol=LOGITS_ATOL, rtol=0)  # prefill: exact k, v
        assert (a[1] - b[1]).norm() / b[1].norm() < 0.25


@pytest.mark.parametrize("fp16_rate", [8e9, 1e9], ids=["fp16-as-fast", "fp16-slow"])
def test_cpu_attention_keeps_a_float16_cache_where_the_cpu_attends_it_as_fast(tiny_models, tmp_path, monkeypatch,
                                                                               fp16_rate):
    """Across a link, a float16 model's CPU-attended parts are float16 (the values the GPU computed, unrounded)
    where the profile measured fp16 CPU attention as fast as bf16's (Policy.cpu_attention_dtype), else bfloat16;
    either way the greedy tokens are the plain path's; with float16 parts, its very logits (bf16's differ by 0.04)."""
    import dataclasses

    from .conftest import set_profile, synthetic_profile

    hw = synthetic_profile(cuda=True)
    set_profile(dataclasses.replace(hw, cpu_attention={**hw.cpu_attention, "float16": (1e-4, fp16_rate)}), tmp_path,
                monkeypatch)
    plain = dataclasses.replace(P((100, 0, 0, 100, 100, 0), gbs=3, nb=3), dtype="float16")
    with FlexGenLite(str(tiny_models["opt"][0]), policy=plain, device="cpu+link") as m:
        ids, logits = m.generate_ids(PROMPTS, GREEDY, return_logits=True)
    cpu = dataclasses.replace(plain, cpu_cache_compute=True)
    with FlexGenLite(str(tiny_models["opt"][0]), policy=cpu, device="cpu+link") as m:
        cpu_ids, cpu_logits = m.generate_ids(PROMPTS, GREEDY, return_logits=True)
        kept = {p.k.tensor.dtype for per_batch in m.engine.cache.parts for batch in per_batch for p in batch}
    assert kept == {torch.float16 if fp16_rate == 8e9 else torch.bfloat16}
    assert cpu_ids == ids
    error = max(float((a - b).abs().max()) for a, b in zip(cpu_logits, logits, strict=True))
    assert error == 0 if fp16_rate == 8e9 else error <= 1e-1, error  # float16: the plain path's very logits
