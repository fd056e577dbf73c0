"""task=export: HF, PEFT and GGUF round trips through transformers, peft and our own GGUF reader (tiny model, and
SmolLM2 under the slow marker), the GPTQ-format dispatch, chained exports from quantize and finetune, bad inputs."""

import json

import pytest
import torch
from conftest import run_in_process, tiny_model

from models.checkpoint import load_checkpoint, save_native
from models.gguf import load_gguf
from models.lora import LoRALinear, apply_lora, merge_lora, save_adapter
from models.tokenizer import Tokenizer
from runner import common, export, finetune, quantize
from runner.common import ConfigError
from runner.rundir import run_dir

GPTQ_G32 = ["quantizer=gptq", "quantizer.groupsize=32", "quantizer.nsamples=4", "quantizer.seqlen=64"]


@pytest.fixture
def export_cfg(compose):
    def _cfg(*overrides, run_name="run"):
        return compose(["task=export", "debug=smoke", *overrides], run_name=run_name)

    return _cfg


def _ids(vocab: int, t: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (2, t), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).float()


def _export(export_cfg, *overrides, run_name="run"):
    cfg = export_cfg(*overrides, run_name=run_name)
    metrics = run_in_process(export, cfg)
    return cfg, metrics, run_dir() / "export"


def _quantized_run(compose, *overrides, run_name="q"):
    """A task=quantize run's model/ on the tiny model (no quality check)."""
    cfg = compose(["task=quantize", "debug=smoke", "task.ppl=false", *overrides], run_name=run_name)
    run_in_process(quantize, cfg)
    return run_dir() / "model"


def _lora_adapter(tmp_path, model):
    """A LoRA adapter on `model`'s q/v/up projections with non-zero B, as finetune saves it."""
    lora = apply_lora(model, 4, 8.0, 0.0, ["q_proj", "v_proj", "up_proj"])
    torch.manual_seed(3)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    cfg = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}
    assert lora
    return save_adapter(tmp_path / "lora_run" / "adapter", model, cfg)


# --- hf ------------------------------------------------------------------------------------------------------


def test_hf_export_loads_in_transformers_with_our_logits_and_chat_text(export_cfg):
    import transformers

    cfg, metrics, out = _export(export_cfg, "task.format=hf")
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert metrics["export/bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert metrics["export/max_logit_diff"] == 0
    model, tok = common.load_model(cfg)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(model.args.vocab_size)
    torch.testing.assert_close(ref(ids).logits, _logits(model, ids), atol=1e-5, rtol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "hi"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, False)
    assert hf_tok("héllo", add_special_tokens=False)["input_ids"] == tok.encode("héllo", bos=False)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_id


def test_hf_export_shards_past_max_shard_mb(export_cfg):
    import transformers

    cfg, _, out = _export(export_cfg, "task.format=hf", "task.max_shard_mb=0.05")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, _ = common.load_model(cfg)
    ids = _ids(model.args.vocab_size)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(ref(ids).logits, _logits(model, ids), atol=1e-5, rtol=1e-5)


# --- LoRA: hf merged, and peft ---------------------------------------------------------------------------------


def test_lora_adapter_merges_into_hf_and_writes_peft(export_cfg, tmp_path):
    import peft
    import transformers

    base_cfg, _, base_hf = _export(export_cfg, "task.format=hf", run_name="base")
    model, _ = common.load_model(base_cfg)
    adapter = _lora_adapter(tmp_path, model)
    merged = merge_lora(model)
    ids = _ids(merged.args.vocab_size)
    expected = _logits(merged, ids)

    _, _, merged_hf = _export(export_cfg, "task.format=hf", f"task.adapter={adapter.parent}", run_name="merged")
    ref = transformers.AutoModelForCausalLM.from_pretrained(merged_hf).eval()
    torch.testing.assert_close(ref(ids).logits, expected, atol=1e-5, rtol=1e-5)

    _, _, peft_dir = _export(export_cfg, "task.format=peft", f"task.adapter={adapter}", run_name="peft")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
        4,
        8.0,
        ["q_proj", "up_proj", "v_proj"],
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(base_hf).eval()
    with torch.no_grad():
        # not a no-op: the adapter moves the logits, and PEFT puts exactly that move back
        assert not torch.allclose(base(ids).logits, expected, atol=1e-3)
        peft_model = peft.PeftModel.from_pretrained(base, str(peft_dir)).eval()
        torch.testing.assert_close(peft_model(ids).logits, expected, atol=1e-5, rtol=1e-5)


# --- gguf ----------------------------------------------------------------------------------------------------


def _gguf_file(out):
    files = list(out.glob("*.gguf"))
    assert len(files) == 1, files
    return files[0]


@pytest.mark.parametrize("gguf_float", ["f32", "f16"])
def test_float_gguf_reads_back_in_our_reader_and_transformers(export_cfg, gguf_float):
    import transformers

    cfg, metrics, out = _export(export_cfg, "task.format=gguf", f"task.gguf_float={gguf_float}")
    path = _gguf_file(out)
    assert path.name == f"tiny-{gguf_float.upper()}.gguf"
    model, tok = common.load_model(cfg)
    args, sd, tok2 = load_gguf(path)
    assert args == model.args and tok2.encode("héllo") == tok.encode("héllo")
    assert tok2.chat_template == tok.chat_template and tok2.eos_id == tok.eos_id
    dtype = {"f32": torch.float32, "f16": torch.float16}[gguf_float]
    for k, v in model.state_dict().items():  # each tensor is ours rounded to the file's type (norms stay f32)
        want = v if v.dim() == 1 else v.to(dtype).float()
        torch.testing.assert_close(sd[k], want, atol=0, rtol=0)
    ids = _ids(model.args.vocab_size)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(ids).logits
    tol = {"f32": 1e-5, "f16": 0.05}[gguf_float]
    torch.testing.assert_close(theirs, _logits(model, ids), atol=tol, rtol=0)
    assert metrics["export/max_logit_diff"] <= tol


def _expected_block_weights(m, sym: bool) -> torch.Tensor:
    """What a Q4_0/Q4_1 block stores for our int4 linear: q * fp16(d) + fp16(m), or fp16(d) * (q - 8)."""
    from quant.int4 import unpack_int4

    q = unpack_int4(m.qweight).float()[:, : m.in_features]
    d = m.scales.half().float().repeat_interleave(32, 1)
    if sym:
        return d * (q - 8)
    return q * d + (-m.scales * m.zeros).half().float().repeat_interleave(32, 1)


@pytest.mark.parametrize("sym", [False, True])
def test_int4_g32_gptq_checkpoint_exports_exact_q4_blocks(compose, export_cfg, sym):
    import transformers

    from quant.int4 import Int4WeightOnlyLinear, unpack_int4

    ckpt = _quantized_run(compose, *GPTQ_G32, "quantizer.static_groups=true", f"quantizer.sym={sym}")
    cfg, _, out = _export(export_cfg, "task.format=gguf", "checkpointer=native", f"checkpointer.path={ckpt}")
    path = _gguf_file(out)
    assert path.name == f"tiny-{'Q4_0' if sym else 'Q4_1'}.gguf"
    model, _ = common.load_model(cfg)
    args, sd, _ = load_gguf(path)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Int4WeightOnlyLinear)}
    assert len(linears) == 7 * model.args.num_hidden_layers
    for name, m in linears.items():
        torch.testing.assert_close(sd[f"{name}.weight"], _expected_block_weights(m, sym), atol=1e-6, rtol=0)
        # and the blocks are our int4 model's weights within fp16 rounding of the scales: |d q| and |m| each
        # rounded to 11 significant bits
        q = unpack_int4(m.qweight).float()[:, : m.in_features]
        s_, z = m.scales.repeat_interleave(32, 1).abs(), m.zeros.repeat_interleave(32, 1)
        bound = (q * s_ + z * s_) * 2**-11 + 1e-7
        assert ((sd[f"{name}.weight"] - m.dequantize()).abs() <= bound).all()
    ids = _ids(model.args.vocab_size)
    ours = _logits(model, ids)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(ids).logits
    from models.checkpoint import check_and_load
    from models.llama import Transformer

    with torch.device("meta"):
        back = Transformer(args)
    check_and_load(back, sd, path)
    back.init_rope()
    torch.testing.assert_close(theirs, _logits(back.eval(), ids), atol=1e-4, rtol=1e-4)  # two readers, one file
    torch.testing.assert_close(theirs, ours, atol=0.05, rtol=0)  # fp16 rounding of d (and m) only
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_gguf_refuses_groups_other_than_32_and_act_order_and_writes_nothing(compose, export_cfg):
    ckpt = _quantized_run(compose, "quantizer=int4_wo", "quantizer.groupsize=64", run_name="g64")
    cfg = export_cfg("task.format=gguf", "checkpointer=native", f"checkpointer.path={ckpt}")
    with pytest.raises(ConfigError, match=r"groups of 64 .* quantizer\.groupsize=32, or set task\.requantize=true"):
        run_in_process(export, cfg)
    assert not (run_dir() / "export").exists()
    assert not any(p.name.startswith("export") for p in run_dir().iterdir())

    act = _quantized_run(compose, *GPTQ_G32, run_name="act")  # act_order without static groups: g_idx
    cfg = export_cfg("task.format=gguf", "checkpointer=native", f"checkpointer.path={act}", run_name="act_export")
    with pytest.raises(ConfigError, match=r"g_idx.*quantizer\.static_groups=true"):
        run_in_process(export, cfg)
    assert not (run_dir() / "export").exists()


def test_requantize_rounds_on_groups_of_32_and_reports_perplexity(compose, export_cfg):
    from quant.int4 import rtn_quantize

    ckpt = _quantized_run(compose, "quantizer=int4_wo", "quantizer.groupsize=64", run_name="g64")
    cfg, metrics, out = _export(
        export_cfg, "task.format=gguf", "checkpointer=native", f"checkpointer.path={ckpt}", "task.requantize=true"
    )
    assert {"export/ppl", "export/ppl_source", "export/ppl_windows"} <= set(metrics)
    assert metrics["export/ppl"] != metrics["export/ppl_source"]
    model, _ = common.load_model(cfg)
    _, sd, _ = load_gguf(_gguf_file(out))
    w = model.model.layers[0].mlp.down_proj.dequantize()
    q, scales, zeros = rtn_quantize(w, 32, sym=False)
    expected = q.float() * scales.half().float().repeat_interleave(32, 1)
    expected += (-scales * zeros).half().float().repeat_interleave(32, 1)
    torch.testing.assert_close(sd["model.layers.0.mlp.down_proj.weight"], expected, atol=1e-6, rtol=0)


# --- gptq format (tensors from quant/gptq_format.py) ----------------------------------------------------------


def test_gptq_format_writes_an_hf_dir_with_quantization_config(compose, export_cfg):
    gptq_format = pytest.importorskip("quant.gptq_format")
    ckpt = _quantized_run(compose, *GPTQ_G32, "quantizer.groupsize=32")
    cfg, _, out = _export(export_cfg, "task.format=gptq", "checkpointer=native", f"checkpointer.path={ckpt}")
    model, _ = common.load_model(cfg)
    tensors, qconfig = gptq_format.to_gptq_checkpoint(model, json.loads((ckpt / "quantizer.json").read_text()))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == qconfig
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    for k, v in tensors.items():
        assert torch.equal(saved[k], v), k
    assert "model.embed_tokens.weight" in saved and "model.layers.0.self_attn.q_proj.weight" not in saved
    assert Tokenizer.from_dir(out).eos_id is not None and (out / "generation_config.json").is_file()


def test_gptq_format_of_a_float_model_is_refused(export_cfg):
    cfg = export_cfg("task.format=gptq")
    with pytest.raises(ConfigError, match="task.format=gptq writes an int4 model and this one is float"):
        run_in_process(export, cfg)
    assert not (run_dir() / "export").exists()


# --- chained exports -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("export_list", ["[gguf]", "gguf"])
def test_quantize_chains_gguf_export(compose, export_list):
    cfg = compose(
        [
            "task=quantize",
            "debug=smoke",
            "task.ppl=false",
            *GPTQ_G32,
            "quantizer.static_groups=true",
            f"task.export={export_list}",
        ]
    )
    run_in_process(quantize, cfg)
    path = _gguf_file(run_dir() / "export" / "gguf")
    model, _ = common.load_model(
        compose(
            ["task=eval", "debug=smoke", "checkpointer=native", f"checkpointer.path={run_dir() / 'model'}"],
            run_name="load",
        )
    )
    args, sd, _ = load_gguf(path)
    assert args == model.args and path.name == "tiny-Q4_1.gguf"


def test_quantize_chain_of_an_unfit_format_is_refused_before_quantizing(compose):
    cfg = compose(
        ["task=quantize", "debug=smoke", "quantizer=int4_wo", "quantizer.groupsize=128", "task.export=[gguf]"]
    )
    with pytest.raises(ConfigError, match=r"task.export=\[gguf\]: quantizer.groupsize=128"):
        run_in_process(quantize, cfg)
    assert not (run_dir() / "model").exists()
    cfg = compose(["task=quantize", "debug=smoke", "quantizer=int4_wo", "task.export=[onnx]"], run_name="b")
    with pytest.raises(ConfigError, match="task.export='onnx' is not an export format; valid: hf, peft, gguf, gptq"):
        run_in_process(quantize, cfg)


def test_finetune_lora_chains_peft_and_hf(compose, tmp_path):
    import transformers

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"say {i}", "input": "", "output": "ok"}) for i in range(12)))
    cfg = compose(
        [
            "task=finetune",
            "debug=smoke",
            f"data.path={data}",
            "data.val_size=4",
            "task.method=lora",
            "task.optimizer.lr=1e-2",
            "task.export=[hf,peft]",
        ]
    )
    run_in_process(finetune, cfg)
    run = run_dir()
    assert (run / "export" / "peft" / "adapter_config.json").is_file()
    merged, _ = common.load_model(
        compose(["task=eval", "debug=smoke", "checkpointer=native", f"checkpointer.path={run / 'model'}"], run_name="m")
    )
    ref = transformers.AutoModelForCausalLM.from_pretrained(run / "export" / "hf").eval()
    ids = _ids(merged.args.vocab_size)
    torch.testing.assert_close(ref(ids).logits, _logits(merged, ids), atol=1e-5, rtol=1e-5)


def test_finetune_lora_without_merged_model_still_exports_merged_gguf(compose, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"say {i}", "input": "", "output": "ok"}) for i in range(12)))
    over = [f"data.path={data}", "data.val_size=4", "task.method=lora", "task.optimizer.lr=1e-2"]
    cfg = compose(["task=finetune", "debug=smoke", *over, "task.lora.save_merged=false", "task.export=[gguf]"])
    run_in_process(finetune, cfg)
    run = run_dir()
    assert not (run / "model").exists() and (run / "adapter").is_dir()
    _, sd, _ = load_gguf(_gguf_file(run / "export" / "gguf"))
    base, _ = common.load_model(cfg)
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    from models.lora import load_adapter

    merged = merge_lora(load_adapter(base, run / "adapter"))
    assert adapter["rank"] == cfg.task.lora.rank
    w = merged.model.layers[0].self_attn.q_proj.weight
    untouched, _ = common.load_model(cfg)
    assert not torch.allclose(w, untouched.model.layers[0].self_attn.q_proj.weight)  # the adapter is in the file
    torch.testing.assert_close(sd["model.layers.0.self_attn.q_proj.weight"], w.half().float(), atol=0, rtol=0)


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["task.format=onnx"], "task.format='onnx' is not an export format; valid: hf, peft, gguf, gptq"),
        (["task.format=gguf", "task.gguf_float=q8"], "task.gguf_float='q8' is not valid; use one of f32, f16, bf16"),
        (["task.max_shard_mb=0"], r"task.max_shard_mb=0 is not valid: use a number > 0"),
        (["task.format=peft"], r"task.format=peft writes a LoRA adapter: set task.adapter="),
        (["checkpointer=native", "checkpointer.path=/nowhere/model"], "/nowhere/model: checkpoint not found"),
        (["task.adapter=/nowhere/run"], r"task.adapter=/nowhere/run: not found"),
        (["task.format=gguf", "quantizer=int8_wo"], "Int8WeightOnlyLinear, which task.format=gguf does not map"),
        (["task.format=gguf", "quantizer=int8_wo", "task.requantize=true"], "Int8WeightOnlyLinear, which task"),
        (["task.requantize=maybe"], "task.requantize='maybe' is not valid: use true or false"),
        (
            ["task.format=gguf", "quantizer=int4_wo", "quantizer.groupsize=32", "quantizer.quantize_head=int8"],
            r"this model's head is quantized \(quantizer.quantize_head=int8\): quantize with quantizer.quantize_head=none",
        ),
        (
            ["task.format=gptq", "quantizer=int4_wo", "quantizer.groupsize=32", "quantizer.quantize_head=int4"],
            r"task.format=gptq writes the output head as float and this model's head is quantized",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(export_cfg, overrides, match):
    cfg = export_cfg(*overrides)
    with pytest.raises(ConfigError, match=match) as e:
        run_in_process(export, cfg)
    assert "\n" not in str(e.value)
    assert not any(p.name.startswith("export") for p in run_dir().iterdir())


def test_peft_from_a_run_without_lora_is_refused(export_cfg, tmp_path):
    full_run = tmp_path / "full_run"
    save_native(full_run / "model", tiny_model(), Tokenizer.bytes(), None)
    for adapter in (full_run, full_run / "model"):
        cfg = export_cfg("task.format=peft", f"task.adapter={adapter}")
        with pytest.raises(ConfigError, match=r"is not a LoRA adapter \(no adapter_config.json, no adapter/\)"):
            run_in_process(export, cfg)
    assert not (run_dir() / "export").exists()


def test_hf_of_a_quantized_model_is_refused(compose, export_cfg):
    ckpt = _quantized_run(compose, "quantizer=int4_wo", "quantizer.groupsize=32")
    cfg = export_cfg("task.format=hf", "checkpointer=native", f"checkpointer.path={ckpt}")
    with pytest.raises(ConfigError, match="task.format=hf writes float weights and this model is quantized"):
        run_in_process(export, cfg)
    assert not (run_dir() / "export").exists()


def test_adapter_for_another_base_is_refused(export_cfg, tmp_path):
    other = tiny_model(hidden_size=32, intermediate_size=64)
    adapter = _lora_adapter(tmp_path, other)
    cfg = export_cfg("task.format=hf", f"task.adapter={adapter}")
    with pytest.raises(ConfigError, match="does not fit this base model"):
        run_in_process(export, cfg)


# --- SmolLM2 (slow) ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_float_native(tmp_path_factory, smollm2_gguf):
    """SmolLM2 as a native float checkpoint (its GGUF dequantized), so exports start from a float model."""
    from models.checkpoint import check_and_load
    from models.llama import Transformer

    args, sd, tok, _ = load_checkpoint("gguf", smollm2_gguf)
    with torch.device("meta"):
        model = Transformer(args)
    check_and_load(model, sd, smollm2_gguf)
    model.init_rope()
    return save_native(tmp_path_factory.mktemp("smollm2") / "model", model, tok, None)


@pytest.mark.slow
def test_smollm2_hf_and_peft_round_trips(export_cfg, smollm2_float_native, tmp_path):
    import peft
    import transformers

    src = ["model=smollm2_135m", "checkpointer=native", f"checkpointer.path={smollm2_float_native}", "task.check=false"]
    cfg, _, out = _export(export_cfg, "task.format=hf", *src, run_name="hf")
    model, tok = common.load_model(cfg)
    ids = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model(ids), atol=1e-4, rtol=1e-5)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(
        messages
    )
    adapter = _lora_adapter(tmp_path, model)
    expected = _logits(merge_lora(model), ids)
    _, _, peft_dir = _export(export_cfg, "task.format=peft", *src, f"task.adapter={adapter}", run_name="peft")
    peft_model = peft.PeftModel.from_pretrained(ref, str(peft_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_smollm2_int4_g32_exports_q4_1_that_transformers_and_our_reader_read(export_cfg, smollm2_float_native):
    """SmolLM2 with int4 groups of 32 (round-to-nearest, applied on the fly: the block map is the same as for GPTQ,
    which the tiny-model test runs, and GPTQ on SmolLM2 would cost ~80 s here) -> Q4_1 -> transformers and us."""
    import transformers

    from models.checkpoint import check_and_load
    from models.llama import Transformer
    from quant.int4 import Int4WeightOnlyLinear

    src = ["model=smollm2_135m", "checkpointer=native", f"checkpointer.path={smollm2_float_native}"]
    q = ["quantizer=int4_wo", "quantizer.groupsize=32"]
    cfg, metrics, out = _export(export_cfg, "task.format=gguf", *src, *q, "task.check=false", run_name="gguf")
    path = _gguf_file(out)
    assert path.name == "smollm2_135m-Q4_1.gguf" and path.stat().st_size == metrics["export/bytes"]
    model, tok = common.load_model(cfg)
    args, sd, tok2 = load_gguf(path)
    for name, m in model.named_modules():
        if isinstance(m, Int4WeightOnlyLinear):
            torch.testing.assert_close(sd[f"{name}.weight"], _expected_block_weights(m, sym=False), atol=1e-6, rtol=0)
    with torch.device("meta"):
        back = Transformer(args)
    check_and_load(back, sd, path)
    back.init_rope()
    ids = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(ids).logits
    torch.testing.assert_close(theirs, _logits(back.eval(), ids), atol=1e-3, rtol=1e-4)  # two readers, one file
    # Against our int4 model: only the fp16 rounding of d and m, over 30 layers (measured 0.09 at logits ~20).
    torch.testing.assert_close(theirs, _logits(model, ids), atol=0.25, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, gguf_file=path.name)
    text = "Numbers 12345 and naïve café\r\n  indented"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text, bos=False) == tok2.encode(text)
    assert tok2.chat_template == tok.chat_template


def test_gptq_dispatch_writes_the_format_tensors_over_the_float_ones(compose, export_cfg, monkeypatch):
    """The stage's side of the GPTQ format, with a stand-in for quant.gptq_format: the module's tensors replace the
    quantized linears' (their bias kept), the rest stays float, quantization_config lands in config.json."""
    import sys
    import types

    from safetensors.torch import load_file

    def to_gptq_checkpoint(model, spec):
        names = [n for n, m in model.named_modules() if hasattr(m, "qweight")]
        return {f"{n}.qweight": torch.full((2, 2), i, dtype=torch.int32) for i, n in enumerate(names)}, {"bits": 4}

    monkeypatch.setitem(sys.modules, "quant.gptq_format", types.SimpleNamespace(to_gptq_checkpoint=to_gptq_checkpoint))
    ckpt = _quantized_run(compose, "quantizer=int4_wo", "quantizer.groupsize=32")
    cfg, _, out = _export(export_cfg, "task.format=gptq", "checkpointer=native", f"checkpointer.path={ckpt}")
    saved = load_file(str(out / "model.safetensors"))
    model, _ = common.load_model(cfg)
    quantized = [n for n, m in model.named_modules() if hasattr(m, "qweight")]
    assert {k for k in saved if k.rpartition(".")[0] in quantized} == {f"{n}.qweight" for n in quantized}
    torch.testing.assert_close(saved["model.norm.weight"], model.model.norm.weight)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == {"bits": 4}

    def refuse(model, spec):
        raise ValueError("groupsize 32 with act-order is not representable")

    monkeypatch.setitem(sys.modules, "quant.gptq_format", types.SimpleNamespace(to_gptq_checkpoint=refuse))
    cfg = export_cfg("task.format=gptq", "checkpointer=native", f"checkpointer.path={ckpt}", run_name="refused")
    with pytest.raises(ConfigError, match="task.format=gptq: groupsize 32 with act-order is not representable"):
        run_in_process(export, cfg)
    assert not (run_dir() / "export").exists()
