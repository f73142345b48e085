"""Checks of the command line that run before anything slow (the model, the profile): everyday mistakes end
in one `error:` line and exit code 2."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import torch


class UsageError(ValueError):
    """A flag or file the user gave that cannot work; the message says what to do instead."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line (and the hint to --help), not the whole usage."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def size(text: str) -> int:
    from ..system.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_device(device: str | None) -> None:
    """--device names cpu (or cpu+link: a CPU that copies across a link as a GPU would, for testing the GPU's
    paths), or a CUDA GPU that is there."""
    if device is None or device == "cpu+link":
        return
    try:
        d = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device} is not a device; use cpu or cuda (cuda:N for GPU N)") from None
    if d.type == "cpu":
        return
    if d.type != "cuda":
        raise UsageError(f"--device {device} is not supported; use cpu or cuda")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: torch sees no CUDA GPU here (torch {torch.__version__}); use "
                         "--device cpu, or leave --device out to use what is present")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0.."
                         f"cuda:{torch.cuda.device_count() - 1})")


def check_offload_dir(path: str) -> None:
    """The offload directory can be made and written (the profile and the disk tier need it); folders made to
    check it are removed again (helper-35: a run left `a/b/c` behind, empty)."""
    if not path:
        return
    from ..engine.storage import missing_folders, remove_empty

    made = missing_folders(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"--offload-dir {path} is not a writable directory ({e.strerror}); pass a writable "
                         "--offload-dir DIR") from None
    finally:
        remove_empty(made)


def check_writable(flag: str, path: str, example: str) -> None:
    """The file `flag` names can be written: its folder exists and takes files (said before the run, in one line;
    `example`: a file name to suggest in a folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory; pass a file name, e.g. {os.path.join(path, example)}")
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the directory {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: the directory {folder} is not writable; choose another {flag}")


def check_args(args: argparse.Namespace) -> None:
    """What every command's flags must satisfy, checked before the model or the profile is loaded."""
    check_device(getattr(args, "device", None))
    check_offload_dir(getattr(args, "offload_dir", ""))
    if hasattr(args, "breakdown") and getattr(args, "trace", None):  # bench's and generate's --trace FILE.json:
        check_writable("--trace", args.trace, "trace.json")  # a bad one failed after the run (helper-41)
    if getattr(args, "stop", None) and any(s == "" for s in args.stop):
        raise UsageError('--stop "" would end every output at once; give a non-empty stop string')
