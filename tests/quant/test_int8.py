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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_linear_rounds_per_row_and_kernel_matches_dequantized(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48, bias=False)
    with torch.no_grad():
        linear.weight[3] = 0  # an all-zero row keeps scale 1 and quantizes exactly
    m = Int8WeightOnlyLinear.from_linear(linear)
    w = linear.weight.detach()
    step = w.abs().amax(1, keepdim=True) / 127
    assert (m.dequantize() - w).abs().le(step / 2 + 1e-7).all()  # round to nearest: within half a step
    assert m.scales[3] == 1 and not m.qweight[3].any()
    rows = torch.tensor([5, 3, 5, 0])
    assert torch.equal(m.dequantize_rows(rows), m.dequantize()[rows])
    x = torch.randn(2, 7, 96).to(dtype)
    ref = x.double() @ m.dequantize().double().t()
    rel = ((m(x).double() - ref).abs().max() / ref.abs().max()).item()
    assert rel <= (1e-6 if dtype == torch.float32 else 1e-2)  # bf16: the output rounds to bf16


def test_bf16_model_with_int8_layers_compiles():
    """torch.compile of int8 layers in bf16 (int8_wo, and an int8 output head): inductor lowers the weight-only int8
    matmul only when the scales are a plain tensor, not computed in the graph (it failed with an AssertionError)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from quant_helpers import tiny_model, token_ids

    from quant import quantize_model

    for cfg in ({"name": "int8_wo"}, {"name": "int4_wo", "groupsize": 32, "sym": False, "quantize_head": "int8"}):
        model = quantize_model(tiny_model(tie_word_embeddings=True).to(torch.bfloat16), cfg)
        with torch.no_grad():
            eager = model(token_ids()).float()
            compiled = torch.compile(model)(token_ids()).float()
        assert ((compiled - eager).abs().max() / eager.abs().max()).item() < 2e-2
        torch._dynamo.reset()
