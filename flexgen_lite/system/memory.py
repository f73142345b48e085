"""This process's memory: bytes free per tier, resident and peak bytes, sizes written and read."""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil

from .devices import ComputeDevice, host_available_bytes

GiB = 2**30


def return_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim): placing weights frees large fp32
    temporaries, and with freed memory kept (devices.keep_freed_memory) they would stay resident as holes
    that later allocations cannot always reuse, beyond what the memory budgets count."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def free_bytes(device: ComputeDevice, offload_dir: str) -> dict[str, int]:
    """Free bytes per tier now. Without CUDA the gpu and cpu tiers share host RAM."""
    disk_dir = offload_dir or os.environ.get("TMPDIR", "/tmp")
    while disk_dir and not os.path.exists(disk_dir):
        disk_dir = os.path.dirname(disk_dir)
    return {"gpu": device.free_memory(), "cpu": host_available_bytes(),
            "disk": shutil.disk_usage(disk_dir or ".").free}


# ---- budgets ---------------------------------------------------------------------------------------------------
# What the runtime still takes after planning: scipy's LP solver, the first use of oneDNN and the tokenizer,
# the I/O threads' stacks (~70 MiB with torch 2.13 on CPU).
RUNTIME_GROWTH = 96 * 2**20


def process_rss() -> int:
    """Bytes resident in this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    """This process's peak resident bytes: VmHWM. (ru_maxrss can hold the parent's peak: Linux keeps it
    across the exec of a process spawned by a large one, as pytest is.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def runtime_bytes() -> int:
    """Host RAM this process takes besides the engine's allocations: what is resident now (Python, torch,
    the tokenizer; call it before placing a model) and what the runtime still grows by."""
    return process_rss() + RUNTIME_GROWTH


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 1000, "kib": 2**10, "m": 2**20, "mb": 1000**2, "mib": 2**20,
          "g": 2**30, "gb": 1000**3, "gib": 2**30, "t": 2**40, "tb": 1000**4, "tib": 2**40}


def parse_size(text: str) -> int:
    """'16GiB', '500MiB', '1.5G' (binary), '2GB' (decimal) or a plain number of bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size: write e.g. 16GiB, 500MiB or 2GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def mib_up(nbytes: float) -> str:
    """Bytes as a flag's value that holds them: whole MiB, rounded up (helper-40: the sum of two rounded figures
    in a refusal, taken as the budget, was refused again for 1 MiB)."""
    return f"{math.ceil(nbytes / 2**20)}MiB"


def gib(nbytes: float) -> str:
    """Bytes for a message: GiB, or MiB / KiB where GiB would print a size as 0.00."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20)):
        if abs(nbytes) >= 0.1 * size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes / 2**10:.2f} KiB"
