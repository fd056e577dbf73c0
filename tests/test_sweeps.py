"""Sweeps: `python -m runner -m ...` in a subprocess on the tiny model, with Hydra's basic, joblib and submitit_local
launchers and the Optuna sweeper; the end-of-multirun callback (runner/callbacks.py) and its summary files."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from conftest import CONF_DIR, run_cli
from hydra import compose, initialize_config_dir
from matplotlib.image import imread
from omegaconf import OmegaConf

from runner import compare
from runner.callbacks import SweepSummary
from runner.stages import STAGES

HAS_OPTUNA = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
SEARCHES = sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml"))


def _sweep(args: list[str], tmp_path: Path, data_dir: Path, cache_dir: Path, env: dict | None = None):
    sweep = tmp_path / "sweep"
    r = run_cli(
        ["-m", *args, f"hydra.sweep.dir={sweep}", f"paths.data_dir={data_dir}", f"paths.cache_dir={cache_dir}"],
        cwd=tmp_path,
        env=env,
    )
    return r, sweep


def _summary(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _check_rows_match_jobs(sweep: Path, rows: list[dict]) -> None:
    """Every row holds its job's overrides and metrics.json values exactly (CSV keeps repr precision)."""
    for row in rows:
        job = sweep / row["run"]
        for override in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()):
            key, _, value = override.partition("=")
            assert key == "task" or row[key.lstrip("+")] == value
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics and all(float(row[k]) == v for k, v in metrics.items())
        assert row["status"] == json.loads((job / "status.json").read_text())["status"] == "ok"


# --- the callback, on job directories written by hand (fast) --------------------------------------------------------
def _job(d: Path, status: str, ppl: float | None):
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"quantizer.groupsize={d.name}"]))
    err = None if status == "ok" else "RuntimeError: boom"
    status_json = {"status": status, "task": "quantize", "error": err, "duration_s": 1.0, "overrides": []}
    (d / "status.json").write_text(json.dumps(status_json))
    if ppl is not None:
        (d / "metrics.json").write_text(json.dumps({"quantize/ppl": ppl}))


def test_callback_writes_the_summary_and_exits_1_when_a_job_failed(tmp_path):
    # The callback gets the sweep's composed config: hydra's part and the app's (logger=none: no W&B summary run).
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "logger": {"name": "none"}})
    _job(tmp_path / "32", "ok", 10.0)
    _job(tmp_path / "64", "ok", 11.0)
    SweepSummary().on_multirun_end(config=cfg)  # all ok: returns
    assert all((tmp_path / f).is_file() for f in compare.FILES)

    _job(tmp_path / "128", "failed", None)
    with pytest.raises(SystemExit) as e:
        SweepSummary().on_multirun_end(config=cfg)
    assert e.value.code == 1
    assert [r["status"] for r in _summary(tmp_path)] == ["ok", "ok", "failed"]


@pytest.mark.skipif(not HAS_OPTUNA, reason="hydra-optuna-sweeper not installed (pip install -e '.[optuna]')")
@pytest.mark.parametrize("search", SEARCHES)
def test_hparams_search_composes_and_names_real_keys(search):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"{search}: {key} is not a config key"
    # The sweeper optimises the value runner/__main__.py returns: the task's headline metric.
    wanted = "maximize" if STAGES[cfg.task.name].maximize else "minimize"
    assert sweeper.direction == wanted


# --- real sweeps in a subprocess (slow) ----------------------------------------------------------------------------
@pytest.mark.slow
def test_grid_sweep_leaves_four_jobs_and_a_matching_summary(tmp_path, data_dir, cache_dir):
    r, sweep = _sweep(
        ["task=generate", "debug=smoke", "quantizer=none,int8_wo", "task.max_new_tokens=2,4"],
        tmp_path,
        data_dir,
        cache_dir,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    for j in jobs:
        assert {"metrics.json", "status.json", ".hydra"} <= {p.name for p in (sweep / j).iterdir()}
    rows = _summary(sweep)
    assert len(rows) == 4 and sorted(r["run"] for r in rows) == jobs
    assert {(r["quantizer"], r["task.max_new_tokens"]) for r in rows} == {
        (q, n) for q in ("none", "int8_wo") for n in ("2", "4")
    }
    _check_rows_match_jobs(sweep, rows)
    tps = [float(r["generate/decode_tokens_per_s"]) for r in rows]
    assert tps == sorted(tps, reverse=True)  # headline first: throughput, larger is better
    assert (sweep / "summary.md").read_text().count("| ok |") == 4
    assert imread(sweep / "summary.png").ndim == 3


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep_and_the_exit_code_says_so(tmp_path, data_dir, cache_dir):
    r, sweep = _sweep(
        ["task=generate", "debug=smoke", "model.dtype=float32,int3,bfloat16"], tmp_path, data_dir, cache_dir
    )
    assert r.returncode == 1
    rows = {row["model.dtype"]: row for row in _summary(sweep)}
    assert rows["float32"]["status"] == rows["bfloat16"]["status"] == "ok"  # the job after the failure ran too
    assert rows["int3"]["status"] == "failed"
    assert rows["int3"]["error"] == "model.dtype='int3' is not valid; use one of float32, bfloat16, float16"
    assert "model.dtype='int3' is not valid" in (sweep / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], ["hydra/launcher=submitit_local"]],
    ids=lambda a: a[0],
)
def test_parallel_launchers_run_a_two_job_sweep(tmp_path, data_dir, cache_dir, launcher):
    r, sweep = _sweep(
        ["task=generate", "debug=smoke", "task.max_new_tokens=2,4", *launcher], tmp_path, data_dir, cache_dir
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _summary(sweep)
    assert sorted(row["task.max_new_tokens"] for row in rows) == ["2", "4"]
    _check_rows_match_jobs(sweep, rows)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_OPTUNA, reason="hydra-optuna-sweeper not installed (pip install -e '.[optuna]')")
def test_optuna_search_minimises_the_returned_headline(tmp_path, data_dir, cache_dir):
    # Two trials of the GPTQ search with a tiny calibration set; the sweeper sees what task=quantize returns.
    args = ["hparams_search=gptq_ppl", "debug=smoke", "hydra.sweeper.n_trials=2", "quantizer.nsamples=2"]
    r, sweep = _sweep([*args, "quantizer.seqlen=64"], tmp_path, data_dir, cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _summary(sweep)
    assert len(rows) == 2
    _check_rows_match_jobs(sweep, rows)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == float(rows[0]["quantize/ppl"])  # the summary's first row is Optuna's best trial
    assert best["best_params"]["quantizer.groupsize"] == int(rows[0]["quantizer.groupsize"])
