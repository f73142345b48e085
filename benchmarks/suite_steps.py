"""Running the GPU suite's steps: each in its own process group with a timeout, never past the run's deadline;
the machine probe and the hardware profile (child modes of gpu_suite.py)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


@dataclass
class Step:
    status: str  # ok | failed | timeout | skipped | stopped
    rc: int | None = None
    wall_s: float = 0.0
    timeout_s: float = 0.0
    stdout: str = ""
    stderr: str = ""


class Deadline:
    """The run's time limit: each step gets min(its own timeout, what is left less a reserve)."""

    def __init__(self, seconds: float, reserve: float = 3.0) -> None:
        self.end, self.reserve = time.monotonic() + seconds, reserve

    def left(self) -> float:
        return self.end - time.monotonic() - self.reserve


_current: subprocess.Popen | None = None  # the step running now, killed if the suite itself is stopped


def run_step(cmd: list[str], timeout: float, deadline: Deadline, env: dict | None = None,
             min_time: float = 5.0) -> Step:
    """Run `cmd` in its own process group; kill the group at its timeout. Never waits past the deadline."""
    global _current
    budget = min(timeout, deadline.left())
    if budget < min(min_time, timeout):
        return Step("skipped", timeout_s=round(max(budget, 0), 1), stderr="time limit of the run reached")
    step = StepProcess(cmd, env)
    _current = step.proc
    try:
        return step.wait(budget, deadline)
    finally:
        _current = None


class StepProcess:
    """A step's process, started now and waited for then: at once (run_step), or later, as the time plan's
    predictions (arithmetic on the CPU), which run beside the parity tests (the GPU mostly). Its own process group,
    killed at its timeout or with the suite."""

    def __init__(self, cmd: list[str], env: dict | None = None) -> None:
        self.tic = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env=env, preexec_fn=_child_setup)

    def wait(self, timeout: float, deadline: Deadline) -> Step:
        """The step's result once it ends, or killed `timeout` seconds after it started (never past the run)."""
        budget = max(0.0, min(self.tic + timeout - time.monotonic(), deadline.left()))
        try:
            out, err = self.proc.communicate(timeout=budget)
            status = "ok" if self.proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            self.kill()
            try:
                out, err = self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:  # stuck in the kernel (a driver call): leave it, keep going
                out, err = "", "did not exit within 10 s of SIGKILL"
            status = "timeout"
        return Step(status, self.proc.returncode, round(time.monotonic() - self.tic, 1), round(timeout, 1),
                    out or "", err or "")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def _child_setup() -> None:
    """In the step's process before exec: its own process group (a timeout kills all it started), and killed
    with the suite if the suite dies (a step must never outlive the run, holding the GPU)."""
    os.setpgid(0, 0)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def kill_current() -> None:
    """Kill the process group of the step running now (the group this suite started for it)."""
    if _current is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(_current.pid, signal.SIGKILL)


def tail(text: str, n: int = 1500) -> str:
    text = text.replace("\r", "\n")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines)[-n:]


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
    return None


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# ---- child modes -------------------------------------------------------------------------------------------------
def probe(device: str) -> dict:
    """Versions and pinned-memory copy bandwidth of the compute device."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu_count": os.cpu_count(), "host": platform.node(), "device": device,
            "host_memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1)}
    if not device.startswith("cuda"):
        return {**info, "gpu": None, "driver": None, "h2d_pinned_gb_s": None, "d2h_pinned_gb_s": None,
                "h2d_pageable_gb_s": None, "gpu_memory_gb": None}
    dev = torch.device(device)
    props = torch.cuda.get_device_properties(dev)
    info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / GB, 1), driver=_driver_version(),
                capability=f"{props.major}.{props.minor}")
    size = 1 << 30
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(size, dtype=torch.uint8)
    on_dev = torch.empty(size, dtype=torch.uint8, device=dev)
    host.fill_(1)
    pageable.fill_(1)

    def rate(fn) -> float:
        fn()
        torch.cuda.synchronize(dev)
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        return round(size / sorted(times)[len(times) // 2] / GB, 1)

    info["h2d_pinned_gb_s"] = rate(lambda: on_dev.copy_(host, non_blocking=True))
    info["d2h_pinned_gb_s"] = rate(lambda: host.copy_(on_dev, non_blocking=True))
    info["h2d_pageable_gb_s"] = rate(lambda: on_dev.copy_(pageable))
    return info


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def measure_profile(device: str, path: str, quick: bool) -> None:
    from flexgen_lite.profiling.measure import measure
    from flexgen_lite.system.devices import ComputeDevice

    Path(path).write_text(measure(ComputeDevice(device), quick=quick).to_json())
