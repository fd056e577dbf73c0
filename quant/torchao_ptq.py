"""torchao post-training quantization, behind our own modules. The only module that names torchao configs.

torchao renames its configs between releases; keeping every config name here makes such a rename a one-file fix,
caught by tests/quant/test_torchao_ptq.py (which compares against torchao's `quantize_` called directly).

`int8_wo`: torchao `Int8WeightOnlyConfig` (symmetric per-row int8, runs on any device). torchao computes the
scales; the resulting `Int8Tensor` weights are then moved into `quant.int8.Int8WeightOnlyLinear`, whose plain
buffers save through safetensors (torchao's tensor subclass does not).

Import cost: importing torchao takes ~2.5 s and prints warnings about optional CUDA extensions on CPU machines,
so `quant.int8_wo` imports this module only when an `int8_wo` model is quantized.
"""

from __future__ import annotations

from torch import nn
from torchao.quantization import Int8WeightOnlyConfig, PerRow, quantize_

from quant.checks import check_weight_sqnr
from quant.int8 import Int8WeightOnlyLinear


def int8_wo_config() -> Int8WeightOnlyConfig:
    # set_inductor_config=False: torchao would otherwise change global torch._inductor flags at quantize time,
    # an import-time-like side effect on every later compile in the process.
    return Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)


def quantize_int8_wo(model: nn.Module, linears: dict[str, nn.Linear]) -> None:
    """Replace each `linears[name]` (fully qualified names in `model`) with an Int8WeightOnlyLinear, in place.

    One `quantize_` call per linear, so the float weight is still at hand for the SQNR self-check without
    holding a float copy of the whole model."""
    for name, linear in linears.items():
        w = linear.weight.detach()
        quantize_(linear, int8_wo_config())  # linear.weight becomes a torchao Int8Tensor
        qw = linear.weight  # qdata int8 [N, K], scale fp32 [N, 1], zero_point zeros
        if qw.zero_point is not None and bool(qw.zero_point.any()):
            raise RuntimeError(f"torchao int8 weight of {name} is asymmetric; Int8WeightOnlyLinear is symmetric")
        qlinear = Int8WeightOnlyLinear.from_quantized(qw.qdata, qw.scale, linear.bias)
        check_weight_sqnr(name, w, qlinear.dequantize())
        model.set_submodule(name, qlinear)
