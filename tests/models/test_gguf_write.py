"""models/gguf_write.py: what it writes reads back through our GGUF reader (models/gguf.py) as the same model, for
each architecture flag the reader knows; Q4 block packing against gguf-py's own dequantizer; tokenizer refusals."""

import pytest
import torch
from conftest import tiny_model
from gguf import LlamaFileType
from gguf.quants import dequantize

from models.gguf import load_gguf
from models.gguf_write import Q4Blocks, permute, q4_blocks, tokenizer_metadata, write_gguf
from models.tokenizer import Tokenizer

VARIANTS = {
    "plain": {},
    "untied_head_dim_bias": {"tie_word_embeddings": False, "head_dim": 32, "attention_bias": True},
    "qwen2": {"qkv_bias": True, "model_type": "qwen2"},
    "linear_rope": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "llama3_rope": {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    },
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_f32_file_reads_back_as_the_same_model(tmp_path, variant):
    model = tiny_model(**VARIANTS[variant])
    for p in model.parameters():  # biases start at zero: give every tensor distinct values
        torch.nn.init.normal_(p, std=0.1)
    tok = Tokenizer.bytes()
    path = write_gguf(tmp_path / "m.gguf", model.args, model.state_dict(), tok, "tiny", "f32", LlamaFileType.ALL_F32)
    args, sd, tok2 = load_gguf(path)
    assert args == model.args
    assert sd.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(sd[k], v, atol=0, rtol=0, msg=k)
    assert tok2.encode("héllo") == tok.encode("héllo") and tok2.chat_template == tok.chat_template
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id, tok2.add_bos) == (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos)


def test_bf16_file_holds_bf16_rounded_weights(tmp_path):
    model = tiny_model()
    path = write_gguf(
        tmp_path / "m.gguf", model.args, model.state_dict(), Tokenizer.bytes(), "t", "bf16", LlamaFileType.MOSTLY_BF16
    )
    _, sd, _ = load_gguf(path)
    w = model.model.layers[0].mlp.up_proj.weight
    torch.testing.assert_close(sd["model.layers.0.mlp.up_proj.weight"], w.bfloat16().float(), atol=0, rtol=0)
    torch.testing.assert_close(sd["model.norm.weight"], model.model.norm.weight, atol=0, rtol=0)  # norms stay F32


@pytest.mark.parametrize("asym", [True, False])
def test_q4_blocks_match_gguf_py_dequantize(asym):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (6, 96), generator=g, dtype=torch.uint8)
    d = torch.randn(6, 3, generator=g).half().float()
    m = torch.randn(6, 3, generator=g).half().float() if asym else None
    b = Q4Blocks(q, d, m)
    got = torch.from_numpy(dequantize(q4_blocks(b), b.qtype).reshape(6, 96))
    want = (q.float() - (0 if asym else 8)) * d.repeat_interleave(32, 1)
    if asym:
        want += m.repeat_interleave(32, 1)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_permute_pairs_rotary_halves():
    # one head of 4 rows: HF order [x0, x1 | y0, y1] (rotate-half pairs x_i with y_i) -> llama.cpp [x0, y0, x1, y1]
    w = torch.arange(8).reshape(4, 2)
    assert permute(w, 1)[:, 0].tolist() == [0, 4, 2, 6]


def test_a_tokenizer_llama_cpp_cannot_name_is_refused():
    import tokenizers

    tok = Tokenizer.bytes()
    tok.tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.tok.model = tokenizers.models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])
    with pytest.raises(ValueError, match="has no llama.cpp name .* convert_hf_to_gguf.py"):
        tokenizer_metadata(tok, 259)
