"""What two or more stages use: the run wrapper (status.json, metrics), model loading, paths, device and dtype."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from models.atomic import write_text_atomic
from models.checkpoint import check_and_load, load_checkpoint
from models.llama import ModelArgs, Transformer, rope_frequencies
from models.tokenizer import Tokenizer
from runner.logging import NoOpLogger, build_logger

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """Bad input: the message is one line naming the key or file and the fix."""


_logger = NoOpLogger()


# --- run directory and metrics ---------------------------------------------------------------------------------
def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def log_metrics(metrics: dict, step: int) -> None:
    """Append one step of metrics to metrics.jsonl and forward it to the active logger (wandb or none)."""
    with open(run_dir() / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    _logger.log(metrics, step)


def _write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("lmrunner", "torch", "torchao", "lm_eval", "hydra-core", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def run_stage(cfg: DictConfig, stage_run) -> dict:
    """Run one stage inside its run directory: status.json before and after, metrics.json, logger cleanup.

    Bad input (ConfigError, missing files, values out of range) ends with one line on stderr and exit code 1;
    anything else also leaves its traceback in traceback.txt. HYDRA_FULL_ERROR=1 re-raises instead.
    In a multirun a failed job returns {} after that line, so the other jobs still run.
    """
    global _logger
    hc = HydraConfig.get()
    out = run_dir()
    out.mkdir(parents=True, exist_ok=True)
    multirun = hc.mode == RunMode.MULTIRUN
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 writes the run's files
    start = time.time()
    status = {
        "status": "running",
        "task": cfg.task.name,
        "error": None,
        "start_time": dt.datetime.fromtimestamp(start).isoformat(),
        "end_time": None,
        "duration_s": None,
        "overrides": list(hc.overrides.task),
        "versions": _versions(),
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }
    if rank == 0:
        _write_json(out / "status.json", status)
    failed = True
    error = None
    try:
        torch.manual_seed(cfg.seed)
        group = Path(hc.sweep.dir).name if multirun else None
        _logger = build_logger(cfg, out, group, f"{cfg.task.name}-{out.name}")
        metrics = stage_run(cfg)
        if rank == 0:
            _write_json(out / "metrics.json", metrics)
        _logger.summary(metrics)
        failed = False
        return metrics
    except (KeyboardInterrupt, Exception) as e:  # noqa: B902 - record every failure, then report it below
        error = e
        status["error"] = f"{type(e).__name__}: {e}" if not isinstance(e, ConfigError) else str(e)
        (out / ("traceback.txt" if rank == 0 else f"traceback.rank{rank}.txt")).write_text(traceback.format_exc())
    finally:
        end = time.time()
        status.update(
            status="failed" if failed else "ok",
            end_time=dt.datetime.fromtimestamp(end).isoformat(),
            duration_s=round(end - start, 3),
        )
        if rank == 0:
            _write_json(out / "status.json", status)
        try:
            _logger.finish(failed=failed)
        finally:
            _logger = NoOpLogger()
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"error: {status['error']} (run directory: {out})", file=sys.stderr)
    if multirun and not isinstance(error, KeyboardInterrupt):
        # The sweep goes on: a raised error would make Hydra's BasicSweeper stop after this batch and skip the
        # end-of-sweep callback (runner/callbacks.py), which lists this failure from status.json and exits 1.
        return {}
    sys.exit(130 if isinstance(error, KeyboardInterrupt) else 1)


# --- devices, dtypes, paths --------------------------------------------------------------------------------------
def device(cfg: DictConfig) -> torch.device:
    d = cfg.device
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d not in ("cpu", "cuda"):
        raise ConfigError(f"device={d!r} is not valid; use cpu, cuda or auto")
    if d == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu")
    return torch.device(d)


def dtype(cfg: DictConfig) -> torch.dtype:
    if cfg.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={cfg.model.dtype!r} is not valid; use one of {', '.join(DTYPES)}")
    return DTYPES[cfg.model.dtype]


def data_path(cfg: DictConfig, relpath: str, key: str | None = None) -> Path:
    """A file under paths.data_dir (absolute paths pass through), with a clear error when it is not there.
    `key` names the config key the path came from, for the error."""
    p = Path(relpath).expanduser()
    given = f" ({key}={relpath})" if key else ""
    if p.is_absolute():
        if not p.exists():
            raise ConfigError(f"{p}: data file not found{given}; fix the path")
        return p
    p = Path(cfg.paths.data_dir).expanduser().resolve() / p
    if not p.exists():
        raise ConfigError(
            f"{p}: data file not found{given}; point paths.data_dir at the data root (now {cfg.paths.data_dir}) "
            "or set LMRUNNER_DATA_DIR"
        )
    return p


@dataclass(frozen=True)
class Weights:
    """Where the model's weights come from. At most one field is set; neither means random init from model.args
    with cfg.seed."""

    path: Path | None = None  # checkpointer.path: a local checkpoint
    source: str | None = None  # model.source: fetched into paths.cache_dir (pinned by model.sha256)


def resolve(cfg: DictConfig) -> Weights:
    """The one precedence for the weights: checkpointer.path, else model.source, else random init."""
    if cfg.checkpointer.path is not None:
        return Weights(path=Path(cfg.checkpointer.path).expanduser())
    return Weights(source=cfg.model.source)


def checkpoint_path(cfg: DictConfig) -> Path | None:
    """The checkpoint to load (`resolve`): checkpointer.path, else model.source fetched into the cache; None for
    random init."""
    weights = resolve(cfg)
    if weights.source is None:
        return weights.path
    from models.sources import SourceError, resolve_source

    try:
        return resolve_source(weights.source, Path(cfg.paths.cache_dir).expanduser(), cfg.model.sha256)
    except SourceError as e:
        raise ConfigError(str(e)) from e


def load_model(cfg: DictConfig, apply_quantizer: bool = True) -> tuple[Transformer, Tokenizer]:
    """Build the model of cfg.model from its checkpoint (or random init), in model.dtype on `device`.

    A quantized native checkpoint is rebuilt from its quantizer.json (two phases: quantized shells, then
    assign the saved tensors). With `apply_quantizer`, a round-to-nearest cfg.quantizer is applied after loading.
    """
    dev, dt_ = device(cfg), dtype(cfg)
    qrecord = _on_the_fly_quantizer(cfg) if apply_quantizer else None  # a bad quantizer stops before the load
    path = checkpoint_path(cfg)
    if path is None:
        if cfg.model.args is None:
            raise ConfigError(f"model={cfg.model.name} has neither source nor args; set checkpointer.path=PATH")
        args = ModelArgs.from_dict(OmegaConf.to_container(cfg.model.args, resolve=True))
        torch.manual_seed(cfg.seed)
        model, tok, saved_q = Transformer(args), Tokenizer.bytes(), {"name": "none"}
    else:
        try:
            args, sd, tok, saved_q = load_checkpoint(cfg.checkpointer.name, path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from e
        if tok is None:
            raise ConfigError(f"{path}: no tokenizer.json next to the weights; add the model's tokenizer files")
        with torch.device("meta"):
            model = Transformer(args)
        if saved_q["name"] != "none":
            from quant import prepare_for_load

            prepare_for_load(model, saved_q)
        try:
            check_and_load(model, sd, path)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        model.inv_freq = rope_frequencies(args)
    if qrecord is not None and qrecord["name"] != "none":
        if saved_q["name"] != "none":
            raise ConfigError(
                f"{path} is already quantized ({saved_q['name']}); use quantizer=none to load it as it is"
            )
        from quant import quantize_model

        model = _to(model, dev, dt_)
        model = quantize_model(model, qrecord)
        return model.eval(), tok
    return _to(model, dev, dt_).eval(), tok


def _on_the_fly_quantizer(cfg: DictConfig) -> dict:
    """cfg.quantizer validated for quantizing at load time; ConfigError when it is bad or needs calibration."""
    from quant import describe, quantizer

    try:
        record = describe(OmegaConf.to_container(cfg.quantizer, resolve=True))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if quantizer(record).needs_calibration:
        raise ConfigError(
            f"quantizer={record['name']} needs calibration, which only task=quantize runs: use task=quantize "
            f"quantizer={record['name']}, then load the result with checkpointer=native checkpointer.path=<run>/model"
        )
    return record


def _to(model: Transformer, dev: torch.device, dt_: torch.dtype) -> Transformer:
    # Only parameters take the model dtype: quantized scales/zeros (fp32 buffers) and RoPE frequencies keep theirs.
    model = model.to(dev)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dt_:
            p.data = p.data.to(dt_)
    return model


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


# --- paper-protocol perplexity (shared by task=quantize's quality check and task=eval's wikitext2_ppl) -------------
WIKITEXT2_TEST = "wikitext2/wiki.test.raw"


def wikitext2_test_text(cfg: DictConfig) -> str:
    """WikiText-2 (raw) test split as the GPTQ paper scores it: rows joined with blank lines ("\\n\\n".join).

    The local file is rebuilt from the HF rows minus the blank ones (see shared/data/PROVENANCE.md), so each line
    gets back its trailing newline, as HF rows carry it; the dropped blank rows cannot be restored.
    """
    lines = data_path(cfg, WIKITEXT2_TEST).read_text(encoding="utf-8").splitlines()
    return "\n\n".join(line + "\n" for line in lines)


@torch.no_grad()
def perplexity(
    model: Transformer, tokenizer: Tokenizer, text: str, seqlen: int, max_windows: int | None, batch_size: int = 1
) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping `seqlen`-token windows of the whole text (GPTQ paper protocol).

    The text is tokenized once, without BOS; the tail that does not fill a window is dropped, as the reference does.
    Returns (perplexity, number of windows scored).
    """
    from tqdm import tqdm

    ids = torch.tensor(tokenizer.encode(text, bos=False), dtype=torch.long)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ConfigError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}; lower the seqlen")
    windows = ids[: n * seqlen].view(n, seqlen)  # [N, T]
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, n, batch_size), desc="perplexity", leave=False):
        x = windows[i : i + batch_size].to(dev)
        logits = model(x).float()  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += x[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count))), n
