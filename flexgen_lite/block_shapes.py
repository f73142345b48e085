"""Blocks narrower than the policy's, where its block would pass the budgets at a prompt's length.

A block holds the cache of its longest prompt for every row, and the policy was planned for the workload it was
given (a server: its requests' expected lengths). A prompt longer than planned would be refused where the
budgets cannot hold a whole block of it; it runs instead in a block of as many rows as they can hold (fewer GPU
batches, then fewer rows a batch), on an engine of that shape sharing the model's weights. Without budgets, or
where the policy's block fits, nothing changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from .engine.block_schedule import Engine
from .engine.policy import Policy, PolicyError
from .planning.layout import Workload
from .system.memory import return_freed_memory


def narrower(policy: Policy) -> Iterator[Policy]:
    """The policy's shape with fewer rows, widest first: fewer GPU batches, then one batch of fewer rows."""
    for batches in range(policy.num_gpu_batches - 1, 0, -1):
        yield dataclasses.replace(policy, num_gpu_batches=batches)
    for rows in range(policy.gpu_batch_size - 1, 0, -1):
        yield dataclasses.replace(policy, gpu_batch_size=rows, num_gpu_batches=1)


class BlockShapes:
    """The engine of the policy's block shape and of the last narrower one run, one holding its cache at a time."""

    def __init__(self, engine: Engine) -> None:
        self.planned = engine.policy
        self.engines = {self._key(engine.policy): engine}
        self.running = engine

    @staticmethod
    def _key(policy: Policy) -> tuple[int, int]:
        return policy.gpu_batch_size, policy.num_gpu_batches

    def shape_for(self, workload: Workload, rows: int, check: Callable[[Policy, Workload], None]) -> Policy:
        """The planned policy where its block of `workload` passes `check` (which raises PolicyError), else the
        widest narrower one that does, holding no more than `rows` (the block's prompts); where none does, the
        narrowest (running it raises the refusal that says how much more its one row needs)."""
        try:
            check(self.planned, workload)
            return self.planned
        except PolicyError:
            pass
        policy = self.planned
        for policy in narrower(self.planned):
            if policy.block_size > rows:
                continue  # a block this wide would hold rows without prompts
            try:
                check(policy, workload)
                return policy
            except PolicyError:
                continue
        return policy

    def use(self, policy: Policy) -> Engine:
        """The engine of the policy's shape, made (sharing the weights) where new; the engine that ran before
        gives its cache and buffers back first, so that only one shape's are held."""
        key = self._key(policy)
        if self._key(self.running.policy) == key:
            return self.running
        old = self.running
        old.free_cache()
        old.acts = None
        return_freed_memory()
        engine = self.engines.get(key)
        if engine is None:
            for other in [k for k in self.engines if k != self._key(self.planned)]:
                self.engines.pop(other).close()  # the planned shape's engine and one narrower one are kept
            engine = self.engines[key] = Engine(old.config, policy, old.specs, old.weights, old.device, old.dtype,
                                                old.disk, old.ledger, old.trace,
                                                sharing=self.engines[self._key(self.planned)])
        self.running = engine
        return engine

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()
        self.running = None  # nothing of the engines is held: their memory is freed with them
