"""Eval quality and speed: our lm-eval model (runner/lm_eval_adapter.py) against lm-eval's HF backend, JSON out.

    python benchmarks/eval.py --gptq-dir outputs/quantize/<run>/model --out eval_bench.json     # limit 500 (hours)
    python benchmarks/eval.py --limit 100 --gptq-dir DIR --out small.json checkpointer=gguf checkpointer.path=F.gguf

Positional arguments are Hydra overrides on top of `task=eval` (default model: smollm2_135m from its pinned source).
The GPTQ checkpoint is the `model/` folder of `python -m runner task=quantize quantizer=gptq quantizer.groupsize=64`;
without --gptq-dir that part is skipped.

Backends, each over every local lm-eval task (`--tasks`; `--limit` documents, a smaller task whole; one
simple_evaluate call per task, timed) and over `wikitext2_ppl` (the whole split unless `--ppl-windows`):
- `ours`: the float model through LMEvalModel, as task=eval runs it;
- `hf`: lm-eval's HFLM over the same float weights written as an HF directory (models.checkpoint.save_hf; or
  `--hf-dir`); its wikitext2_ppl is runner.perplexity over the transformers model's logits;
- `gptq`: the quantized checkpoint through LMEvalModel (scores only, with their change from float).
Tasks run backend after backend, so load changes on a shared machine hit all alike; CPU seconds are recorded too.

Tokens/s counts, for every request, the tokens lm-eval's HF backend feeds the model (context + continuation, cut to
max_length, minus the last token), the same count for both backends; ours computes fewer (shared contexts).

Targets (`targets`): float scores within 0.5 points of HF's (accuracies) or 0.5% (perplexity-type metrics), and ours
at least 1.5x HF's tokens/s over all lm-eval tasks together.

Written: the JSON file given by --out (also printed): settings, machine, per backend and task the scores, document
count, seconds, CPU seconds and tokens/s, wikitext2_ppl, the comparisons and the target checks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import Clock, log, machine, write_json  # noqa: E402 - benchmarks/ is on sys.path as the script dir
from lm_eval import simple_evaluate  # noqa: E402 - after the path setup above
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from models.checkpoint import save_hf  # noqa: E402
from runner import common  # noqa: E402
from runner.eval import TASK_DIR  # noqa: E402
from runner.lm_eval_adapter import LMEvalModel  # noqa: E402
from runner.perplexity import perplexity, wikitext2_test_text  # noqa: E402

LOCAL = ["wikitext", "hellaswag", "arc_easy", "arc_challenge", "piqa", "lambada_openai", "winogrande"]
# Metrics compared relatively (perplexity-like); the others are accuracies compared in points.
RELATIVE = {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity", "ppl"}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. checkpointer=gguf checkpointer.path=FILE")
    p.add_argument("--tasks", nargs="+", default=LOCAL)
    p.add_argument("--limit", type=int, default=500, help="documents per task (a smaller task runs whole)")
    p.add_argument("--wikitext-limit", type=int, default=None, help="WikiText articles (default: --limit)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ppl-windows", type=int, default=None, help="first N wikitext2_ppl windows (default: all)")
    p.add_argument("--gptq-dir", type=Path, default=None, help="native GPTQ checkpoint from task=quantize")
    p.add_argument("--hf-dir", type=Path, default=None, help="reuse this HF copy of the float model")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def _config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["task=eval", *overrides])


class _Timed(LM):
    """Another lm-eval model with its calls timed: the model's work only, not lm-eval's task building."""

    def __init__(self, lm: LM):
        super().__init__()
        self.lm, self.wall, self.cpu = lm, 0.0, 0.0

    def _call(self, method: str, requests):
        with Clock() as clock:
            out = getattr(self.lm, method)(requests)
        self.wall, self.cpu = self.wall + clock.wall, self.cpu + clock.cpu
        return out

    def loglikelihood(self, requests):
        return self._call("loglikelihood", requests)

    def loglikelihood_rolling(self, requests):
        return self._call("loglikelihood_rolling", requests)

    def generate_until(self, requests):
        return self._call("generate_until", requests)


class _CountingLM(LMEvalModel):
    """LMEvalModel that also counts the tokens HFLM would feed for the same requests."""

    tokens = 0

    def _score(self, pairs, pack, desc, disable):
        self.tokens += sum(min(len(ctx) + len(cont), self.max_length + 1) - 1 for ctx, cont in pairs)
        return super()._score(pairs, pack, desc, disable)


class _HFLogits(torch.nn.Module):
    """A transformers causal LM as `ids -> logits`, the interface runner.perplexity calls."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


def _scores(results: dict, task: str) -> dict[str, float]:
    return {
        k.split(",")[0]: v
        for k, v in results["results"][task].items()
        if "," in k and "_stderr" not in k and isinstance(v, float)
    }


def _compare(ours: dict[str, float], ref: dict[str, float]) -> dict:
    out = {}
    for metric, value in ref.items():
        if metric in RELATIVE:
            rel = ours[metric] / value - 1
            out[metric] = {"relative": rel, "ok": abs(rel) <= 0.005}
        else:
            points = 100 * (ours[metric] - value)
            out[metric] = {"points": points, "ok": abs(points) <= 0.5}
    return out


def _backends(a: argparse.Namespace, cfg, seed: int) -> tuple[dict[str, LM], dict[str, torch.nn.Module], object]:
    """The lm-eval models by backend name (ours, hf, and gptq with --gptq-dir), the `ids -> logits` models
    runner.perplexity scores for each, and the float model's tokenizer."""
    model, tok = common.load_model(cfg)
    backends = {"ours": _CountingLM(model, tok, a.batch_size, None, cfg.task.max_gen_toks, seed)}
    ppl_models = {"ours": model}

    from lm_eval.models.huggingface import HFLM

    hf_dir = a.hf_dir or save_hf(Path(tempfile.mkdtemp(prefix="eval_bench_hf_")) / "model", model, tok)
    backends["hf"] = HFLM(pretrained=str(hf_dir), batch_size=a.batch_size, device="cpu", dtype=cfg.model.dtype)
    ppl_models["hf"] = _HFLogits(backends["hf"].model)
    if a.gptq_dir is not None:
        qcfg = _config([*a.overrides, "checkpointer=native", f"checkpointer.path={a.gptq_dir}"])
        qmodel, qtok = common.load_model(qcfg)
        backends["gptq"] = LMEvalModel(qmodel, qtok, a.batch_size, None, cfg.task.max_gen_toks, seed)
        ppl_models["gptq"] = qmodel
    return backends, ppl_models, tok


def _settings(a: argparse.Namespace, cfg, seed: int) -> dict:
    return {
        "model": cfg.model.name,
        "checkpoint": str(common.checkpoint_path(cfg)),
        "gptq_dir": str(a.gptq_dir) if a.gptq_dir else None,
        "dtype": cfg.model.dtype,
        "tasks": a.tasks,
        "limit": a.limit,
        "wikitext_limit": a.wikitext_limit or a.limit,
        "batch_size": a.batch_size,
        "hf_wikitext_batch_size": 1,
        "ppl_seqlen": cfg.task.ppl_seqlen,
        "ppl_windows": a.ppl_windows,
        "seed": seed,
        "overrides": a.overrides,
    }


def _run_lm_eval_tasks(
    a: argparse.Namespace, tm: TaskManager, backends: dict[str, LM], seed: int, result: dict
) -> dict[str, int]:
    """Every task through every backend (one timed simple_evaluate call each) into result["backends"]; returns
    the tokens HFLM would feed per task, counted on ours."""
    tokens = {}
    for task in a.tasks:
        for name, lm in backends.items():
            timed = _Timed(lm)
            if name == "hf" and task == "wikitext":
                # HFLM materialises [batch, window, vocab] fp32 logits twice: 8192-token windows need batch 1.
                lm.batch_size_per_gpu = 1
            before = backends["ours"].tokens
            r = simple_evaluate(
                model=timed,
                tasks=[task],
                task_manager=tm,
                limit=(a.wikitext_limit or a.limit) if task == "wikitext" else a.limit,
                bootstrap_iters=0,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
            if name == "hf":
                lm.batch_size_per_gpu = a.batch_size
            if name == "ours":
                tokens[task] = backends["ours"].tokens - before
            rec = {
                "scores": _scores(r, task),
                "documents": r["n-samples"][task]["effective"],
                "seconds": timed.wall,
                "cpu_seconds": timed.cpu,
                "tokens": tokens[task],
                "tokens_per_s": tokens[task] / timed.wall,
                "tokens_per_cpu_s": tokens[task] / timed.cpu,
            }
            result["backends"][name]["tasks"][task] = rec
            log(f"{task} {name}: {json.dumps(rec)}")
            write_json(a.out, result)  # after every task, so an interrupted run keeps what it measured
    return tokens


def _score_perplexity(a: argparse.Namespace, cfg, ppl_models: dict[str, torch.nn.Module], tok, text, result) -> None:
    """wikitext2_ppl (runner.perplexity) of every backend's model, timed, into result["backends"]."""
    seqlen = cfg.task.ppl_seqlen
    for name, m in ppl_models.items():
        with Clock() as clock, torch.no_grad():
            ppl, n = perplexity(m, tok, text, seqlen, a.ppl_windows, cfg.task.ppl_batch_size)
        result["backends"][name]["wikitext2_ppl"] = {
            "ppl": ppl,
            "windows": n,
            "seconds": clock.wall,
            "cpu_seconds": clock.cpu,
            "tokens_per_s": n * seqlen / clock.wall,
        }
        log(f"wikitext2_ppl {name}: {result['backends'][name]['wikitext2_ppl']}")


def _summarize(a: argparse.Namespace, result: dict, tokens: dict[str, int]) -> None:
    """The comparisons (float_vs_hf; gptq_vs_float when a GPTQ backend ran) and the target checks, into `result`."""
    ours, hf = result["backends"]["ours"], result["backends"]["hf"]
    comparison = {task: _compare(ours["tasks"][task]["scores"], hf["tasks"][task]["scores"]) for task in a.tasks}
    comparison["wikitext2_ppl"] = _compare({"ppl": ours["wikitext2_ppl"]["ppl"]}, {"ppl": hf["wikitext2_ppl"]["ppl"]})
    total = {
        name: {k: sum(t[k] for t in result["backends"][name]["tasks"].values()) for k in ("seconds", "cpu_seconds")}
        for name in ("ours", "hf")
    }
    speed = {task: hf["tasks"][task]["seconds"] / ours["tasks"][task]["seconds"] for task in a.tasks} | {
        "wikitext2_ppl": hf["wikitext2_ppl"]["seconds"] / ours["wikitext2_ppl"]["seconds"]
    }
    choice = [task for task in a.tasks if task != "wikitext"]
    result["float_vs_hf"] = {
        "scores": comparison,
        "speedup_by_task": speed,
        # Rolling perplexity (wikitext) is the same forward work for both backends by construction; the choice
        # tasks are where scoring a shared context once pays.
        "speedup_choice_tasks": sum(hf["tasks"][t]["seconds"] for t in choice)
        / max(1e-9, sum(ours["tasks"][t]["seconds"] for t in choice)),
        "tokens_per_s_ours": sum(tokens.values()) / total["ours"]["seconds"],
        "tokens_per_s_hf": sum(tokens.values()) / total["hf"]["seconds"],
        "speedup_lm_eval_tasks": total["hf"]["seconds"] / total["ours"]["seconds"],
        "speedup_lm_eval_tasks_cpu": total["hf"]["cpu_seconds"] / total["ours"]["cpu_seconds"],
    }
    if "gptq" in result["backends"]:
        g = result["backends"]["gptq"]
        result["gptq_vs_float"] = {
            task: {m: v - ours["tasks"][task]["scores"][m] for m, v in g["tasks"][task]["scores"].items()}
            for task in a.tasks
        } | {"wikitext2_ppl": {"ppl": g["wikitext2_ppl"]["ppl"] - ours["wikitext2_ppl"]["ppl"]}}
    result["targets"] = {
        "scores_within_tolerance": all(c["ok"] for task in comparison.values() for c in task.values()),
        "speedup_at_least_1.5x": result["float_vs_hf"]["speedup_lm_eval_tasks"] >= 1.5,
    }


def main() -> None:
    a = _args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    cfg = _config(a.overrides)
    seed = cfg.task.seed
    started = time.time()
    tm = TaskManager(
        include_path=str(TASK_DIR),
        include_defaults=False,
        metadata={"data_dir": str(Path(cfg.paths.data_dir).expanduser().resolve())},
    )
    text = wikitext2_test_text(cfg)
    backends, ppl_models, tok = _backends(a, cfg, seed)
    result = {
        "settings": _settings(a, cfg, seed),
        "machine": machine(),
        "backends": {name: {"tasks": {}} for name in backends},
    }
    tokens = _run_lm_eval_tasks(a, tm, backends, seed, result)
    _score_perplexity(a, cfg, ppl_models, tok, text, result)
    _summarize(a, result, tokens)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["total_s"] = time.time() - started
    write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
