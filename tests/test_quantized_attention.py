"""A compressed KV cache a CPU attends is read as stored (kernels/quantized_attention.py, native/attention_q4.c):
the kernel equals dequantizing the codes into the attention's dtype and attending (torch's SDPA, in fp32); the
engine's tokens and logits equal those of the path that dequantizes every part into slots, under every placement
a CPU attends, with rings and rows that finish; such parts take no slots, and the memory plan says so exactly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.kernels import native
from flexgen_lite.kernels import quantized_attention as qa
from flexgen_lite.kernels import quantized_attention_triton as qt
from flexgen_lite.kernels.quantization import CompressionConfig, QuantizedTensor, dequantize_reference, quantize

from .conftest import PROMPTS, make_checkpoint, other_native_build
from .test_link_paths import check_gpu_memory_plan
from .test_parity import LINK, P, link_only_on_cpu
from .test_window_ring import with_eos

CONFIG = CompressionConfig(4, 64, -1)
GREEDY = SamplingConfig(max_new_tokens=6, stop_at_eos=False)
# without a C compiler the torch path runs (and these tests skip); a kernel that is built but wrong fails them
needs_kernel = pytest.mark.skipif("__import__('flexgen_lite.kernels.native').kernels.native.library() is None",
                                  reason="no C compiler: the torch path runs")


def stored(x: torch.Tensor, position_major: bool) -> tuple[torch.Tensor, ...]:
    """x (rows, kv_heads, positions, d) quantized as a cache part stores it: (rows, kv_heads, positions, last)
    views of codes, scales and minima, laid out head-major or position-major (cache_store.Store)."""
    if position_major:
        q = quantize(x.permute(2, 0, 1, 3).contiguous(), CONFIG)
        t, r, h, _ = x.permute(2, 0, 1, 3).shape
        return tuple(p.permute(1, 2, 0, 3) for p in (q.data.view(t, r, h, -1), q.scale, q.minimum))
    q = quantize(x, CONFIG)
    return q.data.view(*x.shape[:3], -1), q.scale, q.minimum


def expected(q, k, v, mask, skip, k_new, v_new, rows):
    """Each stored row dequantized into q's dtype, the new token at `skip`, attended in fp32, rounded to q's dtype."""
    dense = []
    for codes, scale, minimum in (k, v):
        codes, scale, minimum = (x[rows] for x in (codes, scale, minimum))
        shape = (*codes.shape[:3], scale.shape[-1] * CONFIG.group_size)
        x = dequantize_reference(QuantizedTensor(codes.contiguous().view(-1), scale.contiguous(),
                                                 minimum.contiguous(), shape, CONFIG), q.dtype, None)
        dense.append(x[..., :q.shape[-1]].float())
    keys, values = dense
    keys[:, :, skip], values[:, :, skip] = k_new[:, :, 0].float(), v_new[:, :, 0].float()
    out = F.scaled_dot_product_attention(q.float(), keys, values, attn_mask=mask, enable_gqa=True)
    return out.to(q.dtype)


@needs_kernel
def test_the_built_kernel_passes_its_own_check():
    """The check that decides, once per process, whether the engine reads compressed parts as stored."""
    assert qa.checked()


@pytest.fixture(params=["native", "avx2", "plain"])
def build(request, monkeypatch):
    """The kernel as built for this machine, for AVX2 CPUs without AVX-512 (8 lanes) and for plain x86-64 (its C
    loops): the other two built here without OpenMP (conftest.other_native_build), their ranges on Python threads."""
    if request.param != "native":
        other = qa.declared(other_native_build({"avx2": ["-march=x86-64-v3"], "plain": ["-march=x86-64"]}[
            request.param]))
        monkeypatch.setattr(qa, "_library", lambda: other)
        monkeypatch.setattr(native, "team_threads", lambda: 0)
    return request.param


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,heads,kv_heads", [(128, 3, 3), (128, 8, 2), (64, 6, 3), (96, 2, 1), (16, 4, 2)],
                         ids=["lone-128", "gqa-128", "gqa-64", "padded-group", "short-head"])
@pytest.mark.parametrize("position_major", [True, False], ids=["position-major", "head-major"])
def test_the_kernel_is_dequantize_then_attend(build, dtype, d, heads, kv_heads, position_major):
    """Masked slots, a new token mid-cache (a ring's slot) whose stored row is far off, rows of the part picked
    (finished rows left): within an ulp or so of the attention dtype (fp32: summation order alone), on every build."""
    g = torch.Generator().manual_seed(d + heads)
    rows_in_cache, length, skip = 5, 37, 11
    k, v = (stored(torch.randn(rows_in_cache, kv_heads, length, d, generator=g), position_major) for _ in "kv")
    for _, scale, _ in (k, v):  # the slot the new token replaces holds something else entirely
        scale[:, :, skip] = 4.0
    rows = torch.tensor([4, 0, 2])
    q = torch.randn(3, heads, 1, d, generator=g).to(dtype)
    k_new, v_new = (torch.randn(3, kv_heads, 1, d, generator=g).to(dtype) for _ in "kv")
    mask = torch.rand(3, 1, 1, length, generator=g) > 0.3
    mask[..., skip] = True
    out = qa.attend(q, k, v, CONFIG, mask, skip, k_new, v_new, rows)
    want = expected(q, k, v, mask, skip, k_new, v_new, rows)
    tol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}[dtype]
    torch.testing.assert_close(out.float(), want.float(), rtol=tol[0], atol=tol[1])


@needs_kernel
def test_a_row_with_every_slot_masked_gets_zeros_and_the_others_their_own(build):
    g = torch.Generator().manual_seed(0)
    k, v = (stored(torch.randn(2, 2, 9, 64, generator=g), True) for _ in "kv")
    q, k_new, v_new = (torch.randn(2, 2, 1, 64, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1] = False
    out = qa.attend(q, k, v, CONFIG, mask, 8, k_new, v_new)
    assert out[1].abs().max() == 0
    torch.testing.assert_close(out[:1], expected(q, k, v, mask, 8, k_new, v_new, torch.arange(2))[:1])


@needs_kernel
def test_no_mask_sees_every_slot():
    g = torch.Generator().manual_seed(1)
    k, v = (stored(torch.randn(2, 2, 9, 64, generator=g), False) for _ in "kv")
    q, k_new, v_new = (torch.randn(2, 2, 1, 64, generator=g) for _ in range(3))
    out = qa.attend(q, k, v, CONFIG, None, 8, k_new, v_new)
    every = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    torch.testing.assert_close(out, qa.attend(q, k, v, CONFIG, every, 8, k_new, v_new), rtol=0, atol=0)
    torch.testing.assert_close(out, expected(q, k, v, every, 8, k_new, v_new, torch.arange(2)))


def generate(path, policy, device="cpu", sampling=GREEDY):
    """(ids, logits, the cache slots taken, the attention kernels that ran: "cpu-4bit" if the kernel ran once)"""
    calls, attend = [], qa.attend
    qa.attend = lambda *args: calls.append(1) or attend(*args)
    try:
        with FlexGenLite(str(path), policy=policy, device=device) as m:
            ids, logits = m.generate_ids(PROMPTS, sampling, return_logits=True)
            slots = [key for key, buf in m.engine.cache_slots.buffers.items() if buf.numel()]  # not mapped pages
            kernels = set(m.engine._kernels) | ({"cpu-4bit"} if calls else set())
    finally:
        qa.attend = attend
    return ids, logits, slots, kernels


def dequantized(path, policy, device, monkeypatch, sampling=GREEDY):
    """The same run with every compressed part dequantized into slots (the path before the kernel)."""
    with monkeypatch.context() as patch:
        patch.setattr(qa, "supported", lambda config: False)
        patch.setattr(qt, "supported", lambda config: False)  # and a GPU's (quantized_attention_triton)
        ids, logits, slots, kernels = generate(path, policy, device, sampling)
    assert slots and "cpu-4bit" not in kernels
    return ids, logits


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """OPT with one 64-wide head per kv head (the kernel's lone-head path) and Qwen3 with two (a row shared)."""
    out = {}
    for family, extra in (("opt", dict(num_attention_heads=2)), ("qwen3", {})):
        path = tmp_path_factory.mktemp(f"q4-{family}")
        make_checkpoint(path, family, seed=7, **extra)
        out[family] = path
    return out


@needs_kernel
@pytest.mark.parametrize("family", ["opt", "qwen3"])
@pytest.mark.parametrize("percent", [(100, 0, 100, 0, 100, 0), (0, 100, 0, 100, 100, 0), (50, 0, 0, 0, 100, 0),
                                     (50, 50, 34, 33, 100, 0)], ids=["device", "cpu-tier", "disk", "three-tiers"])
def test_a_cpu_attends_its_compressed_cache_as_stored(models, family, percent, monkeypatch):
    """On a CPU every compressed part, in memory or a mapped file, is attended as stored: no slot is taken, and
    tokens and logits are the dequantizing path's."""
    policy = P(percent, gbs=3, nb=3, compress_cache=True)
    ids, logits, slots, kernels = generate(models[family], policy)
    assert kernels == {"cpu-4bit"} and slots == []
    want_ids, want_logits = dequantized(models[family], policy, None, monkeypatch)
    assert ids == want_ids
    for a, b in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.fixture
def beside_a_gpu(compute_device):
    """CUDA under --device cuda, else the CPU playing one across a simulated link."""
    return compute_device if compute_device.startswith("cuda") else LINK


@needs_kernel
@pytest.mark.parametrize("family", ["opt", "qwen3"])
def test_cpu_attention_beside_a_gpu_reads_host_parts_as_stored(models, family, monkeypatch, beside_a_gpu):
    """Across the link, host-RAM parts attended on the CPU are read in place as codes; the files' are still
    dequantized where they are attended, and the device's too on the CPU playing a GPU (a GPU reads them as
    stored: test_quantized_attention_triton.py) (more than one kernel ran)."""
    policy = P((100, 0, 34, 33, 100, 0), gbs=3, nb=3, compress_cache=True, cpu_cache_compute=True)
    ids, logits, _, kernels = generate(models[family], policy, beside_a_gpu)
    assert "cpu-4bit" in kernels and len(kernels) > 1
    want_ids, want_logits = dequantized(models[family], policy, beside_a_gpu, monkeypatch)
    assert ids == want_ids
    for a, b in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@needs_kernel
@pytest.mark.parametrize("beside", [False, True], ids=["cpu", "beside-a-gpu"])
def test_rows_that_finish_and_rings_are_read_as_stored(tmp_path, monkeypatch, beside, beside_a_gpu):
    """A Mistral whose every layer is a ring of 5 (prompts of up to 10 and 6 new tokens wrap it), one row
    stopping at its EOS: the kernel's new token at its ring slot, over the active rows only."""
    path = tmp_path / "mistral"
    path.mkdir()
    make_checkpoint(path, "mistral", seed=3, sliding_window=5)
    policy = P((100, 0, 50, 50, 100, 0), gbs=3, nb=2, compress_cache=True, cpu_cache_compute=True)
    device = beside_a_gpu if beside else "cpu"
    eight = SamplingConfig(max_new_tokens=8, stop_at_eos=False)
    want_ids, want_logits = dequantized(path, policy, device, monkeypatch, eight)
    model_dir, row = with_eos(path, tmp_path, want_ids)
    ids, logits, _, kernels = generate(path, policy, device, eight)
    assert "cpu-4bit" in kernels and ids == want_ids
    for a, b in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    ids, _, _, _ = generate(model_dir, policy, device, SamplingConfig(max_new_tokens=8))
    assert ids[row] == want_ids[row][:7]
    assert all(ids[r] == want_ids[r] for r in range(len(PROMPTS)) if r != row)


@needs_kernel
@link_only_on_cpu
def test_the_memory_plan_counts_parts_read_as_stored(models):
    """Host-RAM parts attended as stored take no slot in host RAM; the plan is the engine's allocation, exactly."""
    check_gpu_memory_plan(models["opt"], P((100, 0, 34, 33, 100, 0), gbs=3, nb=3, compress_cache=True,
                                           cpu_cache_compute=True))


@needs_kernel
def test_the_cost_model_reads_a_cpu_attended_4_bit_cache_at_the_kernels_rate(monkeypatch):
    """Beside a GPU, host-RAM parts of a 4-bit cache attended on the CPU cost their stored bytes at the measured
    rate of the kernel (no dequantization, no slot); parts on the GPU, without its own kernel, are dequantized
    there. Without a measured rate the dense one stands in."""
    from flexgen_lite.planning.cost_model import predict
    from flexgen_lite.planning.layout import Workload

    from .conftest import synthetic_profile
    from .test_cost_model_cuda import CONFIG

    policy = P((100, 0, 0, 100, 100, 0), gbs=32, nb=2, compress_cache=True, cpu_cache_compute=True)
    policy = dataclasses.replace(policy, dtype="float16")
    hw = synthetic_profile(cuda=True)
    work = Workload(512, 32, 64)
    rates = [dataclasses.replace(hw, cpu_attention_codes={"bfloat16": [(1, 0.0, r), (4, 0.0, 1.0)]})
             for r in (4e9, 2e9)]
    fast, slow = (predict(CONFIG, work, policy, h) for h in rates)
    assert "dequantize" not in fast.decode_by
    assert slow.decode_by["cpu attention"] == pytest.approx(2 * fast.decode_by["cpu attention"])
    stored = 2 * CONFIG.num_kv_heads * CONFIG.head_dim // 64 * (32 + 4)  # codes and fp16 stats per position
    positions = 512 + 31 / 2  # on average over the decode steps
    per_step = 64 * CONFIG.num_layers * stored * positions / 4e9
    assert fast.decode_by["cpu attention"] == pytest.approx(per_step, rel=0.05)
    mixed = dataclasses.replace(policy, cache_gpu_percent=50, cache_cpu_percent=50)
    with monkeypatch.context() as patch:  # without a GPU's own 4-bit kernel (test_quantized_attention_triton.py)
        patch.setattr(qt, "supported", lambda config: False)
        assert predict(CONFIG, work, mixed, rates[0]).decode_by["dequantize"] > 0  # the GPU's parts


@needs_kernel
def test_the_profile_measures_the_kernel_and_keeps_it():
    from flexgen_lite.profiling.attention_probes import codes_attention_rates
    from flexgen_lite.system.devices import ComputeDevice
    from flexgen_lite.system.hardware import HardwareProfile

    from .conftest import synthetic_profile

    found = codes_attention_rates(ComputeDevice("cpu"), 8)["cpu_attention_codes"]
    assert {g for g, _, _ in found["bfloat16"]} == {1, 4}
    # bytes/s, fixed seconds: the bound is far below any machine's (other jobs share the cores), a unit's slip not
    assert all(rate > 1e6 and fixed >= 0 for points in found.values() for _, fixed, rate in points)
    hw = dataclasses.replace(synthetic_profile(), cpu_attention_codes=found)
    again = HardwareProfile.from_json(json.dumps(dataclasses.asdict(hw)))
    assert again.codes_attention("bfloat16", 8) == found["bfloat16"][1][1:]


def test_a_prefix_dequantized_into_its_slot_is_the_whole_arrays_dequantization():
    """KVCache.load of a compressed part through the chunked path into the first positions of a longer slot."""
    x = torch.randn(3, 4, 37, 128)
    q = quantize(x, CONFIG)
    slot = torch.full((3, 4, 50, 128), float("nan"), dtype=torch.bfloat16)
    dequantize_reference(q, torch.bfloat16, slot[:, :, :37])
    assert torch.equal(slot[:, :, :37], dequantize_reference(q, torch.bfloat16, None))
    assert slot[:, :, 37:].isnan().all()
