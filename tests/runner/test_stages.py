"""The stage table (runner/stages.py) against conf/task/*.yaml and the stage modules."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import yaml

from runner.stages import STAGES, headline

REPO = Path(__file__).resolve().parents[2]


def test_every_task_config_is_a_stage_and_every_stage_has_one():
    names = {yaml.safe_load(p.read_text())["name"]: p.stem for p in (REPO / "conf" / "task").glob("*.yaml")}
    assert all(name == stem for name, stem in names.items())  # file name = task name
    assert set(names) == set(STAGES)


def test_each_stage_module_has_run_and_its_headline_is_its_own_metric():
    for name, stage in STAGES.items():
        assert stage.module == f"runner.{name}"
        assert callable(importlib.import_module(stage.module).run)
        assert stage.headline.startswith(f"{name}/")
    assert headline("generate") == STAGES["generate"].headline and headline(None) is None


def test_the_sweep_callback_does_not_import_torch():
    # The callback runs in the sweep's parent process only to read status.json and metrics.json.
    code = "import sys, runner.callbacks, runner.compare; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
