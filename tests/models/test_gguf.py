"""models/gguf.py: dequantization per type, the q/k un-permutation, metadata -> ModelArgs, logits and token ids
against transformers' own GGUF loader on tiny files written here with gguf.GGUFWriter, and the error paths.
Slow: the real SmolLM2-135M-Instruct GGUF against transformers (fp32 logits, 32 greedy tokens, token ids)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from conftest import tiny_args
from gguf import GGML_QUANT_SIZES, GGUFWriter, RopeScalingType
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from tokenizers import pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from models.gguf import SUPPORTED_TYPES, _unpermute, load_gguf
from models.llama import ModelArgs, Transformer

# HF -> llama.cpp names, written out here independently of the loader's table.
_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Numbers 12345 and 3.14159 appear too.",
    "def square(x):\n    return x * x  # code, with    runs of spaces\n\tand tabs\n\n",
    "Unicode: naïve café, Ünïcödé, 日本語のテキスト, emoji 😀👍🏽 and accents àéîõü.",
    "I'm sure they've said we'll see; it's what you'd do. Don't stop!",
    "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nhi!<|im_end|>",
] * 20
STRINGS = [
    "Hello world",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nthree",
    "naïve café 日本語 Ünïcödé",
    "emoji 😀👍🏽🇫🇷 mixed",
    "def f(x):\n    return x**2  # square\n",
    "numbers 1234567 3.14159 -42",
    "I'm here, they've gone; we'll see",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]


def gguf_name(hf: str) -> str:
    stem, suffix = hf.rsplit(".", 1)
    if stem in _TOP:
        return f"{_TOP[stem]}.{suffix}"
    _, _, layer, rest = stem.split(".", 3)  # model.layers.N.self_attn.q_proj
    return f"blk.{layer}.{_TO_GGUF[rest]}.{suffix}"


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py q/k permutation: each head's rows go from [2, D/2] to [D/2, 2]."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum().clamp_min(1e-30)))


# --- tiny vocabularies ---------------------------------------------------------------------------------------


def _trained(tok: tokenizers.Tokenizer, trainer: BpeTrainer) -> tuple[list[str], list[str]]:
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return sorted(model["vocab"], key=model["vocab"].get), merges


@pytest.fixture(scope="module")
def byte_level_vocab() -> dict:
    """A byte-level BPE vocabulary like SmolLM2's: control tokens first, 256 byte symbols, learned merges."""
    tok = tokenizers.Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(vocab_size=600, special_tokens=SPECIALS, initial_alphabet=alphabet, show_progress=False)
    tokens, merges = _trained(tok, trainer)
    tokens.append("<think>")  # a user-defined token: must stay whole
    types = [3 if t in SPECIALS else 4 if t == "<think>" else 1 for t in tokens]
    return dict(model="gpt2", tokens=tokens, types=types, merges=merges, bos=1, eos=2, pad=2, add_bos=False)


@pytest.fixture(scope="module")
def sentencepiece_vocab() -> dict:
    """A Llama-2-style vocabulary: <unk> <s> </s>, 256 byte-fallback tokens, learned pieces scored by merge rank,
    no merges in the file (the loader must rebuild them from the scores)."""
    tok = tokenizers.Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    pieces, _ = _trained(tok, BpeTrainer(vocab_size=500, show_progress=False))
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return dict(model="llama", tokens=tokens, types=types, scores=scores, bos=1, eos=2, pad=None, add_bos=None)


# --- writing GGUF files --------------------------------------------------------------------------------------


def gguf_args(vocab: dict, **kw) -> ModelArgs:
    """conftest's tiny model with the vocabulary's size (and an intermediate size unlike the hidden's)."""
    return tiny_args(**{"vocab_size": len(vocab["tokens"]), "intermediate_size": 96, **kw})


def random_state(args: ModelArgs) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    # Norm weights near 1 but not equal to it, so a swapped or missing norm shows in the logits.
    return {k: (1 + 0.1 * torch.randn(s)) if "norm" in k else 0.1 * torch.randn(s) for k, s in shapes.items()}


def write_gguf(
    path: Path,
    args: ModelArgs,
    sd: dict[str, torch.Tensor],
    vocab: dict,
    arch: str = "llama",
    qtype: Q = Q.F32,
    raw: dict[str, tuple[np.ndarray, Q]] | None = None,
    pre: str = "smollm",
    extra_tensors: dict[str, np.ndarray] | None = None,
    meta=None,
) -> Path:
    """Write `sd` (HF names) as llama.cpp would: GGUF names, q/k permuted for llama, 2-D tensors as `qtype`.
    `raw` gives pre-quantized bytes for some HF names (the K-quant tests); `meta(writer)` adds metadata."""
    w = GGUFWriter(str(path), arch)
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.hidden_size)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_block_count(args.num_hidden_layers)
    w.add_head_count(args.num_attention_heads)
    w.add_head_count_kv(args.num_key_value_heads)
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.dim_head)
    w.add_tokenizer_model(vocab["model"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab["model"] == "gpt2":
        w.add_tokenizer_pre(pre)
        w.add_token_merges(vocab["merges"])
    else:
        w.add_token_scores(vocab["scores"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    if vocab["pad"] is not None:
        w.add_pad_token_id(vocab["pad"])
    if vocab["add_bos"] is not None:
        w.add_add_bos_token(vocab["add_bos"])
    w.add_chat_template(CHAT_TEMPLATE)
    if meta is not None:
        meta(w)
    for hf, t in sd.items():
        if raw is not None and hf in raw:
            data, raw_type = raw[hf]
            w.add_tensor(gguf_name(hf), data, raw_dtype=raw_type)
            continue
        a = t.float().numpy()
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            heads = args.num_attention_heads if ".q_proj." in hf else args.num_key_value_heads
            a = permute(a, heads)
        kind = qtype if a.ndim == 2 else Q.F32  # llama.cpp keeps norms and biases in F32
        w.add_tensor(gguf_name(hf), quantize(a, kind), raw_dtype=kind)
    for name, a in (extra_tensors or {}).items():
        w.add_tensor(name, a, raw_dtype=Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits(args: ModelArgs, sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    model = Transformer(args)
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model.eval()(ids)


# --- q/k un-permutation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_unpermute_inverts_llama_cpp_permute(heads):
    w = np.random.default_rng(0).standard_normal((heads * 16, 24)).astype(np.float32)
    np.testing.assert_array_equal(_unpermute(permute(w, heads), heads), w)
    bias = w[:, 0].copy()
    np.testing.assert_array_equal(_unpermute(permute(bias, heads), heads), bias)
    assert not np.array_equal(permute(w, heads), w)


def test_unpermuted_weights_with_rotate_half_equal_llama_cpp_interleaved_rope():
    """The reason for the un-permutation: llama.cpp rotates adjacent pairs (2i, 2i+1) of its permuted rows, HF
    rotates (i, i + D/2) of its own rows; after `_unpermute` both give the same rotated queries, head by head."""
    H, D, C, T = 2, 8, 12, 5
    g = torch.Generator().manual_seed(0)
    w_gguf = torch.randn(H * D, C, generator=g)
    x = torch.randn(T, C, generator=g)
    theta = 10000.0 ** (-torch.arange(D // 2) * 2 / D)  # [D/2]
    angle = torch.arange(T)[:, None, None] * theta  # [T, 1, D/2]
    cos, sin = angle.cos(), angle.sin()

    q = (x @ w_gguf.T).view(T, H, D // 2, 2)  # llama.cpp: pair i is (2i, 2i+1)
    a, b = q[..., 0], q[..., 1]
    rot_cpp = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)  # [T, H, D/2, 2]

    w_hf = torch.from_numpy(_unpermute(w_gguf.numpy(), H))
    q = (x @ w_hf.T).view(T, H, 2, D // 2)  # HF: pair i is (i, i + D/2)
    a, b = q[:, :, 0], q[:, :, 1]
    rot_hf = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=2)  # [T, H, 2, D/2]

    torch.testing.assert_close(rot_hf, rot_cpp.transpose(2, 3), rtol=1e-5, atol=1e-5)


# --- dequantization ------------------------------------------------------------------------------------------

# Lowest SQNR (dB) over the 2-D tensors of gguf's quantize -> our load, on `random_state` at seed 0. Measured
# minima: F16 73.4, BF16 55.5, Q8_0 45.3, Q5_0 27.2, Q5_1 28.3, Q4_0 21.1, Q4_1 21.9; thresholds leave ~3 dB
# (a wrong block layout or scale lands near 0 dB). Regenerate by printing min(sqnr_db) in the test.
ROUND_TRIP_SQNR = {Q.F16: 70, Q.BF16: 52, Q.Q8_0: 42, Q.Q5_0: 24, Q.Q5_1: 25, Q.Q4_0: 18, Q.Q4_1: 19}


@pytest.mark.parametrize("qtype", [Q.F32, *ROUND_TRIP_SQNR], ids=lambda q: q.name)
def test_dequantize_round_trip(tmp_path, byte_level_vocab, qtype):
    args = gguf_args(byte_level_vocab)
    sd = random_state(args)
    _, got, _ = load_gguf(write_gguf(tmp_path / "m.gguf", args, sd, byte_level_vocab, qtype=qtype))
    assert got.keys() == sd.keys()
    for k, ref in sd.items():
        assert got[k].dtype == torch.float32 and got[k].shape == ref.shape, k
        if qtype == Q.F32 or ref.ndim == 1:
            torch.testing.assert_close(got[k], ref, rtol=0, atol=0, msg=k)
        else:
            assert sqnr_db(ref, got[k]) > ROUND_TRIP_SQNR[qtype], k
            # Exactly gguf's own dequantization of what was written, un-permuted rows included.
            a = ref.numpy()
            heads = {"q_proj": args.num_attention_heads, "k_proj": args.num_key_value_heads}.get(k.split(".")[-2])
            a = permute(a, heads) if heads else a
            want = dequantize(quantize(a, qtype), qtype).reshape(a.shape)
            want = _unpermute(want, heads) if heads else want
            np.testing.assert_array_equal(got[k].numpy(), want, err_msg=k)


def _ref_scale_min_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4: eight 6-bit scales and mins packed in 12 bytes. sc [N, 12] -> ([N, 8], [N, 8])."""
    sc = sc.astype(np.int32)
    scale, mins = np.empty((len(sc), 8), np.int32), np.empty((len(sc), 8), np.int32)
    for j in range(8):
        if j < 4:
            scale[:, j], mins[:, j] = sc[:, j] & 63, sc[:, j + 4] & 63
        else:
            scale[:, j] = (sc[:, j + 4] & 0xF) | ((sc[:, j - 4] >> 6) << 4)
            mins[:, j] = (sc[:, j + 4] >> 4) | ((sc[:, j] >> 6) << 4)
    return scale, mins


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)  # [N, 2] bytes -> [N, 1]


def ref_q4_k(b: np.ndarray) -> np.ndarray:
    """Q4_K block (256 weights, 144 bytes): f16 d, f16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles.
    Each 32 bytes of nibbles hold 64 weights: low nibbles sub-block 2k, high nibbles sub-block 2k+1."""
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    scale, mins = _ref_scale_min_k4(b[:, 4:16])
    qs = b[:, 16:144].astype(np.int32)
    y = np.empty((len(b), 256), np.float32)
    for k in range(4):
        q = qs[:, 32 * k : 32 * k + 32]
        for half, nib in ((0, q & 0xF), (1, q >> 4)):
            s = 2 * k + half
            y[:, 32 * s : 32 * s + 32] = d * scale[:, s : s + 1] * nib - dmin * mins[:, s : s + 1]
    return y


def ref_q5_k(b: np.ndarray) -> np.ndarray:
    """Q5_K block (176 bytes): like Q4_K plus 32 bytes of fifth bits; bit s of qh[l] belongs to sub-block s."""
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    scale, mins = _ref_scale_min_k4(b[:, 4:16])
    qh, qs = b[:, 16:48].astype(np.int32), b[:, 48:176].astype(np.int32)
    y = np.empty((len(b), 256), np.float32)
    for k in range(4):
        q = qs[:, 32 * k : 32 * k + 32]
        for half, nib in ((0, q & 0xF), (1, q >> 4)):
            s = 2 * k + half
            v = nib + 16 * ((qh >> s) & 1)
            y[:, 32 * s : 32 * s + 32] = d * scale[:, s : s + 1] * v - dmin * mins[:, s : s + 1]
    return y


def ref_q6_k(b: np.ndarray) -> np.ndarray:
    """Q6_K block (210 bytes): 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, f16 d (last).
    Each 128-weight half uses 64 ql, 32 qh and 8 scales; scale index = 16-weight group."""
    ql, qh = b[:, 0:128].astype(np.int32), b[:, 128:192].astype(np.int32)
    sc, d = b[:, 192:208].copy().view(np.int8).astype(np.float32), _f16(b[:, 208:210])
    y = np.empty((len(b), 256), np.float32)
    for h in range(2):
        lo, hi, s = ql[:, 64 * h : 64 * h + 64], qh[:, 32 * h : 32 * h + 32], sc[:, 8 * h : 8 * h + 8]
        quarters = [
            (lo[:, :32] & 0xF) | ((hi & 3) << 4),
            (lo[:, 32:] & 0xF) | (((hi >> 2) & 3) << 4),
            (lo[:, :32] >> 4) | (((hi >> 4) & 3) << 4),
            (lo[:, 32:] >> 4) | (((hi >> 6) & 3) << 4),
        ]
        for i, q in enumerate(quarters):
            group = np.repeat(s[:, 2 * i : 2 * i + 2], 16, axis=1)  # [N, 32]: l // 16 picks the scale
            y[:, 128 * h + 32 * i : 128 * h + 32 * i + 32] = d * group * (q - 32)
    return y


K_QUANTS = {
    Q.Q4_K: (ref_q4_k, [(0, 2), (2, 4)]),
    Q.Q5_K: (ref_q5_k, [(0, 2), (2, 4)]),
    Q.Q6_K: (ref_q6_k, [(208, 210)]),
}


@pytest.mark.parametrize("qtype", list(K_QUANTS), ids=lambda q: q.name)
def test_k_quants_match_reference_dequantizer(tmp_path, byte_level_vocab, qtype):
    """gguf-py cannot quantize K types, so random blocks (with sane f16 scales) are decoded by a reference written
    from ggml's block layouts (ggml-common.h / dequantize_row_q*_K) and compared with what the loader returns."""
    ref, f16_slots = K_QUANTS[qtype]
    args = gguf_args(byte_level_vocab, hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    sd = random_state(args)
    rng = np.random.default_rng(0)
    block, size = GGML_QUANT_SIZES[qtype]
    raw, want = {}, {}
    for k, t in sd.items():
        if t.ndim != 2:
            continue
        blocks = rng.integers(0, 256, (t.numel() // block, size), dtype=np.uint8)
        for lo, hi in f16_slots:
            blocks[:, lo:hi] = rng.uniform(1e-3, 1e-2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
        raw[k] = (blocks.reshape(t.shape[0], -1), qtype)
        want[k] = ref(blocks).reshape(t.shape)
    _, got, _ = load_gguf(write_gguf(tmp_path / "k.gguf", args, sd, byte_level_vocab, raw=raw))
    for k, w in want.items():
        heads = {"q_proj": args.num_attention_heads, "k_proj": args.num_key_value_heads}.get(k.split(".")[-2])
        w = _unpermute(w, heads) if heads else w
        np.testing.assert_allclose(got[k].numpy(), w, rtol=1e-6, atol=1e-7, err_msg=k)


def test_supported_types_are_all_tested():
    assert set(SUPPORTED_TYPES) == {Q.F32, *ROUND_TRIP_SQNR, *K_QUANTS}


# --- metadata, model and tokenizer against transformers --------------------------------------------------------


def test_model_args_from_metadata(tmp_path, byte_level_vocab):
    args = gguf_args(byte_level_vocab, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=500000.0)
    path = write_gguf(tmp_path / "m.gguf", args, random_state(args), byte_level_vocab)
    got, sd, tok = load_gguf(path)
    assert got == args
    assert "lm_head.weight" in sd
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.stop_ids) == (1, 2, 2, False, {2})
    assert tok.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("llama", dict(tie_word_embeddings=True)),  # GQA, tied: SmolLM2's shape
        ("llama", dict(tie_word_embeddings=False, num_key_value_heads=4)),  # MHA, untied
        ("qwen2", dict(tie_word_embeddings=True, qkv_bias=True, model_type="qwen2")),  # q/k/v bias, no permutation
    ],
    ids=["llama-gqa-tied", "llama-mha-untied", "qwen2"],
)
def test_logits_match_transformers_gguf_loader(tmp_path, byte_level_vocab, arch, kw):
    transformers = pytest.importorskip("transformers")
    args = gguf_args(byte_level_vocab, **kw)
    write_gguf(tmp_path / "m.gguf", args, random_state(args), byte_level_vocab, arch=arch)
    got_args, sd, _ = load_gguf(tmp_path / "m.gguf")
    assert got_args == args
    ids = torch.randint(0, args.vocab_size, (2, 11))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        want = ref.eval()(ids).logits
    torch.testing.assert_close(logits(args, sd, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2"])
def test_byte_level_tokenizer_matches_transformers(tmp_path, byte_level_vocab, pre):
    transformers = pytest.importorskip("transformers")
    args = gguf_args(byte_level_vocab)
    write_gguf(tmp_path / "m.gguf", args, random_state(args), byte_level_vocab, pre=pre)
    _, _, tok = load_gguf(tmp_path / "m.gguf")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for s in [*STRINGS, "x <think> y"]:
        assert tok.encode(s, bos=False) == ref(s, add_special_tokens=False)["input_ids"], s
        assert tok.encode(s) == ref(s)["input_ids"], s
        assert tok.decode(tok.encode(s), skip_special=False) == s  # byte-level BPE is lossless
    assert tok.tok.token_to_id("<think>") in tok.encode("x <think> y")


def test_sentencepiece_tokenizer_matches_transformers(tmp_path, sentencepiece_vocab):
    transformers = pytest.importorskip("transformers")
    args = gguf_args(sentencepiece_vocab)
    write_gguf(tmp_path / "m.gguf", args, random_state(args), sentencepiece_vocab)
    _, _, tok = load_gguf(tmp_path / "m.gguf")
    assert tok.add_bos and tok.bos_id == 1  # llama.cpp's default for SentencePiece files without the flag
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for s in STRINGS:
        assert tok.encode(s, bos=False) == ref(s, add_special_tokens=False)["input_ids"], s
        assert tok.encode(s) == ref(s)["input_ids"], s
        assert tok.decode(tok.encode(s)) == ref.decode(ref(s)["input_ids"], skip_special_tokens=True), s
    assert all(3 <= i < 259 for i in tok.encode("Ωζ", bos=False)[1:]), "unseen characters fall back to bytes"


# --- rope metadata -------------------------------------------------------------------------------------------


def test_linear_rope_scaling_from_metadata(tmp_path, byte_level_vocab):
    args = gguf_args(byte_level_vocab)

    def meta(w):
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    got, _, _ = load_gguf(write_gguf(tmp_path / "m.gguf", args, random_state(args), byte_level_vocab, meta=meta))
    assert got.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def _llama3_divisors(args: ModelArgs, factor=8.0, lo=1.0, hi=4.0, ctx=8192) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs for Llama 3.1 (one divisor per frequency)."""
    inv = 1.0 / args.rope_theta ** (np.arange(0, args.dim_head, 2) / args.dim_head)
    wavelen = 2 * np.pi / inv
    smooth = np.clip((ctx / wavelen - lo) / (hi - lo), 0, 1)
    return (1 / ((1 - smooth) / factor + smooth)).astype(np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path, byte_level_vocab):
    args = gguf_args(byte_level_vocab, hidden_size=256, num_attention_heads=2, num_key_value_heads=1)
    extra = {"rope_freqs.weight": _llama3_divisors(args, factor=32.0)}
    got, sd, _ = load_gguf(
        write_gguf(tmp_path / "m.gguf", args, random_state(args), byte_level_vocab, extra_tensors=extra)
    )
    assert got.rope_scaling == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in sd
    extra = {"rope_freqs.weight": _llama3_divisors(args, hi=2.0)}
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        load_gguf(write_gguf(tmp_path / "bad.gguf", args, random_state(args), byte_level_vocab, extra_tensors=extra))


# --- errors --------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_file(tmp_path, byte_level_vocab) -> Path:
    args = gguf_args(byte_level_vocab)
    return write_gguf(tmp_path / "m.gguf", args, random_state(args), byte_level_vocab, qtype=Q.Q8_0)


def test_truncated_file_names_file_and_tensor(tiny_file, tmp_path):
    data = tiny_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"cut\.gguf.*'blk\.1\.[a-z_]+\.weight'"):
        load_gguf(cut)
    cut.write_bytes(data[:100])  # inside the header
    with pytest.raises(ValueError, match=r"cut\.gguf: truncated or corrupt"):
        load_gguf(cut)
    cut.write_bytes(b"GGML" + data[4:])
    with pytest.raises(ValueError, match=r"cut\.gguf"):
        load_gguf(cut)
    cut.write_bytes(b"")  # issue 16: an empty file raised numpy's "cannot mmap an empty file", naming no file
    with pytest.raises(ValueError, match=r"cut\.gguf: empty file"):
        load_gguf(cut)


@pytest.mark.parametrize(
    "change,match",
    [
        (
            dict(drop="model.layers.1.mlp.up_proj.weight"),
            r"m\.gguf: missing tensor for 'model\.layers\.1\.mlp\.up_proj",
        ),
        (dict(shape="model.layers.0.self_attn.v_proj.weight"), r"m\.gguf: tensor 'blk\.0\.attn_v\.weight' has shape"),
        (dict(extra="blk.0.attn_q_norm.weight"), r"m\.gguf: unexpected tensor 'blk\.0\.attn_q_norm\.weight'"),
        (dict(arch="gemma"), r"m\.gguf: architecture 'gemma' is not supported"),
    ],
    ids=["missing", "shape", "unexpected", "arch"],
)
def test_bad_contents_name_file_and_tensor(tmp_path, byte_level_vocab, change, match):
    args = gguf_args(byte_level_vocab)
    sd = random_state(args)
    sd.pop(change.get("drop"), None)
    if "shape" in change:
        sd[change["shape"]] = torch.randn(args.hidden_size, args.hidden_size)
    extra = {change["extra"]: np.ones(16, np.float32)} if "extra" in change else None
    path = write_gguf(
        tmp_path / "m.gguf", args, sd, byte_level_vocab, arch=change.get("arch", "llama"), extra_tensors=extra
    )
    with pytest.raises(ValueError, match=match):
        load_gguf(path)


def test_unsupported_type_names_tensor_and_type(tmp_path, byte_level_vocab):
    args = gguf_args(byte_level_vocab, hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    sd = random_state(args)
    block, size = GGML_QUANT_SIZES[Q.Q2_K]
    t = sd["model.layers.0.mlp.down_proj.weight"]
    blocks = np.zeros((t.shape[0], t.shape[1] // block * size), np.uint8)
    path = write_gguf(
        tmp_path / "m.gguf", args, sd, byte_level_vocab, raw={"model.layers.0.mlp.down_proj.weight": (blocks, Q.Q2_K)}
    )
    with pytest.raises(ValueError, match=r"m\.gguf: tensor 'blk\.0\.ffn_down\.weight' has type Q2_K"):
        load_gguf(path)


def test_missing_metadata_names_key(tmp_path, byte_level_vocab):
    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_embedding_length(64)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(byte_level_vocab["tokens"])
    w.add_token_merges(byte_level_vocab["merges"])
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"m\.gguf: metadata key 'llama\.attention\.head_count' is missing"):
        load_gguf(path)


# --- the real SmolLM2 file (slow) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf):
    """(ours: (ModelArgs, state dict, Tokenizer), transformers: (model, tokenizer)) from the same GGUF file."""
    transformers = pytest.importorskip("transformers")
    ours = load_gguf(smollm2_gguf)
    kw = dict(gguf_file=smollm2_gguf.name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw).eval()
    return ours, (ref, transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw))


CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Explain in three paragraphs how photosynthesis works. 🌱"},
]


@pytest.mark.slow
def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2_pair):
    (args, sd, tok), (ref, ref_tok) = smollm2_pair
    assert (args.vocab_size, args.num_hidden_layers, args.tie_word_embeddings) == (49152, 30, True)
    model = Transformer(args)
    model.load_state_dict(sd, strict=True)
    model.eval()
    prompt = torch.tensor([tok.encode(tok.apply_chat_template(CHAT))])
    T = prompt.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model(prompt), ref(prompt).logits, rtol=0, atol=1e-3)
        mask = torch.ones_like(prompt)
        out = ref.generate(prompt, attention_mask=mask, max_new_tokens=32, do_sample=False)[0, T:]
        # Greedy with our KV cache: one prefill, then one token at a time (the CPU-cheap way to 32 tokens).
        model.setup_caches(1, T + 32)
        ids = [int(model(prompt, input_pos=torch.arange(T))[0, -1].argmax())]
        for i in range(31):
            ids.append(int(model(torch.tensor([[ids[-1]]]), input_pos=torch.tensor([T + i]))[0, -1].argmax()))
    assert len(out) == 32  # the prompt asks for a long answer, so no early EOS
    assert ids == out.tolist()


@pytest.mark.slow
def test_smollm2_token_ids_match_transformers(smollm2_pair):
    (_, _, tok), (_, ref_tok) = smollm2_pair
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
    chat = tok.apply_chat_template(CHAT)
    assert chat == ref_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for s in [*STRINGS, chat, "x = [i ** 2 for i in range(10)]  # 😀\r\n\t\tdone", "ℌ𝔢𝔩𝔩𝔬 ﬁ ½ 𝟙𝟚𝟛"]:
        assert tok.encode(s) == ref_tok(s)["input_ids"], s
        assert tok.encode(s, bos=False) == ref_tok(s, add_special_tokens=False)["input_ids"], s
        assert tok.decode(tok.encode(s), skip_special=False) == s
