"""runner/rundir.py in process: the context a stage gets, and the files only the wrapper writes."""

from __future__ import annotations

import json

import torch

from runner.rundir import context, run_dir, run_stage


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_context_is_the_current_job(compose, tmp_path):
    cfg = compose(["task=generate", "debug=smoke", "device=cpu"], run_name="job")
    ctx = context(cfg)
    assert ctx.run_dir == run_dir() == tmp_path / "job"
    assert ctx.rank == 0 and ctx.device == torch.device("cpu") and ctx.steps_logged == 0


def test_a_stage_without_steps_gets_its_final_metrics_as_step_0(compose, tmp_path):
    metrics = run_stage(compose(["task=generate", "debug=smoke"]), lambda cfg, ctx: {"generate/x": 1.0})
    assert metrics == {"generate/x": 1.0}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    assert _rows(tmp_path / "run" / "metrics.jsonl") == [{"step": 0, "generate/x": 1.0}]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "ok"


def test_a_stage_with_steps_keeps_only_its_steps_in_metrics_jsonl(compose, tmp_path):
    def stage(cfg, ctx):
        ctx.log_metrics({"finetune/loss": 2.0}, step=1)
        ctx.log_metrics({"finetune/loss": 1.0}, step=2)
        return {"finetune/val_loss": 1.5}

    run_stage(compose(["task=finetune", "debug=smoke"]), stage)
    assert _rows(tmp_path / "run" / "metrics.jsonl") == [
        {"step": 1, "finetune/loss": 2.0},
        {"step": 2, "finetune/loss": 1.0},
    ]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"finetune/val_loss": 1.5}
