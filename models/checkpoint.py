"""Checkpointers: read and write model weights with their sidecars.

Three formats, picked by `checkpointer.name` (never guessed from file names):
- `gguf`: a llama.cpp GGUF file, read and dequantized in `models/gguf.py`.
- `hf`: an HF model directory: `config.json` + `model.safetensors` or sharded `model-0000x-of-0000y.safetensors`
  with `model.safetensors.index.json`; tokenizer files when present. The family comes from config.json's
  `model_type` (`args_from_hf_config`); Phi-3's fused `qkv_proj` / `gate_up_proj` are split into the q/k/v
  and gate/up linears every family shares (`from_hf_state_dict`), and fused again on export
  (`to_hf_state_dict`, with `hf_config` for config.json).
  A `quantization_config` in config.json (a GPTQ checkpoint) is read by `hf_quantization_config`; runner/common.py
  converts those tensors (quant/gptq_format.py).
- `native`: what this project writes, float or quantized: `model.safetensors`, `model_args.json`,
  `quantizer.json` (`{"name": "none"}` for float), tokenizer files and the resolved run `config.yaml`.
  Rebuilt from the sidecars alone.

Weights are read with safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.atomic import atomic_path
from models.llama import ARCHITECTURES, ModelArgs, Transformer
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


# --- HF config.json <-> ModelArgs ---------------------------------------------------------------------------


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """A filtered pass-through of an HF `config.json`, plus what its `model_type` implies (`_FAMILIES`)."""
    kind = cfg.get("model_type", "llama")
    if kind not in ARCHITECTURES:
        raise ValueError(
            f"config.json model_type {kind!r} is not supported ({', '.join(ARCHITECTURES)}); "
            "for Gemma 3 take the text-only Gemma3ForCausalLM checkpoints (model_type gemma3_text)"
        )
    known = {f.name for f in fields(ModelArgs)}
    d = {k: v for k, v in cfg.items() if k in known}
    d["model_type"] = kind
    d["hidden_act"] = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    d.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    d.setdefault("tie_word_embeddings", False)
    d.update(_hf_rope(cfg, kind))
    d["layer_types"] = _hf_layer_types(cfg, kind)
    if d["layer_types"] is None:
        d["sliding_window"] = None
    d.update(_FAMILIES[kind](cfg))
    return ModelArgs(**d)


def _hf_rope(cfg: dict, kind: str) -> dict:
    """rope_theta, rope_scaling, rope_local_base_freq and partial_rotary_factor from either config.json layout:
    transformers < 5 (rope_theta, rope_scaling, rope_local_base_freq) or >= 5 (`rope_parameters`, per layer type
    for Gemma 3)."""
    rp = cfg.get("rope_parameters") or {}
    full, local = (rp.get("full_attention"), rp.get("sliding_attention")) if "full_attention" in rp else (rp, None)
    full = full or {}
    gemma3 = kind == "gemma3_text"  # HF's defaults when absent: 1e6 global, 1e4 local
    theta = full.get("rope_theta", cfg.get("rope_theta", 1e6 if gemma3 else 10000.0))
    local_theta = (local or {}).get("rope_theta", cfg.get("rope_local_base_freq", 10000.0 if gemma3 else None))
    if local and local.get("rope_type", "default") != "default":
        raise ValueError(f"config.json: RoPE scaling on sliding layers ({local}) is not supported")
    skip = ("rope_theta", "partial_rotary_factor")
    scaling = {k: v for k, v in full.items() if k not in skip} if rp else cfg.get("rope_scaling")
    if scaling:
        scaling = dict(scaling)
        scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type", "default")
        if kind == "phi3" and scaling["rope_type"] in ("su", "yarn"):  # Phi-3's old names for longrope
            scaling["rope_type"] = "longrope"
        if scaling["rope_type"] in ("yarn", "longrope"):
            # Phi-3 keeps the pretraining length outside the scaling dict, and transformers prefers that one.
            orig = cfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
            scaling["original_max_position_embeddings"] = orig or cfg["max_position_embeddings"]
    if not scaling or scaling["rope_type"] == "default":
        scaling = None
    prf = full.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return dict(rope_theta=theta, rope_scaling=scaling, rope_local_base_freq=local_theta, partial_rotary_factor=prf)


def _hf_layer_types(cfg: dict, kind: str) -> list[str] | None:
    """Which layers slide, as transformers decides it per family; None when none does."""
    n, window = cfg["num_hidden_layers"], cfg.get("sliding_window")
    every = None  # a full-attention layer every `every` layers, the others sliding
    if cfg.get("layer_types"):
        types = list(cfg["layer_types"])
    elif kind == "gemma2":
        every = 2
    elif kind == "gemma3_text":
        every = cfg.get("sliding_window_pattern", 6)
    elif kind in ("qwen2", "qwen3") and cfg.get("use_sliding_window") and window:
        types = ["sliding_attention" if i >= cfg["max_window_layers"] else "full_attention" for i in range(n)]
    elif kind in ("mistral", "phi3") and window:
        types = ["sliding_attention"] * n
    else:
        return None
    if every is not None:
        types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    return types if "sliding_attention" in types else None


def _gemma(cfg: dict) -> dict:
    return dict(
        norm_plus_one=True,
        post_norms=True,
        embedding_multiplier=cfg["hidden_size"] ** 0.5,
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
    )


# What each HF family's config.json leaves implicit.
_FAMILIES = {
    "llama": lambda cfg: {},
    "mistral": lambda cfg: {},
    "qwen2": lambda cfg: dict(qkv_bias=True, attention_bias=False),
    "qwen3": lambda cfg: dict(qk_norm=True),
    "gemma2": _gemma,
    "gemma3_text": lambda cfg: dict(_gemma(cfg), qk_norm=True),
    "phi3": lambda cfg: {},
}


# Fused HF tensors inside `model.layers.N.` -> the linears they stack along the output rows (Phi-3's checkpoints;
# transformers' Phi3Attention slices qkv_proj as q, k, v and Phi3MLP chunks gate_up_proj as gate, up).
_FUSED = {
    "phi3": {
        "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    }
}


def _rows(args: ModelArgs, part: str) -> int:
    """Output rows of one part of a fused tensor."""
    q, kv = args.num_attention_heads * args.dim_head, args.num_key_value_heads * args.dim_head
    i = args.intermediate_size
    return {
        "self_attn.q_proj": q,
        "self_attn.k_proj": kv,
        "self_attn.v_proj": kv,
        "mlp.gate_proj": i,
        "mlp.up_proj": i,
    }[part]


def from_hf_state_dict(args: ModelArgs, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF state dict with this model's keys: each fused tensor of the family (`_FUSED`) split into its parts."""
    fused = _FUSED.get(args.model_type, {})
    if not fused:
        return sd
    out = {}
    for key, t in sd.items():
        stem, _, suffix = key.rpartition(".")  # model.layers.3.self_attn.qkv_proj, weight
        prefix, _, name = stem.partition(".layers.")
        layer, _, rest = name.partition(".")
        if rest not in fused:
            out[key] = t
            continue
        parts = fused[rest]
        sizes = [_rows(args, p) for p in parts]
        if t.shape[0] != sum(sizes):
            raise ValueError(f"tensor {key!r} has {t.shape[0]} rows, ModelArgs need {sum(sizes)} ({'+'.join(parts)})")
        for p, piece in zip(parts, t.split(sizes), strict=True):
            out[f"{prefix}.layers.{layer}.{p}.{suffix}"] = piece.contiguous()
    return out


def to_hf_state_dict(args: ModelArgs, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This model's float state dict with the family's HF keys: the parts of each fused tensor (`_FUSED`)
    concatenated back (Phi-3's qkv_proj, gate_up_proj); every other family's keys are HF's already."""
    fused = _FUSED.get(args.model_type, {})
    if not fused:
        return dict(sd)
    out = dict(sd)
    for i in range(args.num_hidden_layers):
        for whole, parts in fused.items():
            for suffix in ("weight", "bias"):
                keys = [f"model.layers.{i}.{p}.{suffix}" for p in parts]
                present = [k in out for k in keys]
                if not any(present):
                    continue
                if not all(present):
                    missing = keys[present.index(False)]
                    raise ValueError(
                        f"cannot fuse {whole} for an HF {args.model_type} export: {missing!r} is missing "
                        "(a quantized layer has no float weight; export the float or dequantized model)"
                    )
                out[f"model.layers.{i}.{whole}.{suffix}"] = torch.cat([out.pop(k) for k in keys])
    return out


def hf_config(args: ModelArgs) -> dict:
    """config.json for `args` as transformers reads it for the family (`model_type`, `architectures`), in the
    classic layout (rope_theta / rope_scaling) that transformers 4.x and 5.x both load."""
    kind = "qwen2" if args.qkv_bias else args.model_type  # model_args.json from before model_type: Qwen2 had qkv_bias
    a = args
    cfg = dict(
        architectures=[ARCHITECTURES[kind]],
        model_type=kind,
        vocab_size=a.vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads,
        max_position_embeddings=a.max_position_embeddings,
        rms_norm_eps=a.rms_norm_eps,
        rope_theta=a.rope_theta,
        rope_scaling=a.rope_scaling,
        tie_word_embeddings=a.tie_word_embeddings,
        hidden_act=a.hidden_act,
    )
    if a.head_dim is not None:
        cfg["head_dim"] = a.head_dim
    if kind in ("llama", "qwen3", "gemma2", "gemma3_text"):
        cfg["attention_bias"] = a.attention_bias
    if a.sliding_window is not None:
        cfg.update(sliding_window=a.sliding_window, layer_types=[a.layer_type(i) for i in range(a.num_hidden_layers)])
        if kind in ("qwen2", "qwen3"):
            cfg.update(use_sliding_window=True, max_window_layers=cfg["layer_types"].index("sliding_attention"))
    elif kind in ("gemma2", "gemma3_text", "qwen2", "qwen3", "mistral", "phi3"):
        cfg["sliding_window"] = None
    if kind in ("gemma2", "gemma3_text"):
        cfg.update(
            hidden_activation=a.hidden_act,
            query_pre_attn_scalar=a.query_pre_attn_scalar,
            attn_logit_softcapping=a.attn_logit_softcapping,
            final_logit_softcapping=a.final_logit_softcapping,
        )
    if kind == "gemma3_text":
        cfg["rope_local_base_freq"] = a.rope_local_base_freq
    if kind == "phi3":
        cfg["partial_rotary_factor"] = a.partial_rotary_factor
        if a.rope_scaling is not None and "original_max_position_embeddings" in a.rope_scaling:
            cfg["original_max_position_embeddings"] = a.rope_scaling["original_max_position_embeddings"]
    return cfg


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
        try:
            args = args_from_hf_config(_read_json(path / "config.json"))
            sd = from_hf_state_dict(args, _read_hf_weights(path))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        return args, sd, _tokenizer_or_none(path), {"name": "none"}
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


def _generation_config(tokenizer: Tokenizer) -> dict:
    """generation_config.json: the ids that end a reply (every stop id, as HF lists them) and the defaults."""
    stops = sorted(tokenizer.stop_ids)
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": stops[0] if len(stops) == 1 else stops,
        "pad_token_id": tokenizer.pad_id,
    }


def _shards(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + n
    shards.append(cur)
    return shards


def _hf_tensors(model: Transformer, extra_tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The model's tensors, with the modules `extra_tensors` names replaced by those tensors (their float `bias`
    kept unless `extra_tensors` gives one). What is left must be the float architecture's own keys."""
    sd = _contiguous_state(model)
    if extra_tensors:
        replaced = {k.rpartition(".")[0] for k in extra_tensors}
        sd = {k: v for k, v in sd.items() if k.rpartition(".")[0] not in replaced or k.endswith(".bias")}
        sd.update({k: v.detach().contiguous() for k, v in extra_tensors.items()})
        return sd
    with torch.device("meta"):
        expected = Transformer(model.args).state_dict()
    foreign = [k for k in sd if k not in expected]
    if foreign:
        raise ValueError(
            f"the model holds quantized tensors ({foreign[0]!r}), which an HF float checkpoint cannot: "
            "export the float model, or a quantized format"
        )
    return sd


def save_hf(
    directory: str | Path,
    model: Transformer,
    tokenizer: Tokenizer | None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    quantization_config: dict | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write an HF-layout directory that transformers loads: config.json, safetensors shards of at most
    `max_shard_bytes` (None: MAX_SHARD_BYTES) with model.safetensors.index.json when there are several, the tokenizer
    files and generation_config.json. Written to a temporary sibling and renamed, so it is never half-written.

    A quantized format (GPTQ) passes `extra_tensors`, the tensors of its quantized linears under HF keys
    (`...q_proj.qweight`, ...): they replace everything the model holds for those modules, and
    `quantization_config` goes into config.json. Without them, a model holding quantized modules is a ValueError.
    """
    directory = Path(directory)
    sd = to_hf_state_dict(model.args, _hf_tensors(model, extra_tensors))  # Phi-3: fused qkv / gate_up again
    limit = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes

    def write(d: Path):
        cfg = hf_config(model.args)
        cfg["torch_dtype"] = str(model.model.norm.weight.dtype).removeprefix("torch.")
        if quantization_config is not None:
            cfg["quantization_config"] = quantization_config
        if tokenizer is not None:
            cfg.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
            tokenizer.save(d)
            (d / "generation_config.json").write_text(json.dumps(_generation_config(tokenizer), indent=2))
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        shards = _shards(sd, limit)
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
