"""The cost model knows the CPU's int4 weight kernel: compressed decoder weights multiplied as stored cost the
kernel's measured time, with no dequantization, where that is faster; the search then compresses on CPUs.
The profile measures the kernel, and a cached profile older than that gets it measured on load."""

from __future__ import annotations

import dataclasses
import json

import pytest

from flexgen_lite.engine.policy import Policy
from flexgen_lite.engine.weights import planned_bytes
from flexgen_lite.kernels.int4_cost import int4_cost
from flexgen_lite.kernels.int4_matmul import available
from flexgen_lite.models.presets import preset_config
from flexgen_lite.models.specs import layer_specs
from flexgen_lite.planning.budgets import Budgets
from flexgen_lite.planning.cost_model import predict
from flexgen_lite.planning.dtype_choice import compute_dtype
from flexgen_lite.planning.layout import Workload
from flexgen_lite.planning.policy_search import AutoPolicy, search_policy
from flexgen_lite.profiling.int4_probes import CODES_ROWS, INT4_ROWS, int4_rates
from flexgen_lite.profiling.measure import load_profile
from flexgen_lite.system.devices import ComputeDevice
from flexgen_lite.system.hardware import HardwareProfile, interpolated_time
from flexgen_lite.system.profile_store import profile_path, save_profile

from .conftest import synthetic_profile

G, GiB = 1e9, 2**30
HW = synthetic_profile()  # no kernel (int4_matmul None: as a profile older than it)
KERNEL = dataclasses.replace(HW, int4_matmul={"bfloat16": [(m, r * G, 2e-5) for m, r in
                                                            ((1, 30), (4, 100), (16, 200), (64, 220))]})
OPT = preset_config("facebook/opt-1.3b")
WL = Workload(64, 32)
COMPRESSED = Policy(gpu_batch_size=16, compress_weight=True, dtype="bfloat16")


def test_kernel_time_interpolates_like_matmul():
    points = KERNEL.int4_matmul["bfloat16"]
    assert KERNEL.int4_matmul_time("bfloat16", 10, 2048, 4096) == interpolated_time(points, 10, 2048, 4096)
    assert KERNEL.matmul_time("bfloat16", 10, 2048, 4096) == interpolated_time(HW.matmul["bfloat16"], 10, 2048, 4096)
    assert KERNEL.int4_matmul_time("float16", 10, 2048, 4096) is None
    assert HW.int4_matmul_time("bfloat16", 1, 64, 64) is None


def test_the_c_kernel_for_a_few_rows_is_costed_where_it_beats_torchs():
    """int4_gemv (native.int4_gemv, measured apart) replaces torch's kernel's time where it is faster, only up
    to the rows it was measured at; Int4Weight.matmul makes the same choice (codes_gemv_wins)."""
    fast = dataclasses.replace(KERNEL, int4_gemv={"bfloat16": [(m, 200 * G, 0.0) for m in (1, 2, 4)]})
    slow = dataclasses.replace(KERNEL, int4_gemv={"bfloat16": [(m, 10 * G, 0.0) for m in (1, 2, 4)]})
    k, n = 2048, 4096
    assert fast.int4_gemv_wins("bfloat16", 1, k, n) and fast.int4_gemv_wins("bfloat16", 4, k, n)
    assert fast.int4_matmul_time("bfloat16", 2, k, n) == pytest.approx(2 * 2 * k * n / (200 * G))
    assert not fast.int4_gemv_wins("bfloat16", 16, k, n)  # beyond its measured rows: torch's kernel
    assert fast.int4_matmul_time("bfloat16", 16, k, n) == interpolated_time(KERNEL.int4_matmul["bfloat16"], 16, k, n)
    assert not slow.int4_gemv_wins("bfloat16", 1, k, n)
    assert slow.int4_matmul_time("bfloat16", 1, k, n) == KERNEL.int4_matmul_time("bfloat16", 1, k, n)


def test_a_weight_takes_the_faster_path_for_one_batch():
    few, many = (int4_cost(KERNEL, "bfloat16", rows, 2, 2048, 8192) for rows in (16, 4096))
    assert few.dequantize == 0 and few.matmul == pytest.approx(2 * KERNEL.int4_matmul_time("bfloat16", 16, 2048, 8192))
    assert many.dequantize == pytest.approx(2048 * 8192 / KERNEL.dequantize["bfloat16"])
    assert many.matmul == pytest.approx(2 * KERNEL.matmul_time("bfloat16", 4096, 2048, 8192))
    assert int4_cost(HW, "bfloat16", 16, 1, 2048, 8192).dequantize > 0  # no kernel: dequantized


def test_tiles_are_taken_where_the_profile_says_they_are_fastest():
    rows, k, n = 64, 2048, 8192
    kernel, dense = KERNEL.int4_matmul_time("bfloat16", rows, k, n), KERNEL.matmul_time("bfloat16", rows, k, n)
    faster = [(m, 2 * m * k * n / (0.5 * min(kernel, dense)), 0.0) for m in (1, 4, 16, 64)]
    hw = dataclasses.replace(KERNEL, int4_tiles={"bfloat16": faster})
    for batches in (1, 4):
        cost = int4_cost(hw, "bfloat16", rows, batches, k, n)
        assert cost.dequantize == 0 and cost.matmul == pytest.approx(batches * 0.5 * min(kernel, dense))
    assert int4_cost(hw, "float16", rows, 1, k, n).matmul != pytest.approx(0.5 * min(kernel, dense))  # bf16 only


def test_the_batches_of_a_block_share_one_dequantization():
    """Where a dense matmul beats the kernel per batch, dequantizing once pays off from some number of GPU
    batches on (int4_path weighs the same); the layout's own dequantization rate is used when measured."""
    rows, k, n = 64, 2048, 8192
    kernel, dense = KERNEL.int4_matmul_time("bfloat16", rows, k, n), KERNEL.matmul_time("bfloat16", rows, k, n)
    assert dense < kernel
    hw = dataclasses.replace(KERNEL, int4_dequantize={"bfloat16": k * n / (4 * (kernel - dense))})
    one, eight = (int4_cost(hw, "bfloat16", rows, batches, k, n) for batches in (1, 8))
    assert one.dequantize == 0 and one.matmul == pytest.approx(kernel)
    assert eight.dequantize == pytest.approx(4 * (kernel - dense)) and eight.matmul == pytest.approx(8 * dense)


def test_the_kernel_makes_compressed_decode_cheaper_and_drops_its_dequantization():
    with_kernel, without = (predict(OPT, WL, COMPRESSED, hw) for hw in (KERNEL, HW))
    assert with_kernel.decode_step_s < 0.5 * without.decode_step_s
    assert "dequantize" not in with_kernel.decode_by and without.decode_by["dequantize"] > 0
    assert with_kernel.prefill_by["dequantize"] > 0  # 1024 rows: dequantized and dense, as int4_path would
    # only where the engine stores weights for the kernel: not in float32, nor with groups along the output
    for change in ({"dtype": "float32"}, {"weight_group_dim": 0}):
        policy = dataclasses.replace(COMPRESSED, **change)
        assert predict(OPT, WL, policy, KERNEL).decode_step_s == predict(OPT, WL, policy, HW).decode_step_s
    gpu = synthetic_profile(cuda=True)
    assert predict(OPT, WL, COMPRESSED, gpu).decode_step_s == predict(
        OPT, WL, COMPRESSED, dataclasses.replace(gpu, int4_matmul=KERNEL.int4_matmul)).decode_step_s


def test_search_compresses_on_a_cpu_with_the_kernel_when_uncompressed_weights_do_not_fit():
    budgets, workload = Budgets(None, int(1.5 * GiB), 20 * GiB), Workload(64, 32, 16)
    dense = planned_bytes(layer_specs(OPT), (100, 0, 0), compute_dtype(COMPRESSED, ComputeDevice().device.type))
    assert sum(dense.values()) > budgets.cpu  # uncompressed, most weights would be read from the (cold) disk
    auto = AutoPolicy(Policy(dtype="bfloat16"))
    with_kernel = search_policy(OPT, workload, KERNEL, budgets, auto, page_cache=0)
    without = search_policy(OPT, workload, HW, budgets, auto, page_cache=0)
    assert with_kernel.policy.compress_weight and not without.policy.compress_weight
    assert with_kernel.prediction.throughput > without.prediction.throughput


def test_profile_measures_the_kernels_that_multiply_the_layout_here():
    measured = int4_rates(ComputeDevice(), 8)
    found = measured["int4_matmul"]
    if available():
        rows = [m for m, _, _ in found["bfloat16"]]
        assert rows == list(INT4_ROWS) and all(rate > 0 and fixed >= 0 for _, rate, fixed in found["bfloat16"])
    else:  # torch's kernel does not read the layout here (AVX2): the C kernels' ways alone
        assert found == {}
    assert measured["int4_dequantize"]["bfloat16"] > 0
    tiles = measured["int4_tiles"]["bfloat16"]  # CI builds the C kernel (test_int4_matmul asserts it)
    assert [m for m, _, _ in tiles] == list(INT4_ROWS) and all(rate > 0 for _, rate, _ in tiles)
    codes = measured["int4_gemv"]["bfloat16"]  # the C kernel for a few rows, apart from torch's
    assert [m for m, _, _ in codes] == list(CODES_ROWS) and all(rate > 0 for _, rate, _ in codes)


@pytest.mark.parametrize("missing", [("int4_matmul", "int4_dequantize", "int4_tiles"), ("int4_tiles",)])
def test_a_cached_profile_older_than_the_kernel_gets_it_measured_once(tmp_path, monkeypatch, missing):
    monkeypatch.delenv("FLEXGEN_LITE_PROFILE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    raw = json.loads(dataclasses.replace(KERNEL, int4_dequantize={}, int4_tiles={}).to_json())
    for name in missing:
        del raw[name]  # as written before the field existed
    path = profile_path(ComputeDevice())
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(raw))
    calls, rates = [], {"int4_matmul": KERNEL.int4_matmul, "int4_dequantize": {"bfloat16": 9e9},
                        "int4_tiles": {"bfloat16": [(64, 400 * G, 1e-4)]}}
    monkeypatch.setattr("flexgen_lite.profiling.measure.measure_int4_matmul", lambda device: calls.append(1) or rates)
    assert load_profile().int4_dequantize == rates["int4_dequantize"]
    assert load_profile().int4_matmul == KERNEL.int4_matmul and len(calls) == 1  # saved with it
    assert HardwareProfile.from_json(path.read_text()).int4_dequantize == rates["int4_dequantize"]
    assert HardwareProfile.from_json(path.read_text()).int4_tiles == rates["int4_tiles"]


def test_a_profile_file_given_by_the_environment_is_left_as_it_is(tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    save_profile(HW, path)
    monkeypatch.setenv("FLEXGEN_LITE_PROFILE", str(path))
    monkeypatch.setattr("flexgen_lite.profiling.measure.measure_int4_matmul", lambda device: pytest.fail("measured"))
    assert load_profile().int4_matmul is None


def test_breakdowns_compute_bound_prices_4_bit_products_as_the_cost_model():
    """--breakdown's compute bound (step_flops with the run's Setup) counts a decode step's decoder matrices at
    the int4 kernel's time where the policy stores them for it, not at the dense rate (a batch-1 CPU step once
    read "0.5x its bound"); without compression, the dense rate as before."""
    from flexgen_lite.cli.breakdown import step_flops
    from flexgen_lite.models.specs import matmuls
    from flexgen_lite.planning.layout import Setup

    rows = 16
    dense_only = step_flops(OPT, rows, 1, 64, 1, KERNEL, "bfloat16")["compute_s"]
    plain = Setup(OPT, WL, dataclasses.replace(COMPRESSED, compress_weight=False), KERNEL)
    assert step_flops(OPT, rows, 1, 64, 1, KERNEL, "bfloat16", plain)["compute_s"] == pytest.approx(dense_only)
    s = Setup(OPT, WL, COMPRESSED, KERNEL)
    decoder = sum(KERNEL.int4_matmul_time("bfloat16", rows, k, n) for kind in ("attention", "mlp")
                  for k, n, _ in matmuls(s.kinds[kind]))
    dense_decoder = sum(KERNEL.matmul_time("bfloat16", rows, k, n) for kind in ("attention", "mlp")
                        for k, n, _ in matmuls(s.kinds[kind]))
    expected = dense_only + OPT.num_layers * (decoder - dense_decoder)
    assert decoder != pytest.approx(dense_decoder)
    assert step_flops(OPT, rows, 1, 64, 1, KERNEL, "bfloat16", s)["compute_s"] == pytest.approx(expected)
