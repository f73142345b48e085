"""Hardware profile, cost model, policy search, budgets: predictions behave, budgets hold, plans paste back."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from flexgen_lite import FlexGenLite, Policy, PolicyError, SamplingConfig
from flexgen_lite.cli.main import build_parser, main
from flexgen_lite.cli.options import policy_from_args
from flexgen_lite.engine.weights import planned_bytes
from flexgen_lite.kernels import native
from flexgen_lite.model_source import model_config
from flexgen_lite.models.presets import preset_config
from flexgen_lite.models.specs import layer_specs
from flexgen_lite.planning.budgets import Budgets
from flexgen_lite.planning.cost_model import predict
from flexgen_lite.planning.dtype_choice import compute_dtype
from flexgen_lite.planning.layout import Workload
from flexgen_lite.planning.memory_plan import peak_memory
from flexgen_lite.planning.policy_search import COMPRESSION_GAIN, TOLERANCE, AutoPolicy, search_policy
from flexgen_lite.profiling.measure import load_profile, measure
from flexgen_lite.profiling.probes import COARSE_ROWS, INT8_ROWS
from flexgen_lite.system.hardware import HardwareProfile
from flexgen_lite.system.memory import parse_size

from .conftest import PROMPTS, synthetic_profile

G, GiB, MiB = 1e9, 2**30, 2**20


HW = synthetic_profile()
OPT = preset_config("facebook/opt-1.3b")
WL = Workload(64, 32)


@pytest.fixture
def profile_file(tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    path.write_text(HW.to_json())
    monkeypatch.setenv("FLEXGEN_LITE_PROFILE", str(path))
    return path


# ---- profile --------------------------------------------------------------------------------------------------
def test_profile_measures_caches_and_reloads(tmp_path, monkeypatch):
    monkeypatch.delenv("FLEXGEN_LITE_PROFILE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    import flexgen_lite.profiling.measure as profile

    calls = []

    def quick(device, offload_dir, progress):
        calls.append(offload_dir)
        return measure(device, offload_dir, progress, quick=True)

    monkeypatch.setattr(profile, "measure", quick)
    first = load_profile(offload_dir=str(tmp_path / "offload"))
    assert not (tmp_path / "offload").exists()  # the probes' folder, made for them, is not left behind (helper-35)
    files = list((tmp_path / "flexgen-lite").glob("profile-cpu-*.json"))
    assert len(files) == 1
    assert load_profile(offload_dir=str(tmp_path / "offload")) == first  # from the cache, not measured again
    # one profile per file system, not per path: another directory on it is not measured again
    assert load_profile(offload_dir=str(tmp_path / "another" / "dir")) == first
    assert len(calls) == 1
    for value in (first.host_copy, first.host_touch, first.disk_read, first.disk_write, first.cached_read,
                  first.op_overhead,
                  first.attention["bfloat16"][1], first.dequantize["float32"], first.cache_disk_load["float32"][1]):
        assert value > 0
    assert [m for m, _, _ in first.matmul["float32"]] == [1, 4, 8, 16, 32, 64, 128, 256, 1024]
    assert [m for m, _, _ in first.matmul["float16"]] == list(COARSE_ROWS)  # a CPU's forced --dtype alone
    if native.library() is not None:  # the 8-bit head's kernel, in the dtypes a CPU computes in
        assert {d: [m for m, _, _ in p] for d, p in first.int8_gemv.items()} == dict.fromkeys(
            ("float32", "bfloat16"), list(INT8_ROWS))
    assert HardwareProfile.from_json(first.to_json()) == first
    assert {"matmul", "links", "host memory", "engine"} <= set(first.stage_seconds)  # what each stage took
    assert 0.9 * first.seconds <= sum(first.stage_seconds.values()) <= first.seconds + 0.2  # (each rounded)


def test_matmul_time_interpolates_between_measured_rows():
    flops = 2 * 2048 * 4096
    at = {m: 1e-4 + m * flops / (r * G) for m, r in ((16, 150), (64, 300), (1024, 370))}
    assert HW.matmul_time("bfloat16", 16, 2048, 4096) == pytest.approx(at[16])
    assert HW.matmul_time("bfloat16", 40, 2048, 4096) == pytest.approx((at[16] + at[64]) / 2)
    assert HW.matmul_time("bfloat16", 2048, 2048, 4096) == pytest.approx(2 * at[1024])


def test_parse_size():
    assert parse_size("16GiB") == 16 * GiB
    assert parse_size("500MiB") == 500 * MiB
    assert parse_size("1.5G") == int(1.5 * GiB)
    assert parse_size("2GB") == 2 * 10**9
    with pytest.raises(ValueError, match="16GiB"):
        parse_size("lots")


# ---- cost model -----------------------------------------------------------------------------------------------
def test_more_weights_on_disk_means_slower_decode():
    steps = []
    for w_gpu in (100, 75, 50, 25, 0):
        policy = Policy(gpu_batch_size=8, weight_gpu_percent=w_gpu)
        steps.append(predict(OPT, WL, policy, HW, page_cache=0).decode_step_s)  # cold disk
    assert steps == sorted(steps) and steps[-1] > 2 * steps[0]


def test_bigger_batch_is_faster_until_memory_binds():
    throughputs = [predict(OPT, WL, Policy(gpu_batch_size=g), HW).throughput for g in (1, 4, 16, 64)]
    assert throughputs == sorted(throughputs)
    budget = Budgets(None, 4 * GiB, 100 * GiB)
    tight = search_policy(OPT, WL, HW, budget, AutoPolicy(num_gpu_batches=1), page_cache=0)
    roomy = search_policy(OPT, WL, HW, Budgets(None, 16 * GiB, 100 * GiB), AutoPolicy(num_gpu_batches=1),
                          page_cache=0)
    # more memory never costs speed (the search is within 1% of optimal; a CPU computes on mapped disk
    # pages, so a roomier budget buys little once compute binds)
    assert roomy.prediction.throughput >= 0.99 * tight.prediction.throughput
    assert roomy.policy.gpu_batch_size >= tight.policy.gpu_batch_size
    bigger = Policy(gpu_batch_size=tight.policy.gpu_batch_size * 2, **_percents(tight.policy))
    assert peak_memory(OPT, WL, bigger, cuda=False)[1]["cpu"] > budget.cpu  # memory is what stopped it


def _percents(p: Policy) -> dict:
    return {k: getattr(p, k) for k in ("weight_gpu_percent", "weight_cpu_percent", "cache_gpu_percent",
                                       "cache_cpu_percent", "act_gpu_percent", "act_cpu_percent")}


def test_grouped_query_heads_cost_decode_attention_at_their_measured_rate():
    """A CPU profile measures decode attention ungrouped and over grouped-query heads apart (the grouped shape
    reads fewer bytes per query head, but each head's sums are work of their own): a model with grouped heads
    is costed at the grouped rate, an ungrouped one at the other."""
    fixed, rate = HW.attention["bfloat16"]
    slow = dataclasses.replace(HW, attention_grouped={"bfloat16": [(64, fixed, rate / 2), (128, fixed, rate / 4)]})
    assert slow.decode_attention("bfloat16", 1, 128) == (*HW.attention["bfloat16"], 0.0)
    assert slow.decode_attention("bfloat16", 4, 128) == (fixed, rate / 4, 0.0)
    assert slow.decode_attention("bfloat16", 3, 64) == slow.decode_attention("bfloat16", 3, 80) == (fixed, rate / 2, 0)
    assert HW.decode_attention("bfloat16", 4, 128) == (fixed, rate, 0.0)  # not measured grouped: the ungrouped rate
    beside = dataclasses.replace(slow, cpu_attention_grouped={"bfloat16": [(128, fixed, rate / 8)]})
    assert beside.decode_attention("bfloat16", 4, 128, on_cpu=True) == (fixed, rate / 8, 0.0)  # beside a GPU: its own
    assert beside.decode_attention("bfloat16", 1, 128, on_cpu=True) == (*HW.cpu_attention["bfloat16"], 0.0)
    llama = preset_config("llama-3-8b")
    assert llama.num_heads // llama.num_kv_heads == 4
    pol = Policy(gpu_batch_size=8, dtype="bfloat16")
    assert predict(llama, WL, pol, slow).decode_by["attention"] > 3 * predict(llama, WL, pol, HW).decode_by["attention"]
    assert predict(OPT, WL, pol, slow).decode_by["attention"] == predict(OPT, WL, pol, HW).decode_by["attention"]


def test_prediction_has_every_part_of_a_step():
    p = predict(OPT, WL, Policy(gpu_batch_size=8, weight_gpu_percent=50, cache_gpu_percent=50), HW, page_cache=0)
    assert {"compute", "attention", "disk", "overhead"} <= set(p.decode_by)
    gpu = predict(OPT, WL, Policy(gpu_batch_size=8, weight_gpu_percent=50, cache_gpu_percent=50),
                  synthetic_profile(cuda=True), page_cache=0)
    assert {"compute", "attention", "disk", "cache load", "link", "overhead"} <= set(gpu.decode_by)
    assert p.prefill_s > p.decode_step_s > 0
    assert p.throughput == pytest.approx(8 * 32 / (p.prefill_s + 31 * p.decode_step_s))
    without = predict(OPT, WL, Policy(gpu_batch_size=8, weight_gpu_percent=50, cache_gpu_percent=50, overlap=False),
                      HW, page_cache=0)
    assert without.decode_step_s > p.decode_step_s  # overlap hides the disk behind compute


@pytest.mark.parametrize("name", ["facebook/opt-350m", "llama-3-8b", "qwen2.5-7b"])
def test_weight_bytes_are_the_engines(name):
    config = preset_config(name)
    for policy in (Policy(weight_gpu_percent=37, weight_cpu_percent=21),
                   Policy(weight_gpu_percent=10, weight_cpu_percent=0, compress_weight=True),
                   Policy(weight_gpu_percent=0, weight_cpu_percent=0, compress_weight=True, weight_group_dim=0)):
        plan, _ = peak_memory(config, WL, policy, cuda=True)
        want = planned_bytes(layer_specs(config), policy.percents("weight"), compute_dtype(policy, "cuda"),
                             policy.weight_compression())
        assert {t: plan[t]["weights"] for t in want} == want


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_memory_model_matches_the_engines_ledger(tiny_models, family):
    """What the ledger counts (weights, weight slots, KV cache, cache slots, activation files) is what the
    model predicts, under placements over all tiers."""
    path = tiny_models[family][0]
    config = model_config(str(path))
    policies = [Policy(gpu_batch_size=3, num_gpu_batches=2, dtype="float32", weight_gpu_percent=30,
                       weight_cpu_percent=30, cache_gpu_percent=34, cache_cpu_percent=33, act_gpu_percent=50,
                       act_cpu_percent=0),
                Policy(gpu_batch_size=4, num_gpu_batches=2, dtype="float32", weight_gpu_percent=0,
                       weight_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0, compress_cache=True),
                Policy(gpu_batch_size=7, dtype="float32", compress_weight=True, weight_gpu_percent=50)]
    for policy in policies:
        with FlexGenLite(str(path), policy=policy) as m:
            m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=4))
            peak = m.memory_report()["peak"]
        plan, _ = peak_memory(config, Workload(max(map(len, PROMPTS)), 4), policy, cuda=False)
        ledger_gpu = sum(plan["gpu"][k] for k in ("weights", "weight slots", "kv cache", "cache slots"))
        assert peak["gpu"] == ledger_gpu, policy
        assert peak["cpu"] == plan["cpu"]["weights"] + plan["cpu"]["kv cache"], policy
        assert peak["disk"] == sum(plan["disk"].values()), policy


# ---- search ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,budgets", [
    ("facebook/opt-1.3b", Budgets(None, 3 * GiB, 20 * GiB)),
    ("facebook/opt-1.3b", Budgets(1 * GiB, 3 * GiB, 20 * GiB)),  # the compute tier capped inside host RAM
    ("llama-2-7b", Budgets(None, 6 * GiB, 40 * GiB)),
    ("llama-3-8b", Budgets(None, 12 * GiB, 40 * GiB)),
])
def test_searched_policies_respect_budgets(name, budgets):
    config = preset_config(name)
    result = search_policy(config, WL, HW, budgets, page_cache=0)
    assert result.ranked
    for policy, prediction in result.ranked:
        _, peak = peak_memory(config, WL, policy, cuda=False)
        assert peak == prediction.peak
        assert peak["cpu"] <= budgets.cpu and peak["disk"] <= budgets.disk
        assert budgets.gpu is None or peak["gpu"] <= budgets.gpu
    best = max(p.throughput for _, p in result.ranked)
    assert result.prediction.throughput >= best / COMPRESSION_GAIN * (1 - TOLERANCE)  # the stated tolerances


def test_search_on_a_gpu_profile_uses_the_link():
    hw = synthetic_profile(cuda=True)
    config = preset_config("facebook/opt-6.7b")
    result = search_policy(config, WL, hw, Budgets(8 * GiB, 40 * GiB, 100 * GiB), AutoPolicy(compress_weight=False),
                           page_cache=0)
    p = result.policy
    assert p.weight_gpu_percent < 100 and p.weight_cpu_percent > 0  # 13 GB of weights do not fit 8 GiB
    assert result.prediction.peak["gpu"] <= 8 * GiB and result.prediction.decode_by.get("link", 0) > 0


def test_impossible_budget_says_what_is_missing_where():
    with pytest.raises(PolicyError) as e:
        search_policy(OPT, WL, HW, Budgets(None, 300 * MiB, 1 * GiB), page_cache=0)
    message = str(e.value)
    assert "no policy fits opt-1.3b" in message and "missing on cpu" in message
    assert "--dtype bfloat16" not in message  # this profile computes in bfloat16 already
    # the smallest policy is the search's own, compressed: no hint to compress (it was tried), a flag to raise
    assert "Smaller" not in message and "(--cpu-mem that much larger)" in message
    assert "(compute tier)" in message  # the parts listed are those the tier's need adds up from
    with pytest.raises(PolicyError) as e:
        search_policy(OPT, WL, HW, Budgets(None, 300 * MiB, 1 * GiB), AutoPolicy(compress_weight=False),
                      page_cache=0)
    message = str(e.value)
    assert "missing on cpu" in message and "(largest: weights (compute tier) 0.20 GiB" in message
    assert "more than all tiers give" in message and "--disk-mem" in message
    assert "without --no-compress-weight the weights could be stored in 4 bits" in message


def test_placement_reads_a_chunk_at_a_time_and_a_ggufs_rotary_q_and_k_whole():
    """Loading's host transient: a chunk of rows in fp32 and the compute dtype (weight_reading.read_in_chunks), where
    it was OPT-1.3B's whole embedding twice (0.58 GiB, the largest part of the smallest plan); a GGUF's rotary q and k,
    their rows permuted by llama.cpp, are dequantized whole, which the plan counts."""
    from flexgen_lite.planning.memory_plan import peak_memory

    policy = Policy(gpu_batch_size=1, weight_gpu_percent=0, weight_cpu_percent=0, dtype="bfloat16")
    llama = preset_config("llama-3-8b")
    chunked = peak_memory(llama, WL, policy, cuda=False)[0]["cpu"]["load"]
    permuted = dataclasses.replace(llama, rotary_rows_permuted=True)
    assert chunked <= 48 * MiB and peak_memory(permuted, WL, policy, cuda=False)[0]["cpu"]["load"] == 4096**2 * 6


def test_an_over_budget_policy_says_what_would_fit():
    """Which flag to raise and by how much; a disk over its budget is not told to move more to disk; a searched
    policy is not told to use --policy auto."""
    from flexgen_lite.planning.budgets import check_budgets, largest_parts

    plan = {"gpu": {"weights": 100 * MiB, "kv cache": 50 * MiB}, "cpu": {"reserve": 64 * MiB},
            "disk": {"weights": 500 * MiB}}
    peak = {"gpu": 0.0, "cpu": 214 * MiB, "disk": 500 * MiB}
    with pytest.raises(PolicyError) as e:
        check_budgets(peak, plan, Budgets(None, 1 * GiB, 400 * MiB), cuda=False, what="the policy")
    message = str(e.value)
    assert "disk needs 0.49 GiB but its budget is 0.39 GiB: 100.00 MiB missing" in message
    assert "--disk-mem 100.00 MiB larger would fit it (--disk-mem 500MiB)" in message
    assert "move more to disk" not in message and "Keep more in memory" in message and "--policy auto" in message
    with pytest.raises(PolicyError) as e:  # the budget as the user gave it, less the runtime taken off
        check_budgets(peak, plan, Budgets(None, 200 * MiB, None, (("cpu", 300 * MiB),)), cuda=False,
                      what="this block", searched=True)
    message = str(e.value)
    assert "its budget is 0.20 GiB (--cpu-mem 0.49 GiB less 0.29 GiB of runtime)" in message
    assert "--cpu-mem 14.00 MiB larger" in message and "weights (compute tier) 100.00 MiB" in message
    # the whole flag that fits, rounded up (helper-40: two rounded figures summed were 1 MiB short)
    assert "would fit it (--cpu-mem 514MiB)" in message
    loading = {**plan, "cpu": {"reserve": 64 * MiB, "weights": 10 * MiB, "load": 160 * MiB, "kv cache": 20 * MiB}}
    assert largest_parts(loading, "cpu", cuda=False) == \
        "load 0.16 GiB, weights (compute tier) 100.00 MiB, reserve 64.00 MiB"  # loading sets the peak: its parts
    assert "move more to disk" in message and "--policy auto" not in message
    # an explicit policy is offered only what it does not do already (helper-33: an all-disk policy was told to
    # move more to disk)
    all_disk = Policy(gpu_batch_size=1, weight_gpu_percent=0, weight_cpu_percent=0, cache_gpu_percent=0,
                      cache_cpu_percent=0, act_gpu_percent=0, act_cpu_percent=0, compress_weight=True)
    for policy, offered, left_out in ((all_disk, ["Compress (--compress-cache)"],
                                       ["move more to disk", "batch size", "--compress-weight"]),
                                      (dataclasses.replace(all_disk, gpu_batch_size=4, cache_gpu_percent=50),
                                       ["Lower the batch size, move more to disk (--percent), compress"], [])):
        with pytest.raises(PolicyError) as e:
            check_budgets(peak, plan, Budgets(None, 100 * MiB, None), cuda=False, what="the policy", policy=policy)
        assert all(s in str(e.value) for s in offered) and not any(s in str(e.value) for s in left_out), e.value


def test_impossible_budget_on_a_machine_slow_at_bfloat16_suggests_it():
    """Without bfloat16 units the search keeps float32; when nothing fits, the error says bfloat16 halves it."""
    import dataclasses

    slow = {**HW.matmul, "bfloat16": [(m, r / 4, f) for m, r, f in HW.matmul["bfloat16"]]}
    hw = dataclasses.replace(HW, matmul=slow)
    with pytest.raises(PolicyError, match="--dtype bfloat16 halves the weights and the cache"):
        search_policy(OPT, WL, hw, Budgets(None, 300 * MiB, 1 * GiB), AutoPolicy(compress_weight=False), page_cache=0)
    with pytest.raises(PolicyError) as e:
        search_policy(OPT, WL, hw, Budgets(None, 300 * MiB, 1 * GiB), AutoPolicy(Policy(dtype="float32")),
                      page_cache=0)
    assert "--dtype bfloat16" not in str(e.value)  # given by the user: not second-guessed


def test_search_keeps_fixed_choices():
    auto = AutoPolicy(Policy(dtype="float32"), gpu_batch_size=8, num_gpu_batches=2, compress_weight=False)
    p = search_policy(OPT, WL, HW, Budgets(None, 4 * GiB, 50 * GiB), auto, page_cache=0).policy
    assert (p.gpu_batch_size, p.num_gpu_batches, p.compress_weight, p.dtype) == (8, 2, False, "float32")


# ---- wiring: CLI and API --------------------------------------------------------------------------------------
def test_plan_prints_flags_that_parse_back_to_the_policy(profile_file, capsys, monkeypatch):
    from flexgen_lite.cli import options

    # --cpu-mem less what the process holds now, which grows between the two calls: the same for both
    monkeypatch.setattr(options, "runtime_bytes", lambda: 400 * MiB)
    argv = ["plan", "--model", "facebook/opt-1.3b", "--prompt-len", "64", "--gen-len", "32", "--cpu-mem", "3GiB"]
    main(argv)
    text = capsys.readouterr().out
    flags = text.splitlines()[text.splitlines().index("policy (paste into bench or generate):") + 1].split()
    assert "bound by:" in text and "peak memory:" in text and "predicted:" in text
    main([*argv, "--json"])
    planned = json.loads(capsys.readouterr().out)
    pasted = policy_from_args(build_parser().parse_args(["bench", *flags]), default_batch=1)
    assert pasted == Policy(**planned["policy"])
    assert planned["peak_bytes"]["cpu"] <= 3 * GiB


def test_policy_flag_default_is_auto():
    parse = build_parser().parse_args
    assert isinstance(policy_from_args(parse(["bench"]), 16), AutoPolicy)
    assert isinstance(policy_from_args(parse(["bench", "--gpu-batch-size", "4"]), 16), AutoPolicy)
    manual = policy_from_args(parse(["bench", "--percent", "50", "50", "100", "0", "100", "0"]), 16)
    assert manual == Policy(gpu_batch_size=16, weight_gpu_percent=50, weight_cpu_percent=50)
    with pytest.raises(PolicyError, match="drop --percent"):
        policy_from_args(parse(["bench", "--policy", "auto", "--percent", "0", "0", "0", "0", "0", "0"]), 16)


def test_api_auto_policy_generates_like_an_explicit_one(tiny_models, references):
    path = tiny_models["llama"][0]
    with FlexGenLite(str(path), policy=AutoPolicy(Policy(dtype="float32")), hardware=HW,
                     workload=Workload(10, 8, len(PROMPTS)), budgets=Budgets(None, 2 * GiB, 2 * GiB)) as m:
        assert m.search is not None and m.policy == m.search.policy
        assert m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=8)) == references["llama"][0]


def test_explicit_policy_over_an_explicit_budget_is_refused(tiny_models, references):
    path = str(tiny_models["opt"][0])
    policy = Policy(dtype="float32")
    with pytest.raises(PolicyError, match="cpu needs .* missing"):
        FlexGenLite(path, policy=policy, budgets=Budgets(cpu=1 * MiB))
    # without a workload only weights and buffers are checked at first; each block's cache when it is made, and a
    # block of the policy's rows that passes the budgets runs narrower (test_block_shapes.py)
    enough_for_one_token = int(peak_memory(model_config(path), Workload(1, 1), policy, False)[1]["cpu"])
    with FlexGenLite(path, policy=policy, budgets=Budgets(cpu=enough_for_one_token)) as m:
        assert m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=8)) == references["opt"][0]
        assert len(m.shapes.engines) == 2  # the planned shape's and the last narrower one's


def test_generate_cli_plans_for_its_prompts(tiny_models, profile_file, capsys):
    path = str(tiny_models["opt"][0])
    main(["generate", "--model", path, "--dtype", "float32", "--max-new-tokens", "3", "--json", "w5 w6 w7", "w9"])
    captured = capsys.readouterr()
    assert "auto policy: --percent 100 0 100 0 100 0" in captured.err
    assert [len(json.loads(line)["token_ids"]) for line in captured.out.splitlines()] == [3, 3]


# ---- the budget promise, in a process of its own --------------------------------------------------------------
CPU_BUDGET = 700 * MiB  # the whole process; opt-125m in fp32 is 0.5 GB of weights: most must go to disk


@pytest.mark.parametrize("cold", [False, True], ids=["page-cache", "cold-direct-reads"])
def test_auto_policy_keeps_peak_rss_under_the_cpu_budget(profile_file, tmp_path, cold):
    """Peak RSS of a whole `flexgen-lite bench --cpu-mem 700MiB --disk-mem 400MiB` run on opt-125m (fp32) <=
    700 MiB: --cpu-mem is the process, so the runtime's share (Python, torch, ~0.3 GiB here) is measured at
    start and taken off before planning. Cold, the disk weights are read with O_DIRECT into buffers the plan
    counts (two per layer kind) instead of being mapped."""
    env = dict(os.environ, FLEXGEN_LITE_PROFILE=str(profile_file))
    run = subprocess.run([sys.executable, "-m", "flexgen_lite.cli", "bench", "--model", "facebook/opt-125m",
                          "--dtype", "float32", "--prompt-len", "16", "--gen-len", "4", "--num-gpu-batches", "1",
                          "--gpu-batch-size", "4", "--cpu-mem", "700MiB", "--disk-mem", "400MiB",
                          "--no-compress-weight",  # lossless: the weights cannot all stay in RAM
                          "--offload-dir", str(tmp_path)] + ["--cold-disk"] * cold,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    rss = report["peak_rss_gb"] * 1e9
    print(f"run peak RSS {rss / MiB:.0f} MiB, budget {CPU_BUDGET / MiB:.0f} MiB")
    # most decoder weights (0.32 GiB) really went to disk, within its budget
    assert 150 * MiB < report["peak_disk_gb"] * 1e9 <= 400 * MiB
    assert rss <= CPU_BUDGET


def test_a_cpu_budget_below_the_runtime_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--prompt-len", "8", "--gen-len", "2", "--cpu-mem", "100MiB"])
    assert e.value.code == 2
    assert "--cpu-mem 100.00 MiB does not cover this process's runtime" in capsys.readouterr().err


def test_on_a_cpu_a_jobs_start_counts_the_compute_tiers_host_ram():
    """A CPU's compute tier is host RAM: its cache and buffers are first written before a job's tokens as the cpu
    tier's are (the weights, read in whatever the plan, are not counted); a stream of prompts counts none."""
    hw = dataclasses.replace(synthetic_profile(), host_touch=2e9)
    policy = Policy(gpu_batch_size=16, num_gpu_batches=2, weight_gpu_percent=50, weight_cpu_percent=50,
                    cache_gpu_percent=50, cache_cpu_percent=50, dtype="float32")
    config = preset_config("facebook/opt-125m")
    job = predict(config, Workload(64, 16, 320), policy, hw)
    written = sum(v for tier in ("gpu", "cpu") for k, v in job.memory[tier].items() if k != "weights")
    assert job.memory["gpu"]["kv cache"] > 0 and job.setup_s == pytest.approx(written / 2e9)
    assert job.job_throughput == pytest.approx(320 * 16 / (320 * 16 / job.throughput + job.setup_s))
    assert predict(config, Workload(64, 16, None), policy, hw).setup_s == 0


@pytest.mark.parametrize(("fixed", "block"), [(dict(gpu_batch_size=8), (8, 1)), (dict(num_gpu_batches=4), (1, 4))])
def test_a_batch_shape_fixed_past_the_prompts_is_kept(fixed, block):
    """Two prompts cap the searched block at 2, but a batch size or count the user fixed past that is theirs: the
    search fills the rest (it found no candidate, and blamed the budgets)."""
    few = Workload(64, 32, num_prompts=2)
    found = search_policy(OPT, few, HW, Budgets(None, 16 * GiB, 100 * GiB), AutoPolicy(**fixed), page_cache=0)
    assert (found.policy.gpu_batch_size, found.policy.num_gpu_batches) == block
