"""The three tiers: compute-device memory ("gpu"), host RAM ("cpu") and files on disk ("disk").

Here: the memory ledger, offload files (space claimed up front; pread/pwrite, or memory-mapped so a CPU
computes on the page cache in place) and the staging buffers disk reads land in. Which tier holds what is
decided in weights.py, kv_cache.py and activations.py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass, field

import torch

from ..system.host_memory import host_buffer

TIERS = ("gpu", "cpu", "disk")
PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python exports it from 3.13


def page_aligned(nbytes: int) -> int:
    """Bytes a tensor takes in a layer's offload file: each starts on a page (mapping, O_DIRECT)."""
    return -(-nbytes // PAGE) * PAGE


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
    """An offload file: pread/pwrite at byte offsets, or tensors memory-mapped onto it (`map`), whose pages
    are faulted in ahead of use (`prefetch`) and dropped from the process after use (`release`).

    The file is deleted on close() or when the object is garbage collected."""

    page_cache = True  # False: drop what was read from the page cache (benchmarks of a cold disk)
    mapping: mmap.mmap | None = None
    direct_fd: int | None = None

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
            _release_file([self.fd], path)
            raise _disk_error(e, path, nbytes) from None
        self._fds = [self.fd]  # with the O_DIRECT one once opened: closed together
        self._finalizer = weakref.finalize(self, _release_file, self._fds, path)

    def write(self, src: torch.Tensor, offset: int = 0) -> None:
        view = _byte_view(src.cpu())
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as e:
            raise _disk_error(e, self.path, len(view)) from None

    def read_into(self, dst: torch.Tensor, offset: int = 0, direct: bool = False) -> torch.Tensor:
        """Fill the host tensor `dst` (contiguous) from the file. `direct`: bypass the page cache (O_DIRECT)
        when the file system allows and `dst` and `offset` are page-aligned; buffered otherwise."""
        view = memoryview(dst.view(torch.uint8).reshape(-1).numpy())
        fd = self._direct_fd() if direct and _aligned(dst.data_ptr(), offset, len(view)) else self.fd
        done = 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                raise _disk_error(e, self.path, len(view)) from None
            if n == 0:
                raise OffloadError(errno.EIO, f"offload file {self.path} is shorter than expected")
            done += n
        if not DiskFile.page_cache and fd == self.fd:
            os.posix_fadvise(self.fd, offset, len(view), os.POSIX_FADV_DONTNEED)
        return dst

    def _direct_fd(self) -> int:
        """A second descriptor with O_DIRECT (opened once), or the buffered one where it is refused."""
        if self.direct_fd is None:
            try:
                self.direct_fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
                self._fds.append(self.direct_fd)
            except OSError:  # e.g. tmpfs
                self.direct_fd = self.fd
        return self.direct_fd

    def map(self, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
        """A tensor whose storage is the file's bytes at `offset` (shared: writes go to the file)."""
        if self.mapping is None:
            self.mapping = mmap.mmap(self.fd, self.nbytes)
        count = torch.Size(shape).numel()
        return torch.frombuffer(self.mapping, dtype=dtype, count=count, offset=offset).view(shape)

    def prefetch(self, offset: int = 0, nbytes: int | None = None) -> None:
        """Fault the mapped pages of a byte range in now (from the page cache, or read from disk), so that
        compute finds them mapped; run on an I/O thread, it overlaps the disk with compute."""
        start, length = self._pages(offset, nbytes)
        try:
            self.mapping.madvise(MADV_POPULATE_READ, start, length)
        except OSError:  # an older kernel: ask for read-ahead and touch one byte a page
            self.mapping.madvise(mmap.MADV_WILLNEED, start, length)
            sum(self.mapping[start:start + length:PAGE])

    def release(self, offset: int = 0, nbytes: int | None = None) -> None:
        """Unmap a byte range's pages from this process (they stay in the page cache, written pages
        included; a cold-disk benchmark drops them from it too)."""
        start, length = self._pages(offset, nbytes)
        self.mapping.madvise(mmap.MADV_DONTNEED, start, length)
        if not DiskFile.page_cache:
            os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_DONTNEED)

    def _pages(self, offset: int, nbytes: int | None) -> tuple[int, int]:
        end = self.nbytes if nbytes is None else offset + nbytes
        start = offset - offset % PAGE
        return start, min(end, self.nbytes) - start

    def close(self) -> None:
        """Close and delete the file (its mapping goes with the last tensor on it)."""
        self.fd = -1
        self._finalizer()


def _aligned(address: int, offset: int, nbytes: int) -> bool:
    return address % PAGE == 0 and offset % PAGE == 0 and nbytes % 512 == 0


def _release_file(fds: list[int], path: str) -> None:
    for fd in fds:
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
    """A private directory of offload files, removed on close, at exit, or when garbage collected.

    Its name carries the owner's pid, and the owner holds a lock (flock) on it while alive: a later start
    removes the directories of owners that died without cleaning up (SIGKILL, a crash, a power cut)."""

    def __init__(self, parent: str = "") -> None:
        made = missing_folders(parent) if parent else []  # removed again on close where left empty
        try:
            if parent:
                os.makedirs(parent, exist_ok=True)
            remove_stale_stores(parent or tempfile.gettempdir())
            self.directory = tempfile.mkdtemp(prefix=f"flexgen-lite-{os.getpid()}-", dir=parent or None)
            lock = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise OffloadError(
                e.errno, f"offload directory {parent!r} is not writable ({e.strerror}); pass --offload-dir DIR"
            ) from None
        self.files: weakref.WeakSet[DiskFile] = weakref.WeakSet()  # files die with their owners
        self._count = 0
        self._finalizer = weakref.finalize(self, _remove_files, self.files, self.directory, lock, made)

    def create(self, nbytes: int, name: str = "t") -> DiskFile:
        self._count += 1
        f = DiskFile(os.path.join(self.directory, f"{self._count:06d}-{name}"), nbytes)
        self.files.add(f)
        return f

    def close(self) -> None:
        self._finalizer()


def missing_folders(path: str) -> list[str]:
    """The folders of `path` that do not exist yet, deepest first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def remove_empty(folders: list[str]) -> None:
    """Remove `folders` (missing_folders' list, made since), deepest first, while nothing else was put in them."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            break


def _remove_files(files: weakref.WeakSet, directory: str, lock: int, made: list[str]) -> None:
    for f in list(files):
        f.close()
    shutil.rmtree(directory, ignore_errors=True)
    os.close(lock)  # only now: the directory is never unlocked while its owner lives
    remove_empty(made)  # the --offload-dir folders this store made


STORE_NAME = re.compile(r"flexgen-lite-(?:profile-)?(\d+)-")  # a run's offload directory, or a profile's probe file


def remove_stale_stores(parent: str) -> list[str]:
    """Remove the offload directories and profile probe files in `parent` whose owner is dead: its pid is gone and
    nobody holds its lock (a pid reused, or one of another PID namespace, is still seen by its lock)."""
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        match = STORE_NAME.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        path = os.path.join(parent, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            removed.append(path)
        except OSError:
            pass  # locked: its owner lives
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def probe_file(parent: str, tag: str):
    """A new file in `parent` for a measurement's probes, named with this process's pid and locked while it is in
    use, removed after; a killed measurement's is removed by the next remove_stale_stores there (helper-37: a
    profile killed while probing the disk left 256 MiB behind, which nothing removed)."""
    remove_stale_stores(parent)
    fd, path = tempfile.mkstemp(prefix=f"flexgen-lite-profile-{os.getpid()}-{tag}-", dir=parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Staging:
    """Host buffers between files and the GPU: disk reads land in them before a copy to the device, and
    device data before a file write. Per lane ("weights", "cache", "store", "act") a buffer is reused once
    the copies out of it are done; while they run, the next request gets a second buffer (up to `per_lane`,
    more only while that many are held at once), so a read overlaps the copy before it. Buffers are
    page-locked at their exact size with CUDA (host_memory), grown to the largest request, in the ledger."""

    def __init__(self, pin: bool, ledger: MemoryLedger | None = None, per_lane: int = 2) -> None:
        self.pin, self.ledger, self.per_lane = pin, ledger, per_lane
        self.lanes: dict[str, list[StagingBuffer]] = {}
        self.lock = threading.Lock()

    def take(self, lane: str, nbytes: int) -> StagingBuffer:
        """A buffer of the lane holding at least `nbytes` (its `data`: exactly `nbytes`), for this thread
        until release()."""
        with self.lock:
            free = [b for b in self.lanes.setdefault(lane, []) if not b.held]
            ready = [b for b in free if b.event is None or b.event.query()]
            if ready:
                buf = max(ready, key=lambda b: b.memory.numel())
            elif free and len(self.lanes[lane]) >= self.per_lane:
                buf = free[0]  # the lane is full: wait for the copies out of the oldest
            else:
                buf = StagingBuffer()
                self.lanes[lane].append(buf)
            buf.held = True
        if buf.event is not None:
            buf.event.synchronize()  # a blocking event: the thread sleeps, no core spins
            buf.event = None
        if buf.memory.numel() < nbytes:
            buf.memory = buf.data = None  # the smaller one goes first: never both at once
            buf.memory = host_buffer(nbytes, self.pin)
            if self.ledger is not None:
                self.ledger.track(buf.memory, "cpu", nbytes)  # until a larger one replaces it
        buf.data = buf.memory[:nbytes]
        return buf

    def release(self, buf: StagingBuffer, gpu: torch.device | None) -> None:
        """Give the buffer back; `gpu`: the device whose current stream (this thread's) has copies queued that
        still read it, so the next take() waits for them; None after host copies, or a synchronized one."""
        event = None
        if gpu is not None and gpu.type == "cuda" and self.pin:
            event = torch.cuda.Event(blocking=True)
            event.record(torch.cuda.current_stream(gpu))
        with self.lock:
            buf.event, buf.held = event, False

    def write_out(self, lane: str, file: DiskFile, src: torch.Tensor, offset: int = 0) -> None:
        """Write `src` to `file` at `offset`; from a GPU through a buffer of `lane`: one copy on this thread's
        current stream, waited for here (run it on an I/O thread), then the file write."""
        if not src.is_cuda:
            file.write(src, offset)
            return
        buf = self.take(lane, src.numel() * src.element_size())
        host = buf.data.view(src.dtype).view(src.shape)
        host.copy_(src, non_blocking=True)
        done = torch.cuda.Event(blocking=True)
        done.record(torch.cuda.current_stream(src.device))
        done.synchronize()
        file.write(host, offset)
        self.release(buf, None)


@dataclass(eq=False)
class StagingBuffer:
    memory: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    data: torch.Tensor | None = None
    event: object = None  # a CUDA event: copies out of `memory` queued before it
    held: bool = False
