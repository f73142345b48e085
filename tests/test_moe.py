"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): each token's hidden state through its top experts'
gated MLPs. transformers' tokens and logits under placements through each attention path; the router kept dense
under compression; the cost model counting every expert's bytes and the top experts' work."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.cli.breakdown import step_flops
from flexgen_lite.engine import decode_fused
from flexgen_lite.engine.decode_graph import EVERY_EXPERT_ROWS, every_expert_wins
from flexgen_lite.models import layers as L
from flexgen_lite.models.config import ModelError
from flexgen_lite.models.hf_config import config_from_dict
from flexgen_lite.models.presets import preset_config
from flexgen_lite.models.specs import layer_specs
from flexgen_lite.planning.cost_model import _compute, predict
from flexgen_lite.planning.layout import Setup, Workload
from flexgen_lite.planning.products_cost import graph_decode

from .conftest import FAMILY_CONFIGS, PROMPTS, synthetic_profile
from .test_link_paths import check_gpu_memory_plan
from .test_parity import POLICIES, check_against_reference

FAMILIES = ["mixtral", "qwen2-moe", "qwen3-moe"]
NAMES = ["all-gpu", "weights-split-3-tiers", "cache-split-3-tiers", "cpu-attention-cache-split", "one-row-batches"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", NAMES)
def test_moe_matches_transformers(tiny_models, references, compute_device, family, name):
    check_against_reference(tiny_models[family][0], references[family], POLICIES[name], compute_device)


@pytest.mark.parametrize("family", ["olmoe", "granitemoe"])
@pytest.mark.parametrize("name", ["all-gpu", "weights-split-3-tiers", "cpu-attention-cache-split"])
def test_olmoe_and_granitemoe_match_transformers(tiny_models, references, compute_device, family, name):
    """OLMoE: q and k normalised across all heads, then q, k, v clipped; GraniteMoE: a softmax of the top logits,
    each expert's gate, up and down rows of the checkpoint's stacks (read as one matrix of all their rows)."""
    check_against_reference(tiny_models[family][0], references[family], POLICIES[name], compute_device)


def test_tokens_spread_over_the_experts_and_dense_layers_stay_dense(tiny_models, monkeypatch):
    """Every expert of a layer gets rows (the routing is exercised, not one expert for all), and Qwen2-MoE's
    mlp_only_layers run their dense MLP; the fused CPU step is off (it computes a dense MLP)."""
    used: dict[str, int] = {}
    plain = L.feed_forward

    def counted(w, x, config, prefix=""):
        used[prefix] = used.get(prefix, 0) + x.reshape(-1, x.shape[-1]).shape[0]
        return plain(w, x, config, prefix)

    monkeypatch.setattr(L, "feed_forward", counted)
    with FlexGenLite(str(tiny_models["qwen2-moe"][0]), policy=POLICIES["all-gpu"], device="cpu") as m:
        m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=4, stop_at_eos=False))
        config = m.config
    assert config.dense_layers == (1,) and config.shared_expert_size == 96
    assert {f"experts.{e}." for e in range(6)} <= set(used) and "shared." in used and "" in used
    rows = used[""]  # layer 1's dense MLP: every row the engine computes (the prompts, padded, and 3 steps)
    assert rows >= sum(len(p) for p in PROMPTS) + 3 * len(PROMPTS)
    assert used["shared."] == rows  # layer 0's shared expert, every row
    assert sum(n for k, n in used.items() if k.startswith("experts.")) == 2 * rows  # each row's top 2
    assert not decode_fused.config_fits(config)


def test_the_router_stays_dense_under_compression(tiny_models):
    """4-bit weights round the experts, never the router (a rounded one sends tokens elsewhere), and the memory
    plan across a link counts it so."""
    policy = Policy(gpu_batch_size=4, compress_weight=True, weight_gpu_percent=30, weight_cpu_percent=40,
                    dtype="float32")
    with FlexGenLite(str(tiny_models["mixtral"][0]), policy=policy, device="cpu") as m:
        layer = m.engine.weights[2 * 0 + 2]  # embed, attention 0, mlp 0
        ids = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=3, stop_at_eos=False))
    assert layer["router.weight"].compression is None
    assert layer["experts.0.gate.weight"].compression is not None
    assert len(ids) == len(PROMPTS)
    check_gpu_memory_plan(tiny_models["mixtral"][0], policy)


def test_the_cost_model_moves_every_expert_and_computes_the_top_ones():
    """Mixtral-8x7B's step FLOPs are a dense model's with the MLP top-k experts wide (plus the router's); its
    weights are all eight experts' bytes, and with them in host RAM a decode step brings them all across the link."""
    mixtral = preset_config("mixtral-8x7b")
    dense = config_from_dict({"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32,
                              "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 2 * 14336,
                              "vocab_size": 32000, "max_position_embeddings": 32768, "rope_theta": 1e6})
    router = 2 * 64 * 4096 * 8 * 32  # 64 rows, one token each, every layer
    assert step_flops(mixtral, 64, 1, 512)["flops"] == step_flops(dense, 64, 1, 512)["flops"] + router
    expert_bytes = 32 * 8 * 3 * 4096 * 14336 * 2
    assert abs(mixtral.num_params() * 2 - expert_bytes - 1.6e9 * 2) < 0.1e9 * 2  # attention, embeddings: ~1.6 B
    policy = Policy(gpu_batch_size=32, num_gpu_batches=2, weight_gpu_percent=0, weight_cpu_percent=100,
                    dtype="float16")
    hw = synthetic_profile(cuda=True)
    link = predict(mixtral, Workload(512, 32), policy, hw).decode_by["link"]  # all decoder weights, every step
    assert expert_bytes / hw.h2d_pinned < link <= mixtral.num_params() * 2 / hw.h2d_pinned


def test_a_graph_step_runs_every_expert_where_that_wins():
    """A CUDA graph's decode step cannot depend on the routing, so there each expert runs over every row. The engine
    and the search take it where the profile says those products cost no more than each expert over its share plus
    the eager schedule's overhead: at rows still bound by reading the weights, not at many; without a profile, up
    to EVERY_EXPERT_ROWS rows x experts / top-k. The search then counts every expert's products at every row."""
    gpu = synthetic_profile(cuda=True)
    read_bound = [(1, 1e12, 1e-5), (128, 128e12, 1e-5), (1024, 200e12, 1e-5)]  # as fast at 128 rows as at 1
    hw = dataclasses.replace(gpu, matmul={"float16": read_bound, "float32": read_bound}, device_copy=1e15)
    mixtral, dense = preset_config("mixtral-8x7b"), preset_config("llama-2-7b")
    assert every_expert_wins(hw, mixtral, "float16", 136) and not every_expert_wins(hw, mixtral, "float16", 160)
    assert every_expert_wins(hw, dense, "float16", 4096)  # nothing routed
    most = EVERY_EXPERT_ROWS * 2 // 8
    assert every_expert_wins(None, mixtral, "float16", most) and not every_expert_wins(None, mixtral, "float16",
                                                                                        most + 1)
    h, f = 4096, 14336  # an MLP layer's products: every expert's at 136 rows (3.5% more than at their share, 34),
    for rows, graph, at in ((136, True, 136), (1024, False, 256)):  # at 1024 each one's share
        setup = Setup(mixtral, Workload(64, 8), Policy(gpu_batch_size=rows, dtype="float16"), hw)
        assert graph_decode(setup) == graph
        experts = 8 * (2 * hw.matmul_time("float16", at, h, f) + hw.matmul_time("float16", at, f, h))
        assert experts < _compute(setup, "mlp", 1).by["compute"] < experts * 1.01


@pytest.mark.parametrize("name, weighted", [("mixtral-8x7b", 4), ("granite-3.0-3b-a800m", 2)])
def test_the_cost_model_counts_the_routings_passes(name, weighted):
    """Besides its products, a routed MLP moves each (row, expert) pair's hidden state: gathered, its expert's
    output copied, weighted (in fp32 for Mixtral), scattered back and summed (layers.experts): 5 passes of the
    compute dtype and 4 of the weighting's, at the memory's rate (products free here)."""
    free = [(1, 1e18, 0.0)]
    hw = dataclasses.replace(synthetic_profile(), matmul={"float32": free, "bfloat16": free})
    config = preset_config(name)
    setup = Setup(config, Workload(128, 8), Policy(gpu_batch_size=4, dtype="bfloat16"), hw)
    rows, h, k = 4 * 128, config.hidden_size, config.experts_per_token
    f = k * config.expert_size
    plain = rows * 2 * (4 * h + 3 * f)
    routing = rows * k * h * (5 * 2 + 4 * weighted)
    assert _compute(setup, "mlp", 128).by["compute"] == pytest.approx((plain + routing) / hw.host_copy, rel=1e-4)


def test_layer_specs_name_every_expert():
    config = config_from_dict(FAMILY_CONFIGS["qwen2-moe"] | {"vocab_size": 512})
    mlp0, mlp1 = (s for s in layer_specs(config) if s.kind == "mlp")
    names = {w.name: w for w in mlp0.weights}
    assert names["router.weight"].shape == (6, 128) and names["shared_gate.weight"].shape == (1, 128)
    assert names["experts.5.down.weight"].shape == (128, 64) and names["experts.5.down.weight"].share == 2 / 6
    assert names["shared.up.weight"].shape == (96, 128) and names["shared.up.weight"].share == 1
    assert {w.name for w in mlp1.weights} == {"norm.weight", "gate.weight", "up.weight", "down.weight"}


@pytest.mark.parametrize("fields, message", [
    ({"num_experts_per_tok": 5}, "num_experts_per_tok 5 of 4 experts"),
    ({"num_local_experts": None}, "needs num_experts .or num_local_experts. and num_experts_per_tok"),
])
def test_an_inconsistent_moe_config_is_refused(fields, message):
    with pytest.raises(ModelError, match=message):
        config_from_dict(FAMILY_CONFIGS["mixtral"] | {"vocab_size": 512} | fields)


def test_experts_weigh_and_sum_rows_as_transformers_does():
    """transformers' default experts (grouped_mm): Qwen rounds the top experts' weights to the compute dtype, Mixtral
    keeps them fp32, and each row's weighted outputs are summed at once. In bf16 each choice changes bits, so the
    products are made exact (integer inputs, router and gate/up weights; one +-1 per row of down) to compare the
    weighting and summing bit for bit, whatever matmul kernels each side runs."""
    from transformers import AutoConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (2, 5, 128), generator=g).bfloat16()
    for family, block in (("mixtral", MixtralSparseMoeBlock), ("qwen3-moe", Qwen3MoeSparseMoeBlock)):
        fields = dict(FAMILY_CONFIGS[family], vocab_size=512)
        hf = AutoConfig.for_model(fields.pop("model_type"), **fields)
        hf._experts_implementation = "grouped_mm"
        theirs = block(hf).bfloat16()
        experts, config = theirs.experts, config_from_dict(hf.to_dict())
        with torch.no_grad():
            theirs.gate.weight.copy_(torch.randint(-1, 2, theirs.gate.weight.shape, generator=g))
            experts.gate_up_proj.copy_(torch.randint(-1, 2, experts.gate_up_proj.shape, generator=g) *
                                       (torch.rand(experts.gate_up_proj.shape, generator=g) < 0.1))
            down = torch.zeros(experts.down_proj.shape)
            down.scatter_(2, torch.randint(0, down.shape[2], (*down.shape[:2], 1), generator=g),
                          torch.randint(0, 2, (*down.shape[:2], 1), generator=g).float() * 2 - 1)
            experts.down_proj.copy_(down)
            w = {"router.weight": theirs.gate.weight.data}
            for e in range(config.num_experts):
                gate, up = experts.gate_up_proj[e].data.chunk(2)
                w |= {f"experts.{e}.gate.weight": gate, f"experts.{e}.up.weight": up,
                      f"experts.{e}.down.weight": experts.down_proj[e].data}
            ours, want = L.experts(w, x, config), theirs(x)
            assert want.abs().max() > 0 and torch.equal(ours, want), family
            other = dataclasses.replace(config, moe="qwen" if family == "mixtral" else "mixtral")
            assert not torch.equal(L.experts(w, x, other), want), family  # the other rounding changes bits


def _write_moe_gguf(model, path, arch: str, qtype=None, skip: tuple[str, ...] = ()) -> None:
    """The tiny transformers MoE as llama.cpp's converter writes it: each matrix's experts stacked (E, rows, cols),
    gate and up apart; Mixtral's and GraniteMoE's Q and K rows reordered as Llama's, Qwen2-MoE's shared expert gate
    a vector; OLMoE's clip and Granite's multipliers as metadata; a dense layer without a router."""
    import gguf
    import numpy as np

    from .test_gguf_file import _llama_cpp_permute
    from .test_phi3 import gguf_header, write_gguf

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer = gguf_header(c, path, arch, head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_expert_count(getattr(c, "num_local_experts", None) or c.num_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    if arch in ("qwen2moe", "qwen3moe"):
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    if getattr(c, "clip_qkv", None) is not None:
        writer.add_clamp_kqv(c.clip_qkv)
    for key, hf in (("embedding_scale", "embedding_multiplier"), ("residual_scale", "residual_multiplier"),
                    ("attention.scale", "attention_multiplier"), ("logit_scale", "logits_scaling")):
        if arch == "granitemoe":
            writer.add_float32(f"{arch}.{key}", getattr(c, hf))
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "mlp.experts.down_proj": "ffn_down_exps", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
             "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
             "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "block_sparse_moe.router": "ffn_gate_inp",
             "block_sparse_moe.experts.down_proj": "ffn_down_exps"}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for name, t in model.state_dict().items():
        w = t.numpy()
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.endswith("experts.gate_up_proj"):  # gate's rows first, then up's
            i = name.split(".")[2]
            gate, up = np.split(w, 2, axis=1)
            tensors = {f"blk.{i}.ffn_gate_exps.weight": gate, f"blk.{i}.ffn_up_exps.weight": up}
        elif name.startswith("model.layers."):
            i, rest = name.split(".")[2], name.split(".", 3)[3]
            part, kind = rest.rsplit(".", 1) if rest.endswith(("weight", "bias")) else (rest, "weight")
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads if "k_proj" in name else 0
            if arch in ("llama", "granitemoe") and heads:
                w = _llama_cpp_permute(w, heads)
            tensors = {f"blk.{i}.{parts[part]}.{kind}": w.reshape(-1) if part == "mlp.shared_expert_gate" else w}
        else:
            tensors = {names[name]: w}
        for gguf_name, w in tensors.items():
            if gguf_name in skip:
                continue
            w = np.ascontiguousarray(w)
            if qtype is not None and w.ndim >= 2 and "ffn_gate_inp" not in gguf_name:
                writer.add_tensor(gguf_name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(gguf_name, w)
    write_gguf(writer)


@pytest.mark.parametrize("family, arch", [("mixtral", "llama"), ("qwen2-moe", "qwen2moe"),
                                          ("qwen3-moe", "qwen3moe"), ("olmoe", "olmoe"),
                                          ("granitemoe", "granitemoe")])
def test_a_moe_gguf_file_gives_transformers_outputs(tiny_models, references, compute_device, tmp_path, family,
                                                    arch):
    path = tmp_path / f"{family}.gguf"
    _write_moe_gguf(tiny_models[family][1], path, arch)
    check_against_reference(path, references[family], POLICIES["weights-split-3-tiers"], compute_device)


def test_a_mixtral_file_missing_a_router_is_refused_by_name(tiny_models, tmp_path):
    from flexgen_lite.models.gguf_file import GGUFError

    path = tmp_path / "mixtral.gguf"
    _write_moe_gguf(tiny_models["mixtral"][1], path, "llama", skip=("blk.1.ffn_gate_inp.weight",))
    with pytest.raises(GGUFError, match=r"a Mixtral file whose layers \[1\] have no router"):
        FlexGenLite(str(path), policy=POLICIES["all-gpu"], device="cpu")


@pytest.mark.parametrize("family, arch", [("mixtral", "llama"), ("granitemoe", "granitemoe")])
def test_a_q4_0_moe_file_keeps_each_experts_groups(tiny_models, tmp_path, family, arch):
    """--compress-weight keeps a Q4_0 file's own 4-bit groups: each expert's are its rows of the stack's (of the
    file's stack of its kind where HF stacks gate and up together, GraniteMoE), and dequantize to the file's values;
    the router (F32 in the file, as llama.cpp keeps it) is neither rounded nor counted among the file's matrix
    types."""
    import gguf

    from flexgen_lite.engine.weight_sources import STORED_GROUPS, GGUFSource
    from flexgen_lite.kernels.compression import dequantize
    from flexgen_lite.models.gguf_file import read_gguf_config
    from flexgen_lite.models.gguf_weights import decoder_matrix_types

    path = tmp_path / f"{family}-q4_0.gguf"
    _write_moe_gguf(tiny_models[family][1], path, arch, gguf.GGMLQuantizationType.Q4_0)
    assert decoder_matrix_types(path) == ["Q4_0"]
    source = GGUFSource(str(path))
    mlp = next(s for s in layer_specs(config_from_dict(read_gguf_config(path))) if s.kind == "mlp")
    for spec in (w for w in mlp.weights if w.name.startswith("experts.")):
        groups = source.groups(spec, STORED_GROUPS)
        assert groups is not None and groups.shape == spec.shape
        assert torch.equal(dequantize(groups, torch.float32), source.read(spec, 0, spec.shape[0]))
    with FlexGenLite(str(path), policy=Policy(compress_weight=True, dtype="float32"), device="cpu") as m:
        layer = m.engine.weights[2]
        assert layer["router.weight"].compression is None and layer["experts.3.down.weight"].compression
        assert len(m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=2, stop_at_eos=False))) == len(PROMPTS)


@pytest.mark.parametrize("dtype, four_bit", [(torch.float32, False), (torch.bfloat16, False),
                                             (torch.float32, True), (torch.bfloat16, True)])
def test_grouped_experts_are_each_expert_in_turn(monkeypatch, dtype, four_bit):
    """Every expert's products in two calls of the few-row kernels (native.dense_gemv_groups, int4_gemv_groups for
    4-bit codes) give the same bits as each expert in turn through the same kernel, for uneven rows per expert
    and unused experts."""
    from flexgen_lite.kernels import int4_matmul, native, small_matmul
    from flexgen_lite.kernels.compression import CompressionConfig, quantize

    if not native.team_threads() or four_bit and not int4_matmul.native_agrees():
        pytest.skip("the native kernels' OpenMP team is not built here")  # the loop is then the only path
    config = config_from_dict(FAMILY_CONFIGS["qwen3-moe"] | {"vocab_size": 512})
    g = torch.Generator().manual_seed(3)

    def weight(shape):
        t = (torch.randn(shape, generator=g) / 8).to(dtype)
        if not four_bit:
            return t
        return int4_matmul.Int4Weight.from_bytes(int4_matmul.pack(quantize(t, CompressionConfig(4, 32, 1))), shape, 32)

    w = {"router.weight": torch.randn(8, 128, generator=g).to(dtype)}
    for e in range(8):
        w |= {f"experts.{e}.{n}.weight": weight(shape) for n, shape in (("gate", (64, 128)), ("up", (64, 128)),
                                                                         ("down", (128, 64)))}
    x = torch.randn(5, 1, 128, generator=g).to(dtype)
    for module, name in ((L, "gemv_wins"), (small_matmul, "gemv_wins"), (L, "codes_gemv_wins"),
                         (int4_matmul, "codes_gemv_wins")):  # the kernels for every expert, whatever the profile
        monkeypatch.setattr(module, name, lambda *_: True)
    calls = []
    grouped = L.grouped_experts
    monkeypatch.setattr(L, "grouped_experts", lambda *a: calls.append(a) or grouped(*a))
    together = L.experts(w, x, config)
    assert calls and grouped(*calls[0]) is not None  # the grouped path ran
    monkeypatch.setattr(L, "grouped_experts", lambda *a: None)
    assert torch.equal(together, L.experts(w, x, config))
