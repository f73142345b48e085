"""The CPU compute dtype follows measured speed: bfloat16 only where its matmuls are faster than float32's
(the CPU's flags decide before a profile exists), one choice per machine that the policy search keeps."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from flexgen_lite import Policy
from flexgen_lite.cli.main import main
from flexgen_lite.models.presets import preset_config
from flexgen_lite.planning.budgets import Budgets
from flexgen_lite.planning.dtype_choice import choose_from_profile, compute_dtype, default_dtype, guess_from_flags
from flexgen_lite.planning.layout import Workload
from flexgen_lite.planning.policy_search import AutoPolicy, search_policy

from .conftest import synthetic_profile

GiB = 2**30
FAST_BF16 = synthetic_profile()  # like the AMD VM: bf16 matmuls 2-3x float32's


def slow_bf16_profile():
    """Like a Xeon without bf16 units: bf16 matmuls at a quarter of float32's rate."""
    hw = synthetic_profile()
    slow = [(m, rate / 4, fixed) for m, rate, fixed in hw.matmul["float32"]]
    return dataclasses.replace(hw, matmul={**hw.matmul, "bfloat16": slow})


@pytest.fixture
def profile_env(tmp_path, monkeypatch):
    def use(hw):
        path = tmp_path / "profile.json"
        path.write_text(hw.to_json())
        monkeypatch.setenv("FLEXGEN_LITE_PROFILE", str(path))
    return use


def test_flags_are_the_first_guess():
    assert guess_from_flags({"avx512f", "avx512_bf16"}).dtype == "bfloat16"
    assert guess_from_flags({"amx_bf16"}).dtype == "bfloat16"
    choice = guess_from_flags({"avx2", "avx512f", "avx512bw"})
    assert choice.dtype == "float32" and "lacks bfloat16 units" in choice.reason


def test_measured_rates_decide():
    assert choose_from_profile(FAST_BF16).dtype == "bfloat16"
    choice = choose_from_profile(slow_bf16_profile())
    assert choice.dtype == "float32" and "0.25x" in choice.reason


@pytest.mark.parametrize(("hw", "expected"), [(FAST_BF16, torch.bfloat16), (slow_bf16_profile(), torch.float32)])
def test_policy_default_on_cpu_follows_the_profile(profile_env, hw, expected):
    profile_env(hw)
    assert compute_dtype(Policy(), "cpu") == expected
    assert compute_dtype(Policy(dtype="bfloat16"), "cpu") == torch.bfloat16  # given: kept
    assert default_dtype("cuda").dtype == "float16"


def test_without_a_profile_the_flags_decide(tmp_path, monkeypatch):
    monkeypatch.delenv("FLEXGEN_LITE_PROFILE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no profile cached here
    monkeypatch.setattr("flexgen_lite.planning.dtype_choice.cpu_flags", lambda: {"avx2"})
    assert default_dtype("cpu").dtype == "float32" and "no profile yet" in default_dtype("cpu").reason


@pytest.mark.parametrize(("hw", "expected"), [(FAST_BF16, "bfloat16"), (slow_bf16_profile(), "float32")])
def test_search_picks_the_faster_dtype(hw, expected):
    result = search_policy(preset_config("facebook/opt-125m"), Workload(64, 16), hw, Budgets(None, 8 * GiB, 8 * GiB),
                           page_cache=0)
    assert result.policy.dtype == expected
    fixed = search_policy(preset_config("facebook/opt-125m"), Workload(64, 16), hw, Budgets(None, 8 * GiB, 8 * GiB),
                          AutoPolicy(Policy(dtype="bfloat16")), page_cache=0)
    assert {p.dtype for p, _ in fixed.ranked} == {"bfloat16"}


def test_plan_says_which_dtype_and_why(profile_env, capsys):
    profile_env(slow_bf16_profile())
    argv = ["plan", "--model", "facebook/opt-125m", "--prompt-len", "64", "--gen-len", "16", "--cpu-mem", "4GiB"]
    main(argv)
    out = capsys.readouterr().out
    assert "--dtype float32" in out
    line = next(line for line in out.splitlines() if line.startswith("dtype: "))
    assert line.startswith("dtype: float32 (") and "bfloat16" in line and "0.25x" in line
    main([*argv, "--dtype", "bfloat16", "--json"])
    assert json.loads(capsys.readouterr().out)["dtype_reason"] == "bfloat16 (given by --dtype)"


@pytest.mark.parametrize("hw", [FAST_BF16, slow_bf16_profile()], ids=["fast-bf16", "slow-bf16"])
def test_the_dtype_does_not_depend_on_the_number_of_prompts(hw):
    """One choice per machine: a 1-prompt and a 300-prompt workload of the same model compute in the same dtype
    (and the search weighs no other), so a prompt's greedy text does not change with what else is in the run."""
    config = preset_config("facebook/opt-125m")
    chosen = set()
    for prompts in (1, 300):
        result = search_policy(config, Workload(64, 16, prompts), hw, Budgets(None, 8 * GiB, 8 * GiB), page_cache=0)
        assert {p.dtype for p, _ in result.ranked} == {result.policy.dtype}
        chosen.add(result.policy.dtype)
    assert chosen == {choose_from_profile(hw).dtype}
