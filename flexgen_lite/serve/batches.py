"""The Batch API's worker: runs batches in the background through the server's engine queue, a few blocks of
requests at a time (`chunk` jobs), each chunk's results committed to the store before the next; a cancelled or
expired batch stops at the engine's next step; resumes unfinished batches when the server starts again."""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from concurrent.futures import CancelledError

from ..cli.batch_io import InputError
from ..openai_api.batch_lines import answer_line, check_request, check_unique_ids, error_line, plan_chunks, split_lines
from ..openai_api.protocol import now
from ..openai_api.requests import RequestError, Served, Work
from .store import Store

RETRY_S = 30.0  # a batch whose output files could not be written (a full disk) tries again after this long


class BatchRunner:
    def __init__(self, store: Store, scheduler, served: Served, chunk: int) -> None:
        self.store, self.scheduler, self.served, self.chunk = store, scheduler, served, chunk
        self._queue: queue.Queue = queue.Queue()
        self._stopping = False
        self._cancelled: set[str] = set()  # batches whose requests stop at the engine's next step
        for batch_id in store.unfinished():  # a restarted server picks up where it stopped
            self._queue.put(batch_id)
        self._thread = threading.Thread(target=self._loop, name="flexgen-lite batches", daemon=True)
        self._thread.start()

    def submit(self, batch_id: str) -> None:
        self._queue.put(batch_id)

    def cancel(self, batch_id: str) -> None:
        """The batch's running requests stop at the engine's next step (the store already says "cancelling")."""
        self._cancelled.add(batch_id)

    def stop(self) -> None:
        """Stop after the block in flight; an unfinished batch stays in the store and resumes at the next start."""
        self._stopping = True
        self._queue.put(None)

    def join(self) -> None:
        self._thread.join()

    def _loop(self) -> None:
        while (batch_id := self._queue.get()) is not None:
            try:
                self._process(batch_id)
            except CancelledError:  # the engine queue closed under it: shutting down
                return
            except OSError as e:
                if self.store.get_batch(batch_id).status not in ("finalizing", "cancelling"):
                    self._failed(batch_id, e)
                    continue
                # its results are stored: its files are written again later (a full disk: helper-37's batch
                # stayed finalizing until a restart)
                print(f"batch {batch_id}: its output could not be written ({e.strerror or e}); trying again in "
                      f"{RETRY_S:.0f} s", file=sys.stderr, flush=True)
                retry = threading.Timer(RETRY_S, self._queue.put, (batch_id,))
                retry.daemon = True
                retry.start()
            except Exception as e:
                self._failed(batch_id, e)

    def _failed(self, batch_id: str, e: Exception) -> None:
        traceback.print_exc(file=sys.stderr)
        self.store.move(batch_id, "failed", errors=_errors("server_error", f"the batch failed: {e}"))

    def _process(self, batch_id: str) -> None:
        batch = self.store.get_batch(batch_id)
        if batch.status in ("cancelling", "finalizing"):
            self._finish(batch_id)
            return
        path = self.store.file_path(batch.input_file_id)
        if not path.is_file():
            self.store.move(batch_id, "failed", errors=_errors("file_not_found",
                                                               f"input file {batch.input_file_id} is gone"))
            return
        lines = split_lines(path.read_bytes(), batch.input_file_id)
        if batch.status == "validating":
            try:
                if not lines:
                    raise InputError(f"input file {batch.input_file_id} holds no requests")
                check_unique_ids(lines)
            except InputError as e:
                self.store.move(batch_id, "failed", errors=_errors("invalid_file", str(e)))
                return
            self.store.move(batch_id, "in_progress", total=len(lines))
        done = self.store.done_lines(batch_id)
        works, refused = {}, []
        for i in range(len(lines)):
            if i in done:
                continue
            custom_id, checked = check_request(lines[i].text, self.served, lines[i].where)
            if isinstance(checked, Work) and checked.url != batch.endpoint:
                error = RequestError(400, f"the line's url {checked.url} is not the batch's endpoint "
                                     f"{batch.endpoint}", "url", "invalid_url")
                checked = error_line(custom_id, error, False)
            if isinstance(checked, Work):
                works[i] = (custom_id, checked)
            else:
                refused.append((i, False, checked))
        if refused:
            self.store.add_results(batch_id, refused)
        for n, chunk in enumerate(chunks := plan_chunks({i: w for i, (_, w) in works.items()}, self.chunk)):
            if self._stopping:
                return
            batch = self.store.get_batch(batch_id)
            if batch.status == "cancelling":
                break
            if now() >= batch.expires_at:  # past its completion window: what is left is not run
                self.store.add_results(batch_id, _expired([(i, works[i][0]) for c in chunks[n:] for i in c]))
                self._finish(batch_id, expired=True)
                return
            results = self._run_chunk([(i, *works[i]) for i in chunk], batch_id, batch.expires_at)
            self.store.add_results(batch_id, results)
            if any(line["error"] and line["error"]["code"] == EXPIRED for _, _, line in results):  # mid-run
                self.store.add_results(batch_id, _expired([(i, works[i][0]) for c in chunks[n + 1:] for i in c]))
                self._finish(batch_id, expired=True)
                return
        self._finish(batch_id)

    def _run_chunk(self, chunk: list[tuple[int, str, Work]], batch_id: str,
                   expires_at: int) -> list[tuple[int, bool, dict]]:
        """The chunk's result lines; its requests stopped mid-run by a cancel get none (as those never run), by
        the batch's window passing an expired line."""
        def stopped() -> bool:
            return batch_id in self._cancelled or now() >= expires_at

        try:
            outputs = self.scheduler.run([j for _, _, w in chunk for j in w.jobs], stopped, background=True)
        except CancelledError:
            raise
        except Exception as e:  # these requests fail; the batch goes on
            if self._stopping:  # the engine queue closed under it: left for the next start
                raise CancelledError from e
            error = RequestError(500, f"generation failed: {e}", None, "server_error", "server_error")
            return [(i, False, error_line(custom_id, error, True)) for i, custom_id, _ in chunk]
        results = []
        for i, custom_id, work in chunk:
            mine, outputs = outputs[:len(work.jobs)], outputs[len(work.jobs):]
            if None not in mine:
                results.append((i, True, answer_line(custom_id, work, mine)))
            elif batch_id not in self._cancelled:
                results += _expired([(i, custom_id)])
        return results

    def _finish(self, batch_id: str, expired: bool = False) -> None:
        """Write the output and error files, then mark the batch completed (or cancelled, or expired); a cancel
        that the store took meanwhile ("cancelling") wins, whenever it came. A batch already finalizing (a server
        stopped while writing its files) completes, its files written again in place of any listed before."""
        status = self.store.get_batch(batch_id).status
        final = "cancelled" if status == "cancelling" else "expired" if expired else "completed"
        if final == "completed" and status != "finalizing" and self.store.move(batch_id, "finalizing") is None:
            final = "cancelled"  # cancelled since the status was read
        files = {}
        for ok, field in ((True, "output_file_id"), (False, "error_file_id")):
            records = self.store.results(batch_id, ok)
            if records:
                name = f"{batch_id}_{'output' if ok else 'error'}.jsonl"
                data = "".join(r + "\n" for r in records).encode()
                files[field] = self.store.add_file(name, "batch_output", data, replace=True).id
        if self.store.move(batch_id, final, **files) is None:  # expiring, cancelled since the status was read
            self.store.move(batch_id, "cancelled", **files)
        self._cancelled.discard(batch_id)


EXPIRED = "batch_expired"


def _expired(lines: list[tuple[int, str]]) -> list[tuple[int, bool, dict]]:
    error = RequestError(400, "the batch expired (its completion window passed) before this request ran", None,
                         EXPIRED)
    return [(i, False, error_line(custom_id, error, False)) for i, custom_id in lines]


def _errors(code: str, message: str) -> dict:
    return {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]}
