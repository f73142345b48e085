"""The profile is the machine's capability, not a busy moment: the best of two matmul trials is kept,
an implicit measurement is announced, a run far off its prediction says so, and one much faster than
predicted has the matmul rates measured again. A process that measures its first profile runs by it, and the
engine stage times the eager schedule choosing its kernels by the rates measured before it."""

from __future__ import annotations

import dataclasses
import os

import pytest

from flexgen_lite.cli import bench
from flexgen_lite.cli.main import main
from flexgen_lite.profiling.measure import load_profile, remeasure_after_fast_run
from flexgen_lite.profiling.probes import best_matmul
from flexgen_lite.system.devices import ComputeDevice
from flexgen_lite.system.profile_store import cached_profile, prediction_miss, profile_path, save_profile

from .conftest import synthetic_profile

G = 1e9


def test_best_of_two_matmul_trials_per_point():
    first = {"matmul_shape": (1024, 1024), "matmul": {"float32": [(1, 1 * G, 1e-4), (16, 50 * G, 1e-4)]}}
    second = {"matmul": {"float32": [(1, 4 * G, 1e-4), (16, 20 * G, 1e-4)]}}  # busy for the second point
    assert best_matmul(first, second)["matmul"]["float32"] == [(1, 4 * G, 1e-4), (16, 50 * G, 1e-4)]


def test_a_miss_beyond_2x_is_reported_either_way():
    hw = synthetic_profile()
    assert prediction_miss(10.0, 15.0, hw) is None and prediction_miss(10.0, 6.0, hw) is None
    assert "3.1x the predicted 1.00" in prediction_miss(1.0, 3.1, hw)
    assert "profile --refresh" in prediction_miss(10.0, 2.0, hw)


def test_an_implicit_measurement_is_announced(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FLEXGEN_LITE_PROFILE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    busy = dataclasses.replace(synthetic_profile(), int4_matmul={}, int4_dequantize={}, int4_tiles={},
                               notes=["note: other processes used 1.5 cores on average"])
    monkeypatch.setattr("flexgen_lite.profiling.measure.measure", lambda device, offload_dir, progress: busy)
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
    main(["bench", "--model", "facebook/opt-125m", "--prompt-len", "16", "--gen-len", "4", "--cpu-mem", "8GiB"])
    err = capsys.readouterr().err
    assert "dtype: bfloat16 (" in err  # the synthetic profile's bf16 matmuls are faster
    assert "warning: measured 0.00 tok/s is" in err and "profile --refresh" in err


def busy_profile():
    """What a profile taken while another job had the cores looks like: matmul rates a tenth of the machine's (its
    int4 rates there, none: a profile without them would have them measured on load, ~10-20 s)."""
    hw = synthetic_profile()
    return dataclasses.replace(hw, matmul={k: [(m, r / 10, f) for m, r, f in v] for k, v in hw.matmul.items()},
                               int4_matmul=hw.int4_matmul or {}, int4_dequantize=hw.int4_dequantize or {},
                               int4_tiles=hw.int4_tiles or {})


@pytest.fixture
def cached_busy_profile(tmp_path, monkeypatch):
    """The busy profile cached for this machine, and the matmul measurement returning the real rates."""
    monkeypatch.delenv("FLEXGEN_LITE_PROFILE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    save_profile(busy_profile(), profile_path(ComputeDevice("cpu")))
    quiet = synthetic_profile()
    monkeypatch.setattr("flexgen_lite.profiling.measure.matmul_rates", lambda device, scale: {
        "matmul": quiet.matmul, "matmul_shape": quiet.matmul_shape})
    return quiet


def test_a_run_much_faster_than_predicted_remeasures_matmul(cached_busy_profile, monkeypatch, capsys):
    def fake_run(model, prompt_len, gen_len, policy, *args):
        return {"total_tok_s": 1e6, "dtype": policy.dtype}

    monkeypatch.setattr(bench, "run_benchmark", fake_run)
    monkeypatch.setattr(bench, "format_report", lambda report: "report")
    main(["bench", "--model", "facebook/opt-125m", "--prompt-len", "16", "--gen-len", "4", "--cpu-mem", "8GiB"])
    assert "matmul rates measured again and kept where faster" in capsys.readouterr().err
    updated = cached_profile(ComputeDevice("cpu"))
    assert updated.matmul == cached_busy_profile.matmul and "re-measured" in updated.notes[-1]


def test_remeasuring_keeps_what_was_faster(cached_busy_profile, monkeypatch):
    slower = {k: [(m, r / 100, f) for m, r, f in v] for k, v in cached_busy_profile.matmul.items()}
    monkeypatch.setattr("flexgen_lite.profiling.measure.matmul_rates", lambda device, scale: {
        "matmul": slower, "matmul_shape": cached_busy_profile.matmul_shape})
    remeasure_after_fast_run(ComputeDevice("cpu"))
    assert cached_profile(ComputeDevice("cpu")).matmul == busy_profile().matmul


def test_two_kinds_of_work_at_once_are_each_timed_beside_the_other():
    """probes.slowdowns, which the profile's host_contention runs on a GPU machine (CPU attention and page-locked
    copies): each rate while the other runs over its rate alone, within (0, 1]; work that shares nothing (sleeps)
    is not slowed (how much two copies slow each other is the machine's, not asserted); the thread it starts is
    stopped."""
    import threading
    import time

    import torch

    from flexgen_lite.profiling.probes import slowdowns

    before = threading.active_count()
    # sleeps long beside a time slice: a loaded machine's late wake-ups (~ms) do not read as a slowdown
    quiet = slowdowns(lambda: time.sleep(0.05), lambda: time.sleep(0.05), lambda: None)
    assert all(0.6 < f <= 1.0 for f in quiet), quiet
    src, dst = torch.ones(1 << 25, dtype=torch.uint8), torch.empty(1 << 25, dtype=torch.uint8)
    src2, dst2 = torch.ones(1 << 25, dtype=torch.uint8), torch.empty(1 << 25, dtype=torch.uint8)
    busy = slowdowns(lambda: dst.copy_(src), lambda: dst2.copy_(src2), lambda: None)
    assert all(0 < f <= 1.0 for f in busy), busy
    assert threading.active_count() == before


def test_a_process_that_saves_its_first_profile_runs_by_it(tmp_path, monkeypatch):
    """A first run measures the profile in its own process: what the kernels chose before it existed (by the rules
    for none) is forgotten when it is saved, so that the run takes the ways the profile measured faster (the
    README's first `generate --chat` ran at 39-56 tok/s against 270 after)."""
    import torch

    from flexgen_lite.kernels import small_matmul
    from flexgen_lite.system import profile_store

    path = tmp_path / "profile.json"
    monkeypatch.setenv("FLEXGEN_LITE_PROFILE", str(path))
    monkeypatch.setenv("FLEXGEN_LITE_CACHE", str(tmp_path))
    monkeypatch.setattr(small_matmul, "_timed", {})
    monkeypatch.setattr(small_matmul, "_kernel_faster", lambda x, w: False)  # torch won when both were timed
    profile_store.profile_changed()
    try:
        assert profile_store.cpu_profile() is None
        assert not small_matmul.gemv_wins(torch.bfloat16, 4, 1536, 576)  # without a profile: as timed
        fast = [(m, 1000 * G, 0.0) for m in (1, 2, 4, 8, 16)]
        save_profile(dataclasses.replace(synthetic_profile(), gemv={"bfloat16": fast}), path)
        assert tuple(profile_store.cpu_profile().gemv["bfloat16"][2]) == (4, 1000 * G, 0.0)
        assert small_matmul.gemv_wins(torch.bfloat16, 4, 1536, 576)
    finally:
        profile_store.profile_changed()


def test_the_engine_stage_runs_by_the_rates_measured_before_it(tmp_path, monkeypatch):
    """The profile's engine stage (the overhead a layer and batch) times the engine as it runs once the profile is
    saved: its kernels choosing by the rates measured so far, not by the stored profile or the rules for none (a
    first profile's per-batch term was 4-7x too large on this VM); the stored one is read again after."""
    from flexgen_lite.engine.block_schedule import Engine
    from flexgen_lite.profiling import measure
    from flexgen_lite.system import profile_store

    monkeypatch.setenv("FLEXGEN_LITE_PROFILE", str(tmp_path / "none.json"))  # nothing stored
    monkeypatch.setenv("FLEXGEN_LITE_FUSED_DECODE", "1")
    monkeypatch.delenv("FLEXGEN_LITE_CUDA_GRAPHS", raising=False)
    seen, run = [], Engine.run

    def spy(self, *args, **kwargs):
        assert not (self.static_decode or self.layer_graph_decode or self.fused_decode)  # the eager schedule
        assert os.environ["FLEXGEN_LITE_CUDA_GRAPHS"] == os.environ["FLEXGEN_LITE_FUSED_DECODE"] == "0"
        seen.append(profile_store.cpu_profile())
        return run(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "run", spy)
    hw = synthetic_profile()
    found = {k: v for k, v in dataclasses.asdict(hw).items()
             if k not in ("layer_overhead", "offload_dir", "threads", "host_memory", "device", "is_cuda")}
    try:
        out = measure._layer_overhead(ComputeDevice("cpu"), found, quick=True)
        assert set(out["layer_overhead"]) == set(measure.SMALL)
        # 1 and 2 GPU batches of each, then a CPU's small Llama: its weights, then its cache, on disk (overlap on, off)
        assert len(seen) == 2 * len(measure.SMALL) + 5 and all(p is not None and p.gemv == hw.gemv for p in seen)
        assert out["mapped_fetch"] >= 0 and out["mapped_part"] >= 0
        assert profile_store.cpu_profile() is None
        assert os.environ["FLEXGEN_LITE_FUSED_DECODE"] == "1" and "FLEXGEN_LITE_CUDA_GRAPHS" not in os.environ
    finally:
        profile_store.profile_changed()


def test_an_offload_disk_without_room_for_the_probes_is_refused_before_measuring(tmp_path, capsys):
    """helper-35: a first run whose --offload-dir had 40 MiB free measured for 50 s, then crashed in 'No space left
    on device' with nothing saved; the probes' room is checked first, the directory named, what to do said."""
    import shutil

    from flexgen_lite.engine.storage import OffloadError
    from flexgen_lite.profiling.measure import check_room

    free = shutil.disk_usage(tmp_path).free
    check_room(str(tmp_path / "not-yet"), 1 << 20)  # a directory made later: its nearest existing parent's room
    with pytest.raises(OffloadError, match=r"writes .* of probe files into .* which has .* free: free space"):
        check_room(str(tmp_path / "not-yet"), free + (1 << 40))


@pytest.mark.parametrize("text", ["[]", "null", "3", '{"matmul": []}'])
def test_a_profile_file_of_another_shape_is_measured_again(tmp_path, monkeypatch, text):
    """helper-37: a profile file of valid JSON but another shape (`[]`, `null`) made every command fail with an
    AttributeError, even with an explicit policy; damaged files are read as none (measured again)."""
    path = tmp_path / "profile.json"
    path.write_text(text)
    monkeypatch.setenv("FLEXGEN_LITE_PROFILE", str(path))
    assert cached_profile(ComputeDevice("cpu")) is None


def test_a_profile_that_cannot_be_saved_is_used_and_said_so(tmp_path, capsys):
    """helper-37: a full cache disk failed the run with a traceback after the whole measurement, and left a
    partial .tmp file. The run goes on with what it measured, and says the next one measures again."""
    blocked = tmp_path / "file"
    blocked.write_text("")
    path = blocked / "profile.json"  # its folder is a file: cannot be written
    save_profile(synthetic_profile(), path)
    err = capsys.readouterr().err
    assert "could not be saved" in err and str(path) in err and "this run uses it" in err
    assert list(tmp_path.iterdir()) == [blocked]
