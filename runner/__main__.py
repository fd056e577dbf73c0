"""lmrunner task=<finetune|quantize|eval|generate|export> [group=option ...] [key=value ...]  (or python -m runner ...)

Composes conf/config.yaml, runs one stage in its own run directory and records the outcome there
(status.json, metrics.json, metrics.jsonl, run.log). `--help` prints the page in conf/hydra/help/lmrunner.yaml.
See README.md for each stage.
"""

import importlib
import importlib.resources
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from runner.common import ConfigError
from runner.rundir import run_stage
from runner.stages import STAGES

# The config groups the help page lists; the others (debug_task, debug_quantizer, lm_eval_tasks, paths, hydra) are internal.
_USER_GROUPS = ("task", "model", "quantizer", "checkpointer", "data", "logger", "experiment", "hparams_search", "debug")
# Groups whose choice also names the task, so a command line with one of them needs no task=.
_TASK_SETTERS = ("task", "experiment", "hparams_search")
# Hydra flags that need no composed config.
_NO_CONFIG_FLAGS = ("-sc", "--shell-completion", "--hydra-help", "--version")


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    name = cfg.task.name
    if name not in STAGES:
        raise ConfigError(f"task.name={name!r} is not a stage; valid: {', '.join(STAGES)}")
    stage = importlib.import_module(STAGES[name].module)
    metrics = run_stage(cfg, stage.run)
    # Hydra sweepers (Optuna) optimise the value returned here: the stage's headline metric.
    return metrics.get(STAGES[name].headline)


def _groups_help() -> str:
    """One line per user-facing group: its options, the current choice in brackets (the help page's resolver)."""
    choices = HydraConfig.get().runtime.choices
    conf = importlib.resources.files("conf")
    lines = []
    for group in _USER_GROUPS:
        options = sorted(
            p.name.removesuffix(".yaml") for p in conf.joinpath(group).iterdir() if p.name.endswith(".yaml")
        )
        chosen = choices.get(group) if group != "task" else None
        shown = [f"[{o}]" if o == chosen else o for o in options]
        lines.append(f"  {group + ':':<16}{' '.join(shown)}")
    return "\n".join(lines)


def _names_task(args: list[str]) -> bool:
    return any(a.split("=", 1)[0].lstrip("+~") in _TASK_SETTERS for a in args if "=" in a)


def cli() -> None:
    """The `lmrunner` console script (pyproject.toml) and `python -m runner`.

    Without a task, `--help` shows the page as for any task (the page does not depend on it), and a run stops with
    one line listing the stages rather than Hydra's multi-line "You must specify 'task'".
    """
    OmegaConf.register_new_resolver("lmrunner_groups", _groups_help, replace=True)
    args = sys.argv[1:]
    if not _names_task(args):
        if "--help" in args or "-h" in args:
            sys.argv.append(f"task={next(iter(STAGES))}")
        elif not any(a in _NO_CONFIG_FLAGS for a in args):
            stages = " | ".join(f"task={s}" for s in STAGES)
            print(f"error: no task given; choose one: {stages} (lmrunner --help for more)", file=sys.stderr)
            sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
