"""Int4 storage: packing, round-to-nearest, and every Int4WeightOnlyLinear kernel path against the dequantized weight.

Tolerances. The fp32 portable path computes exactly x @ dequant(W).T, so it matches an fp64 reference to fp32
rounding (1e-5 relative). The bf16 paths (aten CPU kernel, CUDA tinygemm, portable bf16) round the output to
bf16 (unit roundoff 2^-8 ~ 3.9e-3) and round scale and zero to bf16 (the kernels); measured worst case
6e-3 x max|y| over group sizes 32..256, sym/asym, padded K and act-order g_idx, so the bound is 1e-2 x max|y|,
the same for the kernel as for the portable bf16 path it replaces.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from quant.int4 import (
    Int4WeightOnlyLinear,
    dequantize,
    group_qparams,
    pack_int4,
    padded_in_features,
    quantize_values,
    rtn_quantize,
    search_qparams,
    unpack_int4,
)

BF16_TOL = 1e-2  # relative to max|reference|, see the module docstring


def _linear(K: int, N: int = 64, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(K, N, bias=bias)


def _act_order_module(K: int, N: int, g: int) -> Int4WeightOnlyLinear:
    """A module with a g_idx as GPTQ act-order writes it: groups formed along a random column permutation."""
    Kp = padded_in_features(K, g)
    gen = torch.Generator().manual_seed(3)
    perm = torch.randperm(Kp, generator=gen)
    g_idx = torch.empty(Kp, dtype=torch.int32)
    g_idx[perm] = (torch.arange(Kp) // g).to(torch.int32)
    q = torch.randint(0, 16, (N, Kp), generator=gen, dtype=torch.uint8)
    scales = torch.rand(N, Kp // g, generator=gen) * 0.02 + 0.005
    zeros = torch.randint(0, 16, (N, Kp // g), generator=gen).float()
    return Int4WeightOnlyLinear.from_quantized(q, scales, zeros, g_idx, K, torch.randn(N, generator=gen))


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def _reference(m: Int4WeightOnlyLinear, x: torch.Tensor) -> torch.Tensor:
    """fp64 x @ dequant(W).T + bias on the given (possibly bf16) inputs and bias."""
    y = x.double() @ m.dequantize().double().t()
    return y if m.bias is None else y + m.bias.double()


def test_pack_unpack_round_trip():
    q = torch.randint(0, 16, (48, 96), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (48, 48) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    # even column in the high nibble (the layout CUDA's _convert_weight_to_int4pack takes)
    assert torch.equal(packed[:, 0], q[:, 0] * 16 + q[:, 1])


@pytest.mark.parametrize("sym", [False, True])
def test_rtn_error_within_half_step(sym):
    w = torch.randn(32, 128)
    q, scales, zeros = rtn_quantize(w, 32, sym)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert torch.equal(zeros, zeros.round()) and bool(((zeros >= 0) & (zeros <= 15)).all())
    if sym:
        assert bool((zeros == 8).all())
    err = (dequantize(q, scales, zeros, 32) - w).abs()
    step = scales.abs().repeat_interleave(32, dim=1)
    # asymmetric: min and max are on the grid, so every weight is within half a step; symmetric (llama.cpp's Q4_0):
    # the largest magnitude is exactly level -8, the other sign reaches only 7 steps, so it may clip by one step
    bound = 0.5 if not sym else 1.0
    assert bool((err <= bound * step + 1e-6).all())


def test_symmetric_grid_is_llamacpp_q4_0():
    w = torch.tensor([[0.5, -0.25, 0.1, 0.0], [-0.8, 0.3, 0.7, -0.1], [0.0, 0.0, 0.0, 0.0]])
    scale, zero = group_qparams(w, sym=True)
    # Q4_0: d = (the weight of largest magnitude, with its sign) / -8, levels (q - 8) * d
    assert torch.equal(scale[:, 0], torch.tensor([0.5 / -8, -0.8 / -8, 1.0]))
    assert bool((zero == 8).all())
    deq = (quantize_values(w, scale, zero) - zero) * scale
    assert deq[0, 0] == 0.5 and deq[1, 0] == -0.8  # the largest magnitude sits exactly on level -8
    assert torch.equal(deq[2], w[2])  # an all-zero group stays zero


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_scale_search_never_loses_to_min_max(sym, weighted):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 4, 32, generator=gen)
    w[:, :, 0] *= 4  # outliers, so clipping the range can pay
    imp = torch.rand(32, generator=gen) ** 4 if weighted else None
    ones = torch.ones(32)

    def err(scale, zero):
        e = (w - (quantize_values(w, scale, zero) - zero) * scale).square()
        return (e * (imp if weighted else ones)).sum(-1)

    searched, minmax = err(*search_qparams(w, sym, imp)), err(*group_qparams(w, sym))
    assert bool((searched <= minmax * (1 + 1e-6)).all())
    assert searched.sum() < 0.95 * minmax.sum()  # and a better grid overall (measured 7% asymmetric, more symmetric)
    # rtn_quantize(search=True) stores exactly the searched grid's rounding
    scale, zero = search_qparams(w, sym)
    q, scales, zeros = rtn_quantize(w.view(64, 128), 32, sym, search=True)
    expected = (quantize_values(w, scale, zero) - zero) * scale
    assert torch.equal(dequantize(q, scales, zeros, 32).view_as(w), expected)


@pytest.mark.parametrize(("K", "g"), [(128, 32), (256, 64), (256, 128), (512, 256), (96, 64), (80, 32)])
@pytest.mark.parametrize("sym", [False, True])
def test_portable_fp32_equals_dequantized(K, g, sym):
    lin = _linear(K)
    m = Int4WeightOnlyLinear.from_linear(lin, g, sym)
    x = torch.randn(3, 5, K)
    y = m(x)
    assert m._kernel_cache is None  # fp32 never takes a kernel
    assert y.shape == (3, 5, 64)
    assert _rel_err(y, _reference(m, x)) < 1e-5


@pytest.mark.parametrize(("K", "g"), [(128, 32), (256, 64), (256, 128), (512, 256), (96, 64), (80, 32)])
@pytest.mark.parametrize("sym", [False, True])
def test_cpu_kernel_bf16_matches_dequantized(K, g, sym):
    lin = _linear(K).to(torch.bfloat16)
    m = Int4WeightOnlyLinear.from_linear(lin, g, sym)
    x = torch.randn(3, 5, K, dtype=torch.bfloat16)
    y = m(x)
    assert m._kernel_cache is not None and m._kernel_cache[0][0] == "cpu"
    assert y.dtype == torch.bfloat16
    ref = _reference(m, x)
    portable = torch.nn.functional.linear(x, m.dequantize().to(torch.bfloat16)) + m.bias
    assert _rel_err(portable, ref) < BF16_TOL
    assert _rel_err(y, ref) < BF16_TOL


@pytest.mark.parametrize(("K", "g"), [(128, 32), (96, 64)])
def test_act_order_g_idx_paths_match_dequantized(K, g):
    m = _act_order_module(K, 64, g)
    x = torch.randn(7, K)
    assert _rel_err(m(x), _reference(m, x)) < 1e-5
    m_bf16 = _act_order_module(K, 64, g)
    m_bf16.bias.data = m_bf16.bias.data.bfloat16()
    xb = x.bfloat16()
    y = m_bf16(xb)
    assert m_bf16._kernel_cache is not None  # the permuted-column kernel path ran
    assert _rel_err(y, _reference(m_bf16, xb)) < BF16_TOL


def test_portable_fallbacks():
    # group 16 is below what the kernels take; N = 40 is not a multiple of 16; fp16 is slow in the CPU kernel
    cases = [
        (_linear(64, 64), 16, torch.bfloat16),
        (_linear(64, 40), 32, torch.bfloat16),
        (_linear(64), 32, torch.float16),
    ]
    for lin, g, dtype in cases:
        m = Int4WeightOnlyLinear.from_linear(lin.to(dtype), g, False)
        x = torch.randn(4, 64, dtype=dtype)
        y = m(x)
        assert m._kernel_cache is None
        assert _rel_err(y, _reference(m, x)) < BF16_TOL


def test_padding_columns_are_zero_and_ignored():
    lin = _linear(96)
    m = Int4WeightOnlyLinear.from_linear(lin, 64, False)
    assert m.qweight.shape == (64, 64) and m.scales.shape == (64, 2)
    w = dequantize(unpack_int4(m.qweight), m.scales, m.zeros, 64)
    assert w.shape == (64, 128) and bool((w[:, 96:] == 0).all())
    assert m.dequantize().shape == (64, 96)


def test_cache_follows_loaded_weights(tmp_path):
    a = Int4WeightOnlyLinear.from_linear(_linear(128).bfloat16(), 32, False)
    torch.manual_seed(5)
    b = Int4WeightOnlyLinear.from_linear(torch.nn.Linear(128, 64).bfloat16(), 32, False)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    a(x)  # packs a's weights into the kernel cache
    save_file(b.state_dict(), tmp_path / "b.safetensors")
    a.load_state_dict(load_file(tmp_path / "b.safetensors"), assign=True)
    assert torch.equal(a(x), b(x))


def test_shell_then_assign_load(tmp_path):
    m = _act_order_module(96, 32, 32)
    save_file(m.state_dict(), tmp_path / "m.safetensors")
    with torch.device("meta"):
        shell = Int4WeightOnlyLinear(96, 32, bias=True, groupsize=32, has_g_idx=True)
    shell.load_state_dict(load_file(tmp_path / "m.safetensors"), assign=True)
    x = torch.randn(3, 96)
    assert torch.equal(shell(x), m(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("K", "g"), [(128, 32), (256, 64), (256, 128), (512, 256), (96, 64)])
@pytest.mark.parametrize("act_order", [False, True])
def test_cuda_tinygemm_matches_dequantized(K, g, act_order):
    if act_order:
        m = _act_order_module(K, 64, g)
    else:
        m = Int4WeightOnlyLinear.from_linear(_linear(K), g, False)
    m = m.cuda()
    m.bias.data = m.bias.data.bfloat16()
    x = torch.randn(5, K, device="cuda", dtype=torch.bfloat16)
    y = m(x)
    assert m._kernel_cache is not None and m._kernel_cache[0][0] == "cuda"
    assert _rel_err(y, _reference(m, x)) < BF16_TOL
    # the fp32 portable path on CUDA
    x32 = x.float()
    assert _rel_err(m(x32), _reference(m, x32)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_order", [False, True])
def test_cat_is_the_modules_side_by_side(dtype, act_order):
    if act_order:  # the same g_idx in every module (GPTQ solves q/k/v on one Hessian, so they share it)
        mods = [_act_order_module(96, n, 32) for n in (64, 32, 32)]
        for m in mods[1:]:
            m.g_idx = mods[0].g_idx.clone()
    else:
        mods = [Int4WeightOnlyLinear.from_linear(_linear(96, n), 32, sym=False) for n in (64, 32, 48)]
    joined = Int4WeightOnlyLinear.cat(mods)
    x = torch.randn(3, 5, 96).to(dtype)
    expected = torch.cat([m(x) for m in mods], dim=-1)
    assert torch.equal(joined.dequantize(), torch.cat([m.dequantize() for m in mods]))
    tol = 1e-6 if dtype == torch.float32 else BF16_TOL
    assert _rel_err(joined(x), expected.double()) <= tol


def test_cat_refuses_modules_that_cannot_share_a_kernel_call():
    a = Int4WeightOnlyLinear.from_linear(_linear(96, 32), 32, sym=False)
    assert Int4WeightOnlyLinear.cat([a, Int4WeightOnlyLinear.from_linear(_linear(96, 32), 64, sym=False)]) is None
    assert Int4WeightOnlyLinear.cat([a, Int4WeightOnlyLinear.from_linear(_linear(128, 32), 32, sym=False)]) is None
    assert Int4WeightOnlyLinear.cat([a, Int4WeightOnlyLinear.from_linear(_linear(96, 32, False), 32, False)]) is None
    b, c = _act_order_module(96, 32, 32), _act_order_module(96, 32, 32)
    c.g_idx = torch.roll(c.g_idx, 1)
    assert Int4WeightOnlyLinear.cat([b, c]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_join_projections_keeps_outputs_and_state(dtype):
    from quant_helpers import tiny_model, token_ids

    from quant import quantize_model

    model = quantize_model(tiny_model().to(dtype), {"name": "int4_wo", "groupsize": 32, "sym": False})
    keys = set(model.state_dict())
    ids = token_ids()
    with torch.no_grad():
        plain = model(ids)
        with model.join_projections():
            attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
            assert isinstance(attn.qkv_joined, Int4WeightOnlyLinear) and attn.qkv_joined.sizes == [64, 32, 32]
            assert isinstance(mlp.gate_up_joined, Int4WeightOnlyLinear)
            assert set(model.state_dict()) == keys  # the joined copies are not part of the model's state
            joined = model(ids)
        assert attn.qkv_joined is None and mlp.gate_up_joined is None
    tol = 1e-5 if dtype == torch.float32 else BF16_TOL
    assert _rel_err(joined, plain.double()) <= tol
    first = model.model.layers[0].self_attn.__dict__["_qkv_joined"][1]
    with model.join_projections():  # kept between calls: a compiled decode step finds the same module
        assert model.model.layers[0].self_attn.qkv_joined is first
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.scales.mul_(2)  # changed in place (load_state_dict copies in place): joined again
    with model.join_projections():
        again = model.model.layers[0].self_attn.qkv_joined
        assert again is not first and torch.equal(again.scales[:64], q.scales)
    float_model = tiny_model()
    with float_model.join_projections():  # float linears have no `cat`: nothing joined
        assert float_model.model.layers[0].self_attn.qkv_joined is None
