"""The GPU's hot path, checked on a CPU: which SDPA kernels CUDA may use (never cuDNN, which plans per shape),
attention without a mask where no row is padded, no I/O hand-offs or events for what is already in compute
memory, and bench's warm-up kept out of the timed numbers."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

import flexgen_lite.engine.block_schedule as engine_module
import flexgen_lite.engine.decode_graph as decode_graph
import flexgen_lite.kernels.attention as attention
from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.cli.bench import WARMUP_STEPS, format_report, run_benchmark
from flexgen_lite.cli.main import main
from flexgen_lite.engine.block import Block
from flexgen_lite.engine.block_schedule import Engine
from flexgen_lite.engine.trace import Recorder
from flexgen_lite.kernels.attention import EFFICIENT, FLASH, MATH, attend_named, fold_groups, sdpa_backends
from flexgen_lite.system.devices import ComputeDevice, IOPool

from .conftest import PROMPTS

HALF = (torch.float16, torch.bfloat16)


def P(percent=(100, 0, 100, 0, 100, 0), gbs=2, nb=2, **kw) -> Policy:
    w_g, w_c, c_g, c_c, a_g, a_c = percent
    return Policy(gpu_batch_size=gbs, num_gpu_batches=nb, weight_gpu_percent=w_g, weight_cpu_percent=w_c,
                  cache_gpu_percent=c_g, cache_cpu_percent=c_c, act_gpu_percent=a_g, act_cpu_percent=a_c,
                  dtype="float32", **kw)


def cpu_kernel() -> str:
    return "cpu-native" if attention.native_decode_agrees() else "sdpa-cpu"


# ---- which kernels CUDA may use ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("has_mask", [False, True])
def test_cuda_kernels_never_include_cudnn_and_flash_only_without_a_mask_in_half_precision(dtype, has_mask):
    backends = sdpa_backends("cuda", dtype, has_mask)
    assert SDPBackend.CUDNN_ATTENTION not in backends
    assert backends[-2:] == [EFFICIENT, MATH]  # any mask; math last
    assert (FLASH in backends) == (not has_mask and dtype in HALF)
    if FLASH in backends:
        assert backends[0] == FLASH


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_off_cuda_torch_keeps_its_choice(dtype):
    assert sdpa_backends("cpu", dtype, True) == sdpa_backends("cpu", dtype, False) == []


@pytest.fixture
def fresh_choices(monkeypatch):
    """SDPA's own choices afresh, and SDPA at decode too (the Triton decode kernel, measured against it on CUDA:
    test_decode_attention_triton.py)."""
    monkeypatch.setattr(attention, "_failed", set())
    monkeypatch.setattr(attention, "_chosen", {})
    monkeypatch.setenv(attention.DECODE_ENV, "sdpa")


def _case(b, heads, kv_heads, t, length, dtype, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, heads, 32, generator=g).transpose(1, 2).to(dtype)  # as layers.qkv lays it out
    cache = torch.randn(2, b, kv_heads, length + 3, 32, generator=g).to(dtype)
    k, v = cache[0, :, :, :length], cache[1, :, :, :length]  # strided views of a longer cache, as decode's
    mask = None
    if masked:
        mask = torch.rand(b, 1, t, length, generator=g) > 0.4
        mask[..., -1] = True
    return q, k, v, mask


def _reference(q, k, v, mask):
    causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


CASES = {  # (query heads, kv heads, query positions, masked)
    "decode": (4, 4, 1, False), "decode-masked": (4, 4, 1, True), "decode-grouped": (6, 2, 1, False),
    "decode-grouped-masked": (6, 2, 1, True), "prefill-causal": (4, 4, 7, False),
    "prefill-grouped-causal": (6, 3, 7, False), "prefill-grouped-masked": (6, 3, 7, True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_cuda_path_computes_attention_with_the_kernels_it_allows(fresh_choices, case, dtype):
    """_cuda_attend's calls (causal, grouped heads folded into query positions, masks repeated for them) run
    here on the CPU kernels the same flags allow, against plain SDPA in fp32."""
    heads, kv_heads, t, masked = CASES[case]
    q, k, v, mask = _case(3, heads, kv_heads, t, 7 if t > 1 else 9, dtype, masked)
    out, name = attention._cuda_attend(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype and name in ("flash", "math")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), _reference(q, k, v, mask), atol=tol, rtol=tol)


@pytest.mark.parametrize("t", [1, 5])
def test_folding_grouped_heads_is_exact(t):
    q, k, v, mask = _case(2, 8, 2, t, 5 if t > 1 else 11, torch.float32, masked=True)
    qf, mf = fold_groups(q, mask, kv_heads=2)
    assert qf.shape == (2, 2, 4 * t, 32) and mf.shape == (2, 1, 4 * t, k.shape[2])
    folded = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf).reshape(q.shape)
    torch.testing.assert_close(folded, _reference(q, k, v, mask), atol=1e-6, rtol=1e-5)


def test_a_kernel_that_is_not_available_falls_back_to_the_default_once(fresh_choices, monkeypatch):
    monkeypatch.setattr(attention, "sdpa_backends", lambda *a: [EFFICIENT])  # none on a CPU: "No available kernel"
    q, k, v, mask = _case(2, 4, 4, 1, 6, torch.float32, masked=True)
    with pytest.warns(UserWarning, match="the chosen kernels failed here.*default choice from now on"):
        out, name = attention._cuda_attend(q, k, v, mask)
    assert name == "default"
    torch.testing.assert_close(out, _reference(q, k, v, mask))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert attention._cuda_attend(q, k, v, mask)[1] == "default"


def test_without_a_mask_cpu_attention_sees_every_position_or_is_causal():
    q, k, v, _ = _case(3, 6, 2, 1, 9, torch.float32, masked=False)
    out, name = attend_named(q, k, v, None)
    assert name == cpu_kernel()
    torch.testing.assert_close(out, attend_named(q, k, v, torch.ones(3, 1, 1, 9, dtype=torch.bool))[0])
    q, k, v, _ = _case(3, 4, 4, 6, 6, torch.float32, masked=False)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(3, 1, 6, 6)
    out, name = attend_named(q, k, v, None)
    assert name == "sdpa-cpu"
    torch.testing.assert_close(out, attend_named(q, k, v, causal)[0])
    q, k, v, _ = _case(3, 4, 4, 1, 9, torch.float32, masked=False)
    assert attend_named(q, k, v, None, sparsity=0.5)[1] == "topk"


# ---- masks only where a row is padded ------------------------------------------------------------------------
def test_a_batch_needs_a_mask_only_while_a_padded_row_still_generates():
    prompts = [[5, 6, 7], [8, 9, 10], [5, 6, 7], [8, 9]]  # batch 0 of equal lengths; batch 1 pads its 2nd row
    block = Block.from_prompts(prompts, 6, 2, 4, 1, (), torch.device("cpu"))  # batch 2: filler rows
    assert not block.padded(0, block.active_rows(0))
    assert block.padded(1, block.active_rows(1))
    assert block.active_rows(2) is not None and not block.padded(2, block.active_rows(2))  # fillers finished
    block.finished[3] = True  # the padded row ended
    assert not block.padded(1, block.active_rows(1))


def test_device_rows_are_copied_only_when_the_active_rows_change():
    block = Block.from_prompts([[5, 6]] * 3, 4, 4, 4, 1, (), torch.device("cpu"))
    first = block.device_rows(0, block.active_rows(0))
    assert block.device_rows(0, block.active_rows(0)) is first
    block.finished[1] = True
    assert block.device_rows(0, block.active_rows(0)).tolist() == [0, 2]


@pytest.mark.parametrize("device,cpu_attention", [("cpu", False), ("cpu+link", False), ("cpu+link", True)])
def test_attention_without_masks_for_unpadded_batches_gives_the_same_tokens(tiny_models, device, cpu_attention,
                                                                             monkeypatch):
    """What CUDA does (unpadded batches attend without a mask) done on a CPU: the same ids, the same logits.
    Rows of equal length share batches; the last batch is padded and its short row ends early (eos)."""
    prompts = [[2, 17, 43, 99], [2, 300, 5, 6], [2, 88, 91, 92, 93], [2, 400, 401, 402, 403],
               [2, 250, 251, 252, 253, 254], [2, 9]]
    percent = (100, 0, 50, 50, 100, 0) if cpu_attention else (100, 0, 100, 0, 100, 0)
    policy = P(percent, gbs=2, nb=3, cpu_cache_compute=cpu_attention)
    sampling = SamplingConfig(max_new_tokens=6, stop_at_eos=False)
    results = []
    for without_mask in (False, True):
        with FlexGenLite(str(tiny_models["llama"][0]), policy=policy, device=device) as m:
            m.engine.unpadded_without_mask = without_mask
            results.append(m.generate_ids(prompts, sampling, return_logits=True))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- nothing handed to the I/O threads for what is resident ------------------------------------------------------
def count_handoffs(monkeypatch) -> dict[str, int]:
    counts = {"submit": 0, "compute_event": 0}
    submit, event = IOPool.submit, ComputeDevice.compute_event

    def counted_submit(self, *args):
        counts["submit"] += 1
        return submit(self, *args)

    def counted_event(self):
        counts["compute_event"] += 1
        return event(self)

    monkeypatch.setattr(IOPool, "submit", counted_submit)
    monkeypatch.setattr(ComputeDevice, "compute_event", counted_event)
    return counts


@pytest.mark.parametrize("device", ["cpu", "cpu+link"])
def test_all_resident_steps_hand_nothing_to_io_threads(tiny_models, monkeypatch, device):
    counts = count_handoffs(monkeypatch)
    with FlexGenLite(str(tiny_models["opt"][0]), policy=P(), device=device) as m:
        per_step = []

        def note(block):
            per_step.append(dict(counts))

        m._run_block(PROMPTS[:4], SamplingConfig(max_new_tokens=5, stop_at_eos=False), report=note)
    assert len(per_step) == 5 and per_step[-1] == {"submit": 0, "compute_event": 0}


@pytest.mark.parametrize("percent", [(0, 100, 100, 0, 100, 0), (100, 0, 0, 100, 100, 0)], ids=["weights", "cache"])
def test_what_crosses_the_link_still_goes_through_io_threads(tiny_models, monkeypatch, percent):
    counts = count_handoffs(monkeypatch)
    with FlexGenLite(str(tiny_models["opt"][0]), policy=P(percent), device="cpu+link") as m:
        m.generate_ids(PROMPTS[:4], SamplingConfig(max_new_tokens=3, stop_at_eos=False))
    assert counts["submit"] > 0 and counts["compute_event"] > 0


# ---- bench's warm-up ---------------------------------------------------------------------------------------------
@pytest.fixture
def engine_runs(monkeypatch):
    """Each Engine.run's (steps taken, decode step times) and how many KV caches were made."""
    runs, caches = [], []
    run, kv_cache = Engine.run, engine_module.KVCache

    def recorded_run(self, block, *args, **kw):
        run(self, block, *args, **kw)
        runs.append((block.generated, list(self.times.decode)))

    def counted_cache(*args, **kw):
        caches.append(args)
        return kv_cache(*args, **kw)

    monkeypatch.setattr(Engine, "run", recorded_run)
    monkeypatch.setattr(engine_module, "KVCache", counted_cache)
    return runs, caches


def test_bench_warms_up_on_the_same_cache_and_times_only_the_run(tiny_models, engine_runs, tmp_path):
    runs, caches = engine_runs
    recorder = Recorder()
    report = run_benchmark(str(tiny_models["opt"][0]), 6, 5, P(offload_dir=str(tmp_path)), "cpu", trace=recorder)
    assert [steps for steps, _ in runs] == [WARMUP_STEPS, 5]  # stopped after the prefill and a decode step
    assert len(caches) == 1  # made for the full length by the warm-up, used again by the timed run
    assert report["warmup_s"] > 0
    timed = runs[1][1]
    assert len(timed) == 4 and report["decode_s"] == round(sum(timed), 3)
    assert [m.index for m in recorder.steps] == [0, 1, 2, 3, 4]  # the warm-up's steps are not traced
    assert report["attention_backend"] == cpu_kernel() and report["prefill_attention_backend"] == "sdpa-cpu"
    text = format_report(report)
    assert "warm-up (prefill and 1 decode step, not timed above)" in text
    assert f"attention kernels: prefill sdpa-cpu, decode {cpu_kernel()}" in text


def test_bench_no_warmup_flag(tiny_models, engine_runs, tmp_path, capsys):
    runs, _ = engine_runs
    main(["bench", "--model", str(tiny_models["opt"][0]), "--prompt-len", "6", "--gen-len", "3", "--percent",
          "100", "0", "100", "0", "100", "0", "--gpu-batch-size", "2", "--dtype", "float32", "--device", "cpu",
          "--offload-dir", str(tmp_path), "--no-warmup"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["warmup_s"] is None and [steps for steps, _ in runs] == [3]


# ---- on a GPU (skipped here) ---------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA_CASES = {  # case: (dtype, query heads, kv heads, query positions, masked, the kernel expected)
    "decode-fp16": (torch.float16, 8, 8, 1, False, "flash"),
    "decode-bf16-grouped": (torch.bfloat16, 8, 2, 1, False, "flash"),
    "decode-fp16-masked": (torch.float16, 8, 8, 1, True, "efficient"),
    "decode-bf16-grouped-masked": (torch.bfloat16, 8, 2, 1, True, "efficient"),
    "decode-fp32": (torch.float32, 8, 8, 1, False, "efficient"),
    "prefill-fp16-causal": (torch.float16, 8, 8, 64, False, "flash"),
    "prefill-bf16-grouped-causal": (torch.bfloat16, 8, 2, 64, False, "flash"),
    "prefill-fp16-masked": (torch.float16, 8, 8, 64, True, "efficient"),
}


@cuda
@pytest.mark.parametrize("case", CUDA_CASES)
def test_cuda_runs_the_kernel_chosen_and_agrees_with_math(fresh_choices, case):
    dtype, heads, kv_heads, t, masked, expected = CUDA_CASES[case]
    q, k, v, mask = (None if x is None else x.cuda()
                     for x in _case(4, heads, kv_heads, t, 64 if t > 1 else 77, dtype, masked))
    out, name = attend_named(q, k, v, mask)
    assert name == expected
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), _reference(q, k, v, mask), atol=tol, rtol=tol)


@cuda
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_decode_at_a_new_length_each_step_builds_nothing(fresh_choices, masked):
    """cuDNN attention built a plan per new cache length (36-450 ms on an H200); these kernels take any."""
    import time

    q, k, v, mask = (None if x is None else x.cuda()
                     for x in _case(64, 32, 32, 1, 600, torch.float16, masked))
    times = []
    for length in range(500, 540):
        torch.cuda.synchronize()
        tic = time.perf_counter()
        attend_named(q, k[:, :, :length], v[:, :, :length], None if mask is None else mask[..., :length])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    assert max(times[1:]) < 0.02, times


@cuda
def test_cuda_engine_without_masks_for_unpadded_batches(tiny_models, fresh_choices):
    """fp16 on the GPU, prompts of equal length in each batch but the last: flash without a mask where no row is
    padded, the same logits as memory-efficient attention with the mask."""
    prompts = [[2, 17, 43, 99], [2, 300, 5, 6], [2, 88, 91, 92], [2, 400]]
    policy = dataclasses.replace(P(gbs=2, nb=2), dtype="float16")
    results, kernels = [], []
    for without_mask in (False, True):
        with FlexGenLite(str(tiny_models["llama"][0]), policy=policy, device="cuda") as m:
            m.engine.unpadded_without_mask = without_mask
            m.engine.static_decode = m.engine.layer_graph_decode = False  # the eager schedule's kernels (the
            # graphs': tests below)
            results.append(m.generate_ids(prompts, SamplingConfig(max_new_tokens=6, stop_at_eos=False),
                                          return_logits=True)[1])
            kernels.append(m.engine.times.attention)
    assert kernels[0] == ["efficient"] * 6 and kernels[1] == ["efficient+flash"] * 6
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


GRAPH_PROMPTS = [[2, 17, 43, 99], [2, 300, 5, 6], [2, 88, 91, 92], [2, 400]]  # batch 1 has a padded row
GRAPH_DTYPES = (("float32", 1e-4), ("float16", 2e-2))  # and the tolerance of each against the eager run


def off_and_on(model_dir, policy: Policy, switch: str, blocks: int = 2) -> tuple[list, list]:
    """(results, engines): `blocks` generate_ids runs (ids, logits) of GRAPH_PROMPTS, 8 new tokens, on CUDA with
    the Engine attribute `switch` off, then as many with it on, and the two engines; the other graphs off (the
    eager schedule against the graphs under test)."""
    results, engines = [], []
    for on in (False, True):
        with FlexGenLite(str(model_dir), policy=policy, device="cuda") as m:
            m.engine.static_decode = m.engine.layer_graph_decode = False
            setattr(m.engine, switch, on)
            for _ in range(blocks):
                results.append(m.generate_ids(GRAPH_PROMPTS, SamplingConfig(max_new_tokens=8, stop_at_eos=False),
                                              return_logits=True))
            engines.append(m.engine)
    return results, engines


def assert_like_eager(graph, eager, dtype: str, tol: float) -> None:
    """A graphed run's (ids, logits) against the eager one's: in fp32 the same tokens and logits within tol; in fp16
    the first two steps' logits (later ones follow fp16 noise into other tokens)."""
    steps = slice(None) if dtype == "float32" else slice(0, 2)
    if dtype == "float32":
        assert graph[0] == eager[0]
    for a, b in zip(eager[1], graph[1], strict=True):
        torch.testing.assert_close(a[steps], b[steps], atol=tol, rtol=tol)


@cuda
@pytest.mark.parametrize("family", ["opt", "llama", "mixtral", "gemma2", "gpt-oss"])
def test_cuda_graph_decode_matches_eager_and_is_captured_once(tiny_models, monkeypatch, family):
    """Decode steps replayed from one CUDA graph per GPU batch (decode_graph.py): the eager path's tokens and
    logits (fp32: tight; fp16: the first two steps within fp16 noise), each batch captured once at its first decode
    step of a block of 8 and replayed after, and again for a second block on the same cache. Mixtral's experts each
    over every row, with no host sync (layers.every_expert), taken here whatever the test profile's rates say
    (test_moe.py tests that choice). Gemma-2's capped scores from the whole scores, gpt-oss's sinks from them or by
    the Triton decode kernel (which takes sinks) where measured faster, windows as rings."""
    monkeypatch.setattr(decode_graph, "_failed", [])
    monkeypatch.setattr(decode_graph, "every_expert_wins", lambda *args: True)
    for dtype, tol in GRAPH_DTYPES:
        policy = dataclasses.replace(P(gbs=2, nb=2), dtype=dtype)
        results, (_, engine) = off_and_on(tiny_models[family][0], policy, "static_decode")
        kernels, captures = engine.times.attention, engine.static.captures
        assert not decode_graph._failed, decode_graph._failed
        assert captures == 2, captures  # one graph per GPU batch, for both blocks
        # SDPA's memory-efficient kernel, or the Triton decode kernel where measured faster (attention.faster)
        allowed = {"gemma2": ("graph+softcap",), "gpt-oss": ("graph+sinks", "graph+triton")}.get(family,
                                                                                 ("graph+efficient", "graph+triton"))
        assert len(kernels) == 8 and all(k.startswith(allowed) for k in kernels[1:]), kernels
        eager, graph = results[0], results[2]
        assert results[3][0] == graph[0]  # replayed again on the second block: the same
        assert_like_eager(graph, eager, dtype, tol)


@cuda
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_cuda_graph_decode_over_4_bit_codes(tiny_models, monkeypatch, family):
    """`--compress-weight` with the weights in GPU memory: decode steps replayed from one graph per batch whose
    products read the 4-bit codes by the Triton kernel (decode_graph.graph_weights), with the eager step's tokens
    and logits; the kernel is called from Python while a batch is captured, never by a replay."""
    import flexgen_lite.kernels.int4_gemv_triton as gemv

    pytest.importorskip("triton")
    monkeypatch.setattr(decode_graph, "_failed", [])
    monkeypatch.setattr(decode_graph, "codes_graph_wins", lambda *args: True)
    calls, matmul, run = [], gemv.matmul, decode_graph.StaticDecode.run
    monkeypatch.setattr(gemv, "matmul", lambda x, q, splits=None: calls.append(1) or matmul(x, q, splits))
    replays = []

    def counted_run(self, cache, block, b, start):
        captured, before = b in self.batches and self.batches[b].graph is not None, len(calls)
        out = run(self, cache, block, b, start)
        if captured:
            replays.append(len(calls) - before)
        return out

    monkeypatch.setattr(decode_graph.StaticDecode, "run", counted_run)
    for dtype, tol in GRAPH_DTYPES:
        policy = dataclasses.replace(P(gbs=2, nb=2), dtype=dtype, compress_weight=True)
        results, (_, engine) = off_and_on(tiny_models[family][0], policy, "static_decode", blocks=1)
        kernels, static_step = engine.times.attention, engine.static
        assert static_step.possible and not decode_graph._failed, decode_graph._failed
        assert static_step.captures == 2 and all(k.startswith("graph+") for k in kernels[1:]), kernels
        assert len(replays) == 2 * 6 and not any(replays), replays  # steps 2-7 of both batches: replays alone
        replays.clear()
        eager, graph = results
        assert_like_eager(graph, eager, dtype, tol)


@cuda
@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("compress", [False, True], ids=["fp", "4-bit"])
def test_cuda_layer_graphs_where_weights_stream(tiny_models, monkeypatch, family, compress):
    """Weights in host RAM crossing the link each step (4-bit too, dequantized into slots): each decode-step layer
    of a batch replayed from its own CUDA graph (layer_graph.py) while the weights' copies run on their streams,
    with the eager schedule's tokens and logits; captured once (layers x kinds x batches) and replayed after, for
    a second block too."""
    import flexgen_lite.engine.layer_graph as layer_graph

    monkeypatch.setattr(layer_graph, "_failed", [])
    for dtype, tol in GRAPH_DTYPES:
        policy = dataclasses.replace(P((0, 100, 100, 0, 100, 0), gbs=2, nb=2), dtype=dtype, compress_weight=compress)
        results, (_, engine) = off_and_on(tiny_models[family][0], policy, "layer_graph_decode")
        kernels, captures, layers = engine.times.attention, engine.layer_graphs.captures, engine.config.num_layers
        assert not layer_graph._failed, layer_graph._failed
        assert captures == 2 * 2 * layers, captures
        assert all("graph+" in k for k in kernels[1:]), kernels
        eager, graph = results[0], results[2]
        assert results[3][0] == graph[0]
        assert_like_eager(graph, eager, dtype, tol)
