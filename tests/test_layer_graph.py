"""Decode-step layers replayed one at a time (layer_graph.py) where the schedule streams weights, run eagerly on the
CPU and across the `cpu+link` tier: transformers' tokens and logits under every placement it can take; the eager
schedule where it cannot (CPU attention, rows that finished, activations off compute memory); each graph captured
once and replayed; a failed capture warns once and runs eagerly.
Its CUDA graphs themselves: test_gpu_hot_path.py."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import flexgen_lite.engine.layer_graph as layer_graph
from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.engine.layer_graph import LayerGraphs

from .conftest import PROMPTS, make_checkpoint
from .test_decode_graph import EQUAL, SAMPLING, FakeGraph, P, assert_same, finished_row_runs

WEIGHTS_OFF = (0, 100, 100, 0, 100, 0)


@pytest.fixture(autouse=True)
def no_failure_yet(monkeypatch):
    monkeypatch.setattr(layer_graph, "_failed", [])


@pytest.fixture
def layer_runs(monkeypatch) -> list[tuple[str, int, int]]:
    """(kind, batch, position) of every layer run from its graph."""
    runs, real = [], LayerGraphs.run

    def run(self, spec, weights, h, cache, block, b, start):
        out = real(self, spec, weights, h, cache, block, b, start)
        if out is not None:
            runs.append((spec.kind, b, start))
        return out

    monkeypatch.setattr(LayerGraphs, "run", run)
    return runs


def generate(model_dir, prompts, policy, graphs: bool, device="cpu+link", sampling=SAMPLING, capture=False):
    with FlexGenLite(str(model_dir), policy=policy, device=device) as m:
        m.engine.layer_graph_decode, m.engine.layer_graphs.capture = graphs, capture
        ids, logits = m.generate_ids(prompts, sampling, return_logits=True)
        return ids, logits, m.engine.times.attention


@pytest.mark.parametrize("family", ["opt", "llama", "gemma2", "gpt-oss"])
# learned positions; rope, grouped heads; capped scores, windows (rings); sinks and windows
def test_layers_from_graphs_match_transformers_with_weights_streamed(tiny_models, references, layer_runs, family):
    """Weights in host RAM, crossing the link each step into slots: every decode step's attention and MLP layers
    of both batches run from their graphs, with transformers' tokens and logits (left-padded rows too)."""
    ours = generate(tiny_models[family][0], PROMPTS, P(WEIGHTS_OFF), graphs=True)
    assert_same(ours, references[family])
    layers = tiny_models[family][1].config.num_hidden_layers
    moe = family == "gpt-oss"  # its experts stay eager (host-side routing)
    attention = [run for run in layer_runs if run[0] == "attention"]
    assert len(layer_runs) == len(attention) * (1 if moe else 2)
    # every layer of each batch's decode steps; the first block's 2 batches x 7 at least (a batch with a filler
    # row, finished from the start, runs eagerly)
    assert len(attention) % layers == 0 and len(attention) // layers >= 2 * 7
    assert "graph+" in ours[2][1], ours[2]  # (the last block: its batch with a filler row eager)


@pytest.mark.parametrize("percent,kinds", [
    ((0, 100, 100, 0, 0, 100), set()),  # hidden states in host RAM between layers: eager
    ((100, 0, 0, 100, 100, 0), {"mlp"}),  # cache in host RAM, read across the link: MLPs from graphs
    ((50, 50, 100, 0, 100, 0), {"attention", "mlp"}),  # half the layers resident, half streamed
], ids=["activations-off", "cache-off", "weights-half"])
def test_what_each_placement_runs_from_graphs(tiny_models, references, layer_runs, percent, kinds):
    ours = generate(tiny_models["opt"][0], PROMPTS, P(percent), graphs=True)
    assert {kind for kind, _, _ in layer_runs} == kinds
    assert_same(ours, references["opt"])


def test_cpu_attention_and_4_bit_weights(tiny_models, layer_runs):
    """CPU attention beside the link (its layers eager, its MLPs from graphs), and 4-bit weights dequantized into
    slots (every layer from graphs): the eager schedule's tokens and logits."""
    model_dir = tiny_models["llama"][0]
    for policy in (dataclasses.replace(P((100, 0, 0, 100, 100, 0)), cpu_cache_compute=True),
                   dataclasses.replace(P(WEIGHTS_OFF), compress_weight=True)):
        layer_runs.clear()
        graphed = generate(model_dir, PROMPTS, policy, graphs=True)
        kinds = {kind for kind, _, _ in layer_runs}
        assert kinds == ({"mlp"} if policy.cpu_cache_compute else {"attention", "mlp"})
        assert_same(graphed, generate(model_dir, PROMPTS, policy, graphs=False), atol=1e-4)


def test_breakdown_names_a_graphed_attention_layer(tiny_models, layer_runs):
    """--breakdown: a decode attention layer replayed whole is its own stage (its projections and attention are
    one launch, which no span splits), one span a replay; no eager attention span is left in those steps, and the
    compute resource's busy time counts the stage (its products are in the step's FLOPs)."""
    from flexgen_lite.cli.breakdown import resources, step_flops, summarize
    from flexgen_lite.engine.trace import ATTENTION, GRAPH_ATTENTION, Recorder

    recorder = Recorder()
    with FlexGenLite(str(tiny_models["opt"][0]), policy=P(WEIGHTS_OFF), device="cpu+link", trace=recorder) as m:
        m.engine.layer_graph_decode = True
        m.generate_ids(PROMPTS[:4], SAMPLING)
        config = m.config
    decode = [mark for mark in recorder.steps if mark.phase == "decode"]
    graphed = [s for s in recorder.spans if s.stage == GRAPH_ATTENTION]
    assert len(graphed) == sum(kind == "attention" for kind, _, _ in layer_runs) == \
        len(decode) * 2 * config.num_layers
    assert not any(s.stage == ATTENTION and any(d.start <= s.start <= d.end for d in decode)
                   for s in recorder.spans)
    info = [step_flops(config, 4, mark.tokens, mark.context, 2) for mark in recorder.steps]
    phase = summarize(recorder.spans, recorder.steps, info)["decode"]
    assert phase.rows[GRAPH_ATTENTION].seconds > 0
    compute = next(r for r in resources(phase, {}, cuda=False) if r["resource"] == "compute")
    busy = phase.rows["compute"].seconds + phase.rows[GRAPH_ATTENTION].seconds
    assert compute["busy_rate"] == pytest.approx(phase.flops / busy)


@pytest.mark.parametrize("every_row", [False, True], ids=["eager-after", "every-row-replayed"])
def test_rows_that_finish(tiny_models, layer_runs, monkeypatch, every_row):
    """A batch with a finished row (as eos would end it): where computing every row wins (the profile:
    LayerGraphs.every_row_wins), its layers keep replaying over all rows, the finished one computed and not sampled;
    else they run eagerly over the rows left (the graphs are for all rows). The other batch stays graphed; every
    row's tokens and logits are the eager schedule's."""
    monkeypatch.setattr(LayerGraphs, "every_row_wins", lambda self, block, active: every_row)
    finished_row_runs(tiny_models["opt"][0], P(WEIGHTS_OFF), "cpu+link", "layer_graph_decode")
    prompt_len = len(EQUAL[0])
    last = prompt_len + (6 if every_row else 1)  # graphed to the end, or until row 0 finished
    assert max(start for _, b, start in layer_runs if b == 0) == last
    assert max(start for _, b, start in layer_runs if b == 1) == prompt_len + 6


def test_not_every_row_where_a_cpu_attends(tiny_models, layer_runs, monkeypatch):
    """Where a batch's cache is attended on the CPU its attention is never a graph's: computing the finished rows
    would only give the CPU more to read. After row 0 finishes, batch 0's MLPs run eagerly over the rows left."""
    monkeypatch.setattr(LayerGraphs, "every_row_wins", lambda self, block, active: True)
    policy = dataclasses.replace(P((100, 0, 0, 100, 100, 0)), cpu_cache_compute=True)
    finished_row_runs(tiny_models["llama"][0], policy, "cpu+link", "layer_graph_decode")
    prompt_len = len(EQUAL[0])
    assert {kind for kind, _, _ in layer_runs} == {"mlp"}
    assert max(start for _, b, start in layer_runs if b == 0) == prompt_len + 1
    assert max(start for _, b, start in layer_runs if b == 1) == prompt_len + 6


def test_every_row_only_where_the_finished_rows_cost_less_than_the_eager_layers(tiny_models, monkeypatch):
    """LayerGraphs.every_row_wins: the finished rows' attention over the whole cache, every layer, against the
    eager layers' measured overhead less a replay's. Dear launches or a cheap cache: every row; cheap launches and a
    dear cache: the eager layers over the rows left; no profile: every row."""
    import types

    from .conftest import synthetic_profile

    hw = synthetic_profile(cuda=True)
    with FlexGenLite(str(tiny_models["opt"][0]), policy=P(WEIGHTS_OFF, gbs=8, nb=1), device="cpu+link") as m:
        graphs = m.engine.layer_graphs
    block = types.SimpleNamespace(prompt_len=512, gen_len=32)

    def wins(overhead: float, rate: float, active: int, profile: bool = True) -> bool:
        h = dataclasses.replace(hw, layer_overhead=dict.fromkeys(("llama", "opt"), (overhead, overhead)),
                                op_overhead=0.0, attention=dict.fromkeys(hw.attention, (1e-6, rate)),
                                attention_grouped={})
        monkeypatch.setattr(layer_graph, "cached_profile", lambda device: h if profile else None)
        graphs._every_row.clear()
        return graphs.every_row_wins(block, active)

    assert wins(1e-3, 1e12, 1)
    assert not wins(1e-9, 1e6, 1)
    assert wins(1e-4, 5e9, 7) and not wins(1e-4, 5e9, 1)  # one row of 8 finished, and seven
    assert wins(1e-9, 1e6, 1, profile=False)


def test_each_graph_captured_once_and_replayed(tmp_path, monkeypatch):
    """A 4-layer model with streamed weights (two slots a kind, each refilled every other layer): per batch, one
    graph per layer (its norms and biases, resident, are its own), captured at the first decode step and replayed
    at every later one, a second block included (the same cache); the eager schedule's outputs."""
    make_checkpoint(tmp_path, "opt", seed=3, num_hidden_layers=4)
    counts = {"captures": 0, "replays": 0}

    def capture(forward, pool):
        counts["captures"] += 1
        return FakeGraph(forward, counts)

    monkeypatch.setattr(layer_graph, "capture_graph", capture)
    eager = generate(tmp_path, EQUAL, P(WEIGHTS_OFF), graphs=False)
    with FlexGenLite(str(tmp_path), policy=P(WEIGHTS_OFF), device="cpu+link") as m:
        m.engine.layer_graph_decode, m.engine.layer_graphs.capture = True, True
        for _ in range(2):
            ids, logits = m.generate_ids(EQUAL, SAMPLING, return_logits=True)
            assert_same((ids, logits), eager)
        assert m.engine.layer_graphs.captures == counts["captures"]
    assert counts["captures"] == 2 * 2 * 4  # batches, kinds, layers
    assert counts["replays"] == 2 * 7 * 2 * 2 * 4  # two blocks, 7 decode steps, batches, kinds, layers


def test_a_failed_capture_warns_once_and_runs_eagerly(tiny_models, references, monkeypatch, layer_runs):
    def capture(forward, pool):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(layer_graph, "capture_graph", capture)
    with FlexGenLite(str(tiny_models["opt"][0]), policy=P(WEIGHTS_OFF), device="cpu+link") as m:
        m.engine.layer_graph_decode, m.engine.layer_graphs.capture = True, True
        with pytest.warns(UserWarning, match="decode steps' layers failed here.*operation not permitted"):
            first = m.generate_ids(PROMPTS, SAMPLING, return_logits=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            second = m.generate_ids(PROMPTS, SAMPLING, return_logits=True)
    assert layer_runs == [] and layer_graph._failed
    assert_same(first, references["opt"])
    assert_same(second, references["opt"])


def test_a_replay_that_disagrees_with_the_eager_run_is_refused(tiny_models, references, monkeypatch):
    class WrongGraph(FakeGraph):
        def replay(self) -> None:
            self.forward().mul_(-1)

    monkeypatch.setattr(layer_graph, "capture_graph", lambda forward, pool: WrongGraph(forward, {}))
    with FlexGenLite(str(tiny_models["opt"][0]), policy=P(WEIGHTS_OFF), device="cpu+link") as m:
        m.engine.layer_graph_decode, m.engine.layer_graphs.capture = True, True
        with pytest.warns(UserWarning, match="differs from the eager run's"):
            out = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=8, stop_at_eos=False),
                                 return_logits=True)
    assert_same(out, references["opt"])


def test_a_layers_replay_equal_up_to_rounding_is_kept_though_its_largest_entry_moves():
    """A layer's output is a hidden state, not logits: its largest entry moving by a rounding's worth (a near
    tie) changes no greedy token, so the layer's graph stays; a step's logits must still keep their tokens."""
    from flexgen_lite.engine.decode_graph import check_replay

    eager = torch.tensor([[1.0, 3.0, 3.0001, -2.0]])
    replayed = torch.tensor([[1.0, 3.0002, 3.0001, -2.0]])  # within rounding; the largest entry moved
    check_replay(replayed, eager, logits=False)
    with pytest.raises(RuntimeError, match="differs from the eager run's"):
        check_replay(replayed, eager)  # as logits: another token
    with pytest.raises(RuntimeError, match="differs from the eager run's by 1"):
        check_replay(eager + torch.tensor([[0.0, 0.0, 0.0, 1.0]]), eager, logits=False)


def test_the_cost_model_prices_replayed_layers(monkeypatch):
    """On CUDA a decode step's layers that the engine replays from graphs (products_cost.layer_graphed: as
    LayerGraphs.usable decides them) cost a replay's few calls a batch, not the eager layer's measured overhead;
    activations off the GPU, a cache it does not hold or a CPU attending keep theirs; graphs off: all eager."""
    from flexgen_lite.engine import decode_graph
    from flexgen_lite.planning.cost_model import predict
    from flexgen_lite.planning.layout import Setup, Workload
    from flexgen_lite.planning.products_cost import layer_graphed

    from .conftest import synthetic_profile
    from .test_cost_model_cuda import CONFIG

    hw, work = synthetic_profile(cuda=True), Workload(512, 32, 256)

    def policy(percent, **kw):
        return dataclasses.replace(P(percent, gbs=32, nb=4), dtype="float16", **kw)

    def graphed(p) -> set[str]:
        return {kind for kind in ("attention", "mlp") if layer_graphed(Setup(CONFIG, work, p, hw), kind)}

    assert graphed(policy(WEIGHTS_OFF)) == graphed(policy(WEIGHTS_OFF, compress_weight=True)) == {"attention", "mlp"}
    assert graphed(policy((0, 100, 0, 100, 100, 0))) == {"mlp"}
    assert graphed(policy((0, 100, 100, 0, 0, 100))) == set()
    assert graphed(policy((100, 0, 0, 100, 100, 0), cpu_cache_compute=True)) == {"mlp"}
    replayed = predict(CONFIG, work, policy(WEIGHTS_OFF), hw).decode_by["overhead"]
    monkeypatch.setenv(decode_graph.ENV, "0")
    assert graphed(policy(WEIGHTS_OFF)) == set()
    assert predict(CONFIG, work, policy(WEIGHTS_OFF), hw).decode_by["overhead"] > replayed


def test_a_shared_prefix_spread_into_each_row(tiny_models, layer_runs):
    """Prompts sharing an instruction, computed once in the prefill and spread into every row's cache: the graphed
    layers attend it there as the eager ones do (transformers' tokens and logits)."""
    from .conftest import hf_greedy
    from .test_parity import POLICIES
    from .test_shared_prefix import SHARED_PROMPTS

    family = "llama3"
    sampling = SamplingConfig(max_new_tokens=6, stop_at_eos=False)
    ours = generate(tiny_models[family][0], SHARED_PROMPTS, POLICIES["weights-disk"], graphs=True, sampling=sampling)
    assert {kind for kind, _, _ in layer_runs} == {"attention", "mlp"}
    assert_same(ours, hf_greedy(tiny_models[family][1], SHARED_PROMPTS, 6))


@pytest.mark.parametrize("family", ["opt", "llama", "gemma2"])
def test_recorded_graphs_replay_as_cuda_would(tiny_models, references, monkeypatch, without_native, family):
    """Layers captured as RecordedGraph (a CUDA graph's semantics on a CPU: the ops replayed on the captured
    tensors, Python never rerun, host values baked in): transformers' tokens and logits, so nothing a step changes
    is read on the host at capture (positions, masks, the slot's weights are all device-side)."""
    from .recorded_graph import RecordedGraph

    monkeypatch.setattr(layer_graph, "capture_graph", lambda forward, pool: RecordedGraph(forward))
    ours = generate(tiny_models[family][0], PROMPTS, P(WEIGHTS_OFF), graphs=True, capture=True)
    assert "graph+" in ours[2][1] and not layer_graph._failed
    assert_same(ours, references[family])


@pytest.mark.parametrize("policy", [dataclasses.replace(P(WEIGHTS_OFF), compress_weight=True),
                                    dataclasses.replace(P((100, 0, 0, 100, 100, 0)), cpu_cache_compute=True),
                                    P((50, 50, 100, 0, 100, 0))],
                         ids=["4-bit-weights", "cpu-attention", "weights-half"])
def test_recorded_graphs_under_other_placements(tiny_models, monkeypatch, without_native, policy):
    """The same recorded replays with 4-bit weights dequantized into slots, CPU attention beside them (its MLPs
    graphed) and half the layers resident: the eager schedule's tokens and logits."""
    from .recorded_graph import RecordedGraph

    model_dir = tiny_models["llama"][0]
    eager = generate(model_dir, PROMPTS, policy, graphs=False)
    monkeypatch.setattr(layer_graph, "capture_graph", lambda forward, pool: RecordedGraph(forward))
    ours = generate(model_dir, PROMPTS, policy, graphs=True, capture=True)
    assert not layer_graph._failed
    assert_same(ours, eager, atol=1e-4)


def test_the_cost_model_prices_a_graphs_attention_over_the_whole_cache(monkeypatch):
    """A graphed layer attends the cache's whole length each step (its shapes constant), the eager one the
    positions so far: half the generated ones on average. With gen as long as the prompt, the graphed decode
    attention costs 4/3 of the eager one."""
    from flexgen_lite.engine import decode_graph
    from flexgen_lite.planning.cost_model import predict
    from flexgen_lite.planning.layout import Workload

    from .conftest import synthetic_profile
    from .test_cost_model_cuda import CONFIG

    hw, work = synthetic_profile(cuda=True), Workload(512, 512, 64)
    policy = dataclasses.replace(P(WEIGHTS_OFF, gbs=32, nb=2), dtype="float16")
    graphed = predict(CONFIG, work, policy, hw).decode_by["attention"]
    monkeypatch.setenv(decode_graph.ENV, "0")
    eager = predict(CONFIG, work, policy, hw).decode_by["attention"]
    assert graphed / eager == pytest.approx(1024 / 768, rel=0.05)


def test_recorded_graphs_over_every_row_after_one_finished(tiny_models, monkeypatch, without_native, layer_runs):
    """Recorded replays (CUDA's semantics) over every row of a batch one of whose rows finished: the eager
    schedule's tokens and logits for every row, the batch graphed to the end."""
    from .recorded_graph import RecordedGraph

    monkeypatch.setattr(layer_graph, "capture_graph", lambda forward, pool: RecordedGraph(forward))
    monkeypatch.setattr(LayerGraphs, "every_row_wins", lambda self, block, active: True)
    finished_row_runs(tiny_models["llama"][0], P(WEIGHTS_OFF), "cpu+link", "layer_graph_decode",
                      prepare=lambda engine: setattr(engine.layer_graphs, "capture", True))
    assert max(start for _, b, start in layer_runs if b == 0) == len(EQUAL[0]) + 6



def test_bench_says_which_graphs_ran(tiny_models, tmp_path, monkeypatch):
    """bench's report counts the graphs captured (whole steps, layers) and why capturing failed, and says so in a
    line where any were tried: none on a CPU; on a GPU, e.g. the layers of a row whose weights stream."""
    from flexgen_lite.cli.bench import format_report, run_benchmark

    policy = dataclasses.replace(P(WEIGHTS_OFF), offload_dir=str(tmp_path))
    report = run_benchmark(str(tiny_models["opt"][0]), 6, 3, policy, "cpu+link")
    assert report["graph_captures"] == {"steps": 0, "layers": 0} and report["graph_failures"] == []
    assert "CUDA graphs" not in format_report(report)
    monkeypatch.setattr(layer_graph, "_failed", ["operation not permitted when stream is capturing"])
    assert layer_graph.failures() == ["operation not permitted when stream is capturing"]
    report.update(graph_captures={"steps": 0, "layers": 16}, graph_failures=layer_graph.failures())
    assert ("CUDA graphs: 0 whole decode steps, 16 decode layers captured; failed: operation not permitted when "
            "stream is capturing") in format_report(report)
