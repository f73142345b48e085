"""`flexgen-lite run-batch -i IN -o OUT --ray [ADDRESS] --replicas N`: the run-batch file job over N replicas of a
local or remote Ray cluster.

The driver reads and checks the file, answers bad lines, and cuts the rest into the chunks run-batch itself runs
(longest prompts first). Each chunk is one row of a Ray Dataset, mapped through the
replicas (`BatchLineReplica`); answers come back as each chunk finishes and are appended and flushed through
run-batch's resumable output, so the output is run-batch's and a rerun answers only what is missing. A replica
whose process dies is restarted by Ray and its chunks are run again; an answer for a line already written is
dropped, so each custom_id is written exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time

import ray
import ray.data

from ..cli.batch_io import Prompt, ResumableOutput
from ..cli.checks import UsageError
from ..engine.policy import Policy
from ..openai_api.batch_lines import job_policy, plan_chunks
from ..openai_api.requests import Work
from ..planning.layout import Workload
from .config import ProcessorConfig
from .processor import map_replicas
from .replica import BatchLineReplica

LOCAL_OBJECT_STORE = 256 * 2**20  # answers are small: leave the RAM to the replicas' models


def connect(address: str) -> bool:
    """Join the Ray cluster at `address` ("local": start one on this machine). True when this call started Ray
    (and so shuts it down); an already initialized Ray is used as it is."""
    why = unreachable(address)
    if why:  # ray.init would wait for its own timeout (a minute) before saying so
        raise UsageError(f"--ray {address}: cannot reach a Ray cluster there ({why}); check the address (the head "
                         "node's host:port, or ray://host:10001 for a client), or pass --ray alone for a Ray on "
                         "this machine")
    if ray.is_initialized():
        return False
    ours = signal.getsignal(signal.SIGTERM)  # ray.init puts its own (a stack dump, then abort) in its place
    try:
        if address == "local":
            ray.init(num_cpus=os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE, include_dashboard=False,
                     logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise UsageError(f"--ray {address}: no Ray cluster to join there ({e}); start one with `ray start --head`, "
                         "or pass --ray alone for a Ray on this machine") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, ours)  # SIGTERM unwinds as Ctrl-C does: answers kept, exit 143
    return True


def unreachable(address: str, timeout: float = 3.0) -> str | None:
    """Why nothing answers at `address` (host:port, or ray://host:port) now; None when something does, or when
    `address` names no port ("local", "auto")."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__
    return None


def replica_shape(replicas: int | None, device: str | None) -> tuple[int, int, int]:
    """(replicas, torch threads and CPUs each, GPUs each) on this cluster: by default one replica per GPU (one if
    there are none), the cluster's CPUs shared out evenly."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    gpu_each = 1 if gpus and device != "cpu" else 0
    replicas = replicas or max(1, gpus)
    if gpu_each and replicas > gpus:
        raise UsageError(f"--replicas {replicas} needs a GPU each; the Ray cluster has {gpus}: ask for at most {gpus} "
                         "(or --device cpu)")
    if replicas > cpus:
        raise UsageError(f"--replicas {replicas} needs a CPU each; the Ray cluster has {cpus}: ask for at most {cpus}")
    return replicas, max(1, cpus // replicas), gpu_each


def job_config(args, model: str, works: dict[int, Work], replicas: int, threads: int, gpus: int) -> ProcessorConfig:
    """The replicas' config; an explicit policy gets run-batch's chunks of 4 blocks, auto chunks of a quarter of
    each replica's share (and plans its blocks for a chunk)."""
    from ..cli.options import budgets_from_args

    policy, workload = job_policy(args, works)
    jobs = sum(len(w.jobs) for w in works.values())
    if isinstance(policy, Policy):
        chunk = 4 * policy.block_size
    else:
        chunk = max(1, -(-jobs // (4 * replicas)))
        workload = Workload(workload.prompt_len, workload.gen_len, chunk)
    return ProcessorConfig(model, policy, budgets_from_args(args), workload, args.device, threads, replicas, gpus,
                           batch_size=chunk, served_model_name=args.served_model_name)


def run_on_ray(args, model: str, lines: list[Prompt], works: dict[int, Work], output: ResumableOutput,
               progress) -> None:
    """Answer `works` (line index: checked request) on the replicas, writing each answer once to `output`."""
    started = connect(args.ray)
    try:
        replicas, threads, gpus = replica_shape(args.replicas, args.device)
        config = job_config(args, model, works, replicas, threads, gpus)
        chunks = plan_chunks(works, config.rows_per_call)
        if len(chunks) < replicas:  # a replica without a chunk would only open the model
            replicas = len(chunks)
            config = dataclasses.replace(config, concurrency=replicas)
        rows = [{"indices": chunk, "lines": [lines[i].text for i in chunk]} for chunk in chunks]
        quiet_ray_data()
        answers = map_replicas(ray.data.from_items(rows, override_num_blocks=len(rows)), BatchLineReplica, config,
                               batch_size=1)
        show = None if args.no_progress else progress
        written: set[int] = set()
        tokens, tic = 0, time.perf_counter()
        for batch in answers.iter_batches(batch_size=None, batch_format="numpy"):
            tokens += write_answers(batch, lines, output, written)
            if show:
                elapsed = time.perf_counter() - tic
                eta = elapsed / len(written) * (len(works) - len(written))
                show(f"{len(written)}/{len(works)} requests on {replicas} replicas, {tokens / elapsed:.1f} tok/s, "
                     f"ETA {eta:.0f} s")
        elapsed = time.perf_counter() - tic
        each = f"{threads} CPU thread(s)" + (f" and {gpus} GPU" if gpus else "")
        from ..cli.options import end_progress

        end_progress()
        print(f"{tokens} tokens for {len(works)} requests in {elapsed:.1f} s: {tokens / elapsed:.1f} tok/s "
              f"({replicas} replica{'s' if replicas > 1 else ''} of {each})", file=sys.stderr)
    finally:
        if started:
            ray.shutdown()


def quiet_ray_data() -> None:
    """Our progress line, not Ray Data's bars and per-dataset log lines."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def write_answers(batch: dict, lines: list[Prompt], output: ResumableOutput, written: set[int]) -> int:
    """Append a finished chunk's answers (those not written before) and flush; the tokens they generated. The
    replicas' policy is recorded with the first (as run-batch records its engine's)."""
    tokens = 0
    if len(batch["index"]):
        output.record_run({"policy": json.loads(batch["policy"][0])})
    for index, record in zip(batch["index"], batch["record"], strict=True):
        index = int(index)
        if index in written:
            continue  # a chunk run again after its replica died: its first answer stands
        answer = json.loads(record)
        output.write_record(index, lines[index].text, answer)
        written.add(index)
        response = answer.get("response") or {}
        tokens += (response.get("body") or {}).get("usage", {}).get("completion_tokens", 0)
    output.flush()
    return tokens
