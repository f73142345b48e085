"""Gemma-3: Gemma-2's layer with q and k normalised per head by (1 + w) norms, five windowed layers to a full one,
the windowed layers turning by their own rotary base (10k, unscaled) and the full ones by the model's (1M, linearly
scaled on 4B and up); from a text checkpoint (1B) and from a multimodal one's text model (4B-27B), against
transformers' greedy output and logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.models.hf_config import config_from_dict

from .conftest import PROMPTS, VOCAB, _randomize, _word_tokenizer, hf_greedy, on_device
from .test_parity import LOGITS_ATOL, POLICIES

# three layers: windowed, full, windowed (a window of 6 hides positions in prompts of up to 10 plus 8 new tokens)
TEXT = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            intermediate_size=256, max_position_embeddings=64, sliding_window=6, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], vocab_size=VOCAB,
            pad_token_id=1, bos_token_id=2, eos_token_id=2,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
PLACEMENTS = ["all-gpu", "weights-disk", "cache-split-3-tiers", "cpu-attention-cache-split"]


def save(model, path) -> None:
    _randomize(model, 7)
    model.save_pretrained(str(path))
    _word_tokenizer(path)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory, compute_device):
    """(text checkpoint, multimodal checkpoint, transformers' ids and logits for PROMPTS): the same text weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    text = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma3_text", **TEXT), dtype=torch.float32).eval()
    text_dir = tmp_path_factory.mktemp("gemma3-text")
    save(text, text_dir)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    both = Gemma3ForConditionalGeneration(Gemma3Config(text_config=TEXT, vision_config=vision, mm_tokens_per_image=4))
    both.model.language_model.load_state_dict(text.model.state_dict())
    both_dir = tmp_path_factory.mktemp("gemma3-multimodal")
    both.eval().save_pretrained(str(both_dir))
    _word_tokenizer(both_dir)
    return text_dir, both_dir, text, hf_greedy(on_device(text, compute_device), PROMPTS, 8)


def generate(path, policy, device):
    with FlexGenLite(str(path), policy=policy, device=device) as m:
        return m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=8, stop_at_eos=False), return_logits=True)


def assert_reference(found, reference) -> None:
    (ids, logits), (want_ids, want_logits) = found, reference
    assert ids == want_ids
    for ours, theirs in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("name", PLACEMENTS)
def test_gemma3_matches_transformers(gemma3, compute_device, name):
    text_dir, _, _, reference = gemma3
    assert_reference(generate(text_dir, POLICIES[name], compute_device), reference)


def test_the_text_model_of_a_multimodal_checkpoint(gemma3, compute_device):
    """Gemma-3 4B-27B: the language model's weights under language_model, its config under text_config."""
    _, both_dir, _, reference = gemma3
    assert_reference(generate(both_dir, POLICIES["cache-split-3-tiers"], compute_device), reference)


def test_transformers_multimodal_model_agrees(gemma3):
    """The reference itself: transformers' multimodal model on text alone gives the text model's tokens."""
    from transformers import Gemma3ForConditionalGeneration

    _, both_dir, _, (want_ids, _) = gemma3
    both = Gemma3ForConditionalGeneration.from_pretrained(str(both_dir), dtype=torch.float32).eval()
    assert hf_greedy(both, PROMPTS[:3], 8)[0] == want_ids[:3]


def test_each_part_of_gemma3_matters(gemma3, compute_device):
    """The windowed layers' own rotary base, the (1 + w) q/k norms and the window each change the tokens."""
    text_dir, _, _, (want_ids, _) = gemma3
    with FlexGenLite(str(text_dir), policy=POLICIES["all-gpu"], device=compute_device) as m:
        cfg = m.config
        assert cfg.local_rope_theta == 10000.0 and cfg.qk_norm == "head" and cfg.windows == (6, 0, 6)
        for wrong in (dict(local_rope_theta=0.0), dict(windows=()), dict(norm_offset=0.0)):
            m.config = m.engine.config = dataclasses.replace(cfg, **wrong)
            m.engine.rotary = type(m.engine.rotary)(m.engine.config, m.engine.rotary.inv_freq.device)
            m.engine.free_cache()  # made again for the new config (a window's layers keep a ring of it)
            ids, _ = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=8, stop_at_eos=False), return_logits=True)
            assert ids != want_ids, wrong


def test_hub_configs_read_as_transformers_5_saves_them():
    """A Gemma-3 config as the hub has it (rope_theta, rope_scaling, rope_local_base_freq, sliding_window_pattern;
    a multimodal text_config naming only what differs from the defaults) reads as the same model."""
    from transformers import AutoConfig

    hub_text = dict(model_type="gemma3_text", hidden_size=128, num_hidden_layers=7, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, intermediate_size=256, sliding_window=6,
                    sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=10000.0,
                    rope_scaling={"rope_type": "linear", "factor": 8.0}, query_pre_attn_scalar=24, vocab_size=VOCAB)
    ours = config_from_dict(hub_text)
    fields = {k: v for k, v in hub_text.items() if k not in ("model_type", "rope_scaling")}
    saved = AutoConfig.for_model("gemma3_text", rope_scaling=hub_text["rope_scaling"], **fields).to_dict()
    assert config_from_dict(saved) == ours
    assert ours.windows == (6, 6, 0, 6, 6, 0, 6) and ours.rope_scaling["factor"] == 8.0
    multimodal = dict(model_type="gemma3", eos_token_id=[1, 106],
                      text_config=dict(hidden_size=2560, num_hidden_layers=34, intermediate_size=10240,
                                       sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0}))
    four_b = config_from_dict(multimodal)
    assert (four_b.num_heads, four_b.head_dim, four_b.vocab_size, four_b.eos_token_id) == (8, 256, 262_208, [1, 106])
    assert four_b.windows.count(0) == 5 and four_b.max_positions == 131_072


def test_a_gemma3_gguf_file_gives_transformers_outputs(tmp_path, compute_device):
    """From a GGUF file as llama.cpp's converter writes it: gguf's tensor names, each norm's 1 + w (q and k norms
    too), the full layers' base and linear factor as metadata; the window's pattern (five of six), the windowed
    layers' base (10k) and the attention scale (head_dim below 27B) are llama.cpp's fixed rules."""
    from types import SimpleNamespace

    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    from .test_phi3 import gguf_header, write_gguf

    fields = {k: v for k, v in TEXT.items() if k != "layer_types"} | dict(num_hidden_layers=7, query_pre_attn_scalar=32)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma3_text", **fields), dtype=torch.float32).eval()
    _randomize(model, 8)
    c = model.config
    assert c.layer_types.count("full_attention") == 1  # the sixth
    header = SimpleNamespace(**{k: getattr(c, k) for k in ("num_hidden_layers", "max_position_embeddings",
                                                           "hidden_size", "intermediate_size", "num_attention_heads",
                                                           "num_key_value_heads", "rms_norm_eps", "vocab_size")},
                             rope_parameters={"rope_theta": 1e6})
    path = tmp_path / "gemma3.gguf"
    writer = gguf_header(header, path, "gemma3", c.head_dim)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_sliding_window(c.sliding_window)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(4.0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name != "lm_head.weight":
            w = t.numpy() + 1 if name.endswith("norm.weight") else t.numpy()
            writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), w)
    write_gguf(writer)
    reference = hf_greedy(on_device(model, compute_device), PROMPTS, 8)
    assert_reference(generate(path, POLICIES["weights-split-3-tiers"], compute_device), reference)
