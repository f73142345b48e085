"""Model configuration: one dataclass for every supported family (read from a HF config by hf_config.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ModelError(ValueError):
    """A model that cannot be loaded: unknown architecture, missing or corrupt files."""


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "opt" or "llama" (llama covers mistral, qwen2/3, phi3, granite, gemma/2, smollm2 and the MoEs)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    pre_norm: bool = True  # OPT-350m normalises after the residual add
    input_norms: bool = True  # OLMo-2/3: no norm before attention or MLP, only after each (post_norms)
    final_norm: bool = True
    activation: str = "relu"  # "relu" | "gelu" | "gelu_tanh" | "silu"
    gated_mlp: bool = False  # SwiGLU: down(act(gate(x)) * up(x))
    positions: str = "learned"  # "learned" (OPT, offset 2) | "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    local_rope_theta: float = 0.0  # Gemma-3, OLMo-3: the windowed layers' rotary base, unscaled; 0: every layer's
    unrotated_layers: tuple[int, ...] = ()  # SmolLM3: layers whose q and k take no rotary embedding (NoPE)
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    embed_dim: int = 0  # OPT word_embed_proj_dim; 0 means hidden_size
    head_size: int = 0  # each head's width where heads x it is not hidden_size (Qwen3); 0: hidden / heads
    # q and k RMS-normalised before rotary: "head" (Qwen3: each head, weights of head_dim), "full" (OLMoE: all
    # heads together, weights of their widths); "": not
    qk_norm: str = ""
    clip_qkv: float | None = None  # OLMoE: q, k and v clamped to [-clip, clip] after their norms
    fused_projections: bool = False  # Phi-3: q, k, v stored as one matrix, gate and up as another
    partial_rotary: float = 1.0  # the share of each head's dims rotated (Phi-4-mini: 0.75); the rest pass through
    # Granite's multipliers: of the embeddings, of each block's output before its residual add, the attention's
    # scale (None: 1 / sqrt(head_dim)), and the divisor of the logits
    embed_scale: float = 1.0
    residual_scale: float = 1.0
    attention_scale: float | None = None
    logits_divisor: float = 1.0
    # Gemma: RMSNorm by (1 + weight) in fp32; embeddings times sqrt(hidden) rounded to the compute dtype first;
    # Gemma-2: attention scores and logits soft-capped (cap * tanh(x / cap)), each block's output normalised
    # before its residual add (post_norm)
    norm_offset: float = 0.0
    embed_scale_in_dtype: bool = False
    attn_softcap: float | None = None
    logits_softcap: float | None = None
    post_norms: bool = False
    attn_sinks: bool = False  # gpt-oss: each head's learned logit in its softmax's denominator (a "sinks" weight)
    # gpt-oss's experts' GLU: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
    swiglu_limit: float = 0.0
    swiglu_alpha: float = 0.0
    # a mixture of experts in place of the MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE): each token's
    # hidden state goes to its top experts_per_token of num_experts gated MLPs of expert_size, weighted by their
    # router softmax (renormalised over the chosen ones when norm_top_k; GraniteMoE's and gpt-oss's a softmax of the
    # top logits); Qwen2-MoE adds a shared expert behind a sigmoid gate. moe names the routing and checkpoint layout
    # ("mixtral", "qwen", "granite", "gpt_oss"); dense_layers keep a dense MLP (Qwen's mlp_only_layers)
    moe: str = ""
    num_experts: int = 0
    experts_per_token: int = 0
    expert_size: int = 0
    norm_top_k: bool = True
    shared_expert_size: int = 0
    dense_layers: tuple[int, ...] = ()
    # each decoder layer's sliding attention window (0: full attention); () where no layer has one. A query at
    # position p sees keys at positions p - window < q <= p (transformers' sliding_window)
    windows: tuple[int, ...] = ()
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    name: str = ""
    # a GGUF of llama.cpp's converter: rotary q and k rows permuted, so placement dequantizes those two whole
    rotary_rows_permuted: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads and not self.head_size:
            raise ModelError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_heads

    @property
    def plain(self) -> bool:
        """Without Granite's multipliers or Gemma's norms, caps and scales: what the fused CPU decode step computes."""
        return (self.embed_scale == self.residual_scale == self.logits_divisor == 1.0
                and self.attention_scale in (None, self.head_dim ** -0.5) and not self.norm_offset
                and self.attn_softcap is None and self.logits_softcap is None and not self.post_norms
                and not self.moe and self.qk_norm != "full" and self.clip_qkv is None and not self.local_rope_theta
                and not self.unrotated_layers and not self.attn_sinks)

    @property
    def fp32_routing_weights(self) -> bool:
        """Whether each row's experts are weighted in fp32 (Mixtral) rather than in the compute dtype."""
        return self.moe == "mixtral"

    def routed(self, layer: int) -> bool:
        """Whether decoder layer `layer` runs its experts (a MoE model's layers but its dense_layers)."""
        return bool(self.moe) and layer not in self.dense_layers

    @property
    def mlp_width(self) -> int:
        """The widest of a layer's MLP products: the dense MLP's, an expert's or the shared expert's."""
        dense = self.intermediate_size if not self.moe or self.dense_layers else 0
        return max(dense, self.expert_size, self.shared_expert_size)

    @property
    def rotary_dim(self) -> int:
        """The dims of each head the rotary embedding turns (transformers' int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary)

    @property
    def word_dim(self) -> int:
        return self.embed_dim or self.hidden_size

    @property
    def context(self) -> str:
        """The context in words, for messages."""
        return f"{self.max_positions} positions"

    def local_rope(self) -> ModelConfig | None:
        """The rotary embedding of the windowed layers where it is their own (Gemma-3), as a config."""
        if not self.local_rope_theta:
            return None
        return dataclasses.replace(self, rope_theta=self.local_rope_theta, rope_scaling=None, local_rope_theta=0.0)

    def window(self, layer: int) -> int:
        """Decoder layer `layer`'s sliding attention window; 0: it attends to every earlier position."""
        return self.windows[layer] if self.windows else 0

    def windows_bite(self, length: int) -> bool:
        """Whether some layer's window hides a position from a query among `length` positions."""
        return any(0 < w < length for w in self.windows)

    def cached_positions(self, layer: int, length: int) -> int:
        """Positions of a `length`-long sequence that layer `layer`'s KV cache keeps: a windowed layer its window
        (a ring: KVCache), any other all of them."""
        w = self.window(layer)
        return w if 0 < w < length else length

    def cached_length(self, length: int) -> int:
        """Cached positions of a `length`-long sequence summed over the layers (every layer's: num_layers x length)."""
        return sum(self.cached_positions(layer, length) for layer in range(self.num_layers))

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes of K and V per token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def num_params(self) -> int:
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_kv_heads * self.head_dim
        attn = h * (2 * h + 2 * kv)
        mlp = h * f * (3 if self.gated_mlp else 2)
        if self.moe:  # the routed layers' experts, router and shared expert with its gate; the others dense
            routed = self.num_layers - len(self.dense_layers)
            experts = h * (3 * (self.num_experts * self.expert_size + self.shared_expert_size) + self.num_experts
                           + (1 if self.shared_expert_size else 0))
            mlp = (routed * experts + len(self.dense_layers) * mlp) / self.num_layers
        embed = v * self.word_dim * (1 if self.tie_embeddings else 2)
        if self.positions == "learned":
            embed += (self.max_positions + 2) * h
        if self.word_dim != h:
            embed += 2 * h * self.word_dim
        return int(self.num_layers * (attn + mlp) + embed)
