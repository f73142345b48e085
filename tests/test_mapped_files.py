"""A CPU computing on offload files mapped in place: the profile's probe of what mapping costs, and the cost model
pricing it (a layer's weights mapped from disk, a cache part's pages faulted in and out and first written)."""

from __future__ import annotations

import dataclasses

import pytest

from flexgen_lite.engine.policy import Policy
from flexgen_lite.engine.storage import PAGE
from flexgen_lite.models.hf_config import config_from_dict
from flexgen_lite.planning.cost_model import predict
from flexgen_lite.planning.layout import Workload
from flexgen_lite.profiling.disk_probes import mapped_pages
from flexgen_lite.profiling.measure import SMALL

from .conftest import synthetic_profile

CONFIG = config_from_dict(SMALL["llama"], name="small-llama")  # 4 layers, 4 kv heads of 64
WORK = Workload(32, 16)
FETCH, PART, READ, WRITE = 3e-4, 1e-4, 15e9, 2e-6


def step(hw, **placed) -> float:
    return predict(CONFIG, WORK, Policy(gpu_batch_size=8, dtype="float32", **placed), hw).decode_step_s


def test_the_probe_measures_mapping_on_this_file_system(tmp_path):
    found = mapped_pages(str(tmp_path), 4 * 2**20)
    assert found["mapped_read"] > 0 and found["mapped_write"] >= 0
    assert list(tmp_path.iterdir()) == []  # its file removed


def test_weights_mapped_from_disk_cost_each_layer_its_measured_overhead():
    plain = synthetic_profile()
    hw = dataclasses.replace(plain, mapped_fetch=FETCH, mapped_part=PART, mapped_read=READ, mapped_write=WRITE)
    on_disk = dict(weight_gpu_percent=0, weight_cpu_percent=0)
    assert step(hw) == pytest.approx(step(plain))  # nothing mapped: nothing priced
    added = step(hw, **on_disk) - step(plain, **on_disk)
    assert added == pytest.approx(2 * CONFIG.num_layers * FETCH, rel=0.01)  # each layer's attention, MLP (norms in RAM)
    half = step(hw, weight_gpu_percent=50, weight_cpu_percent=0) - step(plain, weight_gpu_percent=50,
                                                                         weight_cpu_percent=0)
    assert 0 < half < added  # a layer partly on disk: its share (the LP reads costs as affine in the placement)


def test_cache_parts_mapped_from_disk_cost_their_pages_writes_and_parts():
    plain = synthetic_profile()
    hw = dataclasses.replace(plain, mapped_fetch=FETCH, mapped_part=PART, mapped_read=READ, mapped_write=WRITE)
    on_disk = dict(cache_gpu_percent=0, cache_cpu_percent=0)
    added = step(hw, **on_disk) - step(plain, **on_disk)
    rows, heads = 8, CONFIG.num_kv_heads
    nbytes = rows * 2 * heads * CONFIG.head_dim * 4 * WORK.max_len  # k and v, float32, every position planned
    pages = nbytes / READ * plain.contention  # the I/O thread's, beside compute on a CPU
    writes = min(nbytes / PAGE, 2 * rows * heads) * WRITE  # a page per row and head, k and v
    assert added == pytest.approx(CONFIG.num_layers * (pages + writes + PART))


def test_decode_attention_is_timed_over_caches_no_cache_holds(monkeypatch):
    """The profile's CPU decode attention rotates over `room` bytes of distinct caches (a decode step reads each
    layer's once), each call over one of them, all of them in turn; then they are given back."""
    import torch

    from flexgen_lite.profiling import attention_probes as probes

    seen, attend = [], probes.attend_named
    monkeypatch.setattr(probes, "attend_named",
                        lambda q, k, v, mask, shared=None: seen.append((k.data_ptr(), v.data_ptr(), k.shape[2],
                                                                        k.shape[0]))
                        or attend(q, k, v, mask, shared=shared))
    b, heads, hd, long = 2, 4, 64, 256
    per_copy = 2 * b * heads * (long + 64) * hd * 4
    fixed, rate, pair = probes._decode_attention_rate(torch.device("cpu"), torch.float32, b, heads, heads, hd, long,
                                                      False, room=5 * per_copy)
    assert rate > 0 and fixed >= 0 and pair >= 0
    rates = [call[:3] for call in seen if call[3] == b]
    caches = {(k, v) for k, v, _ in rates}
    assert len(caches) == 5 and len({p for pair in caches for p in pair}) == 10  # 5 copies of k and v, apart
    assert {length for *_, length in rates} == {32, long}
    assert all(rates[i][:2] != rates[i + 1][:2] for i in range(len(rates) - 1) if rates[i][2] == rates[i + 1][2])
    many = [call for call in seen if call[3] != b]  # the cost per (row, kv head): many rows, 32 positions, rotated
    assert many and {call[2:] for call in many} == {(32, b * probes.PAIR_ROWS)}
    assert len({call[:2] for call in many}) > 1
    probes._kept.clear()


def test_without_overlap_the_engine_s_own_mapped_costs_are_its_inline_ones():
    """Overlap off: the engine's own work per layer and part mapped is the inline one measured, and the pages
    mapped in and out are the compute thread's (no contention factor)."""
    hw = dataclasses.replace(synthetic_profile(), mapped_fetch=FETCH, mapped_part=PART, mapped_fetch_inline=FETCH / 3,
                             mapped_part_inline=PART / 3, mapped_read=READ, mapped_write=WRITE)
    plain = dataclasses.replace(hw, mapped_fetch=0.0, mapped_part=0.0, mapped_fetch_inline=0.0, mapped_part_inline=0.0)
    on_disk = dict(weight_gpu_percent=0, weight_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0)

    def pages(h, overlap: bool) -> float:
        policy = Policy(gpu_batch_size=8, dtype="float32", overlap=overlap, **on_disk)
        return predict(CONFIG, WORK, policy, h).decode_by["mapped pages"]

    layers = CONFIG.num_layers
    for overlap, (fetch, part) in ((True, (FETCH, PART)), (False, (FETCH / 3, PART / 3))):
        assert pages(hw, overlap) - pages(plain, overlap) == pytest.approx(2 * layers * fetch + layers * part,
                                                                           rel=0.01)
    nbytes = 8 * 2 * CONFIG.num_kv_heads * CONFIG.head_dim * 4 * WORK.max_len / READ  # a layer's, as above
    assert pages(plain, True) - pages(plain, False) == pytest.approx(layers * nbytes * (hw.contention - 1))


def test_a_cpu_search_weighs_overlap_and_keeps_what_is_asked():
    """On a CPU whose engine pays less without overlap for mapped files, the search turns it off for a model on
    disk; asked (--overlap / --no-overlap) it keeps it; all in memory the two tie and overlap stays on; beside a GPU
    it is not searched."""
    from flexgen_lite.planning.budgets import Budgets
    from flexgen_lite.planning.policy_search import AutoPolicy, search_policy

    hw = dataclasses.replace(synthetic_profile(), mapped_fetch=2e-3, mapped_part=1e-3, mapped_fetch_inline=1e-4,
                             mapped_part_inline=1e-4, mapped_read=READ, mapped_write=WRITE)
    work, tight, roomy = Workload(32, 16, 64), Budgets(cpu=int(0.09 * 2**30)), Budgets(cpu=2**33)
    assert search_policy(CONFIG, work, hw, tight, page_cache=2**33).policy.overlap is False
    asked = AutoPolicy(dataclasses.replace(AutoPolicy().base, overlap=True), overlap=True)
    assert search_policy(CONFIG, work, hw, tight, asked, page_cache=2**33).policy.overlap is True
    assert search_policy(CONFIG, work, hw, roomy, page_cache=2**33).policy.overlap is True
    gpu = dataclasses.replace(synthetic_profile(cuda=True))
    assert all(p.overlap for p, _ in search_policy(CONFIG, work, gpu, Budgets(gpu=2**30, cpu=2**33),
                                                   page_cache=2**33).ranked)


def test_the_cli_leaves_overlap_to_the_search_unless_asked():
    from flexgen_lite.cli.main import build_parser
    from flexgen_lite.cli.options import policy_from_args

    def parsed(*flags):
        return policy_from_args(build_parser().parse_args(["generate", "--model", "m", *flags]), 8)

    assert parsed().overlap is None and parsed().base.overlap is True
    assert parsed("--no-overlap").overlap is False and parsed("--no-overlap").base.overlap is False
    manual = ("--percent", "100", "0", "100", "0", "100", "0")
    assert parsed(*manual).overlap is True and parsed(*manual, "--no-overlap").overlap is False
