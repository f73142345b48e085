"""A decode step's few rows times a 4-bit weight in compute memory, its codes read as stored, in Triton
(kernels/int4_gemv_triton.py): the kernel equals dequantize-then-matmul (fp32 reference) over dtypes, group
sizes, row counts and ragged shapes; the engine keeps a GPU's compressed decoder matrices as codes for decode steps
(WeightSlots: CodesMatrix), giving the tokens and logits of the path that dequantizes them into slots, and
dequantizes them for prefills. On the CPU Triton's interpreter runs it (FLEXGEN_LITE_CODES_MATMUL=triton, the
engine on a simulated link); under --device cuda the compiled kernel, forced by the same variable."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.kernels import int4_gemv_triton as gemv
from flexgen_lite.kernels import native
from flexgen_lite.kernels.quantization import CompressionConfig, dequantize_reference, quantize

from .conftest import PROMPTS, make_checkpoint, triton_device
from .test_parity import LINK, P

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # of the largest output
# (output rows, input columns, group size, rows of x): ragged blocks of output rows and of columns, 1 to 64 rows
CASES = [(130, 300, 64, 1), (256, 512, 32, 7), (64, 128, 128, 33), (100, 200, 16, 64), (1, 64, 64, 3)]


@pytest.fixture
def kernel_device(monkeypatch, compute_device) -> str:
    """The GPU under --device cuda (compiled), else the CPU (Triton's interpreter); the kernel asked for."""
    yield from triton_device(monkeypatch, compute_device, gemv.reset, gemv.ENV)


@needs_triton
@pytest.mark.parametrize("dtype,splits", [(torch.float32, None), (torch.float16, None), (torch.float16, 2),
                                          (torch.bfloat16, None)], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_kernel_is_dequantize_then_matmul(kernel_device, case, dtype, splits):
    n, k, gs, rows = case
    g = torch.Generator().manual_seed(n + k)
    q = quantize(torch.randn(n, k, generator=g), CompressionConfig(4, gs, 1))
    x = torch.randn(rows, k, generator=g).to(dtype)
    want = x.float() @ dequantize_reference(q, dtype, None).float().T
    got = gemv.matmul(x.to(kernel_device), q.to(kernel_device), splits).cpu()
    assert got.dtype == dtype and got.shape == (rows, n)
    assert (got.float() - want).abs().max() <= TOLERANCE[dtype] * want.abs().max()


@needs_triton
def test_self_check_passes_and_the_switch_turns_it_off(kernel_device, monkeypatch):
    assert gemv.refusal(kernel_device, torch.float16, 64) is None and gemv.enabled_on(kernel_device)
    monkeypatch.setenv("FLEXGEN_LITE_TRITON", "0")
    monkeypatch.delenv(gemv.ENV)
    gemv.reset()
    assert gemv.refusal(kernel_device, torch.float16, 64) == "FLEXGEN_LITE_TRITON=0"
    assert not gemv.enabled_on(kernel_device)


def test_what_it_reads_and_what_it_leaves_to_the_slot(monkeypatch):
    """Groups along the input dimension of a power of two; FlexGen's groups along the output one, 8 bits and other
    sizes are dequantized into the slot; off a GPU, unasked, the slot's product runs."""
    w = torch.randn(64, 128)
    assert gemv.supported(quantize(w, CompressionConfig(4, 64, 1)), torch.float16)
    for config in (CompressionConfig(4, 64, 0), CompressionConfig(8, 64, 1), CompressionConfig(4, 48, 1)):
        assert not gemv.supported(quantize(w, config), torch.float16)
    monkeypatch.delenv(gemv.ENV, raising=False)
    q = quantize(w, CompressionConfig(4, 64, 1))
    x = torch.randn(3, 128)
    assert not gemv.wanted(q, x) and not gemv.enabled_on("cpu")
    slot = torch.empty(64, 128)
    torch.testing.assert_close(gemv.CodesMatrix(q, slot).matmul(x), x @ dequantize_reference(q, torch.float32, None).T)


@needs_triton
@pytest.mark.parametrize("chosen", ["codes", "slot"])
def test_on_a_gpu_the_faster_path_is_measured_and_kept(kernel_device, monkeypatch, chosen):
    """CodesMatrix on a GPU: the kernel and the slot path measured once per kind (attention.faster, rows by powers
    of two, the step's products by the matrix), each as a step runs it: its 3 products by the kernel against one
    dequantization into the slot and 3 dense products; the faster one run; both give the slot path's values."""
    from flexgen_lite.kernels import attention

    counts, kinds, measured = {"kernel": 0, "dequantize": 0}, [], []
    kernel, dequant = gemv.matmul, gemv.dequantize

    def counted(name, call):
        def run(*args, **kwargs):
            counts[name] += 1
            return call(*args, **kwargs)
        return run

    def faster(kind, calls, device):
        kinds.append(kind)
        for name, call in calls.items():
            before = dict(counts)
            call()
            measured.append((name, counts["kernel"] - before["kernel"], counts["dequantize"] - before["dequantize"]))
        return chosen

    q = quantize(torch.randn(128, 256), CompressionConfig(4, 64, 1)).to(kernel_device)
    assert gemv.wanted(q, torch.randn(3, 256, device=kernel_device))  # its self-check run, before the counts
    monkeypatch.setattr(gemv, "by_measurement", lambda x: True)
    monkeypatch.setattr(gemv, "matmul", counted("kernel", kernel))
    monkeypatch.setattr(gemv, "dequantize", counted("dequantize", dequant))
    monkeypatch.setattr(attention, "faster", faster)
    weight = gemv.CodesMatrix(q, torch.empty(128, 256, device=kernel_device), uses=3)
    for rows in (3, 4):
        x = torch.randn(rows, 256, device=kernel_device)
        torch.testing.assert_close(weight.matmul(x), x @ dequantize_reference(q, torch.float32, None).T,
                                   atol=1e-4, rtol=0)
    assert [k[3] for k in kinds] == [4, 4] and {k[-1] for k in kinds} == {3}  # 3 and 4 rows: one kind
    assert measured == [("codes", 3, 0), ("slot", 0, 1)] * 2  # (the fake measures each call; faster keeps them)
    ran = 2 if chosen == "codes" else 0
    assert counts == {"kernel": 6 + ran, "dequantize": 2 + 2 - ran}


def test_the_cost_model_fills_the_slot_once_a_step():
    """codes_win prices the slot as the engine measures it: one dequantization a step shared by its batches'
    products. A kernel slower than a dense product plus half a dequantization loses at 2 batches and wins at 1
    (priced a dequantization per product, as sessions 27-28 did, it won at both)."""
    import dataclasses
    import types

    from flexgen_lite.planning.products_cost import codes_win

    from .conftest import synthetic_profile

    hw, (rows, k, n) = synthetic_profile(cuda=True), (16, 4096, 4096)
    dense, fill = hw.matmul_time("float16", rows, k, n), n * k / hw.dequantize["float16"]
    hw = dataclasses.replace(hw, int4_gemv={"float16": [(rows, 1e30, dense + 0.75 * fill)]})
    s = types.SimpleNamespace(hw=hw, dname="float16", cuda=True)
    assert codes_win(s, rows, k, n, 1) and not codes_win(s, rows, k, n, 2)


def test_which_matrices_a_step_keeps_as_codes(monkeypatch):
    """WeightSlots keeps a 4-bit matrix in compute memory as codes for a step of up to GEMV_ROWS rows where the
    kernel is enabled, unless its kind of product measured faster through the slot (then the slot is filled when
    fetched, beside compute, as without the kernel); never a prefill's rows, FlexGen's output-dim groups (but by a
    CPU's C kernel) or a matrix in host RAM."""
    from flexgen_lite.engine.storage import MemoryLedger
    from flexgen_lite.engine.weight_slots import WeightSlots
    from flexgen_lite.engine.weights import StoredWeight
    from flexgen_lite.system.devices import ComputeDevice

    monkeypatch.setenv(gemv.ENV, "triton")
    device = ComputeDevice("cpu+link")
    slots = WeightSlots(device, MemoryLedger(), None)
    config = CompressionConfig(4, 64, 1)

    def stored(config=config):
        q = quantize(torch.randn(128, 256), config)
        return StoredWeight((128, 256), torch.float32, "gpu", q, q.nbytes, config)

    slots.step_rows = 3
    assert slots._kept_as_codes(stored())
    assert not slots._kept_as_codes(stored(CompressionConfig(4, 64, 0)))
    host = torch.zeros(stored().nbytes, dtype=torch.uint8)  # its bytes in host RAM, to cross the link
    assert not slots._kept_as_codes(StoredWeight((128, 256), torch.float32, "cpu", host, host.numel(), config))
    asked = []
    monkeypatch.setattr(gemv, "slot_chosen", lambda *kind: asked.append(kind) or True)
    slots.step_uses = 4
    assert not slots._kept_as_codes(stored())
    assert asked == [((128, 256), 3, torch.float32, 64, 4)]  # the kind measured: rows and the step's batches
    monkeypatch.undo()
    monkeypatch.setenv(gemv.ENV, "triton")
    slots.step_rows = gemv.GEMV_ROWS + 1
    assert not slots._kept_as_codes(stored())
    monkeypatch.delenv(gemv.ENV)  # a CPU's C kernel reads FlexGen's groups (test_int4_row_groups.py)
    slots.step_rows = 3
    assert slots._kept_as_codes(stored(CompressionConfig(4, 64, 0))) == (native.library() is not None)


def run(path, policy, device):
    """(ids, logits, the kernel's calls, their rows)"""
    calls, matmul = [], gemv.matmul
    gemv.matmul = lambda x, q, splits=None: calls.append(x.numel() // x.shape[-1]) or matmul(x, q, splits)
    try:
        with FlexGenLite(str(path), policy=policy, device=device) as m:
            ids, logits = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=3, stop_at_eos=False),
                                         return_logits=True)
    finally:
        gemv.matmul = matmul
    return ids, logits, calls


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """OPT and Llama with 4 layers: more than the two slots a kind of layer has, so that every step fills them
    (a model of 2 keeps its prefill's dequantized matrices in its slots)."""
    out = {}
    for family in ("opt", "llama3"):
        out[family] = tmp_path_factory.mktemp(f"gemv-{family}")
        make_checkpoint(out[family], family, seed=11, num_hidden_layers=4)
    return out


@needs_triton
@pytest.mark.parametrize("family,percent", [("opt", (100, 0, 100, 0, 100, 0)), ("llama3", (50, 50, 100, 0, 100, 0))],
                         ids=["opt-gpu", "llama3-gpu-and-cpu"])  # each family, each placement once
def test_the_engine_keeps_a_gpus_4_bit_matrices_as_codes_for_decode_steps(four_layers, family, percent,
                                                                         kernel_device, compute_device, monkeypatch):
    """Decode steps (3 rows) multiply the GPU's compressed matrices as codes; the prefill (3 rows x 10 positions,
    more than GEMV_ROWS, here 16) dequantizes them into slots; host RAM's cross the link and are dequantized as
    before.
    Tokens and logits are those of the run that dequantizes every matrix into its slot."""
    device = compute_device if compute_device.startswith("cuda") else LINK
    policy = P(percent, gbs=3, nb=2, compress_weight=True)
    monkeypatch.setattr(gemv, "GEMV_ROWS", 16)
    ids, logits, calls = run(four_layers[family], policy, device)
    assert 3 in calls and max(calls) <= 16, calls  # decode steps' rows (and a shared prefix's 5), no prefill's 30
    monkeypatch.delenv(gemv.ENV)
    monkeypatch.setenv("FLEXGEN_LITE_TRITON", "0")
    gemv.reset()
    want_ids, want_logits, none = run(four_layers[family], policy, device)
    assert not none and ids == want_ids
    for a, b in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_the_cost_model_prices_a_decode_step_keeping_codes(monkeypatch):
    """Where a plan counts on codes kept (planned: a GPU machine with Triton, or asked) and the kernel's measured
    time is under the slot's dequantization and dense product, a decode step's GPU matrices are multiplied by it
    and not dequantized; unmeasured or slower, they are dequantized beside compute as before; prefills keep the
    slot. (The eager schedule's step: CUDA graphs off; with them, test_decode_graph.py.)"""
    import dataclasses

    from flexgen_lite.engine import decode_graph
    from flexgen_lite.planning.cost_model import predict
    from flexgen_lite.planning.layout import Workload

    from .conftest import synthetic_profile
    from .test_cost_model_cuda import CONFIG

    monkeypatch.setenv(decode_graph.ENV, "0")
    policy = dataclasses.replace(P((100, 0, 100, 0, 100, 0), gbs=16, nb=2, compress_weight=True), dtype="float16")
    hw, work = synthetic_profile(cuda=True), Workload(512, 32, 64)
    dense_rate = hw.matmul["float16"][-1][1]
    fast = dataclasses.replace(hw, int4_gemv={"float16": [(1, dense_rate, 0.0), (64, 64 * dense_rate, 0.0)]})
    slow = dataclasses.replace(hw, int4_gemv={"float16": [(1, dense_rate / 1e3, 0.0), (64, dense_rate / 1e2, 0.0)]})
    with monkeypatch.context() as patch:
        patch.setattr(gemv, "planned", lambda: False)
        beside = predict(CONFIG, work, policy, fast)
    monkeypatch.setattr(gemv, "planned", lambda: True)
    kernel, unmeasured, slower = (predict(CONFIG, work, policy, h) for h in (fast, hw, slow))
    assert beside.decode_by["dequantize"] > 0 and not kernel.decode_by.get("dequantize")
    assert kernel.decode_by["compute"] < beside.decode_by["compute"]  # the kernel at 16 rows: faster here
    assert unmeasured.decode_by == pytest.approx(beside.decode_by) and slower.decode_by == pytest.approx(
        beside.decode_by)  # the slot beside compute, as before
    assert kernel.prefill_s == beside.prefill_s  # prefills keep the slot


@needs_triton
# the probe in Triton's interpreter: on a GPU the suite's profile step measures it on the device (there,
# TRITON_INTERPRET set mid-process found no kernel: 2026-12-06, H100)
@pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="the interpreter's probe test")
def test_the_profile_measures_the_gpu_kernel(monkeypatch):
    """The profile's probe of a GPU's kernel (here in the interpreter): points per row count, read back by
    interpolated_time as the cost model reads them."""
    import types

    from flexgen_lite.profiling import int4_probes
    from flexgen_lite.system.hardware import interpolated_time

    from .test_quantized_attention_triton import once

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(gemv.ENV, "triton")
    gemv.reset()
    monkeypatch.setattr(int4_probes, "timed", once)
    monkeypatch.setattr(int4_probes, "compute_dtypes", lambda device: ["float16"])
    gpu = types.SimpleNamespace(is_cuda=True, device=torch.device("cpu"), synchronize=lambda: None)
    found = int4_probes.gpu_codes_points(gpu, 64)
    assert [m for m, _, _ in found["float16"]] == list(int4_probes.GPU_CODES_ROWS)
    assert all(rate > 0 and fixed >= 0 for _, rate, fixed in found["float16"])
    assert interpolated_time(found["float16"], 8, 4096, 4096) > 0


@needs_triton
def test_a_kept_matrix_through_its_slot_leaves_no_stale_slot_behind(four_layers, kernel_device, compute_device,
                                                                    monkeypatch):
    """A matrix kept as codes whose product runs through its slot (the slot path measured faster, or the kernel
    refused) writes that slot: the slot no longer holds the layer a prefill left in it, and a later layer of that
    slot must not take it as its own. Tokens and logits are the slot path's."""
    device = compute_device if compute_device.startswith("cuda") else LINK
    policy = P((100, 0, 100, 0, 100, 0), gbs=3, nb=2, compress_weight=True)
    monkeypatch.setenv("FLEXGEN_LITE_CUDA_GRAPHS", "0")  # the eager step's products (a graph's: the kernel alone)
    monkeypatch.setattr(gemv, "GEMV_ROWS", 16)  # the prefill (30 rows) fills the slots; decode steps keep codes
    monkeypatch.setattr(gemv, "wanted", lambda q, x: False)  # ... and multiply through the slot
    ids, logits, calls = run(four_layers["opt"], policy, device)
    monkeypatch.delenv(gemv.ENV)
    monkeypatch.setenv("FLEXGEN_LITE_TRITON", "0")
    gemv.reset()
    want_ids, want_logits, _ = run(four_layers["opt"], policy, device)
    assert not calls and ids == want_ids
    for a, b in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
