"""Generate: complete prompts with any checkpoint this project loads, printing the text as it is produced.

    python -m runner task=generate task.prompt="The capital of France is"
    python -m runner task=generate task.prompts_file=prompts.jsonl task.temperature=0.8 task.top_p=0.95
    python -m runner task=generate task.chat=true task.system="Answer briefly." task.prompt="Why is the sky blue?"
    python -m runner task=generate checkpointer=native checkpointer.path=DIR task.compile=true  # finetune/quantize output

Files written in the run directory: `samples.jsonl` (one line per prompt: prompt, completion, prompt_tokens,
completion_tokens, finish_reason) and, through the runner, `metrics.json`.

Metrics: `generate/prefill_tokens_per_s`, `generate/decode_tokens_per_s`, `generate/time_to_first_token_s`,
`generate/compile_s`, `generate/peak_memory_bytes` (CUDA: peak allocated; CPU: the process's peak RSS),
`generate/model_bytes` (stored weight bytes, packed for quantized layers), `generate/decode_bytes_per_token`
and `generate/bandwidth_gb_s` = weight bytes read per decode step x steps per second. As in gpt-fast the input
embedding table is left out of the bytes read (a step gathers B rows of it), but a tied output head reads the whole
table, so it then counts once.

Knobs (conf/task/generate.yaml):
- `prompt` or `prompts_file` (jsonl; each line a JSON string or {"prompt": ...}; it replaces `prompt`). A batch is
  left-padded into one static KV cache; padded keys are masked, so each row decodes as it would alone.
- `chat` renders the tokenizer's chat template with an optional `system` message (instruct models).
- `temperature` 0 is greedy (deterministic, comparable across quantizers); above 0 samples from the distribution
  restricted by `top_k` (null: off) and `top_p` (1.0: off), seeded by `seed`.
- `max_new_tokens`; generation ends early at a stop token (EOS and the tokenizer's stop ids) or any `stop` string,
  which is cut from the completion.
- `compile` runs the one-token decode step through torch.compile (static shapes). Compilation takes tens of seconds
  and is reported as `generate/compile_s`, outside the decode timing; it pays off for long generations.
- `stream` prints a single prompt's completion token by token; batches are printed when they finish.

The decoding loop and the sampler are `models.generate.generate` (a plain function over token ids, which the eval
adapter also uses for lm-eval's generate_until); this module reads the knobs, runs it and reports.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from models.generate import generate
from models.llama import Transformer
from models.tokenizer import Tokenizer
from runner import common
from runner.knobs import check, integer, number, string_list
from runner.rundir import RunContext

log = logging.getLogger(__name__)


# Every numeric knob's type and range, checked before anything loads (runner/knobs.py).
KNOBS = {
    "max_new_tokens": integer(lo=1),
    "temperature": number(lo=0),  # 0 = greedy
    "top_k": integer(lo=1, null=True),
    "top_p": number(gt=0, hi=1),  # 1 = off
    "seed": integer(lo=0),
}


def _check_knobs(t: DictConfig) -> list[str]:
    """The checked knobs' stop strings (a single string is one stop string, not its characters)."""
    check(t, "task", KNOBS)
    stop = string_list(t, "task", "stop")
    if any(not s for s in stop):
        raise common.ConfigError("task.stop contains an empty string; list non-empty stop strings")
    return stop


def _read_prompts(t: DictConfig) -> list[str]:
    if t.prompts_file is None:
        if t.prompt is None or not t.prompt.strip():
            raise common.ConfigError("task.prompt is empty; pass task.prompt=TEXT or task.prompts_file=FILE.jsonl")
        return [t.prompt]
    path = Path(t.prompts_file).expanduser()
    if not path.is_file():
        raise common.ConfigError(f"task.prompts_file={path} not found; give a jsonl file, one prompt a line")
    prompts = []
    for n, line in enumerate(common.read_text(path, "task.prompts_file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise common.ConfigError(f"{path}:{n}: not JSON ({e}); write one JSON string or object a line") from e
        prompt = row["prompt"] if isinstance(row, dict) and "prompt" in row else row
        if not isinstance(prompt, str) or not prompt.strip():
            raise common.ConfigError(f'{path}:{n}: empty or missing prompt; write "text" or {{"prompt": "text"}}')
        prompts.append(prompt)
    if not prompts:
        raise common.ConfigError(f"task.prompts_file={path} has no prompts")
    return prompts


def _encode(t: DictConfig, tok: Tokenizer, prompt: str) -> list[int]:
    if not t.chat:
        return tok.encode(prompt)
    messages = [{"role": "system", "content": t.system}] if t.system is not None else []
    try:
        text = tok.apply_chat_template([*messages, {"role": "user", "content": prompt}])
    except ValueError as e:
        raise common.ConfigError(f"task.chat=true: {e}") from e
    # The template writes any BOS itself (HF's apply_chat_template also encodes without special tokens).
    return tok.encode(text, bos=False)


def weight_bytes(model: Transformer) -> tuple[int, int]:
    """(bytes of all stored weights, bytes one decode step reads: all but the input embedding, unless tied).

    Quantized layers hold plain packed buffers (the quant/ contract), so stored bytes are packed bytes. The int4
    CPU kernel reads its scales and zeros in bf16, slightly less than the fp32 ones stored.
    """
    sd = model.state_dict()
    total = sum(v.numel() * v.element_size() for v in sd.values())
    embed = sum(v.numel() * v.element_size() for k, v in sd.items() if k.startswith("model.embed_tokens."))
    return total, total if model.lm_head is None else total - embed


class _Printer:
    """Streams one prompt's completion to stdout as deltas of its visible text."""

    def __init__(self):
        self.shown = ""

    def __call__(self, row: int, text: str) -> None:
        if text.startswith(self.shown):
            sys.stdout.write(text[len(self.shown) :])
            sys.stdout.flush()
            self.shown = text


def _peak_memory(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(cfg: DictConfig, ctx: RunContext) -> dict[str, float]:
    t = cfg.task
    stop = _check_knobs(t)
    texts = _read_prompts(t)
    dev = ctx.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model, tok = common.load_model(cfg)
    prompts = [_encode(t, tok, x) for x in texts]
    context_len = model.args.max_position_embeddings
    for n, p in enumerate(prompts, 1):
        where = "task.prompt" if t.prompts_file is None else f"{t.prompts_file}:{n}"
        if not p:
            raise common.ConfigError(f"{where}: the prompt encodes to no tokens; give a non-empty prompt")
        if len(p) + t.max_new_tokens > context_len:
            raise common.ConfigError(
                f"{where}: {len(p)} prompt tokens + task.max_new_tokens={t.max_new_tokens} exceed the model's context "
                f"of {context_len} (model.max_position_embeddings); shorten the prompt or lower task.max_new_tokens"
            )
    total_bytes, step_bytes = weight_bytes(model)
    log.info(
        "generating %d completion(s) with %s (%.1f MB of weights)", len(prompts), cfg.model.name, total_bytes / 1e6
    )

    stream = t.stream and len(prompts) == 1
    sep = "\n" if t.chat else ""  # a chat answer starts on its own line; a plain completion continues the prompt
    if stream:
        sys.stdout.write(texts[0] + sep)
    generator = torch.Generator(device=dev).manual_seed(t.seed) if t.temperature > 0 else None
    results = generate(
        model,
        tok,
        prompts,
        max_new_tokens=t.max_new_tokens,
        temperature=t.temperature,
        top_k=t.top_k,
        top_p=t.top_p,
        stop_ids=tok.stop_ids,
        stop_strings=stop,
        generator=generator,
        compile=t.compile,
        on_text=_Printer() if stream else None,
    )
    if stream:
        sys.stdout.write("\n")
    elif t.stream:
        for n, (x, r) in enumerate(zip(texts, results, strict=True), 1):
            sys.stdout.write(f"--- [{n}] {x}{sep}{r['text']}\n")
    sys.stdout.flush()

    with open(ctx.run_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for x, r in zip(texts, results, strict=True):
            row = {k: r[k] for k in ("prompt_tokens", "completion_tokens", "finish_reason")}
            f.write(json.dumps({"prompt": x, "completion": r["text"], **row}, ensure_ascii=False) + "\n")

    ctx.add_artifact("samples", ctx.run_dir / "samples.jsonl")
    tm = results[0]["timings"]
    steps, decode_s = tm["decode_steps"], tm["decode_s"]
    decoded = sum(r["completion_tokens"] - 1 for r in results)  # the first token of each row comes from prefill
    return {
        "generate/prefill_tokens_per_s": sum(len(p) for p in prompts) / tm["time_to_first_token_s"],
        # No decode step ran when max_new_tokens=1 or every row stopped at once: report 0 rather than divide by 0.
        "generate/decode_tokens_per_s": decoded / decode_s if steps else 0.0,
        "generate/time_to_first_token_s": tm["time_to_first_token_s"],
        "generate/compile_s": tm["compile_s"],
        "generate/new_tokens": float(sum(r["completion_tokens"] for r in results)),
        "generate/peak_memory_bytes": float(_peak_memory(dev)),
        "generate/model_bytes": float(total_bytes),
        "generate/decode_bytes_per_token": float(step_bytes),
        "generate/bandwidth_gb_s": step_bytes * steps / decode_s / 1e9 if steps else 0.0,
    }
