"""python -m runner task=<finetune|quantize|eval|generate> [group=option ...] [key=value ...]

Composes conf/config.yaml, runs one stage in its own run directory and records the outcome there
(status.json, metrics.json, metrics.jsonl, run.log). See README.md for each stage.
"""

import importlib
import sys

import hydra
from omegaconf import DictConfig

from runner import common

# The whole dispatch: task name -> module whose run(cfg) -> dict[str, float] is the stage.
STAGES = {
    "generate": "runner.generate",
    "quantize": "runner.quantize",
    "eval": "runner.eval",
    "finetune": "runner.finetune",
}


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    name = cfg.task.name
    if name not in STAGES:
        raise common.ConfigError(f"task.name={name!r} is not a stage; valid: {', '.join(STAGES)}")
    stage = importlib.import_module(STAGES[name])
    metrics = common.run_stage(cfg, stage.run)
    # Hydra sweepers (Optuna) minimise the value returned here: the stage's headline metric.
    headline = common.HEADLINE.get(name)
    return metrics.get(headline) if headline else None


if __name__ == "__main__":
    sys.exit(main())
