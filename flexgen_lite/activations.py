"""Hidden states between layers, one per GPU batch, each batch homed on a tier by the activation percents."""

from __future__ import annotations

import torch

from .devices import ComputeDevice
from .policy import split_counts
from .storage import DiskFile, DiskStore, MemoryLedger
from .trace import ACT_LOAD, ACT_STORE, COMPUTE_LANE, NULL


class Activations:
    def __init__(self, num_batches: int, percents, device: ComputeDevice, disk: DiskStore,
                 ledger: MemoryLedger, trace=NULL) -> None:
        """trace: gets a span per hidden state moved to or from its tier (in the compute thread)."""
        gpu, cpu, _ = split_counts(num_batches, percents)
        self.tiers = ["gpu"] * gpu + ["cpu"] * (num_batches - gpu)
        self.tiers[gpu + cpu:] = ["disk"] * (num_batches - gpu - cpu)
        self.device, self.disk, self.ledger, self.trace = device, disk, ledger, trace
        self.held: dict[int, torch.Tensor] = {}
        self.files: dict[int, DiskFile] = {}
        self.shapes: dict[int, tuple] = {}

    def put(self, batch: int, h: torch.Tensor) -> None:
        tier = self.tiers[batch]
        if tier == "gpu" or (tier == "cpu" and not self.device.is_cuda):
            self.held[batch] = h  # already where it lives
            return
        with self.trace.span(ACT_STORE[tier], h.numel() * h.element_size(), stream=COMPUTE_LANE):
            self._put(batch, tier, h)

    def _put(self, batch: int, tier: str, h: torch.Tensor) -> None:
        if tier == "cpu":
            self.held[batch] = h.to("cpu")
        else:
            nbytes = h.numel() * h.element_size()
            f = self.files.get(batch)
            if f is None or f.nbytes < nbytes:
                if f is not None:
                    f.close()
                f = self.disk.create(nbytes, f"act{batch}")  # deleted when these activations are collected
                self.files[batch] = f
                self.ledger.track(f, "disk", nbytes)
            f.write(h.cpu().contiguous())
            self.shapes[batch] = (h.shape, h.dtype)

    def get(self, batch: int) -> torch.Tensor:
        tier = self.tiers[batch]
        if tier == "gpu" or (tier == "cpu" and not self.device.is_cuda):
            return self.held.pop(batch)
        if tier == "cpu":
            h = self.held.pop(batch)
            with self.trace.span(ACT_LOAD[tier], h.numel() * h.element_size(), stream=COMPUTE_LANE):
                return h.to(self.device.device, non_blocking=True)
        shape, dtype = self.shapes[batch]
        with self.trace.span(ACT_LOAD[tier], shape.numel() * dtype.itemsize, stream=COMPUTE_LANE):
            return self.files[batch].read_into(torch.empty(shape, dtype=dtype)).to(self.device.device)
