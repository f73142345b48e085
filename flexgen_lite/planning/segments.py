"""The cost model's unit: seconds of a layer's work split into what the compute path waits on (I/O), what it does
itself, and what a CPU worker does beside a GPU, by resource; and where a host's I/O work lands (beside a GPU it
overlaps compute; on a CPU it competes with compute for the cores)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from .layout import Setup


@dataclass
class Seg:
    """Seconds waited on I/O, seconds of work on the compute path, and seconds of CPU attention on its worker
    beside a GPU (`side`: pending_attention.py); `by` splits them by resource."""

    wait: float = 0.0
    work: float = 0.0
    by: dict = field(default_factory=lambda: defaultdict(float))
    side: float = 0.0

    def add(self, resource: str, seconds: float, waits: bool, side: bool = False) -> None:
        if side:
            self.side += seconds
        elif waits:
            self.wait += seconds
        else:
            self.work += seconds
        self.by[resource] += seconds

    def __add__(self, other: Seg) -> Seg:
        out = Seg(self.wait + other.wait, self.work + other.work, defaultdict(float, self.by), self.side + other.side)
        for k, v in other.by.items():
            out.by[k] += v
        return out

    def time(self, overlap: bool) -> float:
        return max(self.wait, self.work, self.side) if overlap else self.wait + self.work + self.side


def on_host(s: Setup, seg: Seg, resource: str, seconds: float, contention: float | None = None) -> None:
    """Work of an I/O thread on the host: beside a GPU it overlaps compute; on a CPU it competes with compute
    for the cores, at the measured contention (x1 when they share them perfectly)."""
    if s.cuda:
        seg.add(resource, seconds, waits=True)
    else:
        factor = (s.hw.contention if contention is None else contention) if s.policy.overlap else 1.0
        seg.add(resource, seconds * factor, waits=False)


def disk_read(s: Setup, seg: Seg, nbytes: float) -> None:
    """A read by an I/O thread: from the page cache it is a copy by the kernel (CPU work), else a wait."""
    if s.disk_cached:
        on_host(s, seg, "page cache", nbytes / s.hw.cached_read, s.hw.contention_read)
    else:
        seg.add("disk", nbytes / s.hw.disk_read, waits=True)


def mapped_read(s: Setup, seg: Seg, nbytes: float) -> None:
    """Pages of a memory-mapped offload file faulted in by an I/O thread (CPU compute): from the page cache
    they are only mapped (no copy; compute then reads them like RAM), else read from the disk, a wait."""
    if not s.disk_cached:
        seg.add("disk", nbytes / s.hw.disk_read, waits=True)


def mapped_cache(s: Setup, seg: Seg, nbytes: float, writes: float, parts: float) -> None:
    """A CPU's cache parts mapped from offload files, one layer of a decode step: their `nbytes` (pages written
    through the map: 4 KiB each in the page cache) faulted in and out of the process (the I/O thread's, competing
    with compute), `writes` pages first written by the new token, and the engine's own work per part used."""
    mapped_read(s, seg, nbytes)
    hw = s.hw
    if hw.mapped_read:
        on_host(s, seg, "mapped pages", nbytes / hw.mapped_read)
    seg.add("mapped pages", writes * hw.mapped_write + parts * hw.mapped_overheads(s.policy.overlap)[1], waits=False)


def disk_write(s: Setup, seg: Seg, nbytes: float) -> None:
    if s.disk_cached:
        on_host(s, seg, "page cache", nbytes / s.hw.cached_write)
    else:
        seg.add("disk", nbytes / s.hw.disk_write, waits=True)


def cpu_worker(s: Setup) -> bool:
    """Whether the engine attends CPU parts on its worker beside the GPU's work (pending_attention.pipelined: the
    batches' hidden states kept on the GPU, attention without capped scores, overlap on)."""
    return (s.cuda and s.policy.cpu_cache_compute and s.policy.overlap and s.config.attn_softcap is None
            and s.policy.percents("act")[0] == 100)
