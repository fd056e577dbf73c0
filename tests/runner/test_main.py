"""`python -m runner` as a user runs it: run directories, status.json, and one-line errors with non-zero exits."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from runner.stages import STAGES

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


def _console_script(tmp_path) -> Path:
    """The `lmrunner` script pip writes for pyproject.toml's [project.scripts] entry (read from there)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["lmrunner"]
    module, func = entry.split(":")
    script = tmp_path / "bin" / "lmrunner"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    script.chmod(0o755)
    return script


def _run_script(script: Path, args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=e)


def _assert_help_page(r: subprocess.CompletedProcess):
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for stage in STAGES:
        assert f"lmrunner task={stage}" in r.stdout, stage  # every stage with an example
    assert "quantizer:" in r.stdout and "gptq" in r.stdout and "outputs/" in r.stdout
    for internal in ("debug_task", "lm_eval_tasks", "powered by Hydra"):
        assert internal not in r.stdout


@pytest.mark.parametrize("args", [["--help"], ["task=quantize", "quantizer=gptq", "--help"]], ids=["no-task", "task"])
def test_help_page_with_or_without_task(tmp_path, args):
    _assert_help_page(run_cli(args, cwd=tmp_path))


def test_no_task_is_one_line_listing_the_stages(tmp_path):
    r = run_cli(["model=tiny"], cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert all(f"task={stage}" in r.stderr for stage in STAGES)


def test_console_script_help_and_shell_completion(tmp_path):
    script = _console_script(tmp_path)
    _assert_help_page(_run_script(script, ["--help"], cwd=tmp_path))
    r = _run_script(script, ["-sc", "install=bash"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (
        "hydra_bash_completion" in r.stdout
        and "complete -o nospace -o default -F hydra_bash_completion lmrunner" in r.stdout
    )
    # What bash's completion function then asks the script for `lmrunner quantizer=<TAB>`.
    line = "lmrunner quantizer="
    r = _run_script(script, ["-sc", "query=bash"], cwd=tmp_path, env={"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert r.returncode == 0, r.stderr
    assert "quantizer=gptq" in r.stdout.split()
