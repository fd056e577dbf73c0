"""Finetuning speed and quality: task=finetune (full and LoRA) against a hand-written transformers loop, JSON out.

    python benchmarks/finetune.py --out finetune_bench.json
    python benchmarks/finetune.py --threads 1 --steps 5 --lora-steps 30 --out small.json    # a shared 2-core machine
    python benchmarks/finetune.py checkpointer=gguf checkpointer.path=/path/SmolLM2-135M-Instruct.Q4_1.gguf --out b.json

Positional arguments are Hydra overrides on top of `task=finetune data=alpaca` (default model: smollm2_135m from its
pinned source). The model is loaded once and written as a native and an HF checkpoint in a temporary directory, so
both sides start from the same weights and see the same training batches (the stage's seeded sampler and
collation; `--batch-size` sequences per optimizer step in micro-batches of `--micro-batch-size`, at most
`--max-seq-len` tokens each).

Speed, for task.method=full and then lora, `--repeats` times in alternation:
- ours: `runner.finetune.run` for `--steps` steps (as `python -m runner task=finetune` runs it);
- reference: `transformers.LlamaForCausalLM` loaded from the HF copy, trained by a plain loop with the same AdamW
  hyperparameters (torch's default implementation), schedule, clipping and loss normalisation, micro-batches in
  sampler order and logits at every position; for LoRA the same `models.lora` adapters on the HF modules.
Each step's fastest repeat counts; the first step (warm-up) and the last (the stage also validates then) do not.
tokens/s counts real (unpadded) input tokens, per second of wall time and per second of this process's CPU time.
On a shared machine read the CPU-time figures with --threads 1: other tenants inflate wall time much more.

Quality: one LoRA run of `--lora-steps` steps; finetune/val_loss (data.val_size held-out records) before and after.

Written: the JSON file given by --out (rewritten after each part, printed at the end): settings, machine (CPU count,
torch threads, load average), per-method speed (tokens/s of both sides, speedups, first-step losses, which must
agree: same weights, same batch), the quality run and the target check (speedup >= 1.2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.atomic import write_text_atomic  # noqa: E402 - after the path setup above
from models.checkpoint import save_hf, save_native  # noqa: E402
from models.lora import apply_lora  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402
from runner import common, data, finetune  # noqa: E402
from runner.rundir import RunContext, context  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. checkpointer.path=FILE")
    p.add_argument("--steps", type=int, default=5, help="steps per speed run (first and last are not timed)")
    p.add_argument("--repeats", type=int, default=2, help="speed runs per side, alternating; the fastest step counts")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward/backward")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--full-lr", type=float, default=2e-5)
    p.add_argument("--lora-lr", type=float, default=2e-4)
    p.add_argument("--lora-steps", type=int, default=200, help="steps of the LoRA quality run (0: skip it)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.steps < 3:
        p.error("--steps must be at least 3 (the first and last steps are not timed)")
    return a


def _config(overrides: list[str], run_dir: Path):
    """Compose like `python -m runner`, with Hydra's run directory set to run_dir (stages write there)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=finetune", "data=alpaca", *overrides], return_hydra_config=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _clock() -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads)."""
    return time.perf_counter(), time.process_time()


def _durations(marks: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:], strict=False)]


@dataclass
class _TimedContext(RunContext):
    """A stage context that reads the clock whenever the stage logs metrics: step 0's validation, then each step."""

    marks: list[tuple[float, float]] = field(default_factory=list)

    def log_metrics(self, metrics: dict, step: int) -> None:
        if "finetune/loss" in metrics or step == 0:
            self.marks.append(_clock())
        super().log_metrics(metrics, step)


def _ours(cfg) -> dict:
    """Run the stage with a `_TimedContext`."""
    job = context(cfg)
    ctx = _TimedContext(job.run_dir, job.rank, job.device)
    metrics = finetune.run(cfg, ctx)
    rows = [json.loads(line) for line in (ctx.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["finetune/loss"] for r in rows if "finetune/loss" in r]
    val = [r["finetune/val_loss"] for r in rows if "finetune/val_loss" in r]
    return {"durations": _durations(ctx.marks), "losses": losses, "val": val, "metrics": metrics}


def _reference(cfg, hf_dir: Path, lora: bool) -> dict:
    """A plain loop over transformers' model: the same batches, schedule, clipping and loss normalisation.

    Its micro-batches follow the sampler's order and its AdamW is torch's default implementation, as a hand-written
    loop has them; the logits cover every position.
    """
    import transformers

    t = cfg.task
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).train()
    if lora:
        torch.manual_seed(cfg.seed)
        apply_lora(model, t.lora.rank, t.lora.alpha, t.lora.dropout, list(t.lora.target_modules))
    tok = Tokenizer.from_dir(hf_dir)
    train, _ = data.load_examples(cfg, tok)
    sampler = data.Sampler(len(train), cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(t.optimizer, _convert_="all", fused=None)(params)
    scheduler = instantiate(t.scheduler)(optimizer, max_steps=t.max_steps)
    marks, losses, tokens = [_clock()], [], []
    for step in range(t.max_steps):
        idx = sampler.take(step * t.batch_size, t.batch_size)
        micro = [data.collate([train[i] for i in idx[j : j + t.micro_batch_size]], tok.pad_id)
                 for j in range(0, t.batch_size, t.micro_batch_size)]  # fmt: skip
        n_targets = sum((y != data.IGNORE_INDEX).sum().item() for _, y in micro)
        loss = 0.0
        for x, y in micro:
            logits = model(input_ids=x, use_cache=False).logits  # [B, T, V]
            nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
            (nll / n_targets).backward()
            loss += nll.item()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss / n_targets)
        tokens.append(sum(len(train[i][0]) - 1 for i in idx))
        marks.append(_clock())
        _log(f"reference step {step + 1}/{t.max_steps} loss {losses[-1]:.4f}")
    return {"durations": _durations(marks), "losses": losses, "tokens": tokens}


def _speed(ours: list[list], ref: list[list], tokens: list[int]) -> dict:
    """Tokens/s over steps 2 .. n-1 (the stage's last step also validates), fastest repeat of each step per side."""
    timed = range(1, len(tokens) - 1)
    n = sum(tokens[i] for i in timed)
    out = {"timed_steps": len(timed), "tokens": n}
    for name, runs in (("ours", ours), ("reference", ref)):
        wall = sum(min(r[i][0] for r in runs) for i in timed)
        cpu = sum(min(r[i][1] for r in runs) for i in timed)
        out[name] = {"tokens_per_s": n / wall, "tokens_per_cpu_s": n / cpu}
    out["speedup_wall"] = out["ours"]["tokens_per_s"] / out["reference"]["tokens_per_s"]
    out["speedup_cpu"] = out["ours"]["tokens_per_cpu_s"] / out["reference"]["tokens_per_cpu_s"]
    return out


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=2))


def main() -> None:
    a = _args()
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="finetune_bench_"))
    cfg = _config(a.overrides, work / "load")
    model, tok = common.load_model(cfg, apply_quantizer=False)
    save_native(work / "native", model, tok, None)
    save_hf(work / "hf", model, tok)
    del model
    base = [
        *a.overrides,
        "checkpointer=native",
        f"checkpointer.path={work / 'native'}",
        f"task.batch_size={a.batch_size}",
        f"task.micro_batch_size={a.micro_batch_size}",
        f"task.max_seq_len={a.max_seq_len}",
        "task.eval_every=null",
        "task.save_every=null",
    ]
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_start": os.getloadavg(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "speed": {},
    }
    for method, lr in (("full", a.full_lr), ("lora", a.lora_lr)):
        # A 4-record validation split: the speed runs do not need the stage's validation passes to be long.
        over = [
            *base,
            f"task.method={method}",
            f"task.max_steps={a.steps}",
            f"task.optimizer.lr={lr}",
            "data.val_size=4",
        ]
        ours, ref = [], []
        for rep in range(a.repeats):
            _log(f"{method} speed, repeat {rep + 1}/{a.repeats}: ours")
            ours.append(_ours(_config(over, work / f"ours_{method}_{rep}")))
            _log(f"{method} speed, repeat {rep + 1}/{a.repeats}: reference")
            ref.append(_reference(_config(over, work / f"ref_{method}_{rep}"), work / "hf", method == "lora"))
        speed = _speed([r["durations"] for r in ours], [r["durations"] for r in ref], ref[0]["tokens"])
        first = {"ours": ours[0]["losses"][0], "reference": ref[0]["losses"][0]}
        speed.update(first_step_loss=first, losses_agree=math.isclose(*first.values(), rel_tol=1e-4))
        result["speed"][method] = speed
        result["machine"]["load_average_end"] = os.getloadavg()
        _write(a.out, result)
        _log(json.dumps(speed))
    if a.lora_steps:
        _log(f"LoRA quality: {a.lora_steps} steps")
        over = [*base, "task.method=lora", f"task.max_steps={a.lora_steps}", f"task.optimizer.lr={a.lora_lr}"]
        run = _ours(_config(over, work / "quality"))
        result["lora_quality"] = {
            "steps": a.lora_steps,
            "val_records": cfg.data.val_size,
            "val_loss_before": run["val"][0],
            "val_loss_after": run["val"][-1],
            "train_loss_first": run["losses"][0],
            "train_loss_last": run["losses"][-1],
            "stage_tokens_per_s": run["metrics"]["finetune/tokens_per_s"],
        }
    result["machine"]["load_average_end"] = os.getloadavg()
    result["targets"] = {
        f"{m}_speedup_at_least_1.2x": {"wall": r["speedup_wall"] >= 1.2, "cpu": r["speedup_cpu"] >= 1.2}
        for m, r in result["speed"].items()
    }
    _write(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
