"""What the cost model and the memory plan read: a model, workload, policy shape and machine (`Setup`), and
where the policy puts weights, KV cache and activations as the engine sees it (`Layout`: exact for a policy,
continuous for the LP)."""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from dataclasses import dataclass

from ..engine.block import common_prefix
from ..engine.cache_attention import codes_attended, device_codes_attended
from ..engine.kv_cache import cache_bytes_per_token
from ..engine.policy import Policy, PolicyError, host_attended_rows, split_counts
from ..engine.storage import TIERS, page_aligned
from ..engine.weights import DECODER_KINDS, compressed_matrix, in_8_bits, stored_nbytes, weight_tiers
from ..kernels.int8_weight import int8_nbytes
from ..models.config import ModelConfig
from ..models.specs import LayerSpec, WeightSpec, layer_specs
from ..system.hardware import HardwareProfile
from .dtype_choice import compute_dtype


@dataclass(frozen=True)
class Workload:
    """What will be generated: prompt and generation length, how many prompts (None: one block), and how many
    tokens every prompt begins with (an instruction: computed once per block where the policy shares them)."""

    prompt_len: int
    gen_len: int
    num_prompts: int | None = None
    shared_len: int = 0

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.gen_len < 1 or (self.num_prompts is not None and self.num_prompts < 1):
            raise PolicyError(f"workload lengths and prompt count must be positive, got {self}")
        if not 0 <= self.shared_len < self.prompt_len:
            raise PolicyError(f"a shared prefix must be shorter than the prompts, got {self}")

    @classmethod
    def of_prompts(cls, prompts: list[list[int]], gen_len: int) -> Workload:
        """The workload of generating gen_len tokens for these token-id prompts."""
        shared = common_prefix(prompts) if len(prompts) > 1 else 0
        return cls(max(len(p) for p in prompts), gen_len, len(prompts), shared)

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.gen_len


_SPECS: dict[int, tuple] = {}


def _model_specs(config: ModelConfig) -> tuple[list[LayerSpec], list[tuple[WeightSpec, int]], set[str]]:
    """Layer specs, the stored weights (tied ones once) grouped by shape: (one of them, how many), and the names of
    those compression rounds."""
    hit = _SPECS.get(id(config))
    if hit is None or hit[0] is not config:
        specs = layer_specs(config)
        unique = {w.hf_name: (compressed_matrix(layer.kind, w), w) for layer in specs for w in layer.weights}.values()
        count = Counter((rounded, w.shape) for rounded, w in unique)  # decoder matrices alone are compressed
        first = {(rounded, w.shape): w for rounded, w in unique}
        compressible = {w.hf_name for rounded, w in unique if rounded}
        hit = _SPECS[id(config)] = (config, specs, [(first[key], n) for key, n in count.items()], compressible)
    return hit[1], hit[2], hit[3]


@dataclass(frozen=True)
class Regime:
    cache_direct: bool  # every cache part attended where it lives (no load into a cache slot)


class Setup:
    """A model, workload, policy shape (batches, switches, dtype) and machine: what every cost reads."""

    def __init__(self, config: ModelConfig, workload: Workload, policy: Policy, hw: HardwareProfile | None,
                 disk_cached: bool = True, cuda: bool | None = None) -> None:
        """hw may be None for memory alone; then `cuda` says whether the compute tier is a GPU."""
        self.config, self.workload, self.policy, self.hw = config, workload, policy, hw
        self.cuda, self.disk_cached = (hw.is_cuda if hw is not None else bool(cuda)), disk_cached
        self.dtype = compute_dtype(policy, "cuda" if self.cuda else "cpu")
        self.dname, self.e = str(self.dtype).removeprefix("torch."), self.dtype.itemsize
        self.cpu_dtype = policy.cpu_attention_dtype(self.dtype, hw, config.num_heads // config.num_kv_heads,
                                                    config.head_dim) or self.dtype  # of CPU-attended parts
        self.specs, self.groups, self.compressible = _model_specs(config)
        self.kinds = {s.kind: s for s in self.specs}  # one layer of each kind: decoder layers are alike
        routed = [s for s in self.specs if s.kind == "mlp" and config.routed(s.index)]
        if routed:  # a MoE's MLPs are costed as its routed ones (most of them)
            self.kinds["mlp"] = routed[0]
        # a head weight tied to the embedding's: its slot still holds it (WeightSlots), so it moves once
        self.tied = {w.hf_name for w in self.kinds["embed"].weights} & {w.hf_name for w in self.kinds["head"].weights}
        self.wcomp, self.ccomp = policy.weight_compression(), policy.cache_compression()
        self.gbs, self.nb, self.n = policy.gpu_batch_size, policy.num_gpu_batches, policy.block_size
        self.cpu_rows = 0 if self.cuda else self.gbs  # weights.in_8_bits
        c = config
        self.seq_layer = cache_bytes_per_token(1, c.num_kv_heads, c.head_dim, self.dtype, self.ccomp)  # k+v
        self.seq_layer_dense = 2 * c.num_kv_heads * c.head_dim * self.e
        self.cached = c.cached_length(workload.max_len)  # positions a sequence keeps over all layers (rings: windows)
        self.threads = 3 if policy.overlap else 1  # IOPool workers: at most this many stores staged at once
        self._bytes: dict[str, int] = {}  # tensor_bytes by checkpoint name (a search asks millions of times)

    def compressed(self, spec: WeightSpec) -> bool:
        """As weights.matrix_compression: the decoder layers' matrices, when weights are compressed."""
        return self.wcomp is not None and spec.hf_name in self.compressible

    def tensor_bytes(self, spec: WeightSpec) -> int:
        """Bytes of a weight as stored (4-bit codes when compressed; on a CPU the embedding and head then in 8
        bits), as weights.place_tensor stores it."""
        found = self._bytes.get(spec.hf_name)
        if found is None:
            if in_8_bits(spec, self.wcomp, self.cpu_rows, self.dtype):
                found = int8_nbytes(spec.shape)
            else:
                found = stored_nbytes(spec.shape, self.dtype, self.wcomp if self.compressed(spec) else None)
            self._bytes[spec.hf_name] = found
        return found


_LAYOUTS: dict[tuple, tuple] = {}  # _weight_layout's answers: a search asks for the same few placements many times


def _weight_layout(s: Setup, percents: tuple) -> tuple[dict, dict, dict, dict]:
    """Of a weight placement (`percents`) in Setup `s`: each (kind, weight name)'s shares of its layers on each
    tier, the bytes placed on each tier, and the counts of WeightSlots keys (kind, index % 2, name) and of their
    codes slots, as the engine makes them. Memoized on what they depend on (the model, the shares, the dtype, the
    compression, the device, the rows that keep an 8-bit head)."""
    key = (id(s.specs), percents, s.dtype, s.wcomp, s.cuda, s.cpu_rows)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    tiers = weight_tiers(s.specs, percents, s.dtype, s.wcomp)
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    slot_sets: dict[tuple[str, str], set] = defaultdict(set)  # WeightSlots keys (kind, index % 2, name)
    code_sets: dict[tuple[str, str], set] = defaultdict(set)  # their "codes" slots (4-bit, across the link)
    for layer in s.specs:
        for spec in layer.weights:
            tier = tiers[spec.hf_name]
            counts[layer.kind, spec.name][tier] += 1
            if layer.kind == "head" and spec.hf_name in s.tied:
                continue
            if tier == "disk" and not s.cuda and not s.compressed(spec):
                slot_sets[layer.kind, spec.name].add("mapped")  # one layer's pages mapped at a time
            elif s.compressed(spec) or not (tier == "gpu" or (tier == "cpu" and not s.cuda)):
                slot_sets[layer.kind, spec.name].add(layer.index % 2)
            if s.cuda and s.compressed(spec) and tier != "gpu":
                code_sets[layer.kind, spec.name].add(layer.index % 2)
    placed = dict.fromkeys(TIERS, 0)
    for spec in {w.hf_name: w for layer in s.specs for w in layer.weights}.values():
        tier, nbytes = tiers[spec.hf_name], s.tensor_bytes(spec)
        placed[tier] += page_aligned(nbytes) if tier == "disk" else nbytes
    found = ({name: tuple(c[t] / c.total() for t in TIERS) for name, c in counts.items()}, placed,
             {k: len(v) for k, v in slot_sets.items()}, {k: len(v) for k, v in code_sets.items()})
    if len(_LAYOUTS) > 256:
        _LAYOUTS.clear()
    _LAYOUTS[key] = found
    return found


class Layout:
    """Where things live, as the engine sees them: per weight name of a layer kind the share of its layers
    holding it on (gpu, cpu, disk), weight bytes per tier, block sequences and GPU batches per tier.
    `of_policy` is exact; `linear` is continuous for the LP."""

    def __init__(self, s: Setup, weight, placed, cache_rows, act_batches, exact: Policy | None = None,
                 slot_sets: dict | None = None, code_sets: dict | None = None) -> None:
        self.s, self.weight, self.placed = s, weight, placed
        self.cache_rows, self.act_batches, self.exact, self.slot_sets = cache_rows, act_batches, exact, slot_sets
        self.code_sets = code_sets

    @classmethod
    def of_policy(cls, s: Setup, p: Policy) -> Layout:
        shares, placed, slot_sets, code_sets = _weight_layout(s, tuple(p.percents("weight")))
        return cls(s, lambda kind, spec: shares[kind, spec.name], placed, split_counts(s.n, p.percents("cache")),
                   split_counts(s.nb, p.percents("act")), p, slot_sets, code_sets)
    @classmethod
    def linear(cls, s: Setup, x) -> Layout:
        """x = (wg, wc, cg, cc, hg, hc): shares of decoder weight bytes, block sequences and GPU batches
        (the embedding and head are in compute memory, as weights.weight_tiers places them)."""
        wg, wc, cg, cc, hg, hc = x
        ends = sum(s.tensor_bytes(sp) for k in s.kinds if k not in DECODER_KINDS for sp in s.kinds[k].weights
                   if not (k == "head" and sp.hf_name in s.tied))
        decoder = sum(n * s.tensor_bytes(sp) for sp, n in s.groups) - ends
        placed = dict(zip(TIERS, (ends + wg * decoder, wc * decoder, (1 - wg - wc) * decoder), strict=True))
        return cls(s, lambda kind, spec: (wg, wc, 1 - wg - wc) if kind in DECODER_KINDS else (1.0, 0.0, 0.0),
                   placed, (cg * s.n, cc * s.n, (1 - cg - cc) * s.n), (hg * s.nb, hc * s.nb, (1 - hg - hc) * s.nb))

    def resident(self, kind: str, spec: WeightSpec) -> float:
        """The share of a weight name's layers that use it where it lives (weights.place_tensor decides)."""
        if self.s.compressed(spec):
            return 0.0
        g, c, _ = self.weight(kind, spec)
        return g if self.s.cuda else g + c

    def weight_slots(self, kind: str, spec: WeightSpec) -> float:
        """Weight slot buffers of a name: two for decoder layers (this layer and the next), one for embed
        and head, if any layer needs one; continuous in the LP."""
        if self.slot_sets is not None:
            return self.slot_sets.get((kind, spec.name), 0)
        if kind == "head" and spec.hf_name in self.s.tied:
            return 0.0
        sets = min(2, self.s.config.num_layers) if kind in DECODER_KINDS else 1
        g, c, d = self.weight(kind, spec)
        if not self.s.cuda and not self.s.compressed(spec):  # disk pages mapped one layer at a time
            return d  # exactly 1 per name with any layer on disk (slot_sets); d keeps the LP linear
        return sets * (1 - self.resident(kind, spec))

    def code_slots(self, kind: str, spec: WeightSpec) -> float:
        """Slots a name's 4-bit codes cross the link into before decompression (CUDA, compressed weights off
        the GPU): one per parity of a layer that needs one; continuous in the LP."""
        if not (self.s.cuda and self.s.compressed(spec)):
            return 0.0
        if self.code_sets is not None:
            return self.code_sets.get((kind, spec.name), 0)
        _, c, d = self.weight(kind, spec)
        return (min(2, self.s.config.num_layers) if kind in DECODER_KINDS else 1) * (c + d)

    def cache_parts(self) -> list[tuple[str, float, bool]]:
        """(tier, block sequences, attended on the CPU beside a GPU) of the cache, as kv_cache.batch_parts splits
        it: with CPU attention the cpu tier's sequences in two (Policy.cpu_attention_percent) and disk's on the CPU."""
        s, (gpu, cpu, disk) = self.s, self.cache_rows
        if not (s.cuda and s.policy.cpu_cache_compute):
            return [("gpu", gpu, False), ("cpu", cpu, False), ("disk", disk, False)]
        attended = self.host_attended() if self.exact is not None else cpu * s.policy.cpu_attention_percent / 100
        return [("gpu", gpu, False), ("cpu", attended, True), ("cpu", cpu - attended, False), ("disk", disk, True)]

    def host_attended(self) -> int | None:
        """An exact layout's cpu-tier sequences the CPU attends, as KVCache counts them (host_attended_rows)."""
        p = self.s.policy
        return host_attended_rows(self.cache_rows[1], p.cpu_attention_percent if p.cpu_cache_compute else None)

    def part_direct(self, tier: str, on_cpu: bool) -> bool:
        """As kv_cache.KVCache._alloc decides (on_cpu: attended on the CPU beside a GPU)."""
        s = self.s
        if s.ccomp is not None:  # its codes attended as stored where a CPU attends it (not in a file), or a GPU's
            return ((self.codes_attended and (not s.cuda or (tier == "cpu" and on_cpu)))
                    or (tier == "gpu" and self.device_codes_attended))
        return tier == "gpu" or not s.cuda or (tier == "cpu" and on_cpu)

    @functools.cached_property
    def codes_attended(self) -> bool:
        return codes_attended(self.s.config, self.s.policy)

    @functools.cached_property
    def device_codes_attended(self) -> bool:
        s = self.s
        return s.cuda and device_codes_attended(s.config, s.policy, "cuda", s.dtype)

    def part_mapped(self, tier: str) -> bool:
        """A disk part a CPU uses in place through a memory map: its pages count like a cache slot."""
        return tier == "disk" and not self.s.cuda
