"""The int4 path (kernel, tiles or dense) is chosen from the stored profile, never by a timing in the run, so
identical runs with 4-bit weights give identical text."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

import flexgen_lite.kernels.int4_matmul as int4_matmul
from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.kernels.compression import CompressionConfig, quantize
from flexgen_lite.kernels.int4_cost import int4_path, int4_way, int4_ways
from flexgen_lite.kernels.int4_matmul import Int4Weight, pack

from .conftest import PROMPTS, forget_profile, set_profile, synthetic_profile
from .test_parity import P

G = 1e9


def _weight(n: int = 128, k: int = 256) -> Int4Weight:
    q = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(0)), CompressionConfig(4, 64, 1))
    return Int4Weight.from_bytes(pack(q), (n, k), 64)


def _no_timer(*_a):
    raise AssertionError("the int4 path was timed")


@pytest.fixture
def profile_with_int4_rates(tmp_path, monkeypatch):
    hw = dataclasses.replace(synthetic_profile(), int4_dequantize={"bfloat16": 2 * G},
                             int4_matmul={"bfloat16": [(1, 5 * G, 1e-5), (64, 40 * G, 1e-5)]},
                             int4_tiles={"bfloat16": [(1, 3 * G, 2e-5), (64, 60 * G, 2e-5)]})
    set_profile(hw, tmp_path, monkeypatch)
    yield hw
    forget_profile()


def test_the_path_comes_from_the_profile_rates_without_timing(profile_with_int4_rates, monkeypatch):
    monkeypatch.setattr(time, "perf_counter", _no_timer)
    weight, slot = _weight(), torch.empty(128 * 256, dtype=torch.bfloat16)
    for rows, uses in ((1, 1), (16, 2), (64, 1), (1024, 1)):
        ways = int4_ways(profile_with_int4_rates, "bfloat16", rows, uses, 256, 128)
        if not int4_matmul.native_agrees():
            ways.pop("tiles")
        assert int4_path(weight, rows, torch.bfloat16, slot, uses) == int4_way(ways)


def test_without_int4_rates_a_fixed_rule(monkeypatch):
    forget_profile()
    monkeypatch.setattr(time, "perf_counter", _no_timer)
    weight, slot = _weight(), torch.empty(128 * 256, dtype=torch.bfloat16)
    assert int4_path(weight, 4, torch.bfloat16, slot) == "kernel"  # the C kernel on the codes (torch's without it)
    assert int4_path(weight, int4_matmul.GEMV_ROWS, torch.bfloat16, slot) == "kernel"
    assert int4_path(weight, int4_matmul.GEMV_ROWS + 1, torch.bfloat16, slot) == "dense"
    assert int4_path(weight, 4096, torch.bfloat16, slot) == "dense"
    forget_profile()


def test_identical_runs_with_4bit_weights_give_identical_ids(tiny_models):
    policy = dataclasses.replace(P((100, 0, 100, 0, 100, 0), gbs=2, nb=2, compress_weight=True), dtype="bfloat16")
    runs = []
    for _ in range(3):
        forget_profile()  # each run as a fresh process would choose
        with FlexGenLite(str(tiny_models["llama"][0]), policy=policy) as m:
            runs.append(m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=6, stop_at_eos=False)))
    assert runs[0] == runs[1] == runs[2]
