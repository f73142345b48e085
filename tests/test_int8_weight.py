"""The embedding and head in 8 bits on a CPU (kernels/int8_weight.py, native/int8.c): the rounding's bound, a GGUF's
Q8_0 kept bit for bit, the C kernel and the tiles against a dense product of the same values, the placement and
the memory plan. Generation against transformers on the same 8-bit values: test_offload_features."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.engine.weights import in_8_bits
from flexgen_lite.kernels import native
from flexgen_lite.kernels.int8_weight import GEMV_ROWS, GROUP, Int8Weight, head_wins, int8_nbytes
from flexgen_lite.models.gguf_file import default_model_path
from flexgen_lite.models.gguf_weights import gguf_tensors, read_gguf_tensor
from flexgen_lite.models.hf_config import load_config
from flexgen_lite.models.specs import layer_specs
from flexgen_lite.planning.layout import Workload
from flexgen_lite.planning.memory_plan import peak_memory

from .conftest import PROMPTS, forget_profile, set_profile, synthetic_profile

pytestmark = pytest.mark.skipif(native.library() is None, reason="the C kernels are not built here")


def test_rounding_is_within_half_a_step_of_each_group():
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different sizes
    w[3, :GROUP] = 0  # a group of zeros stays zeros
    q = Int8Weight.quantize(w)
    step = q.scale.float().repeat_interleave(GROUP, 1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-3 * step).all()
    assert (q.dequantize()[3, :GROUP] == 0).all() and q.codes.abs().max() <= 127
    assert q.nbytes == int8_nbytes((64, 96)) == 64 * 96 + 64 * 3 * 2


def test_q8_0_is_kept_bit_for_bit():
    w = np.random.default_rng(0).standard_normal((48, 128)).astype(np.float32)
    blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    want = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
    q = Int8Weight.from_q8_0(torch.from_numpy(blocks.view(np.uint8)), (48, 128))
    assert torch.equal(q.dequantize(), torch.from_numpy(want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 40])
def test_products_equal_a_dense_product_of_the_same_values(dtype, rows):
    """The C kernel (any rows; the engine takes it up to GEMV_ROWS where the profile says) and the tiles (more
    rows) against x @ W.T on the dequantized values: fp32 sums in another order; bf16 rows multiply values
    rounded to bf16, as the tiles' dense product does."""
    g = torch.Generator().manual_seed(rows)
    q = Int8Weight.quantize(torch.randn(200, 256, generator=g) * 0.05, dtype)
    x = torch.randn(rows, 256, generator=g).to(dtype)
    want = x.float() @ q.dequantize(dtype).float().T
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(native.int8_gemv(q.codes, q.scale, x).float(), want, **tol)
    torch.testing.assert_close(q.matmul(x.view(1, rows, 256)).float()[0], want, **tol)
    ids = torch.tensor([[5, 0, 199], [7, 7, 1]])
    assert torch.equal(q.embedding(ids), q.dequantize(torch.float32)[ids].to(dtype))


def test_compressed_weights_keep_a_gguf_q8_0_embedding_as_stored():
    """SmolLM2's file stores its (tied) embedding as Q8_0: with --compress-weight on a CPU it is kept as the file
    holds it, and the model, 4-bit decoder included, is the file's own."""
    path = default_model_path()
    policy = Policy(gpu_batch_size=2, dtype="float32", compress_weight=True)
    with FlexGenLite(path, policy=policy) as m:
        tokens = m.engine.weights[0]["tokens"]
        assert isinstance(tokens.data, Int8Weight) and m.engine.weights[-1]["lm_head"] is tokens
        assert torch.equal(tokens.data.dequantize(), read_gguf_tensor(gguf_tensors(path)["model.embed_tokens.weight"]))
        ids = m.generate_ids([[1, 504, 3458, 282]], SamplingConfig(max_new_tokens=4, stop_at_eos=False))
    assert len(ids[0]) == 4


def test_placement_and_plan_count_the_8_bit_ends(tiny_models):
    """The ledger's bytes in compute memory equal the plan's, 8-bit ends included; across a link (a GPU's
    paths), and for batches past GEMV_ROWS, the ends stay in the compute dtype."""
    model_dir = tiny_models["llama"][0]
    policy = Policy(gpu_batch_size=2, dtype="bfloat16", compress_weight=True)
    with FlexGenLite(str(model_dir), policy=policy) as m:
        ends = [m.engine.weights[0]["tokens"], m.engine.weights[-1]["lm_head"]]
        assert all(isinstance(t.data, Int8Weight) for t in ends)
        placed = m.memory_report()["current"]["gpu"]
        ids = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=3, stop_at_eos=False))
        plan, _ = peak_memory(m.config, Workload(8, 3), policy, cuda=False)
    assert plan["gpu"]["weights"] == placed
    with FlexGenLite(str(model_dir), policy=dataclasses.replace(policy, dtype="float32"), device="cpu+link") as m:
        assert not isinstance(m.engine.weights[-1]["lm_head"].data, Int8Weight)
    wide = dataclasses.replace(policy, gpu_batch_size=GEMV_ROWS + 1)  # products that compute: the head stays dense
    with FlexGenLite(str(model_dir), policy=wide) as m:
        assert not isinstance(m.engine.weights[-1]["lm_head"].data, Int8Weight)
        assert peak_memory(m.config, Workload(8, 3), wide, cuda=False)[0]["gpu"]["weights"] == \
            m.memory_report()["current"]["gpu"]
    assert all(len(i) == 3 for i in ids)


def test_the_ends_hold_their_8_bit_values_whatever_the_batch(tiny_models):
    """fp32, --compress-weight: a batch of GEMV_ROWS rows keeps the ends as 8-bit codes, a wider one holds their
    values dense (the decoder's 4-bit matrices in compute memory or on disk): the same greedy text and logits
    within fp32's sums for each prompt whatever the batch (the ends were rounded only where stored in 8 bits: the
    text followed the batch, helper-20). Across a link nothing is rounded."""
    model_dir = str(tiny_models["llama"][0])
    sampling = SamplingConfig(max_new_tokens=6, stop_at_eos=False)
    base = Policy(dtype="float32", compress_weight=True)
    runs = {}
    for rows, percent in ((1, (100, 0, 100, 0, 100, 0)), (GEMV_ROWS, (100, 0, 100, 0, 100, 0)),
                          (GEMV_ROWS + 3, (100, 0, 100, 0, 100, 0)), (GEMV_ROWS + 3, (0, 0, 100, 0, 100, 0))):
        policy = dataclasses.replace(base, gpu_batch_size=rows, weight_gpu_percent=percent[0],
                                     weight_cpu_percent=percent[1])
        with FlexGenLite(model_dir, policy=policy) as m:
            head = m.engine.weights[-1]["lm_head"]
            assert isinstance(head.data, Int8Weight) == (rows <= GEMV_ROWS) and head.tier == "gpu"
            runs[rows, percent] = m.generate_ids(PROMPTS, sampling, return_logits=True)
    (ids, logits), *others = runs.values()
    for other_ids, other_logits in others:
        assert other_ids == ids
        for a, b in zip(other_logits, logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    with FlexGenLite(model_dir, policy=dataclasses.replace(base, gpu_batch_size=GEMV_ROWS + 3)) as m:
        _, dense = m.generate_ids(PROMPTS, sampling, return_logits=True)
    with FlexGenLite(model_dir, policy=dataclasses.replace(base, gpu_batch_size=GEMV_ROWS + 3), device="cpu+link") as m:
        _, unrounded = m.generate_ids(PROMPTS, sampling, return_logits=True)
    assert not torch.equal(dense[0], unrounded[0])  # the ends' rounding shows in the logits


def test_the_ends_go_to_8_bits_where_the_profile_measured_the_kernel_faster(tiny_models, tmp_path, monkeypatch):
    """Whether the ends are kept in 8 bits is the profile's measure of the 8-bit kernel against the head in the
    compute dtype (CPUs differ: the dense bf16 head wins from 2-4 rows where bf16 has a dot instruction, the 8-bit
    kernel wins over fp32 to 32 rows): here it beats fp32 up to its last measured 16 rows and bf16 at 1 row only.
    Batches of 8 keep fp32 ends in 8 bits, bf16 ones dense, the plan counting what is placed; the kernel runs the
    8-row products; a profile without the measure keeps the fixed rule (GEMV_ROWS)."""
    hw = synthetic_profile()
    hw.int8_gemv = {"float32": [(m, 4 * r, f) for m, r, f in hw.matmul["float32"] if m <= 16],
                    "bfloat16": [(1, 2 * hw.matmul["bfloat16"][0][1], 1e-4), (2, 4e9, 1e-4), (16, 30e9, 1e-4)]}
    set_profile(hw, tmp_path, monkeypatch)
    model_dir = tiny_models["llama"][0]
    head = next(w for layer in layer_specs(load_config(model_dir)) for w in layer.weights if w.name == "lm_head")
    policy = Policy(gpu_batch_size=8, dtype="float32", compress_weight=True)
    compression = policy.weight_compression()
    try:
        assert [head_wins(torch.float32, m, *head.shape) for m in (1, 8, 16, 17)] == [True, True, True, False]
        assert [head_wins(torch.bfloat16, m, *head.shape) for m in (1, 2, 8)] == [True, False, False]
        assert in_8_bits(head, compression, 8, torch.float32) and not in_8_bits(head, compression, 8, torch.bfloat16)
        assert not in_8_bits(head, None, 8, torch.float32) and not in_8_bits(head, compression, 0, torch.float32)
        for dtype, eight in (("float32", True), ("bfloat16", False)):
            with FlexGenLite(str(model_dir), policy=dataclasses.replace(policy, dtype=dtype)) as m:
                assert isinstance(m.engine.weights[-1]["lm_head"].data, Int8Weight) == eight
                placed = m.memory_report()["current"]["gpu"]
                ids = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=3, stop_at_eos=False))
                plan, _ = peak_memory(m.config, Workload(8, 3), m.policy, cuda=False)
                assert plan["gpu"]["weights"] == placed and all(len(i) == 3 for i in ids)
        q = Int8Weight.quantize(torch.randn(*head.shape) * 0.05)
        x = torch.randn(8, head.shape[1])
        torch.testing.assert_close(q.matmul(x), x @ q.dequantize().T, atol=1e-5, rtol=1e-5)
        hw.int8_gemv = None  # an older profile: GEMV_ROWS
        set_profile(hw, tmp_path, monkeypatch)
        assert [head_wins(torch.float32, m, *head.shape) for m in (GEMV_ROWS, GEMV_ROWS + 1)] == [True, False]
    finally:
        monkeypatch.undo()
        forget_profile()
