"""Write a model as a llama.cpp GGUF file with the `gguf` package's writer, laid out as llama.cpp's own converter
(convert_hf_to_gguf.py) lays it out, so `llama-cli -m FILE` runs it with no extra flags and models/gguf.py reads it.

    write_gguf(path, args, tensors, tokenizer, name="smollm2_135m", file_type=LlamaFileType.MOSTLY_Q4_1)

`tensors` maps HF keys (`model.layers.0.self_attn.q_proj.weight`) to a float tensor, stored in `float_type` (1-D
tensors, the norms and biases, always in F32 as the converter stores them), or to a `Q4Blocks` (the exact block
form of a group-wise int4 weight; `q4_blocks` packs it). What this file does for llama.cpp:
- names: the reader's table (models/gguf.py) read backwards;
- `llama` q/k rows permuted the way the converter permutes them (`permute`, the inverse of the reader's `_unpermute`);
- metadata: architecture sizes, RoPE (base, linear factor, llama3 as the `rope_freqs` tensor), the tokenizer
  (`tokenizer_metadata`: byte-level BPE vocabularies, i.e. `tokenizer.ggml.model = gpt2`) and the chat template.

Errors: a tokenizer that is not byte-level BPE, or whose pre-tokenizer has no llama.cpp name, raises ValueError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import (
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    TokenType,
)

from models.gguf import _BLOCK_NAMES, _LLAMA3_SPLIT, _QWEN2_SPLIT, _TOP_NAMES
from models.llama import ModelArgs, rope_frequencies
from models.tokenizer import Tokenizer

Q = GGMLQuantizationType
FLOAT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}
BLOCK = 32  # elements per Q4_0 / Q4_1 block


@dataclass
class Q4Blocks:
    """A group-wise int4 weight in llama.cpp's block form: q uint8 [N, K] (0..15), d and m [N, K/32]; each element
    is d * q + m (Q4_1), or d * (q - 8) when m is None (Q4_0). d and m are rounded to fp16 when packed."""

    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    @property
    def qtype(self) -> GGMLQuantizationType:
        return Q.Q4_0 if self.m is None else Q.Q4_1

    def rows(self, perm: torch.Tensor) -> Q4Blocks:
        return Q4Blocks(self.q[perm], self.d[perm], None if self.m is None else self.m[perm])


def q4_blocks(b: Q4Blocks) -> np.ndarray:
    """Pack into GGUF bytes [N, K/32 * block bytes]: per block fp16 d, (fp16 m,) then 16 bytes of nibbles, the low
    nibble of byte j holding element j and the high nibble element j + 16 (ggml-quants.c's block_q4_0/_1)."""
    N, K = b.q.shape
    q = b.q.to(torch.uint8).reshape(N, K // BLOCK, BLOCK)  # [N, B, 32]
    nibbles = (q[..., :16] | (q[..., 16:] << 4)).numpy()  # [N, B, 16]
    parts = [b.d.to(torch.float16).numpy().reshape(N, -1, 1).view(np.uint8)]  # [N, B, 2]
    if b.m is not None:
        parts.append(b.m.to(torch.float16).numpy().reshape(N, -1, 1).view(np.uint8))
    return np.concatenate([*parts, nibbles], axis=-1).reshape(N, -1)


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order from HF's (convert_hf_to_gguf.py LlamaModel.permute): each head's rows [2, D/2]
    become [D/2, 2], so the rotary pairs are adjacent. Rows only: works on weights, biases and block scales."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    stem, _, suffix = hf.rpartition(".")
    parts = stem.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"]:
        inner = ".".join(parts[3:])
        return f"blk.{parts[2]}.{_GGUF_BLOCK[inner]}.{suffix}"
    return f"{_GGUF_TOP[stem]}.{suffix}"


_GGUF_BLOCK = {v: k for k, v in _BLOCK_NAMES.items()}
_GGUF_TOP = {v: k for k, v in _TOP_NAMES.items()}


def architecture(args: ModelArgs) -> str:
    if args.qkv_bias or args.model_type == "qwen2":
        return "qwen2"
    if args.model_type not in ("llama", "mistral"):
        raise ValueError(
            f"GGUF export writes the llama and qwen2 architectures, not {args.model_type}: export task.format=hf and "
            "convert that with llama.cpp's convert_hf_to_gguf.py"
        )
    return "llama"


def write_gguf(
    path: str | Path,
    args: ModelArgs,
    tensors: dict[str, torch.Tensor | Q4Blocks],
    tokenizer: Tokenizer,
    name: str,
    float_type: str,
    file_type: LlamaFileType,
) -> Path:
    """Write `tensors` (HF keys) with the model's metadata to the GGUF file `path` (see the module docstring)."""
    path = Path(path)
    arch = architecture(args)
    meta = tokenizer_metadata(tokenizer, args.vocab_size)  # first: a tokenizer llama.cpp cannot run stops here
    w = GGUFWriter(path, arch)
    w.add_name(name)
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.hidden_size)
    w.add_block_count(args.num_hidden_layers)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.num_attention_heads)
    w.add_head_count_kv(args.num_key_value_heads)
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.dim_head)
    w.add_vocab_size(args.vocab_size)
    if args.head_dim is not None:
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
    w.add_file_type(file_type)
    kind = None if args.rope_scaling is None else args.rope_scaling.get("rope_type", args.rope_scaling.get("type"))
    if kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(args.rope_scaling["factor"])
    _add_tokenizer(w, meta)
    if any(isinstance(t, Q4Blocks) for t in tensors.values()):
        w.add_quantization_version(GGML_QUANT_VERSION)

    heads = {"self_attn.q_proj": args.num_attention_heads, "self_attn.k_proj": args.num_key_value_heads}
    for hf, t in tensors.items():
        module = ".".join(hf.split(".")[3:-1]) if hf.startswith("model.layers.") else None
        if arch == "llama" and module in heads:
            t = (
                t.rows(permute(torch.arange(t.q.shape[0]), heads[module]))
                if isinstance(t, Q4Blocks)
                else permute(t, heads[module])
            )
        _add_tensor(w, _gguf_name(hf), t, FLOAT_TYPES[float_type])
    if kind == "llama3":
        # llama.cpp takes llama3 RoPE scaling as per-frequency divisors (the converter's rope_freqs tensor).
        plain = rope_frequencies(ModelArgs(**{**args.to_dict(), "rope_scaling": None}))
        w.add_tensor("rope_freqs.weight", (plain / rope_frequencies(args)).float().numpy())

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_tensor(w: GGUFWriter, name: str, t: torch.Tensor | Q4Blocks, float_type: GGMLQuantizationType) -> None:
    if isinstance(t, Q4Blocks):
        w.add_tensor(name, q4_blocks(t), raw_dtype=t.qtype)
        return
    t = t.detach().float().cpu()
    if t.dim() == 1 or float_type == Q.F32:
        w.add_tensor(name, t.numpy())
    elif float_type == Q.F16:
        w.add_tensor(name, t.to(torch.float16).numpy())
    else:  # BF16: numpy has no bfloat16, so the raw 16-bit words go in with their type
        w.add_tensor(name, t.to(torch.bfloat16).view(torch.int16).numpy(), raw_dtype=Q.BF16)


# --- tokenizer -----------------------------------------------------------------------------------------------

# llama.cpp's pre-tokenizer name for each byte-level split our tokenizer can have (the reader's `_SPLITS` backwards).
_PRE_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _pre_name(spec: dict | None, has_merges: bool) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json pre_tokenizer; ValueError when llama.cpp has none."""
    kind = None if spec is None else spec["type"]
    if kind == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"  # GPT-2's own split regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2)
    if kind == "ByteLevel" and not has_merges:
        return "gpt-2"  # no merges: every byte is its own token, whatever the split
    if kind == "Sequence" and len(spec["pretokenizers"]) == 2:
        split, byte_level = spec["pretokenizers"]
        if split["type"] == "Split" and byte_level["type"] == "ByteLevel" and not byte_level.get("use_regex", True):
            name = _PRE_NAMES.get(split["pattern"].get("Regex"))
            if name is not None:
                return name
    raise ValueError(
        f"the tokenizer's pre-tokenizer {json.dumps(spec)[:120]} has no llama.cpp name (gpt-2, llama-bpe, qwen2): "
        "export task.format=hf and convert with llama.cpp's convert_hf_to_gguf.py"
    )


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> dict:
    """The tokenizer.ggml.* values for a byte-level BPE tokenizer: token strings by id (padded to the model's
    vocabulary with unused `[PAD<i>]` entries, as the converter pads), their types, merges and special ids."""
    spec = json.loads(tokenizer.tok.to_str())
    model = spec["model"]
    if model["type"] != "BPE" or model.get("byte_fallback"):
        raise ValueError(
            f"task.format=gguf writes byte-level BPE vocabularies only (this one is {model['type']}"
            f"{' with byte fallback' if model.get('byte_fallback') else ''}): export task.format=hf and convert "
            "it with llama.cpp's convert_hf_to_gguf.py"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    pre = _pre_name(spec["pre_tokenizer"], bool(merges))
    n = max(vocab_size, tokenizer.vocab_size)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TokenType.UNUSED] * n
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, TokenType.NORMAL
    for added in spec["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
    stops = sorted(tokenizer.stop_ids - {tokenizer.eos_id})
    return {
        "pre": pre,
        "tokens": tokens,
        "types": [int(t) for t in types],
        "merges": merges,
        "bos": tokenizer.bos_id,
        "eos": tokenizer.eos_id,
        "eot": stops[0] if len(stops) == 1 else None,
        "pad": tokenizer.pad_id,
        "add_bos": tokenizer.add_bos,
        "chat_template": tokenizer.chat_template,
    }


def _add_tokenizer(w: GGUFWriter, meta: dict) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    w.add_token_merges(meta["merges"])  # dropped when empty (a vocabulary of single bytes): GGUF has no empty arrays
    if meta["bos"] is not None:
        w.add_bos_token_id(meta["bos"])
    w.add_eos_token_id(meta["eos"])
    if meta["eot"] is not None:
        w.add_eot_token_id(meta["eot"])
    w.add_pad_token_id(meta["pad"])
    w.add_add_bos_token(meta["add_bos"])
    if meta["chat_template"]:
        w.add_chat_template(meta["chat_template"])
