"""Quantize: turn a float checkpoint into a quantized native checkpoint and check its quality.

    python -m runner task=quantize quantizer=gptq                  # the main job: GPTQ int4, group 128, C4 calibration
    python -m runner task=quantize quantizer=int4_wo quantizer.groupsize=64
    python -m runner task=quantize quantizer=gptq quantizer.nsamples=128 quantizer.seqlen=2048 task.ppl_windows=null
    python -m runner task=generate checkpointer=native checkpointer.path=<run>/model   # use the result

Steps: load the float model (model.source or checkpointer.path), score it, quantize the linears of the decoder
blocks (embeddings, norms and the output head stay float; quant/base.py has the contract), write the checkpoint,
score the quantized model.

Files written in the run directory: `model/` (native checkpoint via models.checkpoint.save_native: model.safetensors
with packed int4/int8 weights, scales, zeros and, for GPTQ act-order without static groups, g_idx; quantizer.json;
model_args.json; tokenizer files; config.yaml), and through the runner metrics.json.

Metrics: `quantize/seconds` (quantization only, GPTQ's calibration passes included), `quantize/model_bytes` (bytes of
the saved tensors), `quantize/float_bytes` and `quantize/compression` (their ratio, against the float model in
model.dtype), `quantize/ppl` and `quantize/ppl_float` (WikiText-2 test perplexity, GPTQ paper protocol through
runner.perplexity), `quantize/ppl_windows` (windows scored).

Knobs (conf/task/quantize.yaml; the quantizer's own in conf/quantizer/):
- `ppl` turns the quality check off; `ppl_windows` scores the first N windows of `ppl_seqlen` tokens (null: all;
  the paper's numbers need all, ~147 windows and ~25 min per model for SmolLM2 on 2 CPU cores).
- `save: false` skips writing the checkpoint (sweeps that only want the metrics).
- `export: [gguf, gptq]` also writes those formats to `export/<format>/` (runner/exports.py, task=export's settings);
  a format that cannot hold the quantizer's output (gguf needs groupsize 32 and no act-order g_idx) is refused
  before anything runs.
- GPTQ calibration (`quantizer.calibration`, `nsamples`, `seqlen`, `seed`): runner/calibration.py. Calibrating on
  the text the quality check scores is refused.

Sweep-invariant work is cached under `paths.cache_dir`: the float model's perplexity (`ppl/`, keyed by the model's
checkpoint, tokenizer, dtype, device, the scored text, the window settings and the scoring code) and the calibration
windows (`calibration/`). Delete those folders to recompute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from models.atomic import write_text_atomic
from models.checkpoint import save_native
from models.llama import Transformer
from models.tokenizer import Tokenizer
from quant import QUANTIZERS, describe, quantize_model, quantizer
from quant.int4 import Int4WeightOnlyLinear
from quant.int8 import Int8WeightOnlyLinear
from runner import common, exports
from runner.calibration import calibration_windows, corpus_path
from runner.knobs import check, integer, within_context
from runner.perplexity import WIKITEXT2_TEST, perplexity, wikitext2_test_text
from runner.rundir import RunContext

log = logging.getLogger(__name__)

# Every numeric knob's type and range, checked before anything loads (runner/knobs.py); the quantizer's own knobs
# are checked by its record (quant/scheme.py).
KNOBS = {"ppl_seqlen": integer(lo=2), "ppl_windows": integer(lo=1, null=True), "ppl_batch_size": integer(lo=1)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model_key(cfg: DictConfig) -> dict:
    """What identifies the float model's weights without hashing them: the files actually read (checkpointer.path,
    or model.source as fetched into the cache; `common.checkpoint_path`), each by path, size and mtime, so a model
    replaced at the same path or source gets a new key even with model.sha256 null; or the random-init arguments
    and seed."""
    root = common.checkpoint_path(cfg)
    if root is not None:
        root = root.resolve()
        files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file())
        stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        return {"path": str(root), "source": cfg.model.source, "sha256": cfg.model.sha256, "files": stats}
    return {"args": OmegaConf.to_container(cfg.model.args, resolve=True), "seed": cfg.seed}


def _code_key() -> str:
    # The float perplexity also depends on the code that loads and runs the model: a fix there must not be hidden
    # behind a cached number.
    import models.checkpoint
    import models.llama
    import runner.perplexity

    files = [models.llama.__file__, models.checkpoint.__file__, common.__file__, runner.perplexity.__file__]
    gguf = sys.modules.get("models.gguf")
    if gguf is not None:
        files.append(gguf.__file__)
    return _sha256(b"".join(Path(f).read_bytes() for f in files))


def _perplexity(cfg: DictConfig, model: Transformer, tok: Tokenizer, text: str) -> tuple[float, int]:
    t = cfg.task
    return perplexity(model, tok, text, t.ppl_seqlen, t.ppl_windows, t.ppl_batch_size)


def _float_perplexity(
    cfg: DictConfig, ctx: RunContext, model: Transformer, tok: Tokenizer, text: str
) -> tuple[float, int]:
    """The float model's perplexity, computed once per model/text/settings and then read from paths.cache_dir."""
    t = cfg.task
    key = {
        "model": _model_key(cfg),
        "checkpointer": cfg.checkpointer.name,
        "dtype": cfg.model.dtype,
        "device": ctx.device.type,
        "tokenizer": _sha256(tok.tok.to_str().encode()),
        "text": _sha256(text.encode()),
        "seqlen": t.ppl_seqlen,
        "windows": t.ppl_windows,
        "batch_size": t.ppl_batch_size,
        "torch": torch.__version__,
        "code": _code_key(),
    }
    path = Path(cfg.paths.cache_dir).expanduser() / "ppl" / f"{_sha256(json.dumps(key).encode())}.json"
    if path.is_file():
        hit = json.loads(path.read_text())
        log.info("float perplexity %.4g from cache %s", hit["ppl"], path)
        return hit["ppl"], hit["windows_scored"]
    ppl, n = _perplexity(cfg, model, tok, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"ppl": ppl, "windows_scored": n, "key": key}, indent=2))
    return ppl, n


def _tensor_bytes(model: torch.nn.Module) -> int:
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


def _check_inputs(cfg: DictConfig) -> dict:
    """The validated quantizer record, or a ConfigError naming the bad key."""
    q = cfg.quantizer
    if q.name == "none":
        schemes = ", ".join(f"quantizer={name}" for name in QUANTIZERS if name != "none")
        raise common.ConfigError(f"task=quantize needs a quantizer: add one of {schemes}")
    check(cfg.task, "task", KNOBS)
    try:
        record = describe(OmegaConf.to_container(q, resolve=True))
    except ValueError as e:
        raise common.ConfigError(str(e)) from e
    formats = exports.check_chain(cfg.task.export, "task.export")
    for fmt in ("hf", "peft"):
        if fmt in formats:
            raise common.ConfigError(f"task.export=[{fmt}] cannot hold a quantized model: use gguf or gptq")
    problem = exports.gguf_record_problem(record) if "gguf" in formats else None
    if problem is not None:
        raise common.ConfigError(f"task.export=[gguf]: {problem}")
    if "gptq" in formats and record.get("quantize_head", "none") != "none":
        raise common.ConfigError(f"task.export=[gptq]: {exports.head_problem('gptq', record['quantize_head'])}")
    if quantizer(record).needs_calibration and cfg.task.ppl:
        calib = corpus_path(cfg)
        scored = common.data_path(cfg, WIKITEXT2_TEST).resolve()
        if calib == scored:
            raise common.ConfigError(
                f"quantizer.calibration={q.calibration} is {scored}, the text task.ppl scores; calibrate on other "
                "text (quantizer.calibration=c4) or turn the quality check off (task.ppl=false)"
            )
    return record


def _check_context(cfg: DictConfig, record: dict, context_len: int) -> None:
    """Windows longer than the model's context would run on positions it was never trained for: refused."""
    lengths = {"quantizer.seqlen": record.get("seqlen") if quantizer(record).needs_calibration else None}
    if cfg.task.ppl:
        lengths["task.ppl_seqlen"] = cfg.task.ppl_seqlen
    within_context(lengths, context_len)


def run(cfg: DictConfig, ctx: RunContext) -> dict[str, float]:
    record = _check_inputs(cfg)
    model, tok = common.load_model(cfg, apply_quantizer=False)
    if any(isinstance(m, Int4WeightOnlyLinear | Int8WeightOnlyLinear) for m in model.modules()):
        raise common.ConfigError(
            f"{cfg.checkpointer.path} is already quantized; task=quantize needs a float checkpoint (set checkpointer.path)"
        )
    _check_context(cfg, record, model.args.max_position_embeddings)
    metrics: dict[str, float] = {"quantize/float_bytes": float(_tensor_bytes(model))}

    # Calibration first: a problem with its data stops the run before the float model is scored.
    calib = calibration_windows(cfg, tok) if quantizer(record).needs_calibration else None
    text = wikitext2_test_text(cfg) if cfg.task.ppl else None
    if text is not None:
        ppl_float, _ = _float_perplexity(cfg, ctx, model, tok, text)
        metrics["quantize/ppl_float"] = ppl_float
        log.info("float model: WikiText-2 perplexity %.4g", ppl_float)

    t0 = time.perf_counter()
    model = quantize_model(model, record, calib)
    metrics["quantize/seconds"] = time.perf_counter() - t0
    metrics["quantize/model_bytes"] = float(_tensor_bytes(model))
    metrics["quantize/compression"] = metrics["quantize/float_bytes"] / metrics["quantize/model_bytes"]
    log.info("quantized with %s in %.1f s", record["name"], metrics["quantize/seconds"])

    if cfg.task.save:
        out = save_native(ctx.run_dir / "model", model, tok, record, common.resolved_yaml(cfg))
        ctx.add_artifact("model", out)
        log.info("wrote %s (load it with checkpointer=native checkpointer.path=%s)", out, out)
    exports.chain(exports.check_chain(cfg.task.export, "task.export"), ctx, model, tok, record, cfg.model.name)
    if text is not None:
        ppl, n = _perplexity(cfg, model, tok, text)
        metrics["quantize/ppl"] = ppl
        metrics["quantize/ppl_windows"] = float(n)
        log.info("quantized model: WikiText-2 perplexity %.4g over %d windows (float %.4g)", ppl, n, ppl_float)
    return metrics
