"""The profile is the machine's capability, not a busy moment: the best of two matmul trials is kept,
an implicit measurement is announced, and a run far off its prediction says so."""

from __future__ import annotations

import dataclasses

from flexgen_lite import bench
from flexgen_lite.cli import main
from flexgen_lite.profile import _best_matmul
from flexgen_lite.profile_store import load_profile, prediction_miss

from .conftest import synthetic_profile

G = 1e9


def test_best_of_two_matmul_trials_per_point():
    first = {"matmul_shape": (1024, 1024), "matmul": {"float32": [(1, 1 * G, 1e-4), (16, 50 * G, 1e-4)]}}
    second = {"matmul": {"float32": [(1, 4 * G, 1e-4), (16, 20 * G, 1e-4)]}}  # busy for the second point
    assert _best_matmul(first, second)["matmul"]["float32"] == [(1, 4 * G, 1e-4), (16, 50 * G, 1e-4)]


def test_a_miss_beyond_2x_is_reported_either_way():
    hw = synthetic_profile()
    assert prediction_miss(10.0, 15.0, hw) is None and prediction_miss(10.0, 6.0, hw) is None
    assert "3.1x the predicted 1.00" in prediction_miss(1.0, 3.1, hw)
    assert "profile --refresh" in prediction_miss(10.0, 2.0, hw)


def test_an_implicit_measurement_is_announced(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FLEXGEN_LITE_PROFILE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    busy = dataclasses.replace(synthetic_profile(), notes=["note: other processes used 1.5 cores on average"])
    monkeypatch.setattr("flexgen_lite.profile.measure", lambda device, offload_dir, progress: busy)
    assert load_profile() == busy
    err = capsys.readouterr().err
    assert "no profile of this machine yet: measuring it now" in err and "other processes used 1.5 cores" in err
    assert load_profile() == busy  # cached: quiet
    assert capsys.readouterr().err == ""


def test_bench_reports_a_prediction_off_by_more_than_2x(monkeypatch, capsys):
    def fake_run(model, prompt_len, gen_len, policy, *args):
        return {"total_tok_s": 1e-3, "dtype": policy.dtype}

    monkeypatch.setattr(bench, "run_benchmark", fake_run)
    monkeypatch.setattr(bench, "format_report", lambda report: "report")
    main(["bench", "--model", "facebook/opt-125m", "--prompt-len", "16", "--gen-len", "4", "--cpu-mem", "2GiB"])
    err = capsys.readouterr().err
    assert "dtype: bfloat16 (" in err  # the synthetic profile's bf16 matmuls are faster
    assert "warning: measured 0.00 tok/s is" in err and "profile --refresh" in err
