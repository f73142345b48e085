"""`flexgen-lite report TRACE.json -o report.png`: one picture of a --trace file (matplotlib, the [report]
extra): (a) a timeline by lane of the prefill and two decode steps, (b) per resource, what the decode step
achieved against the profile's bound, naming the bottleneck, (c) the cost model's predicted time per stage
group against the measured one."""

from __future__ import annotations

import os

from ..engine.trace import COMPUTE_LANE, STEP, Span, StepMark
from ..models.config import ModelError
from .breakdown import GB, PhaseBreakdown, bottleneck, by_group, resources, summarize
from .checks import check_writable
from .chrome_trace import lane_order, read_trace

COLORS = {"compute": "#4c72b0", "attention": "#8172b2", "cpu attention": "#64b5cd", "dequantize": "#ccb974",
          "waiting on I/O": "#c44e52", STEP: "#dddddd", "weight load": "#55a868", "cache load": "#dd8452",
          "cache store": "#937860", "activation": "#da8bc3"}


def color(stage: str) -> str:
    for prefix, c in COLORS.items():
        if stage.startswith(prefix):
            return c
    return "#999999"


def draw(spans: list[Span], steps: list[StepMark], context: dict, path: str) -> None:
    """Write the three-panel picture of a trace to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = summarize(spans, steps, context.get("step_info"))
    rates = {k: tuple(v) for k, v in context.get("rates", {}).items()}
    shown = _shown_steps(steps)
    fig = plt.figure(figsize=(13, 8.5), dpi=80)
    grid = fig.add_gridspec(2, max(len(shown), 1) * 2, height_ratios=(1.1, 1), hspace=0.45, wspace=0.5)
    lanes = sorted({s.lane for s in spans}, key=lane_order)
    for i, mark in enumerate(shown):
        ax = fig.add_subplot(grid[0, 2 * i:2 * i + 2])
        _timeline(ax, [s for s in spans if s.end > mark.start and s.start < mark.end], mark, lanes, first=i == 0)
    decode = phases.get("decode") or phases.get("prefill")
    if decode is not None:
        half = max(len(shown), 1)
        _resources(fig.add_subplot(grid[1, :half]), decode, rates, bool(context.get("cuda")))
        predicted = context.get("predicted") or {}
        _predicted(fig.add_subplot(grid[1, half:]), decode, predicted.get(decode.phase))
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    fig.legend(handles, list(COLORS), loc="upper center", ncol=len(COLORS), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.965))
    fig.suptitle(f"{context.get('model', '')} {context.get('dtype', '')} {context.get('policy', '')}", fontsize=9,
                 y=0.995)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _shown_steps(steps: list[StepMark]) -> list[StepMark]:
    """The first prefill and the two decode steps after it."""
    ordered = sorted(steps, key=lambda m: m.start)
    first = next((i for i, m in enumerate(ordered) if m.phase == "prefill"), 0)
    out = ordered[first:first + 1]
    out += [m for m in ordered[first + 1:] if m.phase == "decode"][:2]
    return out


def _timeline(ax, spans: list[Span], mark: StepMark, lanes: list[str], first: bool) -> None:
    rows = {lane: i for i, lane in enumerate(lanes)}
    depth = _depths([s for s in spans if s.lane == COMPUTE_LANE])
    for s in sorted(spans, key=lambda s: (depth.get(id(s), 0), -(s.end - s.start))):
        a, b = max(s.start, mark.start), min(s.end, mark.end)
        y = rows[s.lane]
        shrink = 0.12 * depth.get(id(s), 0)
        ax.broken_barh([(1e3 * (a - mark.start), 1e3 * (b - a))], (y - 0.4 + shrink, 0.8 - 2 * shrink),
                       color=color(s.stage), linewidth=0)
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels(lanes if first else [""] * len(lanes), fontsize=8)
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.set_xlim(0, 1e3 * (mark.end - mark.start))
    ax.set_xlabel("ms", fontsize=8)
    ax.tick_params(labelsize=7)
    label = "prefill" if mark.phase == "prefill" else f"decode step {mark.index}"
    ax.set_title(f"(a) {label}: {1e3 * (mark.end - mark.start):.1f} ms", fontsize=9)


def _depths(spans: list[Span]) -> dict[int, int]:
    depth, stack = {}, []
    for s in sorted(spans, key=lambda s: (s.start, -s.end)):
        while stack and stack[-1].end <= s.start:
            stack.pop()
        depth[id(s)] = len(stack)
        stack.append(s)
    return depth


def _resources(ax, pb: PhaseBreakdown, rates: dict, cuda: bool) -> None:
    res = [r for r in resources(pb, rates, cuda) if r["utilization"] is not None]
    top = bottleneck(res)
    names = [r["resource"] for r in res]
    ax.barh(names, [1.0] * len(res), color="#eeeeee", label="bound (profile rate for the whole step)")
    ax.barh(names, [r["utilization"] for r in res], color=["#c44e52" if r is top else "#4c72b0" for r in res],
            label="achieved")
    for i, r in enumerate(res):
        unit = "GFLOP/s" if r["unit"] == "FLOP" else "GB/s"
        ax.text(0.01, i, f"{r['achieved_rate'] / GB:.2f} of {r['profile_rate'] / GB:.2f} {unit}", va="center",
                fontsize=8)
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("work per step / (profile rate x step time)", fontsize=8)
    ax.tick_params(labelsize=8)
    name = "none rated (no profile)" if top is None else \
        f"{top['resource']} at {100 * top['utilization']:.0f}% of its bound"
    ax.set_title(f"(b) {pb.phase}: achieved vs bound per resource; bottleneck: {name}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")


def _predicted(ax, pb: PhaseBreakdown, predicted_by: dict | None) -> None:
    groups = by_group(pb, predicted_by)
    x = range(len(groups))
    ax.bar([i - 0.2 for i in x], [1e3 * g[1] for g in groups], width=0.4, label="measured", color="#4c72b0")
    if predicted_by is not None:
        ax.bar([i + 0.2 for i in x], [1e3 * (g[2] or 0) for g in groups], width=0.4, label="predicted (cost model)",
               color="#dd8452")
    ax.set_xticks(list(x))
    ax.set_xticklabels([g[0] for g in groups], fontsize=7, rotation=20)
    ax.set_ylabel("ms per step", fontsize=8)
    ax.tick_params(labelsize=7)
    title = f"(c) {pb.phase}: predicted vs measured per stage"
    ax.set_title(title if predicted_by is not None else title + " (no prediction: no profile)", fontsize=9)
    ax.legend(fontsize=7)


def cmd_report(args) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ModelError("report needs matplotlib: pip install -e '.[report]'") from None
    try:
        spans, steps, context = read_trace(args.trace)
    except FileNotFoundError:
        raise ModelError(f"{args.trace}: no such file; pass a trace written by bench or generate --trace") from None
    except OSError as e:
        raise ModelError(f"{args.trace} cannot be read ({e.strerror})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"{args.trace} is not a trace written by --trace ({type(e).__name__}: {e})") from None
    if not spans:
        raise ModelError(f"{args.trace} holds no timed spans (the run recorded nothing): nothing to draw")
    if not set(context) - {"step_info"}:
        raise ModelError(f"{args.trace} holds no run context (its otherData): not a trace written by --trace, or "
                         "one of another version; nothing to draw the spans against")
    if not os.path.splitext(args.output)[1]:
        args.output += ".png"  # as matplotlib names it (helper-41: 'wrote noext' of noext.png)
    check_writable("-o", args.output, "report.png")
    try:
        draw(spans, steps, context, args.output)
    except OSError as e:
        raise ModelError(f"-o {args.output} cannot be written ({e.strerror}); choose a writable path") from None
    except (TypeError, AttributeError, KeyError, ValueError) as e:  # a context of another shape (another version)
        raise ModelError(f"{args.trace} is not a trace written by --trace ({type(e).__name__}: {e})") from None
    print(f"wrote {args.output}")

