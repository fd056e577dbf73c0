"""What every quantizer shares and nothing else: which linears get quantized, and the weight-space self-check.

A leaf module (torch only), so the scheme modules (quant/int8_wo.py, quant/int4_wo.py, quant/gptq.py,
quant/torchao_ptq.py) and quant/base.py can all import it without importing each other.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Round-to-nearest of Gaussian-like weights gives ~20 dB at 4 bits, group 128 (step ~ range/15, noise step^2/12)
# and ~40 dB at int8 per row; under 10 dB means broken scales (NaN/inf weights, a bug), not a hard layer.
MIN_WEIGHT_SQNR_DB = 10.0


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
