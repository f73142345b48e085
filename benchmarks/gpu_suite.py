"""One prepared GPU check (issue 12): CUDA parity tests, then FlexGen's headline workloads, in one bounded run.

    python benchmarks/gpu_suite.py [--out DIR] [--time-limit 470] [--rows PATTERN,...] [--skip-parity]
    python benchmarks/gpu_suite.py --cpu-smoke          # the same code on tiny models, on the CPU, < 60 s

Steps, each in its own subprocess with its own timeout, all within --time-limit (what does not fit is recorded
as skipped, and the run ends with what it has; nothing waits on a stuck stream):
  1. machine: GPU, driver, torch, CUDA; pinned host-to-device and device-to-host bandwidth (1 GiB copies);
  2. parity: tests/test_parity.py and tests/test_offload_features.py with `--device cuda` (the placement matrix,
     fp32 token-identical to transformers on the same device, fp16 within FP16_RTOL);
  3. profile: the cost model's hardware profile, measured once for the `--policy auto` rows;
  4. rows: `flexgen-lite bench` with dummy weights, prompt 512, gen 32 (FlexGen's setting).
Per row: tok/s (prefill, decode, total), bytes per decode step over the link and read from disk, achieved link
GB/s against the measured pinned H2D bandwidth, the link bound of a decode step (link bytes / H2D bandwidth) as
a fraction of the measured step, and peak GPU memory against the row's budget. The table is printed last and
saved with everything else under --out (default $OUT): gpu_suite.json, gpu_suite.md, parity.log, profile.json.

Dummy weights: `flexgen-lite bench` draws normal(0, 0.02) values tensor by tensor, ~1 min per 10 B parameters on
one core; rows here copy them from one random 64 MiB tile instead (--exact-dummy for the bench's own), which
changes no byte count or shape and so no throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fnmatch
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GB = 1e9
PARITY_TESTS = ["tests/test_parity.py", "tests/test_offload_features.py"]
# smoke: two quick tests through the same step (the parity matrix itself runs in the CPU test suite)
SMOKE_PARITY_TESTS = ["tests/test_offload_features.py", "-k", "topk_attention_matches_plain_reference"]


@dataclass
class Row:
    """One benchmark: `flexgen-lite bench --model MODEL FLAGS` with a timeout (seconds)."""

    name: str
    model: str
    flags: list[str]
    timeout: float
    note: str = ""
    prompt_len: int = 512
    gen_len: int = 32

    @property
    def auto(self) -> bool:
        return "--policy" in self.flags and self.flags[self.flags.index("--policy") + 1] == "auto"

    @property
    def gpu_budget(self) -> float | None:
        """The row's --gpu-mem in bytes, if it sets one."""
        if "--gpu-mem" not in self.flags:
            return None
        from flexgen_lite.memory import parse_size

        return parse_size(self.flags[self.flags.index("--gpu-mem") + 1])


def _f(text: str) -> list[str]:
    return text.split()


# In run order: under the time limit the most informative rows come first (the published OPT-13B policy and its
# variants before the searched ones, which also need the profile); --rows picks and orders any subset.
GPU_ROWS = [
    Row("opt-1.3b-gpu-bs64", "facebook/opt-1.3b", _f("--percent 100 0 100 0 100 0 --gpu-batch-size 64"), 90,
        "all on the GPU (FlexGen: 1961 tok/s total on an H100)"),
    Row("opt-13b-cpu-weights", "facebook/opt-13b",
        _f("--percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 4"), 150,
        "FlexGen's published policy (FlexGen: 187 tok/s on an H100)"),
    Row("opt-13b-cpu-weights-compress", "facebook/opt-13b",
        _f("--percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 4 --compress-weight"), 150,
        "4-bit weights: 3.5x fewer link bytes (FlexGen: 146 tok/s)"),
    Row("llama-2-7b-cpu-cache-cpu-attn", "llama-2-7b",
        _f("--percent 100 0 0 100 100 0 --cpu-cache-compute --gpu-batch-size 64 --num-gpu-batches 2 "
           "--gpu-mem 24GiB"), 150,
        "cache 36.5 GB on the CPU, attended there: does not fit beside the weights in 24 GiB"),
    Row("opt-1.3b-auto", "facebook/opt-1.3b", _f("--policy auto --num-prompts 1024"), 120,
        "the batch the search finds"),
    Row("opt-13b-auto", "facebook/opt-13b", _f("--policy auto --num-prompts 256"), 180, "searched"),
    Row("opt-30b-16gib-auto", "facebook/opt-30b", _f("--policy auto --gpu-mem 16GiB --num-prompts 256"), 240,
        "a 16 GiB card simulated"),
    Row("opt-6.7b-disk-weights-cold", "facebook/opt-6.7b",
        _f("--percent 0 0 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 2 --cold-disk"), 180,
        "weights on a cold disk: layer extents read with O_DIRECT into pinned staging (disk bound)"),
    Row("opt-13b-cpu-weights-cpu-attn", "facebook/opt-13b",
        _f("--percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 4 --cpu-cache-compute"), 150,
        "cache on the GPU: the flag has nothing to do; should match opt-13b-cpu-weights"),
    Row("opt-6.7b-cpu-weights-cpu-cache", "facebook/opt-6.7b",
        _f("--percent 0 100 0 100 100 0 --gpu-batch-size 32 --num-gpu-batches 4"), 150,
        "cache on the CPU, attended on the GPU: position-major prefixes copied from page-locked memory "
        "on their own stream (issue 12, findings 3 and 4)"),
    Row("opt-6.7b-act-cpu", "facebook/opt-6.7b",
        _f("--percent 100 0 100 0 0 100 --gpu-batch-size 32 --num-gpu-batches 4"), 120,
        "hidden states on the CPU between layers: asynchronous copies through page-locked buffers (finding 7)"),
]

# The same rows on tiny checkpoints (written by the suite), on the CPU: same names, flags scaled down.
SMOKE_ROWS = [
    Row("opt-1.3b-gpu-bs64", "tiny-opt", _f("--percent 100 0 100 0 100 0 --gpu-batch-size 8"), 30),
    Row("opt-13b-cpu-weights", "tiny-opt", _f("--percent 0 100 100 0 100 0 --gpu-batch-size 4 --num-gpu-batches 2"),
        30),
    Row("opt-13b-cpu-weights-compress", "tiny-opt",
        _f("--percent 0 100 100 0 100 0 --gpu-batch-size 4 --num-gpu-batches 2 --compress-weight"), 30),
    Row("llama-2-7b-cpu-cache-cpu-attn", "tiny-llama",
        _f("--percent 100 0 0 100 100 0 --cpu-cache-compute --gpu-batch-size 4 --num-gpu-batches 2"), 30),
    Row("opt-6.7b-cpu-weights-cpu-cache", "tiny-opt",
        _f("--percent 0 100 0 100 100 0 --gpu-batch-size 4 --num-gpu-batches 2"), 30),
    Row("opt-6.7b-act-cpu", "tiny-opt", _f("--percent 100 0 100 0 0 100 --gpu-batch-size 4 --num-gpu-batches 2"), 30),
    Row("opt-1.3b-auto", "tiny-opt", _f("--policy auto --num-prompts 16"), 30),
    Row("opt-13b-auto", "tiny-opt", _f("--policy auto --num-prompts 8"), 30),
    Row("opt-30b-16gib-auto", "tiny-opt", _f("--policy auto --gpu-mem 1MiB --num-prompts 8"), 30),
    Row("opt-6.7b-disk-weights-cold", "tiny-opt",
        _f("--percent 0 0 100 0 100 0 --gpu-batch-size 4 --num-gpu-batches 2 --cold-disk"), 30),
    Row("opt-13b-cpu-weights-cpu-attn", "tiny-opt",
        _f("--percent 0 100 100 0 100 0 --gpu-batch-size 4 --num-gpu-batches 2 --cpu-cache-compute"), 30),
]
for _row in SMOKE_ROWS:
    _row.prompt_len, _row.gen_len, _row.flags = 32, 4, [*_row.flags, "--device", "cpu+link"]  # the GPU's copies

TINY = {  # HF configs of the smoke checkpoints
    "tiny-opt": {"model_type": "opt", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "ffn_dim": 512, "vocab_size": 2048, "max_position_embeddings": 256, "word_embed_proj_dim": 128,
                 "do_layer_norm_before": True, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1},
    "tiny-llama": {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 2048,
                   "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                   "bos_token_id": 1, "eos_token_id": 2},
}


# ---- running a step ----------------------------------------------------------------------------------------------
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
    tic = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=env, preexec_fn=_child_setup)
    _current = proc
    try:
        out, err = proc.communicate(timeout=budget)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        _kill(proc)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # stuck in the kernel (a driver call): leave it, keep going
            out, err = "", "did not exit within 10 s of SIGKILL"
        status = "timeout"
    finally:
        _current = None
    return Step(status, proc.returncode, round(time.monotonic() - tic, 1), round(budget, 1), out or "", err or "")


def _child_setup() -> None:
    """In the step's process before exec: its own process group (a timeout kills all it started), and killed
    with the suite if the suite dies (a step must never outlive the run, holding the GPU)."""
    os.setpgid(0, 0)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group this suite started for the step


def _tail(text: str, n: int = 1500) -> str:
    text = text.replace("\r", "\n")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines)[-n:]


# ---- child modes: machine probe, profile, one bench row -------------------------------------------------------
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
    from flexgen_lite.devices import ComputeDevice
    from flexgen_lite.profile import measure

    Path(path).write_text(measure(ComputeDevice(device), quick=quick).to_json())


def fast_dummy_weights() -> None:
    """Dummy matrices copied from one random tile (see the module docstring); 1-D tensors as the bench makes them."""
    import torch

    from flexgen_lite import weights

    tile = torch.empty(1 << 24).normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    exact = weights.DummySource.read

    def read(self, spec, start: int, stop: int):
        if len(spec.shape) < 2:
            return exact(self, spec, start, stop)
        shape = (stop - start, *spec.shape[1:])
        n, offset = math.prod(shape), zlib.crc32(f"{spec.hf_name}:{start}".encode()) % tile.numel()
        if offset + n <= tile.numel():
            return tile[offset:offset + n].view(shape)
        out, done = torch.empty(n), 0
        while done < n:
            k = min(n - done, tile.numel() - offset)
            out[done:done + k] = tile[offset:offset + k]
            done, offset = done + k, 0
        return out.view(shape)

    weights.DummySource.read = read


def write_tiny_checkpoint(name: str, folder: Path) -> Path:
    """A random checkpoint of TINY[name] (config.json + model.safetensors), made without transformers."""
    import torch
    from safetensors.torch import save_file

    from flexgen_lite.config import config_from_dict
    from flexgen_lite.models import layer_specs

    path = folder / name
    if (path / "model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY[name]))
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    tensors = {}
    for layer in layer_specs(config_from_dict(TINY[name], name=name)):
        for spec in layer.weights:
            if "norm" in spec.name and spec.name.endswith("weight"):
                tensors[spec.hf_name] = torch.ones(spec.shape)
            else:
                tensors[spec.hf_name] = torch.randn(spec.shape, generator=gen) * 0.05
    save_file(tensors, str(path / "model.safetensors"))
    return path


# ---- the rows' numbers -----------------------------------------------------------------------------------------
def row_result(row: Row, step: Step, machine: dict, cmd: list[str]) -> dict:
    result = {"name": row.name, "model": row.model, "note": row.note,
              "command": " ".join(["flexgen-lite", *cmd[cmd.index("bench"):]]),
              **{k: v for k, v in asdict(step).items() if k not in ("stdout", "stderr")}}
    report = _last_json(step.stdout)
    if step.status != "ok" or report is None:
        if step.status == "ok":
            result["status"] = "failed"
        result["error"] = _tail(step.stderr) or _tail(step.stdout)
        return result
    result["report"] = report
    steps = report["gen_len"] - 1
    step_s = report["decode_s"] / steps if steps else None
    link, disk = report.get("link_moved_per_step_gb", 0.0), report.get("disk_read_per_step_gb", 0.0)
    h2d = machine.get("h2d_pinned_gb_s")
    budget = row.gpu_budget
    if budget is None and machine.get("gpu_memory_gb"):
        budget = machine["gpu_memory_gb"] * GB
    result.update(
        policy=report["policy"], batch=report["batch"], prefill_tok_s=report["prefill_tok_s"],
        decode_tok_s=report["decode_tok_s"], total_tok_s=report["total_tok_s"], decode_step_s=step_s,
        link_gb_per_step=link, disk_gb_per_step=disk,
        link_gb_s=round(link / step_s, 2) if step_s and link else None,
        peak_gpu_gb=round(report["peak_cuda_reserved_gb"] + report.get("cuda_runtime_gb", 0), 3)
        if "peak_cuda_reserved_gb" in report else report["peak_gpu_gb"],  # the process's whole use of the card
        peak_gpu_ledger_gb=report["peak_gpu_gb"],
        gpu_budget_gb=round(budget / GB, 3) if budget else None)
    if h2d and link and step_s:
        result["link_gb_s_of_h2d"] = round(result["link_gb_s"] / h2d, 3)
        result["link_bound_s"] = round(link / h2d, 4)
        result["link_bound_fraction"] = round(link / h2d / step_s, 3)
    return result


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
    return None


COLUMNS = ["row", "status", "policy", "batch", "prefill tok/s", "decode tok/s", "total tok/s", "link GB/step",
           "disk GB/step", "link GB/s (of H2D)", "link bound / step", "peak GPU GB / budget", "wall s"]


def table(rows: list[dict]) -> str:
    def cell(r: dict, col: str) -> str:
        get = r.get
        if col == "row":
            return r["name"]
        if col == "status":
            return r["status"] if r["status"] == "ok" else f"**{r['status']}**"
        if "report" not in r:
            return "-" if col != "wall s" else f"{r['wall_s']:.0f}"
        values = {
            "policy": f"`{get('policy')}`", "batch": get("batch"), "prefill tok/s": get("prefill_tok_s"),
            "decode tok/s": get("decode_tok_s"), "total tok/s": get("total_tok_s"),
            "link GB/step": get("link_gb_per_step"), "disk GB/step": get("disk_gb_per_step"),
            "link GB/s (of H2D)": (f"{get('link_gb_s')} ({100 * get('link_gb_s_of_h2d'):.0f}%)"
                                   if get("link_gb_s_of_h2d") is not None else get("link_gb_s")),
            "link bound / step": get("link_bound_fraction"),
            "peak GPU GB / budget": f"{get('peak_gpu_gb')} / {get('gpu_budget_gb') or '-'}",
            "wall s": f"{r['wall_s']:.0f}",
        }
        value = values[col]
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def header_lines(machine: dict) -> list[str]:
    if machine.get("gpu"):
        return [f"GPU {machine['gpu']} ({machine['gpu_memory_gb']} GB, sm {machine.get('capability')}), "
                f"driver {machine['driver']}, torch {machine['torch']}, CUDA {machine['cuda']}, "
                f"python {machine['python']}, {machine['cpu_count']} CPUs, {machine['host_memory_gb']} GB RAM",
                f"pinned copies: H2D {machine['h2d_pinned_gb_s']} GB/s, D2H {machine['d2h_pinned_gb_s']} GB/s "
                f"(pageable H2D {machine['h2d_pageable_gb_s']} GB/s)"]
    return [f"no GPU: device {machine.get('device')}, torch {machine.get('torch')}, python {machine.get('python')}, "
            f"{machine.get('cpu_count')} CPUs, {machine.get('host_memory_gb')} GB RAM",
            "pinned copies: H2D n/a, D2H n/a (no CUDA)"]


def parity_summary(step: Step) -> dict:
    """pytest's last line ('3 passed, 1 failed, 2 xfailed in 9.1s') as counts."""
    import re

    lines = [ln for ln in step.stdout.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|xfailed|xpassed|skipped)", last)}
    return {"status": step.status if step.status != "ok" or not counts.get("failed") else "failed", "rc": step.rc,
            "wall_s": step.wall_s, "timeout_s": step.timeout_s, "summary": last, **counts}


# ---- the suite ---------------------------------------------------------------------------------------------------
@dataclass
class Suite:
    args: argparse.Namespace
    out: Path
    deadline: Deadline
    data: dict = field(default_factory=dict)

    def save(self) -> None:
        self.data["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        tmp = self.out / "gpu_suite.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.out / "gpu_suite.json")
        (self.out / "gpu_suite.md").write_text(self.markdown())

    def markdown(self) -> str:
        parts = header_lines(self.data.get("machine", {}))
        parity = self.data.get("parity")
        if parity:
            parts.append(f"parity ({parity.get('device')}): {parity['status']}: {parity.get('summary', '')}")
        rows = self.data.get("rows", [])
        parts += ["", table(rows)]
        notes = [f"- {r['name']}: {r['note']}" for r in rows if r.get("note")]
        notes += [f"- {r['name']} breakdown: {breakdown_line(r['report']['breakdown'])}" for r in rows
                  if r.get("report", {}).get("breakdown")]
        notes += [f"- {r['name']} ({r['status']}): {r['error'].splitlines()[-1][:200]}"
                  for r in rows if r.get("error") and r["status"] in ("failed", "timeout")]
        return "\n".join(parts + ([""] + notes if notes else [])) + "\n"


def breakdown_line(b: dict) -> str:
    """A row's --breakdown in one line: the largest stages, waiting on I/O, hidden I/O, the bottleneck."""
    top = sorted(b.get("stage_ms", {}).items(), key=lambda kv: -kv[1])[:4]
    util = b.get("bottleneck_utilization")
    return (f"{b.get('step_ms')} ms/step: " + ", ".join(f"{k} {v:.1f} ms" for k, v in top)
            + f"; waited on I/O {100 * b.get('io_wait_fraction', 0):.0f}%, I/O hidden "
            f"{100 * b.get('io_hidden_fraction', 0):.0f}%; bottleneck {b.get('bottleneck')}"
            + (f" at {100 * util:.0f}% of its bound" if util else ""))


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def say(text: str) -> None:
    print(text, flush=True)


def select_rows(rows: list[Row], patterns: str | None) -> list[Row]:
    if not patterns:
        return list(rows)
    chosen: list[Row] = []
    for pattern in patterns.split(","):
        matched = [r for r in rows if fnmatch.fnmatch(r.name, pattern.strip()) and r not in chosen]
        if not matched and not any(fnmatch.fnmatch(r.name, pattern.strip()) for r in rows):
            raise SystemExit(f"--rows: {pattern!r} matches no row; rows: {', '.join(r.name for r in rows)}")
        chosen += matched
    return chosen


def row_timeouts(specs: list[str]) -> tuple[float | None, dict[str, float]]:
    """--row-timeout S (every row) or NAME=S (one row)."""
    every, per = None, {}
    for spec in specs:
        name, _, seconds = spec.rpartition("=")
        if name:
            per[name] = float(seconds)
        else:
            every = float(seconds)
    return every, per


def run_suite(args: argparse.Namespace) -> int:
    smoke = args.cpu_smoke
    device = args.device or ("cpu" if smoke else "cuda")
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="flexgen-gpu-suite-"))
    out.mkdir(parents=True, exist_ok=True)
    time_limit = args.time_limit or (90 if smoke else 470)
    suite = Suite(args, out, Deadline(time_limit))
    rows = select_rows(SMOKE_ROWS if smoke else GPU_ROWS, args.rows)
    every, per_row = row_timeouts(args.row_timeout)
    suite.data = {"suite": {"mode": "cpu-smoke" if smoke else "gpu", "device": device, "time_limit_s": time_limit,
                            "rows": [r.name for r in rows], "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                            "argv": sys.argv[1:]}, "rows": []}
    try:
        run_steps(suite, rows, device, every, per_row)
    except KeyboardInterrupt:
        say("\nstopped: the results so far follow")
        suite.data["suite"]["stopped"] = True
        suite.save()
        say(suite.markdown())
        return 130
    say("")
    say(suite.markdown())
    say(f"saved {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}")
    failed = [r["name"] for r in suite.data["rows"] if r["status"] != "ok"]
    parity_failed = suite.data.get("parity", {}).get("status", "ok") != "ok"
    return 1 if failed or parity_failed else 0


def run_steps(suite: Suite, rows: list[Row], device: str, every: float | None, per_row: dict[str, float]) -> None:
    args, out, smoke = suite.args, suite.out, suite.args.cpu_smoke
    me = [sys.executable, str(Path(__file__).resolve())]

    # 1. the machine
    step = run_step([*me, "--probe", device], 60, suite.deadline)
    machine = _last_json(step.stdout) or {"device": device, "probe_error": _tail(step.stderr)}
    suite.data["machine"] = machine
    for line in header_lines(machine):
        say(line)
    if step.status != "ok":
        say(f"machine probe {step.status}: {_tail(step.stderr, 500)}")
    say(f"output: {out}")
    suite.save()

    # 2. parity
    if not args.skip_parity:
        tests = args.parity_tests.split() if args.parity_tests else (SMOKE_PARITY_TESTS if smoke else PARITY_TESTS)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", device, *tests]
        env = child_env()
        if args.parity_workers and importlib.util.find_spec("xdist") is not None:  # pytest-xdist
            cmd[3:3] = ["-n", str(args.parity_workers)]
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.parity_workers))
        say(f"parity: {' '.join(cmd[3:])} ...")
        step = run_step(cmd, args.parity_timeout or (60 if smoke else 150), suite.deadline, env)
        if step.rc == 4 and "-n" in cmd:  # pytest's usage error: this xdist does not take -n; run serially
            del cmd[3:5]
            step = run_step(cmd, args.parity_timeout or 150, suite.deadline, child_env())
        (out / "parity.log").write_text(step.stdout + "\n--- stderr ---\n" + step.stderr)
        suite.data["parity"] = {"device": device, "tests": tests, **parity_summary(step)}
        say(f"parity: {suite.data['parity']['status']} ({step.wall_s:.0f} s): {suite.data['parity']['summary']}")
        suite.save()

    # 3. the profile the auto rows plan with
    extra_env = {}
    if any(r.auto for r in rows):
        if os.environ.get("FLEXGEN_LITE_PROFILE"):
            suite.data["profile"] = {"status": "given", "path": os.environ["FLEXGEN_LITE_PROFILE"]}
        elif smoke and not args.measure_profile:  # measuring takes ~25 s even in quick mode: use the tests' rates
            from tests.conftest import synthetic_profile

            path = out / "profile.json"
            path.write_text(synthetic_profile().to_json())
            extra_env["FLEXGEN_LITE_PROFILE"] = str(path)
            suite.data["profile"] = {"status": "synthetic (tests/conftest.py)", "path": str(path)}
        else:
            path = out / "profile.json"
            say("profile: measuring the machine for --policy auto ...")
            step = run_step([*me, "--profile-to", str(path), "--device", device] + (["--quick"] if smoke else []),
                            120, suite.deadline, child_env())
            suite.data["profile"] = {"status": step.status, "wall_s": step.wall_s, "path": str(path)}
            if step.status == "ok":
                extra_env["FLEXGEN_LITE_PROFILE"] = str(path)
            else:
                suite.data["profile"]["error"] = _tail(step.stderr)
            say(f"profile: {step.status} ({step.wall_s:.0f} s)")
        suite.save()

    # 4. the rows
    models = {}
    if smoke:
        for name in {r.model for r in rows}:
            models[name] = str(write_tiny_checkpoint(name, out / "models"))
    for row in rows:
        cmd = [*me, "--bench-row", "bench", "--model", models.get(row.model, row.model),
               "--prompt-len", str(row.prompt_len), "--gen-len", str(row.gen_len), *row.flags]
        if args.exact_dummy:
            cmd.insert(3, "--exact-dummy")
        if args.breakdown:  # the stage table in the row's stdout and JSON, its trace beside gpu_suite.json
            cmd += ["--breakdown", "--trace", str(out / f"trace-{row.name}.json")]
        if row.auto and extra_env.get("FLEXGEN_LITE_PROFILE") is None and not os.environ.get("FLEXGEN_LITE_PROFILE"):
            step = Step("skipped", stderr="no hardware profile for --policy auto (the profile step failed)")
        else:
            timeout = per_row.get(row.name, every if every is not None else row.timeout)
            try:
                step = run_step(cmd, timeout, suite.deadline, child_env(extra_env), min_time=15)
            except KeyboardInterrupt:  # the suite was stopped during this row: record it, then stop
                suite.data["rows"].append(row_result(row, Step("stopped", stderr="the suite was stopped"),
                                                     machine, cmd))
                raise
        result = row_result(row, step, machine, cmd)
        suite.data["rows"].append(result)
        suite.save()
        if result["status"] == "ok":
            say(f"{row.name}: ok in {step.wall_s:.0f} s: total {result['total_tok_s']} tok/s, decode "
                f"{result['decode_tok_s']} tok/s, prefill {result['prefill_tok_s']} tok/s ({result['policy']})")
        else:
            say(f"{row.name}: {result['status']} after {step.wall_s:.0f} s: {result.get('error', '')[-300:]}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        print(json.dumps(probe(argv[1])))
        return 0
    if argv[:1] == ["--bench-row"]:
        exact = argv[1:2] == ["--exact-dummy"]
        if not exact:
            fast_dummy_weights()
        from flexgen_lite.cli import main as cli_main

        cli_main(argv[2 if exact else 1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for gpu_suite.json, gpu_suite.md, parity.log (default $OUT, else a temp dir)")
    p.add_argument("--time-limit", type=float, help="seconds for the whole run (default 470; 90 with --cpu-smoke)")
    p.add_argument("--rows", help="comma-separated row names or patterns (opt-13b*), in the order to run")
    p.add_argument("--row-timeout", action="append", default=[], metavar="[NAME=]SECONDS",
                   help="timeout of every row, or of one row (repeatable)")
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--parity-tests", help="pytest arguments for the parity step (default: "
                   f"{' '.join(PARITY_TESTS)})")
    p.add_argument("--parity-timeout", type=float, help="seconds (default 150; 60 with --cpu-smoke)")
    p.add_argument("--parity-workers", type=int, default=0, help="pytest-xdist workers for the parity step, where "
                   "installed (default 0: one process; each worker builds the tiny models and references again)")
    p.add_argument("--device", help="compute device (default cuda; cpu with --cpu-smoke)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU: the same steps, table and JSON")
    p.add_argument("--exact-dummy", action="store_true", help="the bench's own dummy weights (slow for 13B+)")
    p.add_argument("--breakdown", action="store_true", help="run the rows with --breakdown and --trace (stage times "
                   "from CUDA events; trace-ROW.json per row; `flexgen-lite report` draws one)")
    p.add_argument("--measure-profile", action="store_true",
                   help="--cpu-smoke: measure a quick profile for the auto rows (~25 s) instead of the tests' one")
    p.add_argument("--list-rows", action="store_true", help="print the rows and exit")
    p.add_argument("--profile-to", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.profile_to:
        measure_profile(args.device or "cuda", args.profile_to, args.quick)
        return 0
    if args.list_rows:
        for r in SMOKE_ROWS if args.cpu_smoke else GPU_ROWS:
            print(f"{r.name:32} {r.model:20} {' '.join(r.flags)} (timeout {r.timeout:.0f} s) {r.note}")
        return 0

    def stop(signum, frame):
        if _current is not None:
            _kill(_current)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    return run_suite(args)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
