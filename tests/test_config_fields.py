"""A checkpoint's config read as transformers reads it: each case edits one field of a tiny checkpoint's files,
and transformers, loading the same directory, is the reference (greedy tokens and fp32 logits); fields that
cannot be honoured, and damaged files, are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flexgen_lite import FlexGenLite, ModelError, Policy, SamplingConfig
from flexgen_lite.models.hf_config import FAMILIES, config_from_dict, load_config

from .conftest import PROMPTS, make_checkpoint, reference_attention

NEW = 8


def edited(path: Path, family: str, edit, **overrides) -> Path:
    make_checkpoint(path, family, seed=3, **overrides)
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    return path


def transformers_greedy(path: Path, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers' model of the directory as it reads it (generation_config.json included): greedy ids, stopping
    where its generation config says, and the logits that chose them."""
    from transformers import AutoModelForCausalLM

    kind = json.loads((path / "config.json").read_text())["model_type"]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **reference_attention(kind)).eval()
    ids, logits = [], []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, pad_token_id=1)
            ids.append(out[0, len(p):].tolist())
            logits.append(model(out).logits[0, len(p) - 1:out.shape[1] - 1])
    return ids, logits


def assert_as_transformers(path: Path) -> None:
    expected, expected_logits = transformers_greedy(path, PROMPTS)
    with FlexGenLite(str(path), policy=Policy(gpu_batch_size=4, dtype="float32"), device="cpu") as m:
        ids, logits = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=NEW), return_logits=True)
    assert ids == expected
    for found, want in zip(logits, expected_logits, strict=True):
        torch.testing.assert_close(found, want, atol=2e-4, rtol=1e-4)


def without_theta(config: dict) -> None:
    config.pop("rope_theta", None)
    (config.get("rope_parameters") or {}).pop("rope_theta", None)


@pytest.mark.parametrize("family,edit,overrides", [
    # the original Gemma releases' legacy "gelu", which transformers rewrites to the tanh GELU
    ("gemma", lambda c: c.update(hidden_act="gelu"), {}),
    # transformers' Llama rotates whole heads whatever partial_rotary_factor says (Phi-3 alone honours it)
    ("llama", lambda c: c.update(partial_rotary_factor=0.5), {}),
    # Gemma-3 keeps attn_logit_softcapping in its config but never caps its scores
    ("gemma", lambda c: c.update(attn_logit_softcapping=0.5), dict(model_type="gemma3_text", sliding_window=4)),
    # defaults where a config omits the field: Granite's attention multiplier 1.0, Mixtral's rope base 1e6
    ("granite", lambda c: c.pop("attention_multiplier"), {}),
    ("mixtral", without_theta, {}),
    # Qwen2-MoE's q, k, v biases are a config field (qkv_bias), not the family's
    ("qwen2-moe", lambda c: None, dict(qkv_bias=False)),
    # tied in the config, but the checkpoint stores a head of its own: transformers uses the stored head
    ("llama", lambda c: c.update(tie_word_embeddings=True), {}),
    # fields left out: Phi-3's norms at transformers' 1e-5 (not 1e-6), Qwen3's heads 128 wide whatever the width
    ("phi3", lambda c: c.pop("rms_norm_eps"), {}),
    ("qwen3", lambda c: c.pop("head_dim"), dict(head_dim=128)),
], ids=["gemma-legacy-gelu", "llama-partial-rotary-ignored", "gemma3-attention-cap-unused",
        "granite-default-multiplier", "mixtral-default-rope-base", "qwen2-moe-without-biases", "stored-head-untied",
                           "phi3-default-norm-eps", "qwen3-default-head-dim"])
def test_read_as_transformers_reads_it(tmp_path, family, edit, overrides):
    assert_as_transformers(edited(tmp_path / family, family, edit, **overrides))


def test_generation_config_eos_ids_stop_generation(tmp_path):
    """Instruct checkpoints name their end-of-turn ids in generation_config.json (Llama-3-Instruct's first
    release, Gemma-2-it): generation stops at them, as transformers' generate does."""
    path = edited(tmp_path / "llama", "llama", lambda c: None)
    free = transformers_greedy(path, PROMPTS[:1])[0][0]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, free[2]], "pad_token_id": 1}))
    assert transformers_greedy(path, PROMPTS[:1])[0][0] == free[:3]  # the reference stops at the third token
    assert load_config(path).eos_token_id == [2, free[2]]
    assert_as_transformers(path)


@pytest.mark.parametrize("raw,message", [
    ([1, 2], "is a JSON list, not an object"),
    (dict(model_type="llama", hidden_size="64"), "sets hidden_size to '64', not a positive whole number"),
    (dict(model_type="llama", num_hidden_layers=-1), "sets num_hidden_layers to -1"),
    (dict(model_type="llama", rms_norm_eps=None), "sets rms_norm_eps to None, not a positive number"),
    (dict(model_type="opt", layer_norm_elementwise_affine=False), "layer_norm_elementwise_affine false"),
    (dict(model_type="gemma3_text", rope_parameters=dict(
        full_attention=dict(rope_type="default", rope_theta=1e6),
        sliding_attention=dict(rope_type="linear", factor=4.0, rope_theta=1e4))),
     "'linear' of the windowed layers .* is not supported"),
])
def test_damaged_or_unsupported_configs_are_refused_by_name(raw, message):
    with pytest.raises(ModelError, match=message):
        config_from_dict(raw, "m")


def test_damaged_index_and_tokenizer_are_refused_by_name(tmp_path):
    path = edited(tmp_path / "llama", "llama", lambda c: None)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))
    with pytest.raises(ModelError, match="is not a valid checkpoint index"):
        FlexGenLite(str(path), policy=Policy(dtype="float32"))
    (path / "model.safetensors.index.json").unlink()
    (path / "tokenizer.json").write_text("{junk")
    with pytest.raises(ModelError, match="its tokenizer cannot be loaded"):
        FlexGenLite(str(path), policy=Policy(dtype="float32"))
    (path / "tokenizer.json").unlink()  # helper-35: transformers' own message ran over five lines, cut in a word
    with pytest.raises(ModelError, match="its tokenizer cannot be loaded") as e:
        FlexGenLite(str(path), policy=Policy(dtype="float32"))
    assert "\n" not in str(e.value) and str(e.value).endswith("(tokenizer.json, tokenizer_config.json)")


LEFT_OUT = ("rms_norm_eps", "head_dim", "sliding_window", "max_position_embeddings", "max_window_layers")


@pytest.mark.parametrize("windowed", [False, True], ids=["", "use-sliding-window"])
@pytest.mark.parametrize("model_type", sorted(set(FAMILIES) - {"gemma3"}))
def test_fields_left_out_take_transformers_defaults(model_type, windowed):
    """A config.json without a field reads as transformers' config class reads it: its family's default, not one
    of ours (helper-38: Phi-3's and OLMo-2's norms took 1e-6 where transformers takes 1e-5, logits 2.4e-3 apart; a
    Qwen3 without head_dim, 128 in transformers, was refused for its weights' shapes; Gemma-2's and OLMo-3's
    default windows of 4096 were none). Each family's full config from transformers, the fields taken out."""
    from transformers import AutoConfig

    small = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=34, num_attention_heads=4,
                 num_key_value_heads=2, use_sliding_window=windowed)
    if model_type == "opt":
        small = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
    reference = AutoConfig.for_model(model_type, **small)
    fields = {k: v for k, v in reference.to_dict().items() if k not in LEFT_OUT + ("layer_types",)}
    fields.pop("rope_scaling", None) if fields.get("rope_scaling") is None else None
    ours = config_from_dict(fields)
    assert ours.max_positions == reference.max_position_embeddings
    if model_type != "opt":
        assert ours.norm_eps == reference.rms_norm_eps
        assert ours.head_dim == (getattr(reference, "head_dim", None) or 64 // 4)
    window, types = getattr(reference, "sliding_window", None), getattr(reference, "layer_types", None)
    if not window:
        assert ours.windows == ()
    else:  # by layer type where the config has them, else every layer (Mistral, Qwen3-MoE)
        windows = tuple(window if t == "sliding_attention" else 0 for t in types or ["sliding_attention"] * 34)
        assert (ours.windows or (0,) * 34) == windows
