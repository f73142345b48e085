"""The offloading policy: where weights, KV cache and activations live, and how batches are blocked."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from ..kernels.compression import CompressionConfig


class PolicyError(ValueError):
    """A policy that cannot be run; the message names the bad field."""


WEIGHT_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 64
HALF_KEPT = 0.9  # fp16 CPU attention this close to bf16's rate: the fp16 cache kept (cpu_attention_dtype)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Policy:
    """FlexGen's policy. Percentages split each kind of tensor over gpu / cpu / disk (disk = rest).

    "gpu" is the compute device's memory: the GPU when CUDA is present, else host RAM.
    """

    gpu_batch_size: int = 8
    num_gpu_batches: int = 1
    weight_gpu_percent: float = 100.0
    weight_cpu_percent: float = 0.0
    cache_gpu_percent: float = 100.0
    cache_cpu_percent: float = 0.0
    act_gpu_percent: float = 100.0
    act_cpu_percent: float = 0.0
    overlap: bool = True
    pin_weight: bool = True
    offload_dir: str = ""  # empty: a fresh directory under the system temp dir
    dtype: str = ""  # empty: float16 on CUDA; on a CPU bfloat16 where measured faster, else float32
    cpu_cache_compute: bool = False
    cpu_attention_percent: float = 100.0  # of the cpu tier's sequences, attended on the CPU; the rest cross the link
    attn_sparsity: float = 1.0
    compress_weight: bool = False
    compress_cache: bool = False
    weight_group_dim: int = 1  # 1: groups along the input dimension; 0: along the output one (FlexGen)
    weight_group_size: int = 0  # values per group; 0: 64, or 32 for a GGUF's Q4_0 / Q4_1 weights (kept as stored)
    share_prefix: bool = True  # a block's common prompt prefix computed once in the prefill (block.shared_columns)

    def __post_init__(self) -> None:
        if self.offload_dir.startswith("~"):  # as a shell would (the API's callers have none)
            object.__setattr__(self, "offload_dir", os.path.expanduser(self.offload_dir))
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PolicyError(f"{name} must be a positive integer, got {value!r}")
        for kind in ("weight", "cache", "act"):
            gpu, cpu = getattr(self, f"{kind}_gpu_percent"), getattr(self, f"{kind}_cpu_percent")
            for side, value in (("gpu", gpu), ("cpu", cpu)):
                if not 0 <= value <= 100:
                    raise PolicyError(f"{kind}_{side}_percent must be within 0..100, got {value}")
            if gpu + cpu > 100 + 1e-9:
                raise PolicyError(
                    f"{kind}_gpu_percent + {kind}_cpu_percent = {gpu + cpu} exceeds 100 (disk gets the rest)"
                )
        if self.dtype and self.dtype not in DTYPES:
            raise PolicyError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.weight_group_dim not in (0, 1):
            raise PolicyError(f"weight_group_dim must be 0 or 1, got {self.weight_group_dim}")
        if self.weight_group_size not in (0, *WEIGHT_GROUP_SIZES):
            raise PolicyError(f"weight_group_size must be one of {WEIGHT_GROUP_SIZES}, got {self.weight_group_size!r}")
        if not 0 <= self.cpu_attention_percent <= 100:
            raise PolicyError(f"cpu_attention_percent must be within 0..100, got {self.cpu_attention_percent}")
        if self.cpu_attention_percent != 100 and not self.cpu_cache_compute:
            raise PolicyError("cpu_attention_percent splits the CPU's share of attention: it needs cpu_cache_compute")
        if not 0 < self.attn_sparsity <= 1:
            raise PolicyError(f"attn_sparsity must be within (0, 1], got {self.attn_sparsity}")

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    def percents(self, kind: str) -> tuple[float, float, float]:
        """(gpu, cpu, disk) percentages for 'weight', 'cache' or 'act'."""
        gpu, cpu = getattr(self, f"{kind}_gpu_percent"), getattr(self, f"{kind}_cpu_percent")
        return gpu, cpu, max(0.0, 100.0 - gpu - cpu)

    def weight_compression(self) -> CompressionConfig | None:
        """4-bit groups of 64 (weight_group_size) along the input dimension.

        FlexGen groups weights along the output dimension; on SmolLM2-135M that flipped the top token of
        5 of 6 prompts (KL 1.11 to the uncompressed logits) where input-dimension groups, as llama.cpp
        and GPTQ use, kept all 6 (KL 0.30). Set weight_group_dim=0 for FlexGen's choice."""
        if not self.compress_weight:
            return None
        return CompressionConfig(bits=4, group_size=self.weight_group_size or DEFAULT_GROUP_SIZE,
                                 group_dim=self.weight_group_dim)

    def cache_compression(self) -> CompressionConfig | None:
        """4-bit groups of 64 along head_dim (FlexGen's setting)."""
        return CompressionConfig(bits=4, group_size=64, group_dim=-1) if self.compress_cache else None

    def cpu_attention_dtype(self, compute_dtype: torch.dtype, hw=None, group: int = 1,
                            head_dim: int = 128) -> torch.dtype | None:
        """Dtype of CPU attention and of the cache parts it reads (None when off): the compute dtype. For float16
        the same (exact) where the profile `hw` measured the CPU's fp16 attention, at this grouping of heads, at
        HALF_KEPT of its bf16 rate or more; else bfloat16 (rounded once when stored), which a CPU without fast
        fp16 conversions, or with bf16 dot products, attends faster."""
        if not self.cpu_cache_compute:
            return None
        if compute_dtype != torch.float16:
            return compute_dtype
        try:
            half, bf16 = (hw.decode_attention(d, group, head_dim, on_cpu=True)[1] for d in ("float16", "bfloat16"))
        except (AttributeError, KeyError, TypeError):  # no profile, or none of these rates in it
            return torch.bfloat16
        return torch.float16 if half >= HALF_KEPT * bf16 else torch.bfloat16

    def flags(self) -> str:
        """The policy as command-line flags, ready to paste."""
        w, c, a = self.percents("weight"), self.percents("cache"), self.percents("act")
        parts = [
            f"--percent {w[0]:g} {w[1]:g} {c[0]:g} {c[1]:g} {a[0]:g} {a[1]:g}",
            f"--gpu-batch-size {self.gpu_batch_size}", f"--num-gpu-batches {self.num_gpu_batches}",
        ]
        defaults = Policy()
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("gpu_percent", "cpu_percent")) or f.name in ("gpu_batch_size", "num_gpu_batches"):
                continue
            if value == getattr(defaults, f.name) or (f.name.startswith("weight_group") and not self.compress_weight):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
            else:
                parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
        return " ".join(parts)


def host_attended_rows(cpu_rows: int, percent: float | None) -> int | None:
    """Of a block's `cpu_rows` cpu-tier sequences, how many the CPU attends: the first `percent`
    (Policy.cpu_attention_percent) of them; the rest are copied across the link each step and attended on the GPU
    meanwhile, so a step reads the host's cache at the CPU's rate and the link's together. None (percent None):
    no CPU attention."""
    return None if percent is None else round(cpu_rows * percent / 100)


def split_counts(total: int, percents: tuple[float, float, float]) -> tuple[int, int, int]:
    """Split `total` items into (gpu, cpu, disk) counts by percent, so that cumulative counts are as close
    as possible to the request."""
    gpu = round(total * percents[0] / 100)
    cpu = round(total * (percents[0] + percents[1]) / 100) - gpu
    return gpu, cpu, total - gpu - cpu
