"""Writing a loaded model in the formats other tools load (HF, PEFT, GGUF, GPTQ): what task=export runs, and what
task=quantize / task=finetune run after their own work when `task.export` lists formats.

    write("gguf", model, tok, record, out_dir, options, name)   # -> metrics; out_dir appears whole or not at all

- `hf`: models.checkpoint.save_hf (config.json, safetensors shards, tokenizer, generation_config.json) of a float
  model; LoRA adapters are merged first.
- `peft`: the LoRA adapters alone, as PEFT writes them (models.lora.save_peft).
- `gguf`: models.gguf_write. Float tensors in `options.gguf_float`; int4 decoder linears as llama.cpp blocks where
  the map is exact (`q4_tensors`): asymmetric groups of 32 are Q4_1 (d = scale, m = -scale * zero), symmetric ones
  (zero 8) Q4_0 (d = scale); d and m are rounded to fp16. Other group sizes and act-order groups (g_idx) are refused,
  or rounded again on groups of 32 (`requantize`) when the user asks.
- `gptq`: the quantized linears as quant.gptq_format writes them, in an HF directory with quantization_config.
A model the format cannot hold is a one-line ConfigError before anything is written.
"""

from __future__ import annotations

import importlib.resources
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import LlamaFileType
from omegaconf import DictConfig, OmegaConf

from models.atomic import atomic_path
from models.checkpoint import save_hf
from models.gguf_write import FLOAT_TYPES, Q4Blocks, write_gguf
from models.llama import Transformer
from models.lora import LoRALinear, merge_lora, save_peft
from models.tokenizer import Tokenizer
from quant.int4 import Int4WeightOnlyLinear, rtn_quantize, unpack_int4
from quant.int8 import Int8WeightOnlyLinear
from runner.common import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("hf", "peft", "gguf", "gptq")
GGUF_GROUP = 32  # elements per Q4_0 / Q4_1 block


@dataclass(frozen=True)
class Options:
    """The export knobs (conf/task/export.yaml)."""

    gguf_float: str  # f16 | bf16 | f32: the GGUF type of float 2-D tensors
    max_shard_mb: float  # hf / gptq: largest safetensors shard
    requantize: bool  # gguf: round int4 weights again on groups of 32 when their groups are not 32 columns

    @classmethod
    def from_task(cls, task: DictConfig) -> Options:
        if task.gguf_float not in FLOAT_TYPES:
            raise ConfigError(f"task.gguf_float={task.gguf_float!r} is not valid; use one of {', '.join(FLOAT_TYPES)}")
        return cls(task.gguf_float, task.max_shard_mb, task.requantize)


def default_options() -> Options:
    """conf/task/export.yaml's values: the options of the exports that quantize and finetune chain."""
    return Options.from_task(OmegaConf.load(importlib.resources.files("conf") / "task" / "export.yaml"))


def check_format(fmt: str, key: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"{key}={fmt!r} is not an export format; valid: {', '.join(FORMATS)}")


def _lora_layers(model: Transformer) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _quantized(model: Transformer) -> list[tuple[str, torch.nn.Module]]:
    """The decoder's quantized linears (quant/int4.py, quant/int8.py storage)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Int4WeightOnlyLinear | Int8WeightOnlyLinear)]


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())


def write(
    fmt: str,
    model: Transformer,
    tok: Tokenizer,
    record: dict,
    out: Path,
    options: Options,
    name: str,
    base_model: str | None = None,
) -> Path:
    """Write `model` in format `fmt` to the directory `out` (replaced whole, never half-written); return the path
    of the written model (the .gguf file for gguf). `record` is the model's quantizer record (quantizer.json),
    `base_model` the base a LoRA adapter belongs to (peft's base_model_name_or_path)."""
    check_format(fmt, "task.format")
    lora = _lora_layers(model)
    if fmt == "peft":
        if not lora:
            raise ConfigError(
                "task.format=peft writes a LoRA adapter and this model has none: set task.adapter=<finetune run>/adapter "
                "(a task.method=lora run)"
            )
        with atomic_path(out, directory=True) as tmp:
            save_peft(tmp, model, base_model)
        return out
    if lora:
        merge_lora(model)
    if fmt in ("gguf", "gptq") and record.get("quantize_head", "none") != "none":
        raise ConfigError(head_problem(fmt, record["quantize_head"]))
    quantized = _quantized(model)
    if fmt == "hf":
        if quantized:
            raise ConfigError(
                f"task.format=hf writes float weights and this model is quantized ({record['name']}: "
                f"{quantized[0][0]}): use task.format=gptq or gguf, or export the float model"
            )
        return save_hf(out, model, tok, max_shard_bytes=int(options.max_shard_mb * 2**20))
    if fmt == "gptq":
        return _write_gptq(model, tok, record, out, options)
    tensors, file_type = gguf_tensors(model, options.gguf_float)
    qname = {LlamaFileType.MOSTLY_Q4_0: "Q4_0", LlamaFileType.MOSTLY_Q4_1: "Q4_1"}.get(file_type)
    with atomic_path(out, directory=True) as tmp:
        target = tmp / f"{name}-{qname or options.gguf_float.upper()}.gguf"
        try:
            write_gguf(target, model.args, tensors, tok, name, options.gguf_float, file_type)
        except ValueError as e:  # a tokenizer llama.cpp has no name for
            raise ConfigError(str(e)) from e
    return out / target.name


def _write_gptq(model: Transformer, tok: Tokenizer, record: dict, out: Path, options: Options) -> Path:
    if not _quantized(model):
        raise ConfigError(
            "task.format=gptq writes an int4 model and this one is float: export a task=quantize quantizer=gptq run's "
            "model/ (checkpointer=native checkpointer.path=<run>/model)"
        )
    from quant.gptq_format import to_gptq_checkpoint  # the GPTQ-format tensors (qweight, qzeros, scales, g_idx)

    try:
        tensors, quantization_config = to_gptq_checkpoint(model, record)
    except ValueError as e:
        raise ConfigError(f"task.format=gptq: {e}") from e
    return save_hf(
        out,
        model,
        tok,
        extra_tensors=tensors,
        quantization_config=quantization_config,
        max_shard_bytes=int(options.max_shard_mb * 2**20),
    )


# --- GGUF ------------------------------------------------------------------------------------------------------


def _gguf_problem(name: str, m: torch.nn.Module) -> str | None:
    """Why module `name` has no exact llama.cpp block form, with the fix; None when it has one."""
    if not isinstance(m, Int4WeightOnlyLinear):
        return (
            f"{name} is {type(m).__name__}, which task.format=gguf does not map to a llama.cpp type: export the float "
            "model, or quantize it with quantizer=int4_wo or gptq and quantizer.groupsize=32"
        )
    if m.groupsize != GGUF_GROUP:
        return (
            f"{name} is int4 with groups of {m.groupsize} columns and llama.cpp's Q4_0/Q4_1 blocks hold "
            f"{GGUF_GROUP}: quantize with quantizer.groupsize={GGUF_GROUP}, or set task.requantize=true"
        )
    if m.g_idx is not None:
        return (
            f"{name} has act-order groups (g_idx), which llama.cpp's contiguous blocks cannot hold: quantize with "
            "quantizer.static_groups=true, or set task.requantize=true"
        )
    if m.in_features % GGUF_GROUP:
        return f"{name} has {m.in_features} input columns, not a multiple of {GGUF_GROUP}: export the float model"
    return None


def head_problem(fmt: str, head: str) -> str:
    """Why a model with a quantized output head (quant/head.py) cannot be written as `fmt`, with the fix."""
    return (
        f"task.format={fmt} writes the output head as float and this model's head is quantized "
        f"(quantizer.quantize_head={head}): quantize with quantizer.quantize_head=none for this export"
    )


def gguf_record_problem(record: dict) -> str | None:
    """`gguf_problem` from a quantizer record, before quantizing (quantize's task.export=[gguf])."""
    if record.get("quantize_head", "none") != "none":
        return head_problem("gguf", record["quantize_head"])
    if record["name"] == "int8_wo":
        return "int8_wo weights have no llama.cpp map here: use quantizer=int4_wo or gptq with quantizer.groupsize=32"
    if record["name"] == "none":
        return None
    if record["groupsize"] != GGUF_GROUP:
        return (
            f"quantizer.groupsize={record['groupsize']}, and llama.cpp's Q4_0/Q4_1 blocks hold groups of {GGUF_GROUP}: "
            f"set quantizer.groupsize={GGUF_GROUP}"
        )
    if record.get("act_order") and not record.get("static_groups"):
        return "act-order groups (g_idx) do not fit llama.cpp's contiguous blocks: set quantizer.static_groups=true"
    return None


def gguf_problem(model: Transformer) -> str | None:
    """The first reason the model's int4 weights cannot be written exactly as llama.cpp blocks; None if they can."""
    return next((p for n, m in _quantized(model) if (p := _gguf_problem(n, m)) is not None), None)


def requantizable(model: Transformer) -> bool:
    """Whether `requantize` can give every quantized linear a block form (int4 ones only)."""
    return all(isinstance(m, Int4WeightOnlyLinear) for _, m in _quantized(model))


def requantize(model: Transformer) -> Transformer:
    """Round every int4 linear that has no exact block form again, on groups of 32 (round-to-nearest of its
    dequantized weight, symmetric when its zeros are all 8), in place. The weights change: the caller scores it."""
    for name, m in _quantized(model):
        if isinstance(m, Int4WeightOnlyLinear) and _gguf_problem(name, m) is not None:
            sym = bool((m.zeros == 8).all())
            q, scales, zeros = rtn_quantize(m.dequantize(), GGUF_GROUP, sym)
            new = Int4WeightOnlyLinear.from_quantized(q, scales, zeros, None, m.in_features, m.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, new.to(m.scales.device))
    return model


def q4_tensor(m: Int4WeightOnlyLinear) -> Q4Blocks:
    """The exact llama.cpp block form of an int4 linear with contiguous groups of 32: ours is
    w = (q - zero) * scale, Q4_1's d * q + m, so d = scale and m = -scale * zero; with zero = 8 everywhere (sym)
    it is Q4_0's d * (q - 8) with d = scale."""
    q = unpack_int4(m.qweight.cpu())[:, : m.in_features]  # [N, K]
    scales, zeros = m.scales.float().cpu(), m.zeros.float().cpu()  # [N, K/32]
    if bool((zeros == 8).all()):
        return Q4Blocks(q, scales, None)
    return Q4Blocks(q, scales, -scales * zeros)


def gguf_tensors(model: Transformer, float_type: str) -> tuple[dict, LlamaFileType]:
    """HF key -> float tensor or Q4Blocks for every tensor of the model, and the file type; ConfigError when an
    int4 weight has no exact block form (`gguf_problem`)."""
    problem = gguf_problem(model)
    if problem is not None:
        raise ConfigError(f"task.format=gguf: {problem}")
    quantized = dict(_quantized(model))
    tensors: dict = {}
    for key, v in model.state_dict().items():
        module = key.rpartition(".")[0]
        if module in quantized:
            if key.endswith(".bias"):
                tensors[key] = v
            elif module + ".weight" not in tensors:
                tensors[module + ".weight"] = q4_tensor(quantized[module])
            continue
        tensors[key] = v
    kinds = {t.qtype.name for t in tensors.values() if isinstance(t, Q4Blocks)}
    if not kinds:
        file_type = {
            "f32": LlamaFileType.ALL_F32,
            "f16": LlamaFileType.MOSTLY_F16,
            "bf16": LlamaFileType.MOSTLY_BF16,
        }[float_type]
    else:
        file_type = LlamaFileType.MOSTLY_Q4_0 if kinds == {"Q4_0"} else LlamaFileType.MOSTLY_Q4_1
    return tensors, file_type


# --- chained exports (task.export of quantize and finetune) -----------------------------------------------------


def check_chain(formats, key: str) -> list[str]:
    """task.export of quantize / finetune: a list of formats (peft only from finetune, checked by the caller)."""
    items = [formats] if isinstance(formats, str) else list(formats)
    for fmt in items:
        check_format(fmt, key)
    return items


def chain(formats: list[str], ctx, model: Transformer, tok: Tokenizer, record: dict, name: str) -> None:
    """Write each of `formats` to <run>/export/<format>/ with task=export's defaults, after the stage's own files."""
    options = default_options()
    for fmt in sorted(formats, key=lambda f: f != "peft"):  # peft first: the others merge the LoRA adapters
        path = write(fmt, model, tok, record, ctx.run_dir / "export" / fmt, options, name)
        ctx.add_artifact(f"export_{fmt}", path)
        log.info("exported %s: %s", fmt, path)
