"""models/llama.py against transformers' reference models (fp32, CPU), through our hf checkpointer; its forward API
(hidden/output, the mask rule, the block's branches) against the plain forward."""

import pytest
import torch
from conftest import load_ours_hf, make_tiny_hf, tiny_args

from models.llama import ModelArgs, Transformer, attention_mask

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
    ours, tok = load_ours_hf(d)
    return ref, ours, tok


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


def _old_packed_mask(unit_of, seg):
    """The eval adapter's packed-row mask as it was written there before models.llama.attention_mask."""
    T = unit_of.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same_unit = unit_of[:, None, :] == unit_of[:, :, None]
    visible = same_unit & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
    return ((causal & visible) | torch.eye(T, dtype=torch.bool))[:, None]


def test_attention_mask_packed_rows_equal_the_adapters_former_rule():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        # rows of units (segments): a context (branch 0), then continuations (branches 1..), then -1 padding
        unit_of, seg = torch.full((3, 40), -1), torch.full((3, 40), -1)
        for b in range(3):
            off, u = 0, 0
            while off < 30:
                for k in range(int(torch.randint(1, 4, (), generator=g))):
                    n = int(torch.randint(1, 6, (), generator=g))
                    unit_of[b, off : off + n], seg[b, off : off + n] = u, k
                    off += n
                u += 1
        got = attention_mask(torch.arange(40), 40, segment_ids=unit_of, branch_ids=seg)
        assert torch.equal(got, _old_packed_mask(unit_of, seg))


def test_attention_mask_padding_equals_the_former_decoder_rule():
    T, S = 5, 12
    kpm = torch.rand(2, S, generator=torch.Generator().manual_seed(1)) > 0.3
    # with a cache: queries at slots 4..8 over S slots
    input_pos = torch.arange(4, 4 + T)
    causal = torch.ones(S, S, dtype=torch.bool).tril()[input_pos][None, None]
    own = torch.nn.functional.one_hot(input_pos, S).bool()[None, None]
    assert torch.equal(attention_mask(input_pos, S), causal)
    assert torch.equal(attention_mask(input_pos, S, kpm), causal & (kpm[:, None, None, :] | own))
    # without: T queries over themselves
    causal, own = torch.ones(T, T, dtype=torch.bool).tril(), torch.eye(T, dtype=torch.bool)
    assert torch.equal(attention_mask(torch.arange(T), T, kpm), causal[None, None] & (kpm[:, None, None, :T] | own))


def test_packed_segments_and_branches_score_as_separate_forwards(tmp_path):
    """One row: [a | ctx, cont1, cont2] with positions restarting per segment and per branch equals a, ctx+cont1 and
    ctx+cont2 run alone."""
    _, model, _ = _load_pair(tmp_path, "llama", {})
    a, ctx, c1, c2 = (torch.randint(0, 259, (n,)) for n in (6, 7, 3, 4))
    ids = torch.cat([a, ctx, c1, c2])[None]
    pos = torch.cat([torch.arange(6), torch.arange(7), torch.arange(7, 10), torch.arange(7, 11)])[None]
    segment = torch.tensor([0] * 6 + [1] * 14)[None]
    branch = torch.tensor([0] * 13 + [1] * 3 + [2] * 4)[None]
    with torch.no_grad():
        h = model.hidden(ids, position_ids=pos, segment_ids=segment, branch_ids=branch)[0]
        alone = [model.hidden(x[None])[0] for x in (a, torch.cat([ctx, c1]), torch.cat([ctx, c2]))]
    torch.testing.assert_close(h[:6], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h[6:16], alone[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h[16:], alone[2][7:], atol=1e-5, rtol=1e-5)


def test_block_forward_is_the_residual_sum_of_its_branches(tmp_path):
    _, model, _ = _load_pair(tmp_path, "llama", {})
    block = model.model.layers[0]
    x = torch.randn(2, 9, 64)
    cos, sin = model.rope(torch.arange(9)[None], x.dtype)
    inputs = {}
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        block.get_submodule(name).register_forward_pre_hook(lambda m, args, n=name: inputs.__setitem__(n, args[0]))
    with torch.no_grad():
        h = x + block.attn_branch(x, cos, sin)
        out = h + block.mlp_branch(h)
        assert torch.equal(block(x, cos, sin), out)
        # finishing a branch from its last linear's input (GPTQ's driver) gives the same residual stream
        assert torch.equal(block.finish_attn(x, inputs["self_attn.o_proj"]), h)
        assert torch.equal(block.finish_mlp(h, inputs["mlp.down_proj"]), out)


def test_attention_probs_weigh_the_values_as_the_block_does(tmp_path):
    _, model, _ = _load_pair(tmp_path, "llama", {})
    block, attn = model.model.layers[1], model.model.layers[1].self_attn
    x = torch.randn(2, 9, 64)
    cos, sin = model.rope(torch.arange(9)[None], x.dtype)
    with torch.no_grad():
        probs = block.attention_probs(x, cos, sin)  # [B, H, T, T]
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 9))
        v = attn.v_proj(block.input_layernorm(x)).view(2, 9, 2, 16).transpose(1, 2).repeat_interleave(2, 1)
        y = (probs @ v).transpose(1, 2).reshape(2, 9, 64)  # [B, T, H*D]
        torch.testing.assert_close(attn.o_proj(y), block.attn_branch(x, cos, sin), atol=1e-5, rtol=1e-5)


def test_output_at_chosen_positions_equals_the_full_logits(tmp_path):
    _, model, _ = _load_pair(tmp_path, "llama", {"tie_word_embeddings": False})
    x = torch.randint(0, 259, (3, 11))
    keep = torch.rand(3, 11, generator=torch.Generator().manual_seed(2)) > 0.5
    rows, cols = keep.nonzero(as_tuple=True)
    with torch.no_grad():
        full = model(x)  # [B, T, V]
        torch.testing.assert_close(model(x, logits_at=keep), full[keep], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model.output(model.hidden(x)[rows, cols]), full[rows, cols], atol=1e-6, rtol=1e-6)


def test_init_rope_rebuilds_the_frequencies(tmp_path):
    _, model, _ = _load_pair(tmp_path, "llama", {"rope_scaling": LLAMA3_SCALING, "rope_theta": 500000.0})
    expected = model.inv_freq.clone()
    model.to_empty(device="cpu")  # buffers left uninitialised, as after building on meta and allocating
    model.inv_freq.fill_(float("nan"))
    model.init_rope()
    assert torch.equal(model.inv_freq, expected)


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
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "dynamic"),
        (dict(layer_types=["sliding_attention", "full_attention"]), "sliding_window"),
        (dict(hidden_act="relu"), "hidden_act"),
        (
            dict(
                rope_scaling={
                    "rope_type": "longrope",
                    "short_factor": [1.0],
                    "long_factor": [1.0],
                    "original_max_position_embeddings": 64,
                }
            ),
            "8 values",
        ),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "original_max_position_embeddings"),
        (dict(partial_rotary_factor=0.3), "partial_rotary_factor"),
        (dict(model_type="gpt2"), "model_type"),
    ],
)
def test_model_args_reject_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_args(**bad)


def test_model_args_unknown_key_names_it():
    with pytest.raises(ValueError, match="hidden_sise"):
        ModelArgs.from_dict({"hidden_sise": 3})
