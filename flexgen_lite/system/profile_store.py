"""Where profiles live: one JSON file per machine, compute device and offload file system (not per offload
path), under ~/.cache/flexgen-lite (paths.cache_dir). Loading one is cheap and never measures: measuring (and
`load_profile`, which measures when no profile is stored) lives above the engine it times, in profiling/measure.py."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from . import paths
from .devices import ComputeDevice
from .hardware import HardwareProfile


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


_in_force: list[HardwareProfile] = []  # while a profile is measured: the rates found so far (profile_in_force)
_dependents: list = []  # choices cached from the profile (profile_dependent), cleared when it changes


def cached_profile(device: ComputeDevice | None = None, offload_dir: str = "") -> HardwareProfile | None:
    """The profile already measured for this machine (FLEXGEN_LITE_PROFILE=FILE: that file), or None;
    never measures. While one is being measured, the rates found so far (profile_in_force)."""
    if _in_force and _in_force[-1].is_cuda == (device or ComputeDevice()).is_cuda:
        return _in_force[-1]
    override = os.environ.get("FLEXGEN_LITE_PROFILE")
    path = Path(override) if override else profile_path(device or ComputeDevice(), offload_dir)
    try:
        return HardwareProfile.from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return None  # none yet, or an older or damaged file (JSON of another shape: `[]`, helper-37)


@functools.cache
def cpu_profile() -> HardwareProfile | None:
    """This machine's stored CPU profile (`cached_profile`: read once, never measured), or None: what the CPU
    kernels choose their ways by, as the cost model does."""
    return cached_profile(ComputeDevice("cpu"))


def profile_dependent(fn):
    """functools.cache for a choice made from this machine's profile (a kernel's way at a shape): forgotten when
    the profile changes, so that a process which measured its first profile runs by it from then on."""
    cached = functools.cache(fn)
    _dependents.append(cached)
    return cached


def profile_changed() -> None:
    """Forget what was read from the stored profile: it was just saved, or stood in for (profile_in_force)."""
    cpu_profile.cache_clear()
    for choice in _dependents:
        choice.cache_clear()


@contextlib.contextmanager
def profile_in_force(profile: HardwareProfile):
    """The engine and the kernels choose their ways by `profile` inside (the rates measured so far, while the
    rest is measured), not by the stored one or by the rules for none."""
    _in_force.append(profile)
    profile_changed()
    try:
        yield
    finally:
        _in_force.pop()
        profile_changed()


def save_profile(profile: HardwareProfile, path: Path) -> None:
    """Keep `profile` at `path` (whole: written beside it and renamed). Where it cannot be written (a full disk,
    a read-only cache), this run still uses it, and says so, rather than failing after minutes of measuring
    (helper-37)."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(profile.to_json())
        tmp.replace(path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        print(f"warning: the hardware profile could not be saved to {path} ({e.strerror or e}): this run uses it, "
              "the next one measures again (make room there, or set FLEXGEN_LITE_CACHE to a writable folder)",
              file=sys.stderr)
    profile_changed()


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
