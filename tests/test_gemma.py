"""Gemma and Gemma-2 (model_types gemma, gemma2): a Llama layer with (1 + w) norms in fp32, embeddings times
sqrt(hidden), a tanh-GELU gated MLP; Gemma-2 with soft-capped attention scores and logits, a norm after each
block, its own attention scale. transformers' tokens and logits under placements through each attention path."""

from __future__ import annotations

import pytest
import torch

from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.engine import decode_fused
from flexgen_lite.kernels import attention
from flexgen_lite.models.config import ModelError, config_from_dict

from .conftest import FAMILY_CONFIGS, PROMPTS, hf_greedy
from .test_parity import LOGITS_ATOL, POLICIES, check_against_reference
from .test_shared_prefix import SHARED_PROMPTS, run

NAMES = ["all-gpu", "weights-split-3-tiers", "cache-split-3-tiers", "cpu-attention-cache-split", "act-disk-split"]


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
@pytest.mark.parametrize("name", NAMES)
def test_gemma_matches_transformers(tiny_models, references, compute_device, family, name):
    check_against_reference(tiny_models[family][0], references[family], POLICIES[name], compute_device)


def test_gemma2_scores_are_capped_in_every_step(tiny_models):
    """No fused kernel takes a soft cap: every step's attention is the capped one, the fused CPU step is off."""
    with FlexGenLite(str(tiny_models["gemma2"][0]), policy=POLICIES["all-gpu"], device="cpu") as m:
        kernels = []
        m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=4, stop_at_eos=False),
                       on_block=lambda _: kernels.append(list(m.engine.times.attention)))
    assert kernels and all(step == "softcap" for block in kernels for step in block)
    config = m.config
    assert (config.attn_softcap, config.logits_softcap, config.attention_scale) == (5.0, 8.0, 24 ** -0.5)
    assert not decode_fused.config_fits(config)


def test_gemma2_with_a_shared_prefix_matches_transformers(tiny_models):
    """The shared prefix's rows attend under a mask, capped too."""
    ids, logits, shared = run(tiny_models["gemma2"][0], POLICIES["cpu-attention-cache-split"], "cpu")
    want_ids, want_logits = hf_greedy(tiny_models["gemma2"][1], SHARED_PROMPTS, 6)
    assert all(shared) and ids == want_ids
    for ours, theirs in zip(logits, want_logits, strict=True):
        assert (ours - theirs).abs().max() <= LOGITS_ATOL


def test_an_unknown_gemma_activation_is_refused():
    with pytest.raises(ModelError, match="activation 'relu' is not supported for gemma2"):
        config_from_dict(FAMILY_CONFIGS["gemma2"] | {"vocab_size": 512, "hidden_activation": "relu"})


def test_a_long_capped_prefill_goes_in_chunks_of_queries(monkeypatch):
    """The capped attention's scores are fp32 (b, heads, t, L): a prefill takes its queries in chunks that keep
    them within SCORE_BYTES, with the same result as all at once."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 16, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    whole = attention.softcapped_attend(q, k, v, None, 5.0)
    monkeypatch.setattr(attention, "SCORE_BYTES", 4 * 2 * 4 * 40 * 7)  # 7 queries a chunk
    assert torch.allclose(attention.softcapped_attend(q, k, v, None, 5.0), whole, atol=1e-6)
    mask = torch.rand(2, 1, 40, 40, generator=g) > 0.3
    mask |= torch.eye(40, dtype=torch.bool)
    chunked = attention.softcapped_attend(q, k, v, mask, 5.0)
    monkeypatch.setattr(attention, "SCORE_BYTES", 64 << 20)
    assert torch.allclose(chunked, attention.softcapped_attend(q, k, v, mask, 5.0), atol=1e-6)
