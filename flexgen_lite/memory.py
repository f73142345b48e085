"""Checking, before anything is allocated, that what a policy puts on each tier fits there."""

from __future__ import annotations

import os
import shutil

from .devices import ComputeDevice, host_available_bytes
from .policy import PolicyError

GiB = 2**30


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
