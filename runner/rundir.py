"""A stage's run: its directory, the `RunContext` a stage runs with, and `run_stage`, the wrapper around it.

`run_stage(cfg, stage_run)` (called by runner/__main__.py) runs `stage_run(cfg, ctx)` in the run directory and
alone writes what every run leaves there:
- status.json, before the stage ("running") and after it ("ok" or "failed", with the error and duration);
- metrics.json, the dict the stage returns (its final metrics), also sent to the logger as the run's summary;
- metrics.jsonl, the step stream: one row per `ctx.log_metrics(metrics, step)` call (finetune's steps). A stage
  that logs no step (quantize, eval, generate) gets its final metrics as its one row, step 0;
- traceback.txt when the stage fails;
- .lock while the run is in it (pid and host): a second run in the same directory stops with one line naming the
  holder; a lock left by a dead process on this host is taken over.
SIGINT, SIGTERM and SIGHUP end the stage like Ctrl-C: status "failed" with "interrupted by SIGINT" or
"terminated by SIGTERM", a traceback.txt, exit code 128 + the signal number. A failure to write the record itself
(disk full) still ends with one line on screen.
On success it prints the run's closing block: status, headline metric(s) (with the float model's value where the
stage measured one), run directory, the files the stage recorded with `ctx.add_artifact`, and the next command.
Under torchrun only rank 0 writes the run's files.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
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

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """A stage stopped by a signal (SIGINT, SIGTERM, SIGHUP); the message says which, then `detail`."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum = signum
        name = signal.Signals(signum).name
        what = f"interrupted by {name}" if signum == signal.SIGINT else f"terminated by {name}"
        super().__init__(f"{what}; {detail}" if detail else what)


class RunDirBusy(RuntimeError):
    """Another live run holds the run directory's lock."""


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


def _reason(e: BaseException) -> str:
    """The one-line reason status.json and the screen give for `e`."""
    if isinstance(e, ConfigError | Interrupted):
        return str(e)
    if isinstance(e, KeyboardInterrupt):  # raised by Python's own SIGINT handler (no handler of ours installed)
        return f"interrupted by SIGINT{'; ' + str(e) if str(e) else ''}"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = e.filename or "the run directory"
        return f"disk full: {e}; free space under {where} and run again (finetune: task.resume=true)"
    return f"{type(e).__name__}: {e}"


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextmanager
def _signals_stop_the_stage():
    """SIGTERM (timeout, SLURM, docker stop) and SIGHUP (a closed terminal) end the stage as SIGINT does, so the
    run is recorded instead of killed without a word. Only the main thread may install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, _raise_interrupted) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def check_lock(out: Path) -> None:
    """RunDirBusy naming the holder when a live run holds `out/.lock` (a lock of a process of this host that no
    longer runs, or an unreadable one, does not count). Hydra's WritableOutput callback calls it before Hydra writes
    `.hydra/`, so a second run does not overwrite the first one's config either."""
    lock = out / ".lock"
    try:
        holder = json.loads(lock.read_text())
        pid, host = int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, KeyError, TypeError):  # none, or unreadable (a crash mid-write)
        return
    if host != socket.gethostname() or (pid > 0 and _pid_alive(pid)):
        raise RunDirBusy(
            f"run directory {out} is in use by pid {pid} on {host} (since {holder.get('start')}, lock file {lock}); "
            "wait for that run, pick another hydra.run.dir, or delete the lock if that run is dead"
        )


def acquire_lock(out: Path) -> Path:
    """Take `out/.lock` (pid, host, start) for this process; RunDirBusy naming the holder when a live run has it.
    A lock from a process of this host that no longer runs is taken over."""
    lock = out / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": dt.datetime.now().isoformat()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            check_lock(out)
            log.warning("taking over %s from a run that no longer runs", lock)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise RunDirBusy(f"run directory {out}: could not take the lock {lock}; another run is starting there")


def _release_lock(lock: Path) -> None:
    try:
        if json.loads(lock.read_text())["pid"] == os.getpid():
            lock.unlink()
    except (OSError, ValueError, KeyError):
        pass  # gone already or not ours: nothing to release


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
    anything else also leaves its traceback in traceback.txt; a signal exits with 128 + its number.
    HYDRA_FULL_ERROR=1 re-raises instead. In a multirun a failed job returns {} after that line, so the other jobs
    still run. A run directory held by another live run is left untouched: one line, exit code 1.
    """
    hc = HydraConfig.get()
    out = run_dir()
    multirun = hc.mode == RunMode.MULTIRUN
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 writes the run's files
    lock = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            lock = acquire_lock(out)
    except (OSError, RunDirBusy) as e:
        reason = str(e) if isinstance(e, RunDirBusy) else f"cannot write the run directory {out} ({e.strerror})"
        print(f"error: {reason}", file=sys.stderr)
        if multirun:
            return {}
        sys.exit(1)
    start = time.time()
    status = _initial_status(cfg.task.name, list(hc.overrides.task), start)
    failed = True
    error = None
    logger = NoOpLogger()
    try:
        with _signals_stop_the_stage():
            if rank == 0:
                _write_json(out / "status.json", status)
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
        status["error"] = _reason(e)
        name = "traceback.txt" if rank == 0 else f"traceback.rank{rank}.txt"
        _record(out / name, lambda p: write_text_atomic(p, traceback.format_exc()), status)
    finally:
        end = time.time()
        status.update(
            status="failed" if failed else "ok",
            end_time=dt.datetime.fromtimestamp(end).isoformat(),
            duration_s=round(end - start, 3),
        )
        if rank == 0:
            _record(out / "status.json", lambda p: _write_json(p, status), status)
        try:
            logger.finish(failed=failed)
        except Exception as e:  # noqa: BLE001 - the logger must not hide the run's own outcome
            log.warning("logger.finish failed: %s", e)
        if lock is not None:
            _release_lock(lock)
    return _report_failure(error, status, out, multirun)


def _initial_status(task: str, overrides: list[str], start: float) -> dict:
    """status.json as the run starts ("running"); run_stage fills in the outcome."""
    return {
        "status": "running",
        "task": task,
        "error": None,
        "start_time": dt.datetime.fromtimestamp(start).isoformat(),
        "end_time": None,
        "duration_s": None,
        "overrides": overrides,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }


def _report_failure(error: BaseException, status: dict, out: Path, multirun: bool) -> dict:
    """The failed run's one line on screen, then its exit code; in a multirun, {} so the sweep goes on."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    unrecorded = f"; could not record it in {status['unrecorded']}" if "unrecorded" in status else ""
    print(f"error: {status['error']} (run directory: {out}){unrecorded}", file=sys.stderr)
    if multirun and not isinstance(error, KeyboardInterrupt):
        # The sweep goes on: a raised error would make Hydra's BasicSweeper stop after this batch and skip the
        # end-of-sweep callback (runner/callbacks.py), which lists this failure from status.json and exits 1.
        return {}
    sys.exit(
        128 + error.signum if isinstance(error, Interrupted) else 130 if isinstance(error, KeyboardInterrupt) else 1
    )


def _record(path: Path, write, status: dict) -> None:
    """Write one of the run's records; when that fails too (disk full), note it for the one line on screen."""
    try:
        write(path)
    except OSError as e:
        prev = status.get("unrecorded")
        status["unrecorded"] = f"{prev}, {path.name} ({e.strerror})" if prev else f"{path.name} ({e.strerror})"
