"""The three tiers: compute-device memory ("gpu"), host RAM ("cpu") and files on disk ("disk").

A `TieredTensor` is split along its first dimension into up to three row ranges, one per tier, so
placement by percent is exact to a row and every layer moves the same share of its bytes.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass, field

import torch

from .devices import ComputeDevice

TIERS = ("gpu", "cpu", "disk")


class OffloadError(OSError):
    """The offload directory cannot hold what the policy puts on disk."""


@dataclass
class MemoryLedger:
    """Bytes allocated per tier by this engine, and their peaks."""

    current: dict = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    peak: dict = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, tier: str, nbytes: int) -> None:
        with self.lock:
            self.current[tier] += nbytes
            self.peak[tier] = max(self.peak[tier], self.current[tier])


def _byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


class DiskFile:
    """One tensor's bytes in a file; reads and writes at byte offsets with pread/pwrite."""

    def __init__(self, path: str, nbytes: int) -> None:
        self.path, self.nbytes = path, nbytes
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if nbytes:
                os.posix_fallocate(self.fd, 0, nbytes)  # claim the space now: a full disk fails here, not mid-run
        except OSError as e:
            os.close(self.fd)
            raise _disk_error(e, path, nbytes) from None

    def write(self, src: torch.Tensor, offset: int = 0) -> None:
        view = _byte_view(src.cpu())
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as e:
            raise _disk_error(e, self.path, len(view)) from None

    def read_into(self, dst: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Fill the host tensor `dst` (contiguous) from the file."""
        view = memoryview(dst.view(torch.uint8).reshape(-1).numpy())
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                raise OffloadError(errno.EIO, f"offload file {self.path} is shorter than expected")
            done += n
        return dst

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _disk_error(e: OSError, path: str, nbytes: int) -> OffloadError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        free = shutil.disk_usage(os.path.dirname(path)).free
        return OffloadError(
            e.errno,
            f"offload disk is full: could not store {nbytes / 2**20:.1f} MiB in {os.path.dirname(path)} "
            f"({free / 2**30:.2f} GiB free). Free space, point --offload-dir at a larger disk, "
            "or lower the disk share of the policy",
        )
    return OffloadError(e.errno, f"offload file {path}: {e.strerror}")


class DiskStore:
    """A private directory of offload files, removed on close, at exit, or when garbage collected."""

    def __init__(self, parent: str = "") -> None:
        try:
            if parent:
                os.makedirs(parent, exist_ok=True)
            self.directory = tempfile.mkdtemp(prefix="flexgen-lite-", dir=parent or None)
        except OSError as e:
            raise OffloadError(
                e.errno, f"offload directory {parent!r} is not writable ({e.strerror}); pass --offload-dir DIR"
            ) from None
        self.files: list[DiskFile] = []
        self._count = 0
        self._finalizer = weakref.finalize(self, _remove_files, self.files, self.directory)

    def create(self, nbytes: int, name: str = "t") -> DiskFile:
        self._count += 1
        f = DiskFile(os.path.join(self.directory, f"{self._count:06d}-{name}"), nbytes)
        self.files.append(f)
        return f

    def close(self) -> None:
        self._finalizer()


def _remove_files(files: list[DiskFile], directory: str) -> None:
    for f in files:
        f.close()
    shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Part:
    tier: str
    start: int
    stop: int
    data: torch.Tensor | DiskFile


class TieredTensor:
    """A tensor stored as row ranges on the gpu, cpu and disk tiers."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, parts: list[Part],
                 resident: torch.Tensor | None = None) -> None:
        self.shape, self.dtype, self.parts = tuple(shape), dtype, parts
        # rows held in compute-device memory as one tensor (all of them, or none): usable without a copy
        self.resident = resident

    @property
    def row_bytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape[1:]:
            n *= d
        return n

    def nbytes(self, tier: str) -> int:
        return sum((p.stop - p.start) * self.row_bytes for p in self.parts if p.tier == tier)

    def fetch(self, device: ComputeDevice, out: torch.Tensor | None, staging: Staging) -> torch.Tensor:
        """The whole tensor on the compute device: `resident` as is, or assembled into `out`."""
        if self.resident is not None:
            return self.resident
        assert out is not None and out.shape == self.shape, "fetch needs a buffer of the tensor's shape"
        for p in self.parts:
            dst = out[p.start:p.stop]
            if isinstance(p.data, DiskFile):
                if device.is_cuda:
                    host = staging.take(dst.numel(), dst.dtype)
                    dst.copy_(p.data.read_into(host).view(dst.shape), non_blocking=True)
                    staging.release()
                else:
                    p.data.read_into(dst)
            else:
                dst.copy_(p.data, non_blocking=True)
        return out


class Staging:
    """Host buffers that disk reads land in before a copy to the GPU: allocated on first use, reused.

    One buffer per I/O thread, grown to the largest request; pinned when CUDA is used.
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.local = threading.local()

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        buf = getattr(self.local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
            self.local.buf = buf
        event = getattr(self.local, "event", None)
        if event is not None:  # the last async copy out of this buffer must end before it is overwritten
            event.synchronize()
            self.local.event = None
        return buf[:nbytes].view(dtype)

    def release(self) -> None:
        """Mark the buffer as read by copies queued on the current CUDA stream."""
        if self.pin:
            self.local.event = torch.cuda.Event()
            self.local.event.record()
