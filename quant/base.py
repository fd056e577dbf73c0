"""The quantizer contract: how a `quantizer` config turns a float `models.llama.Transformer` into a quantized one,
and how a saved quantized checkpoint loads again.

What gets quantized: every nn.Linear inside `model.model.layers` (q/k/v/o and gate/up/down of each block).
Embeddings, norms and the output head stay float: they are a small share of a Llama's weights, and the head
is the most quantization-sensitive layer.

The config (`qcfg`) is the resolved `quantizer` group as a plain dict: `name` plus that quantizer's knobs,
exactly these keys (`PARAMS`; an unknown or missing key is an error, so a typo cannot fall back silently):

    none      no knobs.                  Float model.
    int8_wo   no knobs.                  torchao Int8WeightOnlyConfig: symmetric per-row int8 (quant/torchao_ptq.py),
                                         stored as quant.int8.Int8WeightOnlyLinear. ~2x smaller than bf16, near-lossless.
    int4_wo   groupsize, sym, scale_search  Round-to-nearest group-wise uint4 (quant/int4.py). ~3.5x smaller than
                                         bf16 at groupsize 128; smaller groups: more accurate, more scale storage.
    gptq      groupsize, sym, blocksize, percdamp, act_order, static_groups, true_sequential,
              nsamples, seqlen, calibration, sampling, seed, sink_weight, attention_weight,
              scale_search
                                         GPTQ (quant/gptq.py), same int4 storage as int4_wo. Needs calibration
                                         token ids [nsamples, seqlen] (the runner builds them from `calibration`
                                         with `seed`). act_order helps most on outlier-heavy layers; without
                                         static_groups it stores a g_idx and reorders inputs at run time.
                                         sink_weight / attention_weight weight calibration tokens in the
                                         Hessians; scale_search picks each group's scale by a diag(H)-weighted search.

Contract, in the order the runner calls it (gpt-fast's two-phase quantized loading):

1. `describe(qcfg) -> dict`: validate qcfg and return the JSON-able record written to `quantizer.json`
   (`name` + knobs). Everything needed to rebuild the module structure is in it.
2. `quantize_model(model, qcfg, calib=None) -> model`: quantize the decoder linears in place (`calib` is the
   GPTQ calibration LongTensor, unused by the others). Afterwards `model.state_dict()` holds only plain tensors
   (quantized modules keep packed buffers, no tensor subclasses), so it saves with safetensors.
3. Loading: build the float model (any init, any device), `prepare_for_load(model, describe_record)` swaps
   the decoder linears for empty quantized shells with the saved buffers' shapes, then
   `model.load_state_dict(saved, assign=True)` puts the saved tensors in place. Shapes come only from the
   record and the model's own layer sizes, never from file names.

A new quantizer adds its name and knobs to `PARAMS` and one function to each of `_QUANTIZE` and `_SHELL`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from quant.gptq import gptq_quantize_model
from quant.int4 import Int4WeightOnlyLinear
from quant.int8 import Int8WeightOnlyLinear

# Round-to-nearest of Gaussian-like weights gives ~20 dB at 4 bits, group 128 (step ~ range/15, noise step^2/12)
# and ~40 dB at int8 per row; under 10 dB means broken scales (NaN/inf weights, a bug), not a hard layer.
MIN_WEIGHT_SQNR_DB = 10.0

PARAMS: dict[str, tuple[str, ...]] = {
    "none": (),
    "int8_wo": (),
    "int4_wo": ("groupsize", "sym", "scale_search"),
    "gptq": (
        "groupsize",
        "sym",
        "blocksize",
        "percdamp",
        "act_order",
        "static_groups",
        "true_sequential",
        "nsamples",
        "seqlen",
        "calibration",
        "sampling",
        "seed",
        "sink_weight",
        "attention_weight",
        "scale_search",
    ),
}


# How GPTQ's calibration windows are drawn (runner/calibration.py).
SAMPLING = ("corpus", "document")


def describe(qcfg: Mapping) -> dict:
    """Validated `quantizer.json` record: {"name": ..., <that quantizer's knobs>}."""
    name = qcfg["name"] if "name" in qcfg else None
    if name not in PARAMS:
        raise ValueError(f"quantizer.name={name!r} is not one of {sorted(PARAMS)}")
    if name == "gptq":
        # quantizer.json written before these keys existed: what the code did then
        qcfg = {"sampling": "corpus", "sink_weight": 1, "attention_weight": False, **qcfg}
    if name in ("gptq", "int4_wo"):
        qcfg = {"scale_search": False, **qcfg}
    keys = set(qcfg) - {"name"}
    missing, unknown = sorted(set(PARAMS[name]) - keys), sorted(keys - set(PARAMS[name]))
    if missing or unknown:
        raise ValueError(f"quantizer {name!r} takes exactly {list(PARAMS[name])}; missing {missing}, unknown {unknown}")
    record = {"name": name, **{k: qcfg[k] for k in PARAMS[name]}}
    if "groupsize" in record and (
        not _is_int(record["groupsize"]) or record["groupsize"] <= 0 or record["groupsize"] % 2
    ):
        raise ValueError(f"quantizer.groupsize={record['groupsize']!r} must be a positive even integer")
    for key in ("blocksize", "nsamples", "seqlen"):
        if key in record and (not _is_int(record[key]) or record[key] <= 0):
            raise ValueError(f"quantizer.{key}={record[key]!r} must be a positive integer")
    for key in ("sym", "act_order", "static_groups", "true_sequential", "attention_weight", "scale_search"):
        if key in record and not isinstance(record[key], bool):
            raise ValueError(f"quantizer.{key}={record[key]!r} must be true or false")
    if "seed" in record and not _is_int(record["seed"]):
        raise ValueError(f"quantizer.seed={record['seed']!r} must be an integer")
    if "sampling" in record and record["sampling"] not in SAMPLING:
        raise ValueError(f"quantizer.sampling={record['sampling']!r} must be one of {', '.join(SAMPLING)}")
    if "percdamp" in record and not (isinstance(record["percdamp"], int | float) and record["percdamp"] >= 0):
        raise ValueError(f"quantizer.percdamp={record['percdamp']!r} must be a number >= 0 (the reference uses 0.01)")
    if "sink_weight" in record and not (
        isinstance(record["sink_weight"], int | float)
        and not isinstance(record["sink_weight"], bool)
        and math.isfinite(record["sink_weight"])
        and record["sink_weight"] > 0
    ):
        raise ValueError(f"quantizer.sink_weight={record['sink_weight']!r} must be a number > 0 (1 = the paper's GPTQ)")
    return record


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML true is not a group size


def check_weight_sqnr(name: str, w: torch.Tensor, wq: torch.Tensor) -> float:
    """Weight-space SQNR of a quantize-dequantize round trip in dB; raises below MIN_WEIGHT_SQNR_DB."""
    w = w.detach().float()
    noise = (w - wq.float()).square().sum()
    sqnr = math.inf if noise == 0 else (10 * torch.log10(w.square().sum() / noise)).item()
    if not sqnr >= MIN_WEIGHT_SQNR_DB:  # also catches NaN
        raise RuntimeError(f"quantization self-check: {name} weight SQNR {sqnr:.1f} dB < {MIN_WEIGHT_SQNR_DB} dB")
    return sqnr


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Fully qualified name -> nn.Linear for every Linear inside `model.model.layers`, in model order."""
    return {
        f"model.layers.{i}.{name}": module
        for i, block in enumerate(model.model.layers)
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    }


def _quantize_int8_wo(model: nn.Module, spec: dict, calib: torch.Tensor | None) -> None:
    # Imported here: torchao's import is slow and noisy, and only this quantizer needs it (see torchao_ptq.py).
    from quant import torchao_ptq

    torchao_ptq.quantize_int8_wo(model, decoder_linears(model))


def _quantize_int4_wo(model: nn.Module, spec: dict, calib: torch.Tensor | None) -> None:
    for name, linear in decoder_linears(model).items():
        qlinear = Int4WeightOnlyLinear.from_linear(linear, spec["groupsize"], spec["sym"], spec["scale_search"])
        check_weight_sqnr(name, linear.weight, qlinear.dequantize())
        model.set_submodule(name, qlinear)


def _quantize_gptq(model: nn.Module, spec: dict, calib: torch.Tensor | None) -> None:
    if calib is None:
        raise ValueError("quantizer gptq needs calibration token ids [nsamples, seqlen] (calib=None given)")
    gptq_quantize_model(model, calib, spec)


_QUANTIZE: dict[str, Callable[[nn.Module, dict, torch.Tensor | None], None]] = {
    "none": lambda model, spec, calib: None,
    "int8_wo": _quantize_int8_wo,
    "int4_wo": _quantize_int4_wo,
    "gptq": _quantize_gptq,
}


def _int4_shell(linear: nn.Linear, spec: dict) -> nn.Module:
    # GPTQ stores g_idx exactly when act_order forms groups along the permuted order.
    has_g_idx = spec["name"] == "gptq" and spec["act_order"] and not spec["static_groups"]
    w = linear.weight
    return Int4WeightOnlyLinear(
        linear.in_features,
        linear.out_features,
        linear.bias is not None,
        spec["groupsize"],
        has_g_idx,
        device=w.device,
        dtype=w.dtype,
    )


def _int8_shell(linear: nn.Linear, spec: dict) -> nn.Module:
    w = linear.weight
    return Int8WeightOnlyLinear(
        linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype
    )


_SHELL: dict[str, Callable[[nn.Linear, dict], nn.Module] | None] = {
    "none": None,
    "int8_wo": _int8_shell,
    "int4_wo": _int4_shell,
    "gptq": _int4_shell,
}


def quantize_model(model: nn.Module, qcfg: Mapping, calib: torch.Tensor | None = None) -> nn.Module:
    """Quantize model's decoder linears in place as `qcfg` says; returns the model (see the contract above)."""
    spec = describe(qcfg)
    _QUANTIZE[spec["name"]](model, spec, calib)
    return model


def prepare_for_load(model: nn.Module, qcfg: Mapping) -> nn.Module:
    """Swap the decoder linears for empty quantized shells so a saved quantized state dict loads with
    `model.load_state_dict(sd, assign=True)`. `qcfg` is the `quantizer.json` record (or the config)."""
    spec = describe(qcfg)
    shell = _SHELL[spec["name"]]
    if shell is not None:
        for name, linear in decoder_linears(model).items():
            model.set_submodule(name, shell(linear, spec))
    return model
