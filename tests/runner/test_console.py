"""What a user sees: every stage's console ends with the closing block, and per-layer / per-step detail stays in
run.log. One subprocess per stage on the tiny model (debug=smoke), since the console is the thing under test."""

import json

import pytest
from conftest import run_cli

from runner.rundir import format_value
from runner.stages import STAGES

CASES = {
    # stage args, a line of per-layer or per-step detail that belongs in run.log only
    # calibration windows within the tiny model's 256-token context (a longer seqlen is refused)
    "quantize": (
        ["task=quantize", "quantizer=gptq", "quantizer.nsamples=4", "quantizer.seqlen=64"],
        "block 0 self_attn.q_proj",
    ),
    "finetune": (["task=finetune"], "step 1: finetune/loss"),
    "eval": (["task=eval", "task.tasks=[wikitext2_ppl,hellaswag]"], None),
    "generate": (["task=generate", "task.prompt=hello"], None),
}


@pytest.mark.parametrize("task", list(CASES))
def test_console_ends_with_closing_block_and_no_detail(tmp_path, data_dir, task):
    args, detail = CASES[task]
    run = tmp_path / "run"
    r = run_cli([*args, "debug=smoke", f"paths.data_dir={data_dir}", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    console = r.stdout + r.stderr
    assert "Traceback" not in console
    block = r.stdout[r.stdout.index(f"== {task}: ok in ") :]
    headline = STAGES[task].headline
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [line.split() for line in block.splitlines()]
    assert [headline, format_value(metrics[headline])] == next(row[:2] for row in rows if row and row[0] == headline)
    assert ["run", "directory", str(run)] in rows
    if task == "quantize":  # the float baseline beside the headline, and the next command for the model
        assert f"(float model: {format_value(metrics['quantize/ppl_float'])})" in block
        assert f"lmrunner task=generate checkpointer=native checkpointer.path={run / 'model'}" in block
    if detail is not None:
        assert detail not in console
        assert detail in (run / "run.log").read_text()


@pytest.mark.parametrize(
    "value, text", [(3.2851397003150904e26, "3.285e+26"), (7005.43, "7005"), (10640.49, "10,640"), (8.0, "8")]
)
def test_format_value_is_short(value, text):
    assert format_value(value) == text
