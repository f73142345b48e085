"""--breakdown and --trace: the stage times tile the measured step, bytes per stage equal the engine's counters
(what bench reports as moved per step), and the trace is valid Chrome trace JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.cli.bench import _cache_bytes_read_per_step
from flexgen_lite.cli.breakdown import _exclusive, format_table, step_flops, summarize
from flexgen_lite.cli.chrome_trace import read_trace, write_trace
from flexgen_lite.cli.main import main
from flexgen_lite.engine.trace import COMPUTE_LANE, NULL, STEP, Recorder, Span, StepMark
from flexgen_lite.engine.weights import weight_bytes
from flexgen_lite.kernels import attention
from flexgen_lite.models.hf_config import load_config

from .conftest import PROMPTS, synthetic_profile

PLACEMENTS = {  # --percent
    "all in memory": (100, 0, 100, 0, 100, 0),
    "weights on disk": (0, 0, 100, 0, 100, 0),
    "cache and activations on disk": (100, 0, 0, 0, 0, 0),
}
NEW_TOKENS = 5
# the compute lane's stages tile each step exactly; against the engine's own step time (taken outside the
# step's span, after the device synchronizes) they may differ by this much
TOLERANCE_S, TOLERANCE_REL = 0.002, 0.02


def traced_run(path, percent, tmp_path):
    w_gpu, w_cpu, c_gpu, c_cpu, a_gpu, a_cpu = percent
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, weight_gpu_percent=w_gpu, weight_cpu_percent=w_cpu,
                    cache_gpu_percent=c_gpu, cache_cpu_percent=c_cpu, act_gpu_percent=a_gpu, act_cpu_percent=a_cpu,
                    dtype="float32", offload_dir=str(tmp_path))
    recorder = Recorder()
    m = FlexGenLite(str(path), policy=policy, trace=recorder)
    m.generate_ids(PROMPTS[:4], SamplingConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False))
    return m, recorder


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    out = {}
    for name, percent in PLACEMENTS.items():
        m, recorder = traced_run(tiny_models["opt"][0], percent, tmp_path_factory.mktemp("offload"))
        out[name] = (m, recorder)
    yield out
    for m, _ in out.values():
        m.close()


def per_step(recorder: Recorder):
    """[(step mark, its spans)] with I/O spans given to the step they started in."""
    marks = sorted(recorder.steps, key=lambda m: m.start)
    out = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start if i + 1 < len(marks) else float("inf")
        out.append((mark, [s for s in recorder.spans if mark.start <= s.start < end]))
    return out


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_stage_times_add_up_to_the_step(runs, placement):
    m, recorder = runs[placement]
    measured = [m.engine.times.prefill, *m.engine.times.decode]
    assert len(recorder.steps) == len(measured) == NEW_TOKENS
    shares = []
    for (mark, spans), step_s in zip(per_step(recorder), measured, strict=True):
        compute = [(s, t) for s, t in _exclusive([s for s in spans if s.lane == COMPUTE_LANE])]
        for s, _ in compute:  # every compute-lane span lies inside its step
            assert mark.start <= s.start <= s.end <= mark.end
        total = sum(t for _, t in compute)
        assert total == pytest.approx(mark.end - mark.start, abs=1e-9)
        assert total <= step_s + 1e-6, (total, step_s)  # the step's window lies inside the engine's timing of it
        shares.append(total / step_s)
        stages = {s.stage for s, _ in compute}
        assert {"compute", "schedule (other)"} <= stages
    # and covers nearly all of it: the median step (a step preempted between the two clocks, on a loaded machine,
    # differs by milliseconds; work outside the window would show in every step)
    assert sorted(shares)[len(shares) // 2] >= 1 - TOLERANCE_REL - 0.05, shares
    phases = summarize(recorder.spans, recorder.steps)
    decode = phases["decode"]
    assert decode.steps == NEW_TOKENS - 1
    assert decode.compute_lane_total() <= sum(m.engine.times.decode) + 1e-6
    assert 0.0 <= decode.wait_fraction <= 1.0 and 0.0 <= decode.hidden_fraction <= 1.0


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bytes_per_stage_equal_the_engines_counters(runs, placement):
    m, recorder = runs[placement]
    cache, cfg = m.engine.cache, m.config
    prompt_len = max(len(p) for p in PROMPTS[:4])
    disk_weights = weight_bytes(m.engine.weights, "disk")  # what bench reports as weights moved per step
    for mark, spans in per_step(recorder):
        moved: dict[str, int] = {}
        for s in spans:
            moved[s.stage] = moved.get(s.stage, 0) + s.nbytes
        assert moved.get("weight load (disk)", 0) == disk_weights
        loads = sum(v for k, v in moved.items() if k.startswith("cache load"))
        stores = sum(v for k, v in moved.items() if k.startswith("cache store"))
        if mark.index == 0:
            assert loads == 0
            assert stores == sum(cache.bytes_per_tier().values()) * prompt_len // cache.max_len
        else:  # bench's cache bytes read per step, at this step's length
            assert mark.context == prompt_len + mark.index - 1
            assert loads == pytest.approx(_cache_bytes_read_per_step(m, mark.context), rel=1e-12)
        act_bytes = (2 * cfg.num_layers + 1) * 4 * mark.tokens * cfg.hidden_size * 4  # puts: embed + each layer
        expect_acts = act_bytes if placement == "cache and activations on disk" else 0
        assert moved.get("activation store (disk)", 0) == expect_acts
        assert moved.get("activation load (disk)", 0) == expect_acts
    if placement == "all in memory":
        assert disk_weights == 0 and not any(s.stage.startswith(("weight load", "cache load", "activation"))
                                             for s in recorder.spans)
    if placement == "weights on disk":
        assert disk_weights > 0 and any(s.lane.startswith("io-") for s in recorder.spans)


def test_each_step_notes_its_attention_kernels(runs):
    """The CPU's: torch's SDPA for the prefill, the C kernel (where it is built) for decode steps."""
    decode_kernel = "cpu-native" if attention.native_decode_agrees() else "sdpa-cpu"
    m, recorder = runs["all in memory"]
    assert [s.attention for s in recorder.steps] == ["sdpa-cpu"] + [decode_kernel] * (NEW_TOKENS - 1)
    assert m.engine.times.attention == [s.attention for s in recorder.steps]
    phases = summarize(recorder.spans, recorder.steps)
    assert phases["decode"].attention_kernels == decode_kernel
    assert f"attention kernels: {decode_kernel}" in format_table(phases["decode"], {})


def test_a_disabled_recorder_records_nothing():
    with NULL.span("compute", 10) as s:
        s.nbytes = 5  # accepted and dropped
    with NULL.step(0):
        pass
    assert not hasattr(NULL, "spans")


def check_chrome_trace(path) -> dict:
    """Valid Chrome trace JSON: complete events with lanes named, nested and ordered within each track."""
    data = json.loads(path.read_text())
    events = data["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    spans = [e for e in events if e["ph"] == "X"]
    assert spans and all(e["tid"] in names and e["dur"] >= 0 and {"name", "ts", "pid"} <= set(e) for e in spans)
    for tid in names:
        track = sorted((e for e in spans if e["tid"] == tid), key=lambda e: (e["ts"], -e["dur"]))
        open_ends: list[float] = []
        for e in track:
            while open_ends and open_ends[-1] <= e["ts"] + 1e-3:
                open_ends.pop()
            if open_ends:  # inside the enclosing span, never across its end
                assert e["ts"] + e["dur"] <= open_ends[-1] + 1e-3, (names[tid], e)
            open_ends.append(e["ts"] + e["dur"])
    return data


def test_trace_is_valid_chrome_json_and_reads_back(runs, tmp_path):
    _, recorder = runs["weights on disk"]
    path = tmp_path / "trace.json"
    write_trace(path, recorder.spans, recorder.steps, {"model": "tiny"}, recorder.origin)
    data = check_chrome_trace(path)
    lanes = {e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
    assert COMPUTE_LANE in lanes and any(lane.startswith("io-") for lane in lanes)
    step_names = [e["name"] for e in data["traceEvents"] if e["ph"] == "X" and e["args"]["stage"] == "schedule (other)"]
    assert step_names == ["prefill"] + [f"decode {i}" for i in range(1, NEW_TOKENS)]
    spans, steps, _ = read_trace(path)
    before, after = summarize(recorder.spans, recorder.steps), summarize(spans, steps)
    for phase in before:
        assert set(before[phase].rows) == set(after[phase].rows)
        for stage, row in before[phase].rows.items():
            assert after[phase].rows[stage].nbytes == row.nbytes
            assert after[phase].rows[stage].seconds == pytest.approx(row.seconds, abs=1e-5)


def test_a_step_read_back_keeps_the_spans_starting_with_it(tmp_path):
    """A step's own span starts at the step's start; read back from the trace's microseconds it may round a bit
    below the step's start in seconds, and must still be the step's (it was summed into the step before)."""
    origin = 0.0
    start = next(x for x in (0.0123456789 + k * 1.1e-9 for k in range(10_000)) if (x * 1e6) / 1e6 < x)
    steps = [StepMark(0, origin, start, rows=1, tokens=4), StepMark(1, start, start + 0.02, rows=1, tokens=1)]
    spans = [Span(STEP, COMPUTE_LANE, origin, start), Span(STEP, COMPUTE_LANE, start, start + 0.02)]
    write_trace(tmp_path / "t.json", spans, steps, {}, origin)
    before, after = summarize(spans, steps), summarize(*read_trace(tmp_path / "t.json")[:2])
    for phase in ("prefill", "decode"):
        assert after[phase].rows[STEP].seconds == pytest.approx(before[phase].rows[STEP].seconds, abs=1e-9)
    assert after["decode"].rows[STEP].seconds == pytest.approx(0.02, abs=1e-9)


def test_bench_breakdown_and_trace_flags(tiny_models, tmp_path, capsys):
    trace = tmp_path / "bench.json"
    main(["bench", "--model", str(tiny_models["llama"][0]), "--prompt-len", "8", "--gen-len", "4",
          "--percent", "0", "0", "0", "0", "100", "0", "--gpu-batch-size", "2", "--dtype", "float32",
          "--offload-dir", str(tmp_path), "--breakdown", "--trace", str(trace)])
    out = capsys.readouterr().out
    assert "breakdown (measured with overlap on" in out and "weight load (disk)" in out
    assert "compute waited on I/O" in out and "bottleneck:" in out
    report = json.loads(out.strip().splitlines()[-1])
    b = report["breakdown"]
    assert b["phase"] == "decode" and b["steps"] == 3  # the warm-up's steps are not in it
    assert b["attention_backend"] == report["attention_backend"]
    assert sum(b["stage_ms"][s] for s in b["stage_ms"] if s in ("compute", "attention", "waiting on I/O",
                                                                 "schedule (other)")) <= b["step_ms"] + 0.01
    check_chrome_trace(trace)


@pytest.mark.parametrize("family", ["opt", "opt-350m", "llama", "qwen2"])
def test_step_flops_are_what_transformers_runs(tiny_models, family):
    """The matmul FLOPs the cost model and --breakdown count for a decode step of one token (step_flops, the
    layers' matrices read off their weights) equal what torch's FLOP counter sees transformers' own model do
    for one token: a gated MLP's three matmuls, OPT's projections in and out, the head. (A hand-written list
    once counted four for a gated MLP.)"""
    path, model = tiny_models[family]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.tensor([[1]]))
    assert step_flops(load_config(str(path)), rows=1, tokens=1, context=1)["flops"] == counter.get_total_flops()


def test_the_breakdown_says_whether_overlap_was_on(tiny_models, tmp_path, capsys):
    main(["bench", "--model", str(tiny_models["llama"][0]), "--prompt-len", "8", "--gen-len", "2",
          "--percent", "0", "0", "100", "0", "100", "0", "--gpu-batch-size", "2", "--dtype", "float32",
          "--offload-dir", str(tmp_path), "--breakdown", "--no-overlap"])
    assert "breakdown (measured with overlap off" in capsys.readouterr().out


def test_a_trace_that_cannot_be_written_is_refused_before_the_run(tiny_models, tmp_path, capsys):
    """helper-41: --trace into a missing folder (or onto a folder) ran the whole benchmark, then failed with a
    traceback, its results line lost."""
    for trace, said in ((tmp_path / "missing" / "t.json", "does not exist; create it first"),
                        (tmp_path, "is a directory; pass a file name")):
        with pytest.raises(SystemExit) as e:
            main(["bench", "--model", str(tiny_models["llama"][0]), "--prompt-len", "8", "--gen-len", "2",
                  "--percent", "100", "0", "100", "0", "100", "0", "--dtype", "float32", "--trace", str(trace)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err and "Traceback" not in err and "prefill" not in err


def test_step_flops_price_the_batches_that_hold_rows_and_a_shared_prefix(tiny_models):
    """helper-41: rows // batches priced one row of two batches as none (only fixed costs: the same bound for 1,
    2 or 3 rows); a prefill after a shared prefix left the prefix, computed once, out (2.2x fewer FLOPs). The
    prefix's FLOPs are a one-row prefill's of its length; the rows' queries attend over it too."""
    from flexgen_lite.cli.breakdown import _linears
    from flexgen_lite.planning.layout import Setup, Workload

    config = load_config(str(tiny_models["llama"][0]))
    hw = synthetic_profile()
    setup = Setup(config, Workload(8, 4, 4), Policy(gpu_batch_size=2, num_gpu_batches=2, dtype="float32"), hw)
    one_row = [step_flops(config, 1, 1, 8, batches, hw, "float32", setup)["compute_s"] for batches in (1, 2)]
    assert one_row[0] > 0 and one_row[1] == pytest.approx(one_row[0])  # one batch holds it, the other is empty
    assert _linears(config, 3, 1, 2, hw, "float32", setup)[1] == pytest.approx(
        _linears(config, 2, 1, 1, hw, "float32", setup)[1] + _linears(config, 1, 1, 1, hw, "float32", setup)[1])
    plain, shared = step_flops(config, 4, 8, 0), step_flops(config, 4, 8, 40)
    prefix = step_flops(config, 1, 40, 0)["flops"]
    rows_over_prefix = 4 * 4 * config.num_heads * 8 * 40 * config.head_dim * config.num_layers
    assert shared["flops"] == pytest.approx(plain["flops"] + prefix + rows_over_prefix)


def test_a_cpus_mapped_pages_are_priced_as_mapped_not_as_page_cache_reads():
    """helper-41: a CPU's disk-homed weights are mapped in place; their 'weight load' faults pages in at the
    profile's mapped rate, but was priced at the page-cache read rate and named the bottleneck at 2033% of it.
    The cost model's "mapped pages" seconds are in the report's I/O group (they were in none), and a stage's lanes
    are named whole ('io x3', not 'io-0,io-1,io')."""
    from flexgen_lite.cli.breakdown import GROUPS, _lanes_label, profile_rates

    hw = dataclasses.replace(synthetic_profile(), mapped_read=20e9)
    cpu = profile_rates(hw, "float32", cuda=False, cold_disk=False)
    assert cpu["weight load (disk)"] == cpu["cache load (disk)"] == (hw.mapped_read, "mapped in and out")
    assert profile_rates(hw, "float32", cuda=False, cold_disk=True)["weight load (disk)"][1] == "disk read"
    assert profile_rates(hw, "float32", cuda=True, cold_disk=False)["weight load (disk)"][1] == "page-cache read"
    assert "mapped pages" in GROUPS["I/O (busy)"][1]
    assert _lanes_label({"io-2", "io-0", "io-1"}) == "io x3" and _lanes_label({COMPUTE_LANE, "io-1"}) == \
        f"{COMPUTE_LANE},io-1"
