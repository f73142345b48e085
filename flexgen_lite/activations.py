"""Hidden states between layers, one per GPU batch, each batch homed on a tier by the activation percents."""

from __future__ import annotations

import torch

from .devices import ComputeDevice
from .policy import split_counts
from .storage import DiskFile, DiskStore, MemoryLedger


class Activations:
    def __init__(self, num_batches: int, percents, device: ComputeDevice, disk: DiskStore,
                 ledger: MemoryLedger) -> None:
        gpu, cpu, _ = split_counts(num_batches, percents)
        self.tiers = ["gpu"] * gpu + ["cpu"] * (num_batches - gpu)
        self.tiers[gpu + cpu:] = ["disk"] * (num_batches - gpu - cpu)
        self.device, self.disk, self.ledger = device, disk, ledger
        self.held: dict[int, torch.Tensor] = {}
        self.files: dict[int, DiskFile] = {}
        self.shapes: dict[int, tuple] = {}

    def put(self, batch: int, h: torch.Tensor) -> None:
        tier = self.tiers[batch]
        if tier == "gpu" or (tier == "cpu" and not self.device.is_cuda):
            self.held[batch] = h  # already where it lives
        elif tier == "cpu":
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
        if self.tiers[batch] != "disk":
            return self.held.pop(batch).to(self.device.device, non_blocking=True)
        shape, dtype = self.shapes[batch]
        return self.files[batch].read_into(torch.empty(shape, dtype=dtype)).to(self.device.device)
