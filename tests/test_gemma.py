"""Gemma and Gemma-2 (model_types gemma, gemma2): a Llama layer with (1 + w) norms in fp32, embeddings times
sqrt(hidden), a tanh-GELU gated MLP; Gemma-2 with soft-capped attention scores and logits, a norm after each
block, its own attention scale. transformers' tokens and logits under placements through each attention path."""

from __future__ import annotations

import pytest
import torch

from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.engine import decode_fused
from flexgen_lite.kernels import attention
from flexgen_lite.models.config import ModelError
from flexgen_lite.models.hf_config import config_from_dict

from .conftest import FAMILY_CONFIGS, PROMPTS, hf_greedy, make_checkpoint, on_device
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
    whole = attention.scored_attend(q, k, v, None, 5.0)
    monkeypatch.setattr(attention, "SCORE_BYTES", 4 * 2 * 4 * 40 * 7)  # 7 queries a chunk
    assert torch.allclose(attention.scored_attend(q, k, v, None, 5.0), whole, atol=1e-6)
    mask = torch.rand(2, 1, 40, 40, generator=g) > 0.3
    mask |= torch.eye(40, dtype=torch.bool)
    chunked = attention.scored_attend(q, k, v, mask, 5.0)
    monkeypatch.setattr(attention, "SCORE_BYTES", 64 << 20)
    assert torch.allclose(chunked, attention.scored_attend(q, k, v, mask, 5.0), atol=1e-6)


def _write_gemma_gguf(model, path, arch: str) -> None:
    """The tiny transformers Gemma as llama.cpp's converter writes it: tensor names by gguf's own map, each norm's
    1 + w, Gemma-2's soft caps and window as metadata, no tied head; rows in HF's order (its rotary is NEOX)."""
    import gguf

    from .test_phi3 import gguf_header, write_gguf

    c = model.config
    writer = gguf_header(c, path, arch, c.head_dim)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    if arch == "gemma2":
        writer.add_float32(f"{arch}.attn_logit_softcapping", c.attn_logit_softcapping)
        writer.add_float32(f"{arch}.final_logit_softcapping", c.final_logit_softcapping)
        writer.add_sliding_window(c.sliding_window)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = t.numpy() + 1 if name.endswith("norm.weight") else t.numpy()
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), w)
    write_gguf(writer)


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_a_gemma_gguf_file_gives_transformers_outputs(tiny_models, references, compute_device, tmp_path, family):
    """From a GGUF file as llama.cpp writes it (each norm's 1 + w, HF's w read back). Gemma-2's attention scale is
    not in the file (llama.cpp's rule gives head_dim here), nor a head of its own: its model is the tiny one with
    query_pre_attn_scalar = head_dim and the embedding as its head."""
    model, reference = tiny_models[family][1], references[family]
    if family == "gemma2":
        model = make_checkpoint(tmp_path / "hf", family, seed=5, query_pre_attn_scalar=32, tie_word_embeddings=True)
        reference = hf_greedy(on_device(model, compute_device), PROMPTS, 8)
    path = tmp_path / f"{family}.gguf"
    _write_gemma_gguf(model, path, family)
    check_against_reference(path, reference, POLICIES["weights-split-3-tiers"], compute_device)


@pytest.mark.parametrize("layers, scalar", [(42, 256), (46, 4608 // 32)])
def test_a_gemma2_files_attention_scale_is_llama_cpps(tmp_path, layers, scalar):
    """The file stores no attention scale: as llama.cpp, hidden / heads for the 27B (46 layers), else head_dim."""
    from types import SimpleNamespace

    from flexgen_lite.models.gguf_file import read_gguf_config

    from .test_phi3 import gguf_header, write_gguf

    c = SimpleNamespace(num_hidden_layers=layers, max_position_embeddings=8192, hidden_size=4608,
                        intermediate_size=36864, num_attention_heads=32, num_key_value_heads=16, rms_norm_eps=1e-6,
                        vocab_size=512, rope_parameters={"rope_theta": 10000.0})
    path = tmp_path / "header.gguf"
    writer = gguf_header(c, path, "gemma2", 256)
    writer.add_key_length(256)
    write_gguf(writer)
    config = read_gguf_config(path)
    assert config["query_pre_attn_scalar"] == scalar and config["model_type"] == "gemma2"
    assert config_from_dict(config).attention_scale == scalar ** -0.5


def test_a_gemma2_file_without_soft_caps_takes_transformers_and_llama_cpps(tmp_path):
    """helper-39: a Gemma-2 file without its caps' metadata (early converters wrote none) ran uncapped, its logits
    0.26 off transformers'; llama.cpp and transformers both take 50 and 30 then. A count stored as a float is
    refused by name (it was read as int(5.6e-45) = 0, then blamed on the rotary dims)."""
    from types import SimpleNamespace

    from transformers import Gemma2Config

    from flexgen_lite.models.gguf_file import GGUFError, read_gguf_config

    from .test_phi3 import gguf_header, write_gguf

    c = SimpleNamespace(num_hidden_layers=2, max_position_embeddings=8192, hidden_size=64, intermediate_size=128,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=512,
                        rope_parameters={"rope_theta": 10000.0})
    writer = gguf_header(c, tmp_path / "g.gguf", "gemma2", 16)
    write_gguf(writer)
    config, reference = read_gguf_config(tmp_path / "g.gguf"), Gemma2Config()
    assert config["attn_logit_softcapping"] == reference.attn_logit_softcapping == 50.0
    assert config["final_logit_softcapping"] == reference.final_logit_softcapping == 30.0
    data = (tmp_path / "g.gguf").read_bytes()
    key = data.index(b"gemma2.embedding_length") + len(b"gemma2.embedding_length")
    value_type = int.from_bytes(data[key:key + 4], "little")
    (tmp_path / "f.gguf").write_bytes(data[:key] + (6).to_bytes(4, "little") + data[key + 4:])  # 6: float32
    assert value_type in (4, 5)  # a 32-bit integer, read now as a float
    with pytest.raises(GGUFError, match="'gemma2.embedding_length' is .*not a whole number"):
        read_gguf_config(tmp_path / "f.gguf")
