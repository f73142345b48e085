"""The compute dtype when none is given: float16 on CUDA; on a CPU, bfloat16 only where it is faster.

Many CPUs (x86 without AVX-512 BF16 or AMX) emulate bfloat16 matmuls at a quarter of float32's speed, so the
choice comes from this machine's measured matmul rates (the profile); before a profile exists, from the CPU's
flags. It is one choice per machine, the same for every workload: the policy search keeps it rather than
weighing both dtypes per workload, so a run of 1 prompt and one of 300 compute alike (docs/outputs.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..engine.policy import DTYPES, Policy
from ..system.hardware import HardwareProfile

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 CPU flags of native bfloat16 matmul units
PROBE_ROWS = (1, 16, 256)  # decode-like to prefill-like batches


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    reason: str


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, arm
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def guess_from_flags(flags: set[str]) -> DtypeChoice:
    have = [f for f in BF16_FLAGS if f in flags]
    if have:
        return DtypeChoice("bfloat16", f"no profile yet; the CPU has bfloat16 units ({', '.join(have)})")
    return DtypeChoice("float32", "no profile yet; the CPU lacks bfloat16 units (avx512_bf16, amx_bf16)")


def bf16_speedup(hw: HardwareProfile) -> float:
    """How many times faster bfloat16 matmuls ran than float32 ones (geometric mean over batch sizes)."""
    k, n = hw.matmul_shape
    product = 1.0
    for rows in PROBE_ROWS:
        product *= hw.matmul_time("float32", rows, k, n) / hw.matmul_time("bfloat16", rows, k, n)
    return product ** (1 / len(PROBE_ROWS))


def choose_from_profile(hw: HardwareProfile) -> DtypeChoice:
    if "bfloat16" not in hw.matmul:
        return DtypeChoice("float32", "the profile has no bfloat16 matmul rates")
    speedup = bf16_speedup(hw)
    if speedup > 1:
        return DtypeChoice("bfloat16", f"bfloat16 matmuls ran {speedup:.1f}x as fast as float32 in this "
                           "machine's profile")
    return DtypeChoice("float32", f"bfloat16 matmuls ran at {speedup:.2f}x float32's speed in this machine's "
                       "profile (no native bfloat16 units)")


_choices: dict[tuple, DtypeChoice] = {}


def default_dtype(device_type: str) -> DtypeChoice:
    """float16 on CUDA; on a CPU, by the cached profile's matmul rates (never measured here), else by the
    CPU's flags. Remembered per profile file and its modification time."""
    if device_type == "cuda":
        return DtypeChoice("float16", "CUDA default")
    from ..system.devices import ComputeDevice
    from ..system.profile_store import cached_profile, profile_path

    cpu = ComputeDevice("cpu")
    path = os.environ.get("FLEXGEN_LITE_PROFILE") or str(profile_path(cpu))
    key = (path, _mtime(path))
    if key not in _choices:
        hw = cached_profile(cpu) if key[1] is not None else None
        _choices[key] = choose_from_profile(hw) if hw is not None else guess_from_flags(cpu_flags())
    return _choices[key]


def compute_dtype(policy: Policy, device_type: str) -> torch.dtype:
    """The policy's dtype, else this machine's default (`default_dtype`): a policy is data, the default is
    resolved where a run (or a plan) starts."""
    return DTYPES[policy.dtype or default_dtype(device_type).dtype]


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def machine_dtype(hw: HardwareProfile) -> DtypeChoice:
    """The dtype of every run on this machine that names none: float16 on CUDA, else by the profile's rates.
    Not by workload: the number of prompts (or their length) must not change how a prompt is computed."""
    if hw.is_cuda:
        return DtypeChoice("float16", "CUDA default")
    return choose_from_profile(hw)


def search_options(fixed: str, hw: HardwareProfile) -> tuple[str, ...]:
    """The dtype the policy search uses: the one given, else this machine's (`machine_dtype`)."""
    return (fixed or machine_dtype(hw).dtype,)


def dtype_source(kept: bool) -> str:
    """Where a fixed dtype came from: --dtype, or an --output file's first run (cli/run_record.check_and_adopt)."""
    return "kept from the first run of --output" if kept else "given by --dtype"


def explain_search(result, fixed: str, kept: bool = False) -> str:
    """Why the searched policy (a SearchResult) computes in its dtype: given, or this machine's choice."""
    if fixed:
        return f"{fixed} ({dtype_source(kept)})"
    choice = machine_dtype(result.hardware)
    return f"{choice.dtype} ({choice.reason}; one choice per machine, whatever the workload)"
