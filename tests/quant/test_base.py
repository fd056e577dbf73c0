"""The quantizer contract: config validation, what gets quantized, and the two-phase save/load round trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from quant_helpers import calib_ids, dequantized_twin, gptq_cfg, tiny_model, token_ids
from safetensors.torch import load_file, save_file

from quant import describe, prepare_for_load, quantize_model
from quant.base import QUANTIZERS
from quant.checks import decoder_linears
from quant.head import QuantizedEmbedding
from quant.int4 import Int4WeightOnlyLinear
from quant.int8 import Int8WeightOnlyLinear

QCFGS = {
    "int8_wo": {"name": "int8_wo"},
    "int4_wo": {"name": "int4_wo", "groupsize": 32, "sym": False, "scale_search": False},
    "int4_wo_sym_padded": {"name": "int4_wo", "groupsize": 48, "sym": True, "scale_search": False},
    "int4_wo_search": {"name": "int4_wo", "groupsize": 32, "sym": True, "scale_search": True},
    "gptq": gptq_cfg(),
    "gptq_act_order": gptq_cfg(act_order=True),
    "gptq_static_groups": gptq_cfg(act_order=True, static_groups=True),
    "gptq_sink_search": gptq_cfg(act_order=True, sink_weight=64, scale_search=True, attention_weight=True),
}
# quantize_head: the output head (and a tied embedding) in int4 too
HEAD_QCFGS = {
    "int4_wo_head_int4": QCFGS["int4_wo"] | {"quantize_head": "int4"},
    "int4_wo_head_int8": QCFGS["int4_wo"] | {"quantize_head": "int8"},
    "int4_wo_head_int4_sym_padded": QCFGS["int4_wo_sym_padded"] | {"quantize_head": "int4"},
    "gptq_head_int4": gptq_cfg(act_order=True, quantize_head="int4"),
    "gptq_head_int8": gptq_cfg(act_order=True, quantize_head="int8"),
}


def test_describe_records_exactly_the_knobs():
    assert describe({"name": "none"}) == {"name": "none"}
    rec = describe(gptq_cfg())
    assert list(rec) == ["name", *QUANTIZERS["gptq"].knobs]
    assert json.loads(json.dumps(rec)) == rec
    # a quantizer.json from before these keys: what the code did then
    new_keys = ("sampling", "sink_weight", "attention_weight", "scale_search", "quantize_head")
    old = {k: v for k, v in gptq_cfg().items() if k not in new_keys}
    assert describe(old) == rec
    assert describe({"name": "int4_wo", "groupsize": 32, "sym": True}) == QCFGS["int4_wo_sym_padded"] | {
        "groupsize": 32,
        "quantize_head": "none",
    }


@pytest.mark.parametrize(
    ("qcfg", "message"),
    [
        ({"name": "int3"}, "not one of"),
        ({"name": "int4_wo", "groupsize": 32}, r"missing \['sym'\]"),
        ({"name": "int4_wo", "groupsize": 32, "sym": False, "blocksize": 128}, r"unknown \['blocksize'\]"),
        ({"name": "int4_wo", "groupsize": 33, "sym": False}, "positive even"),
        (gptq_cfg(blocksize=0), "blocksize"),
        (gptq_cfg(percdamp=-0.1), "percdamp"),
        (gptq_cfg(sampling="random"), "sampling"),
        (gptq_cfg(act_order="maybe"), r"quantizer.act_order='maybe' must be true or false"),
        (gptq_cfg(sym=1), "sym=1 must be true or false"),
        (gptq_cfg(blocksize=True), "blocksize=True must be a positive integer"),
        (gptq_cfg(percdamp="lots"), "percdamp"),
        (gptq_cfg(seed=1.5), "seed=1.5 must be an integer"),
        (gptq_cfg(sink_weight=0), r"quantizer.sink_weight=0 must be a number > 0"),
        (gptq_cfg(sink_weight=-4), "sink_weight=-4"),
        (gptq_cfg(sink_weight="lots"), "sink_weight='lots'"),
        (gptq_cfg(sink_weight=True), "sink_weight=True"),
        (gptq_cfg(sink_weight=float("inf")), "sink_weight=inf"),
        (gptq_cfg(attention_weight="yes"), "attention_weight='yes' must be true or false"),
        (gptq_cfg(scale_search=1), "scale_search=1 must be true or false"),
        ({"name": "int4_wo", "groupsize": 32, "sym": False, "scale_search": "no"}, "scale_search='no'"),
        (gptq_cfg(quantize_head="yes"), "quantize_head='yes' must be one of none, int8, int4"),
        (gptq_cfg(quantize_head=True), "quantize_head=True must be one of"),
    ],
)
def test_describe_rejects_bad_configs(qcfg, message):
    with pytest.raises(ValueError, match=message):
        describe(qcfg)


@pytest.mark.parametrize("name", ["int4_wo", "int8_wo", "gptq"])
def test_self_check_stops_broken_weights(name):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    qcfg = gptq_cfg() if name == "gptq" else QCFGS[name]
    with pytest.raises(RuntimeError, match="self-check"):
        quantize_model(model, qcfg, calib_ids())


def test_gptq_needs_calibration():
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(tiny_model(), gptq_cfg())


@pytest.mark.parametrize("key", list(QCFGS))
def test_only_decoder_linears_are_quantized(key):
    qcfg = QCFGS[key]
    model = quantize_model(tiny_model(), qcfg, calib_ids() if qcfg["name"] == "gptq" else None)
    cls = Int8WeightOnlyLinear if qcfg["name"] == "int8_wo" else Int4WeightOnlyLinear
    assert sum(isinstance(m, cls) for m in model.modules()) == 14  # 7 linears x 2 blocks
    assert not decoder_linears(model)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    # plain tensors only: what safetensors can write
    assert all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in model.state_dict().values())


@pytest.mark.parametrize("sym", [False, True])
def test_int4_wo_logits_match_dequantized_twin(sym):
    float_model = tiny_model()
    qmodel = quantize_model(tiny_model(), {"name": "int4_wo", "groupsize": 32, "sym": sym})
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(qmodel(ids), dequantized_twin(float_model, qmodel)(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantize_head_rounds_head_and_tied_embedding(tied, kind):
    float_model = tiny_model(tie_word_embeddings=tied)
    qmodel = quantize_model(copy.deepcopy(float_model), HEAD_QCFGS[f"int4_wo_head_{kind}"])
    assert isinstance(qmodel.lm_head, Int4WeightOnlyLinear if kind == "int4" else Int8WeightOnlyLinear)
    keys = set(qmodel.state_dict())
    if tied:  # one quantized copy of the tied matrix, saved under lm_head; lookups dequantize its rows
        assert isinstance(qmodel.model.embed_tokens, QuantizedEmbedding)
        assert not any(k.startswith("model.embed_tokens.") for k in keys)
    else:  # an untied embedding is only read a row per token: it stays float
        assert qmodel.model.embed_tokens.weight.dtype == torch.float32
    assert {"lm_head.qweight", "lm_head.scales"} <= keys
    # reference: the float model with every quantized matrix replaced by its dequantized value
    twin = dequantized_twin(float_model, qmodel)
    with torch.no_grad():
        head = qmodel.lm_head.dequantize()
        if tied:
            twin.model.embed_tokens.weight.copy_(head)
        else:
            twin.lm_head.weight.copy_(head)
        assert not torch.equal(head, float_model.model.embed_tokens.weight if tied else float_model.lm_head.weight)
        ids = token_ids()
        torch.testing.assert_close(qmodel(ids), twin(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", list(QCFGS) + list(HEAD_QCFGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_prepare_load_gives_identical_logits(tmp_path, key, dtype):
    qcfg = (QCFGS | HEAD_QCFGS)[key]
    model = tiny_model().to(dtype)
    quantize_model(model, qcfg, calib_ids() if qcfg["name"] == "gptq" else None)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "quantizer.json").write_text(json.dumps(describe(qcfg)))

    with torch.device("meta"):
        fresh = tiny_model()
    prepare_for_load(fresh, json.loads((tmp_path / "quantizer.json").read_text()))
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), assign=True, strict=True)
    fresh.inv_freq = model.inv_freq  # non-persistent buffer, rebuilt by the loader in real use
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_prepare_for_load_none_is_identity():
    model = tiny_model()
    assert prepare_for_load(model, {"name": "none"}) is model
    assert len(decoder_linears(model)) == 14
