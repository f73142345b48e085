"""The GPU suite's rows (FlexGen's headline workloads, each with its FlexGen twin where one exists), their
tiny CPU-smoke counterparts, and fast dummy weights for the bench rows.

Dummy weights: `flexgen-lite bench` draws normal(0, 0.02) values tensor by tensor (~1 min per 10 B parameters
on one core) and quantizes 4-bit weights on the CPU (~1 G parameters/s). The rows copy matrices from one
random 64 MiB tile instead, and 4-bit matrices take their codes, scales and minima from one byte tile (random
codes; fp16 scales and minima of 2^-9..2^-8): the same shapes, byte counts and placement, so the same
throughput, without materializing 175 B fp16 values on the host (--exact-dummy: the bench's own).
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import math
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

GB = 1e9


@dataclass
class Row:
    """One benchmark: `flexgen-lite bench --model MODEL FLAGS`, and FlexGen's `flex_opt` with `flexgen` flags
    (its twin) where FlexGen can run the same workload. expect_s / flexgen_expect_s: wall seconds on an H200,
    used to plan when the cost model cannot predict."""

    name: str
    model: str
    flags: list[str]
    timeout: float
    note: str = ""
    flexgen: list[str] | None = None
    expect_s: float = 60.0
    flexgen_expect_s: float = 60.0
    prompt_len: int = 512
    gen_len: int = 32
    flexgen_model: str = ""
    flexgen_after: str = ""  # run the twin after this row (a long twin after the rows that matter more)
    breakdown: bool = True  # --breakdown's CUDA events cost a share of a step of a few ms: off where that skews

    def flag(self, name: str) -> str | None:
        return self.flags[self.flags.index(name) + 1] if name in self.flags else None

    @property
    def auto(self) -> bool:
        return self.flag("--policy") == "auto"

    @property
    def gpu_budget(self) -> float | None:
        """The row's --gpu-mem in bytes, if it sets one."""
        if self.flag("--gpu-mem") is None:
            return None
        from flexgen_lite.system.memory import parse_size

        return parse_size(self.flag("--gpu-mem"))

    def bench_args(self, model_path: str | None = None) -> list[str]:
        return ["bench", "--model", model_path or self.model, "--prompt-len", str(self.prompt_len),
                "--gen-len", str(self.gen_len), *self.flags]

    def flexgen_args(self) -> list[str]:
        return ["--model", self.flexgen_model or self.model, "--prompt-len", str(self.prompt_len),
                "--gen-len", str(self.gen_len), *(self.flexgen or [])]


def _f(text: str) -> list[str]:
    return text.split()


OPT13_CPU = "--percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 4"
# FlexGen's paper policy for OPT-30B is 48 x 3; its cache (108 GB at 544 positions) and 80% of the weights
# (48 GB) take 156 GB of host RAM (the paper's T4 host had 208 GB): on a 128 GiB host one GPU batch of 48 fits.
OPT67_CPU_CACHE = "--percent 100 0 0 100 100 0 --gpu-batch-size 32 --num-gpu-batches 4"
OPT30_PAPER = "--percent 20 80 0 100 0 100 --gpu-batch-size 48 --num-gpu-batches 1 --cpu-cache-compute"

# In run order: the peer rows, issue 21's Llama-2-7B mark row (never measured: skipped for time twice), FlexGen's
# scale (OPT-175B), the other rows with a twin, the Llama-2-7B split row, Llama-3-70B, then the rest; under the time
# limit a row whose predicted time does not fit is skipped. --rows picks and orders any subset.
GPU_ROWS = [
    Row("opt-1.3b-gpu-bs64", "facebook/opt-1.3b", _f("--percent 100 0 100 0 100 0 --gpu-batch-size 64"), 90,
        "all on the GPU (no --breakdown: its events would skew the ratio at a step of a few ms)",
        flexgen=_f("--percent 100 0 100 0 100 0 --gpu-batch-size 64 --num-gpu-batches 1"),
        expect_s=12, flexgen_expect_s=20, breakdown=False),
    Row("opt-13b-cpu-weights", "facebook/opt-13b", _f(OPT13_CPU), 150, "FlexGen's published policy",
        flexgen=_f(OPT13_CPU), expect_s=45, flexgen_expect_s=50),
    Row("opt-13b-cpu-weights-compress", "facebook/opt-13b", _f(OPT13_CPU + " --compress-weight"), 150,
        "4-bit weights: 3.5x fewer link bytes", flexgen=_f(OPT13_CPU + " --compress-weight"),
        expect_s=45, flexgen_expect_s=60),
    Row("opt-30b-16gib-auto", "facebook/opt-30b", _f("--policy auto --gpu-mem 16GiB --num-prompts 256"), 240,
        "a 16 GiB card simulated, policy searched; FlexGen: its paper policy " + OPT30_PAPER,
        flexgen=_f(OPT30_PAPER), expect_s=90, flexgen_expect_s=200, flexgen_after="opt-175b-4bit-24gib"),
    Row("llama-2-7b-cpu-cache-cpu-attn", "llama-2-7b",
        _f("--percent 100 0 0 100 100 0 --cpu-cache-compute --gpu-batch-size 64 --num-gpu-batches 2 "
           "--gpu-mem 24GiB"), 150,
        "cache 36.5 GB on the CPU, attended there: does not fit beside the weights in 24 GiB", expect_s=60),
    Row("opt-175b-4bit-24gib", "facebook/opt-175b",
        _f("--percent 0 100 100 0 100 0 --compress-weight --compress-cache --gpu-batch-size 12 --gpu-mem 24GiB"),
        420, "FlexGen's scale: 4-bit weights (98 GB) in host RAM, 4-bit cache on the GPU (8.7 GB); gen 8 so that "
        "it fits the run (its decode step is gen 32's; its total weighs the prefill more)", expect_s=200, gen_len=8),
    Row("opt-13b-4bit-gpu", "facebook/opt-13b",
        _f("--percent 100 0 100 0 100 0 --compress-weight --gpu-batch-size 32 --num-gpu-batches 2"), 120,
        "4-bit weights (7.3 GB) in GPU memory: decode steps are CUDA graphs multiplying them as stored "
        "(int4_gemv_triton), FlexGen dequantizes every layer each step",
        flexgen=_f("--percent 100 0 100 0 100 0 --compress-weight --gpu-batch-size 32 --num-gpu-batches 2"),
        expect_s=20, flexgen_expect_s=60),
    Row("llama-2-7b-cpu-attn-and-link", "llama-2-7b",
        _f("--percent 100 0 0 100 100 0 --cpu-cache-compute --cpu-attention-percent auto --gpu-batch-size 64 "
           "--num-gpu-batches 2 --gpu-mem 24GiB"), 150,
        "the same, a share of the rows copied across the idle link and attended on the GPU while the CPU attends "
        "the rest (the share by the profile; H100 profile: 60%, predicted 346 tok/s against 237)", expect_s=45),
    Row("llama-3-70b-4bit-24gib", "llama-3-70b",
        _f("--percent 0 100 100 0 100 0 --compress-weight --gpu-batch-size 24 --num-gpu-batches 2 --gpu-mem 24GiB"),
        300, "4-bit weights (38.5 GB) in host RAM, cache on the GPU (8.6 GB)", expect_s=150),
    Row("opt-13b-auto", "facebook/opt-13b", _f("--policy auto --num-prompts 256"), 180, "searched", expect_s=30),
    Row("opt-1.3b-auto", "facebook/opt-1.3b", _f("--policy auto --num-prompts 1024"), 120,
        "the batch the search finds", expect_s=20),
    Row("opt-6.7b-act-cpu", "facebook/opt-6.7b",
        _f("--percent 100 0 100 0 0 100 --gpu-batch-size 32 --num-gpu-batches 4"), 120,
        "hidden states on the CPU between layers: asynchronous copies through page-locked buffers", expect_s=25),
    Row("opt-6.7b-cpu-weights-cpu-cache", "facebook/opt-6.7b",
        _f("--percent 0 100 0 100 100 0 --gpu-batch-size 32 --num-gpu-batches 4"), 150,
        "cache on the CPU, attended on the GPU: 35 GB of cache prefix over the link a step", expect_s=120),
    Row("opt-6.7b-disk-weights-cold", "facebook/opt-6.7b",
        _f("--percent 0 0 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 2 --cold-disk"), 180,
        "weights on a cold disk: layer extents read with O_DIRECT into pinned staging (disk bound)", expect_s=150),
    Row("opt-13b-cpu-weights-cpu-attn", "facebook/opt-13b", _f(OPT13_CPU + " --cpu-cache-compute"), 150,
        "cache on the GPU: the flag has nothing to do; should match opt-13b-cpu-weights", expect_s=45),
    Row("opt-6.7b-cpu-cache-shared-prefix", "facebook/opt-6.7b", _f(OPT67_CPU_CACHE + " --shared-prefix 448"), 120,
        "prompts sharing 448 of 512 tokens, cache on the CPU: the prefix over the link for one row a part",
        expect_s=25),
    Row("opt-6.7b-cpu-cache-whole-prompts", "facebook/opt-6.7b", _f(OPT67_CPU_CACHE + " --shared-prefix 448 "
        "--no-share-prefix"), 150, "the same prompts computed and read whole (35 GB of cache over the link a step)",
        expect_s=60),
]

# The same rows on tiny checkpoints (written by the suite), on the CPU: same names, flags scaled down; OPT-175B's
# row as OPT-125M's dummy weights through the 4-bit hook. The FlexGen twins ask for OPT-125M (FlexGen stops at
# CUDA here, having built its tokenizer and checked its config).
_SMOKE = {
    "opt-1.3b-gpu-bs64": ("tiny-opt", "--percent 100 0 100 0 100 0 --gpu-batch-size 8"),
    "opt-13b-cpu-weights": ("tiny-opt", "--percent 0 100 100 0 100 0 --gpu-batch-size 4 --num-gpu-batches 2"),
    "opt-13b-cpu-weights-compress": ("tiny-opt", "--percent 0 100 100 0 100 0 --gpu-batch-size 4 "
                                     "--num-gpu-batches 2 --compress-weight"),
    "opt-30b-16gib-auto": ("tiny-opt", "--policy auto --gpu-mem 1MiB --num-prompts 8"),
    "opt-175b-4bit-24gib": ("facebook/opt-125m", "--percent 0 100 100 0 100 0 --compress-weight --compress-cache "
                            "--gpu-batch-size 4"),
    "llama-3-70b-4bit-24gib": ("tiny-llama", "--percent 0 100 100 0 100 0 --compress-weight --gpu-batch-size 4 "
                               "--num-gpu-batches 2"),
    "opt-13b-4bit-gpu": ("tiny-opt", "--percent 100 0 100 0 100 0 --compress-weight --gpu-batch-size 4 "
                         "--num-gpu-batches 2"),
    "llama-2-7b-cpu-cache-cpu-attn": ("tiny-llama", "--percent 100 0 0 100 100 0 --cpu-cache-compute "
                                      "--gpu-batch-size 4 --num-gpu-batches 2"),
    "llama-2-7b-cpu-attn-and-link": ("tiny-llama", "--percent 100 0 0 100 100 0 --cpu-cache-compute "
                                     "--cpu-attention-percent 50 --gpu-batch-size 4 --num-gpu-batches 2"),
    "opt-13b-auto": ("tiny-opt", "--policy auto --num-prompts 8"),
    "opt-1.3b-auto": ("tiny-opt", "--policy auto --num-prompts 16"),
    "opt-6.7b-act-cpu": ("tiny-opt", "--percent 100 0 100 0 0 100 --gpu-batch-size 4 --num-gpu-batches 2"),
    "opt-6.7b-cpu-weights-cpu-cache": ("tiny-opt", "--percent 0 100 0 100 100 0 --gpu-batch-size 4 "
                                       "--num-gpu-batches 2"),
    "opt-6.7b-disk-weights-cold": ("tiny-opt", "--percent 0 0 100 0 100 0 --gpu-batch-size 4 --num-gpu-batches 2 "
                                   "--cold-disk"),
    "opt-13b-cpu-weights-cpu-attn": ("tiny-opt", "--percent 0 100 100 0 100 0 --gpu-batch-size 4 "
                                     "--num-gpu-batches 2 --cpu-cache-compute"),
    "opt-6.7b-cpu-cache-shared-prefix": ("tiny-opt", "--percent 100 0 0 100 100 0 --gpu-batch-size 4 "
                                         "--num-gpu-batches 2 --shared-prefix 24"),
    "opt-6.7b-cpu-cache-whole-prompts": ("tiny-opt", "--percent 100 0 0 100 100 0 --gpu-batch-size 4 "
                                         "--num-gpu-batches 2 --shared-prefix 24 --no-share-prefix"),
}
SMOKE_ROWS = []
for _row in GPU_ROWS:
    _model, _flags = _SMOKE[_row.name]
    SMOKE_ROWS.append(Row(
        _row.name, _model, [*_f(_flags), "--device", "cpu+link"], 30, _row.note,  # cpu+link: the GPU's copies
        flexgen=_f("--percent 100 0 100 0 100 0 --gpu-batch-size 4") if _row.flexgen else None,
        expect_s=3, flexgen_expect_s=4, prompt_len=32, gen_len=4, flexgen_model="facebook/opt-125m",
        flexgen_after=_row.flexgen_after))

# --cpu-smoke without --rows: one row per code path of the suite (the others add only engine paths, which the
# test suite covers), so that a smoke stays within 90 s on two cores
SMOKE_DEFAULT = ["opt-1.3b-gpu-bs64", "opt-13b-cpu-weights", "opt-13b-cpu-weights-compress", "opt-30b-16gib-auto",
                 "opt-175b-4bit-24gib", "llama-2-7b-cpu-attn-and-link", "llama-3-70b-4bit-24gib",
                 "llama-2-7b-cpu-cache-cpu-attn", "opt-6.7b-disk-weights-cold"]

TINY = {  # HF configs of the smoke checkpoints
    "tiny-opt": {"model_type": "opt", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "ffn_dim": 512, "vocab_size": 2048, "max_position_embeddings": 256, "word_embed_proj_dim": 128,
                 "do_layer_norm_before": True, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1},
    "tiny-llama": {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 2048,
                   "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                   "bos_token_id": 1, "eos_token_id": 2},
}


def select_rows(rows: list[Row], patterns: str | None) -> list[Row]:
    if not patterns:
        return list(rows)
    chosen: list[Row] = []
    for pattern in patterns.split(","):
        matched = [r for r in rows if fnmatch.fnmatch(r.name, pattern.strip()) and r not in chosen]
        if not matched and not any(fnmatch.fnmatch(r.name, pattern.strip()) for r in rows):
            raise SystemExit(f"--rows: {pattern!r} matches no row; rows: {', '.join(r.name for r in rows)}")
        chosen += matched
    return chosen


def write_tiny_checkpoint(name: str, folder: Path) -> Path:
    """A random checkpoint of TINY[name] (config.json + model.safetensors), made without transformers."""
    import torch
    from safetensors.torch import save_file

    from flexgen_lite.models.hf_config import config_from_dict
    from flexgen_lite.models.specs import layer_specs

    path = folder / name
    if (path / "model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY[name]))
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    tensors = {}
    for layer in layer_specs(config_from_dict(TINY[name], name=name)):
        for spec in layer.weights:
            if "norm" in spec.name and spec.name.endswith("weight"):
                tensors[spec.hf_name] = torch.ones(spec.shape)
            else:
                tensors[spec.hf_name] = torch.randn(spec.shape, generator=gen) * 0.05
    save_file(tensors, str(path / "model.safetensors"))
    return path


# ---- fast dummy weights (in the bench row's process) ---------------------------------------------------------
_placing = threading.local()  # the dtype of the 4-bit matrix being placed now, else None
FAST_STATS = {"tile_tensors": 0, "code_tensors": 0, "code_bytes": 0}


def fast_dummy_weights() -> None:
    """Patch flexgen_lite.engine.weights (and weight_sources.DummySource): matrices from one random tile, 4-bit
    matrices from one byte tile (see the module docstring); 1-D tensors as the bench makes them. Where the engine's
    placement changes so that the 4-bit hook is not reached, weights are quantized as before (slower, same
    result)."""
    import torch

    from flexgen_lite.engine import weight_sources, weights
    from flexgen_lite.kernels import compression

    tile = torch.empty(1 << 24).normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    exact, place, quantized_rows, to_bytes = (weight_sources.DummySource.read, weights.place_tensor,
                                              weights.quantized_rows, weights.to_bytes)
    place_sig = inspect.signature(place)

    def read(self, spec, start: int, stop: int):
        if len(spec.shape) < 2:
            return exact(self, spec, start, stop)
        shape = (stop - start, *spec.shape[1:])
        dtype = getattr(_placing, "dtype", None)
        if dtype is not None:  # stands for values fast_quantized_rows below never reads
            return torch.zeros((), dtype=dtype).expand(shape)
        FAST_STATS["tile_tensors"] += 1
        n, offset = math.prod(shape), zlib.crc32(f"{spec.hf_name}:{start}".encode()) % tile.numel()
        if offset + n <= tile.numel():
            return tile[offset:offset + n].view(shape)
        out, done = torch.empty(n), 0
        while done < n:
            k = min(n - done, tile.numel() - offset)
            out[done:done + k] = tile[offset:offset + k]
            done, offset = done + k, 0
        return out.view(shape)

    def place_tensor(*args, **kwargs):
        bound = place_sig.bind(*args, **kwargs)
        compressed = bound.arguments.get("compression") is not None and bound.arguments.get("compressible")
        _placing.dtype = bound.arguments["dtype"] if compressed else None  # weights.compressed_matrix
        try:
            return place(*args, **kwargs)
        finally:
            _placing.dtype = None

    def fast_quantized_rows(spec, source, dtype, config):
        if getattr(_placing, "dtype", None) is None:
            return quantized_rows(spec, source, dtype, config)
        nbytes = compression.compressed_nbytes(spec.shape, config)
        start = (zlib.crc32(repr(tuple(spec.shape)).encode()) % (1 << 20)) * 2  # even: fp16 stays aligned
        flat = _byte_tile(torch, start + nbytes)[start:start + nbytes]
        q = compression.from_bytes(flat, tuple(spec.shape), config)
        q.suite_flat = flat  # to_bytes hands these bytes on as they are
        FAST_STATS["code_tensors"] += 1
        FAST_STATS["code_bytes"] += nbytes
        return q

    def fast_to_bytes(q):
        flat = getattr(q, "suite_flat", None)
        return flat if flat is not None else to_bytes(q)

    weight_sources.DummySource.read = read
    weights.place_tensor = place_tensor
    weights.quantized_rows = fast_quantized_rows
    weights.to_bytes = fast_to_bytes


_tiles: list = []


def _byte_tile(torch, need: int):
    """At least `need` bytes that read as 4-bit codes anywhere and, at even offsets, as fp16 values in
    [2^-9, 2^-8) (small positive scales and minima): random low bytes, high bytes 0x18..0x1b. 16 MiB drawn,
    repeated; grown (by a quarter more than asked) when a larger matrix comes."""
    if not _tiles:
        part = torch.randint(0, 256, (1 << 24,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        part[1::2] = 0x18 | (part[1::2] & 0x03)
        _tiles[:] = [part, part]
    part, tile = _tiles
    if tile.numel() < need:
        tile = part.repeat(-(-need * 5 // 4 // part.numel()))
        _tiles[1] = tile
    return tile


def report_fast_stats() -> None:
    """On stderr, at exit of a bench row: how its dummy weights were made."""
    print(f"suite dummy weights: {FAST_STATS['tile_tensors']} matrices from the random tile, "
          f"{FAST_STATS['code_tensors']} 4-bit matrices ({FAST_STATS['code_bytes'] / GB:.2f} GB) from the byte tile",
          file=sys.stderr)
