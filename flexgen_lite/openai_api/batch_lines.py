"""The lines of an OpenAI batch file and the answers to them: parsing, checking, grouping into the engine's
blocks. Shared by `run-batch` (serve/run_batch.py), the Batch API (serve/batches.py), the server and Ray (ray/); imports
no door."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from ..cli.batch_io import BOM, InputError, Prompt, read_input_bytes
from .protocol import BatchRequestInput, BatchRequestOutput, BatchResponseData, new_id
from .requests import RequestError, Served, Work, prepare, respond, validation_error


def read_lines(path: str) -> list[Prompt]:
    """The input's non-blank lines, each with where it is (a line of bad UTF-8 is kept, for an error line later);
    a binary file (NUL bytes) is refused whole."""
    data = read_input_bytes(path, "-i", "a batch file (JSON lines)")
    if b"\0" in data:
        line = data[:data.index(b"\0")].count(b"\n") + 1
        raise InputError(f"-i {path} is a binary file (a NUL byte on line {line}), not a batch file: pass JSON lines "
                         "of requests")
    return split_lines(data, "standard input" if path == "-" else path)

class NotUtf8(str):
    """A line whose bytes are not valid UTF-8, decoded with replacement marks (so that it still has a hash to
    resume by): check_request answers it with an error line, never with a completion of the marks."""

    problem: str

def split_lines(data: bytes, name: str) -> list[Prompt]:
    """The non-blank lines of a batch file (less a leading BOM), each with where it is."""
    lines = []
    for number, raw in enumerate(data.removeprefix(BOM).split(b"\n"), start=1):
        text = raw.decode("utf-8", errors="replace").removesuffix("\r")
        if not text.strip():
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            text = NotUtf8(text)
            text.problem = f"{name} line {number} is not valid UTF-8 (byte {e.start + 1}): save the file as UTF-8"
        lines.append(Prompt(text, f"{name} line {number}"))
    return lines

def parse_line(text: str, where: str = "") -> BatchRequestInput:
    """A batch line's request; RequestError (with custom_id when known) for a line that is not one. where: the
    line's place in its file, for the message (helper-44: every bad line read "line 1", the decoder's)."""
    try:
        record = json.loads(text)
    except ValueError as e:
        raise RequestError(400, f"{where or 'the line'} is not valid JSON ({e})", None, "invalid_json") from None
    try:
        return BatchRequestInput.model_validate(record)
    except ValidationError as e:
        error = validation_error(e)
        custom_id = record.get("custom_id") if isinstance(record, dict) else None
        error.custom_id = custom_id if isinstance(custom_id, str) else None  # the output line's is a string or null
        raise error from None

def check_unique_ids(lines: list[Prompt]) -> None:
    seen: dict[str, str] = {}
    for line in lines:
        try:
            custom_id = json.loads(line.text).get("custom_id")
        except (ValueError, AttributeError):
            continue
        if isinstance(custom_id, str):
            if custom_id in seen:
                raise InputError(f"custom_id {custom_id!r} is used at {seen[custom_id]} and at {line.where}: "
                                 "each request needs its own custom_id")
            seen[custom_id] = line.where

def answer_line(custom_id: str, work: Work, outputs) -> dict:
    body = respond(work, outputs).model_dump()
    return BatchRequestOutput(id=new_id("batch_req"), custom_id=custom_id, error=None, response=BatchResponseData(
        status_code=200, request_id=work.id, body=body)).model_dump()

def error_line(custom_id: str | None, error: RequestError, request_level: bool) -> dict:
    """A request the server refused carries its 4xx response; a line that is no request carries `error` only."""
    if request_level:
        response = BatchResponseData(status_code=error.status, request_id=new_id("req"), body=error.body())
        return BatchRequestOutput(id=new_id("batch_req"), custom_id=custom_id, response=response).model_dump()
    return BatchRequestOutput(id=new_id("batch_req"), custom_id=custom_id, response=None,
                              error={"code": error.code, "message": error.message}).model_dump()

def check_request(text: str, served: Served, where: str = "") -> tuple[str | None, Work | dict]:
    """(custom_id, the checked work) or (custom_id, its error line); where: the line's place in its file."""
    if isinstance(text, NotUtf8):
        custom_id = _readable_custom_id(text)
        return custom_id, error_line(custom_id, RequestError(400, text.problem, None, "invalid_utf8"), False)
    try:
        line = parse_line(text, where)
    except RequestError as e:
        return getattr(e, "custom_id", None), error_line(getattr(e, "custom_id", None), e, False)
    try:
        return line.custom_id, prepare(line.url, line.body, served)
    except RequestError as e:
        return line.custom_id, error_line(line.custom_id, e, True)
    except Exception as e:  # a fault of ours on this line alone: its 500, and the job goes on
        error = RequestError(500, f"the server failed on this request: {type(e).__name__}: {e}", None,
                             "server_error", "server_error")
        return line.custom_id, error_line(line.custom_id, error, True)

def _readable_custom_id(text: str) -> str | None:
    """The line's custom_id where the bad bytes left it whole, else None."""
    try:
        custom_id = json.loads(text).get("custom_id")
    except (ValueError, AttributeError):
        return None
    return custom_id if isinstance(custom_id, str) and "\ufffd" not in custom_id else None

def model_path(args) -> str:
    if args.model is not None:
        return args.model
    from ..models.gguf_file import default_model_path

    return default_model_path()

def served_model(args, model: str | None = None) -> tuple[str, Served]:
    from ..model_source import open_model

    model = model or model_path(args)
    config, _, tokenizer = open_model(model)
    name = args.served_model_name or Path(model).name
    return model, Served(name, config, tokenizer)

def plan_chunks(works: dict[int, Work], chunk: int) -> list[list[int]]:
    """Line indices in runs of about `chunk` jobs (their settings may differ), longest prompts first, so each run
    fills the engine's blocks with prompts of like length."""
    chunks, current, size = [], [], 0
    for i in sorted(works, key=lambda i: -max(len(j.ids) for j in works[i].jobs)):
        current.append(i)
        size += len(works[i].jobs)
        if size >= chunk:
            chunks.append(current)
            current, size = [], 0
    return chunks + [current] if current else chunks

def job_policy(args, works: dict[int, Work]):
    """(policy or AutoPolicy, the workload auto plans for) of the flags, for these requests."""
    from ..cli.options import policy_from_args, resolve_share
    from ..planning.layout import Workload
    from ..planning.policy_search import AutoPolicy

    jobs = [j for w in works.values() for j in w.jobs]
    policy = policy_from_args(args, default_batch=min(len(jobs), 32))
    workload = Workload.of_prompts([j.ids for j in jobs], max(j.sampling.max_new_tokens for j in jobs))
    if isinstance(policy, AutoPolicy):
        return policy, workload
    return resolve_share(args, model_path(args), workload, policy), None
