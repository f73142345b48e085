"""Where profiles live: one JSON file per machine, compute device and offload file system (not per offload
path), under ~/.cache/flexgen-lite (paths.cache_dir). Loading one is cheap; measuring one (profile.py) takes
~25 s and is announced on stderr whenever it happens implicitly, since a busy machine then gives a wrong plan."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import paths
from .devices import ComputeDevice
from .hardware import HardwareProfile
from .memory import return_freed_memory


def cache_dir() -> Path:
    return paths.cache_dir()


def filesystem_id(offload_dir: str = "") -> int:
    """The device number of the file system that holds (or will hold) `offload_dir`."""
    path = Path(os.path.abspath(offload_dir or tempfile.gettempdir()))
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.stat(path).st_dev


def profile_path(device: ComputeDevice, offload_dir: str = "") -> Path:
    """One file per machine, compute device and offload file system."""
    name = str(device.device)
    if device.is_cuda:
        name += "-" + torch.cuda.get_device_name(device.device)
    key = f"{name}|fs {filesystem_id(offload_dir)}|{platform.node()}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_dir() / f"profile-{device.device.type}-{digest}.json"


def cached_profile(device: ComputeDevice | None = None, offload_dir: str = "") -> HardwareProfile | None:
    """The profile already measured for this machine (FLEXGEN_LITE_PROFILE=FILE: that file), or None;
    never measures."""
    override = os.environ.get("FLEXGEN_LITE_PROFILE")
    path = Path(override) if override else profile_path(device or ComputeDevice(), offload_dir)
    try:
        return HardwareProfile.from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None  # none yet, or an older or damaged file


def load_profile(device: ComputeDevice | None = None, offload_dir: str = "", refresh: bool = False,
                 progress: Callable[[str], None] | None = None) -> HardwareProfile:
    """The cached profile of this machine, measuring it first if there is none (or with `refresh`).

    FLEXGEN_LITE_PROFILE=FILE uses that file instead (tests, or a profile copied from a like machine)."""
    device = device or ComputeDevice()
    if not refresh:
        found = cached_profile(device, offload_dir)
        if found is not None:
            return _with_int4_rates(found, device, offload_dir)
        print(f"no profile of this machine yet: measuring it now (~25 s, once; cached in {cache_dir()}). Other "
              "processes' load would make the plans wrong: `flexgen-lite profile --refresh` measures again",
              file=sys.stderr)
    from .profile import measure  # measuring needs the engine's pieces; loading a profile does not

    profile = measure(device, offload_dir, progress)
    return_freed_memory()  # the measurement's buffers: not resident beyond what budgets count
    if profile.notes and not refresh:
        print("\n" + "\n".join(profile.notes), file=sys.stderr)
    save_profile(profile, profile_path(device, offload_dir))
    return profile


def _with_int4_rates(hw: HardwareProfile, device: ComputeDevice, offload_dir: str) -> HardwareProfile:
    """A cached profile older than the int4 kernel's rates (None) gets them measured now (a fraction of a
    second) and saved; FLEXGEN_LITE_PROFILE's file is left as it is (the cost model then assumes no kernel)."""
    measured = (hw.int4_matmul, hw.int4_dequantize, hw.int4_tiles)
    if all(found is not None for found in measured) or os.environ.get("FLEXGEN_LITE_PROFILE"):
        return hw
    from .profile import measure_int4_matmul

    updated = dataclasses.replace(hw, **measure_int4_matmul(device))
    save_profile(updated, profile_path(device, offload_dir))
    return updated


def save_profile(profile: HardwareProfile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(path)


def remeasure_after_fast_run(device: ComputeDevice, offload_dir: str = "") -> str:
    """After a compute-bound run more than 2x faster than predicted (a profile taken while the machine was
    busy): measure the matmul rates again, keep the faster per point, and save them for the next plan."""
    if os.environ.get("FLEXGEN_LITE_PROFILE"):
        return "the profile is FLEXGEN_LITE_PROFILE's file: left as it is"
    hw = cached_profile(device, offload_dir)
    if hw is None:
        return "no cached profile to update"
    from .profile import remeasure_matmul

    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    updated = dataclasses.replace(hw, matmul=remeasure_matmul(device, hw),
                                  notes=[*hw.notes, f"matmul rates re-measured {stamp} after a run 2x faster "
                                         "than predicted"])
    save_profile(updated, profile_path(device, offload_dir))
    return f"matmul rates measured again and kept where faster, in {profile_path(device, offload_dir)}: the next " \
           "plan uses them"


def prediction_miss(predicted_tok_s: float, measured_tok_s: float, hw: HardwareProfile) -> str | None:
    """A warning when a run's throughput is off its prediction by more than 2x either way: the profile does
    not describe this machine now (taken while it was busy, or it is busy now)."""
    ratio = measured_tok_s / max(predicted_tok_s, 1e-12)
    if 0.5 <= ratio <= 2:
        return None
    return (f"warning: measured {measured_tok_s:.2f} tok/s is {ratio:.2g}x the predicted {predicted_tok_s:.2f}: "
            f"the profile (measured {hw.measured_at or 'elsewhere'}) does not describe this machine now. If the "
            "machine was busy then, run `flexgen-lite profile --refresh` while it is quiet; if it is busy now, "
            "rerun later")
