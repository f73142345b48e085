"""`flexgen-lite run-batch -i requests.jsonl -o results.jsonl`: an OpenAI batch file through the engine.

Each input line is a request (`custom_id`, `method`, `url`, `body`); each output line is its answer in the
OpenAI batch output format, in the order requests finish. A bad line gets an error line and the job goes on.
Requests (whatever their max_tokens, seeds, sampling and stop conditions) are sorted by length into the engine's
blocks; results are appended and flushed after each group of blocks through the resumable output of
`generate --output` (its lines carry the input line's index and hash), so a rerun after Ctrl-C or kill -9 does only
the requests not answered yet.
"""

from __future__ import annotations

import itertools
import json
import sys
import time

from ..cli.batch_io import InputError, Prompt, ResumableOutput
from ..openai_api.batch_lines import (
    answer_line,
    check_request,
    check_unique_ids,
    job_policy,
    model_path,
    plan_chunks,
    read_lines,
    served_model,
)
from ..openai_api.requests import Work


def cmd_run_batch(args, progress, run=None) -> None:
    """`run(args, model, lines, works, output, progress)` answers the checked requests (default: here, in this
    process; `run-batch --ray`: ray.run_batch_ray.run_on_ray)."""
    lines = read_lines(args.input)
    if not lines:
        raise InputError(f"-i {args.input} holds no requests")
    check_unique_ids(lines)
    output = ResumableOutput(args.output, lines, flag="-o")
    try:
        model = _check_record(args, output)
        todo = [i for i in range(len(lines)) if i not in output.done]
        if output.repaired:
            print(f"{args.output}: dropped a last line cut short (an interrupted write); that request is redone",
                  file=sys.stderr)
        if output.retried:
            print(f"{args.output}: dropped the error lines of {output.retried} refused requests; they are tried again",
                  file=sys.stderr)
        if not todo:
            print(f"all {len(lines)} requests already answered in {args.output}: nothing to do", file=sys.stderr)
            return
        if len(todo) < len(lines):
            print(f"resuming: {len(lines) - len(todo)} of {len(lines)} requests already answered in {args.output}",
                  file=sys.stderr)
        model, works = check_lines(args, lines, todo, output, model)
        if not works:
            return
        (run or _run)(args, model, lines, works, output, progress)
    finally:
        output.close()


def _check_record(args, output: ResumableOutput) -> str:
    """The model; a rerun with another model or --served-model-name than the file's record is refused before the
    model loads, and adopts the first run's numeric policy choices (cli/run_record.py)."""
    from .. import __version__
    from ..cli.run_record import check_and_adopt, model_identity

    model = model_path(args)
    identity, settings = model_identity(model), {"served_model_name": args.served_model_name}
    if output.done and not output.recorded:
        print(f"{output.path} does not record what made it (an older flexgen-lite): the model is not checked",
              file=sys.stderr)
        return model
    for note in check_and_adopt(output.recorded, identity, settings, {"served_model_name": "--served-model-name"},
                                args, f"-o {output.path}", args.force_resume):
        print(note, file=sys.stderr)
    output.record_run({"version": __version__, "model": identity, "settings": settings})
    return model


def check_lines(args, lines: list[Prompt], todo: list[int], output: ResumableOutput,
                model: str | None = None) -> tuple[str, dict[int, Work]]:
    """(the model, {line index: checked work}); bad lines are answered here, before any model loads. A job
    whose every request is refused ends in an error (exit 2): most likely the wrong file."""
    model, served = served_model(args, model)
    works, errors, first = {}, 0, None
    for i in todo:  # bad lines are answered before the model loads
        custom_id, checked = check_request(lines[i].text, served, lines[i].where)
        if isinstance(checked, Work):
            works[i] = checked
        else:
            output.write_record(i, lines[i].text, checked)
            errors += 1
            first = first or (lines[i].where, checked)
    output.flush()
    if errors and not works:
        where, line = first
        message = (line.get("error") or line["response"]["body"]["error"])["message"]
        raise InputError(f"all {errors} requests of -i {args.input} were refused (error lines written to "
                         f"{args.output}); the first, at {where}: {message}")
    if errors:
        print(f"{errors} of {len(todo)} requests refused (error lines written to {args.output})", file=sys.stderr)
    return model, works


def _run(args, model: str, lines: list[Prompt], works: dict[int, Work], output: ResumableOutput, progress) -> None:
    from ..cli.options import Overall, budgets_from_args, end_progress
    from ..cli.run_record import policy_record
    from ..generation import FlexGenLite
    from ..openai_api.runner import run_jobs

    policy, workload = job_policy(args, works)
    overall = Overall(None if args.no_progress else progress, len(works), "requests")
    with FlexGenLite(model, policy=policy, device=args.device, progress=overall.engine, workload=workload,
                     budgets=budgets_from_args(args)) as m:
        end_progress()
        output.record_run({"policy": policy_record(m.policy, str(m.dtype).removeprefix("torch."))})
        output.flush()
        custom_ids = {i: json.loads(lines[i].text)["custom_id"] for i in works}
        tokens, tic = 0, time.perf_counter()
        overall.start()
        for chunk in plan_chunks(works, m.policy.block_size * 4):
            line_of = [i for i in chunk for _ in works[i].jobs]  # job -> its request's line
            starts = itertools.accumulate((len(works[i].jobs) for i in chunk), initial=0)
            first = dict(zip(chunk, starts, strict=False))  # starts has one more: the chunk's end
            left, got = {i: len(works[i].jobs) for i in chunk}, {}

            def answered(j: int, out, line_of=line_of, first=first, left=left, got=got) -> None:
                """A request's line is written (and flushed) once all its choices are done: a kill loses at most
                the engine's running block."""
                nonlocal tokens
                i = line_of[j]
                got[j], left[i] = out, left[i] - 1
                if left[i]:
                    return
                mine = [got.pop(k) for k in range(first[i], first[i] + len(works[i].jobs))]
                output.write_record(i, lines[i].text, answer_line(custom_ids[i], works[i], mine))
                output.flush()
                tokens += sum(len(o.token_ids) for o in mine)
                overall.advance()

            run_jobs(m, [j for i in chunk for j in works[i].jobs], on_output=answered)
        elapsed = time.perf_counter() - tic
        end_progress()
        print(f"{tokens} tokens for {len(works)} requests in {elapsed:.1f} s: {tokens / elapsed:.1f} tok/s "
              f"({m.policy.flags()})", file=sys.stderr)
