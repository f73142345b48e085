"""Decode attention over a 4-bit KV cache as stored, in Triton (kernels/quantized_attention_triton.py): the kernel
equals dequantizing the codes into the attention's dtype and attending (quantized_attention.reference, fp32), with
the new token at its slot, a row map, left padding across splits; and in the engine, a compressed part in compute
memory is attended by it with no slot, giving the tokens and logits of the path that dequantizes into slots, as
the memory plan and the cost model count it. On the CPU Triton's interpreter runs it (FLEXGEN_LITE_CODES_ATTENTION=
triton); under --device cuda the compiled kernel runs on the GPU, where it is the default."""

from __future__ import annotations

import dataclasses
import importlib.util
import time

import pytest
import torch

from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.kernels import quantized_attention as qa
from flexgen_lite.kernels import quantized_attention_triton as qt
from flexgen_lite.kernels.quantization import CompressionConfig

from .conftest import PROMPTS, make_checkpoint, triton_device
from .test_link_paths import check_gpu_memory_plan
from .test_parity import LINK, P, link_only_on_cpu
from .test_quantized_attention import GREEDY, models  # noqa: F401  (a fixture)
from .test_window_ring import with_eos

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
ULP = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}  # outputs of magnitude < 2
# (rows, query heads, kv heads, positions, head dim, group size): lone and grouped heads, one split and several, a
# head dim padded to whole groups, groups smaller than a head
CASES = [(3, 4, 4, 37, 64, 64), (2, 8, 2, 150, 128, 64), (2, 8, 1, 300, 64, 32), (1, 2, 2, 5, 80, 64),
         (4, 6, 2, 70, 32, 32)]


@pytest.fixture
def kernel_device(monkeypatch, compute_device) -> str:
    """The GPU under --device cuda (compiled), else the CPU (Triton's interpreter, the kernel asked for)."""
    yield from triton_device(monkeypatch, compute_device, qt.reset, qt.ENV)


def inputs(rows, heads, kv_heads, length, hd, group_size, dtype, seed=0):
    """q, the stores (head-major, as in compute memory) of rows + 1 cache rows, the new k, v, a mask with row 0
    padded over two thirds of the positions, the slot of the new token and a row map."""
    g = torch.Generator().manual_seed(seed)
    config = CompressionConfig(4, group_size, -1)
    q = torch.randn(rows, heads, 1, hd, generator=g).to(dtype)
    stores = [tuple(x.contiguous() for x in qa.position_major(torch.randn(length, rows + 1, kv_heads, hd, generator=g),
                                                              config)) for _ in "kv"]
    k_new, v_new = (torch.randn(rows, kv_heads, 1, hd, generator=g).to(dtype) for _ in "kv")
    skip = length // 2
    mask = torch.rand(rows, 1, 1, length, generator=g) > 0.3
    mask[0, ..., :length * 2 // 3] = False
    mask[..., skip] = True
    return config, q, stores, k_new, v_new, mask, skip, torch.randperm(rows + 1, generator=g)[:rows]


@needs_triton
@pytest.mark.parametrize("dtype,splits", [(torch.float32, 1), (torch.float32, 3), (torch.float16, 3),
                                          (torch.bfloat16, 3)], ids=str)  # one split's store: fp32's alone
@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_kernel_is_dequantize_then_attend(kernel_device, case, dtype, splits):
    config, q, (k, v), k_new, v_new, mask, skip, rows = inputs(*case, dtype)
    want = qa.reference(q.float(), k, v, config, mask, skip, k_new.float(), v_new.float(), rows)
    on = [tuple(x.to(kernel_device) for x in s) for s in (k, v)]
    got = qt.attend(q.to(kernel_device), *on, mask.to(kernel_device), skip, k_new.to(kernel_device),
                    v_new.to(kernel_device), rows.to(kernel_device), splits=splits).cpu()
    assert got.dtype == dtype and got.shape == q.shape
    # within two roundings of the dtype: the values (as a dense slot of it holds them) and the output
    torch.testing.assert_close(got.float(), want, atol=2 * ULP[dtype], rtol=0)


@needs_triton
@pytest.mark.parametrize("case,dtype,splits", [((3, 4, 4, 37, 64, 64), torch.float32, 1),
                                               ((2, 2, 2, 150, 128, 64), torch.bfloat16, 3),
                                               ((1, 2, 2, 5, 80, 64), torch.float16, 3),
                                               ((2, 3, 3, 300, 64, 32), torch.float32, 5)], ids=str)
def test_the_lanes_variant_is_dequantize_then_attend(kernel_device, case, dtype, splits):
    """One query head per kv head, each position lane its own softmax (no reduction over the warps in the loop):
    the same as the tiles' variant, the new token at its slot and row 0's padding past whole splits included;
    grouped heads are refused."""
    config, q, (k, v), k_new, v_new, mask, skip, rows = inputs(*case, dtype)
    want = qa.reference(q.float(), k, v, config, mask, skip, k_new.float(), v_new.float(), rows)
    on = [tuple(x.to(kernel_device) for x in s) for s in (k, v)]
    got = qt.attend(q.to(kernel_device), *on, mask.to(kernel_device), skip, k_new.to(kernel_device),
                    v_new.to(kernel_device), rows.to(kernel_device), splits=splits, variant="lanes").cpu()
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want, atol=2 * ULP[dtype], rtol=0)
    assert qt.refusal(kernel_device, dtype, 1, case[4], case[5], "lanes") is None
    assert "one query head per kv head" in qt.refusal(kernel_device, dtype, 4, 128, 64, "lanes")


@needs_triton
def test_the_new_token_stands_at_its_slot_and_the_stored_row_is_not_read(kernel_device):
    config, q, (k, v), k_new, v_new, mask, skip, rows = inputs(2, 8, 2, 150, 128, 64, torch.float32)
    on = [tuple(x.to(kernel_device) for x in s) for s in (k, v)]
    args = (mask.to(kernel_device), skip, k_new.to(kernel_device), v_new.to(kernel_device), rows.to(kernel_device))
    out = qt.attend(q.to(kernel_device), *on, *args, splits=3).cpu()
    for store in on:  # what the slot held before: an older position's codes, huge
        store[1][:, :, skip] = 1000.0
    torch.testing.assert_close(qt.attend(q.to(kernel_device), *on, *args, splits=3).cpu(), out, atol=0, rtol=0)
    other = qt.attend(q.to(kernel_device), *on, mask.to(kernel_device), skip, v_new.to(kernel_device),
                      k_new.to(kernel_device), rows.to(kernel_device), splits=3).cpu()
    assert (other - out).abs().max() > 1e-2  # the new token counts


@needs_triton
def test_self_check_passes_and_the_switch_turns_it_off(kernel_device, monkeypatch):
    assert qt.refusal(kernel_device, torch.bfloat16, 4, 128, 64) is None
    assert qt.wanted_on(kernel_device, torch.bfloat16, 4, 128, 64)
    monkeypatch.setenv("FLEXGEN_LITE_TRITON", "0")
    qt.reset()
    assert qt.refusal(kernel_device, torch.bfloat16, 4, 128, 64) == "FLEXGEN_LITE_TRITON=0"
    assert not qt.wanted_on(kernel_device, torch.bfloat16, 4, 128, 64)


def test_layouts_it_does_not_read_are_dequantized_as_before():
    """8 bits, groups along another dim, or groups not a power of two: slots, as before."""
    assert qt.supported(CompressionConfig(4, 64, -1)) and qt.supported(CompressionConfig(4, 32, -1))
    for config in (CompressionConfig(8, 64, -1), CompressionConfig(4, 64, 0), CompressionConfig(4, 48, -1), None):
        assert not qt.supported(config)


def test_a_cpu_leaves_it_alone_and_a_plan_without_a_gpu_counts_slots(monkeypatch):
    """Not asked for: a CPU keeps its C kernel, and a plan for a GPU made on a machine without one counts slots."""
    monkeypatch.delenv(qt.ENV, raising=False)
    assert not qt.wanted_on("cpu", torch.float32, 1, 64, 64)
    if not torch.cuda.is_available():
        assert not qt.wanted_on("cuda", torch.float16, 1, 64, 64)
        monkeypatch.setenv(qt.ENV, "triton")
        assert qt.wanted_on("cuda", torch.float16, 1, 64, 64)


def generate(path, policy, device, sampling=GREEDY):
    """(ids, logits, the cache slots taken, the attention kernels that ran)"""
    with FlexGenLite(str(path), policy=policy, device=device) as m:
        ids, logits = m.generate_ids(PROMPTS, sampling, return_logits=True)
        return ids, logits, [key for key, buf in m.engine.cache_slots.buffers.items() if buf.numel()], \
            set(m.engine._kernels)


def dequantized(path, policy, device, monkeypatch, sampling=GREEDY):
    """The run with every compressed part dequantized into slots (no kernel over codes)."""
    with monkeypatch.context() as patch:
        patch.setattr(qa, "supported", lambda config: False)
        patch.setattr(qt, "supported", lambda config: False)
        ids, logits, slots, kernels = generate(path, policy, device, sampling)
    assert slots and not {"cpu-4bit", "triton-4bit"} & kernels
    return ids, logits, slots


@pytest.fixture
def beside_a_gpu(compute_device):
    """CUDA under --device cuda, else the CPU playing one across a simulated link."""
    return compute_device if compute_device.startswith("cuda") else LINK


@needs_triton
@pytest.mark.parametrize("family,percent,variant", [("opt", (100, 0, 100, 0, 100, 0), "triton"),
                                                    ("qwen3", (50, 50, 50, 25, 100, 0), "triton"),
                                                    ("opt", (100, 0, 100, 0, 100, 0), "triton-lanes")],
                         ids=["opt-gpu", "qwen3-three-tiers", "opt-gpu-lanes"])  # a lone head and grouped ones,
# each placement once; the lanes variant
def test_a_compressed_part_in_compute_memory_is_attended_as_stored(models, family, percent, variant,  # noqa: F811
                                                                   kernel_device, beside_a_gpu, monkeypatch):
    """Beside a GPU its part is read by the kernel, with no slot; host RAM's and the disk's are still read into
    slots; tokens and logits are the dequantizing path's."""
    if not kernel_device.startswith("cuda"):
        monkeypatch.setenv(qt.ENV, variant)
    policy = P(percent, gbs=3, nb=3, compress_cache=True)
    ids, logits, slots, kernels = generate(models[family], policy, beside_a_gpu)
    assert "triton-4bit" in kernels and "cpu-4bit" not in kernels
    want_ids, want_logits, want_slots = dequantized(models[family], policy, beside_a_gpu, monkeypatch)
    assert len(slots) < len(want_slots) and bool(slots) == (percent[2] < 100)  # the GPU's parts take none
    assert ids == want_ids
    for a, b in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@needs_triton
def test_rows_that_finish_and_rings_are_read_as_stored(tmp_path, kernel_device, beside_a_gpu, monkeypatch):
    """A Mistral whose every layer is a ring of 5 (prompts of up to 10 and 6 new tokens wrap it), its cache on the
    GPU, one row stopping at its EOS: the new token at its ring slot, over the active rows by the row map."""
    path = tmp_path / "mistral"
    path.mkdir()
    make_checkpoint(path, "mistral", seed=3, sliding_window=5)
    policy = P((100, 0, 100, 0, 100, 0), gbs=3, nb=2, compress_cache=True)
    eight = SamplingConfig(max_new_tokens=8, stop_at_eos=False)
    want_ids, want_logits, _ = dequantized(path, policy, beside_a_gpu, monkeypatch, eight)
    ids, logits, slots, kernels = generate(path, policy, beside_a_gpu, eight)
    assert "triton-4bit" in kernels and not slots and ids == want_ids
    for a, b in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    model_dir, row = with_eos(path, tmp_path, want_ids)
    ids, _, _, _ = generate(model_dir, policy, beside_a_gpu, SamplingConfig(max_new_tokens=8))
    assert ids[row] == want_ids[row][:7]
    assert all(ids[r] == want_ids[r] for r in range(len(PROMPTS)) if r != row)


@needs_triton
@link_only_on_cpu
def test_the_memory_plan_counts_no_slot_for_a_part_read_as_stored(models, kernel_device):  # noqa: F811
    check_gpu_memory_plan(models["opt"], P((100, 0, 50, 25, 100, 0), gbs=3, nb=3, compress_cache=True))


def test_the_cost_model_reads_a_gpu_part_as_stored(monkeypatch):
    """With the kernel, a GPU's compressed part costs its stored bytes at the measured rate (else at the dense
    kernel's rate per byte) and no dequantization; without it, a dequantization into a slot."""
    from flexgen_lite.planning.cost_model import predict
    from flexgen_lite.planning.layout import Workload

    from .conftest import synthetic_profile
    from .test_cost_model_cuda import CONFIG

    policy = dataclasses.replace(P((100, 0, 100, 0, 100, 0), gbs=32, nb=2, compress_cache=True), dtype="float16")
    hw, work = synthetic_profile(cuda=True), Workload(512, 32, 64)
    with monkeypatch.context() as patch:  # without the kernel (on a GPU machine too, where it would pass its check)
        patch.setattr(qt, "supported", lambda config: False)
        slots = predict(CONFIG, work, policy, hw)
    monkeypatch.setenv(qt.ENV, "triton")
    dense_rate = predict(CONFIG, work, policy, hw)
    rate = hw.attention["float16"][1] / 4
    measured = predict(CONFIG, work, policy, dataclasses.replace(hw, attention_codes={"float16": [(1, 0.0, rate)]}))
    assert slots.decode_by["dequantize"] > 0 and "dequantize" not in dense_rate.decode_by
    assert dense_rate.decode_by["attention"] < slots.decode_by["attention"]  # 4-bit bytes, not 16
    stored = 2 * CONFIG.num_kv_heads * CONFIG.head_dim // 64 * (32 + 4)  # codes and fp16 stats per position
    per_step = 64 * CONFIG.num_layers * stored * (512 + 31 / 2) / rate
    assert measured.decode_by["attention"] == pytest.approx(per_step, rel=0.05)


@needs_triton
# the probe in Triton's interpreter: on a GPU the suite's profile step measures it on the device (there,
# TRITON_INTERPRET set mid-process found no kernel: 2026-12-06, H100)
@pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="the interpreter's probe test")
def test_the_profile_measures_the_gpu_kernel_and_keeps_it(monkeypatch):
    """The profile's probe of a GPU's kernel (run here in the interpreter, as a GPU would run it compiled): a rate
    per compute dtype (fp16 here) and group, kept through the profile's JSON and read back by the cost model."""
    import json
    import types

    from flexgen_lite.profiling import attention_probes
    from flexgen_lite.system.hardware import HardwareProfile

    from .conftest import synthetic_profile

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(qt.ENV, "triton")
    qt.reset()
    gpu = types.SimpleNamespace(is_cuda=True, device=torch.device("cpu"), host_is_separate=True,
                                synchronize=lambda: None)
    monkeypatch.setattr(attention_probes, "timed", once)  # the interpreter is slow: one timed call each, one dtype
    monkeypatch.setattr(attention_probes, "compute_dtypes", lambda device: ["float16"])
    found = attention_probes._device_codes_rates(gpu, CompressionConfig(4, 64, -1), 64)
    assert set(found) == {"float16"}
    assert all({g for g, _, _ in points} == {1, 4} for points in found.values())
    assert all(rate > 0 and fixed >= 0 for points in found.values() for _, fixed, rate in points)
    hw = dataclasses.replace(synthetic_profile(cuda=True), attention_codes=found)
    again = HardwareProfile.from_json(json.dumps(dataclasses.asdict(hw)))
    assert again.device_codes_attention("float16", 8) == found["float16"][1][1:]
    assert HardwareProfile.from_json(json.dumps(dataclasses.asdict(synthetic_profile(cuda=True)))) \
        .device_codes_attention("float16", 1) is None  # not measured: the dense rate stands in


def once(fn, sync, **_) -> float:
    tic = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - tic
