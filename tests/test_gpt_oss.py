"""gpt-oss: a sink logit per head in every softmax, biases on q, k, v and o, windows on every other layer, experts with
biases read from transposed stacks (gate and up interleaved), their clamped GLU, routing by a softmax of the top
logits; and checkpoints whose experts are MXFP4 blocks, as released. transformers' greedy tokens and logits are the
reference, its own MXFP4 conversion the packed checkpoint's."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.models.config import ModelError
from flexgen_lite.models.hf_config import config_from_dict
from flexgen_lite.models.mxfp4 import dequantize_mxfp4

from .conftest import FAMILY_CONFIGS, PROMPTS, hf_greedy, make_checkpoint, on_device
from .test_parity import LOGITS_ATOL, POLICIES, link_only_on_cpu

GREEDY = SamplingConfig(max_new_tokens=8, stop_at_eos=False)
PLACEMENTS = ["all-gpu", "weights-disk", "cache-split-3-tiers", "no-overlap-offloaded", "cpu-attention-cache-split"]


def with_sinks(model, path, seed: int) -> None:
    """Sinks large enough to take a share of each softmax (random init makes them ~0.1), saved."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape, generator=gen) * 2)
    model.save_pretrained(str(path))


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory, compute_device):
    """(checkpoint, transformers model, its ids and logits for PROMPTS, 8 new tokens)."""
    path = tmp_path_factory.mktemp("gpt-oss")
    model = make_checkpoint(path, "gpt-oss", seed=41)
    with_sinks(model, path, 41)
    return path, model, hf_greedy(on_device(model, compute_device), PROMPTS, 8)


def generate(path, policy, device, change=None):
    with FlexGenLite(str(path), policy=policy, device=device) as m:
        if change:
            m.config = m.engine.config = dataclasses.replace(m.config, **change)
        return m.generate_ids(PROMPTS, GREEDY, return_logits=True)


def check(ours, reference) -> None:
    ids, logits = ours
    assert ids == reference[0]
    for a, b in zip(logits, reference[1], strict=True):
        torch.testing.assert_close(a, b, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("name", PLACEMENTS)
def test_matches_transformers(gpt_oss, compute_device, name):
    path, _, reference = gpt_oss
    check(generate(path, POLICIES[name], compute_device), reference)


@link_only_on_cpu
@pytest.mark.parametrize("name", ["weights-split-3-tiers", "cache-cpu", "cpu-attention-cache-split"])
def test_matches_transformers_across_a_link(gpt_oss, name):
    path, _, reference = gpt_oss
    check(generate(path, POLICIES[name], "cpu+link"), reference)


@link_only_on_cpu
def test_cpu_attention_on_the_worker_takes_the_sinks(gpt_oss, monkeypatch):
    """Beside a (simulated) GPU, the CPU's parts are attended on the worker thread by the C decode kernel with the
    layer's sinks on the host: transformers' tokens and logits. (On CUDA the sinks are copied to the host once per
    layer, `_host_sinks`: the parity run's CPU-attention placements go through it.)"""
    from flexgen_lite.engine.decode_attention import DecodeAttention

    calls, real = [], DecodeAttention._attend_on_worker
    monkeypatch.setattr(DecodeAttention, "_attend_on_worker", lambda self, *a: calls.append(a[-1]) or real(self, *a))
    path, _, reference = gpt_oss
    with FlexGenLite(str(path), policy=POLICIES["cpu-attention-cache-cpu"], device="cpu+link") as m:
        check(m.generate_ids(PROMPTS, GREEDY, return_logits=True), reference)
        kernels = set("+".join(m.engine.times.attention[1:]).split("+"))
    assert calls and all(s is not None and s.device.type == "cpu" for s in calls)
    assert "cpu-native" in kernels and "sinks" not in kernels  # the C kernel, never the whole scores


def test_prefills_through_the_c_kernel_as_transformers(gpt_oss, monkeypatch):
    """The C prefill kernel, which takes each head's sink logit, gives transformers' tokens and logits (fp32),
    on every layer: windowed and full."""
    from flexgen_lite.kernels import attention, native, prefill_attention

    if not (native.library() and native.library().prefill_available(native.OUT_KIND[torch.float32])):
        pytest.skip("this CPU lacks AVX-512: the kernel declines (test_prefill_attention tests that)")
    calls = []
    real = prefill_attention.prefill_attention
    monkeypatch.setattr(attention, "prefill_attention", lambda *a: calls.append(a[4] is not None) or real(*a))
    monkeypatch.setattr(attention, "prefill_wins", lambda dtype: True)
    path, _, reference = gpt_oss
    check(generate(path, POLICIES["all-gpu"], torch.device("cpu")), reference)
    assert calls and all(calls)


def test_each_part_matters(gpt_oss, compute_device):
    """Without the sinks, the GLU's clamp or the window the tokens differ: the tests above would see each dropped."""
    path, _, (want_ids, _) = gpt_oss
    with FlexGenLite(str(path), policy=POLICIES["all-gpu"], device=compute_device) as m:
        cfg = m.config
        assert cfg.attn_sinks and cfg.swiglu_limit == 2.0 and cfg.windows == (5, 0) and cfg.moe == "gpt_oss"
        for wrong in (dict(attn_sinks=False), dict(swiglu_limit=0.0), dict(windows=())):
            m.config = m.engine.config = dataclasses.replace(cfg, **wrong)
            m.engine.free_cache()  # made again for the new config (the window's layer keeps a ring of it)
            ids, _ = m.generate_ids(PROMPTS, GREEDY, return_logits=True)
            assert ids != want_ids, wrong


def pack_mxfp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks and scales (..., groups, 16), (..., groups) for `values` (..., groups x 32)'s shape."""
    gen = torch.Generator().manual_seed(values.numel())
    *lead, width = values.shape
    blocks = torch.randint(0, 256, (*lead, width // 32, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(122, 129, (*lead, width // 32), generator=gen, dtype=torch.uint8)
    return blocks, scales


def test_mxfp4_is_transformers_own_conversion():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = pack_mxfp4(torch.empty(3, 10, 64))
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # (experts, in, out)
    assert torch.equal(dequantize_mxfp4(blocks, scales).transpose(1, 2), theirs)
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(blocks, scales[..., :1])


def test_a_checkpoint_with_mxfp4_experts(tmp_path, compute_device):
    """Experts stored as released (gate_up_proj_blocks/_scales, down_proj_blocks/_scales; biases as they are):
    transformers' model with its own conversion of the same blocks is the reference."""
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model = make_checkpoint(tmp_path, "gpt-oss", seed=43)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for stack in ("gate_up_proj", "down_proj"):
                key = f"model.layers.{i}.mlp.experts.{stack}"
                blocks, scales = pack_mxfp4(state.pop(key).transpose(1, 2))  # stored (experts, out, in)
                state[key + "_blocks"], state[key + "_scales"] = blocks, scales
                getattr(layer.mlp.experts, stack).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    for old in tmp_path.glob("*.safetensors"):
        old.unlink()
    save_file(state, str(tmp_path / "model.safetensors"))
    want = hf_greedy(on_device(model, compute_device), PROMPTS, 8)
    check(generate(tmp_path, POLICIES["cache-split-3-tiers"], compute_device), want)


def test_hub_configs_read_as_transformers_saves_them():
    """gpt-oss-20b's config.json as published (rope_scaling, rope_theta, quantization_config; no layer_types) reads
    as the same model as transformers' saved config of it; fields left out take transformers' defaults."""
    from transformers import AutoConfig

    hub = dict(model_type="gpt_oss", num_hidden_layers=24, num_local_experts=32, vocab_size=201088, hidden_size=2880,
               intermediate_size=2880, head_dim=64, num_attention_heads=64, num_key_value_heads=8, sliding_window=128,
               rope_theta=150000, rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                "beta_slow": 1.0, "truncate": False,
                                                "original_max_position_embeddings": 4096},
               max_position_embeddings=131072, experts_per_token=4, num_experts_per_tok=4, swiglu_limit=7.0,
               initial_context_length=4096, quantization_config={"quant_method": "mxfp4"}, eos_token_id=200002)
    ours = config_from_dict(hub)
    saved = json.loads(AutoConfig.for_model(**hub).to_json_string())
    assert config_from_dict(saved) == ours
    assert ours.windows == (128, 0) * 12 and ours.experts_per_token == 4 and ours.num_experts == 32
    assert ours.rope_scaling["factor"] == 32.0 and not ours.rope_scaling["truncate"] and ours.rope_theta == 150000
    bare = config_from_dict(dict(model_type="gpt_oss"))
    assert (bare.num_layers, bare.num_experts, bare.swiglu_alpha) == (36, 128, 1.702)
    with pytest.raises(ModelError, match="num_experts_per_tok 5 of 4"):
        config_from_dict(dict(FAMILY_CONFIGS["gpt-oss"], vocab_size=64, num_experts_per_tok=5))
