"""Getting a stage its model: where the weights come from (`resolve`), device and dtype, data paths, loading
(`load_model`), and `ConfigError`, the one-line error every stage raises for bad input.

The run wrapper and a stage's `RunContext` are in runner/rundir.py; paper-protocol perplexity in runner/perplexity.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from models.checkpoint import check_and_load, hf_quantization_config, load_checkpoint
from models.llama import ModelArgs, Transformer
from models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """Bad input: the message is one line naming the key or file and the fix."""


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


def read_text(path: Path, key: str | None = None) -> str:
    """A UTF-8 text file, with a one-line ConfigError naming the file (and `key`) when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        given = f" ({key})" if key else ""
        raise ConfigError(
            f"{path}{given}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8"
        ) from None


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

    key = (weights.source, str(Path(cfg.paths.cache_dir).expanduser()))
    # An unpinned source resolves to the same local path every time: resolved once per process, so a hub snapshot
    # is not fetched again for quantize's cache key. A pinned one is checked against model.sha256 on every call.
    if cfg.model.sha256 is not None or key not in _RESOLVED:
        try:
            _RESOLVED[key] = resolve_source(weights.source, Path(key[1]), cfg.model.sha256)
        except SourceError as e:
            raise ConfigError(str(e)) from e
    return _RESOLVED[key]


_RESOLVED: dict[tuple[str, str], Path] = {}  # (model.source, paths.cache_dir) -> the local path it resolved to


def load_model(cfg: DictConfig, apply_quantizer: bool = True) -> tuple[Transformer, Tokenizer]:
    """Build the model of cfg.model from its checkpoint (or random init), in model.dtype on `device`.

    A quantized native checkpoint is rebuilt from its quantizer.json (two phases: quantized shells, then
    assign the saved tensors); an HF GPTQ checkpoint (config.json with quantization_config) the same way, its
    tensors converted to our int4 modules' first. With `apply_quantizer`, a round-to-nearest cfg.quantizer is
    applied after loading.
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
        if cfg.checkpointer.name == "hf":
            sd, saved_q = _hf_prequantized(path, sd, model)
        if saved_q["name"] != "none":
            from quant import prepare_for_load

            prepare_for_load(model, saved_q)
        try:
            check_and_load(model, sd, path)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        model.init_rope()
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


def _hf_prequantized(path: Path, sd: dict, model: Transformer) -> tuple[dict, dict]:
    """(state dict, quantizer record) of an HF directory: as read for a float one; a GPTQ checkpoint's tensors
    (config.json's quantization_config) converted to our int4 modules' (quant/gptq_format.py)."""
    try:
        qc = hf_quantization_config(path)
        if qc is None:
            packed = next((k for k in sd if k.endswith(".qweight")), None)
            if packed is not None:
                raise ConfigError(
                    f"{path}: {packed} is a packed quantized tensor but config.json has no quantization_config; add "
                    "it there (older AutoGPTQ directories keep it in quantize_config.json)"
                )
            return sd, {"name": "none"}
        from quant.gptq_format import from_gptq_checkpoint

        return from_gptq_checkpoint(sd, qc, model)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e


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
