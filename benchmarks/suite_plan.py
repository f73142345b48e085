"""Time planning of the GPU suite: before a row runs, its wall time is predicted and a row that cannot finish
in what is left of the run is skipped with the reason, never killed half-way.

A row's time = start-up (Python, torch, the CUDA context) + loading (host bytes first touched at
--host-touch-gb-s, else the profile's host_touch: slow on a VM, 0.4-2 GB/s, ~1.8 seen for our OPT-13B row on the
H200; GPU weights at
pageable H2D speed) + a warm-up (a prefill and a step) + prefill + (gen_len - 1) decode steps, the last three
from the cost model (`--predict-rows`, a child with the measured profile) times SLACK. FlexGen's twin: the
same policy through our cost model, times FLEXGEN_SLOWER, plus its own start-up and loading (its dummy
weights written once in place: flexgen_peer.fill_dummy_weights_in_place; host RAM at the same rate, GPU memory
filled on the device). Without a prediction: the row's expect_s.

The plan learns as the run goes (Calibration): each finished row's wall time over its prediction, ours and
FlexGen's apart, and later predictions scaled by the median so far. On the H100 the plan was 1.4-2x pessimistic
(first touch and start-up faster than assumed) and skipped rows that would have fitted.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

GB = 1e9
SLACK = 1.3  # the cost model's misses seen on the H200 were up to ~25%
FLEXGEN_SLOWER = 1.5  # FlexGen's generation against our prediction (its CPU attention casts to fp32 each step)
STARTUP_S = {"cuda": 8.0, "cpu": 3.0}
FLEXGEN_STARTUP_S = {"cuda": 12.0, "cpu": 4.0}


def plan_row(row, pred: dict | None, machine: dict, touch_gb_s: float) -> dict:
    """{"ours_s", "flexgen_s" (None without a twin), "source", "parts"} for `row`."""
    cuda = bool(machine.get("gpu"))
    key = "cuda" if cuda else "cpu"
    ours, twin = (pred or {}).get("ours"), (pred or {}).get("flexgen")
    if not ours or "error" in ours:
        return {"ours_s": float(row.expect_s), "flexgen_s": float(row.flexgen_expect_s) if row.flexgen else None,
                "source": "expected (no prediction: " + (ours or {}).get("error", "no profile")[:120] + ")",
                "parts": {}}
    pageable = machine.get("h2d_pageable_gb_s") or 7.0
    parts = {"startup": STARTUP_S[key], "load": _load_s(ours, touch_gb_s, pageable, cuda),
             "warmup": SLACK * (ours["prefill_s"] + ours["decode_step_s"]), "run": SLACK * _run_s(ours)}
    flexgen_s = None
    if row.flexgen:
        if twin and "error" not in twin:
            flexgen_s = (FLEXGEN_STARTUP_S[key] + _load_s(twin, touch_gb_s, pageable, False)
                         + FLEXGEN_SLOWER * (_run_s(twin) + twin["decode_step_s"]))
        else:
            flexgen_s = float(row.flexgen_expect_s)
    return {"ours_s": round(sum(parts.values()), 1), "flexgen_s": None if flexgen_s is None else round(flexgen_s, 1),
            "source": "cost model", "parts": {k: round(v, 1) for k, v in parts.items()}}


def _run_s(p: dict) -> float:
    return p["prefill_s"] + (p["gen_len"] - 1) * p["decode_step_s"]


def _load_s(p: dict, touch_gb_s: float, gpu_gb_s: float, cuda: bool) -> float:
    """Host RAM the plan takes (weights, cache, staging) and offload files, first touched; weights copied
    to the GPU from pageable memory (the GPU's cache is only allocated)."""
    memory = p.get("memory") or {"cpu": {"all": p["peak"]["cpu"]}, "disk": {"all": p["peak"]["disk"]},
                                 "gpu": {"weights": p["peak"]["gpu"]}}
    host = sum(memory.get("cpu", {}).values()) + sum(memory.get("disk", {}).values())
    return host / GB / touch_gb_s + (memory.get("gpu", {}).get("weights", 0.0) / GB / gpu_gb_s if cuda else 0.0)


@dataclass
class Calibration:
    """Wall time over predicted time of the rows finished so far ("ours", "flexgen"); `scaled` applies the median
    of a kind, kept within [LOW, HIGH] so that one odd row cannot make the plan reckless or idle."""

    LOW, HIGH = 0.5, 1.5
    ratios: dict = field(default_factory=lambda: {"ours": [], "flexgen": []})

    def observe(self, kind: str, predicted: float | None, wall: float | None) -> None:
        if predicted and wall and predicted > 0 and wall > 0:
            self.ratios[kind].append(wall / predicted)

    def factor(self, kind: str) -> float:
        seen = self.ratios[kind]
        return min(self.HIGH, max(self.LOW, statistics.median(seen))) if seen else 1.0

    def scaled(self, kind: str, predicted: float) -> float:
        return round(predicted * self.factor(kind), 1)


def fits(seconds: float, left: float) -> str | None:
    """None if `seconds` fit in `left`, else the reason to skip."""
    if seconds <= left:
        return None
    return f"predicted {seconds:.0f} s, {max(left, 0):.0f} s left in the run"


def step_timeout(row_timeout: float, predicted: float, left: float) -> float:
    """A row that runs gets its own timeout or twice its prediction, whichever is longer, within the run."""
    return min(left, max(row_timeout, 2 * predicted))


# ---- the child that predicts (gpu_suite.py --predict-rows SPECS.json) -----------------------------------------
def predict_rows(specs: list[dict]) -> dict:
    """{name: {"ours": prediction, "flexgen": prediction}} for specs of {"name", "ours": bench argv,
    "flexgen": bench argv of the twin's policy or None}; a failed prediction is {"error": ...}."""
    out = {}
    for spec in specs:
        out[spec["name"]] = {k: _predict_one(spec[k]) if spec.get(k) else None for k in ("ours", "flexgen")}
    return out


def _predict_one(argv: list[str]) -> dict:
    try:
        import torch

        from flexgen_lite.cli.main import build_parser, plan_policy, predict_policy
        from flexgen_lite.cli.options import policy_from_args, resolve_share
        from flexgen_lite.planning.budgets import SAFETY
        from flexgen_lite.planning.layout import Workload
        from flexgen_lite.planning.policy_search import AutoPolicy
        from flexgen_lite.profiling.measure import load_profile
        from flexgen_lite.system.devices import ComputeDevice

        args = build_parser().parse_args(argv)
        profile = load_profile()
        cuda = ComputeDevice(args.device).is_cuda or profile.is_cuda  # offline: the GPU machine's defaults
        if args.cpu_mem is None and profile.is_cuda and not torch.cuda.is_available():
            args.cpu_mem = int(profile.host_memory * SAFETY)  # offline, for the GPU machine the profile measured
        prompt_len = args.prompt_len or (512 if cuda else 64)
        workload = Workload(prompt_len, args.gen_len, args.num_prompts)
        policy = policy_from_args(args, default_batch=64 if cuda else 16)
        if isinstance(policy, AutoPolicy):
            result, _ = plan_policy(args, args.model, workload, policy, show=False)
            policy, p = result.policy, result.prediction
        else:
            policy = resolve_share(args, args.model, workload, policy)
            p, _ = predict_policy(args, args.model, workload, policy)
        return {"policy": policy.flags(), "prefill_s": p.prefill_s, "decode_step_s": p.decode_step_s,
                "total_tok_s": p.throughput, "bound": p.bound, "decode_by": dict(p.decode_by),
                "peak": dict(p.peak), "memory": {t: dict(v) for t, v in p.memory.items()},
                "gen_len": args.gen_len, "prompt_len": prompt_len}
    except (Exception, SystemExit) as e:  # noqa: BLE001 - any failure only costs the row its prediction
        return {"error": f"{type(e).__name__}: {e}"}


def main_predict(path: str) -> int:
    with open(path) as f:
        specs = json.load(f)
    print(json.dumps(predict_rows(specs)), flush=True)
    return 0
