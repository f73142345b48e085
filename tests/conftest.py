"""Tiny random checkpoints in Hugging Face format, and transformers as the reference."""

from __future__ import annotations

import copy
import ctypes
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from flexgen_lite.system.hardware import HardwareProfile

VOCAB = 512
G, GiB = 1e9, 2**30


def pytest_addoption(parser) -> None:
    parser.addoption("--device", default=os.environ.get("FLEXGEN_TEST_DEVICE", "cpu"),
                     help="compute device of the parity tests and of their transformers reference: cpu (default), "
                     "cuda, cuda:1 (also env FLEXGEN_TEST_DEVICE)")


def pytest_configure(config) -> None:
    device = config.getoption("--device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device}: torch sees no CUDA device here")
    if not device.startswith("cuda"):
        # Triton kernels tested on the CPU run in Triton's interpreter; it must be chosen before triton.language is
        # first imported (its own helpers, tl.zeros, tl.sum, are jitted then)
        os.environ.setdefault("TRITON_INTERPRET", "1")


# Files that take longest (seconds on a 2-core VM, 2026-12-07), run first: the two workers take whole files
# (scripts/test.sh: --dist loadfile), each the next in this order as it finishes one, and a long file dealt last
# leaves one worker running it alone. Files not named keep their order, after these.
SLOW_FILES = {"test_ray.py": 57, "test_gpu_suite.py": 49, "test_policy_search.py": 45, "test_serve.py": 39,
              "test_real_model.py": 38, "test_decode_attention_triton.py": 31,
              "test_quantized_attention_triton.py": 30, "test_lm_eval.py": 25, "test_threads.py": 24,
              "test_gguf_quants.py": 18, "test_cancel.py": 14, "test_quality.py": 13, "test_int4_gemv_triton.py": 12,
              "test_disk_tier.py": 12, "test_decode_graph.py": 12, "test_parity.py": 11, "test_shared_prefix.py": 10,
              "test_offload_features.py": 9, "test_decode_fused.py": 8, "test_signals.py": 8, "test_generation.py": 7,
              "test_cost_model_cuda.py": 7, "test_examples.py": 6, "test_guided.py": 12}


def pytest_collection_modifyitems(config, items) -> None:
    items.sort(key=lambda item: -SLOW_FILES.get(item.path.name, 0))  # stable: each file's own order kept


@pytest.fixture(scope="session")
def compute_device(request) -> str:
    """The device FlexGen-Lite computes on in the parity tests, and transformers' reference runs on."""
    return request.config.getoption("--device")


def triton_device(monkeypatch, compute_device: str, reset, asked: str | None = None):
    """A Triton kernel's device for its tests (a generator for a fixture): the GPU under --device cuda (compiled),
    else the CPU (Triton's interpreter); FLEXGEN_LITE_TRITON unset, `asked` (the kernel's variable) set to
    "triton", `reset` (its checks) called before and after."""
    cuda = compute_device.startswith("cuda")
    if cuda:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if asked is not None:
        monkeypatch.setenv(asked, "triton")
    monkeypatch.delenv("FLEXGEN_LITE_TRITON", raising=False)
    reset()
    yield compute_device if cuda else "cpu"
    reset()


FAMILY_CONFIGS = {
    "opt": dict(model_type="opt", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                max_position_embeddings=64, word_embed_proj_dim=128),
    # OPT-350m's shape: post-layernorm, embeddings projected from a smaller width, no final norm
    "opt-350m": dict(model_type="opt", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                     max_position_embeddings=64, word_embed_proj_dim=64, do_layer_norm_before=False),
    "llama": dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64, rope_theta=10000.0),
    # Llama-3 rope scaling (original context shorter than the prompts so the scaled bands matter)
    "llama3": dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1, intermediate_size=256, max_position_embeddings=64, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "qwen2": dict(model_type="qwen2", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, intermediate_size=256, max_position_embeddings=64, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64, sliding_window=None),
    # Qwen3: q and k normalised per head, and heads x head_dim (4 x 64) wider than hidden (128)
    "qwen3": dict(model_type="qwen3", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, intermediate_size=256, max_position_embeddings=64,
                  tie_word_embeddings=True),
    # linear rope scaling (positions divided by 4), as long-context fine-tunes of Llama 2 ship
    "llama-linear": dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64,
                         rope_scaling={"rope_type": "linear", "factor": 4.0}),
    # YaRN rope scaling (an original context of 16, shorter than the prompts, so the scaled bands matter)
    "llama-yarn": dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    # Mistral-Nemo's shape: heads x head_dim (4 x 64) wider than hidden (128), without Qwen3's norms
    "mistral-nemo": dict(model_type="mistral", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, intermediate_size=256, max_position_embeddings=64,
                         sliding_window=None),
    # Phi-3: q, k, v in one stored matrix, gate and up in another (sliding_window past the context: unused)
    "phi3": dict(model_type="phi3", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64, sliding_window=64,
                 pad_token_id=1),
    # Phi-3.5's LongRoPE: per-frequency short factors and an attention factor (original context 32 of 64)
    "phi3-longrope": dict(model_type="phi3", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=256, max_position_embeddings=64,
                          original_max_position_embeddings=32, sliding_window=64, pad_token_id=1,
                          rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.25 * i for i in range(16)],
                                        "long_factor": [4.0] * 16}),
    # Granite: Llama with multipliers of the embeddings, the residual branches, the attention scale and the logits
    "granite": dict(model_type="granite", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64, embedding_multiplier=2.0,
                    residual_multiplier=0.7, attention_multiplier=0.3, logits_scaling=3.0, tie_word_embeddings=True),
    # Gemma: (1 + w) norms in fp32, embeddings times sqrt(hidden), a tanh-GELU gated MLP, tied head
    "gemma": dict(model_type="gemma", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, intermediate_size=256, max_position_embeddings=64),
    # Gemma-2: also soft caps on attention scores and logits (low enough to bite), norms after each block, its
    # own attention scale (untied: a tied head repeats the last token at random weights)
    "gemma2": dict(model_type="gemma2", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, intermediate_size=256, max_position_embeddings=64,
                   sliding_window=64, query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=8.0,
                   tie_word_embeddings=False),
    # Mixtral: each token through its top 2 of 4 experts, their weights renormalised (fp32)
    "mixtral": dict(model_type="mixtral", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                    max_position_embeddings=64, sliding_window=None),
    # Qwen2-MoE: top 2 of 6 narrow experts (weights as the softmax gives them) plus a gated shared expert; its
    # second layer a dense MLP (mlp_only_layers)
    "qwen2-moe": dict(model_type="qwen2_moe", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=256, moe_intermediate_size=64, num_experts=6,
                      num_experts_per_tok=2, shared_expert_intermediate_size=96, mlp_only_layers=[1],
                      max_position_embeddings=64, tie_word_embeddings=False),
    # Qwen3-MoE: top 3 of 8 renormalised, q and k normalised per head, heads x head_dim wider than hidden
    "qwen3-moe": dict(model_type="qwen3_moe", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, intermediate_size=256, moe_intermediate_size=64,
                      num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, max_position_embeddings=64),
    # OLMoE: top 2 of 6 (not renormalised), q and k normalised across all heads, q, k, v clipped (low enough to bite)
    "olmoe": dict(model_type="olmoe", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, num_experts=6, num_experts_per_tok=2, clip_qkv=1.5,
                  max_position_embeddings=64, tie_word_embeddings=False),
    # GraniteMoE: Granite's multipliers, a softmax of the top 2 of 4 logits, gate and up stored as one stack
    "granitemoe": dict(model_type="granitemoe", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=64, embedding_multiplier=2.0, residual_multiplier=0.7,
                       attention_multiplier=0.3, logits_scaling=3.0, tie_word_embeddings=True),
    # gpt-oss: biases on q, k, v, o, a sink per head, a window of 5 on the first layer, top 2 of 4 experts with
    # biases (gate and up interleaved in one transposed stack), the clamped GLU, YaRN
    "gpt-oss": dict(model_type="gpt_oss", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, intermediate_size=64, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=5, max_position_embeddings=64, swiglu_limit=2.0,
                    rope_parameters=dict(rope_type="yarn", factor=2.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                         original_max_position_embeddings=32, rope_theta=150000.0)),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that greedy output varies from token to token (HF's init gives one token forever)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]) * 1.5)


def _word_tokenizer(path: Path) -> None:
    """A word-level tokenizer over words w0..w511, so tests can use text, stop strings and eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w1", eos_token="w2")
    fast.save_pretrained(str(path))


def copy_with_eos(source: Path, path: Path, eos) -> Path:
    """A copy of a checkpoint directory whose generation stops at `eos` (an id or ids): config.json's and, where
    there is one, generation_config.json's (which transformers, and the engine, read first)."""
    shutil.copytree(source, path)
    for name in ("config.json", "generation_config.json"):
        if (path / name).is_file():
            config = json.loads((path / name).read_text())
            (path / name).write_text(json.dumps(config | {"eos_token_id": eos}))
    return path


def make_checkpoint(path: Path, family: str, seed: int = 0, **overrides):
    """Save a tiny random model of `family` to `path`; returns the transformers model (fp32, eval)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(FAMILY_CONFIGS[family], vocab_size=VOCAB, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    fields.update(overrides)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **reference_attention(model_type)).eval()
    _follow_config(model)
    _randomize(model, seed)
    model.save_pretrained(str(path))
    _word_tokenizer(path)
    return model


def reference_attention(model_type: str) -> dict:
    """transformers' eager attention where its SDPA would drop a score cap: Gemma-2's soft caps need it (transformers
    5.17, the GPU image's, made SDPA Gemma-2's default and ran it uncapped; 5.25 refuses SDPA for Gemma-2)."""
    return {"attn_implementation": "eager"} if model_type == "gemma2" else {}


def _follow_config(model) -> None:
    """gpt-oss's experts with the checkpoint's GLU clamp and slope: transformers up to 5.17 fixed them at 7.0 and
    1.702 whatever the config said (later versions read them), and these tests clamp at 2.0 so the clamp bites."""
    config = model.config
    if config.model_type != "gpt_oss":
        return
    for layer in model.model.layers:
        experts = layer.mlp.experts
        experts.limit, experts.alpha = config.swiglu_limit, getattr(config, "swiglu_alpha", experts.alpha)


def hf_greedy(model, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers' greedy continuation of each prompt (one at a time, no padding), on the model's device,
    and the logits that chose each token (recomputed with one forward pass over prompt + continuation; fp32,
    on the CPU)."""
    ids, logits = [], []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p], device=model.device), max_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=1)
            gen = out[0, len(p):].tolist()
            full = model(out).logits[0]
            ids.append(gen)
            logits.append(full[len(p) - 1:len(p) - 1 + len(gen)].float().cpu())
    return ids, logits


def on_device(model, device: str):
    """`model` itself on the CPU, else a copy of it on `device` (the session's models stay on the CPU)."""
    if device == "cpu":
        return model
    return copy.deepcopy(model).to(device)


PROMPTS = [
    [2, 17, 43, 99, 120, 7],
    [2, 300, 5],
    [2, 88, 91, 92, 93, 94, 95, 96, 97, 11],
    [2, 400],
    [2, 250, 251, 252],
    [2, 9, 9, 9, 9],
    [2, 61, 62, 63, 64, 65, 66],
]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: (checkpoint dir, transformers model)}, made once per test session."""
    out = {}
    for i, family in enumerate(FAMILY_CONFIGS):
        path = tmp_path_factory.mktemp(family)
        out[family] = (path, make_checkpoint(path, family, seed=i))
    return out


@pytest.fixture(scope="session")
def references(tiny_models, compute_device):
    """transformers' greedy ids and logits for PROMPTS, 8 new tokens, per family, computed on the test device."""
    return {family: hf_greedy(on_device(model, compute_device), PROMPTS, 8)
            for family, (_, model) in tiny_models.items()}


def transformers_gguf_model(path: str | Path) -> torch.nn.Module:
    """transformers' own model of a GGUF file (its loader dequantizes with gguf), fp32: the reference."""
    import functools

    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with pytest.MonkeyPatch.context() as mp:
        # transformers rebuilds gguf's (pure) name map once per submodule (~7 s for SmolLM2) and reads the file's
        # fields (its vocabulary: ~2.5 s) once for the config and again for the tensors: both memoized
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        mp.setattr(gguf, "GGUFReader", functools.cache(gguf.GGUFReader))
        config = AutoConfig.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
        with no_init_weights():  # every weight is loaded below (a tied head from the embedding): no random init
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set()), \
        (missing, unexpected)
    model.tie_weights()
    return model


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct (GGUF, Q4_1) and transformers' own model of it (its GGUF loader, fp32), converted once
    for the test workers (~7 s of a core each) and kept as a checkpoint for the next runs, keyed by the file and
    the versions of what converts it."""
    import importlib.metadata
    import inspect

    import transformers
    from transformers import AutoModelForCausalLM

    from flexgen_lite.models.gguf_file import default_model_path

    path = default_model_path()  # fails with the install command if the package is missing
    stat = Path(path).stat()
    key = [str(path), str(stat.st_size), str(stat.st_mtime_ns), transformers.__version__, torch.__version__,
           importlib.metadata.version("gguf"), inspect.getsource(transformers_gguf_model)]
    saved = built_once("smollm-reference", key, lambda part: transformers_gguf_model(path).save_pretrained(part))
    return path, AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()


def built_once(name: str, key: list[str], make, suffix: str = "") -> Path:
    """A file or folder the test workers share in the temp dir, made once per `key` by make(path) (into a part,
    then renamed) while the other workers wait on its lock; kept for later runs."""
    import fcntl
    import hashlib
    import tempfile

    shared = Path(tempfile.gettempdir()) / f"flexgen-lite-test-builds-{os.getuid()}"
    shared.mkdir(exist_ok=True)
    digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
    path = shared / f"{name}_{digest}{suffix}"
    with open(shared / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            part = shared / f"{name}_{digest}.{os.getpid()}.part{suffix}"
            make(part)
            os.replace(part, path)
    return path


def synthetic_profile(cuda: bool = False) -> HardwareProfile:
    """Rates like this 2-core VM's (ANCHORS.md), fixed so that tests do not depend on the machine."""
    rates = {"float32": 10 * G, "bfloat16": 8 * G, "float16": 8 * G}
    attention = {k: (1e-4, v) for k, v in rates.items()}
    return HardwareProfile(
        device="synthetic", is_cuda=cuda,
        matmul={"float32": [(m, r * G, 1e-4) for m, r in ((1, 6), (4, 24), (16, 80), (64, 120), (256, 128))],
                "bfloat16": [(m, r * G, 1e-4) for m, r in ((1, 12), (4, 45), (16, 150), (64, 300), (1024, 370))],
                "float16": [(1, 0.4 * G, 1e-4)]},
        matmul_shape=(2048, 4096), sdpa_prefill={"float32": 50 * G, "bfloat16": 80 * G, "float16": 80 * G},
        attention=attention, cpu_attention=attention, h2d_pinned=12 * G, h2d_pageable=12 * G, d2h_pinned=12 * G,
        d2h_pageable=12 * G, device_copy=12 * G, host_copy=12 * G, strided_copy=3 * G, disk_read=1.5 * G,
        disk_write=1.2 * G, cached_read=8 * G, cached_write=4 * G, disk_method="O_DIRECT",
        dequantize=dict.fromkeys(rates, 1 * G), quantize=dict.fromkeys(rates, 0.3 * G),
        cache_disk_load=dict.fromkeys(rates, (2e-4, 4 * G)), cache_dequantize=dict.fromkeys(rates, (5e-4, 1 * G)),
        cache_store=5e-4, op_overhead=5e-6, handoff=5e-5, layer_overhead={"opt": (1e-4, 1e-4), "llama": (1e-4, 1e-4)},
        contention=1.5, contention_read=1.2, offload_dir="/tmp", threads=2, host_memory=20 * GiB)


def forget_profile() -> None:
    """Drop what the kernels cached from the stored profile (their choices of way), to read it again."""
    from flexgen_lite.system import profile_store

    profile_store.profile_changed()


def forget_native() -> None:
    """Drop the built library and every check cached from it (a test that turns the library off or swaps it
    must leave none of its answers behind: a cached "the C kernel disagrees" sent later tests to torch's paths)."""
    from flexgen_lite.kernels import attention, decode_layers, elementwise, int4_matmul, native, prefill_attention

    for cached in (native.library, native._shares_torch_openmp, native._uses_openmp, attention.native_decode_agrees,
                   elementwise.torch_lanes, decode_layers.torch_exp, decode_layers.silu_exact,
                   int4_matmul.native_agrees, prefill_attention.prefill_agrees):
        cached.cache_clear()


@pytest.fixture
def without_native(monkeypatch):
    """The C kernels off (every op then an aten op: tests/recorded_graph.py sees them all), and back on after."""
    monkeypatch.setenv("FLEXGEN_LITE_NATIVE", "0")
    forget_native()
    yield
    monkeypatch.undo()
    forget_native()


def set_profile(hw: HardwareProfile, tmp_path: Path, monkeypatch) -> None:
    """`hw` as this machine's stored profile for the rest of the test (call forget_profile() after it)."""
    path = tmp_path / "profile.json"
    path.write_text(hw.to_json())
    monkeypatch.setenv("FLEXGEN_LITE_PROFILE", str(path))
    forget_profile()


@pytest.fixture(scope="session", autouse=True)
def _synthetic_machine(tmp_path_factory):
    """policy="auto" (the API's default) plans with a fixed profile: tests neither depend on this machine's
    speeds nor measure them. Tests of the profile itself unset this."""
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    path.write_text(synthetic_profile().to_json())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLEXGEN_LITE_PROFILE", str(path))
        yield path


def ctrl_c_in_block(monkeypatch, n: int) -> None:
    """From now on, the n-th block FlexGenLite runs raises KeyboardInterrupt as it starts, as Ctrl-C there would
    (the CLI then exits 130); the blocks before it run as usual."""
    from flexgen_lite.generation import FlexGenLite

    real, started = FlexGenLite._run_block, []

    def run_block(self, *args, **kwargs):
        started.append(1)
        if len(started) == n:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FlexGenLite, "_run_block", run_block)


_OTHER_BUILDS: dict[tuple[str, ...], ctypes.CDLL] = {}


def other_native_build(march: list[str]) -> ctypes.CDLL:
    """The native kernels built here for another machine (`march`: e.g. without AVX-512, or without its bf16
    dot instruction), without OpenMP, their argument types set as the package's own build's; built once per
    `march`, sources, compiler and CPU, and shared by the test workers (several test files use the same ones; a
    build takes ~10 s of a core)."""
    from flexgen_lite.kernels import native

    if tuple(march) in _OTHER_BUILDS:
        return _OTHER_BUILDS[tuple(march)]
    cc = native.build.compiler()
    if cc is None:
        pytest.fail("no C compiler: the native kernels are built with one (gcc on these machines)")
    flags = [f for f in native.build.FLAGS if f != "-march=native"] + march
    key = [*(p.read_text() for p in native.build.SOURCES + native.build.HEADERS), *flags, cc, native.build.cpu_flags()]
    path = built_once("native", key, lambda part: subprocess.run(
        [cc, *flags, *map(str, native.build.SOURCES), "-o", str(part), "-lm"], check=True), suffix=".so")
    return _OTHER_BUILDS.setdefault(tuple(march), native.declared(ctypes.CDLL(str(path))))
