"""The cost model beside a GPU (issue 21): CPU attention costed at the rate of the dtype it runs in, 4-bit weight
dequantization as GPU work beside the link rather than a wait for it."""

from __future__ import annotations

import dataclasses

import pytest

from flexgen_lite.engine.policy import Policy
from flexgen_lite.models.hf_config import config_from_dict
from flexgen_lite.planning.cost_model import predict
from flexgen_lite.planning.layout import Workload

from .conftest import synthetic_profile

G = 1e9
CONFIG = config_from_dict({"model_type": "opt", "hidden_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 16,
                           "ffn_dim": 4096, "vocab_size": 1000, "max_position_embeddings": 2048}, name="opt-test")
WORK = Workload(512, 32, 64)


def test_cpu_attention_beside_a_gpu_costed_in_bfloat16_for_a_float16_model():
    """A float16 model attends on the CPU in bfloat16 (Policy.cpu_attention_dtype): the CPU's slow float16 rate
    must not be what the search sees, or it never picks CPU attention (FlexGen's policy for OPT-30B does)."""
    hw = synthetic_profile(cuda=True)
    policy = Policy(gpu_batch_size=32, num_gpu_batches=2, cache_gpu_percent=0, cache_cpu_percent=100,
                    cpu_cache_compute=True, dtype="float16")
    fast = dataclasses.replace(hw, cpu_attention={"float32": (0, 20 * G), "bfloat16": (0, 100 * G),
                                                  "float16": (0, 1 * G)})
    slow_bf16 = dataclasses.replace(fast, cpu_attention={**fast.cpu_attention, "bfloat16": (0, 50 * G)})
    slow_fp16 = dataclasses.replace(fast, cpu_attention={**fast.cpu_attention, "float16": (0, 0.1 * G)})
    seconds = [predict(CONFIG, WORK, policy, h).decode_by["cpu attention"] for h in (fast, slow_bf16, slow_fp16)]
    assert seconds[1] == 2 * seconds[0] and seconds[2] == seconds[0]


def test_dequantization_on_a_gpu_is_work_beside_the_link_not_a_wait():
    """4-bit weights in host RAM: their codes cross the link while the previous layer's are dequantized on the GPU
    (WeightSlots), so a slower dequantization adds to the compute side of each layer, not to the link's."""
    hw = synthetic_profile(cuda=True)
    policy = Policy(gpu_batch_size=8, num_gpu_batches=1, weight_gpu_percent=0, weight_cpu_percent=100,
                    compress_weight=True, dtype="float16")
    base = predict(CONFIG, WORK, policy, hw)
    slow = predict(CONFIG, WORK, policy, dataclasses.replace(hw, dequantize=dict.fromkeys(hw.dequantize, 1e6)))
    assert slow.decode_by["link"] == base.decode_by["link"]
    assert slow.decode_by["dequantize"] > 100 * base.decode_by["dequantize"]
    assert slow.bound == "dequantize"


def test_decode_steps_captured_as_graphs_pay_no_schedule_overhead(monkeypatch):
    """All resident on CUDA the engine replays a captured decode step (decode_graph.py): the eager schedule's
    per-layer overhead, measured by the profile, is left out of its decode steps but not of its prefill, nor of
    an offloaded policy's steps, nor when graphs are switched off."""
    hw = synthetic_profile(cuda=True)
    resident = Policy(gpu_batch_size=8, num_gpu_batches=2, dtype="float16")
    offloaded = Policy(gpu_batch_size=8, num_gpu_batches=2, weight_gpu_percent=0, weight_cpu_percent=100,
                       dtype="float16")
    graphs = predict(CONFIG, WORK, resident, hw)
    assert graphs.decode_by.get("overhead", 0) == 0 and graphs.prefill_by["overhead"] > 0
    assert predict(CONFIG, WORK, offloaded, hw).decode_by["overhead"] > 0
    monkeypatch.setenv("FLEXGEN_LITE_CUDA_GRAPHS", "0")
    assert predict(CONFIG, WORK, resident, hw).decode_by["overhead"] > 0


def test_a_shared_prefix_crosses_the_link_once_per_part():
    """Cache in host RAM attended on the GPU: a prompt prefix shared by the block's rows is read over the link for
    one row of each part (KVCache.prefix_reads); the rest of every row as before. Disk parts read it whole."""
    hw = synthetic_profile(cuda=True)
    host = Policy(gpu_batch_size=32, num_gpu_batches=2, cache_gpu_percent=0, cache_cpu_percent=100, dtype="float16")
    whole, shared = (predict(CONFIG, Workload(512, 32, 64, shared_len=n), host, hw).decode_by["link"]
                     for n in (0, 448))
    mean = 512 + 32 / 2  # the cache's mean length over the decode steps
    assert abs(shared / whole - ((mean - 448) * 64 + 448 * 2) / (mean * 64)) < 1e-9
    unshared = predict(CONFIG, Workload(512, 32, 64, shared_len=448), dataclasses.replace(host, share_prefix=False),
                       hw).decode_by["link"]
    assert unshared == whole


def test_a_float16_cache_stays_float16_where_the_cpu_attends_it_as_fast():
    """Where the profile measured the CPU's fp16 attention within HALF_KEPT of its bf16 rate, at the model's
    grouping of heads, CPU-attended parts of a float16 model's cache stay float16 (exact, as the GPU computes them)
    and are costed at that rate; a slower fp16 rate (for grouped heads: the grouped one) or no profile keep
    bfloat16."""
    import torch

    from flexgen_lite.engine.policy import HALF_KEPT

    hw = synthetic_profile(cuda=True)
    policy = Policy(gpu_batch_size=32, num_gpu_batches=2, cache_gpu_percent=0, cache_cpu_percent=100,
                    cpu_cache_compute=True, dtype="float16")
    near = dataclasses.replace(hw, cpu_attention={"float32": (0, 20 * G), "bfloat16": (0, 100 * G),
                                                  "float16": (0, HALF_KEPT * 100 * G)})
    below = dataclasses.replace(near, cpu_attention={**near.cpu_attention, "float16": (0, 0.8 * 100 * G)})
    fp16 = torch.float16
    grouped = dataclasses.replace(near, cpu_attention_grouped={"bfloat16": [(128, 0, 100 * G)],
                                                               "float16": [(128, 0, 60 * G)]})
    assert policy.cpu_attention_dtype(fp16, near) == policy.cpu_attention_dtype(fp16, near, 4) == fp16
    assert policy.cpu_attention_dtype(fp16, grouped) == fp16 and policy.cpu_attention_dtype(fp16, grouped, 4) != fp16
    assert policy.cpu_attention_dtype(fp16, below) == policy.cpu_attention_dtype(fp16) == torch.bfloat16
    assert policy.cpu_attention_dtype(torch.float32, below) == torch.float32
    seconds = [predict(CONFIG, WORK, policy, h).decode_by["cpu attention"] for h in (near, below)]
    assert seconds[0] == pytest.approx(seconds[1] / HALF_KEPT)  # near: at fp16's rate; below: at bf16's


@pytest.mark.parametrize("link_gb_s,best", [(100, (20, 60)), (0.5, (100, 100))], ids=["link-idle", "link-slow"])
def test_cpu_attention_shared_with_an_idle_link_is_priced_and_chosen(link_gb_s, best):
    """cpu_attention_percent: the CPU attends its share of the host's cache while the rest crosses the link into
    the GPU's slots, priced as two lanes at once; best_cpu_share takes the share that balances them (about the
    CPU's rate over the sum, here 60 of 160 GB/s), all on the CPU where the link is slow, and within the GPU
    budget (the link's slots are GPU memory)."""
    from flexgen_lite.planning.budgets import Budgets
    from flexgen_lite.planning.policy_search import best_cpu_share

    gpu = {"float16": [(1, 2e12, 1e-5), (64, 1e14, 1e-5), (1024, 5e14, 1e-5)]}  # a GPU's rates: attention bound
    hw = dataclasses.replace(synthetic_profile(cuda=True), h2d_pinned=link_gb_s * G, matmul=gpu,
                             attention=dict.fromkeys(("float32", "bfloat16", "float16"), (1e-5, 2000 * G)),
                             sdpa_prefill=dict.fromkeys(("float32", "bfloat16", "float16"), 1e14),
                             cpu_attention=dict.fromkeys(("float32", "bfloat16", "float16"), (0, 60 * G)),
                             cpu_attention_grouped={})
    policy = Policy(gpu_batch_size=32, num_gpu_batches=2, cache_gpu_percent=0, cache_cpu_percent=100,
                    cpu_cache_compute=True, dtype="float16")
    whole, half = (predict(CONFIG, WORK, dataclasses.replace(policy, cpu_attention_percent=p), hw) for p in (100, 50))
    assert half.decode_by["cpu attention"] == pytest.approx(whole.decode_by["cpu attention"] / 2, rel=1e-6)
    assert "link" not in whole.decode_by or whole.decode_by["link"] == 0
    assert half.decode_by["link"] > 0
    chosen, prediction = best_cpu_share(CONFIG, WORK, policy, hw)
    assert best[0] <= chosen.cpu_attention_percent <= best[1]
    assert prediction.throughput >= whole.throughput
    if link_gb_s > 1:
        assert prediction.decode_step_s < 0.6 * whole.decode_step_s
        slots = predict(CONFIG, WORK, chosen, hw).peak["gpu"] - whole.peak["gpu"]
        assert slots > 0  # the link's share is read into slots on the GPU
        tight = Budgets(gpu=whole.peak["gpu"] + slots / 2, cpu=None, disk=None)
        assert best_cpu_share(CONFIG, WORK, policy, hw, budgets=tight)[0].cpu_attention_percent > \
            chosen.cpu_attention_percent


def test_cpu_attention_beside_the_links_copies_pays_the_measured_contention():
    """CPU attention and copies across the link read host RAM at once: where the profile measured each slowed by
    the other (host_contention), a layer doing both costs more, the more so at a share that runs them together,
    and where they slow each other enough best_cpu_share does not split; unmeasured (1, 1) costs nothing."""
    from flexgen_lite.planning.policy_search import best_cpu_share

    gpu = {"float16": [(1, 2e12, 1e-5), (64, 1e14, 1e-5), (1024, 5e14, 1e-5)]}
    free = dataclasses.replace(synthetic_profile(cuda=True), h2d_pinned=60 * G, matmul=gpu,
                               attention=dict.fromkeys(("float32", "bfloat16", "float16"), (1e-5, 2000 * G)),
                               sdpa_prefill=dict.fromkeys(("float32", "bfloat16", "float16"), 1e14),
                               cpu_attention=dict.fromkeys(("float32", "bfloat16", "float16"), (0, 60 * G)),
                               cpu_attention_grouped={})
    shared = dataclasses.replace(free, host_contention=(0.6, 0.6))
    policy = Policy(gpu_batch_size=32, num_gpu_batches=2, cache_gpu_percent=0, cache_cpu_percent=100,
                    cpu_cache_compute=True, cpu_attention_percent=50, dtype="float16")
    alone, both = (predict(CONFIG, WORK, policy, hw) for hw in (free, shared))
    assert both.decode_step_s > 1.2 * alone.decode_step_s  # each at 0.6 of its rate while both run
    assert both.decode_by["link"] > alone.decode_by["link"] and both.decode_by["cpu attention"] > alone.decode_by[
        "cpu attention"]
    all_cpu = dataclasses.replace(policy, cpu_attention_percent=100)
    assert predict(CONFIG, WORK, all_cpu, shared).decode_step_s == predict(CONFIG, WORK, all_cpu, free).decode_step_s
    assert 0 < best_cpu_share(CONFIG, WORK, policy, free)[0].cpu_attention_percent < 100
    crowded = dataclasses.replace(free, host_contention=(0.3, 0.3))  # together slower than one after the other
    assert best_cpu_share(CONFIG, WORK, policy, crowded)[0].cpu_attention_percent in (0, 100)


def test_cpu_attention_on_the_worker_overlaps_the_gpus_work_of_other_batches():
    """Beside a GPU the engine attends CPU parts on a worker while it launches the GPU's work
    (pending_attention.py): a layer costs the larger of the two, plus one batch's share of the other (the first
    batch's GPU work waits for its CPU attention); with one batch, or overlap off, or hidden states off the GPU
    (the engine then attends in its own thread), their sum."""
    hw = synthetic_profile(cuda=True)
    policy = Policy(gpu_batch_size=16, num_gpu_batches=4, cache_gpu_percent=0, cache_cpu_percent=100,
                    cpu_cache_compute=True, dtype="float16")
    worker = predict(CONFIG, WORK, policy, hw)
    serial = [predict(CONFIG, WORK, dataclasses.replace(policy, **kw), hw)
              for kw in (dict(overlap=False), dict(act_gpu_percent=0, act_cpu_percent=100))]
    assert all(worker.decode_step_s < p.decode_step_s for p in serial)
    assert worker.decode_by["cpu attention"] == pytest.approx(serial[0].decode_by["cpu attention"])
    from flexgen_lite.planning.cost_model import phase_times
    from flexgen_lite.planning.layout import Layout, Setup

    one = dataclasses.replace(policy, gpu_batch_size=64, num_gpu_batches=1)
    s = Setup(CONFIG, WORK, one, hw)
    layer = phase_times(s, Layout.of_policy(s, one), prefill=False).segments[1][1]
    assert layer.side > 0 and layer.work == pytest.approx(layer.side)  # one batch: its GPU work and CPU attention


H100 = "benchmarks/results/2026-12-06-h100/profile.json"  # the suite's profile of an H100 host (2026-12-06)


def test_a_job_of_known_size_counts_the_host_ram_its_plan_first_writes():
    """OPT-30B on a 16 GiB card beside 110 GiB of host RAM, by the H100's profile: fastest per token is a plan with
    88 GB of cache in host RAM. Where first writes to fresh host memory run at 1.5 GB/s (host_touch), a job of 256
    prompts would wait a minute before its tokens: it takes a plan with a fifth of that host RAM, faster as a whole
    job. A stream (no number of prompts) or a job a hundred times larger takes the fastest per token again; each
    prediction's setup_s is its plan's host RAM beyond the weights over the rate."""
    from pathlib import Path

    from flexgen_lite.models.presets import preset_config
    from flexgen_lite.planning.budgets import Budgets
    from flexgen_lite.planning.policy_search import search_policy
    from flexgen_lite.system.hardware import HardwareProfile

    hw = dataclasses.replace(HardwareProfile.from_json((Path(__file__).parents[1] / H100).read_text()),
                             host_touch=1.5 * G)
    config, budgets = preset_config("facebook/opt-30b"), Budgets(16 * 2**30, 110 * 2**30, 60 * 2**30)
    job, stream, large = (search_policy(config, Workload(512, 32, n), hw, budgets, page_cache=0).prediction
                          for n in (256, None, 25600))
    assert stream.setup_s == 0 and stream.peak["cpu"] > 80 * G
    assert job.peak["cpu"] < stream.peak["cpu"] / 4
    assert job.setup_s == pytest.approx(sum(v for k, v in job.memory["cpu"].items() if k != "weights") / hw.host_touch)
    tokens = 256 * 32
    assert job.job_throughput == pytest.approx(tokens / (tokens / job.throughput + job.setup_s))
    stream_as_job = tokens / (tokens / stream.throughput  # the stream's plan for this job: faster per token, not
                              + sum(v for k, v in stream.memory["cpu"].items() if k != "weights") / hw.host_touch)
    assert job.throughput < stream.throughput and job.job_throughput > stream_as_job  # as a whole
    assert large.peak["cpu"] == stream.peak["cpu"] and 0 < large.setup_s < 0.05 * 25600 * 32 / large.throughput
