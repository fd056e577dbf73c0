"""Metric loggers: `NoOpLogger` (logger=none) and `WandbLogger` (logger=wandb), one interface.

Stage code never branches on which is active: it calls `runner.common.log_metrics`, which writes
`metrics.jsonl` and forwards to the logger built here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class NoOpLogger:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class WandbLogger:
    """One W&B run per job. Offline unless an API key is configured: it never waits on a network."""

    def __init__(self, cfg: DictConfig, run_dir: Path, group: str | None, job_name: str):
        import wandb

        lc = cfg.logger
        mode = lc.mode
        if mode is None:
            mode = "online" if (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()) else "offline"
        self.mode = mode
        self.run = wandb.init(
            project=lc.project,
            entity=lc.entity,
            group=lc.group or group,
            job_type=cfg.task.name,
            name=job_name,
            dir=str(run_dir),
            mode=mode,
            tags=list(lc.tags),
            config=OmegaConf.to_container(cfg, resolve=True),
            settings=wandb.Settings(init_timeout=30, silent=True),
        )
        if mode == "offline":
            log.info("wandb is offline; upload later with: wandb sync %s", Path(self.run.dir).parent)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def build_logger(cfg: DictConfig, run_dir: Path, group: str | None, job_name: str):
    if cfg.logger.name == "wandb":
        return WandbLogger(cfg, run_dir, group, job_name)
    return NoOpLogger()
