"""llama.cpp's K-quants and other block types (models/gguf_quants.py): each dequantized bit for bit as gguf's own
numpy code does, and tiny Llama, Qwen2 and Qwen3 GGUFs stored the way Q4_K_M and other common files mix them
give transformers' outputs (its GGUF loader reading the same file)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.models import gguf_reader
from flexgen_lite.models.gguf_file import read_gguf_config
from flexgen_lite.models.gguf_quants import DEQUANTIZE, q4_k_groups
from flexgen_lite.models.gguf_reader import GGUFContents, dequantize
from flexgen_lite.models.gguf_weights import SUPPORTED_TENSOR_TYPES, quantized_types
from flexgen_lite.models.hf_config import config_from_dict

from .conftest import hf_greedy, transformers_gguf_model

Q = gguf.GGMLQuantizationType
# where each type keeps its fp16 factors (d, and dmin or m), and a size for them that gives weights of ~0.05
FP16_FIELDS = {Q.Q5_0: ((0,), 5e-3), Q.Q5_1: ((0, 2), 3e-3), Q.Q2_K: ((80, 82), 2e-3), Q.Q3_K: ((108,), 5e-4),
               Q.Q4_K: ((0, 2), 1e-4), Q.Q5_K: ((0, 2), 5e-5), Q.Q6_K: ((208,), 1e-5), Q.IQ4_NL: ((0,), 5e-4),
               Q.IQ4_XS: ((0,), 1e-5)}
OTHER_FIELDS = {Q.Q8_0: ((0,), 4e-4)}  # types gguf_reader reads itself, for files' embeddings and heads
LOGITS_ATOL = 2e-4  # fp32 on both sides, as test_parity
PROMPTS = [[3, 7, 11, 4, 5], [9, 4, 13], [6, 6, 8, 10, 12, 14, 20, 30]]  # no 1: hf_greedy's pad id


def random_blocks(kind, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes in `kind`'s layout for a (rows, cols) matrix, with finite fp16 factors of a modest size."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    data = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    offsets, scale = {**FP16_FIELDS, **OTHER_FIELDS}[kind]
    for at in offsets:
        factor = rng.uniform(0.2, 1.0, size=len(data)) * scale * rng.choice([-1, 1], size=len(data))
        data[:, at:at + 2] = factor.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, cols // block * size)


def test_every_type_is_read():
    assert set(FP16_FIELDS) == set(DEQUANTIZE) and set(DEQUANTIZE) <= set(SUPPORTED_TENSOR_TYPES)


@pytest.mark.parametrize("kind", list(DEQUANTIZE), ids=lambda k: k.name)
def test_dequantizes_bit_for_bit_as_gguf_does(kind, tmp_path: Path, monkeypatch):
    rng = np.random.default_rng(int(kind))
    data = random_blocks(kind, 6, 512, rng)
    data[0, :] = 0  # a block of zeros, and one whose factors are the largest finite fp16
    offsets, _ = FP16_FIELDS[kind]
    for at in offsets:
        data[1, at:at + 2] = np.array([65504], dtype=np.float16).view(np.uint8)
    path = tmp_path / f"{kind.name}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = GGUFContents(str(path)).tensors
    want = gguf.quants.dequantize(tensor.data, kind)
    got = dequantize(tensor)
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape == (6, 512)
    assert np.array_equal(got.numpy(), want)
    monkeypatch.setattr(gguf_reader, "CHUNK_VALUES", 1000)  # several chunks, the last one short
    assert torch.equal(dequantize(tensor), got)
    assert got[2:].abs().max() > 0 and got[2:].std() > 0  # the random blocks are not all zeros


# (the types of q, k, o, gate, up | v, down | embedding | head) as llama.cpp's mixes store them
MIXES = {
    "Q4_K_M": (Q.Q4_K, Q.Q6_K, Q.Q4_K, Q.Q6_K),
    "Q2_K-Q3_K-Q5_K": (Q.Q2_K, Q.Q3_K, Q.Q5_K, Q.Q6_K),
    "Q5_0-Q5_1-IQ4": (Q.Q5_0, Q.Q5_1, Q.IQ4_NL, Q.IQ4_XS),
}
HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 256, 4, 2, 512, 64, 2  # K-quant rows hold whole blocks of 256


def write_mixed_llama(path: Path, mix: tuple, arch: str = "llama", split_max_tensors: int = 0, hidden: int = HIDDEN,
                      ffn: int = FFN, layers: int = LAYERS) -> None:
    """A 2-layer Llama GGUF (or Qwen2: q, k and v biases; Qwen3: q and k norms, heads of 128 wider than hidden)
    with random quantized blocks of the mix's types (norms and biases in F32)."""
    rng = np.random.default_rng(0)
    body, value_down, embedding, head = mix
    writer = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)  # parts: <stem>-0000i-of-...
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    d = 128 if arch == "qwen3" else hidden // HEADS
    writer.add_rope_dimension_count(d)
    if arch == "qwen3":
        writer.add_key_length(d)
        writer.add_value_length(d)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    tensors = {"token_embd.weight": (embedding, VOCAB, hidden), "output.weight": (head, VOCAB, hidden)}
    for i in range(layers):
        tensors.update({f"blk.{i}.attn_q.weight": (body, HEADS * d, hidden),
                        f"blk.{i}.attn_k.weight": (body, KV_HEADS * d, hidden),
                        f"blk.{i}.attn_v.weight": (value_down, KV_HEADS * d, hidden),
                        f"blk.{i}.attn_output.weight": (body, hidden, HEADS * d),
                        f"blk.{i}.ffn_gate.weight": (body, ffn, hidden),
                        f"blk.{i}.ffn_up.weight": (body, ffn, hidden),
                        f"blk.{i}.ffn_down.weight": (value_down, hidden, ffn)})
    for name, (kind, rows, cols) in tensors.items():
        writer.add_tensor(name, random_blocks(kind, rows, cols, rng), raw_dtype=kind)
    for name in ["output_norm.weight"] + [f"blk.{i}.{n}_norm.weight" for i in range(layers) for n in ("attn", "ffn")]:
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    if arch == "qwen3":
        for i in range(layers):
            for name in ("attn_q_norm", "attn_k_norm"):
                writer.add_tensor(f"blk.{i}.{name}.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
    if arch == "qwen2":
        for i in range(layers):
            for name, rows in (("attn_q", HEADS * d), ("attn_k", KV_HEADS * d), ("attn_v", KV_HEADS * d)):
                writer.add_tensor(f"blk.{i}.{name}.bias", (0.05 * rng.standard_normal(rows)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch,mix", [("llama", mix) for mix in MIXES] + [("qwen2", "Q4_K_M"), ("qwen3", "Q4_K_M")])
def test_mixed_k_quant_models_give_transformers_outputs(arch, mix, tmp_path: Path):
    path = tmp_path / f"tiny-{arch}-{mix}.gguf"
    write_mixed_llama(path, MIXES[mix], arch)
    assert set(quantized_types(path)) == {kind.name for kind in MIXES[mix]}
    config = config_from_dict(read_gguf_config(path))
    assert config.qkv_bias == (arch == "qwen2") and not config.out_bias
    assert config.qk_norm == ("head" if arch == "qwen3" else "")
    want_ids, want_logits = hf_greedy(transformers_gguf_model(path), PROMPTS, 8)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, weight_gpu_percent=50, weight_cpu_percent=50,
                    dtype="float32")
    with FlexGenLite(str(path), policy=policy) as m:
        ids, logits = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=8, stop_at_eos=False), return_logits=True)
    assert ids == want_ids
    assert len({tuple(i) for i in ids}) > 1  # not one degenerate answer for every prompt
    for ours, theirs in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_q4_k_groups_are_the_files_codes_with_fp16_scales(tmp_path: Path):
    """A Q4_K matrix as 4-bit groups of 32 (gguf_reader.groups_of_32): the file's codes exactly, and each group's
    scale d * sc and minimum -dmin * m rounded to the nearest fp16."""
    path = tmp_path / "q4k.gguf"
    write_mixed_llama(path, (Q.Q4_K, Q.Q4_K, Q.Q4_K, Q.Q6_K))
    for t in GGUFContents(str(path)).tensors:
        if t.tensor_type != Q.Q4_K:
            continue
        codes, scale, minimum = gguf_reader.groups_of_32(t)
        exact = torch.from_numpy(gguf.quants.dequantize(t.data, Q.Q4_K))
        _, want_scale, want_sub = q4_k_groups(torch.from_numpy(np.array(t.data)).reshape(-1, 144))
        assert scale.dtype == minimum.dtype == torch.float16
        assert torch.equal(scale.flatten(), want_scale.flatten().half())
        assert torch.equal(minimum.flatten(), (-want_sub).flatten().half())
        rows, cols = codes.shape
        values = codes.float().view(rows, -1, 32) * want_scale.view(rows, -1, 1) - want_sub.view(rows, -1, 1)
        assert torch.equal(values.view(rows, cols), exact)  # the codes are the file's
        ours = codes.float().view(rows, -1, 32) * scale.float().view(rows, -1, 1) + minimum.float().view(rows, -1, 1)
        bound = 2.0 ** -11 * (15 * want_scale.abs() + want_sub.abs()).view(rows, -1, 1)
        assert ((ours - exact.view(rows, -1, 32)).abs() <= bound * 1.001).all()


CHANGES = {"plain": {}, "kept": {"compress_weight": True},
           "regrouped": {"compress_weight": True, "weight_group_size": 64}}


def runs_of(path: Path, base: Policy) -> tuple[dict, dict[str, float]]:
    """Each of CHANGES applied to `base` through for_model (as the CLI does): ({name: (ids, logits)}, {name: the
    largest logit difference from the plain run})."""
    from flexgen_lite.model_source import for_model

    runs = {}
    for name, change in CHANGES.items():
        with FlexGenLite(str(path), policy=for_model(Policy(**{**base.__dict__, **change}), str(path))) as m:
            runs[name] = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=6, stop_at_eos=False),
                                        return_logits=True)
    far = {name: max(float((a - b).abs().max()) for a, b in zip(runs[name][1], runs["plain"][1], strict=True))
           for name in runs}
    return runs, far


def test_compressed_q4_k_m_keeps_the_q4_k_groups(tmp_path: Path):
    """--compress-weight on a Q4_K_M-style file: groups of 32, the Q4_K matrices as the file stores them and its
    Q6_K ones rounded to 4 bits (closer to the uncompressed model's logits than all of them rounded into groups
    of 64); the notice says which matrices were kept and which were rounded."""
    from flexgen_lite.engine.weight_sources import STORED_GROUPS
    from flexgen_lite.model_source import compression_notice, for_model, kept_groups

    path = tmp_path / "tiny-q4km.gguf"
    write_mixed_llama(path, MIXES["Q4_K_M"])
    base = Policy(gpu_batch_size=3, num_gpu_batches=1, dtype="float32")
    kept = for_model(Policy(**{**base.__dict__, **CHANGES["kept"]}), str(path))
    assert kept.weight_compression() == STORED_GROUPS
    notice = compression_notice(kept, False, ["Q4_K", "Q6_K"], False, kept_groups(kept, str(path)))
    assert "Q4_K weights kept in 4 bits as it stores them" in notice and "rounded to fp16" in notice
    assert "its Q6_K weights compressed to 4 bits, which is lossy" in notice
    _, far = runs_of(path, base)
    assert 0 < far["kept"] < far["regrouped"]  # > 0: the Q6_K matrices were rounded to 4 bits


def test_compressed_q4_k_only_file_is_within_fp16_rounding_of_the_file(tmp_path: Path):
    """Every decoder matrix Q4_K, compressed: the same tokens, logits ~1e-4 from the uncompressed model's (the
    groups' fp16 scales), where rounding the same weights again into groups of 64 moves them ~45x as far."""
    path = tmp_path / "tiny-q4k.gguf"
    write_mixed_llama(path, (Q.Q4_K, Q.Q4_K, Q.Q8_0, Q.Q8_0))  # Q8_0 ends: kept as stored (int8_weight) too
    base = Policy(gpu_batch_size=3, num_gpu_batches=1, weight_gpu_percent=50, weight_cpu_percent=50, dtype="float32")
    runs, far = runs_of(path, base)
    assert runs["kept"][0] == runs["plain"][0]
    assert 0 < far["kept"] < 1e-3 and far["kept"] * 30 < far["regrouped"], far


@pytest.mark.parametrize("int4_kernel", [True, False], ids=["int4-kernel-profile", "no-int4-rates"])
def test_the_search_says_when_compressing_a_k_quant_file_would_pay(tmp_path: Path, capsys, monkeypatch, int4_kernel):
    """The search does not round a quantized file's weights again by itself; where its Q4_K matrices could stay
    as stored and that is predicted 10% faster (a profile whose int4 kernel reads 4-bit weights faster than
    bf16 ones are multiplied), it says so in one line; where it is not (no int4 rates: dequantized every step),
    or compression was refused, nothing."""
    from flexgen_lite.planning.budgets import Budgets
    from flexgen_lite.planning.layout import Workload
    from flexgen_lite.planning.policy_search import AutoPolicy

    from .conftest import synthetic_profile

    path = tmp_path / "small-q4km.gguf"
    write_mixed_llama(path, MIXES["Q4_K_M"], hidden=1024, ffn=4096, layers=4)
    hw = synthetic_profile()
    if int4_kernel:
        hw = dataclasses.replace(hw, int4_matmul={"bfloat16": [(1, 20e9, 1e-5), (64, 300e9, 1e-5)]})
    options = dict(hardware=hw, budgets=Budgets(cpu=400 << 20), workload=Workload(16, 8, 8))
    with FlexGenLite(str(path), policy="auto", **options) as m:
        assert not m.policy.compress_weight
    hint = ("note: --compress-weight would keep the file's Q4_K weights in 4 bits as it stores them, its Q6_K ones "
            "rounded to 4 bits (lossy): predicted")
    assert (hint in capsys.readouterr().err) == int4_kernel
    with FlexGenLite(str(path), policy=AutoPolicy(compress_weight=False), **options):
        pass
    assert hint not in capsys.readouterr().err
    if int4_kernel:  # `flexgen-lite plan` says it too, and not when --no-compress-weight was given
        from flexgen_lite.cli.main import main

        from .conftest import forget_profile, set_profile

        set_profile(hw, tmp_path, monkeypatch)
        try:
            for flags, said in (([], True), (["--no-compress-weight"], False)):
                main(["plan", "--model", str(path), "--prompt-len", "16", "--gen-len", "8", "--num-prompts", "8",
                      "--cpu-mem", "2GiB", *flags])
                assert (hint in capsys.readouterr().err) == said
        finally:
            forget_profile()


def _rss_file_mib() -> float:
    return int(re.search(r"RssFile:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def test_a_loaded_tensors_file_pages_leave_the_process(tmp_path: Path):
    """A GGUF is read through a mapping; once a tensor is dequantized its pages are released (GGUFTensor.release),
    else the whole file stays in RSS after loading, beyond the memory budget."""
    path = tmp_path / "pages.gguf"
    write_mixed_llama(path, MIXES["Q4_K_M"], hidden=1024, ffn=4096, layers=4)
    size = path.stat().st_size / 2**20
    before = _rss_file_mib()
    tensors = GGUFContents(str(path)).tensors
    for t in tensors:
        np.asarray(t.data).sum()  # every page touched, as dequantizing does
    touched = _rss_file_mib() - before
    for t in tensors:
        t.release()
    released = _rss_file_mib() - before
    assert touched > 0.8 * size and released < 0.1 * size, (size, touched, released)


def test_loading_a_k_quant_file_keeps_peak_rss_under_the_cpu_budget(tmp_path: Path):
    """`flexgen-lite bench --cpu-mem 1000MiB --compress-weight` on a 242 MB Q4_K_M-style file: peak RSS within the
    budget (it was 1.113 GB while the file's pages stayed mapped after loading)."""
    path = tmp_path / "mid.gguf"
    write_mixed_llama(path, MIXES["Q4_K_M"], hidden=2048, ffn=8192, layers=6)
    run = subprocess.run([sys.executable, "-m", "flexgen_lite.cli", "bench", "--model", str(path), "--dtype",
                          "float32", "--prompt-len", "16", "--gen-len", "4", "--gpu-batch-size", "4",
                          "--num-gpu-batches", "1", "--cpu-mem", "1000MiB", "--compress-weight", "--offload-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["peak_rss_gb"] * 1e9 <= 1000 * 2**20


def test_the_source_dequantizes_the_rows_asked_for_and_a_rotary_q_whole_until_read_to_its_end(tmp_path: Path):
    """Placement reads a chunk of rows at a time: a GGUF source dequantizes only their blocks (a Llama-3-8B's
    embedding whole was 2.1 GB of fp32 beside its placement); a rotary q or k, whose rows llama.cpp permuted, is
    dequantized whole once and held until its last rows are read."""
    from flexgen_lite.engine.weight_sources import GGUFSource
    from flexgen_lite.model_source import model_config
    from flexgen_lite.models.gguf_weights import read_gguf_tensor
    from flexgen_lite.models.specs import layer_specs

    path = tmp_path / "tiny.gguf"
    write_mixed_llama(path, MIXES["Q4_K_M"])
    source = GGUFSource(str(path))
    config = model_config(str(path))
    assert config.rotary_rows_permuted
    for name, held in (("up.weight", False), ("tokens", False), ("q.weight", True)):
        spec = next(w for layer in layer_specs(config) for w in layer.weights if w.name == name)
        rows = spec.shape[0]
        first = source.read(spec, 0, rows // 2 + 1)  # an odd split: not at a block's or a head's border
        assert (source.last is not None) == held
        second = source.read(spec, rows // 2 + 1, rows)
        assert source.last is None
        assert torch.equal(torch.cat([first, second]), read_gguf_tensor(source.plan[spec.hf_name])), name
