"""Memory budgets: the most each tier may hold, and checking a plan against them (and against what is
free) before anything is allocated."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.policy import Policy, PolicyError
from ..system.devices import ComputeDevice
from ..system.memory import free_bytes, gib, mib_up

SAFETY = 0.85  # default budgets leave this share of what is free: other processes, the page cache, slack
BUDGET_FLAGS = {"gpu": "--gpu-mem", "cpu": "--cpu-mem", "disk": "--disk-mem"}


def beyond_this_machine(peak: dict[str, float], device: ComputeDevice, offload_dir: str) -> list[str]:
    """A line for each tier whose planned peak is more than this machine has free (budgets given for another
    machine: the plan stands for that one, a run here would be refused)."""
    free = free_bytes(device, offload_dir)
    needs = dict(peak) if device.is_cuda else {"cpu": peak["cpu"], "disk": peak["disk"]}  # cpu: all host RAM
    names = {"gpu": "GPU memory", "cpu": "host RAM", "disk": f"disk ({offload_dir or 'system temp'})"}
    return [f"note: this plan peaks at {gib(need)} of {names[tier]}, where this machine has {gib(free[tier])} free: "
            "it is for a machine with the budgets given, and would not fit here"
            for tier, need in needs.items() if need > free[tier]]


def check_fits(needs: dict[str, int], device: ComputeDevice, offload_dir: str, what: str) -> None:
    """Raise PolicyError naming the tier, the need and the room when `needs` (bytes per tier) cannot fit."""
    free = free_bytes(device, offload_dir)
    if not device.is_cuda:  # one pool of host RAM for both
        needs = {"gpu": 0, "cpu": needs["gpu"] + needs["cpu"], "disk": needs["disk"]}
    advice = {
        "gpu": "lower the gpu percentages or the batch size (--percent, --gpu-batch-size)",
        "cpu": "move more to disk (lower the cpu percentages of --percent) or lower the batch size",
        "disk": "free disk space, point --offload-dir at a larger disk, or keep more in memory",
    }
    if not device.is_cuda:
        advice["cpu"] = "move more to disk (lower the gpu and cpu percentages of --percent) or lower the batch size"
    for tier, need in needs.items():
        if need > free[tier]:
            where = f"the {tier} tier"
            if tier == "cpu" and not device.is_cuda:
                where = "the gpu + cpu tiers (both host RAM without CUDA)"
            raise PolicyError(
                f"{what} needs {gib(need)} on {where} but only {gib(free[tier])} is free ({gib(need - free[tier])} "
                f"missing): {advice[tier]}"
            )


@dataclass(frozen=True)
class Budgets:
    """Most bytes the engine may take per tier (None: what is free now, times SAFETY).

    gpu: compute-device memory; without CUDA the compute tier's share of host RAM (no cap when None).
    cpu: all host RAM the engine takes, the compute tier's included when there is no GPU.
    disk: offload files."""

    gpu: int | None = None
    cpu: int | None = None
    disk: int | None = None
    taken_off: tuple[tuple[str, int], ...] = ()  # (tier, bytes): the runtime's share taken off the user's figure

    def __post_init__(self) -> None:
        for tier in ("gpu", "cpu", "disk"):
            value = getattr(self, tier)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or
                                      not 0 <= value < float("inf")):
                raise PolicyError(f"the {tier} budget must be a number of bytes, 0 or more, got {value!r}")

    def resolved(self, device: ComputeDevice, offload_dir: str) -> Budgets:
        free = free_bytes(device, offload_dir)
        gpu = self.gpu if self.gpu is not None or not device.is_cuda else int(free["gpu"] * SAFETY)
        return Budgets(gpu, self.cpu if self.cpu is not None else int(free["cpu"] * SAFETY),
                       self.disk if self.disk is not None else int(free["disk"] * SAFETY), self.taken_off)

    def of(self, tier: str) -> str:
        """A tier's budget as the user can read it: the figure given, less the runtime's share where taken off."""
        budget, runtime = getattr(self, tier), dict(self.taken_off).get(tier)
        if budget is None or not runtime:
            return gib(budget) if budget is not None else "?"
        return f"{gib(budget)} ({BUDGET_FLAGS[tier]} {gib(budget + runtime)} less {gib(runtime)} of runtime)"

    def describe(self, device_is_cuda: bool) -> str:
        gpu = "no cap (shares host RAM)" if self.gpu is None else self.of("gpu")
        host = "host RAM" if device_is_cuda else "host RAM, compute tier included"
        return f"gpu {gpu}, cpu {self.of('cpu')} ({host}), disk {self.of('disk')}"


def over_budget(peak: dict[str, float], budgets: Budgets) -> dict[str, tuple[float, float]]:
    """{tier: (need, budget)} for every tier whose peak exceeds its budget."""
    out = {}
    for tier in ("gpu", "cpu", "disk"):
        budget = getattr(budgets, tier)
        if budget is not None and peak[tier] > budget:
            out[tier] = (peak[tier], budget)
    return out


def largest_parts(plan: dict[str, dict[str, float]], tier: str, cuda: bool, count: int = 3) -> str:
    """A tier's largest planned parts, 'name size, ...', in the phase that sets its peak (host RAM: the run, or
    loading the weights, whose transient is "load"; on a CPU with the compute tier's parts)."""
    parts = {k: v for k, v in plan[tier].items() if k != "load"}
    if tier == "cpu" and not cuda:  # host RAM holds the compute tier too
        parts.update({f"{k} (compute tier)": v for k, v in plan["gpu"].items() if k != "load"})
    loading = {k: parts[k] for k in ("weights", "reserve", "weights (compute tier)") if k in parts}
    loading["load"] = plan[tier].get("load", 0)
    if tier == "cpu" and sum(loading.values()) > sum(parts.values()):  # loading the weights sets the peak
        parts = loading
    top = sorted(((v, k) for k, v in parts.items() if v), reverse=True)[:count]
    return ", ".join(f"{k} {gib(v)}" for v, k in top)


def check_budgets(peak: dict[str, float], plan: dict[str, dict[str, float]], budgets: Budgets, cuda: bool,
                  what: str, searched: bool = False, policy: Policy | None = None) -> None:
    """Raise PolicyError naming each tier over its budget, by how much, its largest parts, and what would make
    it fit (searched: the policy is --policy auto's, which cannot be asked for again; `policy`: the one planned,
    whose remedies already taken are not offered)."""
    over = over_budget(peak, budgets)
    if not over:
        return
    lines = []
    for tier, (need, budget) in over.items():
        given = need + dict(budgets.taken_off).get(tier, 0)  # what the flag would have to say
        lines.append(f"{tier} needs {gib(need)} but its budget is {budgets.of(tier)}: {gib(need - budget)} missing "
                     f"(largest: {largest_parts(plan, tier, cuda)}); {BUDGET_FLAGS[tier]} {gib(need - budget)} "
                     f"larger would fit it ({BUDGET_FLAGS[tier]} {mib_up(given)})")
    remedy = ", ".join(_remedies(policy, disk_only="disk" in over and len(over) == 1))
    raise PolicyError(f"{what} exceeds the memory budgets: " + "; ".join(lines) + f". {remedy[0].upper()}{remedy[1:]}"
                      + ", raise the budget"
                      + (", or shorten the prompts" if searched else ", or use --policy auto"))


def _remedies(policy: Policy | None, disk_only: bool) -> list[str]:
    """What would lower a policy's peaks, less what it already does (everything on disk, one row, compressed)."""
    flags = [f for f, on in (("--compress-weight", policy and policy.compress_weight),
                             ("--compress-cache", policy and policy.compress_cache)) if not on]
    compress = [f"compress ({', '.join(flags)})"] if flags else []
    if disk_only:
        return ["keep more in memory (--percent)", *compress]
    on_disk = policy is not None and all(policy.percents(kind)[2] == 100 for kind in ("weight", "cache", "act"))
    return ([] if policy is not None and policy.block_size == 1 else ["lower the batch size"]) \
        + ([] if on_disk else ["move more to disk (--percent)"]) + compress
