"""RMSNorm and the rotary embedding by the C kernels (kernels/elementwise.py) against the
layers' own torch code (models/layers.py, which transformers' modules are written as). The engine's outputs
through them are test_parity's (every Llama-family placement on a CPU runs them)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.kernels import elementwise, native
from flexgen_lite.models import layers as L
from flexgen_lite.models.hf_config import config_from_dict

from .conftest import PROMPTS
from .test_parity import P

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CONFIG = config_from_dict({"model_type": "llama", "hidden_size": 200, "num_hidden_layers": 1, "num_attention_heads": 5,
                           "intermediate_size": 300, "vocab_size": 64, "rms_norm_eps": 1e-6})


def _torch_path(monkeypatch, fn, *args):
    """layers' function with the C kernels declining: its torch code."""
    with monkeypatch.context() as m:
        for name in ("rms_norm", "rope"):
            m.setattr(elementwise, name, lambda *a, **k: None)
        return fn(*args)


# widths: a tail past the last vector, and enough vectors for torch's sum to carry its chains up its levels
NORM_SHAPES = [(3, 200), (2, 37, 576), (1, 1, 4096), (2, 20000), (5, 100, 8), (4, 6)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_rms_norm_is_bit_for_bit_the_layers(monkeypatch, dtype, shape):
    """Each rounding where torch's ops round, and the sum of squares in torch's order: the same bits (an ulp
    off in the sum had flipped the shipped model's first token). Rows narrower than a vector go to torch."""
    g = torch.Generator().manual_seed(shape[-1])
    x = (3 * torch.randn(shape, generator=g)).to(dtype)
    w = {"norm.weight": torch.randn(shape[-1], generator=g).to(dtype)}
    ours, theirs = L.norm(x, w, CONFIG), _torch_path(monkeypatch, L.norm, x, w, CONFIG)
    assert ours.dtype == dtype and ours.shape == x.shape and torch.equal(ours, theirs)
    declined = elementwise.rms_norm(x, w["norm.weight"], CONFIG.norm_eps) is None
    assert declined == (shape[-1] < elementwise.torch_lanes())


CHILD = """
import torch
from flexgen_lite.kernels import elementwise
x = (3 * torch.randn(4, 3000, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
w = torch.randn(3000).to(torch.bfloat16)
xf = x.float()
theirs = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
print(torch.backends.cpu.get_cpu_capability(), elementwise.torch_lanes(),
      torch.equal(elementwise.rms_norm(x, w, 1e-6), theirs))
"""


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_rms_norm_follows_torch_on_other_cpus(capability):
    """torch dispatched as on CPUs without AVX-512 (or without AVX2): the width is found again, the same bits."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split() == [capability.upper(), "8", "True"], done.stderr


def test_without_a_width_that_gives_torchs_bits_rms_norm_is_torchs(monkeypatch):
    monkeypatch.setattr(elementwise, "torch_lanes", lambda: 0)
    assert elementwise.rms_norm(torch.randn(3, 64), torch.randn(64), 1e-6) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_is_bit_for_bit_the_layers(monkeypatch, dtype):
    """The products and the sum rounded as torch's three ops round them: identical. q as the engine has it,
    a (B, heads, T, d) view of the projection's (B, T, heads * d) output."""
    g = torch.Generator().manual_seed(3)
    b, t, heads, d = 2, 9, 5, 40
    q = torch.randn(b, t, heads * d, generator=g).to(dtype).view(b, t, heads, d).transpose(1, 2)
    positions = torch.arange(t)[None].expand(b, t) - torch.tensor([[0], [3]])
    cos, sin = L.rope_cos_sin(positions.clamp(min=-1), L.rope_frequencies(CONFIG, torch.device("cpu"))[:d // 2], dtype)
    ours, theirs = L.apply_rope(q, cos, sin), _torch_path(monkeypatch, L.apply_rope, q, cos, sin)
    assert ours.is_contiguous() and torch.equal(ours, theirs)


def test_what_they_do_not_take_is_left_to_torch():
    x = torch.randn(4, 16)
    assert elementwise.rms_norm(x, torch.randn(16).to(torch.bfloat16), 1e-6) is None  # mixed dtypes
    assert elementwise.rms_norm(x.t(), torch.randn(4), 1e-6) is None  # rows not contiguous
    assert elementwise.rope(x[None, None], torch.randn(2, 1, 4, 16), torch.randn(2, 1, 4, 16)) is None  # batch
    assert elementwise.rope(torch.randn(1, 2, 4, 15), torch.randn(1, 1, 4, 15), torch.randn(1, 1, 4, 15)) is None


@pytest.mark.parametrize("team", [True, False], ids=["openmp", "python-pool"])
def test_threads_split_the_rows_and_change_no_value(monkeypatch, team):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 200, generator=g).to(torch.bfloat16)
    w = torch.randn(200, generator=g).to(torch.bfloat16)
    cos, sin = (torch.randn(3, 1, 100, 200, generator=g).to(torch.bfloat16) for _ in range(2))
    one = [elementwise.rms_norm(x, w, 1e-6), elementwise.rope(x.view(3, 1, 100, 200), cos, sin)]
    monkeypatch.setattr(elementwise, "TEAM_WORK", 0)
    if not team:
        monkeypatch.setattr(native, "team_threads", lambda: 0)
        monkeypatch.setattr(native, "threads", lambda: 4)
        monkeypatch.setattr(native, "MIN_WORK", 1)
    split = [elementwise.rms_norm(x, w, 1e-6), elementwise.rope(x.view(3, 1, 100, 200), cos, sin)]
    assert all(torch.equal(a, b) for a, b in zip(one, split, strict=True))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_engine_gives_the_same_logits_through_them(tiny_models, monkeypatch, family):
    """bf16, prompts padded: every logit identical with the kernels and with the layers' torch code."""
    def run():
        policy = dataclasses.replace(P((100, 0, 100, 0, 100, 0), gbs=4), dtype="bfloat16")
        with FlexGenLite(str(tiny_models[family][0]), policy=policy) as m:
            return m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=4, stop_at_eos=False), return_logits=True)

    calls = []
    real = elementwise._rms_norm
    monkeypatch.setattr(elementwise, "_rms_norm", lambda *a: calls.append(1) or real(*a))
    ids, logits = run()
    assert calls
    for name in ("rms_norm", "rope"):
        monkeypatch.setattr(elementwise, name, lambda *a, **k: None)
    torch_ids, torch_logits = run()
    assert ids == torch_ids
    assert all(torch.equal(a, b) for row, theirs in zip(logits, torch_logits, strict=True)
               for a, b in zip(row, theirs, strict=True))
