"""Lossy 4-bit compression is said in one line, and a GGUF that already stores quantized weights is not
compressed again by the search unless asked."""

from __future__ import annotations

import dataclasses

from flexgen_lite import FlexGenLite, Policy, Workload, default_model_path
from flexgen_lite.model_source import compression_notice, model_config, source_quantization
from flexgen_lite.planning.budgets import Budgets
from flexgen_lite.planning.policy_search import AutoPolicy, _candidates, for_source, search_policy

from .conftest import synthetic_profile
from .test_parity import P


def test_the_shipped_gguf_is_known_as_quantized():
    assert source_quantization(default_model_path())[0] == "Q4_1"
    assert source_quantization("facebook/opt-125m") == []


def test_auto_does_not_compress_an_already_quantized_source_unless_asked():
    assert for_source(AutoPolicy(), ["Q4_1"]).compress_weight is False
    assert for_source(AutoPolicy(compress_weight=True), ["Q4_1"]).compress_weight is True
    assert for_source(AutoPolicy(), []).compress_weight is None
    config, hw = model_config(default_model_path()), synthetic_profile()
    workload = Workload(64, 8, 256)
    assert any(p.compress_weight for p in _candidates(workload, hw, AutoPolicy()))
    assert not any(p.compress_weight for p in _candidates(workload, hw, for_source(AutoPolicy(), ["Q4_1"])))
    result = search_policy(config, workload, hw, Budgets(None, 4 << 30, 100 << 30),
                           for_source(AutoPolicy(), ["Q4_1"]))
    assert not result.policy.compress_weight


def test_the_notice_says_what_is_compressed_and_who_chose_it():
    assert compression_notice(Policy(), True, []) is None
    asked = compression_notice(Policy(compress_weight=True), False, ["Q4_1"])
    assert "weights compressed to 4 bits" in asked and "lossy" in asked and "as asked" in asked
    assert "already Q4_1" in asked and "\n" not in asked
    auto = compression_notice(Policy(compress_cache=True), True, [])
    assert "KV cache" in auto and "--policy auto" in auto and "weights" not in auto
    both = Policy(compress_weight=True, compress_cache=True)  # the weights asked for, the cache searched
    mixed = compression_notice(both, ("KV cache",), [])
    assert mixed.endswith("the weights as asked, the KV cache chosen by --policy auto (--no-compress-cache forbids it)")
    assert compression_notice(both, ("weights", "KV cache"), []).endswith("--no-compress-cache forbid it")
    assert compression_notice(both, (), []).endswith(", as asked")


def test_a_compressed_run_says_so_on_stderr(tiny_models, capsys):
    policy = dataclasses.replace(P((100, 0, 100, 0, 100, 0), gbs=2, nb=1, compress_weight=True), dtype="float32")
    with FlexGenLite(str(tiny_models["opt"][0]), policy=policy):
        pass
    err = capsys.readouterr().err
    assert err.count("compressed to 4 bits") == 1
    with FlexGenLite(str(tiny_models["opt"][0]), policy=dataclasses.replace(policy, compress_weight=False)):
        pass
    assert "compressed" not in capsys.readouterr().err


def test_a_compression_given_to_the_search_is_as_asked(tiny_models, capsys):
    """--policy auto with --compress-weight: the search kept what it was given, and the notice says so."""
    base = Policy(dtype="float32")
    with FlexGenLite(str(tiny_models["opt"][0]), policy=AutoPolicy(base, compress_weight=True, compress_cache=False),
                     hardware=synthetic_profile(), workload=Workload(8, 4, 4)) as m:
        assert m.search is not None and m.policy.compress_weight
    err = capsys.readouterr().err
    assert "weights compressed to 4 bits" in err and "as asked" in err and "--policy auto" not in err, err
