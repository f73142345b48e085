"""Sliding attention windows (Mistral, Phi-3, Qwen with use_sliding_window, Gemma-2): each layer's window limits its
attention in the prefill, in every decode path and in a shared prefix, and the context is the model's own.
transformers' greedy output and logits are the reference; windows here are a few positions, so they hide some."""

from __future__ import annotations

import pytest
import torch

from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.engine import decode_fused
from flexgen_lite.models.hf_config import config_from_dict

from .conftest import FAMILY_CONFIGS, PROMPTS, hf_greedy, make_checkpoint, on_device
from .test_decode_fused import P as fused_policy
from .test_decode_fused import all_fused, few_rows_kernels  # noqa: F401 (a fixture)
from .test_decode_fused import generate as fused_generate
from .test_decode_graph import P as graph_policy
from .test_decode_graph import generate as graph_generate
from .test_decode_graph import no_failure_yet, static_runs  # noqa: F401 (fixtures)
from .test_parity import LOGITS_ATOL, POLICIES
from .test_shared_prefix import SHARED_PROMPTS
from .test_shared_prefix import run as shared_run

WINDOWED = {  # family, its overrides: windows of 5 or 6 positions in prompts of up to 10 and 8 new tokens
    "mistral": dict(sliding_window=5),
    "gemma2": dict(sliding_window=6),  # every other layer, from the first; soft caps too
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),  # the second layer only
}
PLACEMENTS = ["all-gpu", "cache-split-3-tiers", "no-overlap-offloaded", "cpu-attention-cache-split"]


@pytest.fixture(scope="module")
def windowed(tmp_path_factory, compute_device):
    """{family: (checkpoint, transformers' ids and logits for PROMPTS, 8 new tokens)}."""
    out = {}
    for family, overrides in WINDOWED.items():
        path = tmp_path_factory.mktemp(f"{family}-window")
        model = make_checkpoint(path, family, seed=11, **overrides)
        out[family] = (path, model, hf_greedy(on_device(model, compute_device), PROMPTS, 8))
    return out


def generate(path, policy, device, prompts=PROMPTS, new_tokens=8):
    with FlexGenLite(str(path), policy=policy, device=device) as m:
        assert m.config.windows and m.config.max_positions == 64  # the model's context, not its window
        return m.generate_ids(prompts, SamplingConfig(max_new_tokens=new_tokens, stop_at_eos=False),
                              return_logits=True)


@pytest.mark.parametrize("family", list(WINDOWED))
@pytest.mark.parametrize("name", PLACEMENTS)
def test_windowed_attention_matches_transformers(windowed, compute_device, family, name):
    path, _, (want_ids, want_logits) = windowed[family]
    ids, logits = generate(path, POLICIES[name], compute_device)
    assert ids == want_ids
    for ours, theirs in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_the_window_matters(windowed, compute_device):
    """The same weights attending to everything give other tokens: the tests above would see a window ignored."""
    path, model, (want_ids, _) = windowed["mistral"]
    model.config.sliding_window = None
    try:
        full_ids, _ = hf_greedy(on_device(model, compute_device), PROMPTS, 8)
    finally:
        model.config.sliding_window = WINDOWED["mistral"]["sliding_window"]
    assert full_ids != want_ids


def test_a_shared_prefix_longer_than_the_window(tmp_path, compute_device):
    """A prefix of 31 common tokens, computed once, through layers that see 9 of them."""
    model = make_checkpoint(tmp_path, "mistral", seed=12, sliding_window=9)
    want_ids, want_logits = hf_greedy(on_device(model, compute_device), SHARED_PROMPTS, 6)
    for name in ("all-gpu", "cpu-attention-cache-split"):
        ids, logits, shared = shared_run(tmp_path, POLICIES[name], compute_device)
        assert all(n > 9 for n in shared), shared
        assert ids == want_ids, name
        for ours, theirs in zip(logits, want_logits, strict=True):
            torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("family, overrides", [
    ("mistral", dict(sliding_window=7)),
    ("phi3", dict(sliding_window=7)),
    ("mixtral", dict(sliding_window=7)),
    ("gemma2", dict(sliding_window=7, num_hidden_layers=5)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=7, num_hidden_layers=5, max_window_layers=2)),
    ("qwen2", dict(use_sliding_window=False, sliding_window=7)),
    ("qwen2-moe", dict(use_sliding_window=True, sliding_window=7, num_hidden_layers=5, max_window_layers=3,
                       mlp_only_layers=[])),
])
def test_each_layers_window_is_transformers(family, overrides):
    """Each layer's window as transformers' own config gives it (layer_types and sliding_window), from the config
    saved by transformers (which lists layer_types) and from the same config without them (as older files are)."""
    from transformers import AutoConfig

    fields = dict(FAMILY_CONFIGS[family], vocab_size=64, **overrides)
    hf = AutoConfig.for_model(fields.pop("model_type"), **fields)
    types = getattr(hf, "layer_types", None) or ["sliding_attention"] * hf.num_hidden_layers
    want = tuple(hf.sliding_window or 0 if t == "sliding_attention" else 0 for t in types)
    saved = hf.to_dict()
    older = {k: v for k, v in saved.items() if k != "layer_types"}
    for c in (saved, older):
        assert config_from_dict(c).windows == (want if any(want) else ()), (c.get("layer_types"), want)


def test_the_fused_cpu_step_leaves_windowed_blocks_to_the_eager_path(windowed, few_rows_kernels):  # noqa: F811
    """Where the fused C step would run (a few rows, everything in memory), a block whose window hides a position
    is decoded by the eager path, with transformers' tokens; a block within its window is still fused."""
    path, _, (want_ids, _) = windowed["mistral"]
    ids, _, kernels = fused_generate(path, fused_policy(), fused=True)
    assert ids == want_ids
    assert not any(decode_fused.KERNEL in block for block in kernels), kernels
    short = [p[:3] for p in PROMPTS]  # 3 + 2 positions: within the window of 5
    _, _, kernels = fused_generate(path, fused_policy(), fused=True, prompts=short,
                                   sampling=SamplingConfig(max_new_tokens=2, stop_at_eos=False))
    assert all_fused(kernels), kernels


@pytest.mark.parametrize("family", ["mistral", "qwen2"])  # every layer windowed; the second only
def test_the_constant_shape_step_masks_each_layers_window(windowed, static_runs, family):  # noqa: F811
    """The CUDA graph's step (run eagerly here) builds each window's mask on the device: transformers' tokens."""
    path, _, (want_ids, want_logits) = windowed[family]
    prompts = [p for p in PROMPTS if len(p) > 3][:4]  # full blocks: every row in the constant-shape step
    want = [(i, lg) for p, i, lg in zip(PROMPTS, want_ids, want_logits, strict=True) if p in prompts]
    ids, logits, _ = graph_generate(path, prompts, graph_policy(), static=True)
    assert len(static_runs) >= 2 * 7
    assert ids == [i for i, _ in want]
    for ours, (_, theirs) in zip(logits, want, strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_scoring_packs_rows_within_each_window(windowed):
    """Scoring packs continuations sharing a context into one row (positions differ from columns there): each
    log-likelihood is still transformers'."""
    from .test_scoring import check, hf_score, requests

    path, model, _ = windowed["qwen2"]
    reqs = requests(4) + requests(3, seed=1, choices=3)
    with FlexGenLite(str(path), policy=POLICIES["cpu-attention-cache-split"]) as m:
        ours = m.score(reqs)
        assert m.score_stats.fed < m.score_stats.tokens  # some rows were packed
    check(ours, hf_score(model, reqs), reqs)


def test_llamas_sliding_window_is_not_read():
    """transformers' Llama ignores a sliding_window in its config (some files carry one): so do we."""
    fields = dict(FAMILY_CONFIGS["llama"], vocab_size=64, sliding_window=7)
    assert config_from_dict(fields).windows == ()


@pytest.mark.parametrize("name", ["all-gpu", "cpu-attention-cache-split"])
def test_decode_reads_only_each_layers_window(windowed, name):
    """A decode step's attention reads each windowed layer's last `window` positions, not the whole cache: the
    bytes its spans record (--breakdown's) are the window's, where the window is shorter than the context. The
    layer-by-layer step, whose spans these are (on CUDA, not the graph's replay of a whole step)."""
    from flexgen_lite.engine.trace import Recorder

    path, _, (want_ids, _) = windowed["qwen2"]  # layer 0 full, layer 1 a window of 5
    recorder = Recorder()
    prompts = [p for p in PROMPTS if len(p) == 10][:1] * 2  # two rows, no padding: every position real
    with FlexGenLite(str(path), policy=POLICIES[name], trace=recorder) as m:
        m.engine.static_decode = m.engine.layer_graph_decode = False  # on CUDA: no graph's replay
        ids = m.generate_ids(prompts, SamplingConfig(max_new_tokens=6, stop_at_eos=False))
        per_position = 2 * m.config.num_kv_heads * m.config.head_dim * m.engine.cache.dtype.itemsize  # k and v
    assert ids[0] == want_ids[PROMPTS.index(prompts[0])][:6]
    marks = recorder.steps
    for i, mark in enumerate(marks[1:], start=1):
        end = marks[i + 1].start if i + 1 < len(marks) else float("inf")
        read = sum(s.nbytes for s in recorder.spans if mark.start <= s.start < end and "attention" in s.stage)
        length = mark.context + 1  # positions attended, the new one included
        assert read == 2 * per_position * (length + min(length, 5)), (i, read)


def test_the_cost_model_reads_each_windowed_layers_window():
    """plan's decode attention: a windowed layer costs its window's positions (Gemma-3-1B: 22 of 26 layers at 512
    of a mean context of 2080), and its cache keeps them alone (a ring of 512 of 2112)."""
    import dataclasses

    from flexgen_lite import Policy
    from flexgen_lite.models.presets import preset_config
    from flexgen_lite.planning.cost_model import predict
    from flexgen_lite.planning.layout import Workload

    from .conftest import synthetic_profile

    hw = synthetic_profile()
    hw = dataclasses.replace(hw, attention={k: (0.0, rate) for k, (_, rate) in hw.attention.items()})  # bytes alone
    gemma, work = preset_config("gemma-3-1b"), Workload(prompt_len=2048, gen_len=64)
    full = dataclasses.replace(gemma, windows=())
    policy = Policy(gpu_batch_size=32, dtype="bfloat16")
    windowed, whole = predict(gemma, work, policy, hw), predict(full, work, policy, hw)
    assert gemma.windows.count(512) == 22 and gemma.windows.count(0) == 4
    share = (22 * 512 + 4 * 2080) / (26 * 2080)
    assert windowed.decode_by["attention"] == pytest.approx(whole.decode_by["attention"] * share, rel=1e-6)
    kept = (22 * 512 + 4 * 2112) / (26 * 2112)
    assert windowed.memory["gpu"]["kv cache"] == pytest.approx(whole.memory["gpu"]["kv cache"] * kept, rel=1e-9)
    assert windowed.memory["gpu"]["weights"] == whole.memory["gpu"]["weights"]
