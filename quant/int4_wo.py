"""Scheme `int4_wo` (conf/quantizer/int4_wo.yaml): round-to-nearest group-wise uint4 (quant/int4.py).

Knobs: groupsize, sym, scale_search, quantize_head. ~3.5x smaller than bf16 at groupsize 128; smaller groups: more
accurate, more scale storage. Stored as quant.int4.Int4WeightOnlyLinear (GPTQ uses the same storage, see
`int4_shell`). `quantize_head` (both int4 schemes): none | int8 | int4, the output head and a tied embedding
stored quantized too (quant/head.py).
"""

from __future__ import annotations

import torch
from torch import nn

from quant.checks import check_weight_sqnr, decoder_linears
from quant.head import HEAD_CHOICES
from quant.int4 import Int4WeightOnlyLinear
from quant.scheme import Quantizer, boolean, one_of, positive_even_int


def _quantize(model: nn.Module, spec: dict, calib: torch.Tensor | None) -> None:
    for name, linear in decoder_linears(model).items():
        qlinear = Int4WeightOnlyLinear.from_linear(linear, spec["groupsize"], spec["sym"], spec["scale_search"])
        check_weight_sqnr(name, linear.weight, qlinear.dequantize())
        model.set_submodule(name, qlinear)


def int4_shell(linear: nn.Linear, spec: dict, has_g_idx: bool = False) -> nn.Module:
    """An empty Int4WeightOnlyLinear for `linear` at spec's groupsize (with a g_idx buffer when `has_g_idx`)."""
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


INT4_WO = Quantizer(
    name="int4_wo",
    knobs={
        "groupsize": positive_even_int,
        "sym": boolean,
        "scale_search": boolean,
        "quantize_head": one_of(*HEAD_CHOICES),
    },
    quantize=_quantize,
    shell=int4_shell,
    backfill={"scale_search": False, "quantize_head": "none"},
)
