"""Checking, before anything is allocated, that what a policy puts on each tier fits there."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
from dataclasses import dataclass

from .devices import ComputeDevice, host_available_bytes
from .policy import PolicyError

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


def check_fits(needs: dict[str, int], device: ComputeDevice, offload_dir: str, what: str) -> None:
    """Raise PolicyError naming the tier, the need and the room when `needs` (bytes per tier) cannot fit."""
    free = free_bytes(device, offload_dir)
    if not device.is_cuda:  # one pool of host RAM for both
        needs = {"gpu": 0, "cpu": needs["gpu"] + needs["cpu"], "disk": needs["disk"]}
    advice = {
        "gpu": "lower the gpu percentages or the batch size (--percent, --gpu-batch-size)",
        "cpu": "move more to disk (lower the cpu percentages of --percent) or lower the batch size",
        "disk": "free disk space, point --offload-dir at a larger disk, or keep more in memory",
    }
    if not device.is_cuda:
        advice["cpu"] = "move more to disk (lower the gpu and cpu percentages of --percent) or lower the batch size"
    for tier, need in needs.items():
        if need > free[tier]:
            where = f"the {tier} tier"
            if tier == "cpu" and not device.is_cuda:
                where = "the gpu + cpu tiers (both host RAM without CUDA)"
            raise PolicyError(
                f"{what} needs {need / GiB:.2f} GiB on {where} but only {free[tier] / GiB:.2f} GiB "
                f"is free ({need - free[tier]:.3g} bytes missing): {advice[tier]}"
            )


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
SAFETY = 0.85  # default budgets leave this share of what is free: other processes, the page cache, slack


def parse_size(text: str) -> int:
    """'16GiB', '500MiB', '1.5G' (binary), '2GB' (decimal) or a plain number of bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size: write e.g. 16GiB, 500MiB or 2GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB"


@dataclass(frozen=True)
class Budgets:
    """Most bytes the engine may take per tier (None: what is free now, times SAFETY).

    gpu: compute-device memory; without CUDA the compute tier's share of host RAM (no cap when None).
    cpu: all host RAM the engine takes, the compute tier's included when there is no GPU.
    disk: offload files."""

    gpu: int | None = None
    cpu: int | None = None
    disk: int | None = None

    def resolved(self, device: ComputeDevice, offload_dir: str) -> Budgets:
        free = free_bytes(device, offload_dir)
        gpu = self.gpu if self.gpu is not None or not device.is_cuda else int(free["gpu"] * SAFETY)
        return Budgets(gpu, self.cpu if self.cpu is not None else int(free["cpu"] * SAFETY),
                       self.disk if self.disk is not None else int(free["disk"] * SAFETY))

    def describe(self, device_is_cuda: bool) -> str:
        gpu = "no cap (shares host RAM)" if self.gpu is None else gib(self.gpu)
        host = "host RAM" if device_is_cuda else "host RAM, compute tier included"
        return f"gpu {gpu}, cpu {gib(self.cpu) if self.cpu is not None else '?'} ({host}), " \
               f"disk {gib(self.disk) if self.disk is not None else '?'}"


def over_budget(peak: dict[str, float], budgets: Budgets) -> dict[str, tuple[float, float]]:
    """{tier: (need, budget)} for every tier whose peak exceeds its budget."""
    out = {}
    for tier in ("gpu", "cpu", "disk"):
        budget = getattr(budgets, tier)
        if budget is not None and peak[tier] > budget:
            out[tier] = (peak[tier], budget)
    return out


def check_budgets(peak: dict[str, float], plan: dict[str, dict[str, float]], budgets: Budgets, cuda: bool,
                  what: str) -> None:
    """Raise PolicyError naming each tier over its budget, by how much, and its largest parts."""
    over = over_budget(peak, budgets)
    if not over:
        return
    lines = []
    for tier, (need, budget) in over.items():
        parts = {k: v for k, v in plan[tier].items() if k != "load"}
        if tier == "cpu" and not cuda:  # host RAM holds the compute tier too
            parts.update({f"{k} (compute tier)": v for k, v in plan["gpu"].items()})
        top = sorted(((v, k) for k, v in parts.items() if v), reverse=True)[:3]
        lines.append(f"{tier} needs {gib(need)} but its budget is {gib(budget)}: {gib(need - budget)} missing "
                     f"(largest: {', '.join(f'{k} {gib(v)}' for v, k in top)})")
    raise PolicyError(f"{what} exceeds the memory budgets: " + "; ".join(lines)
                      + ". Lower the batch size, move more to disk (--percent), raise the budget, or use --policy auto")
