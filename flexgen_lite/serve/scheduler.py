"""The engine behind a queue, on one worker thread: requests that arrive together share blocks.

The worker takes the oldest waiting request, then waits until no other has come for `max_wait_s` (a burst arriving
over a slow client is taken whole, up to MAX_WINDOWS windows or MAX_BLOCKS blocks, so that one run sorts it into
blocks by length as offline generation does), and runs them all at once (one `generate_ids` call: their sampling
settings and stop conditions may differ) while newer requests queue for the next run. Callers get a Future of
their outputs; a request whose `cancelled()` turns true (its client left, its batch was cancelled) stops at the
engine's next step, and its outputs are None. Background requests (the Batch API's) run when no other request waits, and
yield to one that comes: their jobs not yet started wait for the next run, so an interactive request waits for
at most the block in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field

from ..openai_api.requests import Job, Output
from ..openai_api.runner import run_jobs

MAX_WINDOWS = 20  # a burst of requests is waited for while it keeps coming, at most this many windows
MAX_BLOCKS = 8  # or until it fills this many blocks: one run sorts the whole burst into blocks by length


class Scheduler:
    def __init__(self, model, block_size: int, max_wait_s: float) -> None:
        self.model, self.block_size, self.max_wait_s = model, block_size, max_wait_s
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._closed = False
        self.runs = self.sequences = 0  # engine runs so far, and the sequences they generated
        self.cancelled = 0  # sequences stopped because their request was no longer wanted (queued or running)
        self._thread = threading.Thread(target=self._loop, name="flexgen-lite engine", daemon=True)
        self._thread.start()

    def submit(self, jobs: list[Job], on_tokens=None, cancelled=None, background: bool = False) -> Future:
        """Queue a request's jobs; the Future gives their outputs, in order (or the engine's exception).

        on_tokens(k, ids), called on the engine thread after each step: job k's tokens so far.
        cancelled(): the request is no longer wanted (asked on the engine thread before and during its run).
        background: run when nothing else waits, its jobs not yet started deferred when something comes."""
        request = _Request(list(jobs), Future(), on_tokens, cancelled, background)
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._pending.append(request)
            self._cond.notify()
        return request.future

    def run(self, jobs: list[Job], cancelled=None, background: bool = False) -> list[Output | None]:
        """Submit and wait (for threads other than the worker, e.g. the Batch API's)."""
        return self.submit(jobs, cancelled=cancelled, background=background).result()

    def _interactive_waiting(self) -> bool:
        return any(not r.background for r in self._pending)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _take(self) -> list[_Request] | None:
        """The next run: the oldest request (not a background one while others wait) and every waiting one of its
        kind (interactive or background; their sampling settings may differ)."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first_request = next((r for r in self._pending if not r.background), self._pending[0])
            background = first_request.background

            def same(r: _Request) -> bool:
                return r.background == background

            first = time.monotonic()
            deadline, seen = first + self.max_wait_s, 0
            while not self._closed:
                waiting = sum(len(r.todo) for r in self._pending if same(r))
                if waiting >= MAX_BLOCKS * self.block_size:
                    break
                now = time.monotonic()
                if waiting > seen:  # still arriving: wait for the rest, up to MAX_WINDOWS windows in all
                    seen, deadline = waiting, min(now + self.max_wait_s, first + MAX_WINDOWS * self.max_wait_s)
                if deadline <= now or (background and self._interactive_waiting()):
                    break
                self._cond.wait(deadline - now)
            taken = [r for r in self._pending if same(r)]
            self._pending = [r for r in self._pending if not same(r)]
            return taken

    def _wanted(self, request: _Request) -> bool:
        """Whether a request taken for a run is still wanted: not cancelled by its caller, nor left while it waited
        (then its outputs are None, as those of a request left mid-run, and it never runs)."""
        if not request.started and not request.future.set_running_or_notify_cancel():
            return False
        request.started = True
        if request.cancelled is not None and request.cancelled():
            self.cancelled += len(request.todo)
            request.future.set_result(request.outputs)
            return False
        return True

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            taken = [r for r in taken if self._wanted(r)]
            if not taken:
                continue
            self.runs += 1
            members = [(r, k) for r in taken for k in r.todo]  # the run's jobs: (request, job index in it)

            def on_tokens(j: int, ids: list[int], members=members) -> None:
                request, k = members[j]
                if request.report is not None:
                    request.report(k, ids)

            def cancelled(j: int, members=members) -> bool:
                gone = members[j][0].cancelled
                return gone is not None and gone()

            background = taken[0].background  # a run is all background or none
            try:
                outputs = run_jobs(self.model, [r.jobs[k] for r, k in members],
                                   on_tokens if any(r.report for r in taken) else None,
                                   cancelled=cancelled if any(r.cancelled for r in taken) else None,
                                   deferred=(lambda j: self._closed or self._interactive_waiting())
                                   if background else None)
            except Exception as e:  # the requests of this run fail; the server goes on
                for request in taken:
                    request.future.set_exception(e)
                continue
            self._settle(taken, members, outputs)
        with self._cond:
            for request in self._pending:  # a request part-run (deferred) is running: it cannot be cancelled
                if not request.future.cancel():
                    request.future.set_exception(CancelledError("the server is shutting down"))

    def _settle(self, taken: list[_Request], members: list, outputs: list) -> None:
        """Give each request of a run its outputs; a background one whose jobs were deferred goes back to the
        front of the queue with them."""
        again = []
        for request in taken:
            request.todo = []
            gone = request.cancelled is not None and request.cancelled()
            for j, (r, k) in enumerate(members):
                if r is not request:
                    continue
                if outputs[j] is None and request.background and not gone:
                    request.todo.append(k)  # deferred, not cancelled
                    continue
                request.outputs[k] = outputs[j]
                self.sequences += 1
                self.cancelled += outputs[j] is None
            if request.todo:
                again.append(request)
            else:
                request.future.set_result(request.outputs)
        with self._cond:
            self._pending[:0] = again


@dataclass(eq=False)
class _Request:
    jobs: list[Job]
    future: Future
    report: Callable | None  # on_tokens(k, ids)
    cancelled: Callable[[], bool] | None
    background: bool = False
    started: bool = False  # its future is running (set once)
    todo: list[int] = field(default_factory=list)  # its jobs still to run
    outputs: list[Output | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.todo = list(range(len(self.jobs)))
        self.outputs = [None] * len(self.jobs)
