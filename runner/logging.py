"""Metric loggers: `NoOpLogger` (logger=none) and `WandbLogger` (logger=wandb), one interface.

Stage code never branches on which is active: it calls `ctx.log_metrics` (runner/rundir.py), which writes
`metrics.jsonl` and forwards to the logger built here; `runner.rundir.run_stage` sends the final metrics as the
summary and finishes the run in `finally`, so a failed job still closes its W&B run (with exit code 1). The W&B
summary equals metrics.json (each step row is committed when logged, so none lands after the summary); the stage's
headline metric (runner/stages.py) gets `define_metric` with its direction (min or max); the files a stage records
with `ctx.add_artifact` become artifacts (a model directory by file:// reference); a sweep's summary.csv/md/png are
logged as one more run of the sweep's group (job_type sweep_summary).

    python -m runner task=quantize logger=wandb                    # offline unless an API key is configured
    python -m runner -m task=quantize quantizer=int4_wo,int8_wo logger=wandb logger.project=quant
    wandb sync outputs/multirun/<stamp>/*/wandb/offline-run-*      # upload offline runs later

Knobs (conf/logger/wandb.yaml): `project`, `entity`, `group` (null: the sweep directory's name in a multirun),
`mode` (null: online when an API key is configured and the server answers, else offline; $WANDB_MODE sets it too),
`tags`, `init_timeout` (seconds wandb.init may wait on the server in online mode).

W&B never fails a stage: when the online init fails for any reason (a server that accepts the connection but does
not answer gives up after `init_timeout`), the run is logged offline instead, with one warning; when even that
fails, the stage runs without a logger (metrics.json and metrics.jsonl are written either way).
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from runner.stages import STAGES

log = logging.getLogger(__name__)

# An unreachable server is usually an unresolvable name or a refused connection, both immediate; a few seconds
# covers a slow handshake without stalling a job on a network that is not there.
_PROBE_TIMEOUT_S = 3.0


class NoOpLogger:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def artifacts(self, items: list[tuple[str, Path]]) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class WandbLogger:
    """One W&B run per job (rank 0 under torchrun): grouped by sweep, job_type = task, the resolved config as config."""

    def __init__(self, cfg: DictConfig, run_dir: Path, group: str | None, job_name: str):
        import wandb

        lc = cfg.logger
        self.mode = lc.mode if lc.mode is not None else _auto_mode(wandb.setup().settings)
        init = dict(
            project=lc.project,
            entity=lc.entity,
            group=lc.group if lc.group is not None else group,
            job_type=cfg.task.name,
            name=job_name,
            dir=str(run_dir),
            tags=list(lc.tags),
            config=OmegaConf.to_container(cfg, resolve=True),
            # silent: wandb's own banner lines would interleave with the stage's output in every job of a sweep.
            # init_timeout bounds how long the online init waits on a server that does not answer.
            settings=wandb.Settings(init_timeout=lc.init_timeout, silent=True),
        )
        try:
            self.run = wandb.init(mode=self.mode, **init)
        except Exception as e:  # noqa: BLE001 - any failure to reach the server (CommError, timeouts, auth)
            if self.mode in ("offline", "disabled"):
                raise
            log.warning("wandb: online init failed (%s); logging offline instead", str(e).splitlines()[0])
            self.mode = "offline"
            self.run = wandb.init(mode=self.mode, **init)
        stage = STAGES.get(cfg.task.name)
        if stage is not None:  # the headline's direction, so the UI knows its best (wandb has no other `goal`)
            self.run.define_metric(stage.headline, summary="max" if stage.maximize else "min")

    def log(self, metrics: dict, step: int) -> None:
        # commit: each call is one whole step. Uncommitted, the last step's row stayed pending until finish() and
        # then overwrote the final summary (finetune/tokens_per_s of the last step instead of the run's average).
        self.run.log(metrics, step=step, commit=True)

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def artifacts(self, items: list[tuple[str, Path]]) -> None:
        """One artifact per file or directory the stage recorded (ctx.add_artifact), typed by its kind. Files are
        uploaded; a directory (a model: up to many GB) is logged as a file:// reference, checksummed, not copied."""
        import wandb

        for kind, path in items:
            art = wandb.Artifact(f"{self.run.id}-{path.name}", type=kind)
            if path.is_dir():
                art.add_reference(path.resolve().as_uri(), name=path.name)
            else:
                art.add_file(str(path))
            self.run.log_artifact(art)

    def finish(self, failed: bool = False) -> None:
        # The offline folder is complete only after finish(); the sync hint comes after it.
        offline_dir = Path(self.run.dir).parent if self.mode == "offline" else None
        self.run.finish(exit_code=1 if failed else 0)
        if offline_dir is not None:
            log.info("wandb run saved offline; upload it with: wandb sync %s", offline_dir)


def _auto_mode(settings) -> str:
    """online when an API key is configured and the server accepts a TCP connection, else offline."""
    host = urlparse(settings.base_url).hostname
    if not (settings.api_key or _netrc_has(host)):
        return "offline"
    port = urlparse(settings.base_url).port or 443
    try:
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as e:
        log.warning("wandb: %s:%s is unreachable (%s); logging offline instead", host, port, e)
        return "offline"
    return "online"


def _netrc_has(host: str) -> bool:
    # Where `wandb login` stores the key: $NETRC, else ~/.netrc.
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    if not path.is_file():
        return False
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except netrc.NetrcParseError as e:
        log.warning("wandb: cannot parse %s (%s); treating it as holding no API key", path, e)
        return False


def log_sweep_summary(cfg: DictConfig, sweep: Path, files: list[Path]) -> None:
    """The sweep's summary (runner/callbacks.py) as one more run of the sweep's group, job_type `sweep_summary`:
    `files` (summary.csv/md/png) as one artifact, summary.png also as an image."""
    import wandb

    lc = cfg.logger
    run = wandb.init(
        project=lc.project,
        entity=lc.entity,
        group=lc.group if lc.group is not None else sweep.name,
        job_type="sweep_summary",
        name=f"summary-{sweep.name}",
        dir=str(sweep),
        mode=lc.mode if lc.mode is not None else _auto_mode(wandb.setup().settings),
        tags=list(lc.tags),
        settings=wandb.Settings(init_timeout=lc.init_timeout, silent=True),
    )
    try:
        art = wandb.Artifact(f"sweep-summary-{sweep.name}", type="sweep_summary")
        for f in files:
            art.add_file(str(f))
            if f.suffix == ".png":
                run.log({"sweep/summary": wandb.Image(str(f))})
        run.log_artifact(art)
    finally:
        run.finish()


def build_logger(cfg: DictConfig, run_dir: Path, group: str | None, job_name: str):
    # Under torchrun every rank runs the job; only rank 0 (RANK, set by torchrun) owns its one W&B run.
    if cfg.logger.name == "wandb" and os.environ.get("RANK", "0") == "0":
        try:
            return WandbLogger(cfg, run_dir, group, job_name)
        except Exception as e:  # noqa: BLE001 - W&B never fails the stage (module docstring)
            log.warning("wandb: could not start a run (%s); continuing without a logger", str(e).splitlines()[0])
    return NoOpLogger()
