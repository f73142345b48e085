"""Phi-3 (model_type phi3): a Llama-family layer whose checkpoint stores q, k, v as one matrix and gate, up as
another (each of ours read as a range of its rows), and Phi-3.5's LongRoPE within its original context:
transformers' tokens and logits under placements that read the fused matrices differently."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.models.config import ModelError
from flexgen_lite.models.hf_config import config_from_dict

from .conftest import FAMILY_CONFIGS, PROMPTS, hf_greedy, make_checkpoint
from .test_parity import POLICIES, check_against_reference

NAMES = ["all-gpu", "weights-split-3-tiers", "cache-split-3-tiers", "cpu-attention-cache-split"]


@pytest.mark.parametrize("family", ["phi3", "phi3-longrope"])
@pytest.mark.parametrize("name", NAMES)
def test_phi3_matches_transformers(tiny_models, references, compute_device, family, name):
    check_against_reference(tiny_models[family][0], references[family], POLICIES[name], compute_device)


def test_the_fused_matrices_are_what_transformers_splits(tiny_models):
    """Our q, k, v and gate, up are the rows transformers' Phi3Attention and Phi3MLP split them into."""
    path, model = tiny_models["phi3"]
    with FlexGenLite(str(path), policy=POLICIES["all-gpu"]) as m:
        attention, mlp = (m.engine.weights[i] for i in (1, 2))
        qkv = model.model.layers[0].self_attn.qkv_proj.weight
        gate_up = model.model.layers[0].mlp.gate_up_proj.weight
        joined = torch.cat([attention[n].data.cpu() for n in ("q.weight", "k.weight", "v.weight")])
        gate, up = (mlp[f"{n}.weight"].data.cpu().float() for n in ("gate", "up"))
        assert torch.equal(joined.float(), qkv) and torch.equal(gate, gate_up[:256]) and torch.equal(up, gate_up[256:])


def test_longrope_context_is_the_original_one(tiny_models):
    """Past its original context Phi-3.5 switches to its long factors, which are not implemented: a prompt that
    would reach past it is refused by name, not answered with the short factors' wrong outputs."""
    config = config_from_dict(FAMILY_CONFIGS["phi3-longrope"] | {"vocab_size": 512})
    assert config.max_positions == 32
    with FlexGenLite(str(tiny_models["phi3-longrope"][0]), policy=POLICIES["all-gpu"]) as m, \
            pytest.raises(ValueError, match="32"):
        m.generate_ids([list(range(3, 30))], SamplingConfig(max_new_tokens=8))


def test_a_fused_matrix_of_another_shape_is_refused(tmp_path):
    make_checkpoint(tmp_path, "phi3", seed=3)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_key_value_heads": 1}))  # k, v now too narrow
    with pytest.raises(ModelError, match=r"qkv_proj.weight has shape \(256, 128\), the config implies \(192, 128\) "
                                         r"\(rows 0:128 of it for q.weight\)"):
        FlexGenLite(str(tmp_path), policy=POLICIES["all-gpu"]).close()


@pytest.fixture(scope="module")
def partial_rotary(tmp_path_factory):
    """Phi-4-mini's shape: rotary over part of each head (half here), the rest passing through."""
    path = tmp_path_factory.mktemp("phi3-partial")
    model = make_checkpoint(path, "phi3", seed=5, partial_rotary_factor=0.5)
    return path, model, hf_greedy(model, PROMPTS, 8)


@pytest.mark.parametrize("name", ["all-gpu", "cpu-attention-cache-split"])
def test_partial_rotary_matches_transformers(partial_rotary, compute_device, name):
    path, _, reference = partial_rotary
    assert config_from_dict(json.loads((path / "config.json").read_text())).rotary_dim == 16
    check_against_reference(path, reference, POLICIES[name], compute_device)


def test_a_partial_rotary_gguf_file(partial_rotary, compute_device, tmp_path):
    path, model, reference = partial_rotary
    _write_phi3_gguf(model, tmp_path / "partial.gguf", rotary_dims=16)
    check_against_reference(tmp_path / "partial.gguf", reference, POLICIES["all-gpu"], compute_device)


def test_a_partial_rotary_of_odd_dims_is_refused():
    fields = FAMILY_CONFIGS["phi3"] | {"vocab_size": 512, "partial_rotary_factor": 0.3}  # 9.6 of 32 dims
    with pytest.raises(ModelError, match="partial_rotary_factor 0.3 of head_dim 32"):
        config_from_dict(fields)


def _as_llama(model, path) -> None:
    """The same weights as a Llama checkpoint: q, k, v and gate, up stored apart."""
    from safetensors.torch import save_file

    c, state = model.config, {}
    head_dim = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    for name, t in model.state_dict().items():
        if "qkv_proj" in name:
            for part, rows in zip("qkv", t.split([q, kv, kv]), strict=True):
                state[name.replace("qkv_proj", f"{part}_proj")] = rows.contiguous()
        elif "gate_up_proj" in name:
            for part, rows in zip(("gate", "up"), t.chunk(2), strict=True):
                state[name.replace("gate_up_proj", f"{part}_proj")] = rows.contiguous()
        else:
            state[name] = t.contiguous()
    path.mkdir()
    save_file(state, str(path / "model.safetensors"))
    fields = {k: getattr(c, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "intermediate_size", "vocab_size", "rms_norm_eps")}
    (path / "config.json").write_text(json.dumps(fields | {"model_type": "llama", "max_position_embeddings": 64,
                                                           "tie_word_embeddings": False, "rope_theta": 10000.0}))


@pytest.mark.parametrize("switches", [dict(compress_weight=True), dict(compress_weight=True, compress_cache=True)],
                         ids=str)
def test_under_4_bit_weights_the_fused_rows_are_a_llamas(tiny_models, compute_device, tmp_path, switches):
    """4-bit weights are lossy: the reference is the same weights stored apart, as a Llama checkpoint (each row's
    groups are the same wherever the row is stored): the same logits bit for bit."""
    path, model = tiny_models["phi3"]
    _as_llama(model, tmp_path / "llama")
    policy = dataclasses.replace(POLICIES["weights-split-3-tiers"], **switches)
    runs = []
    for checkpoint in (path, tmp_path / "llama"):
        with FlexGenLite(str(checkpoint), policy=policy, device=compute_device) as m:
            runs.append(m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=6, stop_at_eos=False),
                                       return_logits=True))
    (ids, logits), (want_ids, want_logits) = runs
    assert ids == want_ids and all(torch.equal(a, b) for a, b in zip(logits, want_logits, strict=True))


def gguf_header(c, path, arch: str, rotary_dims: int | None = None):
    """A GGUFWriter of `arch` at `path` with the metadata of the transformers config `c` every llama-family file
    has (tensors and the architecture's own keys to be added; then write_gguf)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(rotary_dims or c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    return writer


def write_gguf(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_phi3_gguf(model, path, qtype=None, rotary_dims: int | None = None) -> None:
    """The tiny transformers Phi-3 as llama.cpp's converter writes it: fused attn_qkv and ffn_up in HF's row order,
    LongRoPE's factors as tensors, its original context and sliding window as metadata."""
    import gguf
    import numpy as np

    c = model.config
    writer = gguf_header(c, path, "phi3", rotary_dims)
    writer.add_sliding_window(c.sliding_window)
    rope = c.rope_parameters or {}
    if rope.get("rope_type") == "longrope":
        writer.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        for kind in ("short", "long"):
            writer.add_tensor(f"rope_factors_{kind}.weight", np.array(rope[f"{kind}_factor"], dtype=np.float32))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{ours}.weight" for hf, ours in parts.items()})
    for name, t in model.state_dict().items():
        w = t.numpy()
        if qtype is not None and w.ndim == 2:
            writer.add_tensor(names[name], gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(names[name], w)
    write_gguf(writer)


@pytest.mark.parametrize("family", ["phi3", "phi3-longrope"])
def test_a_phi3_gguf_file_gives_transformers_outputs(tiny_models, references, compute_device, tmp_path, family):
    path = tmp_path / f"{family}.gguf"
    _write_phi3_gguf(tiny_models[family][1], path)
    check_against_reference(path, references[family], POLICIES["weights-split-3-tiers"], compute_device)


def test_a_q4_0_phi3_file_keeps_its_groups_for_each_part_of_a_fused_matrix(tiny_models, tmp_path):
    """--compress-weight keeps a Q4_0 file's own 4-bit groups (no second rounding): q, k, v each get their rows'
    groups of the fused matrix, which dequantize to the file's values."""
    import gguf

    from flexgen_lite.engine.weight_sources import STORED_GROUPS, GGUFSource
    from flexgen_lite.kernels.compression import dequantize
    from flexgen_lite.models.gguf_file import read_gguf_config
    from flexgen_lite.models.specs import layer_specs

    path = tmp_path / "phi3-q4_0.gguf"
    _write_phi3_gguf(tiny_models["phi3"][1], path, gguf.GGMLQuantizationType.Q4_0)
    source, config = GGUFSource(str(path)), config_from_dict(read_gguf_config(path))
    attention = layer_specs(config)[1]
    parts = [w for w in attention.weights if w.name in ("q.weight", "k.weight", "v.weight")]
    values = [source.read(w, 0, w.shape[0]) for w in parts]
    for w, want in zip(parts, values, strict=True):
        groups = source.groups(w, STORED_GROUPS)
        assert groups is not None and groups.shape == w.shape
        assert torch.equal(dequantize(groups, torch.float32), want)
    assert sum(v.shape[0] for v in values) == 256
