"""Read a llama.cpp GGUF file as this project's model: `ModelArgs`, a float32 state dict with HF Llama key names,
and a `Tokenizer` rebuilt from the file's metadata.

    args, state_dict, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

What it does, in order:
- `ModelArgs` from the `<arch>.*` metadata (architectures `llama`, `qwen2`, `qwen3`, `gemma2`, `gemma3`, `phi3`;
  what llama.cpp hard-codes per architecture, such as Gemma's sliding-layer pattern, is in `_FAMILY_ARGS`);
  `tie_word_embeddings` is true when the file has no `output.weight`; the vocabulary size is `<arch>.vocab_size`,
  else the token list length.
- Every tensor is dequantized to float32 with gguf-py's `gguf.quants.dequantize` (types in `SUPPORTED_TYPES`, each
  one checked in tests/models/test_gguf.py), renamed to HF keys (`_block_names`), and for `llama` the q/k rows are
  put back in HF order (llama.cpp's convert_hf_to_gguf.py interleaves the two rotary halves; see `_unpermute`).
  Gemma files store every norm weight with Gemma's +1 already added (the converter's modify_tensors): it is taken
  off again. Phi-3's fused attn_qkv / ffn_up (gate and up) are split as its HF checkpoints are
  (models.checkpoint.from_hf_state_dict); its LongRoPE factors come from the rope_factors_long/short tensors.
- The tokenizer is rebuilt as a `tokenizers.Tokenizer` the way transformers' GGUF loader builds it, so ids match
  `AutoTokenizer.from_pretrained(dir, gguf_file=...)`: byte-level BPE for `tokenizer.ggml.model == "gpt2"`
  (SmolLM2, Llama 3, Qwen2) and SentencePiece-style BPE with byte fallback for `"llama"` (Llama 2, Mistral).

Files written: none. Knobs: none; everything comes from the file.
Errors: a truncated or corrupt file, a missing or unexpected tensor, a shape mismatch or an unsupported
quantization type raises ValueError naming the file and the tensor.
"""

from __future__ import annotations

import math
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import tokenizers
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers.models import BPE

from models.checkpoint import from_hf_state_dict, to_hf_state_dict
from models.llama import ModelArgs, Transformer, rope_frequencies
from models.tokenizer import Tokenizer

Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
_GEMMA = ("gemma2", "gemma3")  # norm weights stored as 1 + HF's weight

# llama.cpp tensor name inside block N (`blk.N.<name>`) -> HF name inside `model.layers.N.` (llama.cpp's
# gguf-py/gguf/tensor_mapping.py lists the same pairs from the other side).
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Where an architecture's names differ (gguf-py's tensor_mapping.py: Gemma's ffn_norm is its pre-feedforward norm and
# post_attention_norm the attention's output norm; Phi-3's fused tensors keep HF's fused names until split).
_ARCH_NAMES = {
    "qwen3": {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "gemma2": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
}
_ARCH_NAMES["gemma3"] = {**_ARCH_NAMES["gemma2"], **_ARCH_NAMES["qwen3"]}
# Extra tensors an architecture's metadata is read from rather than loaded as weights.
_META_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def _block_names(arch: str) -> dict[str, str]:
    return {**_BLOCK_NAMES, **_ARCH_NAMES.get(arch, {})}


# tokenizer.ggml.token_type values (llama.cpp's llama_token_type enum).
_CONTROL, _USER_DEFINED = 3, 4

# Split patterns for the byte-level pre-tokenizers named by `tokenizer.ggml.pre` that do not use GPT-2's default
# regex. They are the pretokenization regexes published in the Llama 3 and Qwen2 tokenizer.json files; any other
# `pre` value (SmolLM2's "smollm" included) gets GPT-2's regex, as transformers' GGUF loader does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


def load_gguf(path: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor], Tokenizer]:
    """Return (ModelArgs, float32 state dict with HF Llama keys, Tokenizer) for the GGUF file at `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not a GGUF model; re-download it")
    try:
        reader = GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as e:
        cut = _truncated_tensor(path)
        where = f"tensor {cut!r} runs past the end of the file" if cut else "header"
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({where}: {e}); re-download it") from e
    meta = _Metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    tensors = {t.name: t for t in reader.tensors}
    tokenizer = _tokenizer(meta)
    args = _model_args(meta, arch, tensors)
    return args, _state_dict(path, arch, args, tensors), tokenizer


class _Metadata:
    """Key-value access to a GGUF header; a missing required key is a ValueError naming the file."""

    def __init__(self, reader: GGUFReader, path: Path):
        self.fields, self.path = reader.fields, path

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default=...):
        if key not in self.fields:
            if default is ...:
                raise ValueError(f"{self.path}: metadata key {key!r} is missing")
            return default
        try:
            return self.fields[key].contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: metadata key {key!r} is corrupt ({e})") from e


# --- model arguments -----------------------------------------------------------------------------------------


def _model_args(meta: _Metadata, arch: str, tensors: dict) -> ModelArgs:
    hidden = meta.get(f"{arch}.embedding_length")
    heads = meta.get(f"{arch}.attention.head_count")
    # Absent keys take llama.cpp's own defaults for them (llama-model.cpp): MHA and a RoPE base of 10000.
    key_length = meta.get(f"{arch}.attention.key_length", None)
    fields = dict(
        vocab_size=meta.get(f"{arch}.vocab_size", len(meta.fields["tokenizer.ggml.tokens"].data)),
        hidden_size=hidden,
        intermediate_size=meta.get(f"{arch}.feed_forward_length"),
        num_hidden_layers=meta.get(f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
        max_position_embeddings=meta.get(f"{arch}.context_length"),
        rms_norm_eps=_decimal(meta.get(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=_decimal(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
        rope_scaling=_rope_scaling(meta, arch),
        head_dim=None if key_length in (None, hidden // heads) else key_length,
        attention_bias=arch == "llama" and "blk.0.attn_q.bias" in tensors,
        qkv_bias=arch == "qwen2",
    )
    if arch in _FAMILY_ARGS:
        fields.update(_FAMILY_ARGS[arch](meta, arch, tensors))
    args = ModelArgs(**fields)
    if "rope_freqs.weight" in tensors:
        args = replace(
            args, rope_scaling=_llama3_scaling(meta.path, args, _read(meta.path, tensors["rope_freqs.weight"]))
        )
    return args


def _optional(meta: _Metadata, key: str) -> float | None:
    value = meta.get(key, None)
    return None if value is None or value == 0 else _decimal(value)


def _query_scalar(meta: _Metadata, arch: str, n_layer_27b: int) -> float:
    """What Gemma scales the scores by, as llama.cpp derives it (llama-model.cpp, after gemma_pytorch's config.py):
    hidden_size / heads for the 27B models (identified by their layer count), head_dim for every other size."""
    hidden, heads = meta.get(f"{arch}.embedding_length"), meta.get(f"{arch}.attention.head_count")
    if meta.get(f"{arch}.block_count") == n_layer_27b:
        return hidden // heads
    return meta.get(f"{arch}.attention.key_length", hidden // heads)


def _gemma(meta: _Metadata, arch: str, every: int) -> dict:
    """Gemma 2/3's fields; llama.cpp makes every `every`-th layer global, the others sliding (set_swa_pattern)."""
    n = meta.get(f"{arch}.block_count")
    window = meta.get(f"{arch}.attention.sliding_window", 0)
    types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    return dict(
        hidden_act="gelu_pytorch_tanh",
        norm_plus_one=True,
        post_norms=True,
        embedding_multiplier=meta.get(f"{arch}.embedding_length") ** 0.5,
        final_logit_softcapping=_optional(meta, f"{arch}.final_logit_softcapping"),
        sliding_window=window or None,
        layer_types=types if window else None,
    )


def _gemma2_args(meta: _Metadata, arch: str, tensors: dict) -> dict:
    return dict(
        _gemma(meta, arch, every=2),
        model_type="gemma2",
        attn_logit_softcapping=_optional(meta, f"{arch}.attn_logit_softcapping"),
        query_pre_attn_scalar=_query_scalar(meta, arch, n_layer_27b=46),
    )


def _gemma3_args(meta: _Metadata, arch: str, tensors: dict) -> dict:
    # llama.cpp's sliding layers use RoPE base 10000 unscaled unless the file says otherwise (rope.freq_base_swa).
    return dict(
        _gemma(meta, arch, every=6),
        model_type="gemma3_text",
        qk_norm=True,
        query_pre_attn_scalar=_query_scalar(meta, arch, n_layer_27b=62),
        rope_local_base_freq=_decimal(meta.get(f"{arch}.rope.freq_base_swa", 10000.0)),
    )


def _phi3_args(meta: _Metadata, arch: str, tensors: dict) -> dict:
    """Phi-3: partial rotary dims (rope.dimension_count), every layer sliding when sliding_window > 0 (as
    transformers runs it; the converter writes 0 for none), LongRoPE from the two factor tensors."""
    heads, hidden = meta.get(f"{arch}.attention.head_count"), meta.get(f"{arch}.embedding_length")
    head_dim = meta.get(f"{arch}.attention.key_length", hidden // heads)
    n, window = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.attention.sliding_window", 0)
    out = dict(
        model_type="phi3",
        partial_rotary_factor=meta.get(f"{arch}.rope.dimension_count", head_dim) / head_dim,
        sliding_window=window or None,
        layer_types=["sliding_attention"] * n if window else None,
    )
    if "rope_factors_long.weight" in tensors:
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        scaling = {
            "rope_type": "longrope",
            "short_factor": [_decimal(f) for f in _read(meta.path, tensors["rope_factors_short.weight"]).tolist()],
            "long_factor": [_decimal(f) for f in _read(meta.path, tensors["rope_factors_long.weight"]).tolist()],
            "original_max_position_embeddings": orig,
        }
        factor = _decimal(meta.get(f"{arch}.rope.scaling.attn_factor", 1.0))
        # Keep the file's attention factor only where it is not the one LongRoPE derives from the lengths.
        derived = math.sqrt(1 + math.log(meta.get(f"{arch}.context_length") / orig) / math.log(orig))
        if abs(factor - derived) > 1e-6 * derived:
            scaling["attention_factor"] = factor
        out["rope_scaling"] = scaling
    return out


# ModelArgs fields per architecture beyond the shared keys (what llama.cpp's hparams loader fixes per arch).
_FAMILY_ARGS = {
    "qwen2": lambda meta, arch, tensors: dict(model_type="qwen2"),
    "qwen3": lambda meta, arch, tensors: dict(model_type="qwen3", qk_norm=True),
    "gemma2": _gemma2_args,
    "gemma3": _gemma3_args,
    "phi3": _phi3_args,
}


def _decimal(x: float) -> float:
    """GGUF stores these as float32: 1e-5 reads back as 9.99999974e-06. Take the shortest decimal that is the same
    float32, which is the value in the source config.json, so saved model_args.json match HF's."""
    return float(str(np.float32(x)))


def _rope_scaling(meta: _Metadata, arch: str) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _decimal(meta.get(f"{arch}.rope.scaling.factor"))}
    raise ValueError(f"{meta.path}: RoPE scaling {kind!r} is not supported (none, linear, llama3)")


def _llama3_scaling(path: Path, args: ModelArgs, rope_freqs: np.ndarray) -> dict:
    """Llama 3.1+ files store llama3 RoPE scaling as per-frequency divisors (`rope_freqs`), not as its parameters.

    Rebuild the parameters from Meta's published values (factor = the largest divisor, low/high frequency factors
    1 and 4, original context 8192: Llama 3.1/3.2 config.json) and accept them only if our model's frequencies then
    equal the file's exactly.
    """
    scaling = {
        "rope_type": "llama3",
        "factor": float(rope_freqs.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    expected = rope_frequencies(replace(args, rope_scaling=None)) / torch.from_numpy(rope_freqs.astype(np.float32))
    if rope_freqs.shape != (args.dim_head // 2,) or not torch.allclose(
        rope_frequencies(replace(args, rope_scaling=scaling)), expected, rtol=1e-5
    ):
        raise ValueError(f"{path}: tensor 'rope_freqs.weight' is not llama3 RoPE scaling with Meta's parameters")
    return scaling


# --- tensors -------------------------------------------------------------------------------------------------


def _hf_name(name: str, arch: str) -> str | None:
    stem, _, suffix = name.rpartition(".")  # "blk.3.attn_q", "weight"
    parts = stem.split(".")
    names = _block_names(arch)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{suffix}"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    return None


def _read(path: Path, t) -> np.ndarray:
    """Dequantize one reader tensor to a writable float32 array in numpy (row-major, HF) order."""
    qtype = GGMLQuantizationType(t.tensor_type)
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(
            f"{path}: tensor {t.name!r} has type {qtype.name}, not supported "
            f"({', '.join(q.name for q in SUPPORTED_TYPES)}); re-quantize the file or add the type"
        )
    shape = tuple(reversed([int(d) for d in t.shape]))  # GGUF lists dims innermost first
    data = t.data.view(np.ndarray)  # plain array: memmap slicing in dequantize costs seconds per model
    # F32 comes back as a read-only view of the memory-mapped file; np.array copies it so torch can own it.
    return np.array(dequantize(data, qtype), dtype=np.float32).reshape(shape)


def _truncated_tensor(path: Path) -> str | None:
    """The first tensor whose data runs past the end of the file, or None; only for error messages, because
    GGUFReader's own error on a truncated file names no tensor. Walks the little-endian GGUF v2/v3 header:
    magic, version, counts, key-value pairs, tensor infos (github.com/ggml-org/ggml docs/gguf.md)."""
    buf = np.memmap(path, mode="r")
    pos = 24  # magic u32, version u32, tensor count u64, kv count u64

    def take(fmt: str):
        nonlocal pos
        out = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)  # "<": packed, no native alignment padding
        return out[0] if len(out) == 1 else out

    def text() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(buf[pos - n : pos]).decode()

    def skip_value(vtype: int):
        nonlocal pos
        if vtype == GGUFValueType.STRING:
            text()
        elif vtype == GGUFValueType.ARRAY:
            etype, count = take("IQ")
            if etype in GGUFReader.gguf_scalar_to_np:
                pos += count * np.dtype(GGUFReader.gguf_scalar_to_np[etype]).itemsize
            else:
                for _ in range(count):
                    skip_value(etype)
        else:
            pos += np.dtype(GGUFReader.gguf_scalar_to_np[GGUFValueType(vtype)]).itemsize

    try:
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        alignment = 32  # GGUF's default when general.alignment is absent
        for _ in range(n_kv):
            key, vtype = text(), take("I")
            if key == "general.alignment":
                alignment = take("I")
            else:
                skip_value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = text()
            dims = [take("Q") for _ in range(take("I"))]
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(take("I"))]
            infos.append((name, take("Q"), int(np.prod(dims)) // block * type_size))
    except (struct.error, ValueError, KeyError, UnicodeDecodeError):
        return None  # the header itself is cut or garbled: no tensor to name
    start = -(-pos // alignment) * alignment
    return next((name for name, offset, nbytes in infos if start + offset + nbytes > len(buf)), None)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (LlamaModel.permute in convert_hf_to_gguf.py).

    HF's rotate-half RoPE pairs dimension i with i + D/2 inside each head; llama.cpp's kernel pairs 2i with 2i+1,
    so the converter reorders each head's rows from [2, D/2] to [D/2, 2]. Going back swaps the two axes again.
    Works for weights [H*D, C] and biases [H*D].
    """
    rows = w.shape[0]
    w = w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])  # [H, D/2, 2, (C)]
    return w.swapaxes(1, 2).reshape(rows, *w.shape[3:])  # [H*D, (C)], rows in HF order


def _state_dict(path: Path, arch: str, args: ModelArgs, tensors: dict) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # in the file's (HF) layout: Phi-3's fused tensors whole
        expected = {k: tuple(v.shape) for k, v in to_hf_state_dict(args, Transformer(args).state_dict()).items()}
    gguf_name = {}
    for name in tensors:
        hf = _hf_name(name, arch)
        if hf is None and name not in _META_TENSORS:  # those were folded into args.rope_scaling
            raise ValueError(f"{path}: unexpected tensor {name!r}: not a {arch} tensor this loader knows")
        if hf is not None:
            if hf not in expected:
                raise ValueError(f"{path}: unexpected tensor {name!r} (as {hf!r}) for this model's ModelArgs")
            gguf_name[hf] = name
    for hf in expected:
        if hf not in gguf_name:
            raise ValueError(f"{path}: missing tensor for {hf!r}")
    sd = {}
    for hf, shape in expected.items():
        name = gguf_name[hf]
        w = _read(path, tensors[name])
        if w.shape != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {w.shape}, ModelArgs need {shape} for {hf!r}")
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            w = _unpermute(w, args.num_attention_heads if ".attn_q." in name else args.num_key_value_heads)
        if arch in _GEMMA and name.endswith("norm.weight"):
            w = w - 1  # the converter stored 1 + weight (Gemma's RMSNorm scales by 1 + weight)
        sd[hf] = torch.from_numpy(w)
    return from_hf_state_dict(args, sd)


# --- tokenizer -----------------------------------------------------------------------------------------------


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes keep their character, the other 68
    bytes take code points 256, 257, ... in byte order (Radford et al. 2019, GPT-2 encoder.py)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


def _tokenizer(meta: _Metadata) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"{meta.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if kind == "gpt2":
        tok, added = _byte_level_bpe(meta, tokens, types)
    elif kind == "llama":
        tok, added = _sentencepiece_bpe(meta, tokens, types)
    else:
        raise ValueError(f"{meta.path}: tokenizer.ggml.model={kind!r} is not supported (gpt2, llama)")
    tok.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True) for i in added])
    # User-defined tokens (like "<think>") are matched whole by llama.cpp, so they are added tokens here too.
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == _USER_DEFINED
    ]
    tok.add_tokens(user)

    eos = meta.get("tokenizer.ggml.eos_token_id")
    stop = {meta.get(f"tokenizer.ggml.{k}_token_id", eos) for k in ("eot", "eom")}
    # llama.cpp adds BOS for SentencePiece vocabularies unless the file says otherwise, and not for byte-level ones.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    return Tokenizer(
        tok,
        bos_id=meta.get("tokenizer.ggml.bos_token_id", None),
        eos_id=eos,
        pad_id=meta.get("tokenizer.ggml.padding_token_id", None),
        stop_ids=stop,
        add_bos=add_bos,
        chat_template=meta.get("tokenizer.chat_template", None),
    )


def _merges(meta: _Metadata) -> list[tuple[str, str]]:
    out = []
    for m in meta.get("tokenizer.ggml.merges", []):  # absent: a vocabulary of single bytes (GGUF has no empty arrays)
        left, sep, right = m.partition(" ")
        if not sep:
            raise ValueError(f"{meta.path}: tokenizer.ggml.merges entry {m!r} is not 'left right'")
        out.append((left, right))
    return out


def _byte_level_bpe(meta: _Metadata, tokens: list[str], types: list[int]):
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    # Some converters store a token's raw text instead of its byte-level spelling; respell those.
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in tokens]
    tok = tokenizers.Tokenizer(BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=_merges(meta), fuse_unk=False))
    split = _SPLITS.get(meta.get("tokenizer.ggml.pre", "default"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    # A control token outside the byte alphabet is a converter mislabel; adding it would grow the vocabulary.
    control = [i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty == _CONTROL and set(t) <= alphabet]
    return tok, control


def _sentencepiece_bpe(meta: _Metadata, tokens: list[str], types: list[int]):
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = _merges(meta)
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if len(scores) != len(tokens):
            raise ValueError(f"{meta.path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
        merges = _merges_from_scores(tokens, scores, vocab)
    unk = meta.get("tokenizer.ggml.unknown_token_id", None)
    tok = tokenizers.Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            unk_token=None if unk is None else tokens[unk],
            fuse_unk=True,
            byte_fallback=True,  # "<0x0A>"-style byte tokens cover text outside the vocabulary
        )
    )
    # SentencePiece marks word starts with U+2581 and, by default, prefixes the text with one.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
    return tok, [i for i, ty in enumerate(types) if ty == _CONTROL]


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE files keep scores, not merges. A token splittable into two vocabulary pieces is a merge,
    ranked by the token's score (higher first), then longer left and right pieces, then token and piece ids."""
    ranked = []
    for i, (t, s) in enumerate(zip(tokens, scores, strict=True)):
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in vocab and right in vocab:
                ranked.append(((-s, -len(left), -len(right), i, vocab[left], vocab[right]), (left, right)))
    ranked.sort(key=lambda r: r[0])
    return [pair for _, pair in ranked]
