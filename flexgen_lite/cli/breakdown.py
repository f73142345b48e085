"""Where a step's time goes: the recorder's spans (engine/trace.py) summed per stage, with bytes, achieved rates
against the profile's rate for that link, the share of wall time compute waited on I/O, how much I/O was
hidden behind compute, and how close each resource came to its bound.

The compute lane's stages are exclusive times (a span's time less its children's), so with the step's own
time outside every stage ("schedule (other)") they tile the step: their sum is the step's wall time. I/O
lanes overlap the compute lane; their times are busy times. Everything here works on plain data (spans,
steps and a context dict), so `report` computes the same from a trace file.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from ..engine.trace import (
    ATTENTION,
    COMPUTE,
    COMPUTE_LANE,
    CPU_ATTENTION,
    DEQUANTIZE,
    GRAPH_ATTENTION,
    STEP,
    WAIT,
    Span,
    StepMark,
)
from ..models.specs import matmul_shapes

IO_PREFIXES = ("weight load", "cache load", "cache store", "activation")
GB = 1e9


def is_io(stage: str) -> bool:
    return stage.startswith(IO_PREFIXES)


@dataclass
class StageRow:
    """One stage over the steps of a phase: seconds and bytes in total, on which lanes."""

    stage: str
    lanes: set[str] = field(default_factory=set)
    seconds: float = 0.0
    nbytes: int = 0
    calls: int = 0


@dataclass
class PhaseBreakdown:
    """The steps of one phase (prefill or decode) summed: `rows` by stage, and the overlap figures."""

    phase: str
    steps: int = 0
    wall: float = 0.0
    rows: dict[str, StageRow] = field(default_factory=dict)
    wait: float = 0.0  # compute waited on I/O (exclusive time of its wait spans)
    io_busy: float = 0.0  # union of the I/O lanes' busy intervals, plus I/O done on the compute lane
    io_exposed: float = 0.0  # of that, the time compute waited (or did the I/O itself)
    flops: float = 0.0
    compute_bound: float = 0.0  # seconds the profile's matmul rates give for these FLOPs
    kernels: dict[str, None] = field(default_factory=dict)  # attention kernels that ran (flash, efficient, ...)

    @property
    def attention_kernels(self) -> str:
        return "+".join(sorted(self.kernels))

    @property
    def wait_fraction(self) -> float:
        return self.wait / self.wall if self.wall else 0.0

    @property
    def hidden_fraction(self) -> float:
        return 1 - self.io_exposed / self.io_busy if self.io_busy else 0.0

    def compute_lane_total(self) -> float:
        return sum(r.seconds for r in self.rows.values() if COMPUTE_LANE in r.lanes)


def _exclusive(spans: list[Span]) -> list[tuple[Span, float]]:
    """(span, its time less its children's) for properly nested spans of one lane."""
    out: list[list] = []
    stack: list[list] = []
    for s in sorted(spans, key=lambda s: (s.start, -s.end)):
        while stack and stack[-1][0].end <= s.start:
            stack.pop()
        entry = [s, s.end - s.start]
        if stack:
            stack[-1][1] -= s.end - s.start
        stack.append(entry)
        out.append(entry)
    return [(s, max(t, 0.0)) for s, t in out]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    """Length of the intersection of two sorted, disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, b - a)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize(spans: list[Span], steps: list[StepMark], step_info: list[dict] | None = None,
              skip_first_decode: bool = False) -> dict[str, PhaseBreakdown]:
    """{"prefill": ..., "decode": ...} over the recorded steps. Compute-lane spans belong to the step they
    lie in; an I/O span to the step in which it started (or the last one before; a span starting within a
    nanosecond of a step's start is the step's: a trace's microseconds read back may round it just before).
    `step_info[i]` may give step i's "flops" and "compute_s" (see `step_flops`), and "attention" (its kernels,
    when the mark has none)."""
    steps = sorted(steps, key=lambda s: s.start)
    starts = [s.start for s in steps]
    per_step: list[list[Span]] = [[] for _ in steps]
    for s in spans:
        i = max(bisect.bisect_right(starts, s.start + 1e-9) - 1, 0)
        if steps:
            per_step[i].append(s)
    phases: dict[str, PhaseBreakdown] = {}
    seen_decode = False
    for i, (mark, mine) in enumerate(zip(steps, per_step, strict=True)):
        if skip_first_decode and mark.phase == "decode" and not seen_decode:
            seen_decode = True
            continue
        pb = phases.setdefault(mark.phase, PhaseBreakdown(mark.phase))
        _add_step(pb, mark, mine)
        info = step_info[i] if step_info is not None and i < len(step_info) else {}
        pb.flops += info.get("flops", 0.0)
        pb.compute_bound += info.get("compute_s", 0.0)
        for name in (mark.attention or info.get("attention", "")).split("+"):
            if name:
                pb.kernels[name] = None
    return phases


def _add_step(pb: PhaseBreakdown, mark: StepMark, spans: list[Span]) -> None:
    pb.steps += 1
    pb.wall += mark.end - mark.start
    compute = [s for s in spans if s.lane == COMPUTE_LANE]
    waits, io_on_compute = [], 0.0
    for s, t in _exclusive(compute):
        row = pb.rows.setdefault(s.stage, StageRow(s.stage))
        row.lanes.add(COMPUTE_LANE)
        row.seconds += t
        row.nbytes += s.nbytes
        row.calls += 1
        if s.stage == WAIT:
            waits.append((s.start, s.end))
            pb.wait += t
        elif is_io(s.stage):
            io_on_compute += t
    io_intervals = []
    for s in spans:
        if s.lane == COMPUTE_LANE:
            continue
        row = pb.rows.setdefault(s.stage, StageRow(s.stage))
        row.lanes.add(s.lane)
        row.seconds += s.end - s.start
        row.nbytes += s.nbytes
        row.calls += 1
        if is_io(s.stage):
            io_intervals.append((max(s.start, mark.start), min(s.end, mark.end)))
    busy = _union([(a, b) for a, b in io_intervals if b > a])
    pb.io_busy += _length(busy) + io_on_compute
    pb.io_exposed += _intersection(busy, _union(waits)) + io_on_compute


# ---- rates: what the profile says each stage's link or unit can do --------------------------------------------
def profile_rates(hw, dtype: str, cuda: bool, cold_disk: bool, pin_weight: bool = True) -> dict[str, tuple]:
    """{stage: (bytes/s, what the rate is)} from a HardwareProfile, for the stages that move bytes."""
    g = {}
    disk_r = (hw.disk_read, "disk read") if cold_disk else (hw.cached_read, "page-cache read")
    disk_w = (hw.disk_write, "disk write") if cold_disk else (hw.cached_write, "page-cache write")
    for kind in ("weight load", "cache load", "activation load"):
        g[f"{kind} (disk)"] = disk_r
    if not cuda and not cold_disk and hw.mapped_read:  # a CPU maps weights and cache in place: its "load" faults
        # the pages in (helper-41: priced as a page-cache read, they were "the bottleneck" at 2033% of its rate)
        g["weight load (disk)"] = g["cache load (disk)"] = (hw.mapped_read, "mapped in and out")
    for kind in ("cache store", "activation store"):
        g[f"{kind} (disk)"] = disk_w
    if cuda:
        g["weight load (cpu)"] = (hw.h2d_pinned, "h2d pinned") if pin_weight else (hw.h2d_pageable, "h2d pageable")
        g["cache load (cpu)"] = (hw.h2d_pinned, "h2d pinned")
        g["activation load (cpu)"] = (hw.h2d_pinned, "h2d pinned")
        g["activation store (cpu)"] = (hw.d2h_pinned, "d2h pinned")
        g["cache store (cpu)"] = (hw.d2h_pinned, "d2h pinned")
        g["cache store (gpu)"] = (hw.device_copy, "device copy")
    else:
        g["cache store (cpu)"] = g["cache store (gpu)"] = (hw.host_copy, "host copy")
    itemsize = {"float32": 4}.get(dtype, 2)
    if dtype in hw.dequantize:
        g[DEQUANTIZE] = (hw.dequantize[dtype] * itemsize, "dequantize (output)")
    if dtype in hw.attention:
        g[ATTENTION] = (hw.attention[dtype][1], "decode attention K+V")
    if dtype in hw.cpu_attention:
        g[CPU_ATTENTION] = (hw.cpu_attention[dtype][1], "CPU attention K+V")
    return g


def step_linears(config, rows: int, tokens: int, batches: int = 1) -> list[tuple[float, int, int, int]]:
    """The matmuls of one step as (rows, k, n, how many): each layer's projections and MLP, the embedding's and
    the head's (last position only) projections, for `batches` GPU batches sharing `rows`."""
    shapes = matmul_shapes(config)
    per_layer, head, embed = shapes["attention"] + shapes["mlp"], shapes["head"], shapes["embed"]
    batch_rows = max(rows, 1) / batches
    return [(m * share, k, n, times * batches)
            for linears, m, times in ((per_layer, batch_rows * tokens, config.num_layers),
                                      (embed, batch_rows * tokens, 1), (head, batch_rows, 1))
            for k, n, share in linears]


def step_flops(config, rows: int, tokens: int, context: int, batches: int = 1, hw=None,
               dtype: str = "float32", setup=None) -> dict[str, float]:
    """Matmul and prefill-attention FLOPs of one step (the linears of cost_model._compute), and the seconds
    the profile's rates give for them ("compute_s", with `hw`). setup (a cost_model Setup of the run's policy):
    its products priced as the cost model prices them (4-bit weights the CPU kernel reads as stored, an 8-bit
    head), not all as dense ones. A prefill after `context` positions (a shared prefix) computed that prefix once
    for the block, and its rows attend over it too (helper-41: it was left out, 2.2x fewer FLOPs)."""
    c = config
    flops, seconds = _linears(config, rows, tokens, batches, hw, dtype, setup)
    if tokens > 1:  # prefill attends over its own k, v (masked, full square) and a shared prefix before them
        sdpa = 4 * rows * c.num_heads * tokens * (context + tokens) * c.head_dim * c.num_layers
        if context:
            more_flops, more_seconds = _linears(config, 1, context, 1, hw, dtype, setup)
            flops, seconds = flops + more_flops, seconds + more_seconds
            sdpa += 4 * c.num_heads * context * context * c.head_dim * c.num_layers
        flops += sdpa
        if hw is not None and dtype in hw.sdpa_prefill:
            seconds += sdpa / hw.prefill_attention_rate(dtype)
    return {"flops": flops, "compute_s": seconds}


def _linears(config, rows: int, tokens: int, batches: int, hw, dtype: str, setup) -> tuple[float, float]:
    """(FLOPs, seconds) of a step's products for `rows` rows over the GPU batches that hold any (as even as the
    block's rows split: 3 rows in 2 batches are one of 2 and one of 1; helper-41: rows // batches priced none)."""
    flops, seconds = 0.0, 0.0
    for m, k, n, times in step_linears(config, rows, tokens, batches):
        flops += times * 2 * m * k * n
        if hw is not None and setup is None:
            seconds += times * hw.matmul_time(dtype, m, k, n)
    if setup is not None:
        from ..planning.products_cost import products_time

        rows, active = max(rows, 1), min(batches, max(rows, 1))
        sizes = Counter(rows // active + (b < rows % active) for b in range(active))
        for size, nb in sizes.items():
            for kind, times, m in (("attention", config.num_layers, size * tokens),
                                   ("mlp", config.num_layers, size * tokens), ("embed", 1, size * tokens),
                                   ("head", 1, size)):
                seconds += times * products_time(setup, kind, m, nb)[0]
    return flops, seconds


# ---- resources: how close each came to its bound -----------------------------------------------------------------
def resources(pb: PhaseBreakdown, rates: dict[str, tuple], cuda: bool) -> list[dict]:
    """Per resource (compute, disk, link, dequantize): work per step, the profile's rate, the seconds that
    rate needs for it (its bound), and that bound as a share of the measured step."""
    n = max(pb.steps, 1)
    step = pb.wall / n
    out = []
    if pb.flops:
        rate = pb.flops / pb.compute_bound if pb.compute_bound else None
        busy = _seconds(pb, COMPUTE) + _seconds(pb, GRAPH_ATTENTION)  # a graphed layer's products run in it
        out.append(_resource("compute", pb.flops / n, "FLOP", rate, step, pb.flops / max(busy, 1e-12)))
    disk_read = sum(r.nbytes for r in pb.rows.values() if r.stage.endswith("(disk)") and "store" not in r.stage)
    disk_write = sum(r.nbytes for r in pb.rows.values() if r.stage.endswith("(disk)") and "store" in r.stage)
    if disk_read or disk_write:
        rate = rates.get("weight load (disk)", (None, ""))[0]
        wrate = rates.get("cache store (disk)", (None, ""))[0]
        bound = (disk_read / rate if rate else 0) + (disk_write / wrate if wrate else 0)
        total = disk_read + disk_write
        out.append(_resource("disk", total / n, "B", total / bound if bound else None, step,
                             total / max(_busy(pb, "(disk)"), 1e-12)))
    if cuda:
        link = sum(r.nbytes for r in pb.rows.values() if is_io(r.stage) and "store" not in r.stage
                   and not r.stage.endswith("(gpu)"))
        if link:
            rate = rates.get("weight load (cpu)", (None, ""))[0]
            out.append(_resource("link", link / n, "B", rate, step, None))
    if DEQUANTIZE in pb.rows and DEQUANTIZE in rates:
        row = pb.rows[DEQUANTIZE]
        out.append(_resource("dequantize", row.nbytes / n, "B", rates[DEQUANTIZE][0], step,
                             row.nbytes / max(row.seconds, 1e-12)))
    return out


def _resource(name: str, work: float, unit: str, rate: float | None, step: float, achieved_busy) -> dict:
    bound = work / rate if rate else None
    return {"resource": name, "work_per_step": work, "unit": unit, "profile_rate": rate,
            "achieved_rate": work / step if step else None, "busy_rate": achieved_busy,
            "bound_s": bound, "utilization": bound / step if bound is not None and step else None}


def _seconds(pb: PhaseBreakdown, stage: str) -> float:
    return pb.rows[stage].seconds if stage in pb.rows else 0.0


def _busy(pb: PhaseBreakdown, suffix: str) -> float:
    return sum(r.seconds for r in pb.rows.values() if r.stage.endswith(suffix))


def bottleneck(res: list[dict]) -> dict | None:
    rated = [r for r in res if r["utilization"] is not None]
    return max(rated, key=lambda r: r["utilization"]) if rated else None


# ---- predicted (cost model) against measured, by group -------------------------------------------------------------
GROUPS = {  # group: (measured stages by prefix, the cost model's resources)
    "compute": ((COMPUTE,), ("compute",)),
    "attention": ((ATTENTION, CPU_ATTENTION), ("attention", "cpu attention")),
    "dequantize": ((DEQUANTIZE,), ("dequantize", "quantize")),
    "I/O (busy)": (IO_PREFIXES, ("disk", "page cache", "mapped pages", "link", "cache load", "copy")),
    "waiting on I/O": ((WAIT,), ()),
    "schedule (other)": ((STEP,), ("overhead",)),
}


def by_group(pb: PhaseBreakdown, predicted_by: dict[str, float] | None) -> list[tuple[str, float, float | None]]:
    """(group, measured seconds per step, predicted seconds per step or None) for each group."""
    n = max(pb.steps, 1)
    out = []
    for group, (prefixes, keys) in GROUPS.items():
        measured = sum(r.seconds for r in pb.rows.values() if r.stage.startswith(prefixes)) / n
        predicted = None if predicted_by is None or not keys else sum(predicted_by.get(k, 0.0) for k in keys)
        out.append((group, measured, predicted))
    return out


# ---- the table -------------------------------------------------------------------------------------------------------
def _lanes_label(lanes) -> str:
    """The lanes a stage ran on, the I/O threads counted (helper-41: 'io-0,io-1,io-2' was cut to 'io-0,io-1,io')."""
    io = sorted(lane for lane in lanes if lane.startswith("io-"))
    named = sorted((lane for lane in lanes if not lane.startswith("io-")), key=lambda x: (x != COMPUTE_LANE, x))
    return ",".join(named + (io if len(io) < 2 else [f"io x{len(io)}"]))


def format_table(pb: PhaseBreakdown, rates: dict[str, tuple], cuda: bool = False) -> str:
    """The breakdown of one phase as text: per stage, then the overlap and bound lines."""
    n = max(pb.steps, 1)
    step = pb.wall / n
    lines = [f"{pb.phase}: {pb.steps} step(s), {1e3 * step:.1f} ms/step (wall {pb.wall:.3f} s)",
             f"  {'stage':<24} {'lanes':<12} {'total s':>8} {'ms/step':>8} {'share':>6} {'MB/step':>8} "
             f"{'GB/s':>7} {'profile':>7} {'of it':>6}  profile rate of"]

    def order(row: StageRow) -> tuple:
        return (COMPUTE_LANE not in row.lanes, -row.seconds)

    for row in sorted(pb.rows.values(), key=order):
        lanes = _lanes_label(row.lanes)
        gbs = row.nbytes / row.seconds / GB if row.nbytes and row.seconds else None
        prof = rates.get(row.stage)
        ratio = f"{100 * gbs * GB / prof[0]:5.0f}%" if gbs and prof and prof[0] else ""
        lines.append(f"  {row.stage:<24} {lanes[:12]:<12} {row.seconds:8.3f} {1e3 * row.seconds / n:8.2f} "
                     f"{100 * row.seconds / pb.wall if pb.wall else 0:5.1f}% "
                     f"{row.nbytes / n / 1e6 if row.nbytes else 0:8.2f} "
                     f"{'' if gbs is None else f'{gbs:7.2f}':>7} "
                     f"{'' if not prof else f'{prof[0] / GB:7.2f}':>7} {ratio:>6}  {prof[1] if prof else ''}".rstrip())
    covered = pb.compute_lane_total()
    lines.append(f"  compute lane stages add up to {1e3 * covered / n:.1f} ms/step of {1e3 * step:.1f} "
                 f"({100 * covered / pb.wall if pb.wall else 0:.1f}%); I/O lanes overlap it")
    if pb.kernels:
        lines.append(f"  attention kernels: {pb.attention_kernels}")
    lines.append(f"  compute waited on I/O {100 * pb.wait_fraction:.1f}% of wall time; "
                 f"I/O busy {1e3 * pb.io_busy / n:.1f} ms/step, {100 * pb.hidden_fraction:.0f}% of it hidden "
                 "behind compute")
    res = resources(pb, rates, cuda)
    top = bottleneck(res)
    for r in res:
        unit = "GFLOP" if r["unit"] == "FLOP" else "GB"
        util = "" if r["utilization"] is None else \
            f", bound {1e3 * r['bound_s']:.1f} ms = {100 * r['utilization']:.0f}% of the step"
        rate = "" if not r["profile_rate"] else f" at the profile's {r['profile_rate'] / GB:.2f} {unit}/s"
        lines.append(f"  {r['resource']}: {r['work_per_step'] / GB:.3f} {unit}/step{rate}{util}")
    if top is not None:
        lines.append(f"  bottleneck: {top['resource']} ({100 * top['utilization']:.0f}% of its bound; the step is "
                     f"{1 / top['utilization']:.1f}x that bound)" if top["utilization"] else
                     f"  bottleneck: {top['resource']}")
    return "\n".join(lines)
