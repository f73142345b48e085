"""The GPU suite's numbers: each row's result beside FlexGen's, the ratios, where the row stands against its
bound, and the Markdown table."""

from __future__ import annotations

import re
from dataclasses import asdict

from suite_steps import Step, last_json, tail

GB = 1e9


def row_result(row, step: Step, machine: dict, cmd: list[str], profile: dict | None = None,
               pred: dict | None = None) -> dict:
    result = {"name": row.name, "model": row.model, "note": row.note,
              "command": " ".join(["flexgen-lite", *cmd[cmd.index("bench"):]]),
              **{k: v for k, v in asdict(step).items() if k not in ("stdout", "stderr")}}
    report = last_json(step.stdout)
    if step.status != "ok" or report is None:
        if step.status == "ok":
            result["status"] = "failed"
        result["error"] = tail(step.stderr) or tail(step.stdout)
        return result
    result["report"] = report
    steps = report["gen_len"] - 1
    step_s = report["decode_s"] / steps if steps else None
    link, disk = report.get("link_moved_per_step_gb", 0.0), report.get("disk_read_per_step_gb", 0.0)
    h2d = machine.get("h2d_pinned_gb_s")
    budget = row.gpu_budget
    if budget is None and machine.get("gpu_memory_gb"):
        budget = machine["gpu_memory_gb"] * GB
    result.update(
        policy=report["policy"], batch=report["batch"], prefill_s=report.get("prefill_s"),
        prefill_tok_s=report["prefill_tok_s"], decode_tok_s=report["decode_tok_s"],
        total_tok_s=report["total_tok_s"], decode_step_s=step_s, link_gb_per_step=link, disk_gb_per_step=disk,
        link_gb_s=round(link / step_s, 2) if step_s and link else None,
        peak_gpu_gb=round(report["peak_cuda_reserved_gb"] + report.get("cuda_runtime_gb", 0), 3)
        if "peak_cuda_reserved_gb" in report else report["peak_gpu_gb"],  # the process's whole use of the card
        peak_gpu_ledger_gb=report["peak_gpu_gb"],
        gpu_budget_gb=round(budget / GB, 3) if budget else None,
        peak_host_gb=report.get("peak_rss_gb"), host_budget_gb=machine.get("host_memory_gb"),
        attention_backend=report.get("attention_backend"), warmup_s=report.get("warmup_s"),
        load_s=report.get("load_s"), predicted_total_tok_s=report.get("predicted_total_tok_s"))
    if h2d and link and step_s:
        result["link_gb_s_of_h2d"] = round(result["link_gb_s"] / h2d, 3)
        result["link_bound_s"] = round(link / h2d, 4)
        result["link_bound_fraction"] = round(link / h2d / step_s, 3)
    if step_s:
        result.update(where_it_stands(report, step_s, machine, profile or {}, (pred or {}).get("ours")))
    stages = (report.get("breakdown") or {}).get("stage_ms") or {}
    if stages:  # --breakdown's largest stages of a decode step, ms
        result["top_stages_ms"] = dict(sorted(stages.items(), key=lambda kv: -kv[1])[:4])
    return result


def where_it_stands(report: dict, step_s: float, machine: dict, profile: dict, pred: dict | None) -> dict:
    """Seconds per decode step each resource needs at the profile's rates (link, disk, HBM, compute, CPU
    attention), the largest as the row's bound, and the fraction of it the measured step reaches."""
    bounds: dict[str, float] = {}
    h2d = (machine.get("h2d_pinned_gb_s") or 0) * GB or profile.get("h2d_pinned")
    if h2d and report.get("link_moved_per_step_gb"):
        bounds["link"] = report["link_moved_per_step_gb"] * GB / h2d
    if profile.get("disk_read") and report.get("disk_read_per_step_gb"):
        bounds["disk"] = report["disk_read_per_step_gb"] * GB / profile["disk_read"]
    pct = _percents(report.get("policy", ""))
    length = report["prompt_len"] + report["gen_len"] / 2
    if profile.get("device_copy") and pct and profile.get("is_cuda", True):  # a copy reads and writes: 2x
        hbm = (pct[0] / 100 * report["model_gb"] + pct[2] / 100 * report["cache_gb"] * length
               / (report["prompt_len"] + report["gen_len"])) * GB
        bounds["HBM"] = hbm / (2 * profile["device_copy"])
    flops = _peak_flops(profile, report.get("dtype", ""))
    if flops:
        bounds["compute"] = 2 * report["model_gb"] * GB / 2 * report["batch"] / flops  # params at 2 bytes
    if pred and pred.get("decode_by", {}).get("cpu attention"):
        bounds["CPU attention"] = pred["decode_by"]["cpu attention"]
    if not bounds:
        return {}
    name = max(bounds, key=bounds.get)
    return {"bounds_s": {k: round(v, 5) for k, v in bounds.items()}, "bound": name,
            "bound_fraction": round(bounds[name] / step_s, 3)}


def _percents(policy: str) -> list[float] | None:
    m = re.search(r"--percent((?: [\d.]+){6})", policy)
    return [float(x) for x in m.group(1).split()] if m else None


def _peak_flops(profile: dict, dtype: str) -> float | None:
    points = profile.get("matmul", {}).get(dtype)
    return max(p[1] for p in points) if points else None


def flexgen_result(step: Step, parsed: dict | None) -> dict:
    """FlexGen's figures (parse_log), or why there are none: skipped (with its reason), failed, timeout."""
    out = {"status": step.status, "rc": step.rc, "wall_s": step.wall_s, "timeout_s": step.timeout_s}
    skip = [ln[6:] for ln in step.stderr.splitlines() if ln.startswith("SKIP: ")]
    if skip:
        return {**out, "status": "skipped", "reason": skip[-1]}
    if step.status == "ok" and parsed:
        return {**out, **parsed}
    if step.status == "ok":
        out["status"] = "failed"
    out["error"] = tail(step.stderr) or tail(step.stdout) or step.stderr
    return out


def ratios(ours: dict, flexgen: dict | None) -> dict:
    """Ours / FlexGen's total and decode tok/s, where both ran."""
    if not flexgen or "total_tok_s" not in flexgen or ours.get("total_tok_s") is None:
        return {}
    out = {"ratio_total": round(ours["total_tok_s"] / flexgen["total_tok_s"], 3)}
    if ours.get("decode_tok_s") and flexgen.get("decode_tok_s"):
        out["ratio_decode"] = round(ours["decode_tok_s"] / flexgen["decode_tok_s"], 3)
    return out


# ---- the table ---------------------------------------------------------------------------------------------------
COLUMNS = ["row", "status", "policy", "batch", "prefill s", "decode tok/s", "total tok/s",
           "FlexGen total (prefill s, decode)", "ratio total / decode", "bound (reached)",
           "link GB/step (GB/s, of H2D)", "peak GPU GB / budget", "peak host GB / RAM", "attention",
           "predicted / wall s"]


def _cell(r: dict, col: str) -> str:
    get = r.get
    fg = r.get("flexgen") or {}
    if col == "row":
        return r["name"]
    if col == "status":
        return r["status"] if r["status"] == "ok" else f"**{r['status']}**"
    if col == "FlexGen total (prefill s, decode)":
        if "total_tok_s" in fg:
            return f"{fg['total_tok_s']:.1f} ({fg.get('prefill_s')}, {fg.get('decode_tok_s')})"
        return fg.get("status", "-") if fg else "-"
    if col == "predicted / wall s":
        return f"{get('predicted_s', '-')} / {r['wall_s']:.0f}"
    if "report" not in r:
        return "-"
    values = {
        "policy": f"`{get('policy')}`", "batch": get("batch"), "prefill s": get("prefill_s"),
        "decode tok/s": get("decode_tok_s"), "total tok/s": get("total_tok_s"),
        "ratio total / decode": (f"**{get('ratio_total')}x** / {get('ratio_decode')}x"
                                 if get("ratio_total") is not None else None),
        "bound (reached)": f"{get('bound')} {100 * get('bound_fraction'):.0f}%" if get("bound") else None,
        "link GB/step (GB/s, of H2D)": (f"{get('link_gb_per_step')} ({get('link_gb_s')}, "
                                        f"{100 * get('link_gb_s_of_h2d'):.0f}%)" if get("link_gb_s_of_h2d")
                                        is not None else get("link_gb_per_step")),
        "peak GPU GB / budget": f"{get('peak_gpu_gb')} / {get('gpu_budget_gb') or '-'}",
        "peak host GB / RAM": f"{get('peak_host_gb')} / {get('host_budget_gb') or '-'}",
        "attention": get("attention_backend"),
    }
    value = values[col]
    return "-" if value is None else str(value)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def header_lines(machine: dict) -> list[str]:
    if machine.get("gpu"):
        return [f"GPU {machine['gpu']} ({machine['gpu_memory_gb']} GB, sm {machine.get('capability')}), "
                f"driver {machine['driver']}, torch {machine['torch']}, CUDA {machine['cuda']}, "
                f"python {machine['python']}, {machine['cpu_count']} CPUs, {machine['host_memory_gb']} GB RAM",
                f"pinned copies: H2D {machine['h2d_pinned_gb_s']} GB/s, D2H {machine['d2h_pinned_gb_s']} GB/s "
                f"(pageable H2D {machine['h2d_pageable_gb_s']} GB/s)"]
    return [f"no GPU: device {machine.get('device')}, torch {machine.get('torch')}, python {machine.get('python')}, "
            f"{machine.get('cpu_count')} CPUs, {machine.get('host_memory_gb')} GB RAM",
            "pinned copies: H2D n/a, D2H n/a (no CUDA)"]


def parity_summary(step: Step) -> dict:
    """pytest's last line ('3 passed, 1 failed, 2 xfailed in 9.1s') as counts."""
    lines = [ln for ln in step.stdout.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|xfailed|xpassed|skipped)", last)}
    return {"status": step.status if step.status != "ok" or not counts.get("failed") else "failed", "rc": step.rc,
            "wall_s": step.wall_s, "timeout_s": step.timeout_s, "summary": last, **counts}


def breakdown_line(b: dict) -> str:
    """A row's --breakdown in one line: the largest stages, waiting on I/O, hidden I/O, the bottleneck."""
    top = sorted(b.get("stage_ms", {}).items(), key=lambda kv: -kv[1])[:4]
    util = b.get("bottleneck_utilization")
    return (f"{b.get('step_ms')} ms/step: " + ", ".join(f"{k} {v:.1f} ms" for k, v in top)
            + f"; waited on I/O {100 * (b.get('io_wait_fraction') or 0):.0f}%, I/O hidden "
            f"{100 * (b.get('io_hidden_fraction') or 0):.0f}%; bottleneck {b.get('bottleneck')}"
            + (f" at {100 * util:.0f}% of its bound" if util else ""))


def markdown(data: dict) -> str:
    parts = header_lines(data.get("machine", {}))
    suite = data.get("suite", {})
    parts.append(f"mode {suite.get('mode')}, time limit {suite.get('time_limit_s')} s, started "
                 f"{suite.get('started_at')}, finished {data.get('finished_at')}")
    parity = data.get("parity")
    if parity:
        parts.append(f"parity ({parity.get('device')}): {parity['status']}: {parity.get('summary', '')}")
    checks = data.get("gpu_checks")
    if checks:
        parts.append(f"gpu_checks: {checks['status']} ({checks.get('wall_s')} s): {checks.get('summary', '')}")
    rows = data.get("rows", [])
    parts += ["", table(rows)]
    notes = [f"- {r['name']}: {r['note']}" for r in rows if r.get("note")]
    notes += [f"- {r['name']} breakdown: {breakdown_line(r['report']['breakdown'])}" for r in rows
              if r.get("report", {}).get("breakdown")]
    for r in rows:  # bench's CUDA graphs (whole decode steps, layers) and why capturing failed, where any ran
        captures, failed = (r.get("report", {}).get(k) for k in ("graph_captures", "graph_failures"))
        if any((captures or {}).values()) or failed:
            notes.append(f"- {r['name']} CUDA graphs captured: {captures}" + (f", failed: {failed}" if failed else ""))
    for r in rows:
        if r["status"] != "ok":
            notes.append(f"- {r['name']} ({r['status']}): {r.get('reason') or _last_line(r.get('error'))}")
        fg = r.get("flexgen")
        if fg and "total_tok_s" not in fg:
            notes.append(f"- {r['name']} FlexGen ({fg['status']}): {fg.get('reason') or _last_line(fg.get('error'))}")
    return "\n".join(parts + ([""] + notes if notes else [])) + "\n"


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1][:200] if lines else ""
