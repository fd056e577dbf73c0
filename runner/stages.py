"""The stages of `python -m runner`, in one literal table: task name -> module, headline metric, direction.

`task=<name>` (conf/task/<name>.yaml, whose `name` is the key here) runs `<module>.run`. The headline metric is
the one a stage is judged by: `python -m runner` returns it to Hydra sweepers, and runner/compare.py sorts and
plots by it (descending when `maximize`). A leaf module without torch, so the sweep callback and runner.compare
read it without importing the model stack.

A new stage: a module with `run`, a conf/task/<name>.yaml and conf/debug_task/smoke_<name>.yaml, and a row here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    module: str  # whose run(cfg, ctx) -> dict[str, float] is the stage (ctx: runner.rundir.RunContext)
    headline: str  # metric key in metrics.json
    maximize: bool = False  # larger headline is better (else smaller: perplexity, loss)
    shown: tuple[str, ...] = ()  # also printed in the run's closing block, after the headline


STAGES = {
    "generate": Stage(
        "runner.generate",
        "generate/decode_tokens_per_s",
        maximize=True,
        shown=("generate/prefill_tokens_per_s", "generate/time_to_first_token_s", "generate/new_tokens"),
    ),
    "quantize": Stage("runner.quantize", "quantize/ppl", shown=("quantize/model_bytes", "quantize/compression")),
    "eval": Stage("runner.eval", "eval/wikitext2_ppl/ppl"),
    "finetune": Stage("runner.finetune", "finetune/val_loss", shown=("finetune/final_loss", "finetune/tokens_per_s")),
    "export": Stage("runner.export", "export/bytes", shown=("export/max_logit_diff", "export/ppl")),
}


def baseline(key: str) -> str:
    """The metric holding `key`'s float-model value, when a stage measures one (quantize/ppl -> quantize/ppl_float)."""
    return f"{key}_float"


def headline(task: str | None) -> str | None:
    """The headline metric of `task`; None when it is not a stage (a run that stopped before its stage started)."""
    return STAGES[task].headline if task in STAGES else None
