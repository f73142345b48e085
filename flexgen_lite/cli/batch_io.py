"""Prompts in from the command line or an --input file; results out to a resumable JSON-lines --output file.

Each output line carries the prompt's index in the input and a hash of its text, so a rerun knows which
prompts are done, repairs a line cut by a kill, and refuses a file written for another input. Lines with a
"flexgen_lite_run" field instead record what made the file (run_record.py). A lock (fcntl) keeps a second
writer off the same file; a write that fails (a full disk) ends in one error line, and the rerun resumes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path


class InputError(ValueError):
    """A prompt or output file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Prompt:
    text: str
    where: str  # "prompts.txt line 31" or "argument 2": how the user finds it


def read_prompts(arguments: list[str], input_path: str | None) -> list[Prompt]:
    """The prompts given as arguments, then those of the input file (one per line, or JSON lines with a
    "prompt" field; blank lines skipped)."""
    prompts = [Prompt(text, f"argument {i + 1}") for i, text in enumerate(arguments)]
    if input_path:
        prompts += _read_input_file(input_path)
    for p in prompts:
        if not p.text.strip():
            raise InputError(f"the prompt at {p.where} is empty: give it some text or remove it")
    return prompts


BOM = "\ufeff".encode()


def read_input_bytes(path: str, flag: str = "--input", what: str = "a file of prompts") -> bytes:
    """The whole input file ("-": standard input), or an InputError that names the flag and says what to pass."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        return data.removeprefix(BOM)  # Windows editors start UTF-8 files with one: not part of the first line
    except FileNotFoundError:
        raise InputError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{flag} {path} is a directory; pass {what}") from None
    except OSError as e:
        raise InputError(f"{flag} {path}: {e.strerror}") from None


def _read_input_file(path: str) -> list[Prompt]:
    data = read_input_bytes(path)
    path = "standard input" if path == "-" else path
    if b"\0" in data:  # helper-44: a binary file that decodes as UTF-8 ran as prompts of NUL characters
        line = data[:data.index(b"\0")].count(b"\n") + 1
        raise InputError(f"{path} is a binary file (a NUL byte on line {line}), not prompts: pass a text file, one "
                         "prompt per line, or JSON lines with a \"prompt\" field")
    prompts, unread = [], {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as e:
            raise InputError(f"{path} line {number} is not valid UTF-8 (byte {e.start + 1}): save the file as "
                             "UTF-8") from None
        if line.strip():
            prompts.append(Prompt(_prompt_of_line(line, path, number, unread), f"{path} line {number}"))
    if unread:  # helper-35: {"prompt": ..., "max_tokens": 3} ran with the default 32 tokens, without a word
        fields = ", ".join(f"{name!r} ({where})" for name, where in unread.items())
        print(f"note: {path}: only each line's \"prompt\" is read, not {fields}: settings come from the flags "
              "(run-batch reads them per request)", file=sys.stderr)
    return prompts


def _prompt_of_line(line: str, path: str, number: int, unread: dict[str, str]) -> str:
    """The line's prompt: the line, or a JSON line's "prompt" (its other fields into `unread`: name -> where
    first seen)."""
    if not line.lstrip().startswith("{"):
        return line
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} line {number} starts with '{{' but is not valid JSON ({e.msg}); a text prompt "
                         "that begins with '{' is given as a JSON line: {\"prompt\": \"...\"}") from None
    prompt = record.get("prompt") if isinstance(record, dict) else None
    if not isinstance(prompt, str):
        raise InputError(f"{path} line {number} has no \"prompt\" string field: write "
                         '{"prompt": "..."} per line, or plain text lines')
    for name in sorted(record.keys() - {"prompt"}):
        unread.setdefault(name, f"line {number}")
    return prompt


def prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


RECORD_START = b'{"index": '
META_KEY = "flexgen_lite_run"  # a line that records what made the file, not a result
META_START = b'{"' + META_KEY.encode() + b'": '


class ResumableOutput:
    """The --output file, locked for this process; knows which prompt indices it already holds."""

    def __init__(self, path: str, prompts: list[Prompt], flag: str = "--output") -> None:
        self.path, self.flag = path, flag
        self.broken = False  # a write failed: the buffered rest is lost (the rerun redoes it)
        self.pending: dict = {}  # run record fields to write before the next result
        self.recorded: dict = {}  # the file's run record (its META_KEY lines, first value of a field kept)
        self.created = not Path(path).exists()  # made by this run: removed again if it ends empty
        self._kept: bytes | None = None  # the file less its refused requests' lines: what it becomes at the first write
        self.locked = False
        self.file = _open_output(path, flag)
        try:
            _lock(self.file, path, flag)
            self.locked = True
            self.repaired, self.done = self._scan(prompts)
        except BaseException:
            self.close()
            raise

    def _scan(self, prompts: list[Prompt]) -> tuple[bool, set[int]]:
        """Indices already answered. A last line cut short by a kill is dropped (truncated away) and redone (one
        whole but for its newline, written by hand or cut just before it, is kept: helper-35); a refused request's
        error line is dropped (when this run first writes) and the request tried again (`retried` counts them); any
        other line that does not match a prompt of this input is an error."""
        self.file.seek(0)
        data = self.file.read()
        *complete, last = data.split(b"\n")  # `last` is empty when the file ends with a newline
        if last and _parse(last) is not None:
            self.file.write(b"\n")  # appended ("a+b")
            self.file.flush()
            complete, last, data = [*complete, last], b"", data + b"\n"
        done, kept, self.retried = set(), [], 0
        for number, raw in enumerate(complete, start=1):
            if not raw.strip():
                continue
            record = _parse(raw)
            if record is not None and isinstance(record.get(META_KEY), dict) and "index" not in record:
                for key, value in record[META_KEY].items():
                    self.recorded.setdefault(key, value)
            elif _refusal(record):  # its request may be fixed since (helper-35: a fix locked the job out)
                self.retried += 1
                continue
            else:
                done.add(self._check_line(record, number, prompts))
            kept.append(raw)
        if last and not any(last[:len(start)] == start[:len(last)] for start in (RECORD_START, META_START)):
            self._check_line(None, len(complete) + 1, prompts)
        if self.retried:  # without the refusals, once this run writes (a run refused before is no change: helper-44)
            self._kept = b"".join(raw + b"\n" for raw in kept)
        elif last:
            self.file.truncate(len(data) - len(last))
        return bool(last), done

    def _replace_with(self, data: bytes) -> None:
        """The file rewritten as `data`: written to PATH.tmp, locked, synced, then renamed over it, so a kill leaves
        the old file or the new one (helper-37: truncated and rewritten in place, a kill between the two left none
        of 19,999 answers)."""
        tmp = f"{self.path}.tmp"
        try:
            new = open(tmp, "w+b")  # noqa: SIM115 - becomes self.file
        except OSError as e:
            self._failed(e)
        try:
            _lock(new, self.path, self.flag)
            os.chmod(tmp, os.stat(self.path).st_mode & 0o7777)
            new.write(data)
            new.flush()
            os.fsync(new.fileno())
            os.replace(tmp, self.path)
        except BaseException as e:
            new.close()
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):
                self._failed(e)
            raise
        self.file.close()
        self.file = new

    def _check_line(self, record: dict | None, number: int, prompts: list[Prompt]) -> int:
        index = record.get("index") if record else None
        if not isinstance(index, int):
            reason = "not a flexgen-lite result line"
        elif not 0 <= index < len(prompts):
            reason = f"a result for prompt {index}, but the input has {len(prompts)} prompts"
        elif record.get("prompt_hash") != prompt_hash(prompts[index].text):
            reason = f"a result for another text than prompt {index} ({prompts[index].where})"
        else:
            return index
        raise InputError(f"{self.flag} {self.path} line {number} does not belong to this input ({reason}): "
                         "choose another --output file, or move this one away")

    def record_run(self, fields: dict) -> None:
        """Record what made this file (model, settings, the engine's numerics) where not recorded yet: one line,
        written before the next result (a run that writes no result leaves the file as it was)."""
        self.pending.update({k: v for k, v in fields.items() if k not in self.recorded})

    def write(self, index: int, prompt: str, text: str, token_ids: list[int]) -> None:
        self._write_result({"index": index, "prompt_hash": prompt_hash(prompt), "prompt": prompt, "text": text,
                          "token_ids": token_ids})

    def write_record(self, index: int, prompt: str, record: dict) -> None:
        """A line of another format (run-batch's OpenAI lines) that resumes the same way: `record`'s fields
        follow the index and prompt hash."""
        self._write_result({"index": index, "prompt_hash": prompt_hash(prompt), **record})

    def _write_result(self, record: dict) -> None:
        if self._kept is not None:
            self._replace_with(self._kept)
            self._kept = None
        lines = [record]
        if self.pending:
            lines.insert(0, {META_KEY: self.pending})
            self.recorded.update(self.pending)
            self.pending = {}
        try:
            self.file.write(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        except OSError as e:
            self._failed(e)

    def flush(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            self._failed(e)

    def _failed(self, e: OSError) -> None:
        self.broken = True
        why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
        raise InputError(f"{self.flag} {self.path}: cannot write results ({why}); what was written is kept: "
                         "make room and rerun the same command to resume") from None

    def close(self) -> None:
        """Flush and unlock; a file this run made and never wrote to (the model failed to load, say) is removed,
        not left behind empty."""
        try:
            if self.created and self.locked and not self.file.closed and self.file.seek(0, 2) == 0:
                Path(self.path).unlink(missing_ok=True)  # while locked: no other run uses it yet
            self.file.close()  # releases the lock (and closes the file even when its last flush fails)
        except OSError as e:
            if not self.broken:  # else the write that failed has said so already
                self._failed(e)


def results_in(path: str) -> int:
    """Whole result lines of a resumable output file: not the run's record lines, nor refused requests' error
    lines (redone on resume: helper-44, 3664 "kept" of which 2000 were errors)."""
    try:
        with open(path, "rb") as f:
            return sum(line.startswith(RECORD_START) and line.endswith(b"\n") and not _refusal(_parse(line))
                       for line in f)
    except OSError:
        return 0


def _refusal(record: dict | None) -> bool:
    """An OpenAI batch line of a refused request (run-batch's error lines): not a result, tried again on resume."""
    if not isinstance(record, dict) or "index" not in record:
        return False
    response = record.get("response")
    status = response.get("status_code", 200) if isinstance(response, dict) else 200
    return record.get("error") is not None or (isinstance(status, int) and status >= 400)


def _parse(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _open_output(path: str, flag: str = "--output"):
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{flag} {path} is a directory; pass a file name, e.g. {p / 'out.jsonl'}")
    if not p.parent.is_dir():
        raise InputError(f"{flag} {path}: the directory {p.parent} does not exist; create it first")
    if p.exists() and not p.is_file():  # a device or a pipe: it can be neither read back nor resumed
        raise InputError(f"{flag} {path} is not a regular file; pass a file name (the output is read back to "
                         "resume)")
    try:
        return open(p, "a+b")  # noqa: SIM115 - kept open (and locked) for the whole run
    except OSError as e:
        raise InputError(f"{flag} {path} cannot be written ({e.strerror or e}); choose a writable path") from None


def _lock(file, path: str, flag: str = "--output") -> None:
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(f"{flag} {path} is being written by another flexgen-lite process; wait for it to "
                         f"finish, or choose another {flag} file") from None
