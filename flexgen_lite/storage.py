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

from .compression import CompressionConfig, QuantizedTensor, dequantize, from_bytes
from .devices import ComputeDevice

TIERS = ("gpu", "cpu", "disk")


class OffloadError(OSError):
    """The offload directory cannot hold what the policy puts on disk."""


@dataclass
class MemoryLedger:
    """Bytes allocated per tier by this engine, and their peaks."""

    current: dict = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    peak: dict = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    # reentrant: a garbage collection inside add() may run a finalizer that calls add()
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def add(self, tier: str, nbytes: int) -> None:
        with self.lock:
            self.current[tier] += nbytes
            self.peak[tier] = max(self.peak[tier], self.current[tier])

    def track(self, owner: object, tier: str, nbytes: int) -> None:
        """Count `nbytes` on `tier` until `owner` (a tensor or a DiskFile) is garbage collected."""
        self.add(tier, nbytes)
        weakref.finalize(owner, self.add, tier, -nbytes)


def _byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


class DiskFile:
    """One tensor's bytes in a file; reads and writes at byte offsets with pread/pwrite.

    The file is deleted on close() or when the object is garbage collected."""

    page_cache = True  # False: drop what was read from the page cache (benchmarks of a cold disk)

    def __init__(self, path: str, nbytes: int) -> None:
        self.path, self.nbytes = path, nbytes
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as e:
            raise _disk_error(e, path, nbytes) from None
        try:
            if nbytes:
                os.posix_fallocate(self.fd, 0, nbytes)  # claim the space now: a full disk fails here, not mid-run
        except OSError as e:
            _release_file(self.fd, path)
            raise _disk_error(e, path, nbytes) from None
        self._finalizer = weakref.finalize(self, _release_file, self.fd, path)

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
            try:
                n = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as e:
                raise _disk_error(e, self.path, len(view)) from None
            if n == 0:
                raise OffloadError(errno.EIO, f"offload file {self.path} is shorter than expected")
            done += n
        if not DiskFile.page_cache:
            os.posix_fadvise(self.fd, offset, len(view), os.POSIX_FADV_DONTNEED)
        return dst

    def close(self) -> None:
        """Close and delete the file."""
        self.fd = -1
        self._finalizer()


def _release_file(fd: int, path: str) -> None:
    os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass  # already gone with its directory


def _disk_error(e: OSError, path: str, nbytes: int) -> OffloadError:
    directory = os.path.dirname(path)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        try:
            free = f"{shutil.disk_usage(directory).free / 2**30:.2f} GiB free"
        except OSError:
            free = "free space unknown"
        reason = ("offload file is too large for the file system or the process's file size limit (ulimit -f)"
                  if e.errno == errno.EFBIG else "offload disk is full")
        return OffloadError(
            e.errno,
            f"{reason}: could not store {nbytes / 2**20:.1f} MiB in {directory} ({free}). "
            "Free space, point --offload-dir at a larger disk, or lower the disk share of the policy",
        )
    return OffloadError(e.errno, f"offload file {path}: {e.strerror}; pass a writable --offload-dir DIR")


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
        self.files: weakref.WeakSet[DiskFile] = weakref.WeakSet()  # files die with their owners
        self._count = 0
        self._finalizer = weakref.finalize(self, _remove_files, self.files, self.directory)

    def create(self, nbytes: int, name: str = "t") -> DiskFile:
        self._count += 1
        f = DiskFile(os.path.join(self.directory, f"{self._count:06d}-{name}"), nbytes)
        self.files.add(f)
        return f

    def close(self) -> None:
        self._finalizer()


def _remove_files(files: weakref.WeakSet, directory: str) -> None:
    for f in list(files):
        f.close()
    shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Part:
    tier: str
    start: int
    stop: int
    data: torch.Tensor | QuantizedTensor | DiskFile  # a compressed part on disk holds to_bytes(q)
    nbytes: int


class TieredTensor:
    """A tensor stored as row ranges on the gpu, cpu and disk tiers, optionally 4-bit compressed."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, parts: list[Part],
                 resident: torch.Tensor | None = None, compression: CompressionConfig | None = None) -> None:
        self.shape, self.dtype, self.parts, self.compression = tuple(shape), dtype, parts, compression
        # rows held in compute-device memory as one tensor (all of them, or none): usable without a copy
        self.resident = resident

    def nbytes(self, tier: str) -> int:
        return sum(p.nbytes for p in self.parts if p.tier == tier)

    def fetch(self, device: ComputeDevice, out: torch.Tensor | None, staging: Staging) -> torch.Tensor:
        """The whole tensor on the compute device: `resident` as is, or assembled into `out`."""
        if self.resident is not None:
            return self.resident
        assert out is not None and out.shape == self.shape, "fetch needs a buffer of the tensor's shape"
        for p in self.parts:
            dst = out[p.start:p.stop]
            if self.compression is not None:
                dequantize(self._quantized(p, device, staging), self.dtype, out=dst)
            elif isinstance(p.data, DiskFile):
                if device.is_cuda:
                    host = staging.take(dst.numel(), dst.dtype)
                    dst.copy_(p.data.read_into(host).view(dst.shape), non_blocking=True)
                    staging.release()
                else:
                    p.data.read_into(dst)
            else:
                dst.copy_(p.data, non_blocking=True)
        return out

    def _quantized(self, p: Part, device: ComputeDevice, staging: Staging) -> QuantizedTensor:
        """A compressed part's codes on the compute device (decompressed only there, just before use)."""
        if not isinstance(p.data, DiskFile):
            return p.data.to(device.device, non_blocking=True)
        host = p.data.read_into(staging.take(p.nbytes, torch.uint8))
        on_device = host.to(device.device, non_blocking=True)
        staging.release()
        return from_bytes(on_device, (p.stop - p.start, *self.shape[1:]), self.compression)


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
