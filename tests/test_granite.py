"""Granite (model_type granite): a Llama layer with multipliers of the embeddings, of each block's output before
its residual add, of the attention scores (in place of 1 / sqrt(head_dim)) and a divisor of the logits:
transformers' tokens and logits under placements through each attention kernel."""

from __future__ import annotations

import pytest

from flexgen_lite.engine import decode_fused
from flexgen_lite.models.hf_config import config_from_dict

from .conftest import FAMILY_CONFIGS
from .test_parity import POLICIES, check_against_reference


@pytest.mark.parametrize("name", ["all-gpu", "weights-disk", "cache-split-3-tiers", "cpu-attention-cache-split"])
def test_granite_matches_transformers(tiny_models, references, compute_device, name):
    check_against_reference(tiny_models["granite"][0], references["granite"], POLICIES[name], compute_device)


def test_the_multipliers_are_read_and_keep_the_fused_step_off():
    config = config_from_dict(FAMILY_CONFIGS["granite"] | {"vocab_size": 512})
    assert (config.embed_scale, config.residual_scale, config.attention_scale, config.logits_divisor) == \
        (2.0, 0.7, 0.3, 3.0)
    assert not config.plain and not decode_fused.config_fits(config)
    llama = config_from_dict(FAMILY_CONFIGS["llama"] | {"vocab_size": 512})
    assert llama.plain and decode_fused.config_fits(llama)


def test_a_granite_gguf_file_gives_transformers_outputs(tiny_models, references, compute_device, tmp_path):
    """As llama.cpp's converter writes Granite: Llama's tensors (Q and K rows reordered for its rotary layout)
    and the four multipliers as metadata."""
    from .test_gguf_file import _llama_cpp_permute
    from .test_phi3 import gguf_header, write_gguf

    model = tiny_models["granite"][1]
    c, path = model.config, tmp_path / "granite.gguf"
    writer = gguf_header(c, path, "granite")
    for key, value in (("embedding_scale", 2.0), ("residual_scale", 0.7), ("attention.scale", 0.3),
                       ("logit_scale", 3.0)):
        writer.add_float32(f"granite.{key}", value)
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{ours}.weight" for hf, ours in parts.items()})
    for name, t in model.state_dict().items():
        if name in names:  # the tied head is the embedding
            w = t.numpy()
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads if "k_proj" in name else 0
            writer.add_tensor(names[name], _llama_cpp_permute(w, heads) if heads else w)
    write_gguf(writer)
    check_against_reference(path, references["granite"], POLICIES["all-gpu"], compute_device)
