"""CPU attention beside a GPU that does not hold the GPU up.

Attending a batch's CPU-homed cache parts blocks the thread that runs it for as long as the CPU reads them, and
the GPU, whose work that thread launches, idles meanwhile. So those parts are attended on a worker thread (the C
kernel releases the GIL) while the schedule goes on launching the GPU's work: the other batches' projections and
attention over their GPU parts, the next layer's weights. The batch's hidden state is then a `PendingAttention`,
finished (its parts' outputs joined by row, the output projection) when the next layer takes it.

Only parts attended where they live qualify (`pipelined`): a part read into a slot could have the slot refilled
by a later load while the worker reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_all

import torch


class PendingAttention:
    """A batch's attention whose CPU parts are still being attended: `outs` holds each part's output in row order,
    a tensor on the compute device or a Future; `collect` turns a part's Future into its output there (in the
    schedule's thread: stores, bookkeeping); `then` adds what makes the hidden state of the output."""

    def __init__(self, outs: list, collect: Callable[[Future], torch.Tensor | None]) -> None:
        self.outs, self.collect = outs, collect
        self.finish: Callable[[torch.Tensor], torch.Tensor] = lambda attn: attn

    def then(self, finish: Callable[[torch.Tensor], torch.Tensor]) -> PendingAttention:
        self.finish = finish
        return self

    def wait(self) -> None:
        """Until the worker is done with every part of this batch."""
        wait_all([o for o in self.outs if isinstance(o, Future)])

    def result(self) -> torch.Tensor:
        outs = [o if isinstance(o, torch.Tensor) else self.collect(o) for o in self.outs]
        outs = [o for o in outs if o is not None]
        return self.finish(outs[0] if len(outs) == 1 else torch.cat(outs))


def pipelined(views, overlap: bool, separate: bool, acts_in_place: bool, plain: bool) -> bool:
    """Whether a batch's CPU parts are attended on the worker: beside a GPU (`separate`), with overlap on, the
    batch's hidden state kept where it is computed, attention without capped scores (`plain`: the C kernels take
    sinks, not caps), and every part the CPU attends used where it lives."""
    on_cpu = [v.part for v in views if v.part.on_cpu]
    return (overlap and separate and acts_in_place and plain and bool(on_cpu)
            and all(p.direct and not (p.k.mapped or p.v.mapped) for p in on_cpu))
