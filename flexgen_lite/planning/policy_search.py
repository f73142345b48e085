"""Choosing a policy: for each candidate (batch shape, switches, regime) a linear program places weights,
KV cache and activations over the tiers to minimise predicted time within the memory budgets (FlexGen's
LP, solved with scipy's HiGHS); the rounded answer is checked against the exact memory model."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np

from ..engine.policy import Policy, PolicyError
from ..models.config import ModelConfig
from ..system.devices import host_available_bytes
from ..system.hardware import HardwareProfile
from ..system.memory import gib
from .budgets import BUDGET_FLAGS, Budgets, largest_parts, over_budget
from .cost_model import Prediction, phase_times, predict
from .dtype_choice import search_options
from .layout import Layout, Regime, Setup, Workload
from .memory_plan import memory_plan, tier_peaks

TOLERANCE = 0.02  # within this of the best, prefer the smaller block
COMPRESSION_GAIN = 1.10  # 4-bit weights or cache are lossy: chosen only when this much faster (or needed)
POWERS = [2**i for i in range(10)]


@dataclass(frozen=True)
class AutoPolicy:
    """policy="auto": `base` gives the settings the search keeps (dtype, overlap, offload_dir, ...);
    fields left None are searched."""

    base: Policy = Policy()
    gpu_batch_size: int | None = None
    num_gpu_batches: int | None = None
    compress_weight: bool | None = None
    compress_cache: bool | None = None
    cpu_cache_compute: bool | None = None
    cpu_attention_percent: float | None = None  # with CPU attention; None: searched (best_cpu_share)
    exact_weights: bool = False  # compressed weights are the source's own 4-bit groups: not a loss (for_source)
    # None: on a CPU both weighed (the I/O thread's page work and hand-offs compete with compute for the cores:
    # where the offload files are in the page cache, off can be faster), on beside a GPU; else base's as given
    overlap: bool | None = None


@dataclass
class SearchResult:
    policy: Policy
    prediction: Prediction
    budgets: Budgets
    page_cache: float
    solved: int  # linear programs solved
    ranked: list[tuple[Policy, Prediction]]  # every feasible candidate, best first
    hardware: HardwareProfile | None = None


def for_source(auto: AutoPolicy, quantized: list[str], stored_groups: bool = False,
               keeps_groups: bool = False) -> AutoPolicy:
    """A GGUF whose decoder matrices are all Q4_0/Q4_1 (`stored_groups`) keeps them as stored when compressed
    (groups of 32): the search weighs 4-bit weights as lossless. Another quantized source (Q8_0, Q4_K_M) is not
    compressed again by the search (a second, lossy rounding): only an explicit compress_weight=True does it, in
    groups of 32 where some of the file's own can be kept (`keeps_groups`: Q4_K)."""
    if stored_groups and auto.base.weight_group_dim == 1 and auto.base.weight_group_size in (0, 32):
        return dataclasses.replace(auto, base=dataclasses.replace(auto.base, weight_group_size=32),
                                   exact_weights=True)
    if keeps_groups and auto.compress_weight and auto.base.weight_group_dim == 1 and auto.base.weight_group_size == 0:
        auto = dataclasses.replace(auto, base=dataclasses.replace(auto.base, weight_group_size=32))
    if quantized and auto.compress_weight is None:
        return dataclasses.replace(auto, compress_weight=False)
    return auto


def search_policy(config: ModelConfig, workload: Workload, hw: HardwareProfile, budgets: Budgets,
                  auto: AutoPolicy | None = None, page_cache: float | None = None) -> SearchResult:
    """The policy with the best predicted throughput whose exact peak memory fits `budgets` (resolved:
    gpu may be None without CUDA). `page_cache`: RAM the kernel can give offload files (default: what is
    free beyond the cpu budget). Where the workload's number of prompts is known, the job's throughput: the first
    writes to the host RAM a plan takes count too (Prediction.setup_s), so that a job of a few blocks does not wait
    on tens of GB of cache it barely uses."""
    auto = auto or AutoPolicy()
    check_context(config, workload)
    if page_cache is None:
        page_cache = max(0.0, host_available_bytes() - (budgets.cpu or 0))
    found: list[tuple[Policy, Prediction]] = []
    solved, best = 0, {False: 0.0, True: 0.0}  # best throughput found, lossless and compressed
    for bound, shape in _by_upper_bound(config, workload, hw, auto):
        lossy = lossy_policy(shape, auto)
        if bound < best[lossy] * (1 - TOLERANCE):
            continue  # cannot come within TOLERANCE of a policy already found
        for regime in _regimes(shape):
            s = Setup(config, workload, shape, hw)
            s.disk_cached = _all_on_disk(s) <= page_cache
            x = _solve(s, regime, budgets)
            solved += 1
            if x is None:
                continue
            policy = _round_to_budgets(s, x, regime, budgets)
            if policy is not None:
                found.append(best_cpu_share(config, workload, policy, hw, page_cache, budgets,
                                            auto.cpu_attention_percent is None))
                best[lossy] = max(best[lossy], found[-1][1].job_throughput)
    if not found:
        raise PolicyError(_nothing_fits(config, workload, hw, budgets, auto))
    found.sort(key=lambda pp: -pp[1].job_throughput)
    policy, prediction = _choose(found, auto)
    return SearchResult(policy, prediction, budgets, page_cache, solved, found, hw)


CPU_SHARES = (100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 0)


def best_cpu_share(config: ModelConfig, workload: Workload, policy: Policy, hw: HardwareProfile,
                   page_cache: float | None = None, budgets: Budgets | None = None,
                   searched: bool = True) -> tuple[Policy, Prediction]:
    """`policy` with the cpu_attention_percent predicted fastest within `budgets` (searched), and its prediction.
    Beside a GPU, CPU attention over host RAM and copies of it across the link read the same cache at once: the
    best share balances the CPU's rate against what the link has left after the weights' loads."""
    options = [policy]
    if searched and hw.is_cuda and policy.cpu_cache_compute:
        rows = Layout.of_policy(Setup(config, workload, policy, hw), policy).cache_rows[1]
        if rows:
            options = [dataclasses.replace(policy, cpu_attention_percent=float(p)) for p in CPU_SHARES]
    best = None
    for option in options:  # from 100 down: the step is the larger of two lanes, one falling and one rising with
        # the share, so the first share no faster than the one before ends the walk; so does one over the budgets
        # (the link's slots only grow)
        found = (option, predict(config, workload, option, hw, math.inf if page_cache is None else page_cache))
        if best is not None and (over_budget(found[1].peak, budgets or Budgets())
                                 or found[1].throughput <= best[1].throughput * (1 + 1e-9)):
            break
        best = found
    return best


def check_context(config: ModelConfig, workload: Workload) -> None:
    """A workload past the model's context is said to be so (the search would report GiB missing)."""
    if workload.prompt_len + workload.gen_len > config.max_positions:
        raise PolicyError(f"prompts of {workload.prompt_len} tokens and {workload.gen_len} new ones exceed the "
                          f"context of {config.name} ({config.context}): shorten the prompts or "
                          "generate fewer tokens")


def lossy_policy(p: Policy, auto: AutoPolicy) -> bool:
    return (p.compress_weight and not auto.exact_weights) or p.compress_cache


def _choose(found: list[tuple[Policy, Prediction]], auto: AutoPolicy) -> tuple[Policy, Prediction]:
    """The fastest, but lossless unless compression gains COMPRESSION_GAIN, and the smallest block within
    TOLERANCE of the fastest (then the least disk, then overlap on: a cold disk's reads hide behind compute)."""
    best = found[0][1].job_throughput
    lossless = [pp for pp in found if not lossy_policy(pp[0], auto)]
    pool = lossless if lossless and lossless[0][1].job_throughput * COMPRESSION_GAIN >= best else found
    top = pool[0][1].job_throughput
    near = [pp for pp in pool if pp[1].job_throughput >= top * (1 - TOLERANCE)]
    return min(near, key=lambda pp: (pp[0].block_size, pp[1].peak["disk"], not pp[0].overlap,
                                     -pp[1].job_throughput))


def _candidates(workload: Workload, hw: HardwareProfile, auto: AutoPolicy):
    cap = 4096 if hw.is_cuda else 1024
    if workload.num_prompts is not None:
        cap = min(cap, 1 << max(0, math.ceil(math.log2(workload.num_prompts))))
    cap = max(cap, (auto.gpu_batch_size or 1) * (auto.num_gpu_batches or 1))  # what was fixed, however few prompts
    sizes = [auto.gpu_batch_size] if auto.gpu_batch_size else [g for g in POWERS if g <= cap]
    counts = [auto.num_gpu_batches] if auto.num_gpu_batches else [n for n in POWERS[:7] if n <= cap]
    choices = [(False, True) if v is None else (v,) for v in (auto.compress_weight, auto.compress_cache)]
    cpu = (False, True) if auto.cpu_cache_compute is None and hw.is_cuda else (bool(auto.cpu_cache_compute),)
    dtypes = search_options(auto.base.dtype, hw)
    overlaps = (True, False) if auto.overlap is None and not hw.is_cuda else (auto.base.overlap,)
    for gbs, nb, cw, cc, cpu_att, dtype, overlap in itertools.product(sizes, counts, *choices, cpu, dtypes,
                                                                      overlaps):
        if gbs * nb <= cap:
            share = (auto.cpu_attention_percent or 100.0) if cpu_att else 100.0
            yield dataclasses.replace(auto.base, gpu_batch_size=gbs, num_gpu_batches=nb, compress_weight=cw,
                                      compress_cache=cc, cpu_cache_compute=cpu_att, cpu_attention_percent=share,
                                      dtype=dtype, overlap=overlap)


def _by_upper_bound(config, workload, hw, auto) -> list[tuple[float, Policy]]:
    """Candidates with the throughput they would reach with everything in compute memory, best first."""
    out = []
    for shape in _candidates(workload, hw, auto):
        s = Setup(config, workload, shape, hw)
        lay = Layout.linear(s, np.array([1.0, 0, 1, 0, 1, 0]))
        t_pre, t_dec = (phase_times(s, lay, prefill).time(shape.overlap) for prefill in (True, False))
        blocks = 1 if workload.num_prompts is None else -(-workload.num_prompts // s.n)
        tokens = (s.n if workload.num_prompts is None else workload.num_prompts) * workload.gen_len
        out.append((tokens / (blocks * (t_pre + (workload.gen_len - 1) * t_dec)), shape))
    return sorted(out, key=lambda bs: -bs[0])


def _regimes(p: Policy) -> list[Regime]:
    return [Regime(False)] if p.compress_cache else [Regime(True), Regime(False)]


def _all_on_disk(s: Setup) -> float:
    """Offload file bytes with every decoder weight and all the KV cache on disk."""
    weights = Layout.linear(s, np.zeros(6)).placed["disk"]
    return weights + s.n * s.seq_layer * s.cached


# ---- the linear program ----------------------------------------------------------------------------------------
def _numbers(s: Setup, x: np.ndarray) -> np.ndarray:
    """Everything the LP needs at placement x: per phase the serial seconds and each segment's wait and
    work; then gpu, host (running), host (loading) and disk bytes."""
    lay = Layout.linear(s, x)
    out = []
    for prefill in (True, False):
        phase = phase_times(s, lay, prefill)
        out.append(phase.serial.wait + phase.serial.work + phase.serial.side)
        for _, seg in phase.segments:
            out += [seg.wait, seg.work, seg.side]
    plan = memory_plan(s, lay)
    gpu = sum(plan["gpu"].values())
    host_run = sum(v for k, v in plan["cpu"].items() if k != "load")
    host_load = plan["cpu"]["weights"] + plan["cpu"]["load"] + plan["cpu"]["reserve"]
    if not s.cuda:
        host_run, host_load = host_run + gpu, host_load + plan["gpu"]["weights"]
    return np.array(out + [gpu, host_run, host_load, sum(plan["disk"].values())])


def _solve(s: Setup, regime: Regime, budgets: Budgets) -> np.ndarray | None:
    """Placement fractions (wg, wc, cg, cc, hg, hc) minimising prefill + (gen-1) decode steps, or None.

    Every number is affine in x within a regime, so its constant and gradient are read off at x = 0 and at
    the unit vectors."""
    from scipy.optimize import linprog

    base = _numbers(s, np.zeros(6))
    grad = np.stack([_numbers(s, np.eye(6)[i]) - base for i in range(6)], axis=1)
    lay0 = Layout.linear(s, np.zeros(6))
    mults = [[m for m, _ in phase_times(s, lay0, prefill).segments] for prefill in (True, False)]
    overlap, n_u = s.policy.overlap, sum(len(m) for m in mults)
    width = 6 + (n_u if overlap else 0)
    c, a_ub, b_ub = np.zeros(width), [], []

    def row(x_part, u_index=None) -> np.ndarray:
        r = np.zeros(width)
        r[:6] = x_part
        if u_index is not None:
            r[u_index] = -1.0
        return r

    k, u = 0, 6
    for phase, weight in enumerate((1.0, float(s.workload.gen_len - 1))):
        c[:6] += weight * grad[k]
        k += 1
        for m in mults[phase]:
            lanes = (k, k + 1, k + 2)  # waits, work, CPU attention on its worker
            k += 3
            if not overlap:
                c[:6] += weight * m * sum(grad[i] for i in lanes)
                continue
            c[u] = weight * m
            for i in lanes:  # u >= that number
                a_ub.append(row(grad[i], u))
                b_ub.append(-base[i])
            u += 1
    for i, limit in enumerate((budgets.gpu, budgets.cpu, budgets.cpu, budgets.disk)):
        if limit is not None:
            a_ub.append(row(grad[k + i]))
            b_ub.append(limit - base[k + i])
    for i in (0, 2, 4):  # gpu + cpu shares <= 1
        a_ub.append(row(np.eye(6)[i] + np.eye(6)[i + 1]))
        b_ub.append(1.0)
    a_eq, b_eq, bounds = [], [], [(0.0, 1.0)] * 6 + [(0.0, None)] * (width - 6)
    if regime.cache_direct and (not s.cuda or s.policy.cpu_cache_compute):  # all in memory attended in place
        a_eq.append(row(np.eye(6)[2] + np.eye(6)[3]))
        b_eq.append(1.0)
    elif regime.cache_direct:
        bounds[2], bounds[3] = (1.0, 1.0), (0.0, 0.0)
    scale = max(1e-12, float(np.abs(c).max()))
    c = c / scale
    c[:6] -= 1e-6  # ties go to memory: a CPU computes on mapped disk pages as fast, but the page cache can go
    res = linprog(c, A_ub=np.array(a_ub), b_ub=np.array(b_ub), A_eq=np.array(a_eq) if a_eq else None,
                  b_eq=np.array(b_eq) if b_eq else None, bounds=bounds, method="highs")
    return np.clip(res.x[:6], 0.0, 1.0) if res.status == 0 else None


# ---- rounding and checking -------------------------------------------------------------------------------------
def _round_to_budgets(s: Setup, x: np.ndarray, regime: Regime, budgets: Budgets) -> Policy | None:
    """Whole percentages near x (the regime kept exact), then 1% at a time moved off any tier over budget."""
    pct = [round(100 * v) for v in x]
    if not s.cuda and budgets.gpu is None:  # one memory: say "gpu" for all of it
        pct = [pct[0] + pct[1], 0, pct[2] + pct[3], 0, pct[4] + pct[5], 0]
    if regime.cache_direct:
        pct[3] = 100 - pct[2] if (not s.cuda or s.policy.cpu_cache_compute) else 0
        pct[2] = 100 - pct[3]
    for i in (0, 2, 4):
        pct[i + 1] = min(pct[i + 1], 100 - pct[i])
    for _ in range(300):
        policy = _with_percents(s.policy, pct)
        setup = Setup(s.config, s.workload, policy, s.hw)
        plan = memory_plan(setup, Layout.of_policy(setup, policy))
        over = over_budget(tier_peaks(plan, s.cuda), budgets)
        if not over:
            return policy
        if "disk" in over:
            return None
        if "gpu" in over:  # compute tier -> cpu tier
            tiers, to_cpu = ["gpu"], True
        else:  # host RAM -> disk; without CUDA host RAM holds the compute tier too
            tiers, to_cpu = (["cpu"] if s.cuda else ["cpu", "gpu"]), False
        sources = [(plan[t][part], (0 if t == "gpu" else 1) + off) for t in tiers
                   for part, off in (("weights", 0), ("kv cache", 2), ("activations", 4))]
        sources = [(b, i) for b, i in sources if pct[i] > 0]
        if not sources:
            return None
        i = max(sources)[1]
        pct[i] -= 1
        if to_cpu:
            pct[i + 1] += 1
    return None


def _with_percents(p: Policy, pct: list[int]) -> Policy:
    names = ("weight_gpu_percent", "weight_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
             "act_gpu_percent", "act_cpu_percent")
    return dataclasses.replace(p, **{n: float(v) for n, v in zip(names, pct, strict=True)})


def _allowed(asked: bool | None) -> tuple[bool, ...]:
    """A compression's settings the search may pick: the one asked for, else both."""
    return (True, False) if asked is None else (asked,)


def _nothing_fits(config: ModelConfig, workload: Workload, hw: HardwareProfile, budgets: Budgets,
                  auto: AutoPolicy) -> str:
    """How much is missing where, for the smallest policy: one sequence, weights and cache on disk."""
    dtype = search_options(auto.base.dtype, hw)[0]
    memory_tiers = ["gpu", "cpu"] if hw.is_cuda else ["cpu"]
    smallest = None
    for weights, cache in itertools.product(_allowed(auto.compress_weight), _allowed(auto.compress_cache)):
        policy = dataclasses.replace(auto.base, dtype=dtype, gpu_batch_size=1, num_gpu_batches=1, weight_gpu_percent=0,
                                     weight_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0,
                                     compress_weight=weights, compress_cache=cache)
        s = Setup(config, workload, policy, hw)
        plan = memory_plan(s, Layout.of_policy(s, policy))
        peak = tier_peaks(plan, hw.is_cuda)
        over = sum(max(0.0, peak[t] - (getattr(budgets, t) or math.inf)) for t in memory_tiers)
        if smallest is None or over < smallest[0]:  # compressed weights are smaller on disk, not always in RAM
            smallest = over, plan, peak  # (their placement rounds a whole matrix at a time)
    _, plan, peak = smallest
    name = config.name.rsplit("/", 1)[-1] or "the model"
    lines = [f"no policy fits {name} (prompt {workload.prompt_len} + gen {workload.gen_len}) within the budgets "
             f"({budgets.describe(hw.is_cuda)})."]
    movable = plan["disk"]["weights"] + plan["disk"]["kv cache"]
    room = sum(max(0.0, (getattr(budgets, t) or 0) - peak[t]) for t in memory_tiers if getattr(budgets, t))
    total_missing = movable - room - (budgets.disk or 0)
    if total_missing > 0:
        lines.append(f"Weights {gib(plan['disk']['weights'])} and the KV cache of one sequence "
                     f"{gib(plan['disk']['kv cache'])} need {gib(total_missing)} more than all tiers give "
                     f"beyond their buffers: raise --disk-mem (or --cpu-mem), or shorten the workload.")
    for tier, (need, budget) in over_budget(peak, budgets).items():
        if tier == "disk":
            continue
        lines.append(f"Even with everything on disk and one sequence, the {tier} tier needs {gib(need)} "
                     f"(largest: {largest_parts(plan, tier, hw.is_cuda)}) but its budget is {budgets.of(tier)}: "
                     f"{gib(need - budget)} missing on {tier} ({BUDGET_FLAGS[tier]} that much larger).")
    smaller = []
    if not auto.base.dtype and dtype == "float32":
        smaller.append("--dtype bfloat16 halves the weights and the cache (the search keeps float32 here because "
                       "this machine's bfloat16 matmuls are slower)")
    if auto.compress_weight is False:
        smaller.append("without --no-compress-weight the weights could be stored in 4 bits")
    if smaller:
        lines.append("Smaller: " + "; ".join(smaller) + ".")
    return " ".join(lines)
