"""Int8WeightOnlyLinear against its dequantized weight, on CPU and (marked gpu) CUDA."""

from __future__ import annotations

import pytest
import torch

from quant.int8 import Int8WeightOnlyLinear


def _module(device="cpu") -> Int8WeightOnlyLinear:
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (32, 64), generator=gen, dtype=torch.int8)
    return Int8WeightOnlyLinear.from_quantized(q, torch.rand(32, generator=gen) * 0.01, torch.randn(32)).to(device)


def _check(m: Int8WeightOnlyLinear, device: str):
    x = torch.randn(3, 4, 64, device=device)
    ref = x.double() @ m.dequantize().double().t() + m.bias.double()
    y = m(x)
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    xb = x.bfloat16()
    m.bias.data = m.bias.data.bfloat16()
    ref_b = xb.double() @ m.dequantize().double().t() + m.bias.double()
    # bf16 output and scale rounding; same bound and reasoning as the int4 bf16 paths (tests/quant/test_int4.py)
    assert ((m(xb).double() - ref_b).abs().max() / ref_b.abs().max()) < 1e-2


def test_cpu_matches_dequantized():
    _check(_module(), "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_dequantized():
    _check(_module("cuda"), "cuda")
