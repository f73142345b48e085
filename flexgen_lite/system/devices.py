"""The compute device and its side streams; the background I/O pool that overlaps transfers with compute."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of returning it to the OS.

    On VMs where fresh pages fault in slowly, re-touching returned memory dominates decode time;
    keeping it makes every step after the first reuse warm pages.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: serve large blocks from the heap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD (a C int: 1 << 40 was masked to 0, trimming every free)
    except (OSError, AttributeError):
        pass


CUDA_LIBRARY_GROWTH = 256 * 2**20  # cuBLAS handles and workspaces, kernels loaded lazily on first use
LINK = "+link"  # "cpu+link": a CPU that keeps its host tiers apart, as a GPU must (tests the GPU's paths)


class ComputeDevice:
    """Where layers run: CUDA when present, else the CPU. Holds the copy streams: one for weight loads, one
    for cache loads (a batch's cache does not queue behind a layer's weights), one for stores to the host.

    `host_is_separate`: the cpu and disk tiers are not compute memory, so what they hold is copied across
    the link before use (CUDA; or "cpu+link", where a CPU makes the same copies to test that logic)."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        link = isinstance(device, str) and device.endswith(LINK)
        self.device = torch.device(device.removesuffix(LINK) if link else device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA device here (a CPU build, or no GPU): leave the "
                             "device out, or give 'cpu'")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda:
            torch.cuda.set_device(self.device)  # what torch calls without a device (graphs, events) means this one
        self.host_is_separate = self.is_cuda or link
        self.copy_streams = {lane: torch.cuda.Stream(self.device) for lane in ("weights", "cache", "store")} \
            if self.is_cuda else {}

    def holds(self, t: torch.Tensor) -> bool:
        """True when `t` can be used by compute without a copy."""
        return t.device.type == self.device.type

    @contextlib.contextmanager
    def on_copy_stream(self, after=None, lane: str = "weights"):
        """Context for copies issued from an I/O thread on the `lane` copy stream, ordered after the compute
        event `after`; yields a function that returns an event marking the copies done."""
        if not self.is_cuda:
            yield lambda: None
            return
        stream = self.copy_streams[lane]
        with torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            def done() -> torch.cuda.Event:
                event = torch.cuda.Event(blocking=True)  # a host thread may wait on it: sleep, not spin
                event.record(stream)
                return event
            yield done

    def compute_event(self):
        """An event marking the compute stream's progress so far (None on CPU: compute is synchronous)."""
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait_for(self, event) -> None:
        """Make compute wait for a copy event (CUDA); nothing to do on CPU."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def runtime_bytes(self) -> int:
        """Device memory this process holds, or will, outside torch's allocator: the CUDA context now (on a
        shared card also other processes' use, which only makes this conservative), and what libraries load
        on first use (CUDA_LIBRARY_GROWTH); 0 on a CPU."""
        if not self.is_cuda:
            return 0
        free, total = torch.cuda.mem_get_info(self.device)  # creates the context first
        return max(0, total - free - torch.cuda.memory_reserved(self.device)) + CUDA_LIBRARY_GROWTH

    def free_memory(self) -> int:
        """Free bytes of compute-device memory (host RAM available on CPU)."""
        if self.is_cuda:
            return torch.cuda.mem_get_info(self.device)[0]
        return host_available_bytes()


def host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class IOPool:
    """Runs transfers in background threads (overlap on) or inline (overlap off).

    Torch copies and file reads release the GIL, so two or three threads overlap I/O with compute.
    """

    def __init__(self, overlap: bool, workers: int = 3) -> None:
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="flexgen-io") if overlap else None

    def submit(self, fn: Callable, *args) -> Future:
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # re-raised by result(), like a pool future
            future.set_exception(e)
        return future

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
