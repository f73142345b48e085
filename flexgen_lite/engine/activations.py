"""Hidden states between layers, one per GPU batch, each batch homed on a tier by the activation percents.

Across the link the cpu tier is a page-locked buffer per batch (one asynchronous copy each way, in stream
order) and the disk tier a file written from staging on an I/O thread, so compute never waits for either.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch

from ..system.devices import ComputeDevice, IOPool
from ..system.host_memory import host_buffer
from .policy import split_counts
from .storage import DiskFile, DiskStore, MemoryLedger, Staging
from .trace import ACT_LOAD, ACT_STORE, COMPUTE_LANE, NULL


class Activations:
    def __init__(self, num_batches: int, percents, device: ComputeDevice, disk: DiskStore,
                 ledger: MemoryLedger, io: IOPool, staging: Staging, trace=NULL) -> None:
        """trace: gets a span per hidden state moved to or from its tier (in the compute thread)."""
        gpu, cpu, _ = split_counts(num_batches, percents)
        self.tiers = ["gpu"] * gpu + ["cpu"] * (num_batches - gpu)
        self.tiers[gpu + cpu:] = ["disk"] * (num_batches - gpu - cpu)
        self.device, self.disk, self.ledger, self.trace = device, disk, ledger, trace
        self.io, self.staging = io, staging
        self.held: dict[int, torch.Tensor] = {}
        self.buffers: dict[int, torch.Tensor] = {}  # cpu tier across the link: sized by prefill, reused
        self.files: dict[int, DiskFile] = {}
        self.writes: dict[int, Future] = {}
        self.shapes: dict[int, tuple] = {}

    def reset(self) -> Activations:
        """Ready for a new block: what the last one left is dropped (its writes waited for); buffers and
        files stay for reuse."""
        for f in self.writes.values():
            f.exception()  # waits; a failed write of a finished (or failed) block has nothing left to spoil
        self.held.clear()
        self.writes.clear()
        self.shapes.clear()
        return self

    def in_place(self, batch: int) -> bool:
        """Whether batch's hidden state stays where it is computed (put and get hand the same object back)."""
        return self._in_place(self.tiers[batch])

    def _in_place(self, tier: str) -> bool:
        return tier == "gpu" or (tier == "cpu" and not self.device.host_is_separate)

    def put(self, batch: int, h: torch.Tensor) -> None:
        tier = self.tiers[batch]
        if self._in_place(tier):
            self.held[batch] = h  # already where it lives
            return
        self.shapes[batch] = (h.shape, h.dtype)
        nbytes = h.numel() * h.element_size()
        with self.trace.span(ACT_STORE[tier], nbytes, stream=COMPUTE_LANE):
            if tier == "cpu":
                self._host(batch, nbytes).copy_(h, non_blocking=True)
            else:
                h = h.contiguous()  # before the event: the store stream reads what it covers
                file, after = self._file(batch, nbytes), self.device.compute_event()
                self.writes[batch] = self.io.submit(self._write, file, h, after)

    def get(self, batch: int) -> torch.Tensor:
        tier = self.tiers[batch]
        if self._in_place(tier):
            return self.held.pop(batch)
        shape, dtype = self.shapes[batch]
        nbytes = shape.numel() * dtype.itemsize
        with self.trace.span(ACT_LOAD[tier], nbytes, stream=COMPUTE_LANE):
            if tier == "cpu":
                return self._host(batch, nbytes).to(self.device.device, non_blocking=True, copy=True)
            self.writes.pop(batch).result()  # its write is done (and its error raised here)
            if not self.device.host_is_separate:  # a CPU reads it where it computes
                return self.files[batch].read_into(torch.empty(shape, dtype=dtype))
            buf = self.staging.take("act", nbytes)
            host = self.files[batch].read_into(buf.data).view(dtype).view(shape)
            h = host.to(self.device.device, non_blocking=True, copy=True)
            self.staging.release(buf, h.device)
            return h

    def _host(self, batch: int, nbytes: int) -> torch.Tensor:
        """The batch's host buffer, as a tensor of its hidden state's shape."""
        buf = self.buffers.get(batch)
        if buf is None or buf.numel() < nbytes:
            buf = self.buffers[batch] = host_buffer(nbytes, self.device.is_cuda)
            self.ledger.track(buf, "cpu", nbytes)
        shape, dtype = self.shapes[batch]
        return buf[:nbytes].view(dtype).view(shape)

    def _file(self, batch: int, nbytes: int) -> DiskFile:
        f = self.files.get(batch)
        if f is None or f.nbytes < nbytes:
            if batch in self.writes:
                self.writes.pop(batch).result()
            if f is not None:
                f.close()
            f = self.disk.create(nbytes, f"act{batch}")  # deleted when these activations are collected
            self.files[batch] = f
            self.ledger.track(f, "disk", nbytes)
        return f

    def _write(self, file: DiskFile, h: torch.Tensor, after) -> None:
        """On an I/O thread: h (kept alive here until copied) out to its file."""
        with self.device.on_copy_stream(after, "store"):
            self.staging.write_out("act", file, h)
