"""`--breakdown` and `--trace FILE.json` of `bench` and `generate`: a recorder for the run, then the table of
where the time went and the Chrome / Perfetto trace of the same spans."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..engine.trace import Recorder, make_recorder
from .breakdown import PhaseBreakdown, bottleneck, format_table, profile_rates, resources, step_flops, summarize
from .chrome_trace import write_trace


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the time goes")
    g.add_argument("--breakdown", action="store_true",
                   help="after the run, a table per stage (weight, cache and activation loads and stores, compute, "
                   "attention, dequantization, waiting on I/O): time, share of the step, bytes, GB/s against the "
                   "profile, I/O hidden behind compute, the bound of the slowest resource")
    g.add_argument("--trace", metavar="FILE.json",
                   help="write the run's spans as a Chrome/Perfetto trace (one track per lane); "
                   "`flexgen-lite report FILE.json` draws it")


def recorder_for(args) -> Recorder | None:
    """A recorder when --breakdown or --trace asks for one, else None (nothing recorded)."""
    if not (getattr(args, "breakdown", False) or getattr(args, "trace", None)):
        return None
    from ..system.devices import ComputeDevice

    return make_recorder(ComputeDevice(args.device).device)


def build_context(recorder: Recorder, config, policy, dtype: str, cuda: bool, hw=None, cold_disk: bool = False,
                  workload=None) -> dict:
    """What the breakdown and the report need beside the spans: the profile's rate per stage, each step's
    FLOPs and compute bound, and the cost model's predicted seconds per resource (with a profile)."""
    context = {"model": config.name, "policy": policy.flags(), "dtype": dtype, "cuda": cuda, "cold_disk": cold_disk,
               "profile": None if hw is None else hw.measured_at, "rates": {}, "predicted": None}
    if hw is not None:
        context["rates"] = {k: list(v) for k, v in profile_rates(hw, dtype, cuda, cold_disk, policy.pin_weight).items()}
    setup = None
    if hw is not None and workload is not None:
        from ..planning.layout import Setup

        setup = Setup(config, workload, dataclasses.replace(policy, dtype=dtype), hw)
    context["step_info"] = [{**step_flops(config, m.rows, m.tokens, m.context, policy.num_gpu_batches, hw, dtype,
                                          setup), "attention": m.attention} for m in recorder.steps]
    if hw is not None and workload is not None:
        from ..planning.cost_model import predict

        p = predict(config, workload, policy, hw, 0 if cold_disk else float("inf"))
        context["predicted"] = {"prefill_s": p.prefill_s, "decode_step_s": p.decode_step_s, "bound": p.bound,
                                "prefill": p.prefill_by, "decode": p.decode_by}
    return context


def profile_or_none(args, offload_dir: str):
    """The cached profile of this machine, never measured here (None: no rates to compare with)."""
    from ..system.devices import ComputeDevice
    from ..system.profile_store import cached_profile

    return cached_profile(ComputeDevice(args.device), offload_dir)


def finish(args, recorder: Recorder, context: dict, out=None) -> dict:
    """Print the table (--breakdown), write the trace (--trace); the decode summary for a JSON report."""
    out = out or sys.stdout
    phases = summarize(recorder.spans, recorder.steps, context["step_info"])
    rates = {k: tuple(v) for k, v in context["rates"].items()}
    if args.breakdown:
        overlap = "off" if "--no-overlap" in context["policy"] else "on"
        print(f"\nbreakdown (measured with overlap {overlap}; compute lane: exclusive times; I/O lanes overlap it)",
              file=out)
        if not rates:
            print("  no profile of this machine cached: `flexgen-lite profile` measures the rates to compare with",
                  file=out)
        for phase in ("prefill", "decode"):
            if phase in phases:
                print(format_table(phases[phase], rates, context["cuda"]), file=out)
    if args.trace:
        try:
            write_trace(args.trace, recorder.spans, recorder.steps, context, recorder.origin)
            print(f"trace written to {args.trace}: open it in https://ui.perfetto.dev or chrome://tracing; "
                  f"`flexgen-lite report {args.trace} -o report.png` draws it", file=sys.stderr)
        except OSError as e:  # checked before the run; a disk filled since: the run's results still printed
            print(f"error: --trace {args.trace} could not be written ({e.strerror or e})", file=sys.stderr)
    return summary_json(phases.get("decode") or phases.get("prefill"), rates, context["cuda"])


def summary_json(pb: PhaseBreakdown | None, rates: dict, cuda: bool) -> dict:
    """A phase's breakdown in a few numbers: ms per step by stage, bytes, waits, overlap, bottleneck."""
    if pb is None:
        return {}
    n = max(pb.steps, 1)
    top = bottleneck(resources(pb, rates, cuda))
    return {"phase": pb.phase, "steps": pb.steps, "step_ms": round(1e3 * pb.wall / n, 2),
            "stage_ms": {r.stage: round(1e3 * r.seconds / n, 3) for r in pb.rows.values()},
            "stage_bytes": {r.stage: r.nbytes // n for r in pb.rows.values() if r.nbytes},
            "io_wait_fraction": round(pb.wait_fraction, 4), "io_hidden_fraction": round(pb.hidden_fraction, 4),
            "attention_backend": pb.attention_kernels or None,
            "bottleneck": None if top is None else top["resource"],
            "bottleneck_utilization": None if top is None or top["utilization"] is None
            else round(top["utilization"], 3)}
