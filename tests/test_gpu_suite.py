"""benchmarks/gpu_suite.py in its CPU smoke mode: steps, row selection, timeouts, the JSON and the table."""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_suite.py"


@functools.cache
def _suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_suite(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, dict]:
    # the auto rows plan with the tests' synthetic profile (FLEXGEN_LITE_PROFILE, set by conftest)
    out = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=timeout, cwd=REPO)
    data = json.loads((tmp_path / "gpu_suite.json").read_text()) if (tmp_path / "gpu_suite.json").exists() else {}
    return out, data


def test_smoke_run_records_rows_a_timeout_and_continues(tmp_path):
    rows = "opt-1.3b-gpu-bs64,opt-13b-cpu-weights,opt-30b-16gib-auto"
    out, data = run_suite(tmp_path, "--rows", rows, "--row-timeout", "opt-13b-cpu-weights=0.5")
    assert out.returncode == 1, out.stderr  # a row timed out
    assert data["suite"]["mode"] == "cpu-smoke" and data["suite"]["rows"] == rows.split(",")
    assert data["machine"]["gpu"] is None and data["machine"]["torch"]
    assert data["parity"]["status"] == "ok" and data["parity"]["passed"] == 2, data["parity"]
    assert data["profile"]["status"] == "given"

    first, slow, auto = data["rows"]
    assert [r["name"] for r in data["rows"]] == rows.split(",")
    assert first["status"] == "ok" and first["batch"] == 8 and first["total_tok_s"] > 0
    assert first["report"]["prompt_len"] == 32 and first["report"]["gen_len"] == 4
    assert first["policy"].startswith("--percent 100 0 100 0 100 0 --gpu-batch-size 8")
    assert first["link_gb_per_step"] == 0.0 and first["link_gb_s"] is None  # all in compute memory: nothing crosses
    assert first["command"].startswith("flexgen-lite bench --model ")
    assert slow["status"] == "timeout" and slow["timeout_s"] == 0.5 and "report" not in slow
    assert auto["status"] == "ok" and auto["gpu_budget_gb"] == 0.001  # --gpu-mem 1MiB, searched within it

    table = (tmp_path / "gpu_suite.md").read_text()
    assert table.startswith("no GPU: device cpu")
    assert "| row | status | policy |" in table and "| opt-13b-cpu-weights | **timeout** |" in table
    assert "| opt-1.3b-gpu-bs64 | ok | `--percent 100 0 100 0 100 0" in table
    assert out.stdout.rstrip().endswith("gpu_suite.md")
    assert (tmp_path / "parity.log").read_text().count("passed") >= 1


def test_time_limit_skips_what_does_not_fit(tmp_path):
    out, data = run_suite(tmp_path, "--rows", "opt-13b*", "--time-limit", "1", timeout=60)
    assert out.returncode == 1
    assert [r["name"] for r in data["rows"]] == ["opt-13b-cpu-weights", "opt-13b-cpu-weights-compress",
                                                 "opt-13b-auto", "opt-13b-cpu-weights-cpu-attn"]
    assert all(r["status"] == "skipped" for r in data["rows"])
    assert data["parity"]["status"] == "skipped"


def test_unknown_row_is_refused(tmp_path):
    out, _ = run_suite(tmp_path, "--rows", "opt-1.3b*,no-such-row", timeout=60)
    assert out.returncode != 0 and "matches no row" in out.stderr


def test_row_selection_keeps_the_order_given():
    suite = _suite_module()
    chosen = suite.select_rows(suite.GPU_ROWS, "llama*,opt-1.3b-*,opt-1.3b-auto")
    assert [r.name for r in chosen] == ["llama-2-7b-cpu-cache-cpu-attn", "opt-1.3b-gpu-bs64", "opt-1.3b-auto"]
    assert {r.name for r in suite.GPU_ROWS} == {r.name for r in suite.SMOKE_ROWS}


def test_gpu_rows_are_flexgens_settings():
    suite = _suite_module()
    rows = {r.name: r for r in suite.GPU_ROWS}
    assert all((r.prompt_len, r.gen_len) == (512, 32) for r in rows.values())
    assert " ".join(rows["opt-13b-cpu-weights"].flags) == \
        "--percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 4"
    assert rows["opt-30b-16gib-auto"].auto and rows["opt-30b-16gib-auto"].gpu_budget == 16 * 2**30
    assert sum(r.timeout for r in rows.values()) > 470  # the time limit, not the rows, bounds a run


def test_numbers_against_the_link_and_the_budget():
    """Derived columns: link GB/s, its share of the measured H2D bandwidth, the link bound of a step."""
    suite = _suite_module()
    row = suite.Row("r", "m", ["--gpu-mem", "16GiB"], 10)
    report = {"policy": "--percent 0 100 100 0 100 0", "batch": 128, "gen_len": 32, "decode_s": 31.0,
              "prefill_tok_s": 1.0, "decode_tok_s": 2.0, "total_tok_s": 3.0, "peak_gpu_gb": 10.0,
              "peak_cuda_reserved_gb": 12.0, "link_moved_per_step_gb": 25.0, "disk_read_per_step_gb": 0.0}
    step = suite.Step("ok", 0, 40.0, 100.0, json.dumps(report), "")
    r = suite.row_result(row, step, {"h2d_pinned_gb_s": 50.0, "gpu_memory_gb": 143.0},
                         ["python", "gpu_suite.py", "--bench-row", "bench", "--model", "m"])
    assert r["link_gb_s"] == 25.0 and r["link_gb_s_of_h2d"] == 0.5
    assert r["link_bound_s"] == 0.5 and r["link_bound_fraction"] == 0.5
    assert r["peak_gpu_gb"] == 12.0 and r["gpu_budget_gb"] == pytest.approx(17.18, abs=0.01)
    line = suite.table([r]).splitlines()[-1]
    assert "| 25.0 (50%) | 0.5 | 12.0 / 17.18 |" in line


def test_parity_summary_counts():
    suite = _suite_module()
    step = suite.Step("failed", 1, 9.0, 150.0, "....F\n3 passed, 1 failed, 2 xfailed in 9.10s\n", "")
    s = suite.parity_summary(step)
    assert (s["status"], s["passed"], s["failed"], s["xfailed"]) == ("failed", 3, 1, 2)
