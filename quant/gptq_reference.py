"""GPTQ's Algorithm 1 (Frantar et al. 2022) in its plainest form: the reference the optimised quant/gptq.py is held
against, in tests/quant/test_gptq.py (identical integers) and in benchmarks/quantize.py --reference (whole-model
perplexity, passed to `gptq_quantize_model` as its `solve`). Not used by the runner."""

from __future__ import annotations

import torch


def reference_gptq(W, H, groupsize, percdamp, act_order, static_groups, sym):
    """Algorithm 1 of Frantar et al. 2022 written as plainly as possible: fp64, one column at a time, no lazy
    batching, explicit inverse. Returns q [N, Kp] (original column order), per-column scale and zero [N, Kp], and
    the order the columns were quantized in [Kp]."""
    W, H = W.double(), H.double()
    N, K = W.shape
    g = groupsize
    Kp = -(-K // g) * g
    Wp = torch.zeros(N, Kp, dtype=torch.float64)
    Wp[:, :K] = W
    Hp = torch.zeros(Kp, Kp, dtype=torch.float64)
    Hp[:K, :K] = H
    for i in range(Kp):
        if Hp[i, i] == 0:
            Hp[i, i] = 1
            Wp[:, i] = 0
    damp = percdamp * Hp.diagonal()[:K].mean()

    def grid(cols):  # min-max grid of the GPTQ reference quantizer, per row (symmetric: llama.cpp's Q4_0)
        lo = cols.min(dim=1).values.clamp(max=0)
        hi = cols.max(dim=1).values.clamp(min=0)
        both_zero = (lo == 0) & (hi == 0)
        if sym:  # llama.cpp's Q4_0: the weight of largest magnitude, signed, is level -8
            scale = torch.where(-lo > hi, lo, hi) / -8
            return torch.where(both_zero, 1.0, scale), torch.full_like(scale, 8.0)
        lo, hi = torch.where(both_zero, -1.0, lo), torch.where(both_zero, 1.0, hi)
        scale = (hi - lo) / 15
        return scale, torch.round(-lo / scale)

    static = [grid(Wp[:, k : k + g]) for k in range(0, Kp, g)]
    order = torch.argsort(Hp.diagonal(), descending=True, stable=True) if act_order else torch.arange(Kp)
    Hperm = Hp[order][:, order] + damp * torch.eye(Kp, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hperm)).t()  # H^-1 = U^T U, U upper
    Wk = Wp[:, order].clone()
    q_out = torch.zeros(N, Kp, dtype=torch.float64)
    s_out, z_out = torch.zeros(N, Kp, dtype=torch.float64), torch.zeros(N, Kp, dtype=torch.float64)
    for j in range(Kp):
        if static_groups:
            scale, zero = static[int(order[j]) // g]
        elif j % g == 0:
            scale, zero = grid(Wk[:, j : j + g])
        q = torch.clamp(torch.round(Wk[:, j] / scale) + zero, 0, 15)
        col = int(order[j])
        q_out[:, col], s_out[:, col], z_out[:, col] = q, scale, zero
        e = (Wk[:, j] - (q - zero) * scale) / U[j, j]
        Wk[:, j:] -= torch.outer(e, U[j, j:])
    return q_out, s_out, z_out, order
