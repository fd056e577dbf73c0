"""models/llama.py against transformers' reference models (fp32, CPU), through our hf checkpointer."""

import pytest
import torch
from conftest import make_tiny_hf, tiny_args

from models.checkpoint import check_and_load, load_checkpoint
from models.llama import ModelArgs, Transformer, rope_frequencies

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
VARIANTS = {
    "llama_gqa_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_mha_untied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3_rope_scaling": ("llama", dict(rope_scaling=LLAMA3_SCALING, rope_theta=500000.0)),
    "llama_linear_scaling": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_attention_bias": ("llama", dict(attention_bias=True)),
    "mistral": ("mistral", dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
}


def _load_pair(tmp_path, kind, overrides):
    import transformers

    d = make_tiny_hf(tmp_path / "hf", kind, **overrides)
    ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    args, sd, tok, _ = load_checkpoint("hf", d)
    with torch.device("meta"):
        ours = Transformer(args)
    check_and_load(ours, sd, d)
    ours.inv_freq = rope_frequencies(args)
    return ref, ours.eval(), tok


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch", [1, 3])
def test_logits_match_transformers(tmp_path, variant, batch):
    kind, overrides = VARIANTS[variant]
    ref, ours, _ = _load_pair(tmp_path, kind, overrides)
    x = torch.randint(0, 259, (batch, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "llama3_rope_scaling", "qwen2"])
def test_kv_cache_decode_equals_full_forward(tmp_path, variant):
    kind, overrides = VARIANTS[variant]
    _, model, _ = _load_pair(tmp_path, kind, overrides)
    x = torch.randint(0, 259, (2, 24))
    with torch.no_grad():
        full = model(x)
        model.setup_caches(2, 32)
        steps = [model(x[:, :16], input_pos=torch.arange(16))]
        for t in range(16, 24):
            steps.append(model(x[:, t : t + 1], input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_float32_cache_under_bf16_model(tmp_path):
    """The generate stage's CPU setting: bf16 weights and activations, attention over a float32 cache. Decode
    stays bf16 on the outside and tracks the float32 model as closely as an all-bf16 decode does."""
    _, model, _ = _load_pair(tmp_path, "llama", {})
    x = torch.randint(0, 259, (2, 24))
    with torch.no_grad():
        exact = model(x)
        model.to(torch.bfloat16)
        out = {}
        for cache_dtype in (torch.float32, torch.bfloat16):
            model.setup_caches(2, 32, dtype=cache_dtype)
            steps = [model(x[:, :16], input_pos=torch.arange(16))]
            for t in range(16, 24):
                steps.append(model(x[:, t : t + 1], input_pos=torch.tensor([t])))
            out[cache_dtype] = torch.cat(steps, 1)
            assert out[cache_dtype].dtype == torch.bfloat16
            assert model.model.layers[0].self_attn.kv_cache.k.dtype == cache_dtype
    err = {dt: (o.float() - exact).abs().max().item() for dt, o in out.items()}
    assert err[torch.float32] < 0.02, err  # logits of size ~1; bf16 keeps ~3 significant digits
    assert err[torch.float32] < 2 * err[torch.bfloat16], err


def test_left_padded_batch_equals_each_row_alone(tmp_path):
    _, model, _ = _load_pair(tmp_path, "llama", {})
    a, b = torch.randint(0, 259, (1, 10)), torch.randint(0, 259, (1, 6))
    pad = 4
    batch = torch.cat([a, torch.cat([torch.full((1, pad), 258), b], 1)])  # [2, 10], row 1 left-padded
    key_mask = torch.ones(2, 16, dtype=torch.bool)
    key_mask[1, :pad] = False
    positions = torch.stack([torch.arange(10), (torch.arange(10) - pad).clamp(min=0)])
    with torch.no_grad():
        model.setup_caches(2, 16)
        out = model(batch, input_pos=torch.arange(10), position_ids=positions, key_padding_mask=key_mask)
        model.clear_caches()
        torch.testing.assert_close(out[0:1], model(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1:2, pad:], model(b), atol=1e-5, rtol=1e-5)
        # Without a cache too (scoring batches).
        nocache = model(batch, position_ids=positions, key_padding_mask=key_mask[:, :10])
        torch.testing.assert_close(nocache[1:2, pad:], model(b), atol=1e-5, rtol=1e-5)


def test_decode_without_cache_is_a_clear_error():
    args = tiny_args(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    with pytest.raises(RuntimeError, match="setup_caches"):
        Transformer(args)(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([0]))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "yarn"),
    ],
)
def test_model_args_reject_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_args(**bad)


def test_model_args_unknown_key_names_it():
    with pytest.raises(ValueError, match="hidden_sise"):
        ModelArgs.from_dict({"hidden_sise": 3})
