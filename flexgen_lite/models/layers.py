"""The math of each layer kind, as pure functions of (weights, inputs, config).

`w` maps canonical weight names to tensors on the compute device. Attention over the cache lives in
`kernels/attention.py`; here are the projections, norms, positions and MLP around it.
"""

from __future__ import annotations

import math
from itertools import accumulate

import torch
import torch.nn.functional as F

from ..kernels import elementwise, native
from ..kernels.int4_gemv_triton import CodesMatrix
from ..kernels.int4_matmul import Int4Weight, codes_gemv_wins, native_agrees
from ..kernels.int8_weight import Int8Weight
from ..kernels.small_matmul import gemv_wins, head_product
from ..kernels.small_matmul import linears as dense_linears
from .config import ModelConfig


def norm(x: torch.Tensor, w: dict, config: ModelConfig, name: str = "norm") -> torch.Tensor:
    if config.norm_offset:  # Gemma: x normalised, times (offset + weight), in fp32
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + config.norm_eps)
        return (xf * (config.norm_offset + w[f"{name}.weight"].float())).to(x.dtype)
    if config.norm == "rmsnorm":
        return rms_norm(x, w[f"{name}.weight"], config.norm_eps)
    return F.layer_norm(x, (x.shape[-1],), w[f"{name}.weight"], w.get(f"{name}.bias"), config.norm_eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm over x's last dim."""
    out = elementwise.rms_norm(x, weight, eps) if x.device.type == "cpu" else None
    if out is not None:
        return out
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def linear(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    return linears(x, w, (name,))[0]


def linears(x: torch.Tensor, w: dict, names: tuple[str, ...]) -> list[torch.Tensor]:
    """x times each named weight (+ bias): dense ones together (one call of the few-row kernel for q, k and v)."""
    pairs = [(w[f"{name}.weight"], w.get(f"{name}.bias")) for name in names]
    if not any(isinstance(weight, (Int4Weight, CodesMatrix)) for weight, _ in pairs):
        return dense_linears(x, pairs)
    outs = []
    for weight, bias in pairs:
        if isinstance(weight, (Int4Weight, CodesMatrix)):  # 4-bit codes multiplied as stored (a CPU's, a GPU's)
            y = weight.matmul(x)
            outs.append(y if bias is None else y + bias)
        else:
            outs.append(dense_linears(x, [(weight, bias)])[0])
    return outs


def embed(w: dict, ids: torch.Tensor, positions: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Token ids (B, T) and positions (B, T) -> hidden states (B, T, hidden)."""
    tokens = w["tokens"]
    h = tokens.embedding(ids) if isinstance(tokens, Int8Weight) else F.embedding(ids, tokens)
    if "project_in" in w:
        h = F.linear(h, w["project_in"])
    if config.positions == "learned":
        h = h + F.embedding(positions.clamp(min=-1) + 2, w["positions"])  # OPT's offset of 2
    if config.embed_scale_in_dtype:  # Gemma: sqrt(hidden) rounded to the dtype, as transformers multiplies
        return h * torch.tensor(config.embed_scale, dtype=h.dtype)
    return scaled(h, config.embed_scale)


def rope_frequencies(config: ModelConfig, device: torch.device) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with linear, YaRN or Llama-3 scaling when configured."""
    d = config.rotary_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    s = config.rope_scaling
    kind = (s or {}).get("rope_type", (s or {}).get("type"))
    if kind == "linear":  # positions divided by the factor
        return inv / s["factor"]
    if kind == "yarn":
        return _yarn(inv, s, config)
    if kind == "longrope":  # Phi-3 within its original context: each frequency divided by its short factor
        return inv / torch.tensor(s["short_factor"], dtype=torch.float32, device=device)
    if s:  # llama3: keep high frequencies, divide low ones by factor, blend between
        factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old_len / wavelen) - low) / (high - low)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old_len / low, inv / factor, torch.where(wavelen < old_len / high, inv, blended))
    return inv


def _yarn_factor(s: dict, config: ModelConfig) -> float:
    return s.get("factor") or config.max_positions / s["original_max_position_embeddings"]


def _yarn(inv: torch.Tensor, s: dict, config: ModelConfig) -> torch.Tensor:
    """YaRN (Peng et al. 2023), as transformers computes it: frequencies that turn fewer than beta_slow times
    over the original context are divided by the factor, those turning more than beta_fast times kept, a linear
    ramp between (in dimension indices, rounded outward unless `truncate` is false)."""
    d, theta, old = config.rotary_dim, config.rope_theta, s["original_max_position_embeddings"]

    def dim_of(turns: float) -> float:
        return d * math.log(old / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=inv.device) - low) / (high - low)).clamp(0, 1)
    kept = 1 - ramp
    return inv / _yarn_factor(s, config) * (1 - kept) + inv * kept


def rope_scale(config: ModelConfig) -> float:
    """What cos and sin are multiplied by: YaRN's attention factor (0.1 ln(factor) + 1, or as configured),
    LongRoPE's (sqrt(1 + ln(factor) / ln(original context))), else 1."""
    s = config.rope_scaling or {}
    kind = s.get("rope_type", s.get("type"))
    if kind not in ("yarn", "longrope"):
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    if kind == "longrope":
        old = s["original_max_position_embeddings"]
        factor = s.get("factor") or (s.get("max_position_embeddings") or old) / old
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old))

    def mscale(factor: float, m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    factor = _yarn_factor(s, config)
    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
    return mscale(factor)


class Rotary:
    """A model's rotary embedding: its inverse frequencies, and Gemma-3's windowed layers' own (local_rope_theta,
    unscaled). `tables` gives cos and sin at positions for each kind; `layer_rope` picks a layer's."""

    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        self.inv_freq, self.scale = rope_frequencies(config, device), rope_scale(config)
        local = config.local_rope()
        self.local = None if local is None else rope_frequencies(local, device)

    @classmethod
    def of(cls, config: ModelConfig, device: torch.device) -> Rotary | None:
        return cls(config, device) if config.positions == "rope" else None

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {"global": rope_cos_sin(positions, self.inv_freq, dtype, self.scale)}
        if self.local is not None:
            out["local"] = rope_cos_sin(positions, self.local, dtype)
        return out


def layer_rope(tables: dict | None, config: ModelConfig, layer: int):
    """Decoder layer `layer`'s cos and sin among `tables` (Rotary.tables; None: learned positions, or a layer
    without rotary embedding)."""
    if tables is None or layer in config.unrotated_layers:
        return None
    return tables["local"] if "local" in tables and config.window(layer) else tables["global"]


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos and sin of shape (B, 1, T, rotary_dim) for positions (B, T), times `scale` (rope_scale)."""
    angles = positions.float()[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)[:, None]
    if scale != 1.0:
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    if rot < x.shape[-1]:  # partial rotary (Phi-4-mini): the rest of each head passes through
        return torch.cat((apply_rope(x[..., :rot].contiguous(), cos, sin), x[..., rot:]), dim=-1)
    out = elementwise.rope(x, cos, sin) if x.device.type == "cpu" else None
    if out is not None:
        return out
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def qkv(w: dict, x: torch.Tensor, rope, config: ModelConfig):
    """Normalised input (B, T, hidden) -> q (B, heads, T, hd), k and v (B, kv_heads, T, hd)."""
    b, t, _ = x.shape
    hd = config.head_dim
    q, k, v = linears(x, w, ("q", "k", "v"))
    if config.qk_norm == "full":  # OLMoE: q and k normalised across all their heads
        q, k = norm(q, w, config, "q_norm"), norm(k, w, config, "k_norm")
    if config.clip_qkv is not None:
        q, k, v = (y.clamp(-config.clip_qkv, config.clip_qkv) for y in (q, k, v))
    q, k = q.view(b, t, config.num_heads, hd), k.view(b, t, config.num_kv_heads, hd)
    if config.qk_norm == "head":  # Qwen3, Gemma-3: each head's q and k normalised before rotary
        q, k = norm(q, w, config, "q_norm"), norm(k, w, config, "k_norm")
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = v.view(b, t, config.num_kv_heads, hd).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if config.attention_scale is not None:  # Granite: q times it, so that every kernel's 1 / sqrt(hd) leaves it
        q = (q.float() * (config.attention_scale * math.sqrt(hd))).to(q.dtype)
    return q, k, v


def sinks(w: dict, config: ModelConfig) -> torch.Tensor | None:
    """An attention layer's sink logit per head (gpt-oss), where the model has them."""
    return w["sinks"] if config.attn_sinks else None


def block_input(h: torch.Tensor, w: dict, config: ModelConfig) -> torch.Tensor:
    """What attention or the MLP takes of the hidden states h: normalised, where the model normalises before."""
    return norm(h, w, config) if config.pre_norm and config.input_norms else h


def attention_output(w: dict, attn: torch.Tensor, residual: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """attn (B, heads, T, hd) -> hidden after the output projection and residual (and post-norm)."""
    b, _, t, _ = attn.shape
    h = residual + block_output(linear(attn.transpose(1, 2).reshape(b, t, -1), w, "o"), w, config)
    return h if config.pre_norm else norm(h, w, config)


def block_output(x: torch.Tensor, w: dict, config: ModelConfig) -> torch.Tensor:
    """A block's output as its residual add takes it: normalised (Gemma-2), scaled (Granite)."""
    if config.post_norms:
        x = norm(x, w, config, "post_norm")
    return scaled(x, config.residual_scale)


def scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x if factor == 1.0 else x * factor


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu,
               "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def mlp(w: dict, h: torch.Tensor, config: ModelConfig, every_row: bool = False) -> torch.Tensor:
    """The MLP block with its residual; every_row: a MoE layer's experts each over every row (`experts`)."""
    x = block_input(h, w, config)
    y = experts(w, x, config, every_row) if "router.weight" in w else feed_forward(w, x, config)
    out = h + block_output(y, w, config)
    return out if config.pre_norm else norm(out, w, config)


def feed_forward(w: dict, x: torch.Tensor, config: ModelConfig, prefix: str = "") -> torch.Tensor:
    """The MLP (an expert's, with its name's prefix) of normalised rows x, before the residual add."""
    if config.gated_mlp:
        inner = glu(*linears(x, w, (prefix + "gate", prefix + "up")), config)
    else:
        inner = activated(linear(x, w, prefix + "up"), config.activation)
    return linear(inner, w, prefix + "down")


def activated(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation of x, in place where it can be (x is the caller's own: a prefill's (rows, ffn) tensor once,
    not twice)."""
    if activation == "relu":
        return F.relu(x, inplace=True)
    if activation == "silu":
        return F.silu(x, inplace=True)
    return ACTIVATIONS[activation](x)


def glu(gate: torch.Tensor, up: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """act(gate) * up, in place where the activation can be (gate is the caller's own: no new (rows, ffn) tensor
    twice); gpt-oss's clamped form (ModelConfig.swiglu_limit), in transformers' order."""
    if config.swiglu_limit:
        limit = config.swiglu_limit
        gate, up = gate.clamp_(max=limit), up.clamp_(-limit, limit)
        return (up + 1) * (gate * torch.sigmoid(gate * config.swiglu_alpha))
    return activated(gate, config.activation).mul_(up)


def experts(w: dict, x: torch.Tensor, config: ModelConfig, every_row: bool = False) -> torch.Tensor:
    """A mixture of experts over normalised rows x (..., hidden), as transformers' grouped experts compute it: the
    router's softmax in fp32, each row's top experts (their weights renormalised when norm_top_k; Qwen's rounded to
    the compute dtype, Mixtral's kept in fp32), the (row, expert) pairs sorted by expert so that each expert runs
    once over its rows, each row's weighted outputs summed at once (in fp32 where the weights are), plus
    Qwen2-MoE's shared expert behind its sigmoid gate.

    every_row: each expert over every row and each row's own picked out (`every_expert`): more products, but the
    same shapes whatever the routing and no host sync, as a CUDA graph's decode step needs."""
    flat, k = x.reshape(-1, x.shape[-1]), config.experts_per_token
    logits = linear(flat, w, "router").float()
    if config.moe in ("granite", "gpt_oss"):  # a softmax of the top logits
        top, chosen = logits.topk(k, dim=-1)
        top = torch.softmax(top, dim=-1)
    else:
        top, chosen = torch.softmax(logits, dim=-1).topk(k, dim=-1)
        if config.norm_top_k:
            top = top / top.sum(-1, keepdim=True)
    if not config.fp32_routing_weights:
        top = top.to(x.dtype)
    if every_row:
        weighted = every_expert(w, flat, chosen, config) * top[..., None]
        return _with_shared(w, flat, weighted.sum(1).to(x.dtype), config).view(x.shape)
    order = chosen.flatten().argsort(stable=True)  # pairs (row, slot) grouped by expert
    picked = flat[order // k]
    counts = torch.bincount(chosen.flatten(), minlength=config.num_experts).tolist()  # one sync
    spans = [(e, end - n, end) for e, (n, end) in enumerate(zip(counts, accumulate(counts), strict=True)) if n]
    outs = grouped_experts(w, picked, spans, config)
    if outs is None:  # each expert in turn
        outs = torch.empty_like(picked)
        for e, a, b in spans:
            outs[a:b] = feed_forward(w, picked[a:b], config, f"experts.{e}.")
    weighted = torch.empty(outs.shape, dtype=torch.promote_types(outs.dtype, top.dtype), device=outs.device)
    weighted[order] = outs * top.flatten()[order, None]
    out = weighted.view(-1, k, flat.shape[-1]).sum(1).to(x.dtype)
    return _with_shared(w, flat, out, config).view(x.shape)


def _with_shared(w: dict, flat: torch.Tensor, out: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """The routed experts' sum `out` of rows `flat` plus Qwen2-MoE's gated shared expert, where there is one."""
    if not config.shared_expert_size:
        return out
    return out + torch.sigmoid(linear(flat, w, "shared_gate")) * feed_forward(w, flat, config, "shared.")


def every_expert(w: dict, flat: torch.Tensor, chosen: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """(rows, k, hidden): each row's chosen (rows, k) experts' outputs, every expert computed over every row of
    `flat`. Shapes never depend on the routing, and nothing is read back to the host."""
    every = torch.empty(flat.shape[0], config.num_experts, flat.shape[1], dtype=flat.dtype, device=flat.device)
    for e in range(config.num_experts):
        every[:, e] = feed_forward(w, flat, config, f"experts.{e}.")
    return every[torch.arange(flat.shape[0], device=flat.device)[:, None], chosen]


def grouped_experts(w: dict, picked: torch.Tensor, spans: list[tuple[int, int, int]], config: ModelConfig):
    """Every expert's gated MLP over its rows [a, b) of `picked` (spans (e, a, b)) in two calls of the CPU's
    few-row kernels (gate and up, then down; dense or 4-bit), where it is the product each expert's rows would take
    (a decode step's few rows an expert: small_matmul.gemv_wins, int4_matmul.codes_gemv_wins); the same bits as
    each expert in turn. None where it does not apply (a GPU, weights by tiles, many rows: each expert in turn)."""
    if picked.device.type != "cpu" or not config.gated_mlp or not spans or f"experts.{spans[0][0]}.gate.bias" in w:
        return None
    gate, up, down = ([w[f"experts.{e}.{name}.weight"] for e, _, _ in spans] for name in ("gate", "up", "down"))
    dense = all(type(t) is torch.Tensor for t in gate + up + down)
    four_bit = all(isinstance(t, Int4Weight) and t.tiles is None for t in gate + up + down) and native_agrees()
    if not (dense or four_bit):
        return None
    (f, h), dtype = gate[0].shape, picked.dtype
    wins = gemv_wins if dense else codes_gemv_wins
    if not all(wins(dtype, n, f, h) and wins(dtype, n, h, f) for n in {b - a for _, a, b in spans}):
        return None
    products = native.dense_gemv_groups if dense else native.int4_gemv_groups
    g, u = (torch.empty(picked.shape[0], f, dtype=dtype) for _ in range(2))
    first = [(picked[a:b], gw, g[a:b]) for (_, a, b), gw in zip(spans, gate, strict=True)]
    first += [(picked[a:b], uw, u[a:b]) for (_, a, b), uw in zip(spans, up, strict=True)]
    if not products(first):
        return None
    inner = glu(g, u, config)
    outs = torch.empty_like(picked)
    if not products([(inner[a:b], dw, outs[a:b]) for (_, a, b), dw in zip(spans, down, strict=True)]):
        for e, a, b in spans:
            outs[a:b] = linear(inner[a:b], w, f"experts.{e}.down")
    return outs


def head(w: dict, h: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Hidden states of the last position (B, hidden) -> logits (B, vocab) in fp32."""
    if "norm.weight" in w:
        h = norm(h, w, config)
    if "project_out" in w:
        h = F.linear(h, w["project_out"])
    head = w["lm_head"]
    if isinstance(head, Int8Weight):
        logits = head.matmul(h, torch.float32)  # the kernel's fp32 sums, or tiles' product in the compute dtype
        if h.dtype != torch.float32:
            exact_at_the_top(logits, h, head)
    else:
        logits = head_product(h, head)  # the C kernel's fp32 sums, or torch's product
        if logits.dtype != torch.float32:  # rounded to the head's dtype
            logits = logits.float()
            if logits.device.type == "cpu":
                exact_at_the_top(logits, h, head)
            else:
                logits = exact_top_k(logits, h, head)
    if config.logits_divisor != 1.0:
        logits = logits / config.logits_divisor
    return logits if config.logits_softcap is None else softcap(logits, config.logits_softcap)


def exact_at_the_top(logits: torch.Tensor, h: torch.Tensor, head: torch.Tensor | Int8Weight) -> None:
    """Logits (B, vocab) rounded to the head's dtype made exact (fp32 sums) where that rounding could have
    changed which is the largest: a bf16 logit of ~16 is a multiple of 1/8, so two tokens a few hundredths
    apart often tie, and the tie went to the lower id (greedy outputs that fp32 logits would not give). Each
    logit within twice the rounding's bound of its row's largest is recomputed; others stay as they are."""
    rounding = torch.finfo(h.dtype).eps / 2  # bf16: 2^-8 of the value at most
    best = logits.amax(-1, keepdim=True)
    near = (logits >= best - 2 * rounding * best.abs()).nonzero()
    if len(near) == logits.shape[0]:  # each row's largest alone: its order stands
        return
    if len(near) > NEAR_AT_MOST * logits.shape[0]:  # near-uniform logits (an untrained model): whole rows, in parts
        for row in near[:, 0].unique().tolist():
            for start in range(0, head.shape[0], 1 << 14):
                part = _head_rows(head, torch.arange(start, min(start + (1 << 14), head.shape[0])))
                logits[row, start:start + part.shape[0]] = part @ h[row].float()
        return
    rows, tokens = near.unbind(1)
    logits[rows, tokens] = torch.linalg.vecdot(h[rows].float(), _head_rows(head, tokens))


EXACT_TOP = 8  # a GPU's near-ties made exact: each row's largest rounded logits, a fixed number of them


def exact_top_k(logits: torch.Tensor, h: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """exact_at_the_top's work in fixed shapes (no host read: it runs inside a CUDA graph's capture): each row's
    EXACT_TOP largest rounded logits recomputed with fp32 sums (helper-45: on CUDA a bf16 head's ties went to the
    lower id). A near-tie ranked past EXACT_TOP (more than that many within the rounding of the largest, as an
    untrained model's near-uniform logits have) keeps its rounded value."""
    top = logits.topk(min(EXACT_TOP, logits.shape[-1]), dim=-1).indices  # (B, K)
    exact = torch.linalg.vecdot(head[top].float(), h.float()[:, None, :])  # (B, K)
    return logits.scatter(-1, top, exact)


def _head_rows(head: torch.Tensor | Int8Weight, tokens: torch.Tensor) -> torch.Tensor:
    return head.rows(tokens) if isinstance(head, Int8Weight) else head[tokens].float()


NEAR_AT_MOST = 64  # near-ties per row (on average) made exact one by one; more: the rows' whole products


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap
