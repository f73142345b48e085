"""The recorder's spans as a Chrome / Perfetto trace (JSON "traceEvents"): one track per lane (compute, each
I/O worker, the CUDA copy streams), steps as the compute track's outer spans. Open it in ui.perfetto.dev or
chrome://tracing. `otherData` keeps what the breakdown and `flexgen-lite report` need (steps, rates, the
cost model's prediction), so a trace file alone gives the same table and picture."""

from __future__ import annotations

import json
from pathlib import Path

from ..engine.trace import COMPUTE_LANE, STEP, Span, StepMark

PID = 1


def lane_order(lane: str) -> tuple:
    """compute first, then the host lane, I/O workers by number, copy streams."""
    if lane == COMPUTE_LANE:
        return (0, 0, lane)
    if lane == "host":
        return (1, 0, lane)
    if lane.startswith("io-"):
        return (2, int(lane[3:]) if lane[3:].isdigit() else 0, lane)
    return (3, 0, lane)


def to_chrome(spans: list[Span], steps: list[StepMark], context: dict, origin: float) -> dict:
    """The trace as a JSON-ready dict; times in microseconds from `origin` (perf_counter seconds)."""
    lanes = sorted({s.lane for s in spans} | {COMPUTE_LANE}, key=lane_order)
    tids = {lane: i + 1 for i, lane in enumerate(lanes)}
    events: list[dict] = [{"ph": "M", "name": "process_name", "pid": PID, "tid": 0,
                           "args": {"name": f"flexgen-lite {context.get('model', '')}".strip()}}]
    for lane, tid in tids.items():
        events.append({"ph": "M", "name": "thread_name", "pid": PID, "tid": tid, "args": {"name": lane}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": PID, "tid": tid, "args": {"sort_index": tid}})
    starts = sorted((m.start, m.index) for m in steps)
    by_lane: dict[str, list[Span]] = {}
    for s in spans:
        by_lane.setdefault(s.lane, []).append(s)
    for lane, mine in by_lane.items():
        ends: list[float] = []  # open spans' ends: a span that would cross one ends with it (device lanes)
        for s in sorted(mine, key=lambda s: (s.start, -s.end)):
            while ends and ends[-1] <= s.start:
                ends.pop()
            end = min(s.end, ends[-1]) if ends else s.end
            ends.append(end)
            ts = (s.start - origin) * 1e6
            name = s.stage
            if s.stage == STEP and lane == COMPUTE_LANE:
                index = _step_at(starts, s.start)
                name = "prefill" if index == 0 else f"decode {index}"
            events.append({"ph": "X", "name": name, "cat": "compute" if lane == COMPUTE_LANE else "io", "pid": PID,
                           "tid": tids[lane], "ts": ts, "dur": max((end - origin) * 1e6 - ts, 0.0),
                           "args": {"stage": s.stage, "bytes": s.nbytes}})
    other = dict(context)
    info = context.get("step_info") or []
    other["steps"] = [{**(info[i] if i < len(info) else {}), "index": m.index, "start": m.start - origin,
                       "end": m.end - origin, "rows": m.rows, "tokens": m.tokens, "context": m.context}
                      for i, m in enumerate(steps)]
    other.pop("step_info", None)
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}


def _step_at(starts: list[tuple[float, int]], t: float) -> int:
    for start, index in starts:
        if abs(start - t) < 1e-9:
            return index
    return max((index for start, index in starts if start <= t), default=0)


def write_trace(path: str | Path, spans: list[Span], steps: list[StepMark], context: dict, origin: float) -> None:
    Path(path).write_text(json.dumps(to_chrome(spans, steps, context, origin)))


def read_trace(path: str | Path) -> tuple[list[Span], list[StepMark], dict]:
    """(spans, steps, context) of a trace written by write_trace; times in seconds from its origin. The
    context's "step_info" holds each step's FLOPs and compute bound again."""
    data = json.loads(Path(path).read_text())
    lanes = {e["tid"]: e["args"]["name"] for e in data["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    spans = [Span(e["args"].get("stage", e["name"]), lanes.get(e["tid"], str(e["tid"])), e["ts"] / 1e6,
                  (e["ts"] + e["dur"]) / 1e6, int(e["args"].get("bytes", 0)))
             for e in data["traceEvents"] if e.get("ph") == "X"]
    context = dict(data.get("otherData", {}))
    raw_steps = context.pop("steps", [])
    steps = [StepMark(s["index"], s["start"], s["end"], s["rows"], s["tokens"], s["context"]) for s in raw_steps]
    context["step_info"] = [{k: s[k] for k in ("flops", "compute_s") if k in s} for s in raw_steps]
    return spans, steps, context
