"""`quantizer.quantize_head`: the output head, and a tied input embedding with it, stored quantized.

On a small model the vocabulary matrix is a large share of what a decode step reads (SmolLM2-135M: 49152 x 576,
57 MB in bf16, 46% of an int4 model's bytes), so the int4 schemes can quantize it too, by round to nearest:

    none   the head stays float (default: it is the layer most sensitive to quantization).
    int8   per-row symmetric int8 (quant/int8.py), as llama.cpp stores SmolLM2's tied matrix (Q8_0).
    int4   group-wise uint4 at the quantizer's groupsize and sym (quant/int4.py): smallest, costs the most.

A tied model keeps one copy: `lm_head` holds the quantized matrix (its state-dict keys) and the embedding becomes a
`QuantizedEmbedding` that dequantizes the rows it looks up from it. An untied embedding stays float (a lookup reads
one row per token). README has the measured perplexity cost and speed of each choice.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.checks import check_weight_sqnr
from quant.int4 import Int4WeightOnlyLinear
from quant.int8 import Int8WeightOnlyLinear

HEAD_CHOICES = ("none", "int8", "int4")


class QuantizedEmbedding(nn.Module):
    """Embedding lookups read from a quantized output head (any module with `dequantize_rows`): a tied model's one
    matrix. It keeps a plain reference to the head (not a submodule: the state dict holds the tensors once, under
    `lm_head.`) and returns fp32 rows; the model casts them to its dtype (`Transformer.embed`)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        object.__setattr__(self, "head", head)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.head.dequantize_rows(ids.reshape(-1))  # [n, C]
        return rows.reshape(*ids.shape, rows.shape[-1])


def _float_head(model: nn.Module) -> nn.Linear:
    """The output head as a Linear: lm_head, or for a tied model one sharing the embedding's weight."""
    if model.lm_head is not None:
        return model.lm_head
    emb = model.model.embed_tokens.weight
    head = nn.Linear(emb.shape[1], emb.shape[0], bias=False, device=emb.device, dtype=emb.dtype)
    head.weight = emb
    return head


def _install(model: nn.Module, qhead: nn.Module) -> None:
    tied = model.lm_head is None
    model.lm_head = qhead
    if tied:
        model.model.embed_tokens = QuantizedEmbedding(qhead)


def quantize_head(model: nn.Module, spec: dict) -> None:
    """Quantize the output head (and a tied embedding) as spec["quantize_head"] says; "none" leaves it float."""
    kind = spec["quantize_head"]
    if kind == "none":
        return
    head = _float_head(model)
    if kind == "int8":
        qhead = Int8WeightOnlyLinear.from_linear(head)
    else:
        qhead = Int4WeightOnlyLinear.from_linear(head, spec["groupsize"], spec["sym"], spec["scale_search"])
    check_weight_sqnr("lm_head", head.weight, qhead.dequantize())
    _install(model, qhead)


def head_shell(model: nn.Module, spec: dict) -> None:
    """Empty quantized head (and tied-embedding) modules, so a checkpoint written with `quantize_head` loads."""
    kind = spec["quantize_head"]
    if kind == "none":
        return
    head = _float_head(model)
    w = head.weight
    if kind == "int8":
        shell = Int8WeightOnlyLinear(head.in_features, head.out_features, False, device=w.device, dtype=w.dtype)
    else:
        shell = Int4WeightOnlyLinear(
            head.in_features, head.out_features, False, spec["groupsize"], False, device=w.device, dtype=w.dtype
        )
    _install(model, shell)
