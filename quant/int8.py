"""Int8 weight-only Linear: symmetric per-output-channel int8 weight with an fp32 scale per row.

Produced by `quant.torchao_ptq.quantize_int8_wo` (torchao chooses the scales), or by `from_linear` (round to nearest,
scale = the row's largest magnitude / 127: the output head of `quantizer.quantize_head=int8`, quant/head.py). We keep our own module rather
than torchao's `Int8Tensor` weight because a torchao tensor subclass does not go through
`safetensors.torch.save_file` (measured on torchao 0.18: "Attempted to access the data pointer on an invalid
python storage"), while plain buffers do.

State dict: `qweight` int8 [N, K], `scales` fp32 [N], optional `bias`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8WeightOnlyLinear(nn.Module):
    """y = (x @ qweight.T) * scales + bias, computed in the activation dtype as torchao's weight-only int8 does."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self._scales_cache: torch.Tensor | None = None

    @classmethod
    def from_quantized(cls, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        N, K = qweight.shape
        m = cls(K, N, bias is not None, device=qweight.device)
        m.qweight = qweight.to(torch.int8).contiguous()
        m.scales = scales.reshape(N).float().contiguous()
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone())
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        """Symmetric per-row round to nearest: q = round(w / s), s = max|w_row| / 127 (an all-zero row: s = 1)."""
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1) / 127
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(w / scales[:, None]).clamp(-127, 127)
        return cls.from_quantized(q, scales, linear.bias)

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K] weight."""
        return self.qweight.float() * self.scales[:, None]

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 [n, K]: the dequantized rows `rows` [n] (an embedding lookup, quant/head.py)."""
        return self.qweight[rows].float() * self.scales[rows, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def _scales_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The scales in the activation dtype, kept (a plain tensor for torch.compile: inductor's weight-only int8
        lowering cannot take scales computed inside the graph); dropped on `.to()` and on `load_state_dict`."""
        c = self._scales_cache
        if c is None or c.dtype != dtype or c.device != self.scales.device:
            c = self._scales_cache = self.scales.to(dtype)
        return c

    def _load_from_state_dict(self, *args, **kwargs):
        self._scales_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._scales_cache = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self._scales_as(x.dtype)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.compiler.is_compiling():
            # aten's CPU weight-only int8 kernel reads the int8 matrix as it is (the portable line below first
            # writes a bf16 copy of it); measured 2.7x faster than a bf16 F.linear on SmolLM2's 49152 x 576 head.
            # Compiled, inductor turns the portable line into the same kernel.
            x2 = x.reshape(-1, self.in_features).contiguous()
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, scales).view(*x.shape[:-1], self.out_features)
        else:
            # Integer weights are exact in bf16/fp16/fp32, so only the final scale multiply rounds.
            y = F.linear(x, self.qweight.to(x.dtype)) * scales
        return y if self.bias is None else y + self.bias
