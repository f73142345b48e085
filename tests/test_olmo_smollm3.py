"""OLMo-2 and OLMo-3 (a norm after attention and after the MLP, none before; q and k normalised across all heads;
OLMo-3's windows on three layers of four, its full layers' rotary scaled by YaRN and the windowed ones' not) and
SmolLM3 (every fourth layer without rotary embedding): transformers' greedy tokens and logits under placements
through each attention path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexgen_lite import FlexGenLite, SamplingConfig

from .conftest import PROMPTS, hf_greedy, make_checkpoint, on_device
from .test_parity import LOGITS_ATOL, POLICIES

SHAPE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
             max_position_embeddings=64, tie_word_embeddings=False)
MODELS = {
    "olmo2": dict(model_type="olmo2", num_hidden_layers=2, **SHAPE),
    # layers 0-2 windowed (5 positions), 3 full; YaRN on the full one only
    "olmo3": dict(model_type="olmo3", num_hidden_layers=4, sliding_window=5, **SHAPE,
                  rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                      "original_max_position_embeddings": 16},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "smollm3": dict(model_type="smollm3", num_hidden_layers=4, **SHAPE),  # layer 3 without rotary
}
PLACEMENTS = ["all-gpu", "weights-split-3-tiers", "cache-split-3-tiers", "cpu-attention-cache-split"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, compute_device):
    """{name: (checkpoint, transformers' ids and logits for PROMPTS, 8 new tokens)}."""
    out = {}
    for name, fields in MODELS.items():
        path = tmp_path_factory.mktemp(name)
        model = make_checkpoint(path, "llama", seed=21, **fields)
        out[name] = (path, hf_greedy(on_device(model, compute_device), PROMPTS, 8))
    return out


def generate(path, policy, device, config_change=None):
    with FlexGenLite(str(path), policy=policy, device=device) as m:
        if config_change:
            m.config = m.engine.config = dataclasses.replace(m.config, **config_change)
            m.engine.rotary = type(m.engine.rotary)(m.config, m.engine.rotary.inv_freq.device)
        return m.config, m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=8, stop_at_eos=False),
                                        return_logits=True)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_matches_transformers(models, compute_device, name, placement):
    path, (want_ids, want_logits) = models[name]
    config, (ids, logits) = generate(path, POLICIES[placement], compute_device)
    assert ids == want_ids
    for ours, theirs in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_each_models_own_parts_are_read_and_matter(models, compute_device):
    """The configs read as said above; without each part (the windows, the windowed layers' unscaled rotary, the
    NoPE layers) the tokens differ, so the tests above see it."""
    olmo2, olmo3, smol = (generate(models[n][0], POLICIES["all-gpu"], compute_device)[0] for n in MODELS)
    assert not olmo2.input_norms and olmo2.post_norms and olmo2.qk_norm == "full"
    assert olmo3.windows == (5, 5, 5, 0) and olmo3.rope_scaling["rope_type"] == "yarn" and olmo3.local_rope_theta
    assert smol.unrotated_layers == (3,) and not smol.windows
    for name, change in (("olmo3", dict(windows=())), ("olmo3", dict(local_rope_theta=0.0)),
                         ("smollm3", dict(unrotated_layers=()))):
        path, (want_ids, _) = models[name]
        assert generate(path, POLICIES["all-gpu"], compute_device, change)[1][0] != want_ids, name


@pytest.mark.parametrize("name", ["olmo2", "smollm3"])
def test_a_gguf_file_gives_transformers_outputs(models, compute_device, tmp_path, name):
    """From a GGUF file as llama.cpp's converter writes it: gguf's tensor names (OLMo-2's norms after each block),
    SmolLM3's q and k rows permuted as Llama's, its NoPE layers every fourth by llama.cpp's fixed rule."""
    import gguf
    from transformers import AutoModelForCausalLM

    from .test_gguf_file import _llama_cpp_permute
    from .test_phi3 import gguf_header, write_gguf

    path, reference = models[name]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    c = model.config
    file = tmp_path / f"{name}.gguf"
    writer = gguf_header(c, file, name)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[name.upper()], c.num_hidden_layers)
    for hf, t in model.state_dict().items():
        w = t.numpy()
        if name == "smollm3" and hf.endswith(("q_proj.weight", "k_proj.weight")):
            w = _llama_cpp_permute(w, c.num_attention_heads if "q_proj" in hf else c.num_key_value_heads)
        writer.add_tensor(names.get_name(hf, try_suffixes=(".weight",)), w)
    write_gguf(writer)
    _, (ids, logits) = generate(file, POLICIES["weights-split-3-tiers"], compute_device)
    assert ids == reference[0]
    for ours, theirs in zip(logits, reference[1], strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)
