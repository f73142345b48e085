"""One prepared GPU run (issues 12, 22): CUDA parity, then FlexGen's headline workloads beside the original
FlexGen on the same machine, within one bounded run.

    python benchmarks/gpu_suite.py [--out DIR] [--time-limit 480] [--rows PATTERN,...] [--skip-parity]
    python benchmarks/gpu_suite.py --cpu-smoke          # the same code on tiny models, on the CPU, < 90 s

Steps, each in its own subprocess with its own timeout, all within --time-limit:
  1. machine: GPU, driver, torch, CUDA; pinned host-to-device and device-to-host bandwidth (1 GiB copies);
  2. profile: the cost model's hardware profile, measured once (FLEXGEN_LITE_PROFILE=FILE: that one);
  3. predictions: every row's prefill and decode step from the cost model (suite_plan.py), in the background
     while step 4 runs;
  4. parity: tests/test_parity.py and tests/test_offload_features.py with `--device cuda`;
  5. gpu_checks: benchmarks/gpu_checks.py's sections (--checks), where that file exists;
  6. rows (suite_rows.py): `flexgen-lite bench` with dummy weights, prompt 512, gen 32, `--breakdown`; then
     its FlexGen twin (flexgen_peer.py: FlexGen's own flex_opt benchmark). Before each, its time is predicted
     and what cannot finish in the time left is skipped with that reason.
Per row (suite_report.py): tok/s beside FlexGen's and the ratio, the bound (link, disk, HBM, compute, CPU
attention) and the fraction of it reached, link bytes and GB/s, peak GPU and host memory against budget, the
attention backend, the breakdown's top stages. Files under --out (default $OUT), at most five: gpu_suite.json,
gpu_suite.md, gpu_suite.log (every step's output), traces.tar.gz (one trace per row), profile.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the suite's modules beside this file

import flexgen_peer  # noqa: E402
import suite_plan  # noqa: E402
import suite_report  # noqa: E402
import suite_rows  # noqa: E402
from suite_rows import GPU_ROWS, SMOKE_DEFAULT, SMOKE_ROWS, Row, select_rows  # noqa: E402
from suite_steps import REPO, Deadline, Step, StepProcess, child_env, kill_current, last_json, run_step, tail  # noqa: E402

PARITY_TESTS = ["tests/test_parity.py", "tests/test_offload_features.py"]
# smoke: two quick tests through the same step (the parity matrix itself runs in the CPU test suite)
SMOKE_PARITY_TESTS = ["tests/test_offload_features.py", "-k", "topk_attention_matches_plain_reference"]
GPU_CHECKS = REPO / "benchmarks" / "gpu_checks.py"
HERE = Path(__file__).resolve()


@dataclass
class Suite:
    args: argparse.Namespace
    out: Path
    deadline: Deadline
    work: Path  # scratch: tiny checkpoints, traces before packing
    data: dict = field(default_factory=dict)
    calibration: suite_plan.Calibration = field(default_factory=suite_plan.Calibration)

    def say(self, text: str) -> None:
        print(text, flush=True)
        with open(self.out / "gpu_suite.log", "a") as f:
            f.write(text + "\n")

    def log_step(self, title: str, step: Step, limit: int = 20000) -> None:
        with open(self.out / "gpu_suite.log", "a") as f:
            f.write(f"\n===== {title}: {step.status} (rc {step.rc}, {step.wall_s} s of {step.timeout_s} s)\n")
            if step.stdout.strip():
                f.write("--- stdout ---\n" + step.stdout[-limit:] + "\n")
            if step.stderr.strip():
                f.write("--- stderr ---\n" + tail(step.stderr, limit) + "\n")

    def save(self) -> None:
        self.data["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        tmp = self.out / "gpu_suite.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.out / "gpu_suite.json")
        (self.out / "gpu_suite.md").write_text(suite_report.markdown(self.data))

    def pack_traces(self, limit: int = 15 << 20) -> None:
        """Every row's trace in one archive, under the device tool's 16 MiB a file (the largest left out)."""
        traces = sorted((self.work / "traces").glob("*.json"), key=lambda t: t.stat().st_size)
        tmp = self.out / "traces.tar.gz.tmp"
        while traces:
            with tarfile.open(tmp, "w:gz") as tar:
                for t in sorted(traces):
                    tar.add(t, arcname=t.name)
            if tmp.stat().st_size <= limit:
                tmp.replace(self.out / "traces.tar.gz")
                return
            left_out = self.data["suite"].setdefault("traces_left_out", [])
            if traces[-1].name not in left_out:
                left_out.append(traces[-1].name)
            traces.pop()


def run_suite(args: argparse.Namespace) -> int:
    smoke = args.cpu_smoke
    device = args.device or ("cpu" if smoke else "cuda")
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="flexgen-gpu-suite-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_suite.log").write_text("")
    time_limit = args.time_limit or (90 if smoke else 480)
    rows = select_rows(SMOKE_ROWS if smoke else GPU_ROWS, args.rows or (",".join(SMOKE_DEFAULT) if smoke else None))
    work = Path(tempfile.mkdtemp(prefix="flexgen-gpu-suite-work-"))  # removed below, however the run ends
    suite = Suite(args, out, Deadline(time_limit), work)
    suite.data = {"suite": {"mode": "cpu-smoke" if smoke else "gpu", "device": device, "time_limit_s": time_limit,
                            "rows": [r.name for r in rows], "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                            "argv": sys.argv[1:], "host_touch_gb_s": args.host_touch_gb_s}, "rows": []}
    try:
        run_steps(suite, rows, device)
    except KeyboardInterrupt:
        suite.say("\nstopped: the results so far follow")
        suite.data["suite"]["stopped"] = True
        suite.save()
        suite.pack_traces()
        print(suite_report.markdown(suite.data))
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    suite.say("")
    print(suite_report.markdown(suite.data))
    suite.say(f"saved {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}")
    failed = [r["name"] for r in suite.data["rows"] if r["status"] != "ok"]
    parity_failed = suite.data.get("parity", {}).get("status", "ok") != "ok"
    return 1 if failed or parity_failed else 0


def run_steps(suite: Suite, rows: list[Row], device: str) -> None:
    machine = probe_machine(suite, device)  # 1
    env_extra, profile = measure_profile(suite, device)  # 2
    models = {}
    if suite.args.cpu_smoke:
        for name in {r.model for r in rows} & set(suite_rows.TINY):
            models[name] = str(suite_rows.write_tiny_checkpoint(name, suite.work / "models"))
    predicting = start_predictions(suite, rows, models, env_extra)  # 3, beside 4
    try:
        run_parity(suite, device)  # 4
        preds = finish_predictions(suite, predicting)
    finally:
        if predicting:
            predicting.kill()
    run_checks(suite)  # 5 (after the predictions: it times the CPU)
    run_rows(suite, rows, machine, profile, env_extra, models, preds)  # 6


def probe_machine(suite: Suite, device: str) -> dict:
    step = run_step([sys.executable, str(HERE), "--probe", device], 60, suite.deadline)
    machine = last_json(step.stdout) or {"device": device, "probe_error": tail(step.stderr)}
    suite.data["machine"] = machine
    for line in suite_report.header_lines(machine):
        suite.say(line)
    if step.status != "ok":
        suite.log_step("machine probe", step)
    suite.say(f"output: {suite.out}")
    suite.save()
    return machine


def measure_profile(suite: Suite, device: str) -> tuple[dict, dict]:
    """The hardware profile the predictions, auto rows and breakdowns use: (the rows' extra environment, it)."""
    args, out, smoke = suite.args, suite.out, suite.args.cpu_smoke
    env_extra, profile = {}, {}
    path = out / "profile.json"
    if os.environ.get("FLEXGEN_LITE_PROFILE"):
        path = Path(os.environ["FLEXGEN_LITE_PROFILE"])
        suite.data["profile"] = {"status": "given", "path": str(path)}
    elif smoke and not args.measure_profile:  # measuring takes ~25 s even in quick mode: use the tests' rates
        from tests.conftest import synthetic_profile

        path.write_text(synthetic_profile().to_json())
        suite.data["profile"] = {"status": "synthetic (tests/conftest.py)", "path": str(path)}
    else:
        suite.say("profile: measuring the machine ...")
        step = run_step([sys.executable, str(HERE), "--profile-to", str(path), "--device", device]
                        + (["--quick"] if smoke else []), 120, suite.deadline, child_env())
        suite.data["profile"] = {"status": step.status, "wall_s": step.wall_s, "path": str(path)}
        if step.status != "ok":
            suite.log_step("profile", step)
            suite.data["profile"]["error"] = tail(step.stderr)
        suite.say(f"profile: {step.status} ({step.wall_s:.0f} s)")
    if path.is_file():
        env_extra["FLEXGEN_LITE_PROFILE"] = str(path)
        profile = json.loads(path.read_text())
        if profile.get("stage_seconds") and suite.data["profile"].get("wall_s"):  # where its time went
            suite.say("profile stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in profile["stage_seconds"].items()))
            if profile.get("stage_compiles"):  # Triton's first compiles of the GPU kernels' probes
                suite.say("profile stages' Triton compiles (count, s): " + ", ".join(
                    f"{k} {n}, {t:.1f}" for k, (n, t) in profile["stage_compiles"].items()))
    suite.save()
    return env_extra, profile


def start_predictions(suite: Suite, rows: list[Row], models: dict, env_extra: dict) -> StepProcess | None:
    """Every row's prediction for the time plan (suite_plan.py), in the background; None without a profile."""
    if not env_extra:
        return None
    specs = [{"name": r.name, "ours": r.bench_args(models.get(r.model)),
              "flexgen": [*r.bench_args(models.get(r.model))[:7], *r.flexgen,
                          *(["--device", r.flag("--device")] if r.flag("--device") else [])]
              if r.flexgen and not suite.args.no_flexgen else None} for r in rows]
    (suite.work / "specs.json").write_text(json.dumps(specs))
    return StepProcess([sys.executable, str(HERE), "--predict-rows", str(suite.work / "specs.json")],
                      child_env(env_extra))


def finish_predictions(suite: Suite, predicting: StepProcess | None) -> dict:
    if predicting is None:
        return {}
    step = predicting.wait(90, suite.deadline)
    preds = last_json(step.stdout) or {}
    if step.status != "ok" or not preds:
        suite.log_step("predictions", step)
    suite.say(f"predictions: {step.status} ({step.wall_s:.0f} s, beside the parity tests)")
    return preds


def run_parity(suite: Suite, device: str) -> None:
    args, smoke = suite.args, suite.args.cpu_smoke
    if args.skip_parity:
        return
    tests = args.parity_tests.split() if args.parity_tests else (SMOKE_PARITY_TESTS if smoke else PARITY_TESTS)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", device, *tests]
    env = child_env()
    if args.parity_workers and importlib.util.find_spec("xdist") is not None:  # pytest-xdist
        cmd[3:3] = ["-n", str(args.parity_workers)]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.parity_workers))
    suite.say(f"parity: {' '.join(cmd[3:])} ...")
    step = run_step(cmd, args.parity_timeout or (60 if smoke else 150), suite.deadline, env)
    if step.rc == 4 and "-n" in cmd:  # pytest's usage error: this xdist does not take -n; run serially
        del cmd[3:5]
        step = run_step(cmd, args.parity_timeout or 150, suite.deadline, child_env())
    suite.log_step("parity", step, limit=200000)
    suite.data["parity"] = {"device": device, "tests": tests, **suite_report.parity_summary(step)}
    suite.say(f"parity: {suite.data['parity']['status']} ({step.wall_s:.0f} s): {suite.data['parity']['summary']}")
    suite.save()


def run_checks(suite: Suite) -> None:
    """gpu_checks.py's sections (--checks), where that file exists."""
    args = suite.args
    if not GPU_CHECKS.is_file() or args.skip_checks:
        return
    step = run_step([sys.executable, str(GPU_CHECKS), *(args.checks.split(",") if args.checks else [])],
                    args.checks_timeout or (30 if args.cpu_smoke else 90), suite.deadline, child_env())
    suite.log_step("gpu_checks", step, limit=50000)
    lines = [ln for ln in step.stdout.strip().splitlines() if ln.strip()]
    suite.data["gpu_checks"] = {"status": step.status, "rc": step.rc, "wall_s": step.wall_s,
                                "summary": lines[-1][:300] if lines else tail(step.stderr, 300),
                                "stdout_tail": tail(step.stdout, 4000), "stderr_tail": tail(step.stderr, 2000)}
    suite.say(f"gpu_checks: {step.status} ({step.wall_s:.0f} s): {suite.data['gpu_checks']['summary']}")
    suite.save()


def touch_rate(args, profile: dict) -> float:
    """GB/s of first writes to host memory for the time plan: --host-touch-gb-s, else the profile's (host_touch),
    else 1.5."""
    return args.host_touch_gb_s or (profile.get("host_touch") or 1.5e9) / 1e9


def run_rows(suite: Suite, rows: list[Row], machine: dict, profile: dict, env_extra: dict, models: dict,
             preds: dict) -> None:
    """Each row, then its FlexGen twin (or later, after Row.flexgen_after), each within what is left."""
    args = suite.args
    off = ["--no-flexgen"] if args.no_flexgen else []  # a reason that holds for every twin, once found
    later: list[tuple[Row, dict, dict]] = []  # twins that run after another row (Row.flexgen_after)
    for i, row in enumerate(rows):
        plan = suite_plan.plan_row(row, preds.get(row.name), machine, touch_rate(args, profile))
        result = run_row(suite, row, plan, preds.get(row.name), machine, profile, env_extra, models)
        suite.data["rows"].append(result)
        say_row(suite, result)
        if row.flexgen and result["status"] == "skipped":
            result["flexgen"] = {"status": "skipped", "reason": "our row was skipped"}
        elif row.flexgen:
            if row.flexgen_after in {r.name for r in rows[i + 1:]}:
                result["flexgen"] = {"status": "pending", "reason": f"runs after {row.flexgen_after}"}
                later.append((row, plan, result))
            else:
                run_twin(suite, row, plan, result, off)
        finish_row(suite, result)
        for twin in [t for t in later if t[0].flexgen_after == row.name]:
            run_twin(suite, *twin, off)
            finish_row(suite, twin[2])


def run_row(suite: Suite, row: Row, plan: dict, pred: dict | None, machine: dict, profile: dict,
            env_extra: dict, models: dict) -> dict:
    args = suite.args
    cmd = [sys.executable, str(HERE), "--bench-row", *row.bench_args(models.get(row.model))]
    if args.exact_dummy:
        cmd.insert(3, "--exact-dummy")
    if not args.no_breakdown and (row.breakdown or args.breakdown_all or args.cpu_smoke):  # stages, a trace
        cmd += ["--breakdown", "--trace", str(suite.work / "traces" / f"trace-{row.name}.json")]
        (suite.work / "traces").mkdir(exist_ok=True)
    if env_extra and not row.auto and "error" not in ((pred or {}).get("ours") or {"error": ""}):
        cmd.append("--predict")  # the cost model's figures beside the measured ones (where it could predict)
    predicted = suite.calibration.scaled("ours", plan["ours_s"])
    why = suite_plan.fits(predicted, suite.deadline.left())
    if row.auto and not env_extra:
        why = "no hardware profile for --policy auto (the profile step failed)"
    if why:
        result = suite_report.row_result(row, Step("skipped", stderr=why), machine, cmd)
        result.update(reason=why, plan=plan, predicted_s=predicted)
        return result
    suite.say(f"{row.name}: predicted {predicted:.0f} s ({plan['source']}{_scaled(suite, 'ours')}) ...")
    timeout = (min(args.row_timeout, suite.deadline.left()) if args.row_timeout else
               suite_plan.step_timeout(row.timeout, predicted, suite.deadline.left()))
    try:
        step = run_step(cmd, timeout, suite.deadline, child_env(env_extra), min_time=0)
    except KeyboardInterrupt:  # the suite was stopped during this row: record it, then stop
        suite.data["rows"].append(suite_report.row_result(row, Step("stopped", stderr="the suite was stopped"),
                                                          machine, cmd))
        raise
    suite.log_step(f"row {row.name}", step, limit=6000)
    result = suite_report.row_result(row, step, machine, cmd, profile, pred)
    result.update(plan=plan, predicted_s=predicted)
    if step.status == "ok":
        suite.calibration.observe("ours", plan["ours_s"], step.wall_s)
    ours = (pred or {}).get("ours") or {}
    if "error" not in ours and ours:  # the cost model's figures the plan used (the prediction's miss: see report)
        result["predicted"] = {k: ours[k] for k in ("policy", "prefill_s", "decode_step_s", "total_tok_s", "bound")}
    return result


def run_twin(suite: Suite, row: Row, plan: dict, result: dict, off: list[str]) -> None:
    """FlexGen's flex_opt on the row's workload (flexgen_peer.py) into result["flexgen"], with the ratios; its
    failures are recorded, never fatal. `off`: a reason found earlier that holds for every twin."""
    predicted = suite.calibration.scaled("flexgen", plan["flexgen_s"])
    why = off[0] if off else suite_plan.fits(predicted, suite.deadline.left())
    command = "flex_opt " + " ".join(row.flexgen_args())
    if why:
        result["flexgen"] = {"status": "skipped", "reason": why, "predicted_s": predicted, "command": command}
        suite.say(f"{row.name}: FlexGen skipped: {why}")
        return
    suite.say(f"{row.name}: FlexGen, predicted {predicted:.0f} s{_scaled(suite, 'flexgen')} ...")
    cmd = [sys.executable, str(REPO / "benchmarks" / "flexgen_peer.py"), *row.flexgen_args()]
    timeout = suite_plan.step_timeout(row.timeout, predicted, suite.deadline.left())
    step = run_step(cmd, timeout, suite.deadline, child_env(), min_time=0)
    if step.rc == flexgen_peer.SKIP_RC:  # flexgen_peer.py's "cannot run here" (its reason on stderr): not a failure
        step.status = "skipped"
    suite.log_step(f"FlexGen {row.name}", step, limit=6000)
    fg = suite_report.flexgen_result(step, flexgen_peer.parse_log(step.stdout))
    result["flexgen"] = {**fg, "predicted_s": predicted, "command": command}
    if fg["status"] == "ok":
        suite.calibration.observe("flexgen", plan["flexgen_s"], step.wall_s)
    result.update(suite_report.ratios(result, fg))
    if fg.get("reason", "").startswith(("no CUDA", "flexgen is not importable")):
        off.append(fg["reason"])


def _scaled(suite: Suite, kind: str) -> str:
    factor = suite.calibration.factor(kind)
    return "" if factor == 1.0 else f", x{factor:.2f} as the rows so far ran"


def finish_row(suite: Suite, result: dict) -> None:
    suite.save()
    suite.pack_traces()
    fg = result.get("flexgen")
    if fg and "total_tok_s" in fg:
        suite.say(f"{result['name']}: FlexGen total {fg['total_tok_s']} tok/s, decode {fg.get('decode_tok_s')}, "
                  f"prefill {fg.get('prefill_s')} s: ours/FlexGen {result.get('ratio_total')}x total, "
                  f"{result.get('ratio_decode')}x decode")
    elif fg and fg["status"] in ("failed", "timeout") or fg and fg.get("rc") == flexgen_peer.SKIP_RC:
        suite.say(f"{result['name']}: FlexGen {fg['status']}: {fg.get('reason') or tail(fg.get('error') or '', 300)}")


def say_row(suite: Suite, r: dict) -> None:
    if r["status"] == "ok":
        text = (f"{r['name']}: ok in {r['wall_s']:.0f} s: total {r['total_tok_s']} tok/s, decode "
                f"{r['decode_tok_s']} tok/s, prefill {r['prefill_s']} s ({r['policy']}); bound {r.get('bound')} "
                f"{r.get('bound_fraction')}")
    else:
        text = f"{r['name']}: {r['status']} after {r['wall_s']:.0f} s: {r.get('reason') or r.get('error', '')[-300:]}"
    suite.say(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        from suite_steps import probe

        print(json.dumps(probe(argv[1])))
        return 0
    if argv[:1] == ["--predict-rows"]:
        return suite_plan.main_predict(argv[1])
    if argv[:1] == ["--bench-row"]:
        exact = argv[1:2] == ["--exact-dummy"]
        if not exact:
            suite_rows.fast_dummy_weights()
        from flexgen_lite.cli.main import main as cli_main

        try:
            cli_main(argv[2 if exact else 1:])
        finally:
            suite_rows.report_fast_stats()
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for the suite's files (default $OUT, else a temp dir)")
    p.add_argument("--time-limit", type=float, help="seconds for the whole run (default 480, leaving a 10-minute "
                   "run room to start and copy back; 90 with --cpu-smoke)")
    p.add_argument("--rows", help="comma-separated row names or patterns (opt-13b*), in the order to run")
    p.add_argument("--row-timeout", type=float, help="timeout of every row (default: the row's own, or twice "
                   "its prediction if longer)")
    p.add_argument("--host-touch-gb-s", type=float, help="first-touch rate of host memory in the time plan (GB/s; "
                   "a VM's can be 0.4-2; default: the profile's, else 1.5)")
    p.add_argument("--no-flexgen", action="store_true", help="skip the original FlexGen's twins")
    p.add_argument("--no-breakdown", action="store_true", help="rows without --breakdown and --trace")
    p.add_argument("--breakdown-all", action="store_true", help="--breakdown also on the rows that leave it off "
                   "(OPT-1.3B all on the GPU: its CUDA events would be a share of a few-ms step)")
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--skip-checks", action="store_true", help="skip benchmarks/gpu_checks.py")
    p.add_argument("--checks", help="gpu_checks.py's sections, comma-separated (exact,speed,engine,cpu,kernels,"
                   "attention,quantize,codes,matmul; default all)")
    p.add_argument("--checks-timeout", type=float, help="seconds for gpu_checks.py (default 90; 30 smoke)")
    p.add_argument("--parity-tests", help="pytest arguments for the parity step (default: "
                   f"{' '.join(PARITY_TESTS)})")
    p.add_argument("--parity-timeout", type=float, help="seconds (default 150; 60 with --cpu-smoke)")
    p.add_argument("--parity-workers", type=int, default=0, help="pytest-xdist workers for the parity step, where "
                   "installed (default 0: one process)")
    p.add_argument("--device", help="compute device (default cuda; cpu with --cpu-smoke)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU: the same steps, table and JSON")
    p.add_argument("--exact-dummy", action="store_true", help="the bench's own dummy weights (slow for 13B+)")
    p.add_argument("--measure-profile", action="store_true",
                   help="--cpu-smoke: measure a quick profile (~25 s) instead of the tests' one")
    p.add_argument("--list-rows", action="store_true", help="print the rows and exit")
    p.add_argument("--profile-to", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.profile_to:
        from suite_steps import measure_profile

        measure_profile(args.device or "cuda", args.profile_to, args.quick)
        return 0
    if args.list_rows:
        for r in SMOKE_ROWS if args.cpu_smoke else GPU_ROWS:
            twin = f"; FlexGen: {' '.join(r.flexgen)}" if r.flexgen else ""
            print(f"{r.name:32} {r.model:20} {' '.join(r.flags)} (expect {r.expect_s:.0f} s){twin}")
        return 0

    def stop(signum, frame):
        kill_current()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    return run_suite(args)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
