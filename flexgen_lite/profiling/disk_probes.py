"""The offload directory's file system: reads and writes, cold and from the page cache (the weights' and cache's
files read into buffers, beside a GPU or with direct reads), and what a CPU pays to compute on them memory-mapped
in place: faulting a file's pages in and out of the process, and the fault of a mapped page's first write."""

from __future__ import annotations

import mmap
import os
import tempfile
import time

import torch

from ..engine.storage import PAGE, DiskFile, probe_file
from ..system.devices import ComputeDevice
from .probes import MiB, contention, timed


def measure_disk(offload_dir: str, size: int, device: ComputeDevice | None = None) -> dict:
    """Write and read back `size` bytes in the offload file system, cold and from the page cache, into a
    buffer as large as the file (as the engine reads into weight slots, not into a cache-sized buffer);
    and how much dearer page-cache reads get beside compute."""
    parent = offload_dir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    with probe_file(parent, "disk") as path:
        return _read_and_write(path, size, device)


def _read_and_write(path: str, size: int, device: ComputeDevice | None) -> dict:
    chunk = 8 * MiB
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(1 << 16) * (size >> 16))
    view = memoryview(buf)
    chunks = [(off, view[off:off + chunk]) for off in range(0, size, chunk)]
    try:
        method, fd = "O_DIRECT", None
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0))
            os.pwrite(fd, chunks[0][1], 0)  # file systems without O_DIRECT (tmpfs) fail here
        except OSError:
            if fd is not None:
                os.close(fd)
            method, fd = "buffered + fadvise(DONTNEED)", os.open(path, os.O_RDWR)
        if not hasattr(os, "O_DIRECT"):
            method = "buffered + fadvise(DONTNEED)"

        def drop() -> None:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

        def each(io) -> float:
            tic = time.perf_counter()
            for off, part in chunks:
                io(fd, part, off)
            return size / (time.perf_counter() - tic)

        def read(fd, part, off):
            os.preadv(fd, [part], off)

        tic = time.perf_counter()
        each(os.pwrite)
        os.fsync(fd)
        write = size / (time.perf_counter() - tic)
        drop()
        cold = each(read)
        os.close(fd)

        fd = os.open(path, os.O_RDWR)  # buffered: fill the page cache, then time reads from it
        each(read)
        cached_read = each(read)
        cached_write = each(os.pwrite)
        reads = contention(device, 1, lambda: each(read)) if device is not None else 1.0
        drop()
        os.close(fd)
    finally:
        view.release()
        for _, part in chunks:
            part.release()
        buf.close()
    return {"disk_read": cold, "disk_write": write, "cached_read": cached_read, "cached_write": cached_write,
            "disk_method": method, "contention_read": reads}


def mapped_pages(offload_dir: str, size: int) -> dict:
    """A CPU's engine computes on offload files memory-mapped in place (DiskFile.map): per use of a layer's weights
    or cache part, its pages are faulted in from the page cache (`prefetch`, on an I/O thread) and out again
    (`release`), and a cache part's new token first writes a page per row and head. Bytes/s of the two calls over
    `size` bytes in the page cache, and seconds per page first written between them (a write fault)."""
    parent = offload_dir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    with probe_file(parent, "mapped") as path:
        return _mapped(DiskFile(path, size), size)


def _mapped(file: DiskFile, size: int) -> dict:
    try:
        try:
            pages = file.map(torch.uint8, (size,))
        except OSError:  # a file system without shared memory maps: nothing measured, nothing priced
            return {}
        pages.fill_(1)  # every page in the page cache, as the engine's files are after their first write
        file.release()
        nothing = lambda: None  # noqa: E731

        def cycle(writes: int) -> None:
            file.prefetch()
            if writes:
                pages[:writes * PAGE:PAGE] = 2
            file.release()

        mapped = timed(lambda: cycle(0), nothing)
        writes = size // PAGE // 4
        faults = max(0.0, timed(lambda: cycle(writes), nothing) - mapped) / writes
    finally:
        file.close()
    return {"mapped_read": size / mapped, "mapped_write": faults}
