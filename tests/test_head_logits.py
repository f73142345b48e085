"""The head's logits in fp32 where they decide: a bf16 or fp16 head's output is rounded to its dtype (a logit of ~16
is a multiple of 1/8), which ties tokens a few hundredths apart, and greedy decoding then took the lower id. The
logits near each row's largest are made exact; an 8-bit head's kernel hands out its fp32 sums as they are."""

from __future__ import annotations

import pytest
import torch

from flexgen_lite.kernels.int8_weight import Int8Weight
from flexgen_lite.models.layers import exact_at_the_top, exact_top_k, head


class _Config:
    logits_divisor, logits_softcap = 1.0, None


def tied_head(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """h (2 rows) and a head of 10 tokens where tokens 3 and 7 tie once rounded to `dtype` (16 + 1/256 and
    16 + 1/128 in fp32), 7 the larger; row 1 has one clear largest (token 2)."""
    w = torch.zeros(10, 8)
    w[:, 0] = torch.linspace(-4, 4, 10)
    w[3, :2] = torch.tensor([16.0, 1 / 256])
    w[7, :2] = torch.tensor([16.0, 1 / 128])
    w[2, 2] = 9.0
    h = torch.zeros(2, 8)
    h[0, :2] = 1.0
    h[1, 2] = 1.0
    return h.to(dtype), w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_tie_made_by_rounding_goes_to_the_larger_logit(dtype):
    h, w = tied_head(dtype)
    rounded = torch.nn.functional.linear(h, w).float()
    exact = torch.nn.functional.linear(h.float(), w.float())
    assert rounded[0, 3] == rounded[0, 7] and rounded[0].argmax() == 3  # the tie, and who took it
    logits = head({"lm_head": w}, h, _Config())
    assert logits.dtype == torch.float32 and logits.argmax(-1).tolist() == [7, 2] == exact.argmax(-1).tolist()
    assert logits[0, [3, 7]].tolist() == exact[0, [3, 7]].tolist()
    far = torch.ones(10, dtype=torch.bool)
    far[[3, 7]] = False
    assert torch.equal(logits[0, far], rounded[0, far])  # the rest as the product gave them
    assert torch.equal(logits[1], rounded[1])  # a row with one largest: untouched


def test_a_row_without_a_tie_is_not_recomputed(monkeypatch):
    h, w = tied_head(torch.bfloat16)
    logits = torch.nn.functional.linear(h, w).float()[1:]
    calls = []
    monkeypatch.setattr(torch.linalg, "vecdot", lambda *a: calls.append(a))
    exact_at_the_top(logits, h[1:], w)
    assert calls == []


def test_an_8_bit_head_gives_its_fp32_sums():
    torch.manual_seed(0)
    weight = Int8Weight.quantize(torch.randn(300, 64) * 4, torch.bfloat16)
    x = torch.randn(3, 64).to(torch.bfloat16)
    exact = x.float() @ weight.dequantize(torch.float32).T
    y = weight.matmul(x, torch.float32)
    assert y.dtype == torch.float32 and torch.allclose(y, exact, rtol=0.02, atol=0.2)
    rounded = weight.matmul(x)  # the same sums rounded to bf16, as they were handed out before
    assert rounded.dtype == torch.bfloat16 and torch.equal(y.to(torch.bfloat16), rounded)
    assert not torch.equal(rounded.float(), y)


def test_a_head_of_many_rows_takes_the_faster_product_timed_once_per_power_of_two(monkeypatch):
    from flexgen_lite.kernels import small_matmul

    torch.manual_seed(1)
    w = torch.randn(500, 64).to(torch.bfloat16)
    exact = lambda x: x.float() @ w.float().T  # noqa: E731
    asked = []
    stored = {}
    monkeypatch.setattr(small_matmul, "_stored", lambda: dict(stored))
    monkeypatch.setattr(small_matmul, "_store", lambda verdicts: stored.update(verdicts))
    for faster in (True, False):
        stored.clear()
        monkeypatch.setattr(small_matmul, "_timed", {})
        monkeypatch.setattr(small_matmul, "_kernel_faster",
                            lambda x, w, faster=faster: asked.append(x.shape[0]) or faster)
        for rows in (40, 64, 33, 17, 32):
            x = torch.randn(rows, 64).to(torch.bfloat16)
            y = small_matmul.head_product(x, w)
            if faster:  # the C kernel's fp32 sums
                assert y.dtype == torch.float32 and torch.allclose(y, exact(x), rtol=1e-5, atol=1e-4)
            else:  # torch's product, in bf16 (head() then settles its close calls)
                assert y.dtype == torch.bfloat16
    assert asked == [40, 17, 40, 17]  # rows 33-64 timed once, 17-32 once; each time the kernel's choice kept
    assert stored == {"bfloat16 64 500x64": False, "bfloat16 32 500x64": False}  # kept for the next process
    monkeypatch.setattr(small_matmul, "_timed", {})
    small_matmul.head_product(torch.randn(50, 64).to(torch.bfloat16), w)  # a new process: the stored verdict
    assert asked == [40, 17, 40, 17]
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert small_matmul.head_product(x, w).shape == (4, 500)  # a few rows: by the profile, not timed
    assert asked == [40, 17, 40, 17]


def test_near_uniform_logits_are_made_exact_row_by_row():
    """An untrained model's logits can all be near the largest: made exact by whole rows in parts, not by a
    gather of vocab x hidden per row."""
    torch.manual_seed(2)
    w = (torch.randn(3000, 16) * 1e-3 + 1).to(torch.bfloat16)  # every logit ~16
    h = torch.ones(2, 16).to(torch.bfloat16)
    logits = torch.nn.functional.linear(h, w).float()
    exact_at_the_top(logits, h, w)
    assert torch.allclose(logits, h.float() @ w.float().T, rtol=0, atol=1e-5)


def test_an_8_bit_head_by_tiles_settles_its_ties_too(monkeypatch):
    """An 8-bit head multiplied by tiles in bf16 (where its kernel is not used) rounds its logits as a bf16 head
    does: the near-ties are made exact from its exact values (codes x scale) all the same."""
    from flexgen_lite.kernels import int8_weight, native

    codes = torch.zeros(10, 32, dtype=torch.int8)
    codes[3, :2] = torch.tensor([127, 1])
    codes[7, :2] = torch.tensor([127, 2])  # 15.875 + 1/8 and + 1/4 in its values: x below ties them in bf16
    weight = Int8Weight(codes, torch.full((10, 1), 0.125, dtype=torch.float16), torch.bfloat16)
    x = torch.zeros(40, 32)
    x[:, 0], x[:, 1] = 1.0, 1 / 16
    x = x.to(torch.bfloat16)
    monkeypatch.setattr(native, "int8_gemv", lambda *a, **k: None)  # the tiles
    monkeypatch.setattr(int8_weight, "head_wins", lambda *a: False)
    rounded = weight.matmul(x, torch.float32)
    assert rounded[0, 3] == rounded[0, 7]  # the tie
    logits = head({"lm_head": weight}, x, _Config())
    assert (logits.argmax(-1) == 7).all() and logits[0, 7] - logits[0, 3] == pytest.approx(1 / 128)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_gpus_head_makes_its_top_logits_exact_in_fixed_shapes(dtype):
    """On CUDA (helper-45: no correction there) each row's EXACT_TOP largest logits are recomputed with fp32 sums
    by ops of fixed shapes, as a graph's capture allows: the tie goes to the larger logit, and over many rows
    greedy is fp32's."""
    h, w = tied_head(dtype)
    rounded = torch.nn.functional.linear(h, w).float()
    exact = torch.nn.functional.linear(h.float(), w.float())
    logits = exact_top_k(rounded, h, w)
    assert logits.argmax(-1).tolist() == [7, 2] and logits[0, [3, 7]].tolist() == exact[0, [3, 7]].tolist()
    torch.manual_seed(0)
    w, h = (torch.randn(32000, 256) * 0.5).to(dtype), torch.randn(64, 256).to(dtype)
    truth = torch.nn.functional.linear(h.float(), w.float()).argmax(-1)
    rounded = torch.nn.functional.linear(h, w).float()
    assert torch.equal(exact_top_k(rounded, h, w).argmax(-1), truth)
    if dtype == torch.bfloat16:  # the rounding alone does change a row here
        assert not torch.equal(rounded.argmax(-1), truth)
