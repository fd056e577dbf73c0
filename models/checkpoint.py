"""Checkpointers: read and write model weights with their sidecars.

Three formats, picked by `checkpointer.name` (never guessed from file names):
- `gguf`: a llama.cpp GGUF file, read and dequantized in `models/gguf.py`.
- `hf`: an HF model directory: `config.json` + `model.safetensors` or sharded `model-0000x-of-0000y.safetensors`
  with `model.safetensors.index.json`; tokenizer files when present. A `quantization_config` in config.json (a GPTQ
  checkpoint) is read by `hf_quantization_config`; runner/common.py converts those tensors (quant/gptq_format.py).
- `native`: what this project writes, float or quantized: `model.safetensors`, `model_args.json`,
  `quantizer.json` (`{"name": "none"}` for float), tokenizer files and the resolved run `config.yaml`.
  Rebuilt from the sidecars alone.

Weights are read with safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.atomic import atomic_path
from models.llama import ModelArgs, Transformer
from models.tokenizer import Tokenizer

FORMATS = ("gguf", "hf", "native")
MAX_SHARD_BYTES = 2 * 1024**3


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: unreadable safetensors file ({e}); re-download or re-write the checkpoint") from e


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a checkpoint directory needs it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _tokenizer_or_none(d: Path) -> Tokenizer | None:
    return Tokenizer.from_dir(d) if (d / "tokenizer.json").is_file() else None


def _read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (d / shard).is_file():
                raise FileNotFoundError(f"{d / shard}: shard listed in {index} is missing")
            sd.update(_read_safetensors(d / shard))
        return sd
    single = d / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{single}: no model.safetensors (or sharded index) in {d}")
    return _read_safetensors(single)


def detect_format(path: Path) -> str | None:
    """The format `path` holds, from its contents (never its name): gguf (the file's magic), native (a directory
    with model_args.json), hf (a directory with config.json); None when it is none of them."""
    if path.is_file():
        with open(path, "rb") as f:
            return "gguf" if f.read(4) == b"GGUF" else None
    if (path / "model_args.json").is_file():
        return "native"
    if (path / "config.json").is_file():
        return "hf"
    return None


def load_checkpoint(kind: str, path: str | Path):
    """Return (ModelArgs, state_dict, Tokenizer | None, quantizer: dict) for a checkpoint of format `kind`."""
    path = Path(path)
    if kind not in FORMATS:
        raise ValueError(f"checkpointer.name={kind!r} is unknown; valid: {', '.join(FORMATS)}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found; set checkpointer.path to an existing {kind} checkpoint")
    found = detect_format(path)
    if found is not None and found != kind:
        raise ValueError(f"{path} is a {found} checkpoint, not {kind}; load it with checkpointer={found}")
    if kind == "gguf":
        from models.gguf import load_gguf  # the gguf library is only needed for this format

        if not path.is_file():
            raise ValueError(f"{path}: checkpointer=gguf expects a .gguf file, got a directory")
        args, sd, tok = load_gguf(path)
        return args, sd, tok, {"name": "none"}
    if not path.is_dir():
        raise ValueError(f"{path}: checkpointer={kind} expects a directory")
    if kind == "hf":
        args = ModelArgs.from_hf_config(_read_json(path / "config.json"))
        return args, _read_hf_weights(path), _tokenizer_or_none(path), {"name": "none"}
    args = ModelArgs.from_dict(_read_json(path / "model_args.json"))
    quantizer = _read_json(path / "quantizer.json")
    return args, _read_safetensors(path / "model.safetensors"), _tokenizer_or_none(path), quantizer


def hf_quantization_config(path: str | Path) -> dict | None:
    """The `quantization_config` of an HF directory's config.json (a pre-quantized checkpoint, e.g. GPTQ), or None
    for a float one. What it means is quant/'s business (quant/gptq_format.py); this only reads it."""
    qc = _read_json(Path(path) / "config.json").get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise ValueError(f"{Path(path) / 'config.json'}: quantization_config is not a JSON object")
    return qc


def check_and_load(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str | Path) -> None:
    """load_state_dict with errors that name the file and the tensor."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]!r}: the checkpoint is not for this architecture")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict(sd, assign=True)


def _contiguous_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _atomic_dir_write(directory: Path, write) -> None:
    """Write into `directory.tmp`, then rename, so a crash never leaves a half-written checkpoint."""
    with atomic_path(directory, directory=True) as tmp:
        write(tmp)


def save_hf(directory: str | Path, model: Transformer, tokenizer: Tokenizer | None) -> Path:
    """Write an HF-layout directory (config.json, safetensors shards of at most 2 GiB, tokenizer)."""
    directory = Path(directory)
    a = model.args

    def write(d: Path):
        cfg = {k: v for k, v in a.to_dict().items() if k not in ("qkv_bias", "head_dim") or v}
        cfg.update(
            architectures=["Qwen2ForCausalLM" if a.qkv_bias else "LlamaForCausalLM"],
            model_type="qwen2" if a.qkv_bias else "llama",
            torch_dtype=str(model.model.embed_tokens.weight.dtype).removeprefix("torch."),
            hidden_act="silu",
        )
        cfg.pop("qkv_bias", None)
        if a.head_dim is None:
            cfg.pop("head_dim", None)
        if tokenizer is not None:
            cfg.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
            tokenizer.save(d)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        sd = _contiguous_state(model)
        shards, cur, size = [], {}, 0
        for k, v in sd.items():
            n = v.numel() * v.element_size()
            if cur and size + n > MAX_SHARD_BYTES:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + n
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], str(d / "model.safetensors"), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(d / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())}}
        index["weight_map"] = weight_map
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    _atomic_dir_write(directory, write)
    return directory


def save_native(
    directory: str | Path,
    model: Transformer,
    tokenizer: Tokenizer | None,
    quantizer: dict | None,
    run_config_yaml: str | None = None,
) -> Path:
    """Write this project's self-describing checkpoint directory (float or quantized)."""
    directory = Path(directory)

    def write(d: Path):
        save_file(_contiguous_state(model), str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "model_args.json").write_text(json.dumps(model.args.to_dict(), indent=2))
        (d / "quantizer.json").write_text(json.dumps(quantizer or {"name": "none"}, indent=2))
        if tokenizer is not None:
            tokenizer.save(d)
        if run_config_yaml is not None:
            (d / "config.yaml").write_text(run_config_yaml)

    _atomic_dir_write(directory, write)
    return directory
