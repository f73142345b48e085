"""The Triton split-KV decode attention (decode_attention_triton.py) against SDPA; its choice against SDPA by
measurement (attention.faster); and the engine's eager and constant-shape decode steps with it forced
(FLEXGEN_LITE_DECODE_ATTENTION=triton) against transformers. On the CPU Triton's interpreter runs it
(TRITON_INTERPRET=1); under --device cuda the compiled kernel runs on the GPU, and the constant-shape step is a
CUDA graph. benchmarks/gpu_checks.py (section 6) times it against SDPA at the suite's shapes."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
import torch.nn.functional as F

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.kernels import attention
from flexgen_lite.kernels import decode_attention_triton as triton_decode

from .conftest import PROMPTS, triton_device

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
ULP = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}  # outputs of magnitude < 2

# (rows, query heads, kv heads, positions, head dim): one split and several, 1 to 8 query heads per kv head (tl.dot
# from 4 in 16 bits), a group of 3, one position, head dims not a power of two
CASES = [(3, 4, 4, 37, 64), (2, 8, 2, 150, 128), (2, 8, 1, 300, 64), (1, 2, 2, 1, 80), (4, 6, 2, 70, 32)]


@pytest.fixture
def kernel_device(monkeypatch, compute_device) -> str:
    """Where the kernel runs: the GPU under --device cuda (compiled), else the CPU (Triton's interpreter)."""
    yield from triton_device(monkeypatch, compute_device, triton_decode.reset)


def inputs(rows, heads, kv_heads, length, hd, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, 1, hd, generator=g)
    if layout == "position-major":  # as a CPU reads a host-RAM cache part beside a GPU
        k, v = (torch.randn(length, rows, kv_heads, hd, generator=g).permute(1, 2, 0, 3) for _ in "kv")
    else:  # a prefix of each row's slot of max_len positions, as the engine attends in compute memory
        k, v = (torch.randn(rows, kv_heads, length + 9, hd, generator=g)[:, :, :length] for _ in "kv")
    mask = torch.rand(rows, 1, 1, length, generator=g) > 0.3
    mask[..., -1] = True  # the position just written
    return q, k, v, mask


@needs_triton
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "head-major"), (torch.float16, "head-major"),
                                          (torch.bfloat16, "head-major"), (torch.bfloat16, "position-major")],
                         ids=str)  # a GPU's cache is head-major; position-major: other strides, one dtype
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_equals_sdpa(kernel_device, case, dtype, layout):
    """Within an output rounding of SDPA in fp32 over the same (rounded) inputs: with a mask per row, one mask
    for every row (expanded), and none."""
    q, k, v, mask = inputs(*case, layout)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    rows, heads, kv_heads, length, hd = case
    full = torch.ones(1, 1, 1, length, dtype=torch.bool).expand(rows, 1, 1, length)
    for m in (mask, full, None):
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m,
                                              enable_gqa=heads != kv_heads)
        on = (t.to(kernel_device) if t is not None else None for t in (q, k, v, m))
        got = triton_decode.attend(*on).cpu()
        assert got.dtype == dtype and got.shape == (rows, heads, 1, hd)
        torch.testing.assert_close(got.float(), want, atol=ULP[dtype], rtol=0)


@needs_triton
@pytest.mark.parametrize("case,splits,dtype,variant", [
    ((3, 4, 4, 37, 64), None, torch.float32, "lanes"), ((2, 2, 2, 150, 128), 3, torch.bfloat16, "lanes"),
    ((2, 3, 3, 300, 64), 5, torch.float32, "lanes"), ((3, 4, 4, 37, 64), None, torch.float32, "lanes-ahead"),
    ((1, 2, 2, 1, 80), None, torch.float32, "lanes-ahead"), ((2, 3, 3, 300, 64), 5, torch.float32, "lanes-ahead"),
    ((2, 2, 2, 100, 256), 2, torch.bfloat16, "lanes-ahead"),
    ((2, 8, 2, 150, 128), 3, torch.bfloat16, "lanes"), ((3, 4, 1, 300, 64), 5, torch.float16, "lanes"),
    ((2, 6, 2, 70, 96), None, torch.float16, "lanes"), ((1, 32, 2, 40, 64), 2, torch.bfloat16, "lanes")], ids=str)
def test_lanes_variants_equal_sdpa(kernel_device, case, splits, dtype, variant):
    """Each lane of positions its own softmax (no reduction over the program inside the loop): one query head per
    kv head a lane per position, with the next tile's loads issued first or not; grouped heads (2 to 16 a kv head,
    a group of 3) a lane per warp on tensor cores. Within an output rounding of SDPA in fp32 for a mask per row,
    none, a row padded past whole splits, a ragged last tile; with sinks, of the sinks reference."""
    q, k, v, mask = inputs(*case, "head-major")
    mask[0, ..., :min(250, case[3] - 1)] = False
    q, k, v = (t.to(dtype) for t in (q, k, v))
    for m in (mask, None):
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m,
                                              enable_gqa=case[1] != case[2])
        on = (t.to(kernel_device) if t is not None else None for t in (q, k, v, m))
        got = triton_decode.attend(*on, splits, variant=variant).cpu()
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=ULP[dtype], rtol=0)
    sinks = torch.linspace(0, 6, case[1])
    want = triton_decode.with_sinks(q.float(), k.float(), v.float(), mask, sinks)
    got = triton_decode.attend(*(t.to(kernel_device) for t in (q, k, v, mask)), splits, sinks.to(kernel_device),
                               variant=variant).cpu()
    torch.testing.assert_close(got.float(), want, atol=ULP[dtype], rtol=0)


@needs_triton
def test_the_lanes_take_the_calls_they_compile_for_and_are_measured_beside_the_tiles(kernel_device, monkeypatch):
    """Grouped heads in fp32 (or past 16 a kv head, or head dims past 128: registers they would spill) go to the
    tiles alone: the lanes refuse them, a forced lanes name falls back to the tiles; in fp16 they take the lanes but
    not lanes-ahead. Where they take the call, each variant whose self-check passed is a candidate beside SDPA,
    each giving SDPA's output; a variant failing its check is left out, the others kept."""
    grouped = [t.to(kernel_device) for t in inputs(2, 8, 2, 40, 64, "head-major")]
    half = [t.to(torch.float16) if t.is_floating_point() else t for t in grouped]
    one = [t.to(kernel_device) for t in inputs(2, 4, 4, 40, 64, "head-major")]
    assert triton_decode.variants(*grouped[:2]) == ("tiles",)
    assert triton_decode.variants(*half[:2]) == ("tiles", "lanes")
    assert triton_decode.variants(half[0].repeat(1, 8, 1, 1), half[1]) == ("tiles",)  # 32 a kv head
    assert "up to 16 in fp16 or bf16" in triton_decode.refusal(*grouped[:2], variant="lanes")
    with pytest.raises(ValueError, match="does not take 8 query heads over 2 kv heads in torch.float32"):
        triton_decode.attend(*grouped, variant="lanes")
    monkeypatch.setenv(attention.DECODE_ENV, "triton-lanes")
    assert attention.decode_attend(*grouped)[1] == "triton"
    assert attention.decode_attend(*half)[1] == "triton-lanes"
    assert attention.decode_attend(*one)[1] == "triton-lanes"
    assert list(attention.decode_candidates(*grouped)) == ["triton", "sdpa"]
    assert list(attention.decode_candidates(*half)) == ["triton", "triton-lanes", "sdpa"]
    candidates = attention.decode_candidates(*one)
    assert list(candidates) == ["triton", "triton-lanes", "triton-lanes-ahead", "sdpa"]
    want = F.scaled_dot_product_attention(*(t.cpu() for t in one[:3]), attn_mask=one[3].cpu())
    for name in ("triton", "triton-lanes", "triton-lanes-ahead"):
        torch.testing.assert_close(candidates[name]().cpu(), want, atol=ULP[torch.float32], rtol=0)
    real = triton_decode._checked
    monkeypatch.setattr(triton_decode, "_checked", lambda *args: "broken" if args[-1] == "lanes" else real(*args))
    triton_decode.reset()
    assert list(attention.decode_candidates(*one)) == ["triton", "triton-lanes-ahead", "sdpa"]


@needs_triton
@pytest.mark.parametrize("splits", [2, 5])
def test_a_split_inside_a_rows_padding_adds_nothing(kernel_device, splits):
    """A row left-padded past whole splits (a short prompt beside long ones, a small batch cut into many splits):
    those splits see no position and weigh nothing; the row's output is SDPA's, not NaN."""
    q, k, v, mask = inputs(2, 8, 2, 300, 64, "head-major")
    mask[0, ..., :250] = False
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = triton_decode.attend(*(t.to(kernel_device) for t in (q, k, v, mask)), splits).cpu()
    torch.testing.assert_close(got, want, atol=ULP[torch.float32], rtol=0)


@needs_triton
@pytest.mark.parametrize("case,dtype,splits", [(case, dtype, splits) for case in CASES[1:3] + CASES[4:]
                                                for dtype, splits in ((torch.float32, 1), (torch.bfloat16, 3))],
                         ids=str)  # the one-split kernel's sinks and the combination's, each in both precisions
def test_sinks_take_their_share_of_each_softmax(kernel_device, case, dtype, splits):
    """gpt-oss's sink logits (each head's term of its softmax's denominator alone): in the one-split kernel and in
    the splits' combination, within an output rounding of the fp32 reference over the same inputs."""
    q, k, v, mask = inputs(*case, "head-major")
    q, k, v = (t.to(dtype) for t in (q, k, v))
    sinks = torch.linspace(0, 6, case[1])  # from a small share of a softmax to most of it
    want = triton_decode.with_sinks(q.float(), k.float(), v.float(), mask, sinks)
    got = triton_decode.attend(*(t.to(kernel_device) for t in (q, k, v, mask)), splits, sinks.to(kernel_device)).cpu()
    torch.testing.assert_close(got.float(), want, atol=ULP[dtype], rtol=0)
    plain = triton_decode.attend(*(t.to(kernel_device) for t in (q, k, v, mask)), splits).cpu()
    assert (plain.float() - want).abs().max() > 10 * ULP[dtype]  # the sinks count


@needs_triton
def test_a_sinks_variant_that_fails_its_check_leaves_the_plain_kernel_usable(kernel_device, monkeypatch):
    """The sinks variant is checked apart: where it fails, models with sinks go to the whole-score path, and
    models without keep the kernel."""
    monkeypatch.setattr(triton_decode, "_sinks_refusal", lambda *args: "broken here")
    q, k, _, _ = inputs(2, 8, 2, 40, 64, "head-major")
    q, k = q.to(kernel_device), k.to(kernel_device)
    assert triton_decode.usable(q, k) and triton_decode.refusal(q, k, sinks=True) == "broken here"
    assert not triton_decode.usable(q, k, sinks=True)


def test_split_plan_fills_the_gpu_and_covers_every_position():
    for programs, length, block, sms in [(2048, 544, 128, 132), (16, 4096, 64, 132), (3, 150, 16, 4), (1, 1, 128, 4)]:
        splits, split_len = triton_decode.split_plan(programs, length, block, sms)
        assert split_len % block == 0 and (splits - 1) * split_len < length <= splits * split_len
        assert splits == 1 or split_len >= 2 * block
    assert triton_decode.split_plan(2048, 544, 64, 132)[0] == 2  # OPT-1.3B at batch 64: 2 x 2048 programs
    assert triton_decode.split_plan(2048, 544, 64, 132, wanted=1)[0] == 1
    assert triton_decode.split_plan(16, 4096, 64, 132)[0] == 32  # a few long rows: split to fill 132 SMs


@needs_triton
def test_self_check_passes_and_the_switch_turns_it_off(kernel_device, monkeypatch):
    q, k, v = (t.to(kernel_device) for t in inputs(2, 4, 2, 20, 64, "head-major")[:3])
    assert triton_decode.refusal(q, k) is None and triton_decode.usable(q, k)
    assert not triton_decode.usable(q.expand(2, 4, 3, 64), k)  # a prefill: not a decode shape
    monkeypatch.setenv("FLEXGEN_LITE_TRITON", "0")
    monkeypatch.setenv(attention.DECODE_ENV, "triton")
    triton_decode.reset()
    assert triton_decode.refusal(q, k) == "FLEXGEN_LITE_TRITON=0"
    assert attention.decode_attend(q, k, v, None) is None


def test_decode_attend_is_sdpas_off_cuda_unless_asked(monkeypatch):
    q, k, v, mask = inputs(2, 4, 2, 20, 64, "head-major")
    monkeypatch.delenv(attention.DECODE_ENV, raising=False)
    assert attention.decode_attend(q, k, v, mask) is None  # auto: measured on CUDA only
    assert attention.attend_named(q, k, v, mask)[1] != "triton"
    monkeypatch.setenv(attention.DECODE_ENV, "sdpa")
    assert attention.decode_attend(q, k, v, mask) is None


def test_the_faster_candidate_is_chosen_once_per_kind(monkeypatch):
    monkeypatch.setattr(attention, "_measured", {})
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.02)

    def fast():
        calls["fast"] += 1

    cpu = torch.device("cpu")
    assert attention.faster(("a",), {"slow": slow, "fast": fast}, cpu, reps=3) == "fast"
    assert calls == {"slow": 4, "fast": 4}  # warmed once, then timed 3 times in turn
    assert attention.faster(("a",), {"slow": slow, "fast": fast}, cpu) == "fast" and calls["slow"] == 4
    assert attention.faster(("b",), {"fast": fast, "slow": slow}, cpu, reps=1) == "fast"  # not by order


@needs_triton
@pytest.mark.parametrize("family,kernel,static", [
    ("opt", "triton", True), ("opt", "triton-lanes-ahead", True), ("llama3", "triton", False),
    ("llama3", "triton", True), ("gpt-oss", "triton", False), ("gpt-oss", "triton", True)], ids=str)
# 1 and 4 query heads per kv head (registers; tl.dot); gpt-oss's sinks and windows (rings in the constant-shape step);
# a lanes variant; the eager step from the grouped-head families (OPT's register path: in the constant-shape step)
def test_engine_with_the_kernel_equals_transformers(kernel_device, monkeypatch, tiny_models, references, family,
                                                    kernel, static):
    """Every decode step's attention by the kernel (left-padded rows: masked), the same greedy tokens as
    transformers and logits within fp32's tolerance (as test_parity), in the engine's eager decode step and in its
    constant-shape one (decode_graph.py: the whole max_len under a mask, as a CUDA graph replays it)."""
    monkeypatch.setenv(attention.DECODE_ENV, kernel)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, dtype="float32")
    with FlexGenLite(str(tiny_models[family][0]), policy=policy, device=kernel_device) as m:
        m.engine.static_decode, m.engine.fused_decode, m.engine.layer_graph_decode = static, False, False
        ids, logits = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=5, stop_at_eos=False),
                                     return_logits=True)
        kernels = m.engine.times.attention
    ref_ids, ref_logits = references[family]  # 8 tokens: the first 5 (the interpreter's kernel is slow)
    assert ids == [r[:5] for r in ref_ids]
    for ours, theirs in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(ours, theirs[:5], atol=2e-4, rtol=0)
    step = ("graph+" if kernel_device.startswith("cuda") else "static+") if static else ""  # a CUDA graph replayed
    assert kernels[1:] and all(step + kernel in k for k in kernels[1:]), kernels


@needs_triton
@pytest.mark.parametrize("static,dtype,kernel", [(False, "float32", "triton"), (True, "float32", "triton"),
                                                 (False, "bfloat16", "triton-lanes"),
                                                 (True, "bfloat16", "triton-lanes")],
                         ids=["eager-step", "constant-shape-step", "grouped-lanes-bf16",
                              "grouped-lanes-bf16-constant-shape"])
def test_a_short_prompt_beside_a_long_one_in_many_splits(kernel_device, monkeypatch, tiny_models, static, dtype,
                                                         kernel):
    """A batch of a 50-token prompt and a 2-token one, the cache cut into splits of 8 positions (as a GPU of many
    SMs cuts a long cache at a small batch; the grouped lanes' tiles: 64): the short row's padding covers whole
    splits, and the constant-shape step's splits past the current length see nothing. Tokens and logits are SDPA's
    (before the fix: NaN); in bf16 (the grouped lanes take 16-bit values), logits within bf16's rounding."""
    prompts = [[2, *range(3, 52)], [2, 400]]
    policy = Policy(gpu_batch_size=2, num_gpu_batches=1, dtype=dtype)
    greedy = SamplingConfig(max_new_tokens=6, stop_at_eos=False)
    block = 64 if kernel == "triton-lanes" else 8
    runs = {}
    for name in ("sdpa", kernel):
        monkeypatch.setenv(attention.DECODE_ENV, name)
        monkeypatch.setattr(triton_decode, "split_plan", lambda programs, length, *args: (-(-length // block), block))
        with FlexGenLite(str(tiny_models["llama3"][0]), policy=policy, device=kernel_device) as m:
            m.engine.static_decode, m.engine.fused_decode, m.engine.layer_graph_decode = static, False, False
            runs[name] = m.generate_ids(prompts, greedy, return_logits=True)
            if name == kernel:
                assert all(kernel in k for k in m.engine.times.attention[1:]), m.engine.times.attention
    assert runs[kernel][0] == runs["sdpa"][0]
    for ours, theirs in zip(runs[kernel][1], runs["sdpa"][1], strict=True):
        scale = float(theirs.abs().max())  # bf16: a rounding step of the logits' size is 2**-8 of it to 2**-7
        torch.testing.assert_close(ours, theirs, atol=2e-4 if dtype == "float32" else 2 ** -6 * scale, rtol=0)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs: on a GPU, under --device cuda")
def test_the_graphed_step_measures_both_kernels_as_replays(kernel_device, monkeypatch, tiny_models, references):
    """On CUDA with the default choice (auto), the constant-shape step's attention is measured once per kind as
    CUDA-graph replays of each kernel (graphed kinds in attention._measured), then captured with the faster one;
    its tokens are transformers'."""
    monkeypatch.delenv(attention.DECODE_ENV, raising=False)
    monkeypatch.setattr(attention, "_measured", {})
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, dtype="float32")
    with FlexGenLite(str(tiny_models["llama3"][0]), policy=policy, device=kernel_device) as m:
        m.engine.static_decode = True
        ids = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=8, stop_at_eos=False))
        kernels = m.engine.times.attention
    assert ids == references["llama3"][0]
    graphed = {kind: name for kind, name in attention._measured.items() if kind[-1]}
    assert graphed and set(graphed.values()) <= {*attention.TRITON_NAMES, "sdpa"}
    assert any(k.startswith("graph+") for k in kernels), kernels
