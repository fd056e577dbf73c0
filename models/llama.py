"""One native PyTorch decoder for the Llama family: Llama 2, Llama 3/3.1/3.2, SmolLM2, Mistral, Qwen2/2.5.

Read top to bottom, this file is the whole model: RMSNorm, rotary embeddings (HF's rotate-half
convention, with llama3 and linear RoPE scaling), grouped-query attention through
`scaled_dot_product_attention`, a SwiGLU MLP, tied or untied output head and a preallocated
static KV cache.

Parameter names are HF's `LlamaForCausalLM` state-dict keys (`model.layers.0.self_attn.q_proj.weight`,
...), so HF safetensors load with no key table and no q/k permutation.

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
  picked; `model.rope(position_ids, dtype)` -> cos, sin; `Block.attn_branch` / `Block.mlp_branch` are the two
  residual branches (`Block.forward` is `h = x + attn_branch(x); h + mlp_branch(h)`), and `Block.finish_attn` /
  `Block.finish_mlp` complete them from the input of their last linear (GPTQ's driver); `Block.attention_probs`
  is the attention the block's queries pay to its keys.
- after building under `torch.device("meta")` and loading weights, call `model.init_rope()`: the RoPE frequencies
  are a non-persistent buffer that no checkpoint carries.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    """The model's schema. Field names mirror HF `config.json` (LlamaConfig, MistralConfig, Qwen2Config)."""

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
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...} as in HF config.json
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    attention_bias: bool = False  # Llama: bias on q, k, v and o
    qkv_bias: bool = False  # Qwen2: bias on q, k and v only

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads and self.head_dim is None:
            raise ValueError(f"model.hidden_size={self.hidden_size} must divide by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} must divide by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(f"model.rope_scaling type {kind!r} is not supported (llama3, linear, default)")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelArgs keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        """Filtered pass-through of an HF `config.json`."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in cfg.items() if k in known}
        # transformers >= 5 writes `rope_parameters` (theta and scaling together) instead of rope_theta/rope_scaling.
        rp = cfg.get("rope_parameters")
        if rp:
            d["rope_theta"] = rp["rope_theta"]
            scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
            d["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
        d.setdefault("num_key_value_heads", cfg["num_attention_heads"])
        d.setdefault("tie_word_embeddings", False)
        d.setdefault("rope_theta", 10000.0)
        d["qkv_bias"] = cfg.get("model_type") == "qwen2"
        if cfg.get("model_type") == "qwen2":
            d["attention_bias"] = False
        return cls(**d)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    d = args.dim_head
    # Explicit device: the model may be built under torch.device("meta") before weights are assigned.
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    rs = args.rope_scaling
    if rs is None:
        return inv_freq
    kind = rs.get("rope_type", rs.get("type"))
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
    return inv_freq


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos, sin: [B, 1, T, D]
    return x * cos + _rotate_half(x) * sin


def attention_mask(
    query_pos: torch.Tensor,
    n_keys: int,
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    branch_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one attention rule: bool mask [B or 1, 1, T, S] (True = attend) for queries at slots query_pos [T] over
    keys at slots 0..S-1 (S = n_keys), shared by every batch layout:

    - causal: a query sees keys at slots <= its own;
    - `key_padding_mask` [B, >= S] (True = real token): padded keys are hidden;
    - `segment_ids` [B, S]: packed rows, a query sees only keys of its own segment;
    - `branch_ids` [B, S]: within a segment, branch 0 is a prefix that every later token of the segment sees, and a
      token of branch k > 0 also sees its own branch only (several continuations scored after one shared context).
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
        self.n_heads, self.n_kv_heads, self.head_dim = h, kvh, d
        self.kv_cache: KVCache | None = None

    def qk(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [B, H, T, D] and keys [B, KVH, T, D] of x [B, T, C], after RoPE."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, T, D]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def probs(self, x, cos, sin) -> torch.Tensor:
        """Causal attention probabilities [B, H, T, T] (fp32, query by key) of x [B, T, C], as forward's SDPA
        weighs the values (written out: SDPA does not return them)."""
        T = x.shape[1]
        q, k = self.qk(x, cos, sin)
        q, k = q.float(), k.float().repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # [B, H, T, D]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # [B, H, T, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill_(~causal, -math.inf).softmax(-1)

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        q, k = self.qk(x, cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, T, D]
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, KVH, S, D]
            q = q.to(k.dtype)  # attention runs in the cache's dtype (see Transformer.setup_caches)
        gqa = self.n_heads != self.n_kv_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim).to(x.dtype)  # [B, T, H*D]
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: h = x + attn_branch(x), out = h + mlp_branch(h)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

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

    def attention_probs(self, x, cos, sin) -> torch.Tensor:
        """[B, H, T, T]: the causal attention probabilities of this block on its input x [B, T, C]."""
        return self.self_attn.probs(self.input_layernorm(x), cos, sin)

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        h = x + self.attn_branch(x, cos, sin, mask, input_pos)
        return h + self.mlp_branch(h)


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        # Tied models have no lm_head module, so state-dict keys equal HF's saved keys.
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)
        self.max_batch_size = self.max_seq_length = 0

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype: torch.dtype | None = None):
        """Preallocate a static KV cache of [max_batch_size, KVH, max_seq_length, D] per layer.

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

    def clear_caches(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.max_batch_size = self.max_seq_length = 0

    def init_rope(self) -> None:
        """Rebuild the RoPE frequencies (`inv_freq`, on the embedding's device) from `args`.

        They are a non-persistent buffer: no checkpoint carries them and loading weights leaves them as they were
        (computed on CPU at construction, even under torch.device("meta"); uninitialised after `to_empty`). The
        loaders call this once the weights are in, so the model never runs with frequencies it did not compute.
        """
        self.inv_freq = rope_frequencies(self.args).to(self.model.norm.weight.device)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos, sin of shape [B, 1, T, D] for position_ids [B, T] (fp32 maths, as HF)."""
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] for hidden states h [..., C] from `hidden`: the final norm, then the output head. Both act
        per position, so picking positions first (h[rows, cols]) gives those positions' logits and skips the rest."""
        h = self.model.norm(h)
        if self.lm_head is None:
            return F.linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)

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
        # .to: a quantized embedding (quant/int4.py Int4Embedding) returns its scales' dtype
        x = self.model.embed_tokens(input_ids).to(self.model.norm.weight.dtype)  # [B, T, C]
        if position_ids is None:
            pos = input_pos if input_pos is not None else torch.arange(T, device=input_ids.device)
            position_ids = pos[None].expand(B, T)
        mask = None
        if input_pos is not None:
            if self.max_seq_length == 0:
                raise RuntimeError("input_pos given but no KV cache: call setup_caches(batch, seq_len) first")
            mask = attention_mask(input_pos, self.max_seq_length, key_padding_mask)  # [B or 1, 1, T, S]
        elif key_padding_mask is not None or segment_ids is not None or branch_ids is not None:
            query_pos = torch.arange(T, device=input_ids.device)
            mask = attention_mask(query_pos, T, key_padding_mask, segment_ids, branch_ids)  # [B, 1, T, T]
        cos, sin = self.rope(position_ids, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, input_pos)
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
