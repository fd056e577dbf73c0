"""Qwen3, Gemma 2, Gemma 3 (text) and Phi-3 in models/llama.py against transformers' own classes on tiny random
configs (fp32, CPU, eager attention on the reference side): logits, greedy decoding through our KV cache past the
sliding window and past LongRoPE's pretraining length, the HF round trip (fused Phi-3 tensors split at load, fused
again at export), and config.json layouts of the real checkpoints."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from conftest import FAMILY_HF, family_args, load_ours_hf, make_family_hf

from models.checkpoint import (
    args_from_hf_config,
    check_and_load,
    from_hf_state_dict,
    hf_config,
    load_checkpoint,
    save_hf,
    to_hf_state_dict,
)
from models.generate import generate
from models.llama import SandwichBlock, Transformer
from models.tokenizer import Tokenizer


def _load_pair(tmp_path, family):
    import transformers

    d = make_family_hf(tmp_path / family, family)
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    return ref, load_ours_hf(d)[0], d


@pytest.mark.parametrize("family", list(FAMILY_HF))
@pytest.mark.parametrize("batch", [1, 3])
def test_logits_match_transformers(tmp_path, family, batch):
    ref, ours, _ = _load_pair(tmp_path, family)
    x = torch.randint(0, 259, (batch, 40))  # 40 > the sliding windows and, for Phi-3, < LongRoPE's 64
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILY_HF))
def test_long_input_logits_match_transformers(tmp_path, family):
    """100 tokens: every sliding layer drops keys, Phi-3 runs LongRoPE's long factors (past 64 positions)."""
    ref, ours, _ = _load_pair(tmp_path, family)
    x = torch.randint(0, 259, (2, 100))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILY_HF))
def test_greedy_decoding_with_the_kv_cache_equals_transformers(tmp_path, family):
    """32 greedy tokens after a 40-token prompt: positions run to 72, past every sliding window (at most 12) and
    past Phi-3's LongRoPE pretraining length (64), where both switch to the long factors mid-decode."""
    ref, ours, _ = _load_pair(tmp_path, family)
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=258)[0, 40:].tolist()
    got = generate(
        ours,
        Tokenizer.bytes(),
        [prompt[0].tolist()],
        max_new_tokens=32,
        temperature=0.0,
        top_k=None,
        top_p=1.0,
        stop_ids=set(),
        stop_strings=[],
        generator=None,
    )[0]["ids"]
    assert got == want
    assert len(set(want)) > 3  # not a degenerate repeat of one token


@pytest.mark.parametrize("family", list(FAMILY_HF))
def test_kv_cache_decode_equals_full_forward(tmp_path, family):
    """Within one RoPE regime (positions < 64) a cached decode reproduces the full forward, sliding layers too."""
    _, model, _ = _load_pair(tmp_path, family)
    x = torch.randint(0, 259, (2, 40))
    with torch.no_grad():
        full = model(x)
        model.setup_caches(2, 48)
        steps = [model(x[:, :20], input_pos=torch.arange(20))]
        for t in range(20, 40):
            steps.append(model(x[:, t : t + 1], input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILY_HF))
def test_left_padded_and_packed_rows_equal_each_row_alone(tmp_path, family):
    """The window counts positions, not slots: a padded row and a packed continuation see what they see alone."""
    _, model, _ = _load_pair(tmp_path, family)
    a, b = torch.randint(0, 259, (1, 30)), torch.randint(0, 259, (1, 22))
    pad = 8
    batch = torch.cat([a, torch.cat([torch.full((1, pad), 258), b], 1)])
    key_mask = torch.ones(2, 30, dtype=torch.bool)
    key_mask[1, :pad] = False
    positions = torch.stack([torch.arange(30), (torch.arange(30) - pad).clamp(min=0)])
    ctx, c1, c2 = torch.randint(0, 259, (3, 14)).unbind()
    row = torch.cat([ctx, c1, c2])[None]  # one context, two continuations scored after it
    seg = torch.zeros(1, 42, dtype=torch.long)
    branch = torch.cat([torch.zeros(14), torch.ones(14), torch.full((14,), 2)]).long()[None]
    pos = torch.cat([torch.arange(14), torch.arange(14, 28), torch.arange(14, 28)])[None]
    with torch.no_grad():
        out = model(batch, position_ids=positions, key_padding_mask=key_mask)
        torch.testing.assert_close(out[1:2, pad:], model(b), atol=1e-5, rtol=1e-5)
        model.setup_caches(2, 30)
        cached = model(batch, input_pos=torch.arange(30), position_ids=positions, key_padding_mask=key_mask)
        model.clear_caches()
        torch.testing.assert_close(cached[1:2, pad:], model(b), atol=1e-5, rtol=1e-5)
        h = model.hidden(row, position_ids=pos, segment_ids=seg, branch_ids=branch)[0]
        torch.testing.assert_close(h[28:], model.hidden(torch.cat([ctx, c2])[None])[0][14:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILY_HF))
def test_block_forward_is_the_residual_sum_of_its_branches(tmp_path, family):
    """GPTQ's driver finishes each branch from its last linear's input; the per-type layer inputs are hidden()'s."""
    _, model, _ = _load_pair(tmp_path, family)
    x = torch.randn(2, 30, 64)
    inputs = model.layer_inputs(torch.arange(30)[None], x.dtype)
    with torch.no_grad():
        for block in model.model.layers:
            cos, sin, mask = inputs[block.layer_type]
            seen = {}

            def keep(module, args, name, seen=seen):
                seen[name] = args[0]

            hooks = [
                block.get_submodule(n).register_forward_pre_hook(functools.partial(keep, name=n))
                for n in ("self_attn.o_proj", "mlp.down_proj")
            ]
            h = x + block.attn_branch(x, cos, sin, mask)
            out = h + block.mlp_branch(h)
            for hook in hooks:
                hook.remove()
            assert torch.equal(block(x, cos, sin, mask), out)
            assert torch.equal(block.finish_attn(x, seen["self_attn.o_proj"]), h)
            assert torch.equal(block.finish_mlp(h, seen["mlp.down_proj"]), out)
            probs = block.attention_probs(x, cos, sin, mask)
            torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
            if mask is not None:
                assert (probs[..., ~mask[0, 0]] == 0).all()


@pytest.mark.parametrize("family", list(FAMILY_HF))
def test_save_hf_round_trip_loads_in_transformers(tmp_path, family):
    """Our export (hf_config + to_hf_state_dict: Phi-3's tensors fused again) is what transformers builds."""
    import transformers

    ref, ours, d = _load_pair(tmp_path, family)
    out = save_hf(tmp_path / "export", ours, Tokenizer.bytes())
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(again) is type(ref)
    assert again.state_dict().keys() == ref.state_dict().keys()
    x = torch.randint(0, 259, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)
    assert load_checkpoint("hf", out)[0] == ours.args


def test_phi3_split_and_fuse_are_inverse():
    args = family_args("phi3")
    q, kv, i = 4 * 16, 2 * 16, 128
    sd = {
        "model.layers.0.self_attn.qkv_proj.weight": torch.randn(q + 2 * kv, 64),
        "model.layers.0.mlp.gate_up_proj.weight": torch.randn(2 * i, 64),
        "model.layers.0.input_layernorm.weight": torch.randn(64),
    }
    split = from_hf_state_dict(args, sd)
    assert split["model.layers.0.self_attn.k_proj.weight"].shape == (kv, 64)
    torch.testing.assert_close(
        split["model.layers.0.mlp.up_proj.weight"], sd["model.layers.0.mlp.gate_up_proj.weight"][i:]
    )
    assert {k: v.tolist() for k, v in to_hf_state_dict(args, split).items()} == {k: v.tolist() for k, v in sd.items()}
    del split["model.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(ValueError, match="v_proj"):
        to_hf_state_dict(args, split)
    with pytest.raises(ValueError, match="qkv_proj"):
        from_hf_state_dict(args, {"model.layers.0.self_attn.qkv_proj.weight": torch.randn(5, 64)})


# The shipped config.json files (field values from their hub pages), transformers-4 layout: what args_from_hf_config must
# read without transformers' help.
GEMMA3_1B = dict(
    model_type="gemma3_text",
    vocab_size=262144,
    hidden_size=1152,
    intermediate_size=6912,
    num_hidden_layers=26,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    rope_local_base_freq=10000.0,
    rope_scaling=None,
    sliding_window=512,
    sliding_window_pattern=6,
    query_pre_attn_scalar=256,
    final_logit_softcapping=None,
    attn_logit_softcapping=None,
    hidden_activation="gelu_pytorch_tanh",
)
QWEN3_0_6B = dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000,
    rope_scaling=None,
    sliding_window=None,
    use_sliding_window=False,
    max_window_layers=28,
    tie_word_embeddings=True,
    hidden_act="silu",
)
PHI4_MINI = dict(
    model_type="phi3",
    vocab_size=200064,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=24,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    original_max_position_embeddings=4096,
    partial_rotary_factor=0.75,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
    sliding_window=262144,
    tie_word_embeddings=True,
)


def test_real_config_layouts():
    g = args_from_hf_config(GEMMA3_1B)
    full = [i for i, t in enumerate(g.layer_types) if t == "full_attention"]
    assert full == [5, 11, 17, 23] and g.sliding_window == 512 and g.rope_local_base_freq == 10000.0
    assert g.norm_plus_one and g.post_norms and g.qk_norm and g.embedding_multiplier == 1152**0.5
    assert g.hidden_act == "gelu_pytorch_tanh" and g.query_pre_attn_scalar == 256
    q = args_from_hf_config(QWEN3_0_6B)
    assert q.qk_norm and not q.post_norms and q.layer_types is None and q.sliding_window is None
    assert q.head_dim == 128 and q.dim_head == 128
    p = args_from_hf_config(PHI4_MINI)
    assert p.rotary_dim == 96 and p.rope_scaling["rope_type"] == "longrope"
    assert p.rope_scaling["original_max_position_embeddings"] == 4096
    assert p.layer_types == ["sliding_attention"] * 32 and p.sliding_window == 262144  # wider than the context
    with torch.device("meta"):
        assert isinstance(Transformer(g).model.layers[0], SandwichBlock)
    for args in (g, q, p):
        cfg = hf_config(args)
        assert args_from_hf_config(cfg) == args


def test_multimodal_gemma3_is_a_clear_error():
    with pytest.raises(ValueError, match="gemma3_text"):
        args_from_hf_config(dict(GEMMA3_1B, model_type="gemma3"))


# --- GGUF in llama.cpp's converter layout ---------------------------------------------------------------------

# What llama.cpp fixes per architecture that a GGUF cannot say otherwise: Gemma scales scores by head_dim (sizes
# below 27B), stores no output head for Gemma 2 (tied); Qwen3 has no sliding layers. The GGUF variants of the tiny
# configs follow that.
GGUF_OVERRIDES = {
    "qwen3": dict(use_sliding_window=False),  # llama.cpp's qwen3 has no sliding layers (the released ones have none)
    "gemma2": dict(query_pre_attn_scalar=16, tie_word_embeddings=True),
    "gemma3": dict(query_pre_attn_scalar=16),
    "phi3": {},
}
GGUF_ARCH = {"qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3"}


def write_llama_cpp_gguf(path, family: str, hf_dir) -> None:
    """Write the HF checkpoint in hf_dir as llama.cpp's convert_hf_to_gguf.py lays it out for the family: gguf-py's
    own HF -> GGUF tensor names (TensorNameMap), Gemma's norms stored as 1 + weight, Phi-3's fused qkv_proj and
    gate_up_proj kept whole with LongRoPE as rope_factors_long/short tensors, no q/k permutation (NeoX RoPE), and
    a 259-token SentencePiece-style vocabulary (<unk> <s> </s> and the 256 byte tokens)."""
    import json

    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = GGUF_ARCH[family]
    n, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    rp = cfg["rope_parameters"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(n)
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if family != "phi3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if family == "qwen3":
        w.add_rope_freq_base(rp["rope_theta"])
    if family == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        w.add_sliding_window(cfg["sliding_window"])
    if family == "gemma3":
        full = rp["full_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
        w.add_sliding_window(cfg["sliding_window"])
    extra = {}
    if family == "phi3":
        orig = cfg["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_dimension_count(int(cfg["partial_rotary_factor"] * hidden) // heads)
        w.add_rope_freq_base(rp["rope_theta"])
        w.add_sliding_window(cfg["sliding_window"] or 0)
        scale = cfg["max_position_embeddings"] / orig
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
        extra = {"rope_factors_long.weight": rp["long_factor"], "rope_factors_short.weight": rp["short_factor"]}
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [6] * 256)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n)
    for hf, t in load_file(str(hf_dir / "model.safetensors")).items():
        if family == "gemma2" and hf == "lm_head.weight":
            continue  # the converter drops it: llama.cpp's Gemma 2 always ties the head
        a = t.float().numpy()
        if family.startswith("gemma") and hf.endswith("norm.weight"):
            a = a + 1
        w.add_tensor(names.get_name(hf, try_suffixes=(".weight", ".bias")), a)
    for name, values in extra.items():
        w.add_tensor(name, np.array(values, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", list(FAMILY_HF))
def test_gguf_in_llama_cpp_layout_gives_the_same_logits(tmp_path, family):
    import transformers

    from models.gguf import load_gguf

    d = make_family_hf(tmp_path / "hf", family, **GGUF_OVERRIDES[family])
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    write_llama_cpp_gguf(tmp_path / "m.gguf", family, d)
    args, sd, _ = load_gguf(tmp_path / "m.gguf")
    hf_args = load_checkpoint("hf", d)[0]
    for field in ("model_type", "layer_types", "sliding_window", "rope_scaling", "partial_rotary_factor", "qk_norm"):
        assert getattr(args, field) == getattr(hf_args, field), field
    model = Transformer(args).eval()
    check_and_load(model, sd, tmp_path / "m.gguf")
    x = torch.randint(0, 259, (2, 100))  # past every window; Phi-3 past LongRoPE's 64
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x[:, :40]), ref(x[:, :40]).logits, atol=1e-5, rtol=1e-5)


def test_qwen3_with_yarn_scaling_matches_transformers(tmp_path):
    """Qwen3's documented long-context setting: YaRN on top of its RoPE (attention factor on cos/sin included)."""
    import transformers

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    d = make_family_hf(tmp_path / "hf", "qwen3", rope_parameters=yarn)
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    args, sd, _, _ = load_checkpoint("hf", d)
    assert args.rope_scaling["rope_type"] == "yarn"
    model = Transformer(args).eval()
    check_and_load(model, sd, d)
    x = torch.randint(0, 259, (2, 100))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-5, rtol=1e-5)
