"""A CPU's decode attention costs something per (row, kv head) besides its bytes: the profile measures it (many
rows over a short cache against the probe's rows) and the cost model adds it for every row and kv head a step
attends."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexgen_lite.engine.policy import Policy
from flexgen_lite.models.hf_config import config_from_dict
from flexgen_lite.planning.cost_model import predict
from flexgen_lite.planning.layout import Workload
from flexgen_lite.profiling import attention_probes as probes
from flexgen_lite.profiling.measure import SMALL

from .conftest import synthetic_profile

CONFIG = config_from_dict(SMALL["llama"], name="small-llama")  # 4 layers, 4 kv heads of 64
CALL, RATE, PAIR = 20e-6, 12e9, 0.4e-6


def test_the_probe_separates_calls_pairs_and_bytes(monkeypatch):
    """Timed calls that cost CALL + PAIR a (row, kv head) + bytes at RATE give back those three (the attention
    itself replaced by that arithmetic; the probe's caches and rotation as in a real run)."""
    spent = []

    def attend(q, k, v, mask, shared=None):
        rows, kv_heads, length, hd = k.shape
        spent.append(CALL + rows * kv_heads * PAIR + 2 * rows * kv_heads * length * hd * k.element_size() / RATE)

    def timed(fn, sync):
        spent.clear()
        fn()
        return sum(spent)

    monkeypatch.setattr(probes, "attend_named", attend)
    monkeypatch.setattr(probes, "timed", timed)
    fixed, rate, pair = probes._decode_attention_rate(torch.device("cpu"), torch.float32, 2, 4, 4, 64, 256, False,
                                                      room=1 << 20)
    probes._kept.clear()
    assert rate == pytest.approx(RATE) and pair == pytest.approx(PAIR) and fixed == pytest.approx(CALL)


def test_a_gpu_or_a_shared_prefix_has_no_pair_cost_measured(monkeypatch):
    """Only a CPU's dense attention is timed over many rows (a GPU's work items cost it nothing comparable; the
    shared-prefix speedup compares rates alone)."""
    rows_seen = []
    monkeypatch.setattr(probes, "attend_named", lambda q, k, v, mask, shared=None: rows_seen.append(k.shape[0]))
    monkeypatch.setattr(probes, "timed", lambda fn, sync: (fn(), 1e-3 * (1 + len(rows_seen)))[1])
    *_, pair = probes._decode_attention_rate(torch.device("cpu"), torch.float32, 2, 4, 4, 64, 128, True,
                                             shared=True, room=1 << 20)
    probes._kept.clear()
    assert pair == 0 and set(rows_seen) == {2}


def step(hw, rows: int, positions: int = 0) -> float:
    work = Workload(16 + positions, 16)
    return predict(CONFIG, work, Policy(gpu_batch_size=rows, dtype="float32"), hw).decode_step_s


@pytest.mark.parametrize("rows", [8, 32])
def test_the_cost_model_adds_the_pair_cost_for_every_row_and_kv_head(rows):
    plain = synthetic_profile()
    paired = dataclasses.replace(plain, attention={k: (*v[:2], PAIR) for k, v in plain.attention.items()})
    added = step(paired, rows) - step(plain, rows)
    assert added == pytest.approx(CONFIG.num_layers * rows * CONFIG.num_kv_heads * PAIR, rel=1e-6)
    assert step(paired, rows, 64) - step(plain, rows, 64) == pytest.approx(added, rel=1e-6)  # not per position


def test_profiles_without_it_cost_nothing_per_pair_and_print_it_only_when_measured():
    plain = synthetic_profile()  # (fixed, rate) pairs, as an older or a GPU's profile holds
    assert plain.decode_attention("float32", 1, 64)[2] == 0.0
    grouped = dataclasses.replace(plain, attention_grouped={"float32": [(64, 1e-5, 9e9, PAIR)]})
    assert grouped.decode_attention("float32", 4, 64) == (1e-5, 9e9, PAIR)
    assert "+ 0.40" in grouped.summary() and "+ 0.40" not in plain.summary()
