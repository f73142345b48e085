"""What a step's matrix products cost, for the cost model (cost_model.py): dense weights at the profile's matmul
rates (an 8-bit head by its C kernel or by tiles), weights stored for a CPU's int4 kernel as int4_cost chooses, a
GPU's 4-bit matrices kept as codes where its kernel measured faster than a slot, and which decode steps the engine
runs as one C call (fused_decode) or as CUDA graphs (graph_decode), as the engine decides each."""

from __future__ import annotations

import math
from collections import Counter

from ..engine.decode_fused import config_fits, fused_wanted, fused_wins
from ..engine.decode_graph import codes_graph_wins, every_expert_wins, graphs_wanted
from ..engine.weights import DECODER_KINDS, in_8_bits
from ..kernels import int4_gemv_triton, native
from ..kernels.int4_cost import int4_cost
from ..kernels.int4_matmul import layout_fits
from ..kernels.int8_weight import GEMV_ROWS, int8_nbytes
from ..models.specs import matmuls
from ..system.hardware import interpolated_time
from .layout import Layout, Setup


def _dense_time(s: Setup, kind: str, rows: int, k: int, n: int) -> float:
    """A product by a weight in the compute dtype; the head in 8 bits (int8_weight) by its C kernel where it runs
    (a few rows: at the profile's rate, or, where it has none, reading half (bf16) or a quarter (fp32) of the
    bytes), and dequantized by tiles and multiplied dense otherwise."""
    hw = s.hw
    seconds = hw.matmul_time(s.dname, rows, k, n)
    head = next((w for w in s.kinds[kind].weights if w.name == "lm_head"), None) if kind == "head" else None
    if head is None or head.shape != (n, k) or not in_8_bits(head, s.wcomp, s.cpu_rows, s.dtype):
        return seconds
    if (measured := hw.int8_head_time(s.dname, rows, k, n)) is not None:
        return measured
    if rows <= GEMV_ROWS:
        return seconds * int8_nbytes((n, k)) / (n * k * s.e)
    return seconds + n * k / hw.dequantize[s.dname]


def fused_decode(s: Setup) -> bool:
    """Whether the engine runs this policy's decode steps' layers in one C call (engine/decode_fused.py): on a
    CPU, a Llama-family model, everything in memory (weights dense, or 4-bit for the int4 kernel), and the
    profile finding it faster than the eager schedule (`fused_wins`, as the engine decides)."""
    p = s.policy
    resident = all(p.percents(kind)[0] == 100 for kind in ("weight", "cache", "act"))
    if (s.cuda or not resident or s.ccomp is not None or p.attn_sparsity != 1 or not fused_wanted()
            or not config_fits(s.config)):
        return False
    products = []
    for kind in ("attention", "mlp"):
        for k, n, _ in matmuls(s.kinds[kind]):
            int4 = s.wcomp is not None and kernel_weight(s, kind, (n, k))
            if s.wcomp is not None and not int4:  # dequantized every step: not in memory as the kernels take it
                return False
            products.append((n, k, int4))
    return fused_wins(s.hw, s.config.family, s.dtype, s.gbs, s.nb, products)


def graph_decode(s: Setup) -> bool:
    """Whether the engine runs this policy's decode steps as CUDA graphs (engine/decode_graph.py): on CUDA, with
    everything in compute memory (an uncompressed cache; weights dense, or 4-bit where the kernel multiplies them
    as stored and the graph wins with it: codes_graph_wins), attention on the GPU over the whole cache, a MoE's
    experts each over every row where that wins."""
    p = s.policy
    resident = all(p.percents(kind)[0] == 100 for kind in ("weight", "cache", "act"))
    if not (s.cuda and resident and graphs_wanted() and s.ccomp is None and p.attn_sparsity == 1
            and not p.cpu_cache_compute and every_expert_wins(s.hw, s.config, s.dname, s.gbs)):
        return False
    if s.wcomp is None:
        return True
    # decoder layers are alike: one of each kind weighs the step as all of them do
    layers = [[spec.shape for spec in s.kinds[kind].weights if s.compressed(spec)] for kind in DECODER_KINDS]
    return (not s.config.moe and codes_kept(s, s.gbs)
            and codes_graph_wins(s.hw, s.config.family, layers, s.dname, s.gbs, s.nb))


def layer_graphed(s: Setup, kind: str) -> bool:
    """Whether the engine replays a decode step's layers of `kind` from CUDA graphs, one a layer and batch
    (engine/layer_graph.py): on CUDA, hidden states in GPU memory, every position attended, weights in slots or
    resident as tensors (not a GPU's 4-bit codes kept as stored); an MLP of a dense model; an attention layer over a
    cache all in GPU memory, uncompressed, attended there."""
    p = s.policy
    if not (s.cuda and graphs_wanted() and p.attn_sparsity == 1 and p.percents("act")[0] == 100):
        return False
    if codes_kept(s, s.gbs) and p.percents("weight")[0] > 0:
        return False  # layers homed in GPU memory keep codes (eager products); priced as all of them
    if kind == "mlp":
        return not s.config.moe
    return (kind == "attention" and p.percents("cache")[0] == 100 and s.ccomp is None
            and not p.cpu_cache_compute)


def kernel_weight(s: Setup, kind: str, shape: tuple[int, ...]) -> bool:
    """Whether the engine stores a weight of `shape` in a layer of `kind` for the kernel (place_tensor's
    rule: a compressed decoder matrix the layout fits, on a CPU), and the profile has the kernel's rates in the
    compute dtype."""
    return (not s.cuda and kind in DECODER_KINDS and layout_fits(shape, s.wcomp)
            and s.hw is not None and s.hw.multiplies_int4_layout(s.dname))


def expert_rows(rows: int, share: float) -> int:
    """The rows a weight multiplies of a layer's `rows`: a routed expert's top-k / experts of them, evenly spread."""
    return rows if share == 1 else max(1, math.ceil(rows * share))


def products_time(s: Setup, kind: str, rows: int, nb: int, linears=None, codes: float = 0.0,
                  graphed: bool = False) -> tuple[float, float]:
    """(matmul seconds, dequantization seconds) of `nb` GPU batches' products in a layer of `kind`, `rows` rows
    each: dense weights at the profile's matmul rate (`_dense_time`); weights stored for the CPU's int4 kernel
    multiplied as stored, by tiles, or dequantized once in the compute thread and multiplied dense, as
    int4_path chooses (int4_cost); the `codes` share of a GPU's 4-bit matrices kept as codes (codes_kept) by the
    kernel where it wins (`codes_win`; in a CUDA graph, `graphed`, always). linears: `matmuls` of the layer's
    weights (a CUDA graph's: every expert)."""
    matmul, dequantize = 0.0, 0.0
    compressed = {(spec.shape[1], spec.shape[0]) for spec in s.kinds[kind].weights if s.compressed(spec)} \
        if codes else set()  # read only where a step keeps codes: not on every plan the search prices
    for (k, n, share), count in Counter(matmuls(s.kinds[kind]) if linears is None else linears).items():
        m = expert_rows(rows, share)
        if kernel_weight(s, kind, (n, k)):  # alike products (a mixture's experts) priced once, times their count
            cost = int4_cost(s.hw, s.dname, m, nb, k, n)
            matmul, dequantize = matmul + count * cost.matmul, dequantize + count * cost.dequantize
        elif codes and (k, n) in compressed and (graphed or codes_win(s, m, k, n, nb)):
            dense = _dense_time(s, kind, m, k, n)
            points = codes_points(s)  # unmeasured (a graph's step runs it still): as dense
            kernel = interpolated_time(points, m, k, n) if points else dense
            matmul += count * nb * (codes * kernel + (1 - codes) * dense)
        else:
            matmul += count * nb * _dense_time(s, kind, m, k, n)
    return matmul, dequantize


def codes_kept(s: Setup, rows: int) -> bool:
    """Whether a decode step of `rows` rows keeps the 4-bit decoder matrices in compute memory as codes
    (WeightSlots: each product by the kernel where it measured faster than its slot, `codes_win`): a GPU's for
    Triton's kernel where the plan counts on it (int4_gemv_triton.planned); a CPU's in FlexGen's grouping for the
    C kernel (its rates in the profile: row_groups_gemv)."""
    if s.wcomp is None:
        return False
    if not s.cuda:
        return (s.wcomp.group_dim == 0 and s.wcomp.bits == 4 and rows <= native.ROW_GROUP_ROWS
                and bool((s.hw.row_groups_gemv or {}).get(s.dname)))
    return (rows <= int4_gemv_triton.GEMV_ROWS and int4_gemv_triton.layout_fits(s.wcomp, s.dtype)
            and int4_gemv_triton.planned())


def codes_points(s: Setup) -> list | None:
    """The profile's (rows, FLOP/s, fixed s) of the products by codes kept (codes_kept): Triton's on a GPU, the C
    kernel for FlexGen's grouping on a CPU."""
    return ((s.hw.int4_gemv if s.cuda else s.hw.row_groups_gemv) or {}).get(s.dname)


def codes_share(s: Setup, lay: Layout, kind: str) -> float:
    """The share (by bytes) of a decoder layer's 4-bit matrices in compute memory (a GPU's; a CPU's RAM), which a
    decode step keeping codes multiplies as stored or dequantizes in the compute stream (codes_kept); 0 where it
    does not keep them."""
    if kind not in DECODER_KINDS or not codes_kept(s, s.gbs):
        return 0.0
    if s.config.num_layers <= 2 and not graph_decode(s):
        return 0.0  # a model of two layers or fewer keeps each one's matrices dequantized in its own slots
    specs = [spec for spec in s.kinds[kind].weights if s.compressed(spec)]
    total = sum(s.tensor_bytes(spec) for spec in specs)
    in_memory = (lambda g, c, d: g) if s.cuda else (lambda g, c, d: g + c)  # a CPU's RAM tiers both
    return sum(in_memory(*lay.weight(kind, spec)) * s.tensor_bytes(spec) for spec in specs) / total if total else 0.0


def codes_win(s: Setup, rows: int, k: int, n: int, uses: int) -> bool:
    """Whether products of `rows` rows by a 4-bit matrix (n, k) kept as codes run the kernel: a step's `uses`
    products (one per GPU batch) at its measured time (codes_points) under one dequantization into the slot
    and `uses` dense products, as the engine measures the two (int4_gemv_triton.CodesMatrix; the slot is filled
    once a step and both contend for the same memory); the slot wins where it is not measured, and the matrix is
    then dequantized beside compute as before (WeightSlots)."""
    points = codes_points(s)
    if not points or rows > points[-1][0]:
        return False
    slot = uses * s.hw.matmul_time(s.dname, rows, k, n) + n * k / s.hw.dequantize[s.dname]
    return uses * interpolated_time(points, rows, k, n) < slot
