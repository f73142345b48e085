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
