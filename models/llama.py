"""One native PyTorch decoder for the Llama family and its small cousins: Llama 2, Llama 3/3.1/3.2, SmolLM2,
Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3/Phi-4-mini.

Read top to bottom, this file is the whole model: RMSNorm (Gemma's scales by 1 + weight), rotary embeddings (HF's
rotate-half convention, partial rotary dims, llama3 / linear / yarn / longrope scaling, a second base for Gemma 3's
local layers), grouped-query attention through `scaled_dot_product_attention` (written out when Gemma 2 soft-caps
the scores), optional per-head q/k norms, a gated MLP (SwiGLU or GeGLU), sliding-window layers, tied or untied
output head with optional logit soft-capping, and a preallocated static KV cache.

The families differ in `ModelArgs` fields named as in their HF `config.json` and in two places only: `Block`
(pre-norm, Llama/Qwen/Phi) or `SandwichBlock` (Gemma's norms before and after each branch), and the RoPE
frequencies (`rope_frequencies`). Phi-3's fused qkv_proj / gate_up_proj checkpoints are split at load
(models/checkpoint.py), so every family has the same linears for GPTQ, LoRA and int4.

Parameter names are HF's state-dict keys (`model.layers.0.self_attn.q_proj.weight`, ...), so HF safetensors load
with no key table and no q/k permutation.

Calling conventions (shapes: B batch, T new tokens, S cache length, C hidden size, V vocabulary):
- training / scoring: `model(input_ids)` is causal attention over the T tokens, positions 0..T-1.
  `model(input_ids, logits_at=keep)` computes logits only where the bool mask `keep` [B, T] is True ([N, V]).
- decoding: `model.setup_caches(B, S)`, then `model(input_ids, input_pos=pos)` writes the new keys
  and values at cache slots `pos` [T] and attends to every slot <= pos. For left-padded batches
  pass `position_ids` [B, T] (RoPE positions per row) and `key_padding_mask` [B, S] (True = real token).
- the pieces of `forward`, for callers that need less or more than logits (all of them go through these, so no
  code outside models/ re-implements the model):
  `model.hidden(input_ids, ...)` -> the last block's output [B, T, C] (before the final norm), with forward's
  inputs plus packed rows (`segment_ids`, `branch_ids`: see `attention_mask`, the one mask rule);
  `model.output(h)` -> logits for hidden states h [..., C] (final norm, then the head), at positions the caller
  picked; `model.embed(input_ids)` -> the first block's input; `model.layer_inputs(position_ids, dtype, ...)` ->
  {layer type: (cos, sin, mask)}, what a block of that type takes besides its input (`block.layer_type` picks);
  `model.rope(position_ids, dtype, layer_type)` -> cos, sin; `Block.attn_branch` / `Block.mlp_branch` are the two
  residual branches (`Block.forward` is `h = x + attn_branch(x); h + mlp_branch(h)`), and `Block.finish_attn` /
  `Block.finish_mlp` complete them from the input of their last linear (GPTQ's driver); `Block.attention_probs`
  is the attention the block's queries pay to its keys.
- after building under `torch.device("meta")` and loading weights, call `model.init_rope()`: the RoPE frequencies
  are a non-persistent buffer that no checkpoint carries.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# HF `model_type` -> the transformers class its checkpoints name (config.json "architectures").
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class ModelArgs:
    """The model's schema. Field names mirror HF `config.json` (LlamaConfig, MistralConfig, Qwen2Config,
    Qwen3Config, Gemma2Config, Gemma3TextConfig, Phi3Config) where one exists;
    `models.checkpoint.args_from_hf_config` reads a config.json and fills the rest from the family (`model_type`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    rope_scaling: dict | None = None  # {"rope_type": one of ROPE_TYPES, ...} as in HF config.json
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    attention_bias: bool = False  # Llama: bias on q, k, v and o
    qkv_bias: bool = False  # Qwen2: bias on q, k and v only
    model_type: str = "llama"  # the HF family (a key of ARCHITECTURES): what an HF export writes
    hidden_act: str = "silu"  # the gate's activation: silu (SwiGLU) or gelu_pytorch_tanh (Gemma's GeGLU)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's queries and keys, before RoPE
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + weight); checkpoints store weight near 0
    post_norms: bool = False  # Gemma 2/3: norms before and after each branch (SandwichBlock)
    embedding_multiplier: float = 1.0  # Gemma: sqrt(hidden_size), applied to the embedding output
    query_pre_attn_scalar: float | None = None  # Gemma: scores scale by query_pre_attn_scalar**-0.5; None: head_dim
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    sliding_window: int | None = None  # a sliding layer's query sees keys fewer than this many positions back
    layer_types: list[str] | None = None  # per layer, one of LAYER_TYPES; None: all full_attention
    rope_local_base_freq: float | None = None  # Gemma 3: RoPE base of the sliding layers (no scaling there)
    partial_rotary_factor: float = 1.0  # Phi-4-mini: RoPE rotates the first head_dim * factor dims only

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads and self.head_dim is None:
            raise ValueError(f"model.hidden_size={self.hidden_size} must divide by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} must divide by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in ROPE_TYPES:
                raise ValueError(f"model.rope_scaling type {kind!r} is not supported ({', '.join(ROPE_TYPES)})")
            if kind in ("yarn", "longrope") and "original_max_position_embeddings" not in rs:
                raise ValueError(f"model.rope_scaling ({kind}) needs original_max_position_embeddings")
            half = int(self.dim_head * self.partial_rotary_factor) // 2
            if kind == "longrope" and not len(rs.get("short_factor", ())) == len(rs.get("long_factor", ())) == half:
                raise ValueError(f"model.rope_scaling (longrope) needs short_factor and long_factor of {half} values")
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model.model_type={self.model_type!r} is not supported ({', '.join(ARCHITECTURES)})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"model.hidden_act={self.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ValueError(
                    f"model.layer_types must list {self.num_hidden_layers} entries from {LAYER_TYPES}, "
                    f"got {self.layer_types}"
                )
            if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) > 0:
                raise ValueError("model.layer_types has sliding_attention layers: set model.sliding_window > 0")
        rot = self.dim_head * self.partial_rotary_factor
        if not 0 < self.partial_rotary_factor <= 1 or rot != int(rot) or int(rot) % 2:
            raise ValueError(
                f"model.partial_rotary_factor={self.partial_rotary_factor} must give an even number of rotary "
                f"dims of head_dim={self.dim_head}"
            )

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_head * self.partial_rotary_factor)

    def layer_type(self, i: int) -> str:
        return "full_attention" if self.layer_types is None else self.layer_types[i]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelArgs keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


def rope_frequencies(args: ModelArgs, layer_type: str = "full_attention", long: bool = False) -> torch.Tensor:
    """The inverse frequencies [rotary_dim / 2] of a layer type's RoPE; `long`: LongRoPE's long factors (used by
    `Transformer.rope` once a position reaches past the pretraining length)."""
    d = args.rotary_dim
    local = layer_type == "sliding_attention" and args.rope_local_base_freq is not None
    theta = args.rope_local_base_freq if local else args.rope_theta
    # Explicit device: the model may be built under torch.device("meta") before weights are assigned.
    exponent = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d
    rs = None if local else args.rope_scaling
    kind = None if rs is None else rs.get("rope_type", rs.get("type"))
    if kind == "longrope":
        # LongRoPE (Ding et al. 2024, arXiv 2402.13753): a per-frequency divisor, `short_factor` within the
        # pretraining length, `long_factor` past it (HF's _compute_longrope_parameters).
        ext = torch.tensor(rs["long_factor" if long else "short_factor"], dtype=torch.float32, device="cpu")
        return 1.0 / (ext * theta**exponent)
    inv_freq = 1.0 / (theta**exponent)
    if kind == "linear":
        return inv_freq / rs["factor"]
    if kind == "llama3":
        # Llama 3.1 frequency-dependent scaling (Meta's llama3 reference, also HF's _compute_llama3_parameters).
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if kind == "yarn":
        # YaRN (Peng et al. 2023, arXiv 2309.00071): interpolate the slow frequencies by `factor`, keep the fast
        # ones, with a linear ramp between the dims that turn beta_fast and beta_slow times over the old context.
        factor, old_ctx = rs["factor"], rs["original_max_position_embeddings"]

        def dim_of(turns):  # the dim whose frequency turns `turns` times over old_ctx positions
            return d * math.log(old_ctx / (turns * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = dim_of(rs.get("beta_fast") or 32), dim_of(rs.get("beta_slow") or 1)
        if rs.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = ((torch.arange(d // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (unchanged), 0: interpolate
        return inv_freq / factor * (1 - keep) + inv_freq * keep
    return inv_freq


def rope_attention_factor(args: ModelArgs) -> float:
    """What yarn and longrope multiply cos and sin by (global layers; 1 for every other RoPE)."""
    rs = args.rope_scaling or {}
    kind = rs.get("rope_type")
    if kind not in ("yarn", "longrope"):
        return 1.0
    if rs.get("attention_factor") is not None:
        return rs["attention_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    factor = rs.get("factor") or args.max_position_embeddings / old_ctx
    if factor <= 1:
        return 1.0
    if kind == "yarn":
        return 0.1 * math.log(factor) + 1.0
    return math.sqrt(1 + math.log(factor) / math.log(old_ctx))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos, sin: [B, 1, T, R], R <= D rotary dims (R < D: the rest pass through, Phi-4-mini)
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def attention_mask(
    query_pos: torch.Tensor,
    n_keys: int,
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    branch_ids: torch.Tensor | None = None,
    window: int | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one attention rule: bool mask [B or 1, 1, T, S] (True = attend) for queries at slots query_pos [T] over
    keys at slots 0..S-1 (S = n_keys), shared by every batch layout:

    - causal: a query sees keys at slots <= its own;
    - `key_padding_mask` [B, >= S] (True = real token): padded keys are hidden;
    - `segment_ids` [B, S]: packed rows, a query sees only keys of its own segment;
    - `branch_ids` [B, S]: within a segment, branch 0 is a prefix that every later token of the segment sees, and a
      token of branch k > 0 also sees its own branch only (several continuations scored after one shared context).
    - `window` (sliding-window layers): a query sees only keys fewer than `window` positions back, positions being
      `positions` [B or 1, S] (RoPE positions of the S slots, so packed rows count within their own sequence)
      or, without it, the slots (a KV cache, where slot distance is position distance).
    Every query sees its own slot, whatever the rest says: a query with nothing visible (a padded one) would make
    SDPA return NaN for its row.
    """
    slots = torch.arange(n_keys, device=query_pos.device)
    own = slots[None, :] == query_pos[:, None]  # [T, S]
    mask = (slots[None, :] <= query_pos[:, None])[None]  # [1, T, S]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, :n_keys]  # [B, T, S]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :] == segment_ids[:, query_pos, None])
    if branch_ids is not None:
        key_branch = branch_ids[:, None, :]  # [B, 1, S]
        mask = mask & ((key_branch == 0) | (key_branch == branch_ids[:, query_pos, None]))
    if window is not None:
        if positions is None:
            back = (query_pos[:, None] - slots[None, :])[None]  # [1, T, S]
        else:
            back = positions[:, query_pos, None] - positions[:, None, :n_keys]  # [B, T, S]
        mask = mask & (back < window)
    return (mask | own)[:, None]  # [B or 1, 1, T, S]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the scale, as HF's LlamaRMSNorm does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scales by (1 + weight), in fp32 before the cast back (HF's Gemma2RMSNorm/Gemma3RMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(args: ModelArgs, dim: int) -> RMSNorm:
    return (GemmaRMSNorm if args.norm_plus_one else RMSNorm)(dim, args.rms_norm_eps)


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, seq_len: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos: [T]; k, v: [B, KVH, T, D], cast to the cache's dtype
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, h, kvh = args.dim_head, args.num_attention_heads, args.num_key_value_heads
        qkv_bias = args.attention_bias or args.qkv_bias
        self.q_proj = nn.Linear(args.hidden_size, h * d, bias=qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, kvh * d, bias=qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, kvh * d, bias=qkv_bias)
        self.o_proj = nn.Linear(h * d, args.hidden_size, bias=args.attention_bias)
        # Qwen3, Gemma 3: per-head norms of queries and keys (None: no parameters, HF's keys unchanged)
        self.q_norm = make_norm(args, d) if args.qk_norm else None
        self.k_norm = make_norm(args, d) if args.qk_norm else None
        self.n_heads, self.n_kv_heads, self.head_dim = h, kvh, d
        # None: SDPA's default 1/sqrt(head_dim)
        self.scale = None if args.query_pre_attn_scalar is None else args.query_pre_attn_scalar**-0.5
        self.softcap = args.attn_logit_softcapping
        self.kv_cache: KVCache | None = None
        self.qkv_joined = None  # see Transformer.join_projections

    def qk(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [B, H, T, D] and keys [B, KVH, T, D] of x [B, T, C], after RoPE."""
        return self._heads(self.q_proj(x), self.k_proj(x), cos, sin)

    def _heads(self, q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected queries [B, T, H*D] and keys [B, T, KVH*D] -> per head, normed (Qwen3, Gemma 3), after RoPE."""
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D], [B, KVH, T, D]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def weights(self, q, k, mask) -> torch.Tensor:
        """Attention probabilities [B, H, T, S] (fp32) of queries q [B, H, T, D] over keys k [B, KVH, S, D] under
        `mask` [B or 1, 1, T, S] (None: causal, T == S), written out: what SDPA computes inside, plus Gemma 2's
        score soft-capping, which SDPA cannot do."""
        T, S = q.shape[2], k.shape[2]
        q, k = q.float(), k.float().repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # [B, H, S, D]
        scores = q @ k.transpose(-1, -2)  # [B, H, T, S]
        scores = scores / math.sqrt(self.head_dim) if self.scale is None else scores * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        return scores.masked_fill_(~mask, -math.inf).softmax(-1)

    def probs(self, x, cos, sin, mask=None) -> torch.Tensor:
        """Attention probabilities [B, H, T, T] (fp32, query by key) of x [B, T, C] under `mask` (None: causal), as
        forward weighs the values (written out: SDPA does not return them)."""
        return self.weights(*self.qk(x, cos, sin), mask)

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        if self.qkv_joined is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:  # one matmul for the three (Transformer.join_projections)
            q, k, v = self.qkv_joined(x).split(self.qkv_joined.sizes, dim=-1)
        q, k = self._heads(q, k, cos, sin)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, T, D]
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, KVH, S, D]
            q = q.to(k.dtype)  # attention runs in the cache's dtype (see Transformer.setup_caches)
        gqa = self.n_heads != self.n_kv_heads
        if self.softcap is not None:
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # [B, H, S, D]
            y = self.weights(q, k, mask).to(v.dtype) @ v  # [B, H, T, D]
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim).to(x.dtype)  # [B, T, H*D]
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.act = ACTIVATIONS[args.hidden_act]
        self.gate_up_joined = None  # see Transformer.join_projections

    def forward(self, x):
        if self.gate_up_joined is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:  # one matmul for the two (Transformer.join_projections)
            gate, up = self.gate_up_joined(x).split(self.gate_up_joined.sizes, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block (Llama, Mistral, Qwen, Phi): h = x + attn_branch(x), out = h + mlp_branch(h).
    `layer_type` (full_attention / sliding_attention) picks its RoPE and mask from `Transformer.layer_inputs`."""

    def __init__(self, args: ModelArgs, layer_type: str = "full_attention"):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = make_norm(args, args.hidden_size)
        self.post_attention_layernorm = make_norm(args, args.hidden_size)  # HF's name for the MLP's pre-norm
        self.layer_type = layer_type

    def attn_branch(self, x, cos, sin, mask=None, input_pos=None) -> torch.Tensor:
        """What the attention adds to the residual stream x [B, T, C]."""
        return self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)

    def mlp_branch(self, h) -> torch.Tensor:
        """What the MLP adds to the residual stream h [B, T, C]."""
        return self.mlp(self.post_attention_layernorm(h))

    def finish_attn(self, x, o_in) -> torch.Tensor:
        """x + attn_branch(x), given o_proj's input o_in [B, T, H*D] from that branch (the branch's last step)."""
        return x + self.self_attn.o_proj(o_in)

    def finish_mlp(self, h, down_in) -> torch.Tensor:
        """h + mlp_branch(h), given down_proj's input down_in [B, T, I] from that branch (the branch's last step)."""
        return h + self.mlp.down_proj(down_in)

    def attention_probs(self, x, cos, sin, mask=None) -> torch.Tensor:
        """[B, H, T, T]: the attention probabilities of this block on its input x [B, T, C] (mask None: causal)."""
        return self.self_attn.probs(self.input_layernorm(x), cos, sin, mask)

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        h = x + self.attn_branch(x, cos, sin, mask, input_pos)
        return h + self.mlp_branch(h)


class SandwichBlock(Block):
    """Gemma 2/3: each branch normed on the way in and on the way out, HF's names:
    attn_branch = post_attention_layernorm(attn(input_layernorm(x))),
    mlp_branch = post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))."""

    def __init__(self, args: ModelArgs, layer_type: str = "full_attention"):
        super().__init__(args, layer_type)
        self.pre_feedforward_layernorm = make_norm(args, args.hidden_size)
        self.post_feedforward_layernorm = make_norm(args, args.hidden_size)

    def attn_branch(self, x, cos, sin, mask=None, input_pos=None) -> torch.Tensor:
        return self.post_attention_layernorm(super().attn_branch(x, cos, sin, mask, input_pos))

    def mlp_branch(self, h) -> torch.Tensor:
        return self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))

    def finish_attn(self, x, o_in) -> torch.Tensor:
        return x + self.post_attention_layernorm(self.self_attn.o_proj(o_in))

    def finish_mlp(self, h, down_in) -> torch.Tensor:
        return h + self.post_feedforward_layernorm(self.mlp.down_proj(down_in))


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        block = SandwichBlock if args.post_norms else Block
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(block(args, args.layer_type(i)) for i in range(args.num_hidden_layers))
        self.norm = make_norm(args, args.hidden_size)


def _joined(owner: nn.Module, attr: str, mods: tuple[nn.Module, ...]) -> nn.Module | None:
    """`mods` joined by their class's `cat` (None when it has none or refuses), cached on `owner` under "_" + attr
    with weak references to the source tensors and their version counters (a replaced or in-place changed tensor
    rebuilds it)."""
    tensors = [t for m in mods for t in (*m.parameters(), *m.buffers())]
    cached = owner.__dict__.get("_" + attr)
    if cached is not None and len(cached[0]) == len(tensors):
        if all(ref() is t and version == t._version for (ref, version), t in zip(cached[0], tensors, strict=True)):
            return cached[1]
    cat = getattr(type(mods[0]), "cat", None)
    joined = cat(mods) if cat is not None and all(type(x) is type(mods[0]) for x in mods) else None
    if joined is not None:
        joined.sizes = [x.out_features for x in mods]
    object.__setattr__(owner, "_" + attr, ([(weakref.ref(t), t._version) for t in tensors], joined))
    return joined


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        # Tied models have no lm_head module, so state-dict keys equal HF's saved keys.
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)
        # Only the families that need them carry these (the frequencies of Gemma 3's sliding layers, LongRoPE's
        # long factors), so a Llama model's buffers stay what they were.
        if args.rope_local_base_freq is not None:
            self.register_buffer("inv_freq_local", rope_frequencies(args, "sliding_attention"), persistent=False)
        if self._longrope:
            self.register_buffer("inv_freq_long", rope_frequencies(args, long=True), persistent=False)
        self.rope_scale = rope_attention_factor(args)
        self.max_batch_size = self.max_seq_length = 0

    @property
    def _longrope(self) -> bool:
        return (self.args.rope_scaling or {}).get("rope_type") == "longrope"

    @property
    def rope_switch(self) -> int | None:
        """LongRoPE: the pretraining length, past which `rope` takes the long factors (None for every other RoPE).
        Keys cached before that point were rotated with the short ones, so a decoder crossing it recomputes its
        cache once (models/generate.py, as transformers' Phi-3 generation does)."""
        return self.args.rope_scaling["original_max_position_embeddings"] if self._longrope else None

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype: torch.dtype | None = None):
        """Preallocate a static KV cache of [max_batch_size, KVH, max_seq_length, D] per layer.

        Sliding-window layers get the same full-length cache; their mask (`attention_mask`'s window) hides the keys
        that fell out of the window.
        Attention over the cache runs in the cache's `dtype` (default: the embedding's). A float32 cache under a
        bf16 model is the fast choice on CPUs without native bf16 (AVX2): there the bf16 attention kernel is several
        times slower than the float32 one, while the cache is small next to the weights.
        """
        dtype = dtype or self.model.norm.weight.dtype
        device = self.inv_freq.device
        a = self.args
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(
                max_batch_size, a.num_key_value_heads, max_seq_length, a.dim_head, dtype, device
            )
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length

    @contextmanager
    def join_projections(self):
        """Within the block, each attention's q/k/v and each MLP's gate/up (which read the same input) run as one
        matmul, where their modules' class can join them: a classmethod `cat(modules)` returning one module whose
        output is the modules' outputs side by side, or None (quant/int4.py's int4 linears; a float nn.Linear has
        none and stays as it is). Decoding uses it: at one token per step, the int4 kernel's per-call cost is a large
        share of a small matmul's time. The joined modules are a copy outside the state dict, used only inside the
        block; they are kept between calls (so a compiled decode step finds the same modules and does not compile
        again) and rebuilt when any of the source tensors was replaced or changed in place (`_joined`)."""
        pairs = []
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            pairs += [
                (a, "qkv_joined", (a.q_proj, a.k_proj, a.v_proj)),
                (m, "gate_up_joined", (m.gate_proj, m.up_proj)),
            ]
        try:
            for owner, attr, mods in pairs:
                object.__setattr__(owner, attr, _joined(owner, attr, mods))  # not a submodule: never saved or moved
            yield self
        finally:
            for owner, attr, _ in pairs:
                object.__setattr__(owner, attr, None)

    def clear_caches(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.max_batch_size = self.max_seq_length = 0

    def init_rope(self) -> None:
        """Rebuild the RoPE frequencies (`inv_freq` and the family's others, on the embedding's device) from `args`.

        They are non-persistent buffers: no checkpoint carries them and loading weights leaves them as they were
        (computed on CPU at construction, even under torch.device("meta"); uninitialised after `to_empty`). The
        loaders call this once the weights are in, so the model never runs with frequencies it did not compute.
        """
        dev = self.model.norm.weight.device  # the embedding may be quantized (quant/int4.py Int4Embedding)
        self.inv_freq = rope_frequencies(self.args).to(dev)
        if self.args.rope_local_base_freq is not None:
            self.inv_freq_local = rope_frequencies(self.args, "sliding_attention").to(dev)
        if self._longrope:
            self.inv_freq_long = rope_frequencies(self.args, long=True).to(dev)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype, layer_type: str = "full_attention"):
        """cos, sin of shape [B, 1, T, R] for position_ids [B, T] (fp32 maths, as HF), R the rotary dims."""
        scale = self.rope_scale
        if layer_type == "sliding_attention" and self.args.rope_local_base_freq is not None:
            inv_freq, scale = self.inv_freq_local, 1.0
        elif self._longrope:
            # As transformers: the long factors once this call reaches past the pretraining length (keys already in
            # a KV cache keep the rotation they were written with).
            past = position_ids.max() + 1 > self.args.rope_scaling["original_max_position_embeddings"]
            inv_freq = torch.where(past, self.inv_freq_long, self.inv_freq)
        else:
            inv_freq = self.inv_freq
        freqs = position_ids[..., None].float() * inv_freq  # [B, T, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, R]
        cos, sin = emb.cos(), emb.sin()
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        return cos.to(dtype), sin.to(dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> the first block's input [B, T, C] (Gemma scales the embedding by sqrt(C), rounded to
        the weights' dtype first, as HF)."""
        # .to: a quantized embedding (quant/int4.py Int4Embedding) returns its scales' dtype
        x = self.model.embed_tokens(input_ids).to(self.model.norm.weight.dtype)
        if self.args.embedding_multiplier != 1.0:
            x = x * torch.tensor(self.args.embedding_multiplier, dtype=x.dtype, device=x.device)
        return x

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] for hidden states h [..., C] from `hidden`: the final norm, then the output head. Both act
        per position, so picking positions first (h[rows, cols]) gives those positions' logits and skips the rest."""
        h = self.model.norm(h)
        logits = F.linear(h, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def layer_inputs(
        self,
        position_ids: torch.Tensor,
        dtype: torch.dtype,
        input_pos: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        branch_ids: torch.Tensor | None = None,
    ) -> dict[str, tuple]:
        """{layer type: (cos, sin, mask)} for the layer types of this model: what a block of that type takes besides
        its input (RoPE of position_ids [B, T], the `attention_mask` of the batch layout; `hidden`'s arguments).

        mask is None for plain causal attention (SDPA's causal kernel, no mask tensor); a sliding layer needs one
        only once T exceeds its window (consecutive positions within a row keep every earlier key in reach).
        """
        T = position_ids.shape[1]
        dev = position_ids.device
        out = {}
        for kind in dict.fromkeys(layer.layer_type for layer in self.model.layers):
            window = self.args.sliding_window if kind == "sliding_attention" else None
            packed = key_padding_mask is not None or segment_ids is not None or branch_ids is not None
            if input_pos is not None:
                mask = attention_mask(input_pos, self.max_seq_length, key_padding_mask, window=window)  # [B|1,1,T,S]
            elif packed or (window is not None and T > window):
                query_pos = torch.arange(T, device=dev)
                positions = position_ids if window is not None else None
                mask = attention_mask(query_pos, T, key_padding_mask, segment_ids, branch_ids, window, positions)
            else:
                mask = None
            out[kind] = (*self.rope(position_ids, dtype, kind), mask)
        return out

    def hidden(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        branch_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> the last block's output [B, T, C], before the final norm (`output` applies it).

        input_pos, position_ids and key_padding_mask as in the module docstring; segment_ids and branch_ids [B, T]
        (no cache) lay several sequences into one row, see `attention_mask`. Plain causal attention, the common
        case, runs SDPA's causal kernel with no mask tensor.
        """
        B, T = input_ids.shape
        x = self.embed(input_ids)  # [B, T, C]
        if position_ids is None:
            pos = input_pos if input_pos is not None else torch.arange(T, device=input_ids.device)
            position_ids = pos[None].expand(B, T)
        if input_pos is not None and self.max_seq_length == 0:
            raise RuntimeError("input_pos given but no KV cache: call setup_caches(batch, seq_len) first")
        inputs = self.layer_inputs(position_ids, x.dtype, input_pos, key_padding_mask, segment_ids, branch_ids)
        for layer in self.model.layers:
            x = layer(x, *inputs[layer.layer_type], input_pos)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V], or [N, V] at the N True positions of logits_at [B, T] (bool).

        Training calls this rather than `hidden` and `output` so that wrappers hooked on the model's forward
        (FSDP2's unsharding of the embedding, final norm and head) run around the whole pass.
        """
        h = self.hidden(input_ids, input_pos, position_ids, key_padding_mask)
        return self.output(h if logits_at is None else h[logits_at])
