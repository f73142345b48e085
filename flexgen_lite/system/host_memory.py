"""Host memory that crosses the link to a GPU: page-locked at its exact size, allocated once.

torch's pinned allocator rounds each request up to a power of two and caches what is freed (an 86 MiB
weight takes 128 MiB), so a plan that counts exact bytes could be off by up to 2x. Here a buffer is
anonymous memory (page-aligned, returned to the OS when its last view goes) that CUDA page-locks in
place (cudaHostRegister); an arena is one such buffer handing out aligned views, so what the ledger
counts is what is taken. Without CUDA (pin=False) the same code hands out plain memory.
"""

from __future__ import annotations

import ctypes
import mmap
import warnings
import weakref

import torch

ALIGN = 64  # bytes: each view of an arena starts on a cache line (copies need no more)


def padded(nbytes: int) -> int:
    """Bytes a view of `nbytes` takes in an arena."""
    return -(-nbytes // ALIGN) * ALIGN


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """`nbytes` of zeroed host memory as a flat uint8 tensor, page-aligned; page-locked in place if `pin`.
    Registration ends with the tensor's storage (all views of it)."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    buf = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)
    if pin:
        err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 1))  # 1: portable, as torch does
        if err == 0:
            weakref.finalize(buf.untyped_storage(), _unregister, buf.data_ptr())
        elif clear_cuda_error():  # still correct, only slower: copies go through the driver's own staging
            warnings.warn(f"could not page-lock {nbytes / 2**30:.2f} GiB of host memory for the GPU (cudaError "
                          f"{err}); using it unlocked, at pageable copy speed", RuntimeWarning, stacklevel=2)
        else:
            raise MemoryError(f"could not page-lock {nbytes / 2**30:.2f} GiB of host memory for the GPU (cudaError "
                              f"{err}): lower the policy's cpu share, or pass --no-pin-weight for the weights")
    return buf


def clear_cuda_error() -> bool:
    """Reset this thread's last CUDA runtime error (or the next kernel launch's check reports it as its own).
    torch.cuda.cudart() does not offer cudaGetLastError: call it in the libcudart torch loaded. False when
    that library is not found (a static runtime)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart" in line}
    except OSError:
        paths = set()
    for path in sorted(paths):  # another copy of the library would have its own error state: not that
        try:
            ctypes.CDLL(path).cudaGetLastError()
            return True
        except (OSError, AttributeError):
            continue
    return False


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class HostArena:
    """One host buffer of a known total, cut into aligned views in the order they are taken."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.buffer = host_buffer(nbytes, pin)
        self.nbytes, self.used = nbytes, 0

    def take(self, nbytes: int) -> torch.Tensor:
        """The next `nbytes` of the arena (uint8, starting on an ALIGN boundary)."""
        if self.used + nbytes > self.nbytes:
            raise MemoryError(f"host arena of {self.nbytes} bytes has {self.nbytes - self.used} left, "
                              f"{nbytes} asked: its size was planned wrong")
        view = self.buffer[self.used:self.used + nbytes]
        self.used += padded(nbytes)
        return view

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A view of `shape` and `dtype` taken from the arena."""
        return self.take(torch.Size(shape).numel() * dtype.itemsize).view(dtype).view(shape)
