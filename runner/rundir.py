"""A stage's run: its directory, the `RunContext` a stage runs with, and `run_stage`, the wrapper around it.

`run_stage(cfg, stage_run)` (called by runner/__main__.py) runs `stage_run(cfg, ctx)` in the run directory and
alone writes what every run leaves there:
- status.json, before the stage ("running") and after it ("ok" or "failed", with the error and duration);
- metrics.json, the dict the stage returns (its final metrics), also sent to the logger as the run's summary;
- metrics.jsonl, the step stream: one row per `ctx.log_metrics(metrics, step)` call (finetune's steps). A stage
  that logs no step (quantize, eval, generate) gets its final metrics as its one row, step 0;
- traceback.txt when the stage fails.
On success it prints the run's closing block: status, headline metric(s) (with the float model's value where the
stage measured one), run directory, the files the stage recorded with `ctx.add_artifact`, and the next command.
Under torchrun only rank 0 writes the run's files.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from models.atomic import write_text_atomic
from runner.common import ConfigError, device
from runner.logging import NoOpLogger, WandbLogger, build_logger
from runner.stages import STAGES, baseline

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What a stage gets besides its config: where to write, its rank, its device, and where metrics go."""

    run_dir: Path
    rank: int  # under torchrun, RANK; else 0
    device: torch.device  # the `device` setting resolved (finetune picks cuda:LOCAL_RANK itself)
    logger: NoOpLogger | WandbLogger = field(default_factory=NoOpLogger)
    steps_logged: int = 0
    artifacts: list[tuple[str, Path]] = field(default_factory=list)  # (kind, path) from add_artifact

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Append one step of metrics to metrics.jsonl and forward it to the logger (wandb or none)."""
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.logger.log(metrics, step)
        self.steps_logged += 1
        log.debug("step %d: %s", step, ", ".join(f"{k} {format_value(v)}" for k, v in metrics.items()))

    def add_artifact(self, kind: str, path: Path) -> None:
        """Record a file or directory the stage wrote: kind `model` (a native checkpoint directory), `adapter`,
        `results` or `samples`. The closing block lists it (a model gets its next commands); W&B logs it."""
        self.artifacts.append((kind, Path(path)))


def run_dir() -> Path:
    """The run directory Hydra made for this job."""
    return Path(HydraConfig.get().runtime.output_dir)


def context(cfg: DictConfig, logger: NoOpLogger | WandbLogger | None = None) -> RunContext:
    """The context of the current Hydra job (tests call a stage's run with it directly)."""
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun
    return RunContext(run_dir(), rank, device(cfg), NoOpLogger() if logger is None else logger)


def _write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("lmrunner", "torch", "torchao", "lm_eval", "hydra-core", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def format_value(v: float) -> str:
    """A metric for people: integers with thousands separators, other values to 4 significant digits."""
    if float(v).is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    if 1e4 <= abs(v) < 1e15:  # 12,345 rather than 1.234e+04
        return f"{v:,.0f}"
    return f"{v:.4g}"


def _print_closing(task: str, metrics: dict, out: Path, artifacts: list[tuple[str, Path]], seconds: float) -> None:
    """The block a successful run ends with, on the console (stdout) and in run.log (DEBUG)."""
    stage = STAGES[task]
    keys = [k for k in (stage.headline, *stage.shown) if k in metrics]
    if stage.headline not in metrics:  # e.g. eval without wikitext2_ppl: every metric the run has
        keys = [k for k in metrics if k not in keys] + keys
    width = max([len(k) for k in keys] + [len("run directory")])
    lines = [f"== {task}: ok in {seconds:.1f} s =="]
    for k in keys:
        line = f"  {k:<{width}}  {format_value(metrics[k])}"
        if baseline(k) in metrics:
            line += f"  (float model: {format_value(metrics[baseline(k)])})"
        lines.append(line)
    lines.append(f"  {'run directory':<{width}}  {out}")
    for kind, path in artifacts:
        lines.append(f"  {kind:<{width}}  {path}")
    models = [path for kind, path in artifacts if kind == "model"]
    if models:
        lines.append("  next:")
        for next_task in ("generate", "eval"):
            lines.append(f"    lmrunner task={next_task} checkpointer=native checkpointer.path={models[0]}")
    text = "\n".join(lines)
    print(text, flush=True)
    log.debug("closing block:\n%s", text)


def run_stage(cfg: DictConfig, stage_run) -> dict:
    """Run one stage, `stage_run(cfg, ctx) -> metrics`, inside its run directory (see the module docstring).

    Bad input (ConfigError, missing files, values out of range) ends with one line on stderr and exit code 1;
    anything else also leaves its traceback in traceback.txt. HYDRA_FULL_ERROR=1 re-raises instead.
    In a multirun a failed job returns {} after that line, so the other jobs still run.
    """
    hc = HydraConfig.get()
    out = run_dir()
    out.mkdir(parents=True, exist_ok=True)
    multirun = hc.mode == RunMode.MULTIRUN
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 writes the run's files
    start = time.time()
    status = {
        "status": "running",
        "task": cfg.task.name,
        "error": None,
        "start_time": dt.datetime.fromtimestamp(start).isoformat(),
        "end_time": None,
        "duration_s": None,
        "overrides": list(hc.overrides.task),
        "versions": _versions(),
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }
    if rank == 0:
        _write_json(out / "status.json", status)
    failed = True
    error = None
    logger = NoOpLogger()
    try:
        torch.manual_seed(cfg.seed)
        group = Path(hc.sweep.dir).name if multirun else None
        logger = build_logger(cfg, out, group, f"{cfg.task.name}-{out.name}")
        ctx = context(cfg, logger)
        metrics = stage_run(cfg, ctx)
        if rank == 0:
            if ctx.steps_logged == 0:
                ctx.log_metrics(metrics, step=0)
            _write_json(out / "metrics.json", metrics)
        logger.summary(metrics)
        logger.artifacts(ctx.artifacts)
        failed = False
        if rank == 0:
            _print_closing(cfg.task.name, metrics, out, ctx.artifacts, time.time() - start)
        return metrics
    except (KeyboardInterrupt, Exception) as e:  # noqa: B902 - record every failure, then report it below
        error = e
        status["error"] = f"{type(e).__name__}: {e}" if not isinstance(e, ConfigError) else str(e)
        (out / ("traceback.txt" if rank == 0 else f"traceback.rank{rank}.txt")).write_text(traceback.format_exc())
    finally:
        end = time.time()
        status.update(
            status="failed" if failed else "ok",
            end_time=dt.datetime.fromtimestamp(end).isoformat(),
            duration_s=round(end - start, 3),
        )
        if rank == 0:
            _write_json(out / "status.json", status)
        logger.finish(failed=failed)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"error: {status['error']} (run directory: {out})", file=sys.stderr)
    if multirun and not isinstance(error, KeyboardInterrupt):
        # The sweep goes on: a raised error would make Hydra's BasicSweeper stop after this batch and skip the
        # end-of-sweep callback (runner/callbacks.py), which lists this failure from status.json and exits 1.
        return {}
    sys.exit(130 if isinstance(error, KeyboardInterrupt) else 1)
