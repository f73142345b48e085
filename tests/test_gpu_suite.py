"""benchmarks/gpu_suite.py in its CPU smoke mode (steps, row selection, the time plan, the JSON and the table),
FlexGen's log as the suite reads it, the ratios, and the dummy-weight hook's byte counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
SCRIPT = BENCH / "gpu_suite.py"
sys.path.insert(0, str(BENCH))

import flexgen_peer  # noqa: E402
import suite_plan  # noqa: E402
import suite_report  # noqa: E402
import suite_rows  # noqa: E402
from suite_steps import Step  # noqa: E402

# FlexGen's own output (write_benchmark_log), as the first H200 run printed it for OPT-13B
FLEXGEN_LOG = """<run_flexgen>: args.model: facebook/opt-13b
model size: 23.921 GB, cache size: 53.125 GB, hidden size (prefill): 0.664 GB
warmup - generate
benchmark - generate
TorchDevice: cuda:0
  cur_mem: 23.9371 GB,  peak_mem: 56.5640 GB
model size: 23.921 GB\tcache size: 53.125 GB\thidden size (p): 0.664 GB
peak gpu mem: 56.564 GB\tprojected: False
prefill latency: 2.898 s\tprefill throughput: 22613.415 token/s
decode latency: 17.804 s\tdecode throughput: 222.875 token/s
total latency: 20.702 s\ttotal throughput: 197.857 token/s
"""


def run_suite(tmp_path: Path, *args: str, timeout: float = 150, checks: bool = False
              ) -> tuple[subprocess.CompletedProcess, dict]:
    # the rows plan with the tests' synthetic profile (conftest's FLEXGEN_LITE_PROFILE)
    more = [] if checks else ["--skip-checks"]  # gpu_checks.py takes ~15 s on a CPU: once is enough
    out = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path), *more, *args],
                         capture_output=True, text=True, timeout=timeout, cwd=REPO)
    data = json.loads((tmp_path / "gpu_suite.json").read_text()) if (tmp_path / "gpu_suite.json").exists() else {}
    return out, data


def test_smoke_rows_report_where_they_stand(tmp_path):
    """One smoke run of every step (CUDA parity's tests, gpu_checks' sections asked for, rows run whole, FlexGen's
    twins): the JSON, the table, the log and the traces, within the files a GPU run brings back."""
    rows = "opt-1.3b-gpu-bs64,opt-30b-16gib-auto,opt-175b-4bit-24gib"
    out, data = run_suite(tmp_path, "--rows", rows, "--checks", "kernels,attention", checks=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert data["suite"]["mode"] == "cpu-smoke" and data["suite"]["rows"] == rows.split(",")
    assert data["machine"]["gpu"] is None and data["machine"]["torch"]
    assert data["parity"]["status"] == "ok" and data["parity"]["passed"] == 2, data["parity"]
    assert data["profile"]["status"] == "given"  # conftest's synthetic profile (FLEXGEN_LITE_PROFILE)
    log = (tmp_path / "gpu_suite.log").read_text()
    assert "===== parity: ok" in log
    if (BENCH / "gpu_checks.py").is_file():  # another step of its own, its output in the log and the JSON
        assert data["gpu_checks"]["status"] in ("ok", "timeout") and data["gpu_checks"]["summary"], data["gpu_checks"]
        checks = log.split("===== gpu_checks")[1].split("=====")[0]
        assert "## 5. decode step's kernels" in checks and "## 4. " not in checks  # the sections asked for
        assert "## 6. decode attention" in checks and "| tiny |" in checks
    files = {p.name for p in tmp_path.iterdir()}
    assert files <= {"gpu_suite.json", "gpu_suite.md", "gpu_suite.log", "traces.tar.gz", "profile.json"}
    first, auto, scale = data["rows"]
    assert auto["status"] == "ok" and auto["gpu_budget_gb"] == 0.001  # --gpu-mem 1MiB, searched within it
    # OPT-30B's FlexGen twin (a long one on a GPU) runs after the OPT-175B row
    assert auto["flexgen"]["status"] != "pending"
    assert log.index("===== row opt-175b-4bit-24gib") < log.index("opt-30b-16gib-auto: FlexGen")
    assert first["status"] == "ok" and first["batch"] == 8 and first["total_tok_s"] > 0
    assert first["report"]["prompt_len"] == 32 and first["report"]["gen_len"] == 4
    assert first["policy"].startswith("--percent 100 0 100 0 100 0 --gpu-batch-size 8")
    assert first["link_gb_per_step"] == 0.0 and first["link_gb_s"] is None  # all in compute memory
    assert first["command"].startswith("flexgen-lite bench --model ")
    assert first["bound"] in first["bounds_s"] and first["bound_fraction"] >= 0
    assert first["report"]["breakdown"]["stage_ms"] and first["peak_host_gb"] > 0
    assert 0 < len(first["top_stages_ms"]) <= 4
    assert first["predicted_s"] == first["plan"]["ours_s"] > 0
    # later rows' predictions scaled by how the rows before them ran against theirs
    factor = min(1.5, max(0.5, first["wall_s"] / first["plan"]["ours_s"]))
    assert auto["predicted_s"] == pytest.approx(auto["plan"]["ours_s"] * factor, rel=0.05, abs=0.15)
    fg = first["flexgen"]
    if fg["status"] == "skipped":  # no CUDA here (or no flexgen wheel): flexgen_peer.py's exit code and reason
        assert fg["rc"] == flexgen_peer.SKIP_RC and fg["reason"].startswith(("no CUDA", "flexgen is not importable"))
        assert f"===== FlexGen {first['name']}: skipped (rc {flexgen_peer.SKIP_RC}" in log  # not "failed"
    assert "ratio_total" not in first
    assert scale["status"] == "ok" and "--compress-weight" in scale["policy"] and "flexgen" not in scale
    assert "4-bit matrices" in log and " 0 4-bit matrices" not in log.split("row opt-175b-4bit-24gib")[1]

    table = (tmp_path / "gpu_suite.md").read_text()
    assert table.startswith("no GPU: device cpu")
    assert "| row | status | policy |" in table and "| opt-1.3b-gpu-bs64 | ok | `--percent 100 0 100 0 100 0" in table
    assert "FlexGen total (prefill s, decode)" in table and "opt-1.3b-gpu-bs64 breakdown:" in table
    import tarfile

    with tarfile.open(tmp_path / "traces.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["trace-opt-1.3b-gpu-bs64.json", "trace-opt-175b-4bit-24gib.json",
                                          "trace-opt-30b-16gib-auto.json"]


def test_a_row_past_its_time_is_recorded_and_the_suite_goes_on(tmp_path):
    rows = "opt-13b-cpu-weights,opt-30b-16gib-auto"
    out, data = run_suite(tmp_path, "--rows", rows, "--row-timeout", "0.01", "--skip-parity")
    assert out.returncode == 1, out.stderr  # rows timed out
    assert [r["name"] for r in data["rows"]] == rows.split(",")
    for r in data["rows"]:
        assert r["status"] == "timeout" and "report" not in r and r["plan"]["source"] == "cost model"
        assert r["flexgen"]["status"] in ("skipped", "failed", "ok")  # FlexGen's twin: recorded, never fatal


def test_time_limit_skips_what_does_not_fit(tmp_path):
    out, data = run_suite(tmp_path, "--rows", "opt-13b*", "--time-limit", "1", timeout=60)
    assert out.returncode == 1
    assert [r["name"] for r in data["rows"]] == ["opt-13b-cpu-weights", "opt-13b-cpu-weights-compress",
                                                 "opt-13b-4bit-gpu", "opt-13b-auto", "opt-13b-cpu-weights-cpu-attn"]
    assert all(r["status"] == "skipped" for r in data["rows"])
    assert data["parity"]["status"] == "skipped"


def test_unknown_row_is_refused(tmp_path):
    out, _ = run_suite(tmp_path, "--rows", "opt-1.3b*,no-such-row", timeout=60)
    assert out.returncode != 0 and "matches no row" in out.stderr


def test_row_selection_keeps_the_order_given():
    chosen = suite_rows.select_rows(suite_rows.GPU_ROWS, "llama-2*,opt-1.3b-*,opt-1.3b-auto")
    assert [r.name for r in chosen] == ["llama-2-7b-cpu-cache-cpu-attn", "llama-2-7b-cpu-attn-and-link",
                                        "opt-1.3b-gpu-bs64", "opt-1.3b-auto"]  # a pattern's rows in run order
    assert [r.name for r in suite_rows.GPU_ROWS] == [r.name for r in suite_rows.SMOKE_ROWS]


def test_gpu_rows_are_flexgens_settings():
    rows = {r.name: r for r in suite_rows.GPU_ROWS}
    assert all(r.prompt_len == 512 for r in rows.values())
    # every peer row at FlexGen's gen 32; OPT-175B (no peer) at gen 8, so that it fits the run with the peers
    assert {r.name for r in rows.values() if r.gen_len != 32} == {"opt-175b-4bit-24gib"}
    peers = [r.name for r in suite_rows.GPU_ROWS if r.flexgen]
    assert peers == ["opt-1.3b-gpu-bs64", "opt-13b-cpu-weights", "opt-13b-cpu-weights-compress",
                     "opt-30b-16gib-auto", "opt-13b-4bit-gpu"]  # the last after the scale rows: a new one
    # right after the peers: its Llama-2-7B mark row, then FlexGen's scale
    assert [r.name for r in suite_rows.GPU_ROWS[4:6]] == ["llama-2-7b-cpu-cache-cpu-attn", "opt-175b-4bit-24gib"]
    assert " ".join(rows["opt-13b-cpu-weights"].flexgen) == \
        "--percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 4"
    assert rows["opt-13b-cpu-weights-compress"].flexgen[-1] == "--compress-weight"
    assert rows["opt-30b-16gib-auto"].auto and rows["opt-30b-16gib-auto"].gpu_budget == 16 * 2**30
    assert "--cpu-cache-compute" in rows["opt-30b-16gib-auto"].flexgen
    for name in ("opt-175b-4bit-24gib", "llama-3-70b-4bit-24gib"):
        assert rows[name].flag("--gpu-mem") == "24GiB" and "--compress-weight" in rows[name].flags
    assert rows["opt-1.3b-gpu-bs64"].flexgen_args()[:2] == ["--model", "facebook/opt-1.3b"]


def test_scale_rows_fit_their_budgets():
    """OPT-175B and Llama-3-70B: 4-bit weights in host RAM, the plan within 24 GiB and a 128 GiB host; OPT-13B's
    4-bit weights and cache all on an 80 GB card."""
    from flexgen_lite.cli.main import build_parser
    from flexgen_lite.cli.options import policy_from_args
    from flexgen_lite.model_source import model_config
    from flexgen_lite.planning.layout import Workload
    from flexgen_lite.planning.memory_plan import peak_memory

    for row in suite_rows.GPU_ROWS:
        if "4bit" not in row.name:
            continue
        args = build_parser().parse_args(row.bench_args())
        _, peak = peak_memory(model_config(row.model), Workload(512, 32, None), policy_from_args(args, 64), True)
        assert peak["gpu"] < (row.gpu_budget or 70e9) - 0.5 * 2**30, (row.name, peak)
        assert peak["cpu"] < 120e9, (row.name, peak)


# ---- FlexGen's log and the ratios -----------------------------------------------------------------------------
def test_flexgen_log_is_parsed():
    parsed = flexgen_peer.parse_log(FLEXGEN_LOG)
    assert parsed == {"model_gb": 23.921, "cache_gb": 53.125, "peak_gpu_gb": 56.564, "prefill_s": 2.898,
                      "prefill_tok_s": 22613.415, "decode_s": 17.804, "decode_tok_s": 222.875, "total_s": 20.702,
                      "total_tok_s": 197.857, "projected": False}
    assert flexgen_peer.parse_log("warmup - generate\nTraceback ...\nRuntimeError: CUDA out of memory") is None


def test_flexgen_results_and_ratios():
    ok = suite_report.flexgen_result(Step("ok", 0, 40.0, 100.0, FLEXGEN_LOG, ""),
                                     flexgen_peer.parse_log(FLEXGEN_LOG))
    assert ok["status"] == "ok" and ok["total_tok_s"] == 197.857
    ours = {"total_tok_s": 220.1, "decode_tok_s": 255.69}
    assert suite_report.ratios(ours, ok) == {"ratio_total": 1.112, "ratio_decode": 1.147}

    skipped = suite_report.flexgen_result(Step("failed", 77, 3.0, 100.0, "", "SKIP: no CUDA: FlexGen ...\n"), None)
    assert skipped["status"] == "skipped" and skipped["reason"] == "no CUDA: FlexGen ..."
    assert suite_report.ratios(ours, skipped) == {}
    crashed = suite_report.flexgen_result(Step("failed", 1, 9.0, 100.0, "warmup - generate\n",
                                               "Traceback\nRuntimeError: CUDA out of memory"), None)
    assert crashed["status"] == "failed" and crashed["error"].endswith("CUDA out of memory")
    ran_badly = suite_report.flexgen_result(Step("ok", 0, 9.0, 100.0, "no log lines", ""), None)
    assert ran_badly["status"] == "failed"

    row = {"name": "r", "status": "ok", "wall_s": 40, "report": {}, **ours, "flexgen": ok,
           **suite_report.ratios(ours, ok), "predicted_s": 50.0}
    line = suite_report.table([row]).splitlines()[-1]
    assert "| 197.9 (2.898, 222.875) | **1.112x** / 1.147x |" in line and line.endswith("| 50.0 / 40 |")


def test_standin_tokenizer_pads_left_as_flex_opt_asks():
    tok = flexgen_peer.StandInAutoTokenizer.from_pretrained("facebook/opt-30b", padding_side="left")
    ids = tok([flexgen_peer.PROMPT], padding="max_length", max_length=16).input_ids[0]
    assert len(ids) == 16 and ids[:9] == [1] * 9 and ids[9] == 2 and min(ids[10:]) >= 100
    assert tok.pad_token_id == 1 and tok.padding_side == "left"


def test_a_gpu_check_section_that_raises_leaves_the_others_to_run(monkeypatch, capsys):
    """One call on a GPU runs every section: a kernel that fails to build there is a failure of its section, said,
    and the sections after it still run."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # importing gpu_checks on a CPU sets it: put back after
    import gpu_checks

    ran = []

    def broken() -> None:
        raise RuntimeError("no such kernel here\nmore")

    monkeypatch.setattr(gpu_checks, "failures", [])
    monkeypatch.setattr(gpu_checks, "SECTIONS", {"first": broken, "second": lambda: ran.append("second")})
    assert gpu_checks.main([]) == 1
    assert ran == ["second"] and gpu_checks.failures == ["section first raised RuntimeError: no such kernel here"]
    assert "gpu_checks: FAILED: section first raised" in capsys.readouterr().out


def test_flexgens_dummy_weights_are_its_ones_written_once_in_place(tmp_path, monkeypatch):
    """FlexGen's own init_weight_list (installed by scripts/setup.sh) over homes in CPU memory and on disk: with the
    hook, the same weights (all ones, each home's shape and dtype) and no full-size np.ones array; without it, one
    per weight."""
    import numpy as np

    flex_opt = flexgen_peer.import_flexgen()
    from flexgen.compression import CompressionConfig
    from flexgen.pytorch_backend import TorchDevice, TorchDisk, TorchTensor
    from flexgen.utils import ExecutionEnv

    monkeypatch.setattr(flex_opt, "init_weight_list", flex_opt.init_weight_list)  # the hook's changes undone after
    monkeypatch.setattr(TorchTensor, "load_from_np", TorchTensor.load_from_np)
    made, ones = [], np.ones
    monkeypatch.setattr(np, "ones", lambda shape, *args, **kwargs: made.append(np.prod(shape)) or ones(shape, *args,
                                                                                                       **kwargs))
    cpu, disk = TorchDevice("cpu"), TorchDisk(str(tmp_path), num_copy_threads=0)  # its threads want CUDA
    env = ExecutionEnv(gpu=cpu, cpu=cpu, disk=disk)
    config = CompressionConfig(num_bits=4, group_size=64, group_dim=0, symmetric=False)
    policy = flex_opt.Policy(1, 1, 0, 50, 100, 0, 100, 0, overlap=False, sep_layer=True, pin_weight=False,
                             cpu_cache_compute=False, attn_sparsity=1.0, compress_weight=False,
                             comp_weight_config=config, compress_cache=False, comp_cache_config=config)
    specs = [((256, 128), np.float16, "_DUMMY_/fc1"), ((128,), np.float16, "_DUMMY_/b"), ((512, 128), np.float32,
                                                                                         "_DUMMY_/fc2")]

    def weights() -> list[np.ndarray]:
        out = flex_opt.init_weight_list(specs, policy, env)
        return [np.load(w.data) if w.device is disk else w.data.numpy() for w in out]

    try:
        before = weights()
        assert max(made) == 512 * 128  # FlexGen's own: np.ones of each weight's shape
        made.clear()
        flexgen_peer.fill_dummy_weights_in_place(flex_opt)
        after = weights()
    finally:
        disk.close_copy_threads()
    assert max(made) == 1 and flex_opt.np is np
    assert [(w.shape, w.dtype) for w in after] == [(w.shape, w.dtype) for w in before] == [
        (shape, np.dtype(dtype)) for shape, dtype, _ in specs]
    assert all((w == 1).all() for w in after)


# ---- the time plan -----------------------------------------------------------------------------------------------
H200 = {"gpu": "NVIDIA H200", "h2d_pinned_gb_s": 55.0, "h2d_pageable_gb_s": 7.0, "gpu_memory_gb": 150.1}


def _pred(prefill=3.0, step=0.5, cpu=25e9, gpu=60e9) -> dict:
    return {"prefill_s": prefill, "decode_step_s": step, "gen_len": 32, "prompt_len": 512, "bound": "link",
            "decode_by": {"link": step}, "peak": {"gpu": gpu, "cpu": cpu, "disk": 0.0}, "total_tok_s": 1.0}


def test_plan_adds_startup_loading_warmup_and_the_run():
    row = suite_rows.Row("r", "facebook/opt-13b", [], 150, flexgen=["--percent"], expect_s=45, flexgen_expect_s=50)
    plan = suite_plan.plan_row(row, {"ours": _pred(), "flexgen": _pred()}, H200, touch_gb_s=1.0)
    parts = plan["parts"]
    assert parts["startup"] == suite_plan.STARTUP_S["cuda"]
    assert parts["load"] == pytest.approx(25 + 60 / 7, abs=0.1)  # host bytes at 1 GB/s, GPU bytes at pageable H2D
    assert parts["run"] == pytest.approx(suite_plan.SLACK * (3.0 + 31 * 0.5), abs=0.1)
    assert plan["ours_s"] == pytest.approx(sum(parts.values()), abs=0.2) and plan["source"] == "cost model"
    slower = suite_plan.plan_row(row, {"ours": _pred(), "flexgen": _pred()}, H200, touch_gb_s=0.4)
    assert slower["ours_s"] > plan["ours_s"] + 30  # a VM's slow first touch is budgeted
    assert plan["flexgen_s"] > suite_plan.FLEXGEN_SLOWER * (3.0 + 31 * 0.5)


def test_plan_without_a_prediction_uses_the_rows_expectation():
    row = suite_rows.Row("r", "m", [], 150, flexgen=["--percent"], expect_s=45, flexgen_expect_s=50)
    plan = suite_plan.plan_row(row, {"ours": {"error": "ValueError: no profile"}, "flexgen": None}, H200, 1.0)
    assert (plan["ours_s"], plan["flexgen_s"]) == (45.0, 50.0) and "ValueError" in plan["source"]
    assert suite_plan.plan_row(suite_rows.Row("r", "m", [], 150, expect_s=9), None, H200, 1.0)["flexgen_s"] is None


def test_what_does_not_fit_is_skipped_and_what_runs_gets_room():
    assert suite_plan.fits(100, 120) is None
    assert suite_plan.fits(130, 120) == "predicted 130 s, 120 s left in the run"
    assert suite_plan.step_timeout(150, 40, 400) == 150  # the row's own timeout
    assert suite_plan.step_timeout(150, 100, 400) == 200  # twice the prediction
    assert suite_plan.step_timeout(150, 100, 120) == 120  # never past the run


def test_the_plan_learns_from_the_rows_that_ran():
    c = suite_plan.Calibration()
    assert c.scaled("ours", 100) == 100  # nothing seen yet
    for predicted, wall in ((50, 30), (10, 7), (20, 30)):  # 0.6, 0.7, 1.5
        c.observe("ours", predicted, wall)
    assert c.factor("ours") == pytest.approx(0.7) and c.scaled("ours", 100) == 70 and c.factor("flexgen") == 1
    c.observe("flexgen", 10, 100)  # one odd row moves the plan only so far
    c.observe("flexgen", 10, None)  # a row without a wall time says nothing
    assert c.ratios["flexgen"] == [10] and c.factor("flexgen") == c.HIGH


# ---- numbers against the link, the bound and the budget -------------------------------------------------------
def test_numbers_against_the_link_the_bound_and_the_budget():
    row = suite_rows.Row("r", "m", ["--gpu-mem", "16GiB"], 10)
    report = {"policy": "--percent 0 100 100 0 100 0", "batch": 128, "gen_len": 32, "prompt_len": 512,
              "decode_s": 31.0, "prefill_s": 3.0, "prefill_tok_s": 1.0, "decode_tok_s": 2.0, "total_tok_s": 3.0,
              "peak_gpu_gb": 10.0, "peak_cuda_reserved_gb": 12.0, "link_moved_per_step_gb": 25.0,
              "disk_read_per_step_gb": 0.0, "model_gb": 25.0, "cache_gb": 50.0, "dtype": "float16",
              "peak_rss_gb": 27.0, "attention_backend": "flash"}
    step = Step("ok", 0, 40.0, 100.0, json.dumps(report), "")
    profile = {"device_copy": 2e12, "matmul": {"float16": [[8192, 7e14, 0.0]]}, "is_cuda": True}
    r = suite_report.row_result(row, step, {"h2d_pinned_gb_s": 50.0, "gpu_memory_gb": 143.0,
                                            "host_memory_gb": 135.0}, ["python", "x", "--bench-row", "bench"],
                                profile)
    assert r["link_gb_s"] == 25.0 and r["link_gb_s_of_h2d"] == 0.5
    assert r["link_bound_s"] == 0.5 and r["link_bound_fraction"] == 0.5
    assert r["peak_gpu_gb"] == 12.0 and r["gpu_budget_gb"] == pytest.approx(17.18, abs=0.01)
    assert r["bound"] == "link" and r["bound_fraction"] == 0.5 and set(r["bounds_s"]) == {"link", "HBM", "compute"}
    assert r["attention_backend"] == "flash" and r["warmup_s"] is None  # read with .get: absent keys are fine
    line = suite_report.table([r]).splitlines()[-1]
    assert "| link 50% | 25.0 (25.0, 50%) | 12.0 / 17.18 | 27.0 / 135.0 | flash |" in line


def test_parity_summary_counts():
    step = Step("failed", 1, 9.0, 150.0, "....F\n3 passed, 1 failed, 2 xfailed in 9.10s\n", "")
    s = suite_report.parity_summary(step)
    assert (s["status"], s["passed"], s["failed"], s["xfailed"]) == ("failed", 3, 1, 2)


def test_dummy_hook_keeps_byte_counts_and_shapes(tmp_path):
    """4-bit dummy weights from the byte tile: the same link bytes, host bytes and tok/s-relevant shapes as
    the bench's own quantized weights (--exact-dummy)."""
    cmd = [sys.executable, str(SCRIPT), "--bench-row", "bench", "--model", "facebook/opt-125m", "--prompt-len", "8",
           "--gen-len", "2", "--percent", "0", "100", "100", "0", "100", "0", "--compress-weight",
           "--gpu-batch-size", "2", "--device", "cpu+link", "--no-warmup"]
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    fast = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    exact = subprocess.run(cmd[:3] + ["--exact-dummy"] + cmd[3:], capture_output=True, text=True, timeout=120,
                           env=env, cwd=REPO)
    assert fast.returncode == 0 and exact.returncode == 0, fast.stderr[-2000:] + exact.stderr[-2000:]
    a, b = (json.loads(p.stdout.strip().splitlines()[-1]) for p in (fast, exact))
    for key in ("weights_moved_per_step_gb", "link_moved_per_step_gb", "peak_cpu_gb", "peak_gpu_gb", "model_gb"):
        assert a[key] == b[key], key
    assert "4-bit matrices" in fast.stderr and " 0 4-bit matrices" not in fast.stderr


@pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="the offline case: no GPU here")
def test_offline_predictions_for_a_gpu_machine_budget_its_host_ram(tmp_path, monkeypatch):
    """A prediction made here from a GPU machine's profile searches within that machine's host RAM (the profile's),
    not this one's: OPT-30B's auto row may then hold more in host RAM than this VM has."""
    from flexgen_lite.system.memory import GiB

    from .conftest import synthetic_profile

    profile = synthetic_profile(cuda=True)
    big = tmp_path / "big.json"
    big.write_text(profile.to_json().replace(f'"host_memory": {profile.host_memory}', f'"host_memory": {200 * GiB}'))
    monkeypatch.setenv("FLEXGEN_LITE_PROFILE", str(big))
    argv = ["bench", "--model", "facebook/opt-30b", "--prompt-len", "512", "--gen-len", "32", "--policy", "auto",
            "--gpu-mem", "16GiB", "--num-prompts", "256"]
    found = suite_plan.predict_rows([{"name": "auto", "ours": argv}])["auto"]["ours"]
    assert "error" not in found, found
    assert found["peak"]["cpu"] > 24 * GiB  # more than this VM's RAM: planned for the profile's 200 GiB


def test_the_table_notes_the_cuda_graphs_a_row_captured():
    """A row whose bench captured CUDA graphs (or failed to) gets a note saying how many and why; a row that
    captured none, none."""
    rows = [{"name": "graphed", "status": "ok", "report": {"graph_captures": {"steps": 0, "layers": 320},
                                                           "graph_failures": []}},
            {"name": "failed", "status": "ok", "report": {"graph_captures": {"steps": 0, "layers": 0},
                                                          "graph_failures": ["operation not permitted"]}},
            {"name": "eager", "status": "ok", "report": {"graph_captures": {"steps": 0, "layers": 0},
                                                         "graph_failures": []}}]
    for r in rows:
        r["wall_s"] = 10.0
    text = suite_report.markdown({"rows": rows, "suite": {}, "machine": {}})
    assert "- graphed CUDA graphs captured: {'steps': 0, 'layers': 320}" in text
    assert "- failed CUDA graphs captured: {'steps': 0, 'layers': 0}, failed: ['operation not permitted']" in text
    assert "- eager CUDA graphs" not in text
