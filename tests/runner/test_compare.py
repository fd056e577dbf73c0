"""runner.compare on run directories written here by hand (the layout run_stage and Hydra leave)."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from matplotlib.image import imread

from runner import compare


def _job(d: Path, overrides: list[str], metrics: dict | None, task="quantize", status="ok", error=None, duration=1.0):
    """A run directory as `python -m runner` leaves it: .hydra/overrides.yaml, status.json, metrics.json if ok."""
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    status_json = {"status": status, "task": task, "error": error, "duration_s": duration, "overrides": overrides}
    (d / "status.json").write_text(json.dumps(status_json))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def _grid_sweep(root: Path) -> Path:
    """A 2 x 2 GPTQ sweep (groupsize x percdamp) whose job 3 failed."""
    ppl = {(32, 0.01): 21.5, (32, 0.1): 20.25, (64, 0.01): 23.0}
    for num, (g, p) in enumerate([(32, 0.01), (32, 0.1), (64, 0.01), (64, 0.1)]):
        ov = ["task=quantize", "debug=smoke", "quantizer=gptq", f"quantizer.groupsize={g}", f"quantizer.percdamp={p}"]
        if (g, p) in ppl:
            _job(root / str(num), ov, {"quantize/ppl": ppl[g, p], "quantize/model_bytes": 1000.0 + g, "note": "x"})
        else:
            _job(root / str(num), ov, None, status="failed", error="ValueError: damping too large")
    (root / "multirun.yaml").write_text("{}")
    return root


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_summary_rows_columns_and_order(tmp_path):
    sweep = _grid_sweep(tmp_path / "sweep")
    runs = compare.summarize([sweep], sweep)
    assert [r["dir"].name for r in runs] == ["1", "0", "2", "3"]  # lowest perplexity first, the failure last

    rows = _read_csv(sweep / "summary.csv")
    assert list(rows[0]) == [
        "run", "task", "debug", "quantizer", "quantizer.groupsize", "quantizer.percdamp",
        "quantize/ppl", "quantize/model_bytes", "status", "duration_s", "error",
    ]  # fmt: skip
    assert [r["run"] for r in rows] == ["1", "0", "2", "3"]
    assert rows[0]["quantizer.groupsize"] == "32" and rows[0]["quantizer.percdamp"] == "0.1"
    assert float(rows[0]["quantize/ppl"]) == 20.25 and rows[0]["status"] == "ok" and rows[0]["error"] == ""
    assert rows[3]["status"] == "failed" and rows[3]["error"] == "ValueError: damping too large"
    assert rows[3]["quantize/ppl"] == ""

    md = (sweep / "summary.md").read_text()
    assert "4 runs, 3 ok, 1 not ok." in md
    assert "Same in every run: `debug=smoke` `quantizer=gptq`" in md
    header = next(line for line in md.splitlines() if line.startswith("| run"))
    assert header == (
        "| run | task | quantizer.groupsize | quantizer.percdamp | quantize/ppl | quantize/model_bytes | status "
        "| duration_s | error |"
    )
    assert "| 3 | quantize | 64 | 0.1 |  |  | failed | 1 | ValueError: damping too large |" in md

    png = imread(sweep / "summary.png")
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100


def test_larger_is_better_headline_sorts_descending(tmp_path):
    for i, tps in enumerate([10.0, 30.0, 20.0]):
        _job(tmp_path / "s" / str(i), [f"task.max_new_tokens={i}"], {"generate/decode_tokens_per_s": tps}, "generate")
    runs = compare.summarize([tmp_path / "s"], tmp_path / "s")
    assert [r["metrics"]["generate/decode_tokens_per_s"] for r in runs] == [30.0, 20.0, 10.0]


def test_runs_of_several_tasks_and_directories(tmp_path, capsys):
    a = _job(tmp_path / "quantize" / "a", ["task=quantize", "quantizer=int4_wo"], {"quantize/ppl": 30.0})
    b = _job(tmp_path / "quantize" / "b", ["task=quantize", "quantizer=int8_wo"], {"quantize/ppl": 25.0})
    e = _job(tmp_path / "eval" / "c", ["task=eval"], {"eval/wikitext2_ppl/ppl": 24.0, "eval/x/acc": 0.5}, "eval")
    out = tmp_path / "cmp"
    assert compare.main([str(a), str(b), str(e.parent), "--out", str(out)]) == 0
    rows = _read_csv(out / "summary.csv")
    # Grouped by task in order of appearance, each sorted by its own headline; runs named from the common root.
    assert [r["run"] for r in rows] == ["quantize/b", "quantize/a", "eval/c"]
    assert rows[2]["eval/wikitext2_ppl/ppl"] == "24.0" and rows[0]["eval/wikitext2_ppl/ppl"] == ""
    assert "| quantize/b | quantize | int8_wo | 25 |" in capsys.readouterr().out
    assert imread(out / "summary.png").ndim == 3


def test_cli_needs_out_for_several_directories_and_reports_no_runs(tmp_path, capsys):
    _grid_sweep(tmp_path / "s1")
    _grid_sweep(tmp_path / "s2")
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path / "s1"), str(tmp_path / "s2")])
    (tmp_path / "empty").mkdir()
    assert compare.main([str(tmp_path / "empty")]) == 1
    assert "no run directory" in capsys.readouterr().err


def test_single_run_and_nothing_varying_plot_a_bar(tmp_path):
    run = _job(tmp_path / "quantize" / "2025-01-01_00-00-00", ["task=quantize"], {"quantize/ppl": 12.0})
    assert compare.main([str(run)]) == 0
    rows = _read_csv(run / "summary.csv")
    assert [r["run"] for r in rows] == ["2025-01-01_00-00-00"]
    assert imread(run / "summary.png").ndim == 3


def test_job_that_never_reached_its_stage_and_an_all_failed_sweep(tmp_path):
    sweep = tmp_path / "s"
    _job(sweep / "0", ["model.dtype=int3"], None, status="failed", error="model.dtype='int3' is not valid")
    # Hydra writes .hydra/ before calling the task; no status.json means the stage never started.
    (sweep / "1" / ".hydra").mkdir(parents=True)
    (sweep / "1" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model.dtype=int4"]))
    (sweep / "1" / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"task": {"name": "quantize"}}))
    runs = compare.summarize([sweep], sweep)
    assert [(r["dir"].name, r["task"], r["status"]) for r in runs] == [
        ("0", "quantize", "failed"),
        ("1", "quantize", "unknown"),
    ]
    assert "no status.json" in runs[1]["error"]
    assert imread(sweep / "summary.png").ndim == 3  # a note instead of a plot, but a PNG all the same


def test_plot_has_one_panel_per_varying_override_and_one_line_per_other_combination(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: saved.append(fig))
    sweep = tmp_path / "s"
    for i, (g, p, b) in enumerate([(g, p, b) for g in (32, 64, 128) for p in (0.01, 0.1) for b in (64, 128)]):
        ov = [f"quantizer.groupsize={g}", f"quantizer.percdamp={p}", f"quantizer.blocksize={b}"]
        _job(sweep / str(i), ov, {"quantize/ppl": g + 100 * p + b / 1000})
    compare.summarize([sweep], sweep)
    axes = saved[0].axes
    assert [ax.get_xlabel() for ax in axes] == ["quantizer.groupsize", "quantizer.percdamp", "quantizer.blocksize"]
    assert [len(ax.get_lines()) for ax in axes] == [4, 6, 6]  # 2x2, 3x2, 3x2 combinations of the others
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["32", "64", "128"]  # numeric order


def _config_job(d: Path, overrides: list[str], groupsize: int, ppl: float, model_bytes: float, extra: dict = None):
    """A quantize job with the resolved config Hydra writes (.hydra/config.yaml, choices in .hydra/hydra.yaml)."""
    metrics = {"quantize/ppl": ppl, "quantize/ppl_float": 18.0, "quantize/model_bytes": model_bytes, "quantize/x": 1.0}
    _job(d, overrides, metrics)
    config = {"task": {"name": "quantize"}, "model": {"name": "smollm2_135m"}, "seed": 0}
    config["quantizer"] = {"name": "gptq", "groupsize": groupsize, "percdamp": 0.01, **(extra or {})}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    choices = {"task": "quantize", "quantizer": "gptq", "model": "smollm2_135m", "hydra/help": "lmrunner"}
    (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    return d


def _captured_figure(monkeypatch) -> list:
    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: saved.append(fig))
    return saved


def test_columns_come_from_the_resolved_config(tmp_path):
    """The defect: a run that kept the default groupsize was listed (and plotted) as groupsize None, empty cell."""
    sweep = tmp_path / "s"
    _config_job(sweep / "0", ["task=quantize", "quantizer=gptq", "quantizer.groupsize=64"], 64, 20.0, 150.0)
    _config_job(sweep / "1", ["task=quantize", "quantizer=gptq"], 128, 21.0, 140.0, {"percdamp": 0.1})
    compare.summarize([sweep], sweep)
    rows = {r["run"]: r for r in _read_csv(sweep / "summary.csv")}
    assert rows["1"]["quantizer.groupsize"] == "128" and rows["0"]["quantizer.groupsize"] == "64"
    # A key that differs though no override names it (an experiment file, a changed default) gets a column too.
    assert rows["0"]["quantizer.percdamp"] == "0.01" and rows["1"]["quantizer.percdamp"] == "0.1"
    assert "seed" not in rows["0"] and "model.name" not in rows["0"]  # the same in both: no column


def test_plot_title_float_baseline_and_size_view(tmp_path, monkeypatch):
    """The defects: no title (model, task), no float-baseline line, no quality-vs-size view."""
    saved = _captured_figure(monkeypatch)
    sweep = tmp_path / "s"
    for i, (g, ppl, size) in enumerate([(32, 19.0, 160.0), (64, 20.0, 150.0), (128, 21.0, 140.0)]):
        _config_job(sweep / str(i), ["task=quantize", f"quantizer.groupsize={g}"], g, ppl, size)
    compare.summarize([sweep], sweep)
    axes = saved[0].axes
    assert "quantize" in axes[0].get_title(loc="left") and "smollm2_135m" in axes[0].get_title(loc="left")
    assert [ax.get_xlabel() for ax in axes] == ["quantizer.groupsize", "quantize/model_bytes (MB)"]
    for ax in axes:  # the float model's perplexity as a horizontal line in every panel
        assert any(list(line.get_ydata()) == [18.0, 18.0] for line in ax.get_lines())
    xs = sorted(line.get_xdata()[0] for line in axes[1].get_lines() if len(line.get_xdata()) == 1)
    assert xs == pytest.approx([140e-6, 150e-6, 160e-6])


def test_metric_flag_chooses_what_to_plot(tmp_path, monkeypatch, capsys):
    saved = _captured_figure(monkeypatch)
    sweep = tmp_path / "s"
    for i, g in enumerate((64, 128)):
        _config_job(sweep / str(i), ["task=quantize", f"quantizer.groupsize={g}"], g, 20.0, 150.0)
    assert compare.main([str(sweep), "--metric", "quantize/x"]) == 0
    assert saved[-1].axes[0].get_ylabel() == "quantize/x"
    assert compare.main([str(sweep), "--metric", "quantize/nope"]) == 1
    assert "--metric quantize/nope: no run has it" in capsys.readouterr().err
