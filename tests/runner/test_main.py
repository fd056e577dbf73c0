"""`python -m runner` as a user runs it: run directories, status.json, and one-line errors with non-zero exits."""

import json
import socket
import subprocess
import sys

import pytest
from conftest import run_cli

SMOKE = ["task=generate", "debug=smoke", "task.prompt=hello"]


def _last_line(text: str) -> str:
    return [line for line in text.strip().splitlines() if line.strip()][-1]


def test_run_directory_holds_everything(tmp_path):
    r = run_cli([*SMOKE, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "run.log", "metrics.json", "status.json"):
        assert (run / name).is_file(), name
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "ok" and status["error"] is None
    assert status["versions"]["torch"] and status["duration_s"] >= 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics and all(k.startswith("generate/") for k in metrics)


def test_default_run_dir_is_outputs_task_timestamp(tmp_path):
    r = run_cli([*SMOKE, f"paths.output_root={tmp_path}/outputs"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (run,) = (tmp_path / "outputs" / "generate").iterdir()
    assert (run / "status.json").is_file()


def test_value_out_of_range_fails_with_one_line_and_failed_status(tmp_path):
    r = run_cli([*SMOKE, "task.max_new_tokens=0", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "task.max_new_tokens" in _last_line(r.stderr)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "max_new_tokens" in status["error"]
    assert (tmp_path / "run" / "traceback.txt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, expected",
    [
        (["task=generat"], "Available options in 'task'"),
        ([*SMOKE, "task.max_new_tokns=3"], "max_new_tokns"),
        ([*SMOKE, "checkpointer=native", "checkpointer.path=/no/such/dir"], "/no/such/dir"),
        ([*SMOKE, "model=tiny", "quantizer=int5"], "Available options in 'quantizer'"),
    ],
    ids=["unknown-option", "typo-key", "missing-checkpoint", "unknown-quantizer"],
)
def test_bad_input_is_a_clear_error(tmp_path, args, expected):
    r = run_cli([*args, f"paths.output_root={tmp_path}/outputs"], cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert expected in r.stderr


def test_unwritable_output_root_is_one_line_naming_it(tmp_path):
    # issue 16: a file (or /proc) as paths.output_root printed 33-42 lines of chained Hydra tracebacks.
    root = tmp_path / "a_file"
    root.write_text("")
    r = run_cli([*SMOKE, f"paths.output_root={root}"], cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot create the output directory {root}/generate/")
    assert "paths.output_root" in lines[0]


def test_a_second_run_in_a_busy_run_directory_changes_nothing(tmp_path):
    # issue 16: two runs started in one run directory mixed their files (Hydra's .hydra/ included).
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the first run's\n")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "start": "then"}))
        r = run_cli([*SMOKE, f"hydra.run.dir={run}"], cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and f"in use by pid {holder.pid}" in lines[0]
    assert (run / ".hydra" / "config.yaml").read_text() == "the first run's\n"
    assert sorted(p.name for p in run.iterdir()) == [".hydra", ".lock"]
