"""A CPU decode step's layers in one C call (engine/decode_fused.py, native/decode_layer.c): the eager path's
logits bit for bit, transformers' tokens and logits; used only where every op would be the C kernels' anyway;
its SiLU torch's own bits on every vector width torch may pick."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.engine import decode_fused
from flexgen_lite.kernels import decode_layers

from .conftest import PROMPTS, forget_profile, make_checkpoint, other_native_build, set_profile, synthetic_profile
from .test_parity import LOGITS_ATOL

G = 1e9
FEW = (1, 2, 4)  # rows at which the test profile has the few-row kernels win
SAMPLING = SamplingConfig(max_new_tokens=8, stop_at_eos=False)
LLAMAS = ["llama", "llama3", "qwen2", "mistral", "qwen3", "mistral-nemo"]  # grouped heads, scaled rope, q/k/v
# biases and tied head, plain, per-head q/k norms with heads wider than hidden, heads wider than hidden alone
EIGHT = [*PROMPTS, [2, 5, 6]]  # two blocks of 2 x 2 rows, no filler row


@pytest.fixture
def few_rows_kernels(tmp_path, monkeypatch):
    """A profile in which the C kernels multiply up to 4 rows faster than torch (dense and 4-bit), as this VM's
    own profile has them: the eager path runs them, and the fused step may."""
    few = {dt: [(m, 60 * G, 0.0) for m in FEW] for dt in ("float32", "bfloat16", "float16")}
    hw = dataclasses.replace(synthetic_profile(), gemv=few, int4_gemv={"bfloat16": few["bfloat16"]},
                             int4_matmul={"bfloat16": [(1, 5 * G, 1e-5), (64, 40 * G, 1e-5)]})
    set_profile(hw, tmp_path, monkeypatch)
    yield hw
    forget_profile()


def P(gbs=2, nb=2, dtype="float32", percent=(100, 0, 100, 0, 100, 0), **kw) -> Policy:
    w_g, w_c, c_g, c_c, a_g, a_c = percent
    return Policy(gpu_batch_size=gbs, num_gpu_batches=nb, weight_gpu_percent=w_g, weight_cpu_percent=w_c,
                  cache_gpu_percent=c_g, cache_cpu_percent=c_c, act_gpu_percent=a_g, act_cpu_percent=a_c,
                  dtype=dtype, **kw)


def generate(model_dir, policy: Policy, fused: bool, prompts=PROMPTS, sampling=SAMPLING):
    """(ids, logits, per block the attention kernels of each step) with the fused step allowed or not: on the CPU,
    whose kernel it is, also where a GPU is present."""
    with FlexGenLite(str(model_dir), policy=policy, device="cpu") as m:
        m.engine.fused_decode = fused and m.engine.fused_decode
        kernels = []
        ids, logits = m.generate_ids(prompts, sampling, return_logits=True,
                                     on_block=lambda _: kernels.append(list(m.engine.times.attention)))
        return ids, logits, kernels


def all_fused(kernels) -> bool:
    return all(block[1:] == [decode_fused.KERNEL] * (len(block) - 1) for block in kernels)


def assert_identical(a, b) -> None:
    assert a[0] == b[0]
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("family", LLAMAS)
def test_the_fused_step_gives_the_eager_paths_logits_bit_for_bit(tiny_models, few_rows_kernels, family, dtype):
    """Padded rows of several lengths, two batches of a block, every decode step fused."""
    fused = generate(tiny_models[family][0], P(dtype=dtype), True, EIGHT)
    eager = generate(tiny_models[family][0], P(dtype=dtype), False, EIGHT)
    assert all_fused(fused[2]) and all(block[1:] == ["cpu-native"] * 7 for block in eager[2])
    assert_identical(fused, eager)


@pytest.mark.parametrize("family", LLAMAS)
def test_the_fused_step_matches_transformers(tiny_models, references, few_rows_kernels, family):
    """Seven prompts in 2 x 4 rows: the filler row is computed too, on its own, and never sampled."""
    ids, logits, kernels = generate(tiny_models[family][0], P(gbs=4, nb=2), True)
    assert all_fused(kernels)
    assert ids == references[family][0]
    for ours, theirs in zip(logits, references[family][1], strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_four_bit_weights_fused_give_the_eager_paths_logits(tiny_models, few_rows_kernels):
    """Decoder matrices kept as 4-bit codes, multiplied by the int4 gemv in both paths."""
    policy = P(dtype="bfloat16", compress_weight=True)
    with FlexGenLite(str(tiny_models["llama"][0]), policy=policy) as m:
        assert all(isinstance(w, decode_fused.Int4Weight) for layer in m.engine.fused.layers
                   for name, w in layer.items() if name.endswith(".weight") and name != "norm.weight")
    fused, eager = (generate(tiny_models["llama"][0], policy, on, EIGHT) for on in (True, False))
    assert all_fused(fused[2]) and not any(decode_fused.KERNEL in k for block in eager[2] for k in block)
    assert_identical(fused, eager)


def test_rows_that_stop_at_eos_leave_the_others_the_eager_paths_values(tiny_models, references, few_rows_kernels,
                                                                     tmp_path):
    """A row that stops at EOS is still computed with its batch (each row on its own), never sampled again;
    the rows still generating get all-eager's tokens and logits (the eager path computes them alone). EOS here:
    the token the first prompt makes third."""
    eos = references["llama"][0][0][2]
    make_checkpoint(tmp_path, "llama", seed=2, eos_token_id=eos)  # the session's tiny Llama, another EOS
    sampling = SamplingConfig(max_new_tokens=8, stop_at_eos=True)
    fused, eager = (generate(tmp_path, P(), on, EIGHT, sampling) for on in (True, False))
    assert len(eager[0][0]) == 3 and any(len(row) == 8 for row in eager[0])
    assert_identical(fused, eager)
    assert all_fused(fused[2])


@pytest.mark.parametrize("case", ["opt", "weights-on-disk", "cache-on-disk", "cache-split-in-a-batch",
                                  "compressed-cache", "rows-past-the-profile", "env-off", "no-profile"])
def test_it_runs_only_where_every_op_is_the_c_kernels(tiny_models, few_rows_kernels, monkeypatch, case):
    family, policy = "llama", P()
    if case == "opt":
        family = "opt"
    elif case == "weights-on-disk":
        policy = P(percent=(0, 0, 100, 0, 100, 0))
    elif case == "cache-on-disk":
        policy = P(percent=(100, 0, 0, 0, 100, 0))
    elif case == "cache-split-in-a-batch":
        policy = P(gbs=4, nb=1, percent=(100, 0, 50, 50, 100, 0))
    elif case == "compressed-cache":
        policy = P(dtype="bfloat16", compress_cache=True)
    elif case == "rows-past-the-profile":
        policy = P(gbs=8, nb=1)
    elif case == "env-off":
        monkeypatch.setenv(decode_fused.ENV, "0")
    else:  # no profile: the C kernels taken at one row only (a batch's filler row would leave one: EIGHT has none)
        monkeypatch.setenv("FLEXGEN_LITE_PROFILE", os.devnull)
        forget_profile()
    ids, logits, kernels = generate(tiny_models[family][0], policy, True, EIGHT if case == "no-profile" else PROMPTS)
    assert not any(decode_fused.KERNEL in k for block in kernels for k in block)


def test_weights_and_cache_on_the_cpu_tier_are_in_memory_too(tiny_models, few_rows_kernels):
    """On a CPU the cpu tier is compute memory: such weights and cache parts are used in place, so fused."""
    policy = P(percent=(50, 50, 50, 50, 100, 0))
    fused, eager = generate(tiny_models["llama"][0], policy, True), generate(tiny_models["llama"][0], policy, False)
    assert all_fused(fused[2])
    assert_identical(fused, eager)


def test_a_new_cache_is_walked_by_new_structs(tiny_models, few_rows_kernels):
    """A longer generation makes a new cache; the fused step follows it (not the freed one)."""
    model_dir = tiny_models["llama"][0]
    with FlexGenLite(str(model_dir), policy=P()) as m:
        short = m.generate_ids(EIGHT, SamplingConfig(max_new_tokens=3, stop_at_eos=False), return_logits=True)
        long = m.generate_ids(EIGHT, SamplingConfig(max_new_tokens=12, stop_at_eos=False), return_logits=True)
        assert m.engine.times.attention[-1] == decode_fused.KERNEL
    eager = generate(model_dir, P(), False, EIGHT, SamplingConfig(max_new_tokens=12, stop_at_eos=False))
    assert_identical(long, eager)
    assert [row[:3] for row in eager[0]] == short[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_silu_times_up_is_torchs_in_place_ops_bit_for_bit(dtype, threads):
    """Lengths below and above torch's grain (split over threads, each part with its own scalar tail)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        for n in (16, 1536, 1536 * 3 + 5, 32768, 4 * 11008 + 1, 70001):
            gate, up = (6 * torch.randn(n, generator=g)).to(dtype), torch.randn(n, generator=g).to(dtype)
            expected = torch.nn.functional.silu(gate.clone(), inplace=True).mul_(up)
            decode_layers.silu_mul(gate, up)
            assert torch.equal(gate, expected), n
    finally:
        torch.set_num_threads(saved)


def test_every_bf16_and_fp16_input_gives_torchs_silu():
    """All 65536 bit patterns of each 16-bit kind (the claim that libm's expf gives torch's values there)."""
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
        x = x[torch.isfinite(x)].contiguous()
        ones = torch.ones_like(x)
        ours = x.clone()
        decode_layers.silu_mul(ours, ones)
        assert torch.equal(ours, torch.nn.functional.silu(x.clone(), inplace=True).mul_(ones))


CHILD = """
import torch
from flexgen_lite.kernels import decode_layers as D
print(torch.backends.cpu.get_cpu_capability(), D.torch_exp()[1], *[D.silu_exact(t) for t in
      (torch.float32, torch.bfloat16, torch.float16)])
"""


@pytest.mark.parametrize("capability,lanes", [("avx2", 8), ("default", 0)])
def test_silu_follows_the_vector_width_torch_runs(capability, lanes):
    """Under torch's AVX2 kernels its 8-lane exp is called; under its scalar ones, libm's: both exact."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split() == [capability.upper(), str(lanes), "True", "True", "True"], done.stderr


@pytest.mark.parametrize("march", [["-march=x86-64-v3"], []], ids=["avx2", "portable"])
def test_other_builds_give_the_same_silu(march):
    """Builds for machines without AVX-512 (or any vector extension) reach torch's exp at the width they have."""
    lib = other_native_build(march)
    fn, lanes, step = decode_layers.torch_exp()
    lanes_here = lib.decode_layer_exp_lanes()
    assert lanes_here == (8 if march else 0)
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        gate, up = (6 * torch.randn(40001, generator=g)).to(dtype), torch.randn(40001, generator=g).to(dtype)
        expected = torch.nn.functional.silu(gate.clone(), inplace=True).mul_(up)
        use = lanes <= lanes_here  # a build narrower than torch's kernels cannot make fp32 exact: not asked to
        lib.decode_silu_mul(gate.data_ptr(), up.data_ptr(), 0 if dtype == torch.float32 else 1, gate.numel(),
                            fn if use else 0, lanes if use else 0, step or 1,
                            decode_layers.silu_chunk(gate.numel(), torch.get_num_threads()), torch.get_num_threads())
        assert torch.equal(gate, expected) or (dtype == torch.float32 and not use)


def test_it_runs_where_the_profile_finds_it_faster(few_rows_kernels):
    """The fused step against the eager path's fastest ways plus its overhead per layer: a C kernel slower than
    torch's matmul still wins where the overhead it saves is larger, and loses where it is not; never at rows
    the C kernel was not measured at."""
    products = [(576, 576, False)] * 7
    slow = {"float32": [(m, 1 * G, 0.0) for m in FEW]}  # 6x slower than the test profile's torch matmul at 1 row
    for overhead, expected in ((1e-2, True), (1e-7, False)):
        costs = dict.fromkeys(("llama", "opt"), (overhead, overhead))
        hw = dataclasses.replace(few_rows_kernels, gemv=slow, layer_overhead=costs)
        assert decode_fused.fused_wins(hw, "llama", torch.float32, 1, 1, products) is expected
    assert decode_fused.fused_wins(few_rows_kernels, "llama", torch.float32, 4, 1, products)
    assert not decode_fused.fused_wins(few_rows_kernels, "llama", torch.float32, 8, 1, products)


def test_a_batch_with_finished_rows_computes_those_left(tiny_models, few_rows_kernels, monkeypatch):
    """A block's filler row (5 prompts in batches of 2 x 2) and rows stopped at eos are not computed: the fused step
    runs over the rows still generating (Step.rows), each writing and reading its own cache row (Step.row_map),
    and gives the eager path's tokens and logits bit for bit."""
    seen = []
    real = decode_fused.FusedDecode.run

    def run(self, cache, block, b, start):
        out = real(self, cache, block, b, start)
        seen.append((self.batches[b].step.rows, 2 if block.active_rows(b) is None else len(block.active_rows(b))))
        return out

    monkeypatch.setattr(decode_fused.FusedDecode, "run", run)
    fused = generate(tiny_models["llama"][0], P(), True)
    eager = generate(tiny_models["llama"][0], P(), False)
    assert_identical(fused, eager)
    assert all(rows == left for rows, left in seen) and (1, 1) in seen  # the filler row's batch: one row


def test_the_cost_model_decides_as_the_engine(tiny_models, few_rows_kernels):
    """products_cost.fused_decode asks fused_wins with the same products (dense and 4-bit)."""
    from flexgen_lite.planning.layout import Setup, Workload
    from flexgen_lite.planning.products_cost import fused_decode

    for policy in (P(), P(dtype="bfloat16", compress_weight=True), P(gbs=8, nb=1)):
        with FlexGenLite(str(tiny_models["llama"][0]), policy=policy) as m:
            rows = policy.gpu_batch_size
            engine_says = m.engine.fused_decode and m.engine.fused._rows_native(rows)
            setup = Setup(m.config, Workload(8, 8), m.policy, few_rows_kernels)
            assert fused_decode(setup) == engine_says


def test_penalties_and_bias_apply_to_the_fused_steps_logits(tiny_models, few_rows_kernels):
    """A row's rules (logit_rules.py) on the logits the fused step computes: its tokens are the eager path's."""
    sampling = dataclasses.replace(SAMPLING, frequency_penalty=1.5, repetition_penalty=1.4, logit_bias={77: 3.0})
    fused = generate(tiny_models["llama"][0], P(), True, EIGHT, sampling)
    eager = generate(tiny_models["llama"][0], P(), False, EIGHT, sampling)
    plain = generate(tiny_models["llama"][0], P(), True, EIGHT)
    assert all_fused(fused[2]) and fused[0] == eager[0] != plain[0]
