"""The engine behind a queue, on one worker thread: requests that arrive together share blocks.

The worker takes the oldest waiting request, then waits until no request with its sampling settings has come
for `max_wait_s` (a burst arriving over a slow client is taken whole, up to MAX_WINDOWS windows or MAX_BLOCKS
blocks, so that one run sorts it into blocks by length as offline generation does), and runs them all at once
(one `generate_ids` call) while newer requests queue for the next run. Callers get a Future of their outputs;
a request whose `cancelled()` turns true (its client left, its batch was cancelled) stops at the engine's next
step, and its outputs are None.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

from ..openai_api.requests import Job, Output
from ..openai_api.runner import run_jobs

MAX_WINDOWS = 20  # a burst of requests is waited for while it keeps coming, at most this many windows
MAX_BLOCKS = 8  # or until it fills this many blocks: one run sorts the whole burst into blocks by length


class Scheduler:
    def __init__(self, model, block_size: int, max_wait_s: float) -> None:
        self.model, self.block_size, self.max_wait_s = model, block_size, max_wait_s
        self._cond = threading.Condition()
        self._pending: list[tuple[list[Job], Future, object, object]] = []
        self._closed = False
        self.runs = self.sequences = 0  # engine runs so far, and the sequences they generated
        self.cancelled = 0  # sequences stopped because their request was no longer wanted (queued or running)
        self._thread = threading.Thread(target=self._loop, name="flexgen-lite engine", daemon=True)
        self._thread.start()

    def submit(self, jobs: list[Job], on_tokens=None, cancelled=None) -> Future:
        """Queue a request's jobs; the Future gives their outputs, in order (or the engine's exception).

        on_tokens(k, ids), called on the engine thread after each step: job k's tokens so far.
        cancelled(): the request is no longer wanted (asked on the engine thread before and during its run)."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._pending.append((list(jobs), future, on_tokens, cancelled))
            self._cond.notify()
        return future

    def run(self, jobs: list[Job], cancelled=None) -> list[Output | None]:
        """Submit and wait (for threads other than the worker, e.g. the Batch API's)."""
        return self.submit(jobs, cancelled=cancelled).result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _take(self) -> list[tuple[list[Job], Future, object, object]] | None:
        """The next run: the oldest request and every waiting one with its sampling settings."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            key = self._pending[0][0][0].sampling
            first = time.monotonic()
            deadline, seen = first + self.max_wait_s, 0
            while not self._closed:
                waiting = sum(len(p[0]) for p in self._pending if p[0][0].sampling == key)
                if waiting >= MAX_BLOCKS * self.block_size:
                    break
                now = time.monotonic()
                if waiting > seen:  # still arriving: wait for the rest, up to MAX_WINDOWS windows in all
                    seen, deadline = waiting, min(now + self.max_wait_s, first + MAX_WINDOWS * self.max_wait_s)
                if deadline <= now:
                    break
                self._cond.wait(deadline - now)
            taken = [p for p in self._pending if p[0][0].sampling == key]
            self._pending = [p for p in self._pending if p[0][0].sampling != key]
            return taken

    def _wanted(self, jobs: list[Job], future: Future, report, cancelled) -> bool:
        """Whether a request taken for a run is still wanted: not cancelled by its caller, nor left while it waited
        (then its outputs are None, as those of a request left mid-run, and it never runs)."""
        if not future.set_running_or_notify_cancel():
            return False
        if cancelled is not None and cancelled():
            self.cancelled += len(jobs)
            future.set_result([None] * len(jobs))
            return False
        return True

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            taken = [p for p in taken if self._wanted(*p)]
            if not taken:
                continue
            self.runs += 1
            self.sequences += sum(len(jobs) for jobs, *_ in taken)
            listeners = [(report, k) for jobs, _, report, _ in taken for k in range(len(jobs))]
            gone = [cancelled for jobs, *_, cancelled in taken for _ in jobs]

            def on_tokens(j: int, ids: list[int], listeners=listeners) -> None:
                report, k = listeners[j]
                if report is not None:
                    report(k, ids)

            streaming = any(report is not None for _, _, report, _ in taken)
            cancellable = any(c is not None for c in gone)
            try:
                outputs = run_jobs(self.model, [j for jobs, *_ in taken for j in jobs],
                                   on_tokens if streaming else None,
                                   cancelled=(lambda j, gone=gone: gone[j] is not None and gone[j]())
                                   if cancellable else None)
            except Exception as e:  # the requests of this run fail; the server goes on
                for _, future, *_ in taken:
                    future.set_exception(e)
                continue
            self.cancelled += outputs.count(None)
            for jobs, future, *_ in taken:
                future.set_result(outputs[:len(jobs)])
                outputs = outputs[len(jobs):]
        with self._cond:
            for _, future, *_ in self._pending:
                future.cancel()
