"""The constant-shape decode step (decode_graph.py), run eagerly on the CPU: the same tokens and logits as the
engine's own path and as transformers; used only where it can run; a failed capture falls back once, with a
warning. Its CUDA graphs themselves: test_gpu_hot_path.py."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import flexgen_lite.engine.decode_graph as decode_graph
from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.engine.decode_graph import StaticDecode

from .conftest import PROMPTS, hf_greedy

LOGITS_ATOL = 2e-4  # fp32 on both sides, as test_parity
EQUAL = [[2, 17, 43, 99, 120], [2, 300, 5, 6, 7], [2, 88, 91, 92, 93], [2, 400, 401, 402, 403]]
SAMPLING = SamplingConfig(max_new_tokens=8, stop_at_eos=False)


def P(percent=(100, 0, 100, 0, 100, 0), gbs=2, nb=2) -> Policy:
    w_g, w_c, c_g, c_c, a_g, a_c = percent
    return Policy(gpu_batch_size=gbs, num_gpu_batches=nb, weight_gpu_percent=w_g, weight_cpu_percent=w_c,
                  cache_gpu_percent=c_g, cache_cpu_percent=c_c, act_gpu_percent=a_g, act_cpu_percent=a_c,
                  dtype="float32")


@pytest.fixture(autouse=True)
def no_failure_yet(monkeypatch):
    monkeypatch.setattr(decode_graph, "_failed", [])


@pytest.fixture
def static_runs(monkeypatch) -> list[tuple[int, int]]:
    """(batch, position written) of every static step run."""
    runs, real = [], StaticDecode.run

    def run(self, cache, block, b, start):
        out = real(self, cache, block, b, start)
        if out is not None:
            runs.append((b, start))
        return out

    monkeypatch.setattr(StaticDecode, "run", run)
    return runs


def generate(model_dir, prompts, policy: Policy, static: bool, device: str = "cpu", sampling=SAMPLING):
    with FlexGenLite(str(model_dir), policy=policy, device=device) as m:
        m.engine.static_decode = static
        ids, logits = m.generate_ids(prompts, sampling, return_logits=True)
        return ids, logits, m.engine.times.attention


def assert_same(a, b, atol=LOGITS_ATOL) -> None:
    assert a[0] == b[0]
    for x, y in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


KERNELS = {"gemma2": "softcap", "gpt-oss": "sinks"}  # the static step's: from the whole scores
PREFILLS = {"gemma2": "softcap", "gpt-oss": "fused-sinks"}  # gpt-oss's: SDPA's log-sum-exp (sink_attention)


@pytest.mark.parametrize("family", ["opt", "llama", "qwen3", "mixtral", "qwen2-moe", "gemma2", "gpt-oss"])
# learned positions; rope, grouped heads; q/k norms; experts (each over every row: layers.every_expert), a shared
# expert; capped scores and windows (rings); sinks, windows and gpt-oss's experts
@pytest.mark.parametrize("padded", [False, True], ids=["equal-lengths", "left-padded"])
def test_static_step_matches_the_engine_and_transformers(tiny_models, references, static_runs, family, padded):
    model_dir, model = tiny_models[family]
    prompts = PROMPTS if padded else EQUAL
    reference = references[family] if padded else hf_greedy(model, EQUAL, 8)
    static = generate(model_dir, prompts, P(), static=True)
    assert_same(static, reference)
    assert_same(static, generate(model_dir, prompts, P(), static=False))
    used = {b for b, _ in static_runs}
    assert used == {0, 1} and len(static_runs) >= 2 * 7  # both GPU batches, every decode step of a full block
    if padded:  # the last block (prompts of 4, 3 and 2 tokens): batch 1's filler row computed, not sampled
        assert sorted(static_runs[-14:]) == [(b, p) for b in (0, 1) for p in range(4, 11)]
        assert static[2][-1] == f"static+{KERNELS.get(family, 'sdpa-cpu')}"
    else:
        kernel = KERNELS.get(family, "sdpa-cpu")
        assert static[2] == [PREFILLS.get(family, "sdpa-cpu")] + [f"static+{kernel}"] * 7


def finished_row_runs(model_dir, policy: Policy, device: str, switch: str, prepare=None) -> None:
    """Row 0 ends after the third step (as eos would): the engine's tokens and logits, every row's, the same with
    the Engine attribute `switch` off and on (and then prepare(engine), where given)."""
    def finish_row_0(block) -> None:
        if block.generated == 3:
            block.finished[0] = True

    results = []
    for on in (False, True):
        with FlexGenLite(str(model_dir), policy=policy, device=device) as m:
            setattr(m.engine, switch, on)
            if on and prepare is not None:
                prepare(m.engine)
            block = m._run_block(EQUAL, SAMPLING, keep_logits=True, report=finish_row_0)
            results.append(([block.new_tokens(r) for r in range(4)], torch.stack(m.engine.logits)))
    assert results[0][0] == results[1][0] and len(results[0][0][0]) == 3
    torch.testing.assert_close(results[0][1], results[1][1], atol=LOGITS_ATOL, rtol=0, equal_nan=True)


def test_kept_after_a_row_finishes(tiny_models, static_runs):
    """A row of batch 0 ends after the third step (as eos would): both batches stay static to the end (the
    finished row computed, not sampled), and every row's tokens and logits are the engine's own."""
    finished_row_runs(tiny_models["llama"][0], P(), "cpu", "static_decode")
    prompt_len = len(EQUAL[0])
    assert [s for b, s in static_runs if b == 0] == list(range(prompt_len, prompt_len + 7))
    assert [s for b, s in static_runs if b == 1] == list(range(prompt_len, prompt_len + 7))


def test_kept_after_eos(tiny_models, static_runs):
    """Row 0 emits eos (its third token made the model's eos here): batch 0 stays static; the outputs are the
    engine's own, cut at eos."""
    model_dir = tiny_models["opt"][0]
    full = generate(model_dir, EQUAL, P(), static=False)[0]
    eos = full[0][2]
    assert eos not in full[0][:2]
    sampling = SamplingConfig(max_new_tokens=8, stop_at_eos=True)
    results = []
    for static in (False, True):
        with FlexGenLite(str(model_dir), policy=P(), device="cpu") as m:
            m.config = dataclasses.replace(m.config, eos_token_id=[eos])
            m.engine.static_decode = static
            results.append(m.generate_ids(EQUAL, sampling, return_logits=True))
    assert_same(results[1], results[0])
    assert results[1][0][0] == full[0][:3]
    prompt_len = len(EQUAL[0])
    assert (0, prompt_len + 2) in static_runs and (0, prompt_len + 1) in static_runs


@pytest.mark.parametrize("percent", [(0, 100, 100, 0, 100, 0), (100, 0, 0, 100, 100, 0), (100, 0, 100, 0, 0, 100)],
                         ids=["weights-off", "cache-off", "activations-off"])
def test_not_used_off_compute_memory(tiny_models, references, static_runs, percent):
    """Across a link, weights, cache or activations in host RAM: the eager schedule, the same outputs."""
    ours = generate(tiny_models["opt"][0], PROMPTS, P(percent), static=True, device="cpu+link")
    assert static_runs == []
    assert_same(ours, references["opt"])


def test_not_used_with_attention_sparsity(tiny_models, static_runs):
    policy = dataclasses.replace(P(), attn_sparsity=0.5)
    sparse = generate(tiny_models["opt"][0], EQUAL, policy, static=True)
    assert static_runs == [] and sparse[2][1:] == ["topk"] * 7


class FakeGraph:
    """A captured graph on a CPU: replay runs the function again."""

    def __init__(self, forward, counts) -> None:
        self.forward, self.counts = forward, counts

    def replay(self) -> None:
        self.counts["replays"] += 1
        self.forward()


def test_captured_once_per_batch_and_replayed_each_step(tiny_models, monkeypatch):
    counts = {"captures": 0, "replays": 0}

    def capture(forward, pool):
        counts["captures"] += 1
        return FakeGraph(forward, counts)

    monkeypatch.setattr(decode_graph, "capture_graph", capture)
    eager = generate(tiny_models["llama"][0], EQUAL, P(), static=False)
    with FlexGenLite(str(tiny_models["llama"][0]), policy=P(), device="cpu") as m:
        m.engine.static_decode, m.engine.static.capture = True, True
        for _ in range(2):  # the second block reuses the first one's cache, buffers and graphs
            ids, logits = m.generate_ids(EQUAL, SAMPLING, return_logits=True)
            assert_same((ids, logits), eager)
            assert m.engine.times.attention[1:] == ["graph+sdpa-cpu"] * 7
    assert counts == {"captures": 2, "replays": 2 * 2 * 7}


def test_a_failed_capture_warns_once_and_runs_eagerly(tiny_models, references, monkeypatch, static_runs):
    def capture(forward, pool):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(decode_graph, "capture_graph", capture)
    with FlexGenLite(str(tiny_models["opt"][0]), policy=P(), device="cpu") as m:
        m.engine.static_decode, m.engine.static.capture = True, True
        with pytest.warns(UserWarning, match="CUDA graphs for decode steps failed here.*operation not permitted.*"
                                             "run eagerly from now on"):
            first = m.generate_ids(PROMPTS, SAMPLING, return_logits=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            second = m.generate_ids(PROMPTS, SAMPLING, return_logits=True)
        assert "graph" not in "".join(m.engine.times.attention)
    assert static_runs == [] and decode_graph._failed
    assert_same(first, references["opt"])
    assert_same(second, references["opt"])


def test_a_replay_that_disagrees_with_the_eager_step_is_refused(tiny_models, references, monkeypatch):
    """A graph whose first replay gives other logits than the eager step of the same inputs (a value baked in
    at capture, say) is dropped with one warning, and the outputs are the eager path's."""
    class WrongGraph(FakeGraph):
        def replay(self) -> None:
            self.forward().mul_(-1)

    monkeypatch.setattr(decode_graph, "capture_graph", lambda forward, pool: WrongGraph(forward, {}))
    with FlexGenLite(str(tiny_models["opt"][0]), policy=P(), device="cpu") as m:
        m.engine.static_decode, m.engine.static.capture = True, True
        with pytest.warns(UserWarning, match="replayed graph's output differs"):
            out = m.generate_ids(PROMPTS, SAMPLING, return_logits=True)
        assert "graph" not in "".join(m.engine.times.attention)
    assert_same(out, references["opt"])


def test_graphs_follow_the_environment(monkeypatch):
    monkeypatch.delenv(decode_graph.ENV, raising=False)
    assert decode_graph.graphs_wanted() == (decode_graph.DEFAULT == "1")
    monkeypatch.setenv(decode_graph.ENV, "0")
    assert not decode_graph.graphs_wanted()
    monkeypatch.setenv(decode_graph.ENV, "1")
    assert decode_graph.graphs_wanted()


def test_a_replay_over_finished_rows_only_where_the_profile_finds_it_cheaper(tiny_models):
    """On CUDA a batch with finished rows replays its graph over every row, or steps eagerly over those left, by
    the profile (decode_graph.replay_wins): launches dear and attention cheap, the replay; launches cheap and the
    cache's reads dear (a large cache), the eager step over the rows left; all rows generating or no profile, the
    replay."""
    from .conftest import synthetic_profile

    with FlexGenLite(str(tiny_models["llama"][0]), policy=P(gbs=4, nb=1), device="cpu") as m:
        static = m.engine.static
        hw = synthetic_profile(cuda=True)

        def wins(overhead: float, attention_rate: float, active: int, profile=True) -> bool:
            h = dataclasses.replace(hw, layer_overhead=dict.fromkeys(("llama", "opt"), (overhead, overhead)),
                                    attention=dict.fromkeys(hw.attention, (1e-6, attention_rate)))
            return decode_graph.replay_wins(h if profile else None, m.config, static.specs, static.weights,
                                            "float32", 4, active, 2048)

        assert wins(1e-3, 1e12, 1)
        assert not wins(1e-9, 1e6, 1)
        assert wins(1e-9, 1e6, 4) and wins(1e-9, 1e6, 1, profile=False)


# ---- 4-bit weights held as codes in compute memory -----------------------------------------------------------------
def test_static_step_multiplies_4_bit_codes_as_stored(tiny_models, static_runs, monkeypatch):
    """`--compress-weight` with the weights in compute memory: the static step multiplies the decoder's 4-bit
    matrices by the kernel as stored (Triton's interpreter here; a CUDA graph on a GPU), every decode step of both
    batches, with the tokens and logits of the engine's eager step over the same codes, and of the eager step
    that dequantizes them into slots. Without the kernel, no static step."""
    pytest.importorskip("triton")
    import flexgen_lite.kernels.int4_gemv_triton as gemv

    monkeypatch.setenv(gemv.ENV, "triton")
    calls, matmul = [], gemv.matmul
    monkeypatch.setattr(gemv, "matmul", lambda x, q, splits=None: calls.append(x.numel() // x.shape[-1])
                        or matmul(x, q, splits))
    policy = dataclasses.replace(P(), compress_weight=True)
    model_dir = tiny_models["llama"][0]
    with FlexGenLite(str(model_dir), policy=policy, device="cpu+link") as m:
        graphed = [w for w in m.engine.static.weights[1:-1]]  # the decoder's layers
        assert all(isinstance(w, gemv.CodesMatrix) and w.slot is None for layer in graphed for w in layer.values()
                   if len(w.shape) == 2) and m.engine.static.possible
        products = 7 * m.config.num_layers  # q, k, v, o, gate, up, down a layer
    short = SamplingConfig(max_new_tokens=4, stop_at_eos=False)  # 3 decode steps (the interpreter is slow)
    static = generate(model_dir, EQUAL, policy, static=True, device="cpu+link", sampling=short)
    assert sorted({b for b, _ in static_runs}) == [0, 1] and len(static_runs) == 2 * 3
    assert calls.count(2) == 2 * 3 * products  # a batch's 2 rows, every decode step (the prefill's 10 apart)
    calls.clear()
    eager = generate(model_dir, EQUAL, policy, static=False, device="cpu+link", sampling=short)
    assert calls.count(2) == 2 * 3 * products
    assert_same(static, eager, atol=1e-4)
    monkeypatch.delenv(gemv.ENV)
    monkeypatch.setenv("FLEXGEN_LITE_TRITON", "0")
    static_runs.clear()
    slots = generate(model_dir, EQUAL, policy, static=True, device="cpu+link", sampling=short)
    assert static_runs == []
    assert_same(static, slots, atol=1e-4)


def test_codes_in_the_graph_only_where_the_profile_finds_it_cheaper():
    """decode_graph.codes_graph_wins: a graphed step runs the kernel for every batch's product, the eager step the
    faster of the kernel and one dequantization plus dense products, and pays its overhead a layer. A kernel no
    slower than the slot, or overhead dear: the graph; a kernel far slower with cheap launches: the eager step;
    no measured kernel: the graph."""
    from flexgen_lite.kernels.quantization import CompressionConfig, quantize

    from .conftest import synthetic_profile

    hw = synthetic_profile(cuda=True)
    q = quantize(torch.randn(256, 512), CompressionConfig(4, 64, 1))
    layers = [None, {"w": decode_graph.CodesMatrix(q, None), "b": torch.zeros(256)}, None]
    assert decode_graph.codes_shapes(layers) == [[], [(256, 512)], []]
    (n, k), rows = q.shape, 16
    dense, fill = hw.matmul_time("float16", rows, k, n), n * k / hw.dequantize["float16"]

    def wins(kernel: float, overhead: float, batches: int, measured: bool = True) -> bool:
        h = dataclasses.replace(hw, int4_gemv={"float16": [(rows, 1e30, kernel)]} if measured else {},
                                layer_overhead=dict.fromkeys(("llama", "opt"), (overhead, overhead)))
        return decode_graph.codes_graph_wins(h, "opt", decode_graph.codes_shapes(layers), "float16", rows, batches)

    assert wins(dense, 1e-9, 4)  # as fast as a dense product
    assert not wins(dense + fill, 1e-9, 4)  # 4 batches: 4 fills' worth against 1
    assert wins(dense + fill, 1e-3, 4)  # ... unless launches cost more
    assert wins(dense + fill, 1e-9, 1)  # 1 batch: a fill either way
    assert wins(1.0, 1e-9, 4, measured=False)


def test_the_cost_model_prices_the_graphed_step_over_codes(monkeypatch):
    """A plan with 4-bit weights in GPU memory, where the kernel is planned and the graph wins with it
    (codes_graph_wins), prices decode steps as graphs: every product by the kernel, no dequantization, no eager
    overhead a layer; where the eager step wins (a kernel far slower than its slot, launches cheap), as before."""
    from flexgen_lite.kernels import int4_gemv_triton as gemv
    from flexgen_lite.planning.cost_model import predict
    from flexgen_lite.planning.layout import Setup, Workload
    from flexgen_lite.planning.products_cost import graph_decode

    from .conftest import synthetic_profile
    from .test_cost_model_cuda import CONFIG

    monkeypatch.setattr(gemv, "planned", lambda: True)
    policy = dataclasses.replace(P(gbs=16, nb=2), compress_weight=True, dtype="float16")
    hw, work = synthetic_profile(cuda=True), Workload(512, 32, 64)
    dense_rate = hw.matmul["float16"][-1][1]
    fast = dataclasses.replace(hw, int4_gemv={"float16": [(1, dense_rate, 0.0), (64, 64 * dense_rate, 0.0)]})
    slow = dataclasses.replace(hw, int4_gemv={"float16": [(1, dense_rate / 1e3, 0.0), (64, dense_rate / 1e2, 0.0)]},
                               layer_overhead=dict.fromkeys(("opt", "llama"), (0.0, 0.0)))
    assert graph_decode(Setup(CONFIG, work, policy, fast)) and not graph_decode(Setup(CONFIG, work, policy, slow))
    graphed = predict(CONFIG, work, policy, fast)
    assert not graphed.decode_by.get("dequantize") and not graphed.decode_by.get("overhead")
    monkeypatch.setenv(decode_graph.ENV, "0")
    eager = predict(CONFIG, work, policy, fast)
    assert eager.decode_by["overhead"] > 0 and eager.decode_by["compute"] == pytest.approx(
        graphed.decode_by["compute"])  # the same products by the kernel (it wins at 2 batches here too)
    assert graphed.decode_step_s < eager.decode_step_s


@pytest.mark.parametrize("family", ["opt", "llama", "mixtral", "gemma2", "gpt-oss"])
def test_recorded_graphs_replay_as_cuda_would(tiny_models, references, monkeypatch, without_native, family):
    """Steps captured as RecordedGraph (a CUDA graph's semantics on a CPU: the ops replayed on the captured tensors,
    Python never rerun, host values baked in): transformers' tokens and logits, each batch captured once."""
    from .recorded_graph import RecordedGraph

    monkeypatch.setattr(decode_graph, "capture_graph", lambda forward, pool: RecordedGraph(forward))
    monkeypatch.setattr(decode_graph, "every_expert_wins", lambda *args: True)
    with FlexGenLite(str(tiny_models[family][0]), policy=P(), device="cpu") as m:
        m.engine.static_decode, m.engine.static.capture = True, True
        ours = m.generate_ids(PROMPTS, SAMPLING, return_logits=True)
        assert m.engine.times.attention[1].startswith("graph+") and not decode_graph._failed
    assert_same(ours, references[family])
