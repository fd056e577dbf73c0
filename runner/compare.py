"""Compare runs: one table and one plot for any set of run or sweep directories.

    python -m runner.compare outputs/multirun/2025-06-01_12-00-00-000000      # writes into the sweep directory
    python -m runner.compare outputs/quantize/RUN_A outputs/quantize/RUN_B SWEEP_C --out outputs/compare

Every multirun gets the same files at its end from the Hydra callback in runner/callbacks.py.

A run directory is one that holds `status.json` or `.hydra/overrides.yaml` (every job of `python -m runner` writes
both); a sweep directory is searched for the run directories below it. Files written (into --out, by default the
one directory given):
- `summary.csv`: one row per run: run (path relative to the common root), task, a column per override and per
  config key whose value differs between the runs (`quantizer.groupsize`, ...), every numeric metric of
  metrics.json (headline first), status, duration_s, error. Parameter values come from the run's resolved config
  (`.hydra/config.yaml`, group choices from `.hydra/hydra.yaml`), so a run that kept the default groupsize shows
  128, not an empty cell; a run without them falls back to its command-line overrides.
- `summary.md`: the same rows as a Markdown table, with at most MD_METRICS metric columns; overrides equal in every
  run are stated once above it.
- `summary.png`: each task's headline metric (runner/stages.py; `--metric KEY` plots another) against each
  parameter that varies, one line per combination of the other varying parameters, titled with the task and the
  model; a dashed line at the float model's value where the runs measured one (`<metric>_float`, e.g.
  quantize/ppl_float); when the runs differ in size (`<task>/model_bytes`), one more panel of the metric against
  model size. Failed runs are left out of the plot. With nothing varying, one bar per run.
Rows are sorted by their task's headline metric, best first; runs without it (failed, still running) come last.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from itertools import groupby
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from runner.stages import STAGES, baseline, headline

FILES = ("summary.csv", "summary.md", "summary.png")
# summary.md stays readable with many metrics (lm-eval tasks); summary.csv has them all.
MD_METRICS = 8


# --- collecting runs ---------------------------------------------------------------------------------------------
def find_runs(paths: list[Path]) -> list[Path]:
    """The run directories at or below each path, in path order, job numbers in numeric order."""
    runs: list[Path] = []
    for p in (Path(p).resolve() for p in paths):
        if _is_run(p):
            found = [p]
        else:
            marks = [f.parent for f in p.rglob("status.json")] + [f.parent for f in p.rglob(".hydra")]
            found = sorted({d for d in marks if _is_run(d)}, key=_natural_key)
        runs += [d for d in found if d not in runs]
    return runs


def _is_run(d: Path) -> bool:
    return (d / "status.json").is_file() or (d / ".hydra" / "overrides.yaml").is_file()


def _natural_key(p: Path) -> list:
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in p.parts]


def load_run(d: Path) -> dict:
    """status.json, metrics.json and the overrides of one run directory as a flat dict (the row before formatting)."""
    status_file, metrics_file = d / "status.json", d / "metrics.json"
    if status_file.is_file():
        status = json.loads(status_file.read_text())
    else:
        # Hydra wrote the job's config, but the stage never started (it failed while composing or dispatching).
        status = {
            "status": "unknown",
            "task": None,
            "error": "no status.json: the job stopped before its stage started (see its run.log)",
            "duration_s": None,
            "overrides": None,
        }
    overrides_file = d / ".hydra" / "overrides.yaml"
    overrides = status["overrides"] if status["overrides"] is not None else yaml.safe_load(overrides_file.read_text())
    task = status["task"]
    if task is None and (d / ".hydra" / "config.yaml").is_file():
        task = yaml.safe_load((d / ".hydra" / "config.yaml").read_text())["task"]["name"]
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return {
        "dir": d,
        "task": task,
        # The task override is the task column already.
        "overrides": {k: v for k, v in map(_split_override, overrides) if k != "task"},
        "params": _resolved_params(d),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)},
        "status": status["status"],
        "duration_s": status["duration_s"],
        "error": status["error"],
    }


def _split_override(override: str) -> tuple[str, str]:
    # "+key=v" / "++key=v" add or force a key, "~key" deletes one; the column is the key either way.
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _resolved_params(d: Path) -> dict[str, str] | None:
    """Every leaf of the run's resolved config as dotted key -> text, plus its group choices (`quantizer: gptq`);
    None when the run has no .hydra/config.yaml."""
    cfg_file, hydra_file = d / ".hydra" / "config.yaml", d / ".hydra" / "hydra.yaml"
    if not cfg_file.is_file():
        return None
    cfg = OmegaConf.load(cfg_file)
    params = {}
    if hydra_file.is_file():
        choices = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("runtime", {}).get("choices", {})
        # User groups only: not hydra/*, not package-placed ones (debug_task@task), not the task column.
        params = {
            k: _text(v) for k, v in choices.items() if "/" not in k and "@" not in k and k not in ("hydra", "task")
        }
    for key, raw in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        # An interpolation that cannot be resolved here (an env var of the machine that ran it) stays as written.
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        params[key] = _text(raw if value is None else value)
    return params


def _leaves(tree, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf; a list is one leaf."""
    if isinstance(tree, dict) and tree:
        return [leaf for key, sub in tree.items() for leaf in _leaves(sub, f"{prefix}{key}.")]
    return [(prefix[:-1], tree)]


def _text(v) -> str:
    """A config value as it would be typed on the command line: 128, 0.01, true, null, [a, b]."""
    if OmegaConf.is_config(v):  # a list leaf, or an empty dict
        v = OmegaConf.to_container(v, resolve=True)
    if isinstance(v, str):
        return v
    return json.dumps(v) if isinstance(v, list | dict | bool) or v is None else str(v)


def param(run: dict, key: str) -> str | None:
    """A run's value of a parameter column: its resolved config's, else its override's, else None."""
    if run["params"] is not None and key in run["params"]:
        return run["params"][key]
    return run["overrides"].get(key)


# --- the table ---------------------------------------------------------------------------------------------------
def headline_value(run: dict) -> float | None:
    v = run["metrics"].get(headline(run["task"]))
    return None if v is None or math.isnan(v) else v


def sort_runs(runs: list[dict]) -> list[dict]:
    """Grouped by task (in order of first appearance), best headline first, runs without one last."""
    order = {t: i for i, t in enumerate(dict.fromkeys(r["task"] for r in runs))}

    def key(r):
        v = headline_value(r)
        sign = -1 if r["task"] in STAGES and STAGES[r["task"]].maximize else 1
        return order[r["task"]], v is None, 0.0 if v is None else sign * v

    return sorted(runs, key=key)


def varying(runs: list[dict]) -> list[str]:
    """Parameters whose value is not the same in every run (a key missing from a run counts as a value)."""
    return [k for k in _param_columns(runs) if len({param(r, k) for r in runs}) > 1]


def table(runs: list[dict], root: Path) -> tuple[list[str], list[dict]]:
    """(columns, rows) of summary.csv; each row maps column -> value (None for an empty cell)."""
    params = _param_columns(runs)
    columns = ["run", "task", *params, *_metric_columns(runs), "status", "duration_s", "error"]
    rows = []
    for r in runs:
        row = {"run": _relative(r["dir"], root), "task": r["task"], **{k: param(r, k) for k in params}, **r["metrics"]}
        row.update(status=r["status"], duration_s=r["duration_s"], error=r["error"])
        rows.append({c: row.get(c) for c in columns})
    return columns, rows


def _override_columns(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in runs for k in r["overrides"]))


def _param_columns(runs: list[dict]) -> list[str]:
    """The overrides' keys, then every other config key whose resolved value differs between the runs."""
    overrides = _override_columns(runs)
    keys = dict.fromkeys(k for r in runs if r["params"] is not None for k in r["params"] if k not in overrides)
    return overrides + [k for k in keys if len({param(r, k) for r in runs}) > 1]


def _metric_columns(runs: list[dict]) -> list[str]:
    headlines = list(dict.fromkeys(STAGES[r["task"]].headline for r in runs if r["task"] in STAGES))
    return headlines + [m for m in dict.fromkeys(k for r in runs for k in r["metrics"]) if m not in headlines]


def _relative(d: Path, root: Path) -> str:
    return str(d.relative_to(root)) if d != root and d.is_relative_to(root) else str(d)


def _common_root(dirs: list[Path]) -> Path:
    parts = [d.parts for d in dirs]
    n = 0
    while all(len(p) > n and p[n] == parts[0][n] for p in parts):
        n += 1
    return Path(*parts[0][:n])


def to_markdown(runs: list[dict], rows: list[dict]) -> str:
    """The table for reading: varying overrides, the first MD_METRICS metrics (headline first), status, error."""
    vary = varying(runs)
    constant = [k for k in _override_columns(runs) if k not in vary]
    metrics = [c for c in _metric_columns(runs) if any(row[c] is not None for row in rows)]
    shown = ["run", "task", *vary, *metrics[:MD_METRICS], "status", "duration_s"]
    shown += ["error"] if any(row["error"] is not None for row in rows) else []
    n_ok = sum(r["status"] == "ok" for r in runs)
    lines = [f"{len(runs)} runs, {n_ok} ok, {len(runs) - n_ok} not ok."]
    if len(metrics) > MD_METRICS:
        lines.append(f"{len(metrics) - MD_METRICS} more metric columns in summary.csv.")
    if constant:
        same = " ".join(f"`{k}={param(runs[0], k)}`" for k in constant)
        lines.append(f"Same in every run: {same}")
    lines += ["", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(row[c]) for c in shown) + " |")
    return "\n".join(lines) + "\n"


def _md_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, str) and "." in v:
        # Sampled override values (Optuna: percdamp=0.011205837185064167) read better short; the CSV keeps them.
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


# --- the plot ----------------------------------------------------------------------------------------------------
def _metric_value(run: dict, metric: str) -> float | None:
    v = run["metrics"].get(metric)
    return None if v is None or math.isnan(v) else v


def plot(runs: list[dict], root: Path, path: Path, metric: str | None = None) -> None:
    """summary.png: per task, `metric` (default: its headline) against each varying parameter (one panel each),
    the float baseline as a dashed line, and metric against model size when the runs differ in size."""
    # Figure without pyplot: rendered by the Agg canvas, no GUI backend and no global figure state.
    from matplotlib.figure import Figure

    panels = []  # (task, its metric, its runs with that metric, the parameters varying among them, size key)
    for task in dict.fromkeys(r["task"] for r in runs):
        m = metric if metric is not None else headline(task)
        ok = [r for r in runs if r["task"] == task and m is not None and _metric_value(r, m) is not None]
        size = f"{task}/model_bytes"
        sized = len({r["metrics"].get(size) for r in ok}) > 1 and all(size in r["metrics"] for r in ok)
        if ok:
            panels.append((task, m, ok, varying(ok), size if sized else None))
    if not panels:
        fig = Figure(figsize=(5, 3.8))
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, f"no run has {metric or 'its headline metric'}", ha="center", va="center")
        ax.set_axis_off()
        fig.savefig(path, dpi=100)
        return
    ncols = max((len(vary) or 1) + (size is not None) for _, _, _, vary, size in panels)
    fig = Figure(figsize=(5 * ncols, 3.8 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), ncols, squeeze=False)
    for i, (task, m, ok, vary, size) in enumerate(panels):
        models = ", ".join(dict.fromkeys(str(param(r, "model.name") or param(r, "model")) for r in ok))
        axes[i][0].set_title(f"{task}: {m}  (model: {models})", loc="left", fontsize="medium")
        floats = [r["metrics"][baseline(m)] for r in ok if baseline(m) in r["metrics"]]
        base = sorted(floats)[len(floats) // 2] if floats else None  # the same float model in every run, normally
        used = [axes[i][0]] if not vary else []
        if not vary:
            ax = axes[i][0]
            ax.bar([_relative(r["dir"], root) for r in ok], [_metric_value(r, m) for r in ok])
            ax.set_ylabel(m)
            ax.tick_params(axis="x", labelrotation=30)
        for j, p in enumerate(vary):
            _line_panel(axes[i][j], ok, p, [k for k in vary if k != p], m)
            used.append(axes[i][j])
        if size is not None:
            ax = axes[i][len(used)]
            _size_panel(ax, ok, vary, m, size)
            used.append(ax)
        for ax in used:
            if base is not None:
                ax.axhline(base, linestyle="--", color="gray", label=f"float model: {base:.4g}")
                ax.legend(fontsize="x-small")
        for j in range(len(used), ncols):
            axes[i][j].set_axis_off()
    fig.savefig(path, dpi=100)


def _line_panel(ax, runs: list[dict], key: str, others: list[str], metric: str) -> None:
    values = sorted({param(r, key) for r in runs}, key=_value_key)
    x = {v: i for i, v in enumerate(values)}

    def combo(r):
        return tuple(_value_key(param(r, k)) for k in others)

    for _, group in groupby(sorted(runs, key=combo), key=combo):
        group = list(group)
        pts = sorted((x[param(r, key)], _metric_value(r, metric)) for r in group)
        label = ", ".join(f"{k}={param(group[0], k)}" for k in others) or None
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xticks(range(len(values)), [str(v) for v in values])
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    if others:
        ax.legend(fontsize="x-small")


def _size_panel(ax, runs: list[dict], vary: list[str], metric: str, size: str) -> None:
    """Quality against size: one point per run, labelled with its varying parameters."""
    for r in runs:
        x, y = r["metrics"][size] / 1e6, _metric_value(r, metric)
        ax.plot([x], [y], marker="o", linestyle="none", color="C0")
        ax.annotate(" ".join(f"{k.rsplit('.', 1)[-1]}={param(r, k)}" for k in vary), (x, y), fontsize="x-small")
    ax.set_xlabel(f"{size} (MB)")
    ax.set_ylabel(metric)


def _value_key(v: str | None) -> tuple:
    """Numbers in numeric order (32 < 64 < 128), before other strings in string order, before a missing value."""
    if v is None:
        return (2, 0.0, "")
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)


# --- entry points ------------------------------------------------------------------------------------------------
def summarize(paths: list[Path], out: Path, metric: str | None = None) -> list[dict]:
    """Write summary.csv, summary.md and summary.png (of `metric`, default each task's headline) into `out` for the
    runs at or below `paths`; return the runs (sorted as in the table). Raises FileNotFoundError when there is no
    run directory, ValueError when no run has `metric`."""
    dirs = find_runs(paths)
    if not dirs:
        raise FileNotFoundError(
            f"no run directory (status.json or .hydra/overrides.yaml) in {' '.join(map(str, paths))}"
        )
    runs = sort_runs([load_run(d) for d in dirs])
    if metric is not None and not any(metric in r["metrics"] for r in runs):
        known = sorted({k for r in runs for k in r["metrics"]})
        raise ValueError(f"--metric {metric}: no run has it; the runs have: {' '.join(known)}")
    root = _common_root(dirs) if len(dirs) > 1 else dirs[0].parent
    columns, rows = table(runs, root)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    (out / "summary.md").write_text(to_markdown(runs, rows))
    plot(runs, root, out / "summary.png", metric)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.compare", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--out", type=Path, help="where to write summary.{csv,md,png} (default: the one DIR given)")
    parser.add_argument("--metric", help="the metric summary.png plots (default: each task's headline metric)")
    args = parser.parse_args(argv)
    if args.out is None and len(args.dirs) > 1:
        parser.error("several directories: pass --out DIR for the summary files")
    out = args.out if args.out is not None else args.dirs[0]
    try:
        summarize(args.dirs, out, args.metric)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print((out / "summary.md").read_text(), end="")
    print(f"wrote {', '.join(str(out / f) for f in FILES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
