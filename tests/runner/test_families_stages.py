"""Every stage on each other family (Qwen3, Gemma 2, Gemma 3, Phi-3), chained as a user would: finetune with LoRA
from a tiny transformers checkpoint, GPTQ-quantize the merged model, evaluate and generate from the quantized
checkpoint. The numbers are checked against transformers in tests/models/test_families.py and
tests/quant/test_gptq.py; here each stage must run through and hand its output to the next."""

from __future__ import annotations

import json
import math

import pytest
from conftest import FAMILY_HF, make_family_hf, run_in_process
from safetensors.torch import load_file

import runner.eval
from runner import finetune, quantize
from runner import generate as gen_stage
from runner.rundir import run_dir


@pytest.mark.parametrize("family", list(FAMILY_HF))
def test_finetune_quantize_eval_generate(compose, tmp_path, family):
    hf = make_family_hf(tmp_path / "hf", family)
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": f"count to {k}", "input": "", "output": " ".join("abcdefg"[: k + 1])} for k in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    ft = [
        "task=finetune",
        "debug=smoke",
        f"data.path={data}",
        "data.val_size=4",
        "task.max_seq_len=48",
        "task.method=lora",
        "task.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
        "checkpointer=hf",
        f"checkpointer.path={hf}",
    ]
    metrics = run_in_process(finetune, compose(ft, run_name="ft"))
    assert math.isfinite(metrics["finetune/final_loss"])
    adapter = load_file(tmp_path / "ft/adapter/adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * json.loads((hf / "config.json").read_text())["num_hidden_layers"]
    merged = tmp_path / "ft/model"
    q = ["task=quantize", "debug=smoke", "quantizer=gptq", "checkpointer=native", f"checkpointer.path={merged}"]
    run_in_process(quantize, compose(q, run_name="q"))
    quantized = tmp_path / "q/model"
    assert json.loads((quantized / "quantizer.json").read_text())["name"] == "gptq"
    on_quantized = ["debug=smoke", "checkpointer=native", f"checkpointer.path={quantized}"]
    metrics = run_in_process(runner.eval, compose(["task=eval", *on_quantized], run_name="eval"))
    assert math.isfinite(metrics["eval/wikitext2_ppl/ppl"]) and math.isfinite(metrics["eval/hellaswag/acc"])
    metrics = run_in_process(gen_stage, compose(["task=generate", *on_quantized], run_name="gen"))
    assert metrics["generate/new_tokens"] > 0
    samples = [json.loads(line) for line in (run_dir() / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["completion_tokens"] >= 1 for s in samples)
