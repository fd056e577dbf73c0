"""task=finetune on the tiny model: outputs, exact resume, LoRA, NaN and signal handling, FSDP2 parity."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_in_process
from safetensors.torch import load_file

from runner import common, finetune
from runner.common import ConfigError
from runner.rundir import run_stage


def _data(tmp_path, n=24, same=False):
    path = tmp_path / ("same.jsonl" if same else "data.jsonl")
    k = [0] * n if same else [i % 7 for i in range(n)]
    recs = [
        {"instruction": f"count to {k[i]}", "input": "", "output": " ".join("abcdefg"[: k[i] + 1])} for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in recs))
    return path


def _cfg(compose, tmp_path, *overrides, run="run", same=False):
    base = ["task=finetune", "debug=smoke", f"data.path={_data(tmp_path, same=same)}", "data.val_size=4"]
    return compose([*base, "task.max_seq_len=48", *overrides], run_name=run)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _per_step(run, key="finetune/loss"):
    return {r["step"]: r[key] for r in _rows(run) if key in r}


def test_smoke_outputs_load_in_other_stages(compose, tmp_path):
    metrics = run_in_process(finetune, _cfg(compose, tmp_path))
    assert set(metrics) == {"finetune/final_loss", "finetune/val_loss", "finetune/tokens_per_s", "finetune/steps"}
    assert metrics["finetune/steps"] == 2 and all(v == v for v in metrics.values())
    run = tmp_path / "run"
    rows = _rows(run)
    assert rows[0] == {"step": 0, "finetune/val_loss": rows[0]["finetune/val_loss"]}
    step_keys = {
        "finetune/loss",
        "finetune/lr",
        "finetune/grad_norm",
        "finetune/tokens_per_s",
        "finetune/peak_memory_gb",
    }
    assert [r["step"] for r in rows[1:]] == [1, 2] and all(step_keys <= set(r) for r in rows[1:])
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]  # older ones are removed
    state = torch.load(run / "checkpoints/step_000002/train_state.pt", weights_only=True)
    assert state["step"] == 2 and state["position"] == 4 and len(state["rng"]) == 1
    assert set(state["optimizer"]["state"]) == set(load_file(run / "checkpoints/step_000002/trainable.safetensors"))

    cfg = compose(["task=generate", "debug=smoke", "checkpointer=native", f"checkpointer.path={run / 'model'}"], "gen")
    model, tok = common.load_model(cfg)
    saved = load_file(run / "model/model.safetensors")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    assert tok.eos_id == 257 and (run / "model/config.yaml").is_file()


def test_loss_goes_down_on_a_fixed_batch(compose, tmp_path):
    over = ["task.max_steps=6", "task.micro_batch_size=2", "task.optimizer.lr=1e-3", "task.scheduler.warmup_steps=0"]
    run_in_process(finetune, _cfg(compose, tmp_path, *over, "task.eval_every=null", same=True))
    losses = list(_per_step(tmp_path / "run").values())
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_continues_exactly(compose, tmp_path, method):
    # LoRA dropout and gradient accumulation (micro 1, batch 2) make the RNG and data position matter.
    over = ["task.max_steps=4", f"task.method={method}", "task.lora.dropout=0.2", "task.optimizer.lr=1e-3"]
    run_in_process(finetune, _cfg(compose, tmp_path, *over, run="straight"))
    run_in_process(finetune, _cfg(compose, tmp_path, *over, "task.stop_after=2", run="split"))
    split = tmp_path / "split"
    assert not (split / "model").exists()  # unfinished: checkpoint only
    assert [p.name for p in (split / "checkpoints").iterdir()] == ["step_000002"]
    metrics = run_in_process(finetune, _cfg(compose, tmp_path, *over, "task.resume=true", run="split"))
    assert metrics["finetune/steps"] == 4
    for key in ("finetune/loss", "finetune/grad_norm", "finetune/lr", "finetune/val_loss"):
        assert _per_step(split, key) == _per_step(tmp_path / "straight", key), key
    assert (split / "model/model.safetensors").is_file()


def test_lora_trains_only_the_adapter_and_merges(compose, tmp_path):
    cfg = _cfg(
        compose, tmp_path, "task.method=lora", "task.optimizer.lr=1e-2", "task.lora.target_modules=[q_proj,up_proj]"
    )
    run_in_process(finetune, cfg)
    run = tmp_path / "run"
    trainable = load_file(run / "checkpoints/step_000002/trainable.safetensors")
    assert trainable and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in trainable)
    adapter = load_file(run / "adapter/adapter_model.safetensors")
    assert set(adapter) == set(trainable)
    adapter_cfg = json.loads((run / "adapter/adapter_config.json").read_text())
    assert adapter_cfg["rank"] == 8 and adapter_cfg["target_modules"] == ["q_proj", "up_proj"]
    base, _ = common.load_model(_cfg(compose, tmp_path, run="base"))  # same seed: the same random base model
    merged = load_file(run / "model/model.safetensors")
    scale = adapter_cfg["alpha"] / adapter_cfg["rank"]
    for k, w in base.state_dict().items():
        a = adapter.get(k.replace(".weight", ".lora_A.weight"))
        if a is None:
            torch.testing.assert_close(merged[k], w, rtol=0, atol=0)
        else:
            b = adapter[k.replace(".weight", ".lora_B.weight")]
            assert b.abs().max() > 0
            torch.testing.assert_close(merged[k], w + scale * b @ a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(compose, tmp_path):
    # lr 1e30 makes the first AdamW update about 1e30 per weight: step 2's logits overflow.
    cfg = _cfg(compose, tmp_path, "task.max_steps=4", "task.optimizer.lr=1e30", "task.scheduler.warmup_steps=0")
    with pytest.raises(FloatingPointError, match=r"step 2.*checkpoints/step_000001"):
        run_in_process(finetune, cfg)
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000001"]
    assert not (run / "model").exists()


def test_sigterm_writes_a_checkpoint_then_exits(compose, tmp_path, monkeypatch):
    take = finetune.data.Sampler.take

    def take_then_signal(self, start, count):  # the signal arrives during step 1
        signal.raise_signal(signal.SIGTERM)
        return take(self, start, count)

    monkeypatch.setattr(finetune.data.Sampler, "take", take_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="step 1.*task.resume="):
        run_in_process(finetune, _cfg(compose, tmp_path, "task.max_steps=4", "task.save_every=null"))
    assert signal.getsignal(signal.SIGTERM) == before
    assert [p.name for p in (tmp_path / "run/checkpoints").iterdir()] == ["step_000001"]


# --- issue 16: no lost training, no repeated rows --------------------------------------------------------------------
def test_rerun_into_a_run_with_checkpoints_refuses_unless_resume_or_overwrite(compose, tmp_path):
    # Before: the second run started at step 0, its first save deleted step_000002, and both runs' rows shared
    # one metrics.jsonl, with exit 0.
    run_in_process(finetune, _cfg(compose, tmp_path))
    run = tmp_path / "run"
    rows = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"checkpoints up to step_000002.*task\.resume=true.*task\.overwrite=true"):
        run_in_process(finetune, _cfg(compose, tmp_path, "task.max_steps=1"))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]
    assert (run / "metrics.jsonl").read_text() == rows
    run_in_process(finetune, _cfg(compose, tmp_path, "task.max_steps=1", "task.overwrite=true"))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000001"]
    assert [r["step"] for r in _rows(run)] == [0, 1]
    # Continuing another directory's checkpoint here would mix two runs just the same.
    run_in_process(finetune, _cfg(compose, tmp_path, run="other"))
    other = f"task.resume={tmp_path / 'other' / 'checkpoints' / 'step_000002'}"
    with pytest.raises(ConfigError, match="task.overwrite=true"):
        run_in_process(finetune, _cfg(compose, tmp_path, "task.max_steps=3", other))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000001"]


def test_keep_checkpoints_keeps_the_newest_and_never_a_newer_step(compose, tmp_path):
    run_in_process(finetune, _cfg(compose, tmp_path, "task.max_steps=4", "task.keep_checkpoints=2"))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    run_in_process(finetune, _cfg(compose, tmp_path, "task.max_steps=4", "task.keep_checkpoints=4", run="all"))
    ckpts = tmp_path / "all" / "checkpoints"
    # Continuing from step 2 of a run that went on to step 4, keeping 1: steps 1 and 2 go, step 4 (newer) stays.
    over = [f"task.resume={ckpts / 'step_000002'}", "task.stop_after=1", "task.keep_checkpoints=1"]
    run_in_process(finetune, _cfg(compose, tmp_path, "task.max_steps=4", *over, run="all"))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000003", "step_000004"]


def test_resume_logs_each_step_once_and_a_finished_run_keeps_its_final_loss(compose, tmp_path):
    over = ["task.max_steps=4"]
    run_in_process(finetune, _cfg(compose, tmp_path, *over, "task.stop_after=2"))
    run = tmp_path / "run"
    with open(run / "metrics.jsonl", "a") as f:  # killed after logging step 3, before its checkpoint
        f.write(json.dumps({"step": 3, "finetune/loss": 9.0}) + "\n" + '{"step": 4, "finetune/lo')
    metrics = run_in_process(finetune, _cfg(compose, tmp_path, *over, "task.resume=true"))
    assert [r["step"] for r in _rows(run)] == [0, 1, 2, 3, 4] and _per_step(run)[3] != 9.0
    again = run_in_process(finetune, _cfg(compose, tmp_path, *over, "task.resume=true"))  # no steps left
    assert again["finetune/final_loss"] == metrics["finetune/final_loss"] == _per_step(run)[4]
    assert [r["step"] for r in _rows(run)] == [0, 1, 2, 3, 4]


def test_disk_full_in_a_save_is_one_line_and_recorded(compose, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(finetune, "save_file", full)
    with pytest.raises(SystemExit) as e:
        run_stage(_cfg(compose, tmp_path), finetune.run)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # the rest is the progress bar
    run = tmp_path / "run"
    status = json.loads((run / "status.json").read_text())
    assert (
        e.value.code == 1 and "Traceback" not in err and len(errors) == 1 and errors[0].startswith("error: disk full")
    )
    assert status["status"] == "failed" and status["error"].startswith("disk full")
    assert "No space left" in (run / "traceback.txt").read_text()
    assert not any((run / "checkpoints").iterdir())  # no half-written checkpoint or temporary


def test_sequences_past_the_model_context_are_refused(compose, tmp_path):
    with pytest.raises(ConfigError, match=r"task.max_seq_len=300 exceeds the model's context of 256"):
        run_in_process(finetune, _cfg(compose, tmp_path, "task.max_seq_len=300"))


@pytest.mark.parametrize("knob", ["task.activation_checkpointing=true", "task.bf16=true"])
def test_memory_and_precision_knobs(compose, tmp_path, knob):
    ref = run_in_process(finetune, _cfg(compose, tmp_path, run="ref"))
    got = run_in_process(finetune, _cfg(compose, tmp_path, knob, run="knob"))
    if knob.startswith("task.activation"):  # recomputation replays the same maths
        assert _per_step(tmp_path / "knob") == _per_step(tmp_path / "ref")
    else:  # bf16 autocast on CPU: same losses to bf16 precision
        assert got["finetune/final_loss"] == pytest.approx(ref["finetune/final_loss"], rel=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_and_exact_resume(compose, tmp_path):
    cpu = run_in_process(finetune, _cfg(compose, tmp_path, "task.max_steps=4", run="cpu"))
    over = ["device=cuda", "task.max_steps=4", "task.method=lora", "task.lora.dropout=0.2"]  # bf16=auto: autocast on
    got = run_in_process(finetune, _cfg(compose, tmp_path, *over, run="straight"))
    assert got["finetune/final_loss"] == pytest.approx(cpu["finetune/final_loss"], rel=5e-2)
    run_in_process(finetune, _cfg(compose, tmp_path, *over, "task.stop_after=2", run="split"))
    run_in_process(finetune, _cfg(compose, tmp_path, *over, "task.resume=true", run="split"))  # CUDA RNG restored too
    # CUDA kernels may accumulate in a different order from run to run: equal to float32 noise, not bit for bit.
    assert _per_step(tmp_path / "split") == pytest.approx(_per_step(tmp_path / "straight"), rel=1e-4)


@pytest.mark.slow  # inductor compiles each block: about a minute on 2 cores
def test_compile_matches_eager(compose, tmp_path):
    run_in_process(finetune, _cfg(compose, tmp_path, run="eager"))
    run_in_process(finetune, _cfg(compose, tmp_path, "task.compile=true", run="compiled"))
    eager, compiled = _per_step(tmp_path / "eager"), _per_step(tmp_path / "compiled")
    assert compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["task.batch_size=3", "task.micro_batch_size=2"], "batch_size=3"),
        (["task.method=qlora"], "task.method"),
        (["task.bf16=maybe"], "task.bf16"),
        (["task.method=lora", "task.lora.target_modules=[qkv]"], "qkv"),
        (["task.resume=/nonexistent"], "task.resume"),
    ],
)
def test_bad_config_is_a_config_error(compose, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        run_in_process(finetune, _cfg(compose, tmp_path, *overrides))


@pytest.mark.slow  # two torchrun launches: startup dominates (about a minute on 2 cores)
def test_fsdp2_two_processes_match_one_and_resume_anywhere(compose, tmp_path, data_dir):
    """torchrun --nproc_per_node=2 (gloo, FSDP2) gives the losses of one process with the same global batch, and its
    checkpoints (single-device format) resume exactly, under torchrun or in one process."""
    over = [
        "task=finetune",
        "debug=smoke",
        f"data.path={_data(tmp_path)}",
        "data.val_size=3",  # uneven over 2 ranks: exercises the padded validation loop
        "task.max_seq_len=48",
        "task.max_steps=4",
        "task.batch_size=4",
        "task.micro_batch_size=1",  # 2 micro-batches per rank: accumulation under FSDP too
        "task.optimizer.lr=1e-3",
        "task.max_grad_norm=0.5",  # clipping active: the global norm must be right
        f"paths.data_dir={data_dir}",
    ]
    run_in_process(finetune, compose(over, run_name="single"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    # Per-rank run directories: run_stage writes status.json on every rank (see the report to the lead).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "runner", *over,
           f"hydra.run.dir={tmp_path}/ddp" + "${oc.env:RANK}", f"paths.output_root={tmp_path}/out"]  # fmt: skip
    r = subprocess.run([*cmd, "task.stop_after=2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp, single = tmp_path / "ddp0", tmp_path / "single"
    assert not (tmp_path / "ddp1/metrics.jsonl").exists()  # only rank 0 logs and checkpoints
    ckpt = ddp / "checkpoints/step_000002"
    assert (
        load_file(ckpt / "trainable.safetensors").keys()
        == load_file(single / "checkpoints/step_000004/trainable.safetensors").keys()
    )
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    shutil.copytree(ckpt, tmp_path / "step2")

    r = subprocess.run([*cmd, "task.resume=true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run_in_process(finetune, compose([*over, f"task.resume={tmp_path / 'step2'}"], run_name="cross"))  # 2 ranks -> 1
    for key in ("finetune/loss", "finetune/grad_norm", "finetune/val_loss"):
        want = _per_step(single, key)
        assert _per_step(ddp, key) == pytest.approx(want, abs=1e-4), key
        assert _per_step(tmp_path / "cross", key) == pytest.approx({k: v for k, v in want.items() if k > 2}, abs=1e-4)
    a, b = load_file(ddp / "model/model.safetensors"), load_file(single / "model/model.safetensors")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
