"""runner/rundir.py in process: the context a stage gets, and the files only the wrapper writes."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

from runner import rundir
from runner.rundir import RunDirBusy, acquire_lock, context, run_dir, run_stage


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


# --- issue 16: every way a run ends is recorded; one run per directory ----------------------------------------------
def _fail(compose, stage, capsys, overrides=("task=generate", "debug=smoke")):
    """run_stage(stage) that must fail: (exit code, the lines on stderr, status.json)."""
    with pytest.raises(SystemExit) as e:
        run_stage(compose(list(overrides)), stage)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    status = json.loads((run_dir() / "status.json").read_text())
    return e.value.code, err, status


def test_sigterm_during_a_stage_is_recorded(tmp_path, data_dir):
    # A real run killed the way timeout, SLURM and docker stop do: status.json "failed" with the reason, a traceback,
    # one line on screen, exit code 128 + 15. (Before: status "running", no reason, no traceback.txt.)
    run = tmp_path / "run"
    args = ["task=eval", "debug=smoke", "task.tasks=[wikitext2_ppl]", "task.ppl_windows=null", "task.ppl_seqlen=64"]
    args += [f"paths.data_dir={data_dir}", f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", *args], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (run / "status.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it started its stage"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == "terminated by SIGTERM"
    assert "Traceback" in (run / "traceback.txt").read_text() and not (run / ".lock").exists()
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error: terminated by SIGTERM"), err


@pytest.mark.parametrize("how", ["raise", "signal"])
def test_ctrl_c_has_a_reason(compose, capsys, how):
    def stage(cfg, ctx):
        if how == "raise":
            raise KeyboardInterrupt  # Python's own handler: no message (was recorded as "KeyboardInterrupt: ")
        signal.raise_signal(signal.SIGINT)

    code, err, status = _fail(compose, stage, capsys)
    assert code == 130 and status["error"] == "interrupted by SIGINT" and len(err) == 1


def test_sighup_is_handled_like_sigint(compose, capsys):
    before = signal.getsignal(signal.SIGHUP)  # SIG_DFL, or SIG_IGN under nohup
    code, err, status = _fail(compose, lambda cfg, ctx: signal.raise_signal(signal.SIGHUP), capsys)
    assert code == 128 + signal.SIGHUP and status["error"] == "terminated by SIGHUP" and len(err) == 1
    assert signal.getsignal(signal.SIGHUP) is before  # handlers restored after the stage


def test_disk_full_while_recording_the_failure_still_ends_with_one_line(compose, capsys, monkeypatch):
    # The stage dies of a full disk, and traceback.txt cannot be written either: one line, no chained tracebacks,
    # no 0-byte traceback.txt, and status.json (small, written last) still says why.
    def stage(cfg, ctx):
        raise OSError(errno.ENOSPC, "No space left on device", str(ctx.run_dir / "checkpoints"))

    real = rundir.write_text_atomic

    def full_for_tracebacks(path, text):
        if path.name == "traceback.txt":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(rundir, "write_text_atomic", full_for_tracebacks)
    code, err, status = _fail(compose, stage, capsys)
    assert code == 1 and len(err) == 1 and "disk full" in err[0] and "traceback.txt" in err[0]
    assert status["status"] == "failed" and status["error"].startswith("disk full")
    assert not (run_dir() / "traceback.txt").exists()


def test_a_second_run_in_a_directory_in_use_fails_naming_the_holder(compose, capsys, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "run"
        run.mkdir()
        (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "start": "then"}))
        (run / "status.json").write_text('{"status": "running"}')  # the holder's
        with pytest.raises(SystemExit) as e:
            run_stage(compose(["task=generate", "debug=smoke"]), lambda cfg, ctx: {})
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert e.value.code == 1 and len(err) == 1 and f"pid {holder.pid}" in err[0] and ".lock" in err[0]
        assert (run / "status.json").read_text() == '{"status": "running"}'  # the holder's record is untouched
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(compose, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "start": "then"}))
    assert run_stage(compose(["task=generate", "debug=smoke"]), lambda cfg, ctx: {"generate/x": 1.0})
    assert not (run / ".lock").exists()  # released at the end
    with pytest.raises(RunDirBusy, match="in use by pid"):  # while a run holds it, nobody else gets it
        lock = acquire_lock(run)
        acquire_lock(run)
    lock.unlink()
