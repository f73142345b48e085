"""The Batch API's durable state, and the only code that touches its database: uploaded files (kept as files
under the state directory, listed in the database) and batches with their per-request results, in SQLite (WAL).

Results are written one transaction per block of requests, with the batch's counts, so a server killed at any
point restarts with every finished request kept and none recorded twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import BinaryIO

from ..openai_api.protocol import BatchObject, FileObject, RequestCounts, new_id, now

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL,
    status TEXT NOT NULL, created_at INTEGER NOT NULL, in_progress_at INTEGER, finalizing_at INTEGER,
    completed_at INTEGER, failed_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER, expires_at INTEGER,
    expired_at INTEGER,
    output_file_id TEXT, error_file_id TEXT, total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0, metadata TEXT, errors TEXT);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, ok INTEGER NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (batch_id, line));
"""

UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
# which statuses each status may move to
TRANSITIONS = {
    "validating": {"in_progress", "failed", "cancelling", "expired"},
    "in_progress": {"finalizing", "cancelling", "failed", "expired"},
    "cancelling": {"cancelled"},
    "finalizing": {"completed", "failed"},
}


class StateDirBusy(Exception):
    """Another server keeps its state in this directory."""


class Store:
    def __init__(self, state_dir: str) -> None:
        """The state in `state_dir`, owned by this process while it is open (a second server on the same directory
        queued the first one's batches too and failed them: helper-37); files a killed upload left half-written
        are removed."""
        self.dir = Path(state_dir)
        self.files_dir = self.dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._owner = open(self.dir / "server.lock", "a+b")  # noqa: SIM115 - held (locked) until close
        try:
            fcntl.flock(self._owner.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._owner.close()
            raise StateDirBusy(state_dir) from None
        for partial in self.files_dir.glob("*.tmp"):
            partial.unlink(missing_ok=True)
        self._lock = threading.Lock()  # one connection, shared by the HTTP and batch threads
        self._db = sqlite3.connect(self.dir / "batches.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(batches)")}
        if "expired_at" not in columns:  # a state directory from before batches could expire
            self._db.execute("ALTER TABLE batches ADD COLUMN expired_at INTEGER")

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._owner.close()

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _transaction(self, statements: list[tuple[str, tuple]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---- files ---------------------------------------------------------------------------------------
    def add_file(self, filename: str, purpose: str, data: bytes | BinaryIO, replace: bool = False) -> FileObject:
        """Store `data` (bytes, or a binary file object copied in pieces) as a file, written and synced before it
        is listed; `replace`: in the same transaction, unlist the files of the same name and purpose (a batch's
        output that a killed server had written), so that one of them is listed at any time."""
        file_id = new_id("file")
        path = self.file_path(file_id)
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                if isinstance(data, bytes):
                    f.write(data)
                else:
                    shutil.copyfileobj(data, f, 1 << 20)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            os.replace(tmp, path)
        except BaseException:  # a full disk: the part written would hold its space until a restart (helper-37)
            tmp.unlink(missing_ok=True)
            raise
        file = FileObject(id=file_id, bytes=size, created_at=now(), filename=filename, purpose=purpose)
        replaced = self._query("SELECT id FROM files WHERE filename = ? AND purpose = ?",
                               (filename, purpose)) if replace else []
        self._transaction([("DELETE FROM files WHERE id = ?", (r["id"],)) for r in replaced]
                          + [("INSERT INTO files VALUES (?, ?, ?, ?, ?)",
                              (file.id, filename, purpose, file.bytes, file.created_at))])
        for r in replaced:
            self.file_path(r["id"]).unlink(missing_ok=True)
        return file

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def get_file(self, file_id: str) -> FileObject | None:
        rows = self._query("SELECT * FROM files WHERE id = ?", (file_id,))
        return FileObject(**dict(rows[0])) if rows else None

    def list_files(self, purpose: str | None, after: str | None, limit: int,
                   newest_first: bool = True) -> tuple[list[FileObject], bool] | None:
        """Files (of `purpose`, if given) in upload order or its reverse, starting after the file `after`; and
        whether there are more. None where `after` is no file."""
        rows = self._page("files", "(? IS NULL OR purpose = ?)", (purpose, purpose), after, limit, newest_first)
        return None if rows is None else ([FileObject(**dict(r)) for r in rows[:limit]], len(rows) > limit)

    def delete_file(self, file_id: str) -> bool:
        if self.get_file(file_id) is None:
            return False
        self._transaction([("DELETE FROM files WHERE id = ?", (file_id,))])
        self.file_path(file_id).unlink(missing_ok=True)
        return True

    # ---- batches -------------------------------------------------------------------------------------
    def create_batch(self, input_file_id: str, endpoint: str, window: str, metadata: dict | None,
                     expires_in: int = 24 * 3600) -> BatchObject:
        batch_id, created = new_id("batch"), now()
        self._transaction([("INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, created_at, "
                            "expires_at, metadata) VALUES (?, ?, ?, ?, 'validating', ?, ?, ?)",
                            (batch_id, endpoint, input_file_id, window, created, created + expires_in,
                             json.dumps(metadata) if metadata else None))])
        return self.get_batch(batch_id)

    def get_batch(self, batch_id: str) -> BatchObject | None:
        rows = self._query("SELECT * FROM batches WHERE id = ?", (batch_id,))
        return _batch(rows[0]) if rows else None

    def list_batches(self, after: str | None, limit: int) -> tuple[list[BatchObject], bool] | None:
        """Newest first, starting after the batch `after`; and whether there are more. None where `after` is no
        batch."""
        rows = self._page("batches", "1", (), after, limit, True)
        return None if rows is None else ([_batch(r) for r in rows[:limit]], len(rows) > limit)

    def _page(self, table: str, where: str, args: tuple, after: str | None, limit: int,
              newest_first: bool) -> list[sqlite3.Row] | None:
        """Up to limit + 1 rows of `table` past the row `after` (the extra one: there are more), in the order
        of insertion (rowid) or its reverse; None where `after` is not in the table."""
        start = None
        if after is not None:
            found = self._query(f"SELECT rowid FROM {table} WHERE id = ?", (after,))
            if not found:
                return None
            start = found[0]["rowid"]
        past, order = ("<", "DESC") if newest_first else (">", "ASC")
        return self._query(f"SELECT * FROM {table} WHERE {where} AND (? IS NULL OR rowid {past} ?) "
                           f"ORDER BY rowid {order} LIMIT ?", (*args, start, start, limit + 1))

    def unfinished(self) -> list[str]:
        marks = ",".join("?" * len(UNFINISHED))
        return [r["id"] for r in self._query(f"SELECT id FROM batches WHERE status IN ({marks}) ORDER BY rowid",
                                              UNFINISHED)]

    def move(self, batch_id: str, status: str, **fields) -> BatchObject | None:
        """Move a batch to `status` (stamping `<status>_at`), if its current status allows; else leave it."""
        with self._lock:
            row = self._db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None or status not in TRANSITIONS.get(row["status"], ()):
                return None
            fields = {f"{status}_at": now(), **fields}
            if fields.get("errors") is not None:
                fields["errors"] = json.dumps(fields["errors"])
            sets = ", ".join(f"{k} = ?" for k in fields)
            self._db.execute(f"UPDATE batches SET status = ?, {sets} WHERE id = ?",
                             (status, *fields.values(), batch_id))
        return self.get_batch(batch_id)

    def done_lines(self, batch_id: str) -> set[int]:
        return {r["line"] for r in self._query("SELECT line FROM results WHERE batch_id = ?", (batch_id,))}

    def add_results(self, batch_id: str, results: list[tuple[int, bool, dict]]) -> None:
        """(input line, succeeded, output record) of finished requests, with the batch's counts, in one
        transaction."""
        ok = sum(1 for _, good, _ in results if good)
        self._transaction(
            [("INSERT INTO results VALUES (?, ?, ?, ?)", (batch_id, line, int(good), json.dumps(record)))
             for line, good, record in results]
            + [("UPDATE batches SET completed = completed + ?, failed = failed + ? WHERE id = ?",
                (ok, len(results) - ok, batch_id))])

    def results(self, batch_id: str, ok: bool) -> list[str]:
        """The output (ok) or error records of a batch as JSON lines, in input order."""
        rows = self._query("SELECT record FROM results WHERE batch_id = ? AND ok = ? ORDER BY line",
                           (batch_id, int(ok)))
        return [r["record"] for r in rows]


def _batch(row: sqlite3.Row) -> BatchObject:
    d = dict(row)
    counts = RequestCounts(total=d.pop("total"), completed=d.pop("completed"), failed=d.pop("failed"))
    d["metadata"] = json.loads(d["metadata"]) if d["metadata"] else None
    d["errors"] = json.loads(d["errors"]) if d["errors"] else None
    return BatchObject(**d, request_counts=counts)
