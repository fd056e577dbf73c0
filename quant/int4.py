"""Int4 weight-only storage: group-wise asymmetric uint4, packing, round-to-nearest, and the Linear that runs it.

Format (shared by `int4_wo` round-to-nearest and `gptq`), as in the GPTQ reference quantizer
(Frantar et al. 2022, https://arxiv.org/abs/2210.17323): each row of W [N, K] is cut into groups of `groupsize`
input columns; group g of row n has a float `scale` and an integer-valued `zero` in 0..15 and

    q = clamp(round(w / scale) + zero, 0, 15),      w ~ (q - zero) * scale.

`sym=True` fixes zero = 8 and scale = (the group's weight of largest magnitude) / -8, llama.cpp's Q4_0 grid.
When K % groupsize != 0 the weight is padded with zero columns up to Kp = groupsize * ceil(K / groupsize) (zero
columns quantize exactly to 0) and the input is padded with zeros at run time, so no layer is ever left in float.

`Int4WeightOnlyLinear` state dict (all plain tensors, so it round-trips through safetensors):
    qweight  uint8 [N, Kp/2]   two nibbles per byte, even column in the high nibble (the layout CUDA's
                               `_convert_weight_to_int4pack` takes, so CUDA packs with no reshuffle)
    scales   fp32  [N, Kp/groupsize]
    zeros    fp32  [N, Kp/groupsize]  integer-valued
    g_idx    int32 [Kp]  (only for GPTQ act-order without static groups) group of each input column
    bias     optional, the float Linear's bias

forward picks a kernel (see `Int4WeightOnlyLinear.forward`): aten's CPU int4 kernel for bf16 on CPU, tinygemm for
bf16 on CUDA, otherwise a portable dequantize + F.linear. The kernels' packed layouts are derived lazily from
`qweight` and cached in the module (not in the state dict), so a checkpoint is device-independent; the cache is
a second copy of the packed weight (N * Kp / 2 bytes), dropped on `.to()` and on `load_state_dict`.
Measured on torch 2.13 CPU (1536x576, group 64): the bf16 kernel takes 0.10 ms at M=1 and 18 ms at M=512,
against 0.14 ms and 62 ms for a dense bf16 F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAXQ = 15  # uint4
# Group sizes accepted by both aten int4 kernels (CPU `_weight_int4pack_mm_for_cpu`, measured on torch 2.13; CUDA
# tinygemm, per its argument check); others run the portable path.
KERNEL_GROUPSIZES = (32, 64, 128, 256)


def padded_in_features(in_features: int, groupsize: int) -> int:
    return -(-in_features // groupsize) * groupsize


def group_qparams(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero [..., 1] for the groups in the last dim of w [..., g] (the GPTQ reference's min-max rule).

    The range always includes 0, so zero-padded columns and dead columns quantize exactly to 0.
    """
    return _minmax_grid(*_range(w), sym)


def _range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """min and max [..., 1] of each group in the last dim of w, widened to include 0."""
    zero_t = torch.zeros((), dtype=w.dtype, device=w.device)
    return torch.minimum(w.amin(-1, keepdim=True), zero_t), torch.maximum(w.amax(-1, keepdim=True), zero_t)


def _minmax_grid(wmin: torch.Tensor, wmax: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # wmin <= 0 <= wmax. An all-zero group would give scale 0; the reference widens it to [-1, 1] (q = zero).
    empty = (wmin == 0) & (wmax == 0)
    if sym:
        # llama.cpp's Q4_0 grid: the weight of largest magnitude, with its sign, sits exactly on level -8
        # (scale = signed max / -8, negative when that weight is positive), so all 16 levels are in use.
        signed_max = torch.where(-wmin > wmax, wmin, wmax)
        scale = torch.where(empty, 1.0, signed_max / -((MAXQ + 1) / 2))
        return scale, torch.full_like(scale, (MAXQ + 1) / 2)
    wmin = torch.where(empty, -1.0, wmin)
    wmax = torch.where(empty, 1.0, wmax)
    scale = (wmax - wmin) / MAXQ
    return scale, torch.round(-wmin / scale)


# Range factors tried by `search_qparams`: the min-max range shrunk by up to 30% (clipping outliers) or widened 6%.
SEARCH_FACTORS = tuple(1 + 0.02 * k for k in range(-15, 4))


def search_qparams(
    w: torch.Tensor, sym: bool, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero [..., 1] for the groups in the last dim of w [..., g] that minimise the weighted round-trip error
    sum_j importance_j (w_j - (q_j - zero) scale)^2 (importance broadcast to w's shape; None: all 1).

    For each range factor f in SEARCH_FACTORS: the min-max grid of the range scaled by f, the weights rounded on it
    to integer levels L, then the scale refitted to those levels by weighted least squares (zero kept), whose error
    is sum imp w^2 - (sum imp w L)^2 / sum imp L^2 in closed form; the factor with the least error wins. Rounding
    again on the winning grid (what the callers do) can only lower the error further. importance = the diagonal of
    GPTQ's Hessian (each column's squared inputs) is llama.cpp's importance-matrix idea; None is a plain
    least-squares search (GPTQModel's `mse` option is its unrefitted form).
    """
    imp = torch.ones_like(w) if importance is None else importance.to(w.dtype).expand_as(w)
    iw = imp * w
    total = (iw * w).sum(-1, keepdim=True)
    wmin, wmax = _range(w)
    best_err = best_scale = best_zero = None
    for f in SEARCH_FACTORS:
        scale, zero = _minmax_grid(wmin * f, wmax * f, sym)
        levels = quantize_values(w, scale, zero).sub_(zero)  # [..., g]
        num = (iw * levels).sum(-1, keepdim=True)
        den = (imp * levels).mul_(levels).sum(-1, keepdim=True)
        fitted = den > 0
        den = torch.where(fitted, den, 1.0)
        scale = torch.where(fitted & (num != 0), num / den, scale)  # num == 0: an all-zero group, keep its grid
        err = torch.where(fitted, total - num * num / den, total)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Integer-valued float q in 0..15 for w with broadcastable scale, zero."""
    return torch.clamp(torch.round(w / scale) + zero, 0, MAXQ)


def rtn_quantize(
    w: torch.Tensor, groupsize: int, sym: bool, search: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest per group. w [N, K] -> q uint8 [N, Kp], scales fp32 [N, G], zeros fp32 [N, G].
    search: each group's grid from `search_qparams` (least squared error) instead of its min-max."""
    N, K = w.shape
    Kp = padded_in_features(K, groupsize)
    wg = F.pad(w.float(), (0, Kp - K)).view(N, Kp // groupsize, groupsize)  # [N, G, g]
    scale, zero = search_qparams(wg, sym) if search else group_qparams(wg, sym)  # [N, G, 1]
    q = quantize_values(wg, scale, zero).view(N, Kp).to(torch.uint8)
    return q, scale.squeeze(-1), zero.squeeze(-1)


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, groupsize: int, g_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """[N, Kp] weight in the scales' dtype from q [N, Kp] (any int/float dtype) and scales, zeros [N, G]."""
    if g_idx is None:
        s = scales.repeat_interleave(groupsize, dim=1)  # [N, Kp]
        z = zeros.repeat_interleave(groupsize, dim=1)
    else:
        s, z = scales[:, g_idx], zeros[:, g_idx]
    return (q.to(s.dtype) - z) * s


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] with values 0..15 (K even) -> uint8 [N, K/2], even column in the high nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K]; inverse of `pack_int4`."""
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).view(packed.shape[0], -1)


class Int4WeightOnlyLinear(nn.Module):
    """y = x @ dequant(qweight).T + bias with a group-wise uint4 weight (format in the module docstring).

    Build it quantized with `from_linear` (round-to-nearest) or `from_quantized` (GPTQ's result), or empty with
    the constructor (a shell for `load_state_dict(..., assign=True)`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        groupsize: int,
        has_g_idx: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if groupsize <= 0 or groupsize % 2:
            raise ValueError(f"int4 groupsize must be a positive even number, got {groupsize}")
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        Kp = padded_in_features(in_features, groupsize)
        G = Kp // groupsize
        self.register_buffer("qweight", torch.empty(out_features, Kp // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, G, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.empty(out_features, G, dtype=torch.float32, device=device))
        if has_g_idx:
            self.register_buffer("g_idx", torch.empty(Kp, dtype=torch.int32, device=device))
        else:
            self.g_idx = None
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self._kernel_cache: tuple | None = None

    @classmethod
    def from_quantized(
        cls,
        q: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor | None,
        in_features: int,
        bias: torch.Tensor | None,
    ) -> Int4WeightOnlyLinear:
        """Wrap q [N, Kp] (0..15), scales / zeros [N, G] and optional g_idx [Kp] (e.g. from GPTQ)."""
        N, Kp = q.shape
        groupsize = Kp // scales.shape[1]
        m = cls(in_features, N, bias is not None, groupsize, g_idx is not None, device=q.device)
        m.qweight = pack_int4(q)
        m.scales, m.zeros = scales.float().contiguous(), zeros.float().contiguous()
        if g_idx is not None:
            m.g_idx = g_idx.to(torch.int32)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone())
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, groupsize: int, sym: bool, search: bool = False) -> Int4WeightOnlyLinear:
        """Round-to-nearest quantization of a float Linear (the `int4_wo` quantizer)."""
        q, scales, zeros = rtn_quantize(linear.weight.detach(), groupsize, sym, search)
        return cls.from_quantized(q, scales, zeros, None, linear.in_features, linear.bias)

    @classmethod
    def cat(cls, mods: list[Int4WeightOnlyLinear]) -> Int4WeightOnlyLinear | None:
        """One module whose output is `mods`' outputs side by side (their rows stacked), or None when they do not
        share input size, groupsize, column order (g_idx) and bias presence. `Transformer.join_projections` calls
        it to run q/k/v, and gate/up, as one kernel call."""
        first = mods[0]
        same = all(
            m.in_features == first.in_features
            and m.groupsize == first.groupsize
            and (m.bias is None) == (first.bias is None)
            and (m.g_idx is None) == (first.g_idx is None)
            and (m.g_idx is None or torch.equal(m.g_idx, first.g_idx))
            for m in mods
        )
        if not same:
            return None
        joined = cls(
            first.in_features,
            sum(m.out_features for m in mods),
            first.bias is not None,
            first.groupsize,
            first.g_idx is not None,
            device=first.qweight.device,
        )
        joined.qweight = torch.cat([m.qweight for m in mods])
        joined.scales, joined.zeros = torch.cat([m.scales for m in mods]), torch.cat([m.zeros for m in mods])
        if first.g_idx is not None:
            joined.g_idx = first.g_idx
        if first.bias is not None:
            joined.bias = nn.Parameter(torch.cat([m.bias.detach() for m in mods]), requires_grad=False)
        return joined

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 [n, K]: the dequantized rows `rows` [n] of the weight (an embedding lookup, quant/head.py)."""
        q = unpack_int4(self.qweight[rows])
        return dequantize(q, self.scales[rows], self.zeros[rows], self.groupsize, self.g_idx)[:, : self.in_features]

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K] weight, the reference every forward path is held against."""
        q = unpack_int4(self.qweight)
        w = dequantize(q, self.scales.float(), self.zeros.float(), self.groupsize, self.g_idx)  # [N, Kp]
        return w[:, : self.in_features]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, groupsize={self.groupsize}, "
            f"bias={self.bias is not None}, g_idx={self.g_idx is not None}"
        )

    # --- kernel selection -------------------------------------------------------------------------------------

    def _kernel_for(self, x: torch.Tensor) -> str | None:
        # Both aten kernels take bf16 only in practice: the CPU op also accepts fp32/fp16 but measured 70x (fp32)
        # and 10x (fp16) slower than a dense F.linear at M=512 on torch 2.13, so those dtypes go portable.
        if x.dtype != torch.bfloat16 or self.groupsize not in KERNEL_GROUPSIZES:
            return None
        if x.device.type == "cpu" and self.out_features % 16 == 0:  # CPU packer: "expect N to be dividable by 16"
            return "cpu"
        if x.device.type == "cuda" and self.out_features % 8 == 0:  # tinygemm tiles N by 8
            return "cuda"
        return None

    def _act_order_perm(self) -> torch.Tensor | None:
        """Column order that makes g_idx's groups contiguous, or None when there is no g_idx.

        GPTQ act-order assigns groups along a permutation of the input columns. Sorting the columns by g_idx
        (stable) lines the groups up again, so the kernels run on W[:, perm] and x[..., perm].
        """
        if self.g_idx is None:
            return None
        perm = torch.argsort(self.g_idx, stable=True)
        Kp = self.g_idx.numel()
        expected = torch.arange(Kp, device=perm.device) // self.groupsize
        if not torch.equal(self.g_idx[perm].long(), expected):
            raise ValueError(f"g_idx does not hold exactly {self.groupsize} columns per group")
        return perm

    def _pack_for(self, kind: str, dtype: torch.dtype) -> tuple:
        """Kernel-layout weight and [G, N, 2] scale-and-zero tensor, built once per device/dtype and cached."""
        key = (kind, self.qweight.device, dtype)
        if self._kernel_cache is not None and self._kernel_cache[0] == key:
            return self._kernel_cache[1:]
        perm = self._act_order_perm()
        q = unpack_int4(self.qweight)  # [N, Kp]
        if perm is not None:
            q = q[:, perm]
        # Both kernels dequantize as (q - 8) * scale + zero_f with a float zero; ours is (q - zero) * scale,
        # so zero_f = (8 - zero) * scale. Computed in fp32, rounded to the kernel dtype once.
        zero_f = (8 - self.zeros) * self.scales
        scale_zero = torch.stack((self.scales.t(), zero_f.t()), dim=-1).to(dtype).contiguous()  # [G, N, 2]
        if kind == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        else:
            Kp = q.shape[1]
            inner_k_tiles = next(t for t in (8, 4, 2) if Kp % (t * 16) == 0)  # Kp % 32 == 0 always holds here
            packed = torch.ops.aten._convert_weight_to_int4pack(pack_int4(q).contiguous(), inner_k_tiles)
        self._kernel_cache = (key, packed, scale_zero, perm)
        return packed, scale_zero, perm

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_cache = None  # new qweight: repack on next use
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._kernel_cache = None  # .to(device) / .to(dtype): the kernel layout is device-specific
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self._kernel_for(x)
        if kind is None:
            # Portable path: any device and dtype.
            y = F.linear(x, self.dequantize().to(x.dtype))
            return y if self.bias is None else y + self.bias
        packed, scale_zero, perm = self._pack_for(kind, x.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        Kp = self.qweight.shape[1] * 2
        if Kp != self.in_features:
            x2 = F.pad(x2, (0, Kp - self.in_features))  # padded weight columns meet zero inputs
        if perm is not None:
            x2 = x2[:, perm]
        x2 = x2.contiguous()
        if kind == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.groupsize, scale_zero)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, packed, self.groupsize, scale_zero)
        y = y.view(*lead, self.out_features)
        return y if self.bias is None else y + self.bias
