"""A few rows times a CPU's 4-bit matrix grouped along its output dimension (FlexGen's grouping), its codes read
as stored by the C kernel (native.int4_gemv_row_groups): x . W within fp32's rounding in fp32, within the bf16
scaling's in bf16; and the engine's decode steps multiplying them so (CodesMatrix on a CPU), with the tokens and
logits of the run that dequantizes every matrix into its slot."""

from __future__ import annotations

import pytest
import torch

from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.kernels import int4_gemv_triton as gemv
from flexgen_lite.kernels import native
from flexgen_lite.kernels.quantization import CompressionConfig, dequantize_reference, quantize

from .conftest import PROMPTS, make_checkpoint
from .test_parity import P

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here")


def weight(n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = quantize(torch.randn(n, k, generator=g) * 0.05, CompressionConfig(4, group, 0))
    return q, dequantize_reference(q, torch.float32, None), g


def product(q, x):
    n, k = q.shape
    stats = (n // q.config.group_size, k)
    return native.int4_gemv_row_groups(q.data, q.scale.view(stats), q.minimum.view(stats), q.config.group_size, x)


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("n,k,group", [(192, 768, 64), (128, 100, 32), (256, 2500, 128), (64, 10000, 64)], ids=str)
def test_the_kernel_is_x_times_the_dequantized_matrix(rows, n, k, group):
    """Rows in blocks of 8 and a rest; columns by 64 (fp32) or 32 (bf16) and a tail; passes of columns (10000:
    several), groups of 32 to 128 rows."""
    q, w, g = weight(n, k, group)
    x = torch.randn(rows, k, generator=g)
    want = x @ w.T
    assert relative(product(q, x), want) < 1e-5
    for dtype in (torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        got = product(q, xd)
        assert got.dtype == dtype
        # bf16: x times the group's scales rounded to bf16 (2^-9 a term) and the output to bf16; fp16: the output
        assert relative(got, xd.float() @ w.T) < (1.5e-2 if dtype == torch.bfloat16 else 2e-3)


def test_the_kernel_refuses_what_it_cannot_read():
    q, _, _ = weight(128, 96, 64)
    stats = (2, 96)
    args = (q.data, q.scale.view(stats), q.minimum.view(stats), 64)
    assert product(q, torch.randn(16, 96)) is not None
    assert native.int4_gemv_row_groups(*args, torch.randn(17, 96)) is None  # past ROW_GROUP_ROWS
    assert native.int4_gemv_row_groups(*args, torch.randn(2, 95)) is None  # another width
    assert native.int4_gemv_row_groups(*args, torch.randn(2, 96).to(torch.int32)) is None
    odd, _, _ = weight(64, 7, 64)
    assert not gemv.row_groups_fit(odd)  # a byte would hold two rows' codes
    assert gemv.row_groups_fit(q)
    assert not gemv.row_groups_fit(quantize(torch.randn(128, 96), CompressionConfig(4, 64, 1)))  # the other grouping
    assert not gemv.row_groups_fit(quantize(torch.randn(100, 96), CompressionConfig(4, 64, 0)))  # a padded group


def run(path, policy):
    """(ids, logits, rows of each product by the kernel)"""
    calls, prepare = [], native.row_groups_product

    def counted(*weight):
        product = prepare(*weight)
        return None if product is None else lambda x: calls.append(x.shape[0]) or product(x)

    native.row_groups_product = counted
    try:
        with FlexGenLite(str(path), policy=policy, device="cpu") as m:
            ids, logits = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=6, stop_at_eos=False),
                                         return_logits=True)
    finally:
        native.row_groups_product = prepare
    return ids, logits, calls


@pytest.mark.parametrize("family,percent", [("opt", (100, 0, 100, 0, 100, 0)), ("llama3", (50, 50, 100, 0, 100, 0))],
                         ids=["opt-ram", "llama3-two-homes"])
def test_the_engine_multiplies_flexgens_grouping_as_stored(tmp_path, family, percent, monkeypatch):
    """Decode steps (3 rows) multiply the 4-bit matrices as codes, the prefill (3 rows x up to 10 positions)
    dequantizes them into slots; tokens and logits (fp32) are those of the run where no matrix is kept as codes."""
    make_checkpoint(tmp_path, family, seed=5, num_hidden_layers=4)
    monkeypatch.setattr(gemv, "by_measurement", lambda x: False)  # the kernel always (the machine's choice aside)
    policy = P(percent, gbs=3, nb=2, compress_weight=True, weight_group_dim=0)
    ids, logits, calls = run(tmp_path, policy)
    assert 3 in calls and max(calls) <= 3, calls  # decode steps' rows (a last batch's fewer), no prefill's
    monkeypatch.setattr(gemv, "row_groups_fit", lambda q: False)
    want_ids, want_logits, none = run(tmp_path, policy)
    assert not none and ids == want_ids
    for a, b in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_a_prepared_product_keeps_its_weight_alive():
    """The product holds the tensors whose pointers it passes (the profile's probe drops its own: a freed weight
    was read by the kernel)."""
    import gc

    q, w, g = weight(128, 256, 64)
    product = native.row_groups_product(q.data.clone(), q.scale.clone(), q.minimum.clone(), 64)
    gc.collect()
    x = torch.randn(4, 256, generator=g)
    assert relative(product(x), x @ w.T) < 1e-5


def test_the_profile_measures_the_kernel():
    """Points per row count up to ROW_GROUP_ROWS in each dtype, read back by interpolated_time."""
    from flexgen_lite.profiling.int4_probes import ROW_GROUPS_ROWS, row_groups_points
    from flexgen_lite.system.hardware import interpolated_time

    for dtype in (torch.float32, torch.bfloat16):
        points = row_groups_points(dtype, (128, 128), (256, 512))
        assert [m for m, _, _ in points] == list(ROW_GROUPS_ROWS) and max(ROW_GROUPS_ROWS) == native.ROW_GROUP_ROWS
        assert all(rate > 0 and fixed >= 0 for _, rate, fixed in points)
        assert interpolated_time(points, 8, 256, 512) > 0


def test_the_cost_model_prices_a_cpu_decode_step_keeping_codes():
    """A CPU plan in FlexGen's grouping: where the profile measured the kernel faster than dequantizing into the
    slot and a dense product, a decode step multiplies the codes and dequantizes nothing (but what is mapped from
    disk); unmeasured or slower, dequantized beside compute as before; prefills and steps of more than
    ROW_GROUP_ROWS rows keep the slot."""
    import dataclasses

    from flexgen_lite.planning.cost_model import predict
    from flexgen_lite.planning.layout import Workload

    from .conftest import synthetic_profile
    from .test_cost_model_cuda import CONFIG

    hw, work = synthetic_profile(), Workload(64, 32, 64)
    dense = hw.matmul["bfloat16"][-1][1]
    fast = dataclasses.replace(hw, row_groups_gemv={"bfloat16": [(1, dense, 0.0), (16, 16 * dense, 0.0)]})
    slow = dataclasses.replace(hw, row_groups_gemv={"bfloat16": [(1, dense / 1e3, 0.0), (16, dense / 1e2, 0.0)]})

    def plan(gbs, percent=(100, 0, 100, 0, 100, 0), group_dim=0):
        return dataclasses.replace(P(percent, gbs=gbs, nb=2, compress_weight=True, weight_group_dim=group_dim),
                                   dtype="bfloat16")

    kernel, unmeasured, slower = (predict(CONFIG, work, plan(8), h) for h in (fast, dataclasses.replace(
        hw, row_groups_gemv={}), slow))
    assert unmeasured.decode_by.get("dequantize", 0) > 0 and not kernel.decode_by.get("dequantize")
    assert slower.decode_by == pytest.approx(unmeasured.decode_by) and kernel.prefill_s == unmeasured.prefill_s
    assert predict(CONFIG, work, plan(8, (0, 100, 100, 0, 100, 0)), fast).decode_by.get("dequantize", 0) == 0
    mapped = predict(CONFIG, work, plan(8, (0, 50, 100, 0, 100, 0)), fast).decode_by.get("dequantize", 0)
    assert 0 < mapped < unmeasured.decode_by["dequantize"]  # half the codes mapped from disk: dequantized
    rows_past = predict(CONFIG, work, plan(32), fast)
    assert rows_past.decode_by.get("dequantize", 0) > 0
    assert predict(CONFIG, work, plan(8, group_dim=1), fast).decode_by == predict(CONFIG, work, plan(8, group_dim=1),
                                                                                  hw).decode_by
