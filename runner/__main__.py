"""python -m runner task=<finetune|quantize|eval|generate> [group=option ...] [key=value ...]

Composes conf/config.yaml, runs one stage in its own run directory and records the outcome there
(status.json, metrics.json, metrics.jsonl, run.log). See README.md for each stage.
"""

import importlib
import sys

import hydra
from omegaconf import DictConfig

from runner.common import ConfigError
from runner.rundir import run_stage
from runner.stages import STAGES


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    name = cfg.task.name
    if name not in STAGES:
        raise ConfigError(f"task.name={name!r} is not a stage; valid: {', '.join(STAGES)}")
    stage = importlib.import_module(STAGES[name].module)
    metrics = run_stage(cfg, stage.run)
    # Hydra sweepers (Optuna) optimise the value returned here: the stage's headline metric.
    return metrics.get(STAGES[name].headline)


if __name__ == "__main__":
    sys.exit(main())
