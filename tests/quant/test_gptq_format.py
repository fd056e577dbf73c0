"""quant/gptq_format.py: our int4 models in the GPTQ checkpoint layout and back.

No reference loader runs here: transformers loads GPTQ checkpoints only through optimum + gptqmodel
(`GptqHfQuantizer.validate_environment` raises ImportError without them), which are not installed. So the layout is
held to the documented format instead: unpacked with explicit shifts written out in this file, and a hand-built
example whose packed words are spelled out as literals.

Scales: GPTQ stores fp16 scales and ours are fp32, so the exact round trips first round the model's scales to fp16
(`_fp16_scales`); `test_fp16_scales_are_the_only_change` shows that rounding is all an export changes.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import run_cli, run_in_process
from quant_helpers import calib_ids, gptq_cfg, tiny_model

import runner.eval
from models.checkpoint import save_hf, save_native
from models.llama import Transformer
from quant import prepare_for_load, quantize_model
from quant.gptq import gptq_quantize_weight
from quant.gptq_format import FORMATS, from_gptq_checkpoint, to_gptq_checkpoint
from quant.int4 import Int4WeightOnlyLinear, unpack_int4
from runner import common
from runner import generate as gen_stage
from runner.rundir import run_dir

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LINEARS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def int4_wo(groupsize=32, sym=False, scale_search=False) -> dict:
    return dict(name="int4_wo", groupsize=groupsize, sym=sym, scale_search=scale_search)


def quantized(spec: dict, **model_overrides) -> Transformer:
    model = tiny_model(**model_overrides)
    return quantize_model(model, spec, calib_ids() if spec["name"] == "gptq" else None)


def _fp16_scales(model: Transformer) -> Transformer:
    for m in model.modules():
        if isinstance(m, Int4WeightOnlyLinear):
            m.scales = m.scales.half().float()
    return model


def _int4(model) -> dict[str, Int4WeightOnlyLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Int4WeightOnlyLinear)}


def _import(sd, qc, args) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    native, record = from_gptq_checkpoint(sd, qc, model)
    prepare_for_load(model, record)
    model.load_state_dict(native, assign=True)
    model.init_rope()
    return model.eval()


def _tokens():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


# --- a reading of the format written out independently -----------------------------------------------------------
def _nibble(word: int, j: int) -> int:
    """Nibble j (bits 4j .. 4j+3) of an int32 word, read as the 32-bit pattern it is."""
    return ((word & 0xFFFFFFFF) >> (4 * j)) & 0xF


def _reference_dequantize(sd: dict, name: str, v1: bool) -> torch.Tensor:
    """W [N, K] of layer `name` from its GPTQ tensors, element by element as the format is documented:
    q[k, n] = nibble k % 8 of qweight[k // 8, n]; zero[j, n] = nibble n % 8 of qzeros[j, n // 8] (+ 1 in v1);
    W[n, k] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]."""
    qweight, qzeros = sd[f"{name}.qweight"].tolist(), sd[f"{name}.qzeros"].tolist()
    scales, g_idx = sd[f"{name}.scales"].float(), sd[f"{name}.g_idx"].tolist()
    K, N = len(qweight) * 8, len(qweight[0])
    w = torch.empty(N, K)
    for k in range(K):
        j = g_idx[k]
        for n in range(N):
            q = _nibble(qweight[k // 8][n], k % 8)
            zero = _nibble(qzeros[j][n // 8], n % 8) + (1 if v1 else 0)
            w[n, k] = (q - zero) * scales[j, n].item()
    return w


# --- exact round trips ---------------------------------------------------------------------------------------------
ROUND_TRIPS = {
    "int4_wo_asym": int4_wo(),
    "int4_wo_sym_search": int4_wo(16, sym=True, scale_search=True),
    "gptq": gptq_cfg(),
    "gptq_act_order": gptq_cfg(act_order=True),
    "gptq_act_order_sym": gptq_cfg(act_order=True, sym=True),
    "gptq_act_order_static": gptq_cfg(act_order=True, static_groups=True),
    "gptq_static_sym": gptq_cfg(static_groups=True, sym=True),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_is_exact(case, fmt):
    """Export then import: identical integers, scales, zeros, g_idx and bias, and identical logits."""
    spec = ROUND_TRIPS[case]
    model = _fp16_scales(quantized(spec, attention_bias=True) if case == "gptq" else quantized(spec))
    sd, qc = to_gptq_checkpoint(model, spec, fmt)
    act_order_groups = spec["name"] == "gptq" and spec["act_order"] and not spec["static_groups"]
    assert qc == {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": spec["groupsize"],
        "desc_act": act_order_groups,
        "sym": spec["sym"],
        "checkpoint_format": fmt,
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": ["lmrunner"], "lmrunner": spec},
    }
    back = _import(sd, json.loads(json.dumps(qc)), model.args)
    ours, theirs = model.state_dict(), back.state_dict()
    assert list(ours) == list(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    assert all((m.g_idx is not None) == act_order_groups for m in _int4(back).values())
    with torch.no_grad():
        assert torch.equal(model(_tokens()), back(_tokens()))


def test_key_names_shapes_and_dtypes():
    """The HF names and the documented shapes and dtypes; the float tensors pass through unchanged."""
    spec = gptq_cfg(act_order=True)
    model = quantized(spec, attention_bias=True)
    sd, _ = to_gptq_checkpoint(model, spec)
    a = model.args
    q_out, kv_out = a.num_attention_heads * a.dim_head, a.num_key_value_heads * a.dim_head
    sizes = {  # (in K, out N)
        "self_attn.q_proj": (a.hidden_size, q_out),
        "self_attn.k_proj": (a.hidden_size, kv_out),
        "self_attn.v_proj": (a.hidden_size, kv_out),
        "self_attn.o_proj": (q_out, a.hidden_size),
        "mlp.gate_proj": (a.hidden_size, a.intermediate_size),
        "mlp.up_proj": (a.hidden_size, a.intermediate_size),
        "mlp.down_proj": (a.intermediate_size, a.hidden_size),
    }
    expected = {}
    for i in range(a.num_hidden_layers):
        for lin, (K, N) in sizes.items():
            G = K // spec["groupsize"]
            p = f"model.layers.{i}.{lin}"
            expected |= {
                f"{p}.qweight": ((K // 8, N), torch.int32),
                f"{p}.qzeros": ((G, N // 8), torch.int32),
                f"{p}.scales": ((G, N), torch.float16),
                f"{p}.g_idx": ((K,), torch.int32),
            }
            if lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
                expected[f"{p}.bias"] = ((N,), torch.float32)
    float_keys = [k for k in model.state_dict() if not k.startswith("model.layers.") or "layernorm" in k]
    assert {k: (tuple(v.shape), v.dtype) for k, v in sd.items() if k not in float_keys} == expected
    for k in float_keys:
        assert torch.equal(sd[k], model.state_dict()[k]), k


def test_fp16_scales_are_the_only_change():
    """Without pre-rounding: the imported scales are the fp16 roundings of ours; integers, zeros, g_idx identical.
    The logits move by the fp16 rounding of the scales (relative 2^-11 per scale), and by no more than 1e-3 here."""
    spec = gptq_cfg(act_order=True)
    model = quantized(spec)
    sd, qc = to_gptq_checkpoint(model, spec)
    back = _import(sd, qc, model.args)
    for name, m in _int4(model).items():
        b = back.get_submodule(name)
        assert torch.equal(b.qweight, m.qweight) and torch.equal(b.zeros, m.zeros) and torch.equal(b.g_idx, m.g_idx)
        assert torch.equal(b.scales, m.scales.half().float())
    with torch.no_grad():
        diff = (model(_tokens()) - back(_tokens())).abs().max().item()
    assert 0 < diff < 1e-3


# --- the layout against the documented format ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("spec", [int4_wo(), gptq_cfg(act_order=True)], ids=["int4_wo", "gptq_act_order"])
def test_layout_against_written_out_formula(spec, fmt):
    """Every exported layer dequantizes, by the element-wise formula above, to exactly the module's own weight."""
    model = _fp16_scales(quantized(spec))
    sd, _ = to_gptq_checkpoint(model, spec, fmt)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        w = model.get_submodule(name).dequantize()
        assert torch.equal(_reference_dequantize(sd, name, v1=fmt == "gptq"), w), name


def test_hand_built_example():
    """A 16 x 8 layer (K=16 in, N=8 out, group 8) with q[k, n] = (k + n) % 16, zero[j, n] = n + 1, scale 1: the
    packed words spelled out. Word qweight[0, 0] holds rows 0..7 of column 0, row k in bits 4k..4k+3 (q = 0..7 ->
    0x76543210); qzeros[0, 0] holds columns 0..7 of group 0, stored as zero - 1 in v1 (0..7 -> 0x76543210) and as
    the zero itself in v2 (1..8 -> 0x87654321). int32 words read as signed: a word of 0x8... and up is negative."""
    K, N, g = 16, 8, 8
    q = torch.tensor([[(k + n) % 16 for k in range(K)] for n in range(N)], dtype=torch.uint8)  # [N, K]
    zeros = torch.tensor([[n + 1.0] * (K // g) for n in range(N)])  # [N, G]
    layer = Int4WeightOnlyLinear.from_quantized(q, torch.ones(N, K // g), zeros, None, K, None)
    model = tiny_model()
    model.model.layers = model.model.layers[:1]
    for name in LINEARS:  # every decoder linear a copy of the 16 -> 8 layer: only their tensors matter here
        model.model.layers[0].set_submodule(name, copy.deepcopy(layer))
    spec = int4_wo(g)
    v1, _ = to_gptq_checkpoint(model, spec, "gptq")
    v2, _ = to_gptq_checkpoint(model, spec, "gptq_v2")
    p = "model.layers.0.mlp.up_proj"
    assert v1[f"{p}.qweight"][0, 0].item() == 0x76543210
    assert v1[f"{p}.qweight"][1, 0].item() == 0xFEDCBA98 - 2**32  # rows 8..15 of column 0: q = 8..15
    assert v1[f"{p}.qweight"][0, 1].item() == 0x87654321 - 2**32  # column 1: q = 1..8
    assert v1[f"{p}.qzeros"].tolist() == [[0x76543210], [0x76543210]]
    assert v2[f"{p}.qzeros"].tolist() == [[0x87654321 - 2**32]] * 2
    assert v1[f"{p}.g_idx"].tolist() == [0] * 8 + [1] * 8
    assert v1[f"{p}.scales"].dtype == torch.float16 and bool((v1[f"{p}.scales"] == 1).all())


# --- padding, zero points of 0 -------------------------------------------------------------------------------------
def test_groupsize_needing_padding_is_refused_with_the_fix():
    """Group 48 pads the tiny model's 64 and 128 inputs to 96 and 144; GPTQ holds whole groups only."""
    model = quantized(int4_wo(48))
    with pytest.raises(ValueError, match=r"in_features 64 is not a multiple of groupsize 48.*quantizer.groupsize=64"):
        to_gptq_checkpoint(model, int4_wo(48))
    sd, _ = to_gptq_checkpoint(model, int4_wo(48), partial_groups=True)
    assert sd["model.layers.0.mlp.down_proj.scales"].shape == (3, 64)  # ceil(128 / 48) groups, the last of 32


def _strip_padding(model: Transformer, fmt: str) -> tuple[dict, int]:
    """The GPTQ tensors of a model whose layers were padded to whole groups, written by this test independently of
    to_gptq_checkpoint: K real columns, G = ceil(K / g) groups, some short, as GPTQModel's buffers allow. The
    packing is the documented one, written out with shifts."""
    sd, g = {}, None
    for name, m in _int4(model).items():
        g, K = m.groupsize, m.in_features
        q = unpack_int4(m.qweight)[:, :K].long().t()  # [K, N]
        g_idx = m.g_idx[:K] if m.g_idx is not None else torch.arange(K) // g
        zeros = m.zeros.long().t() - (1 if fmt == "gptq" else 0)  # [G, N]
        shifts = 4 * torch.arange(8)
        qweight = (q.reshape(K // 8, 8, -1) << shifts.view(1, 8, 1)).sum(1)  # row 8i+j in nibble j of word i
        qzeros = (zeros.reshape(zeros.shape[0], -1, 8) << shifts).sum(2)  # column 8i+j in nibble j of word i
        sd[f"{name}.qweight"] = torch.where(qweight >= 2**31, qweight - 2**32, qweight).to(torch.int32)
        sd[f"{name}.qzeros"] = torch.where(qzeros >= 2**31, qzeros - 2**32, qzeros).to(torch.int32)
        sd[f"{name}.scales"] = m.scales.t().half()
        sd[f"{name}.g_idx"] = g_idx.to(torch.int32)
    sd |= {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.") or "layernorm" in k}
    return sd, g


def _padding_mid_order(model: Transformer, g: int) -> Transformer:
    """Every down_proj re-quantized by GPTQ act-order under a diagonal Hessian whose entries straddle 1, the value
    the (dead) padded columns get: they then sit in the middle of the column order, not all in the last group."""
    for block in model.model.layers:
        lin = block.mlp.down_proj
        K = lin.in_features
        w = torch.randn(lin.out_features, K, generator=torch.Generator().manual_seed(5))
        h = torch.diag(torch.linspace(0.2, 2.76, K)[torch.randperm(K, generator=torch.Generator().manual_seed(6))])
        knobs = dict(groupsize=g, blocksize=128, percdamp=0.01, act_order=True, static_groups=False, sym=False)
        r = gptq_quantize_weight(w.double(), h.double(), **knobs)
        block.mlp.down_proj = Int4WeightOnlyLinear.from_quantized(r.q, r.scales, r.zeros, r.g_idx, K, None)
        assert len(set(r.g_idx[K:].tolist())) > 1  # the padded columns are spread over several groups
    return model


PADDED = {  # case -> (spec, the model)
    "int4_wo": (int4_wo(48), lambda: quantized(int4_wo(48))),
    "gptq_act_order": (
        gptq_cfg(groupsize=48, act_order=True),
        lambda: quantized(gptq_cfg(groupsize=48, act_order=True)),
    ),
    "gptq_act_order_padding_mid_order": (
        gptq_cfg(groupsize=48, act_order=True),
        lambda: _padding_mid_order(quantized(gptq_cfg(groupsize=48, act_order=True)), 48),
    ),
}


@pytest.mark.parametrize("case", list(PADDED))
def test_short_last_group_imports_as_our_padded_layer(case):
    """A checkpoint whose in_features are not a multiple of the group size (written by this test, and by
    to_gptq_checkpoint(partial_groups=True): the same tensors) loads into our padded layers exactly as our quantizer
    built them: padded columns at their groups' zero points and, with act-order, in the groups that were short (for
    GPTQ's act-order the padded columns sit wherever the column order put them)."""
    spec, build = PADDED[case]
    model = _fp16_scales(build())
    sd, g = _strip_padding(model, "gptq")
    ours, qc = to_gptq_checkpoint(model, spec, partial_groups=True)
    assert set(ours) == set(sd)
    for k, v in sd.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k
    assert qc["desc_act"] == (case != "int4_wo")
    back = _import(sd, qc, model.args)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(model(_tokens()), back(_tokens()))


def _with_zero_point_0() -> tuple[Transformer, dict]:
    """An asymmetric int4 model with groups whose weights are all >= 0, which quantize with zero point 0."""
    model = tiny_model()
    with torch.no_grad():
        w = model.model.layers[0].mlp.up_proj.weight
        w[:8, :32] = w[:8, :32].abs()
    spec = int4_wo()
    quantize_model(model, spec)
    assert bool((model.model.layers[0].mlp.up_proj.zeros == 0).any())
    return _fp16_scales(model), spec


def test_zero_point_0_needs_gptq_v2():
    model, spec = _with_zero_point_0()
    with pytest.raises(ValueError, match=r"up_proj: a group has zero point 0.*checkpoint_format=gptq_v2"):
        to_gptq_checkpoint(model, spec, "gptq")
    sd, qc = to_gptq_checkpoint(model, spec, "gptq_v2")
    back = _import(sd, qc, model.args)
    assert torch.equal(back.model.layers[0].mlp.up_proj.zeros, model.model.layers[0].mlp.up_proj.zeros)


def test_v1_written_by_word_subtraction_reads_back():
    """GPTQModel writes v1 from its v2 zero points by subtracting 0x11111111 from each int32 word, so a zero point
    of 0 borrows from the next nibble; reading adds it back per word, and the zero points come back exactly."""
    model, spec = _with_zero_point_0()
    sd, qc = to_gptq_checkpoint(model, spec, "gptq_v2")
    for k in [k for k in sd if k.endswith(".qzeros")]:
        words = (sd[k].long() & 0xFFFFFFFF) - 0x11111111
        words &= 0xFFFFFFFF
        sd[k] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    back = _import(sd, {**qc, "checkpoint_format": "gptq"}, model.args)
    for name, m in _int4(model).items():
        assert torch.equal(back.get_submodule(name).zeros, m.zeros), name


# --- bad inputs ----------------------------------------------------------------------------------------------------
def _checkpoint():
    spec = gptq_cfg(act_order=True)
    model = quantized(spec)
    sd, qc = to_gptq_checkpoint(model, spec)
    return model, sd, qc


P = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd, qc: qc.update(bits=8), "quantization_config.bits=8 is not supported; supported: quant_method gptq"),
        (lambda sd, qc: qc.update(checkpoint_format="marlin"), "checkpoint_format='marlin' is not supported"),
        (lambda sd, qc: qc.update(quant_method="awq"), "quant_method='awq' is not supported; supported: quant_"),
        (lambda sd, qc: qc.update(format="gptq_v2"), "conflicting checkpoint_format and format"),
        (lambda sd, qc: qc.update(group_size=-1), "group_size=-1 is not supported"),
        (lambda sd, qc: qc.update(pack_dtype="int16"), "pack_dtype='int16' is not supported"),
        (lambda sd, qc: qc.update(lm_head=True), "lm_head=true"),
        (lambda sd, qc: qc.update(dynamic={"-:.*down.*": {}}), "dynamic"),
        (lambda sd, qc: sd.pop(f"{P}.qzeros"), f"{P}.qzeros is missing from the GPTQ checkpoint"),
        (lambda sd, qc: sd.update({f"{P}.scales": sd[f"{P}.scales"][:1]}), rf"{P}.scales has shape \(1, 64\)"),
        (lambda sd, qc: sd.update({f"{P}.qweight": sd[f"{P}.qweight"].float()}), "qweight has dtype torch.float32"),
        (lambda sd, qc: qc.update(desc_act=False), "g_idx is not the contiguous assignment"),
        (lambda sd, qc: qc.update(sym=True), "zero points other than 8 but quantization_config.sym is true"),
        (lambda sd, qc: sd.update({f"{P}.g_idx": torch.zeros(64, dtype=torch.int32)}), "puts 64 columns in group 0"),
        (lambda sd, qc: sd.update({f"{P}.weight": torch.zeros(64, 64)}), f"{P} is float in this GPTQ checkpoint"),
    ],
)
def test_bad_checkpoint(edit, message):
    model, sd, qc = _checkpoint()
    edit(sd, qc)
    with torch.device("meta"):
        shell = Transformer(model.args)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        from_gptq_checkpoint(sd, qc, shell)


def test_bad_export():
    with pytest.raises(ValueError, match="quantizer 'int8_wo' has no GPTQ form"):
        to_gptq_checkpoint(quantize_model(tiny_model(), {"name": "int8_wo"}), {"name": "int8_wo"})
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj is not int4-quantized"):
        to_gptq_checkpoint(tiny_model(), int4_wo())
    with pytest.raises(ValueError, match="checkpoint_format='exllama' is not supported; use one of gptq, gptq_v2"):
        to_gptq_checkpoint(quantized(int4_wo()), int4_wo(), "exllama")
    with pytest.raises(ValueError, match="sym=true but the layer has zero points other than 8"):
        to_gptq_checkpoint(quantized(int4_wo()), int4_wo(sym=True))


# --- through a directory on disk and the runner --------------------------------------------------------------------
def write_gptq_dir(directory, model, tok, spec, fmt="gptq"):
    """A GPTQ checkpoint directory as the export stage writes one (runner/exports.py): config.json with
    quantization_config, the GPTQ tensors, the tokenizer."""
    sd, qc = to_gptq_checkpoint(model, spec, fmt)
    return save_hf(directory, model, tok, extra_tensors=sd, quantization_config=qc)


@pytest.fixture
def gptq_dir(compose, tmp_path):
    """(directory, the int4 model it holds, a native checkpoint of the same model) of the tiny model, GPTQ act-order."""
    model, tok = common.load_model(compose(["task=eval", "debug=smoke"], run_name="load"), apply_quantizer=False)
    spec = gptq_cfg(act_order=True)
    model = _fp16_scales(quantize_model(model, spec, torch.randint(0, 256, (8, 32))))
    save_native(tmp_path / "native", model, tok, spec)
    return write_gptq_dir(tmp_path / "gptq", model, tok, spec), model, tmp_path / "native"


def test_checkpointer_hf_loads_gptq_into_int4(gptq_dir, compose):
    path, model, _ = gptq_dir
    loaded, _ = common.load_model(compose(["task=eval", "debug=smoke", "checkpointer=hf", f"checkpointer.path={path}"]))
    blocks = loaded.model.layers
    assert all(isinstance(b.get_submodule(n), Int4WeightOnlyLinear) for b in blocks for n in LINEARS)
    with torch.no_grad():
        assert torch.equal(loaded(_tokens()), model(_tokens()))
    # In bf16 the act-order layers run aten's CPU int4 kernel (the g_idx permutation applied to the input).
    over = ["task=eval", "debug=smoke", "checkpointer=hf", f"checkpointer.path={path}", "model.dtype=bfloat16"]
    bf16, _ = common.load_model(compose(over, run_name="bf16"))
    with torch.no_grad(), torch.profiler.profile() as prof:
        bf16(_tokens())
    assert "aten::_weight_int4pack_mm_for_cpu" in {e.key for e in prof.key_averages()}


def test_eval_and_generate_on_a_gptq_dir(gptq_dir, compose):
    """task=eval and task=generate on the GPTQ directory give what they give on the native checkpoint of the model."""
    path, _, native = gptq_dir
    results = {}
    for kind, p in (("hf", path), ("native", native)):
        over = [f"checkpointer={kind}", f"checkpointer.path={p}"]
        ev = run_in_process(runner.eval, compose(["task=eval", "debug=smoke", "task.tasks=[wikitext2_ppl]", *over]))
        run_in_process(gen_stage, compose(["task=generate", "debug=smoke", *over], run_name=f"gen_{kind}"))
        results[kind] = ev["eval/wikitext2_ppl/ppl"], (run_dir() / "samples.jsonl").read_text()
    assert math.isfinite(results["hf"][0]) and results["hf"] == results["native"]


def test_gptq_tensors_without_quantization_config(gptq_dir, compose):
    """Older AutoGPTQ directories keep the config in quantize_config.json: a clear error, not a shape mismatch."""
    path, _, _ = gptq_dir
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(common.ConfigError, match=r"qweight is a packed quantized tensor but config.json has no quan"):
        common.load_model(compose(["task=eval", "debug=smoke", "checkpointer=hf", f"checkpointer.path={path}"]))


@pytest.mark.slow  # a subprocess: the runner's start-up
def test_cli_bad_gptq_dir_fails_with_one_line(gptq_dir, tmp_path, data_dir):
    path, _, _ = gptq_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 8
    (path / "config.json").write_text(json.dumps(cfg))
    args = ["task=eval", "debug=smoke", "checkpointer=hf", f"checkpointer.path={path}", f"paths.data_dir={data_dir}"]
    r = run_cli([*args, f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{path}: quantization_config.bits=8 is not supported" in errors[0]


# --- SmolLM2 -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_int4_export_import(compose):
    """SmolLM2 (in_features 576 and 1536) with int4_wo: group 64 round-trips as whole groups; group 128 is refused
    by default (576 = 4.5 x 128) and round-trips with partial groups. Identical logits once the scales are fp16."""
    float_model, _ = common.load_model(compose(["task=eval"]), apply_quantizer=False)
    ids = torch.randint(0, float_model.args.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    for groupsize in (64, 128):
        spec = int4_wo(groupsize)
        model = _fp16_scales(quantize_model(copy.deepcopy(float_model), spec))
        if groupsize == 128:
            with pytest.raises(ValueError, match="in_features 576 is not a multiple of groupsize 128"):
                to_gptq_checkpoint(model, spec)
        sd, qc = to_gptq_checkpoint(model, spec, partial_groups=groupsize == 128)
        back = _import(sd, qc, model.args)
        with torch.no_grad():
            assert torch.equal(model(ids), back(ids)), groupsize
