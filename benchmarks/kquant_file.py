"""Write a GGUF of a real model's shape with random weights stored as llama.cpp's Q4_K_M mix, for speed runs.

Q4_K_M (llama.cpp's `llama_tensor_get_type`): Q4_K everywhere, but Q6_K for the value and down projections of the
first and last eighth of the layers and every third layer between, and for the head (tied here to the
embedding, as Llama-3.2-1B/3B and Qwen2.5-0.5B-3B tie theirs). The blocks are random bytes with small fp16
factors, so values are like a model's in size; outputs are meaningless, speed is not.

    .venv/bin/python benchmarks/kquant_file.py --shape llama-3.2-1b --out /tmp/llama-3.2-1b-q4km.gguf
    .venv/bin/python benchmarks/compare_llamacpp.py --model /tmp/llama-3.2-1b-q4km.gguf --batch 1 16 64
"""

from __future__ import annotations

import argparse

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
# name: (hidden, layers, heads, kv heads, ffn, vocab, rope theta)
SHAPES = {"llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256, 5e5), "llama-3.2-3b": (3072, 28, 24, 8, 8192, 128256, 5e5)}
FP16_AT = {Q.Q4_K: ((0, 2), 2e-4), Q.Q6_K: ((208,), 2e-5)}  # the factors' offsets in a block, and their size


def blocks(kind, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    data = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    offsets, scale = FP16_AT[kind]
    for at in offsets:
        data[:, at:at + 2] = (rng.uniform(0.2, 1, len(data)) * scale).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, cols // block * size)


def more_bits(i: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth, and every third layer between."""
    return i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2


def write(path: str, shape: str) -> None:
    hidden, layers, heads, kv, ffn, vocab, theta = SHAPES[shape]
    d, rng = hidden // heads, np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")  # a placeholder vocabulary, for loaders that need one (llama.cpp)
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", blocks(Q.Q6_K, vocab, hidden, rng), raw_dtype=Q.Q6_K)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(layers):
        wide = Q.Q6_K if more_bits(i, layers) else Q.Q4_K
        for name, kind, rows, cols in (("attn_q", Q.Q4_K, heads * d, hidden), ("attn_k", Q.Q4_K, kv * d, hidden),
                                       ("attn_v", wide, kv * d, hidden), ("attn_output", Q.Q4_K, hidden, heads * d),
                                       ("ffn_gate", Q.Q4_K, ffn, hidden), ("ffn_up", Q.Q4_K, ffn, hidden),
                                       ("ffn_down", wide, hidden, ffn)):
            w.add_tensor(f"blk.{i}.{name}.weight", blocks(kind, rows, cols, rng), raw_dtype=kind)
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.ones(hidden, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    write(args.out, args.shape)
