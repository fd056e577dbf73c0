"""Hydra callbacks (registered in conf/hydra/default.yaml): the sweep summary at the end of every multirun, and
the check that the output directory can be made before Hydra writes into it.

    python -m runner -m task=quantize quantizer=gptq quantizer.groupsize=32,64,128 quantizer.percdamp=0.01,0.1

`SweepSummary.on_multirun_end` writes `summary.csv`, `summary.md` and `summary.png` into the sweep directory
(see runner/compare.py), logs them to the sweep's W&B group with logger=wandb, prints the table, prints how to upload offline W&B runs, and ends the process with exit
code 1 when any job did not finish ok.

Why this works when jobs fail: `runner.rundir.run_stage` records a failed job in its status.json and returns
instead of raising, so every launcher runs the remaining jobs and Hydra reaches `on_multirun_end`. (A job that
raises would make Hydra's BasicSweeper re-raise after the batch, and the callback would never run.) With
HYDRA_FULL_ERROR=1 a failure is raised with its traceback and the sweep stops there, without a summary;
`python -m runner.compare SWEEP_DIR` builds it afterwards, as it does after an interrupted sweep.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from runner import compare
from runner.logging import log_sweep_summary

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        try:
            runs = compare.summarize([sweep], sweep)
        except FileNotFoundError as e:
            log.error("no sweep summary: %s", e)
            raise SystemExit(1) from None
        log.info("sweep summary (%s):\n%s", sweep / "summary.md", (sweep / "summary.md").read_text())
        if config.logger.name == "wandb":
            log_sweep_summary(config, sweep, [sweep / f for f in compare.FILES if (sweep / f).is_file()])
        offline = {_sync_pattern(p, sweep) for p in sweep.rglob("offline-run-*") if p.parent.name == "wandb"}
        if offline:
            log.info("upload the offline W&B runs with: wandb sync %s", " ".join(sorted(offline)))
        bad = [r for r in runs if r["status"] != "ok"]
        if bad:
            log.error("%d of %d jobs did not finish ok; see %s", len(bad), len(runs), sweep / "summary.md")
            # Callbacks' exceptions are turned into warnings by Hydra; SystemExit is not an Exception and ends the
            # process with a failing exit code, after the summary is written.
            raise SystemExit(1)


class WritableOutput(Callback):
    """Make the run (or sweep) directory before Hydra does, so an output root that cannot be written (a file, a
    read-only or missing mount) ends with one line naming the path instead of Hydra's chained tracebacks; and stop
    a run whose directory another live run holds before Hydra overwrites that run's `.hydra/`."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from runner.rundir import RunDirBusy, check_lock  # imports torch: only when a run starts

        _make(config.hydra.run.dir)
        if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 holds the lock of the directory all ranks share
            return
        try:
            check_lock(Path(config.hydra.run.dir))
        except RunDirBusy as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _make(config.hydra.sweep.dir)


def _make(directory: str) -> None:
    # The same config object Hydra then uses: ${now:...} is cached in it, so this is the directory it will use.
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(
            f"error: cannot create the output directory {directory} ({e.strerror}: {e.filename}); set "
            "paths.output_root (or hydra.run.dir) to a writable directory",
            file=sys.stderr,
        )
        raise SystemExit(1) from None  # not an Exception: Hydra would turn one into a warning and go on


def _sync_pattern(offline_run: Path, sweep: Path) -> str:
    # <sweep>/<job subdir...>/wandb/offline-run-<stamp>-<id> -> <sweep>/*/wandb/offline-run-* (one glob per depth).
    depth = len(offline_run.relative_to(sweep).parts) - 2
    return str(sweep.joinpath(*["*"] * depth, "wandb", "offline-run-*"))
