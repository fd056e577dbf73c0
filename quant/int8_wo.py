"""Scheme `int8_wo` (conf/quantizer/int8_wo.yaml): torchao Int8WeightOnlyConfig, symmetric per-row int8, no knobs.

torchao chooses the scales (quant/torchao_ptq.py, imported only when a model is quantized: its import is slow and
noisy); the weights are stored as quant.int8.Int8WeightOnlyLinear. ~2x smaller than bf16, near-lossless.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.checks import decoder_linears
from quant.int8 import Int8WeightOnlyLinear
from quant.scheme import Quantizer


def _quantize(model: nn.Module, spec: dict, calib: torch.Tensor | None) -> None:
    # Imported here: torchao's import is slow and noisy, and only this scheme needs it.
    from quant.torchao_ptq import quantize_int8_wo

    quantize_int8_wo(model, decoder_linears(model))


def _shell(linear: nn.Linear, spec: dict) -> nn.Module:
    w = linear.weight
    return Int8WeightOnlyLinear(
        linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype
    )


INT8_WO = Quantizer(name="int8_wo", knobs={}, quantize=_quantize, shell=_shell)
