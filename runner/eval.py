"""Eval: score any checkpoint with EleutherAI's lm-eval harness, offline, plus the GPTQ papers' WikiText-2 perplexity.

    python -m runner task=eval task.tasks=[wikitext,hellaswag,arc_easy,piqa]
    python -m runner task=eval checkpointer=native checkpointer.path=DIR     # a quantize or finetune output
    python -m runner task=eval task.tasks=[hellaswag] task.limit=100 task.num_fewshot=10 task.log_samples=true
    python -m runner task=eval task.tasks=[wikitext2_ppl] quantizer=int8_wo  # round-to-nearest on the fly

The model is scored by runner/lm_eval_adapter.py (our model and tokenizer; no HF model, no hub, no network).

Tasks:
- Local lm-eval tasks, defined in conf/lm_eval_tasks/ over the files under paths.data_dir: wikitext, hellaswag,
  arc_easy, arc_challenge, piqa, lambada_openai, winogrande. Each YAML is lm-eval's own definition (prompt,
  preprocessing and metric functions are lm-eval's, referenced, not copied); only the loader is ours, as the local
  files are laid out differently from the HF datasets (conf/lm_eval_tasks/utils.py says how).
- Any other name goes to lm-eval's task registry, whose datasets are downloaded (network needed).
- wikitext2_ppl: the GPTQ papers' number: the test split joined with blank lines, tokenized once, cut into
  non-overlapping `ppl_seqlen`-token windows each scored from a cold start; exp(mean token NLL). It is
  runner.perplexity, the same code as the quantize stage's quality check. It is not lm-eval's `wikitext`,
  which scores each article separately with rolling windows of max_length tokens (every token gets as much context
  as fits), on detokenized text, and reports perplexity per word and per byte: figures that do not depend on the
  tokenizer, and a word perplexity well above the per-token one (about 2x for SmolLM2).

Files written in the run directory: `results.json` (lm-eval's results: metrics with stderr, task configs, versions,
n-shot, sample counts), `samples_<task>.jsonl` with task.log_samples=true (each document with its requests, the
model's responses and scores), and through the runner metrics.json. The results table is printed at the end.

Metrics: `eval/<task>/<metric>` and `eval/<task>/<metric>_stderr` as lm-eval names them (eval/hellaswag/acc_norm,
eval/wikitext/word_perplexity, eval/lambada_openai/perplexity; a metric under a filter other than lm-eval's
"none" gets `_<filter>` appended), `eval/wikitext2_ppl/ppl` and `eval/wikitext2_ppl/windows`.

Knobs (conf/task/eval.yaml): `tasks`; `limit` (documents per lm-eval task: fast, but a prefix of the split, not a
random sample); `num_fewshot`; `batch_size` (rows per forward: larger is faster until memory runs out); `max_length`
(shorter rolling windows for long-context models: faster, slightly worse wikitext scores); `max_gen_toks`; `seed`;
`bootstrap_iters`; `log_samples`; `ppl_seqlen`, `ppl_windows`, `ppl_batch_size`; `apply_chat_template` and
`fewshot_as_multiturn` as lm-eval's CLI has them (instruct models: scores then depend on the template, as in
lm-eval's HF runs with the same flags; wikitext2_ppl never uses the template).
Bad input (unknown task, missing data file, limit <= 0, ...) stops with one line naming the key or file.
"""

from __future__ import annotations

import json
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table
from omegaconf import DictConfig

import conf
from runner import common
from runner.knobs import check, integer, number, within_context
from runner.lm_eval_adapter import LMEvalModel
from runner.perplexity import perplexity, wikitext2_test_text
from runner.rundir import RunContext

TASK_DIR = Path(conf.__file__).resolve().parent / "lm_eval_tasks"
PPL_TASK = "wikitext2_ppl"

# Every numeric knob's type and range, checked before anything loads (runner/knobs.py).
KNOBS = {
    "limit": number(gt=0, null=True),  # < 1: a fraction of each task's documents
    "num_fewshot": integer(lo=0, null=True),
    "batch_size": integer(lo=1),
    "max_length": integer(lo=2, null=True),
    "max_gen_toks": integer(lo=1),
    "seed": integer(lo=0),
    "bootstrap_iters": integer(lo=0),
    "ppl_seqlen": integer(lo=2),
    "ppl_windows": integer(lo=1, null=True),
    "ppl_batch_size": integer(lo=1),
}


def _check_knobs(t: DictConfig) -> list[str]:
    names = [t.tasks] if isinstance(t.tasks, str) else list(t.tasks)
    if not names:
        raise common.ConfigError("task.tasks is empty; list tasks, e.g. task.tasks=[wikitext2_ppl,hellaswag]")
    check(t, "task", KNOBS)
    if t.max_length is not None and t.max_length <= t.max_gen_toks:
        raise common.ConfigError(f"task.max_length={t.max_length} must exceed task.max_gen_toks={t.max_gen_toks}")
    if t.fewshot_as_multiturn and not t.apply_chat_template:
        raise common.ConfigError(
            "task.fewshot_as_multiturn=true needs task.apply_chat_template=true (turns exist only in a chat template)"
        )
    return list(dict.fromkeys(names))


def _file_leaves(node) -> list[str]:
    if isinstance(node, dict):
        return [f for v in node.values() for f in _file_leaves(v)]
    return [node] if isinstance(node, str) else []


def _task_manager(cfg: DictConfig, names: list[str]) -> TaskManager:
    """The local task folder, plus lm-eval's registry only when a task is not local (indexing it takes seconds).
    Checks every name and every local data file before the model is loaded."""
    # Loaders receive data_dir through the task metadata (lm-eval passes it to custom_dataset); absolute, because
    # they run wherever lm-eval is called from.
    meta = {"data_dir": str(Path(cfg.paths.data_dir).expanduser().resolve())}
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=meta)
    local = set(tm.all_tasks)
    if any(n not in local for n in names):
        tm = TaskManager(include_path=str(TASK_DIR), include_defaults=True, metadata=meta)
        for n in names:
            if n not in tm.all_tasks:
                known = ", ".join([PPL_TASK, *sorted(local)])
                raise common.ConfigError(
                    f"task.tasks: unknown task {n!r}; local tasks: {known}; other names must be lm-eval registry tasks"
                )
    for n in names:
        if n in local:
            for rel in _file_leaves(tm.task_index[n].cfg["dataset_kwargs"]):
                common.data_path(cfg, rel)
    return tm


def _metrics(results: dict) -> dict[str, float]:
    out = {}
    for task, res in results["results"].items():
        for key, value in res.items():
            metric, _, filt = key.partition(",")
            # Skip the alias entry and stderr "N/A" (no stderr for that metric or bootstrap_iters=0).
            if not filt or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            out[f"eval/{task}/{metric if filt == 'none' else f'{metric}_{filt}'}"] = float(value)
    return out


def _write(results: dict, out: Path) -> None:
    for task, rows in results.pop("samples", {}).items():
        with open(out / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable))


def run(cfg: DictConfig, ctx: RunContext) -> dict[str, float]:
    t = cfg.task
    names = _check_knobs(t)
    harness = [n for n in names if n != PPL_TASK]
    tm = _task_manager(cfg, harness) if harness else None
    ppl_text = wikitext2_test_text(cfg) if PPL_TASK in names else None
    model, tok = common.load_model(cfg)
    keys = ("max_length", "ppl_seqlen") if ppl_text is not None else ("max_length",)
    within_context({f"task.{key}": t[key] for key in keys}, model.args.max_position_embeddings)
    if t.apply_chat_template and not tok.chat_template:
        raise common.ConfigError(
            f"task.apply_chat_template=true: the tokenizer of {cfg.model.name} has no chat template; "
            "set task.apply_chat_template=false or use an instruct model"
        )
    multiturn = t.apply_chat_template if t.fewshot_as_multiturn is None else t.fewshot_as_multiturn

    metrics: dict[str, float] = {}
    table = []
    if harness:
        info = {
            "model": cfg.model.name,
            "checkpointer": cfg.checkpointer.name,
            "checkpoint": cfg.checkpointer.path,
            "quantizer": cfg.quantizer.name,
            "dtype": cfg.model.dtype,
        }
        lm = LMEvalModel(model, tok, t.batch_size, t.max_length, t.max_gen_toks, t.seed, info)
        results = simple_evaluate(
            model=lm,
            tasks=harness,
            task_manager=tm,
            num_fewshot=t.num_fewshot,
            limit=t.limit,
            batch_size=t.batch_size,  # recorded in results.json; the model object already has it
            device=str(ctx.device),
            bootstrap_iters=t.bootstrap_iters,
            log_samples=t.log_samples,
            apply_chat_template=t.apply_chat_template,
            fewshot_as_multiturn=multiturn,
            random_seed=t.seed,
            numpy_random_seed=t.seed,
            torch_random_seed=t.seed,
            fewshot_random_seed=t.seed,
        )
        _write(results, ctx.run_dir)
        ctx.add_artifact("results", ctx.run_dir / "results.json")
        for samples in sorted(ctx.run_dir.glob("samples_*.jsonl")):
            ctx.add_artifact("samples", samples)
        metrics.update(_metrics(results))
        table.append(make_table(results))
        if results.get("groups"):
            table.append(make_table(results, "groups"))
    if ppl_text is not None:
        ppl, windows = perplexity(model, tok, ppl_text, t.ppl_seqlen, t.ppl_windows, t.ppl_batch_size)
        metrics[f"eval/{PPL_TASK}/ppl"] = ppl
        metrics[f"eval/{PPL_TASK}/windows"] = float(windows)
        table.append(
            f"|    Tasks    |Metric| Value |Windows x tokens|\n|-------------|------|------:|---------------:|\n"
            f"|{PPL_TASK}|ppl   |{ppl:.4g}|{windows} x {t.ppl_seqlen}|\n"
        )
    print("\n".join(table))
    return metrics
