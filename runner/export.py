"""Export: write a checkpoint the runner can load in a format other tools load (HF, PEFT, GGUF, GPTQ).

    python -m runner task=export task.format=hf checkpointer=native checkpointer.path=<finetune run>/model
    python -m runner task=export task.format=hf task.adapter=<lora run>/adapter        # base (model.source) + LoRA merged
    python -m runner task=export task.format=peft task.adapter=<lora run>/adapter      # the adapter as PEFT writes it
    python -m runner task=export task.format=gguf                                      # the float model, F16
    python -m runner task=export task.format=gguf checkpointer=native checkpointer.path=<gptq g32 run>/model  # Q4_0/Q4_1
    python -m runner task=export task.format=gguf quantizer=int4_wo quantizer.groupsize=32   # round-to-nearest, Q4_1
    python -m runner task=export task.format=gptq checkpointer=native checkpointer.path=<gptq run>/model

Steps: load the model as every stage does (`checkpointer=...`, a round-to-nearest `quantizer=` applied on the fly),
put `task.adapter` on it, write it with runner/exports.py (which says what each format holds and refuses), then read
an HF or GGUF export back with our own loader and compare its logits with the model's (`task.check`).

Files written: `<run>/export/`, replaced whole (written to a temporary sibling, renamed at the end; nothing is left
when the format cannot hold the model): hf: config.json, model.safetensors (or model-0000i-of-0000n.safetensors
and model.safetensors.index.json), tokenizer.json, tokenizer_config.json, generation_config.json; peft:
adapter_config.json, adapter_model.safetensors; gguf: `<model>-<TYPE>.gguf`; gptq: as hf, with qweight / qzeros /
scales / g_idx for the quantized linears and quantization_config in config.json.

Metrics: `export/bytes` (files written), `export/max_logit_diff` (largest |logit difference| between the model and
its reloaded export over one window of random tokens; hf and gguf with task.check), and with task.requantize on a
model that needed it `export/ppl` and `export/ppl_source` (WikiText-2 perplexity after and before rounding again).

Knobs (conf/task/export.yaml): format, adapter, gguf_float (F16 / BF16 / F32 for float tensors), requantize,
max_shard_mb, check, ppl_seqlen and ppl_windows (only for requantize).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from models.checkpoint import check_and_load, load_checkpoint
from models.llama import Transformer
from models.lora import load_adapter
from runner import common, exports
from runner.knobs import check, integer, number, within_context
from runner.perplexity import perplexity, wikitext2_test_text
from runner.rundir import RunContext

log = logging.getLogger(__name__)

# Every numeric knob's type and range, checked before anything loads (runner/knobs.py).
KNOBS = {"max_shard_mb": number(gt=0), "ppl_seqlen": integer(lo=2), "ppl_windows": integer(lo=1, null=True)}


def _adapter_dir(path: str) -> Path:
    """task.adapter: an adapter directory, or a finetune run directory holding adapter/."""
    p = Path(path).expanduser()
    if not p.exists():
        raise common.ConfigError(f"task.adapter={path}: not found; point it at a task.method=lora run's adapter/")
    if (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    if not (p / "adapter_config.json").is_file():
        raise common.ConfigError(
            f"task.adapter={path} is not a LoRA adapter (no adapter_config.json, no adapter/): export a "
            "task.method=lora run, or drop task.adapter to export the model itself"
        )
    return p


def _record(cfg: DictConfig) -> dict:
    """The model's quantizer record: the one applied on the fly, else the checkpoint's quantizer.json."""
    if cfg.quantizer.name != "none":
        return OmegaConf.to_container(cfg.quantizer, resolve=True)
    path = common.checkpoint_path(cfg)
    if cfg.checkpointer.name == "native" and path is not None:
        return json.loads((path / "quantizer.json").read_text())
    return {"name": "none"}


def _max_logit_diff(model: Transformer, fmt: str, path: Path) -> float:
    """Largest |logit difference| between `model` and the export at `path` read back by our own loader."""
    args, sd, _, _ = load_checkpoint(fmt, path)
    with torch.device("meta"):
        back = Transformer(args)
    check_and_load(back, sd, path)
    back.init_rope()
    ids = torch.randint(0, args.vocab_size, (1, min(32, args.max_position_embeddings)), generator=torch.Generator())
    dev = next(model.parameters()).device
    with torch.no_grad():
        ours = model(ids.to(dev)).float().cpu()
        theirs = back.eval()(ids).float()
    return float((ours - theirs).abs().max())


def _requantize(cfg: DictConfig, model: Transformer, tok) -> dict[str, float]:
    """Round the int4 weights again on groups of 32 (task.requantize) and score the model before and after."""
    t = cfg.task
    within_context({"task.ppl_seqlen": t.ppl_seqlen}, model.args.max_position_embeddings)
    text = wikitext2_test_text(cfg)
    before, _ = perplexity(model, tok, text, t.ppl_seqlen, t.ppl_windows, 1)
    exports.requantize(model)
    after, n = perplexity(model, tok, text, t.ppl_seqlen, t.ppl_windows, 1)
    log.info("re-quantized on groups of %d: WikiText-2 perplexity %.4g -> %.4g (%d windows)", 32, before, after, n)
    return {"export/ppl_source": before, "export/ppl": after, "export/ppl_windows": float(n)}


def run(cfg: DictConfig, ctx: RunContext) -> dict[str, float]:
    t = cfg.task
    exports.check_format(t.format, "task.format")
    check(t, "task", KNOBS)
    for key in ("requantize", "check"):
        if not isinstance(t[key], bool):
            raise common.ConfigError(f"task.{key}={t[key]!r} is not valid: use true or false")
    options = exports.Options.from_task(t)
    if t.format == "peft" and t.adapter is None:
        raise common.ConfigError(
            "task.format=peft writes a LoRA adapter: set task.adapter=<finetune run>/adapter (a task.method=lora run)"
        )
    adapter = _adapter_dir(t.adapter) if t.adapter is not None else None
    model, tok = common.load_model(cfg)
    record = _record(cfg)
    if adapter is not None:
        try:
            load_adapter(model, adapter)
        except ValueError as e:
            raise common.ConfigError(str(e)) from e
    metrics: dict[str, float] = {}
    problem = exports.gguf_problem(model) if t.format == "gguf" else None
    if problem is not None and t.requantize and exports.requantizable(model):
        metrics.update(_requantize(cfg, model, tok))

    source = common.checkpoint_path(cfg)
    base = str(source) if source is not None else None
    name = cfg.model.name
    path = exports.write(t.format, model, tok, record, ctx.run_dir / "export", options, name, base_model=base)
    ctx.add_artifact("export", path)
    metrics["export/bytes"] = float(exports.file_bytes(path))
    if t.check and t.format in ("hf", "gguf"):
        metrics["export/max_logit_diff"] = _max_logit_diff(model, t.format, path)
    log.info("wrote %s (%s)", path, t.format)
    return metrics
