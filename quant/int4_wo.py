"""Scheme `int4_wo` (conf/quantizer/int4_wo.yaml): round-to-nearest group-wise uint4 (quant/int4.py).

Knobs: groupsize, sym, scale_search, quantize_head. ~3.5x smaller than bf16 at groupsize 128; smaller groups: more
accurate, more scale storage. Stored as quant.int4.Int4WeightOnlyLinear (GPTQ uses the same storage, see
`int4_shell`). `quantize_head` (both int4 schemes) also rounds the output head to int4 at the same groupsize, and
with it a tied input embedding (`quant.int4.Int4Embedding` reads its rows from the head): on SmolLM2 the tied
49152 x 576 matrix is 46% of an int4 model's bytes, and a decode step reads all of it.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.checks import check_weight_sqnr, decoder_linears
from quant.int4 import Int4Embedding, Int4WeightOnlyLinear
from quant.scheme import Quantizer, boolean, positive_even_int


def _quantize(model: nn.Module, spec: dict, calib: torch.Tensor | None) -> None:
    for name, linear in decoder_linears(model).items():
        qlinear = Int4WeightOnlyLinear.from_linear(linear, spec["groupsize"], spec["sym"], spec["scale_search"])
        check_weight_sqnr(name, linear.weight, qlinear.dequantize())
        model.set_submodule(name, qlinear)


def _head(model: nn.Module) -> nn.Linear:
    """The output head as a Linear: lm_head, or for a tied model one viewing the embedding's weight."""
    if model.lm_head is not None:
        return model.lm_head
    emb = model.model.embed_tokens.weight
    head = nn.Linear(emb.shape[1], emb.shape[0], bias=False, device=emb.device, dtype=emb.dtype)
    head.weight = emb
    return head


def _install_head(model: nn.Module, qhead: Int4WeightOnlyLinear) -> None:
    tied = model.lm_head is None
    model.lm_head = qhead
    if tied:
        model.model.embed_tokens = Int4Embedding(qhead)


def quantize_head(model: nn.Module, spec: dict) -> None:
    """Round-to-nearest int4 of the output head (and of a tied embedding) at spec's groupsize, sym, scale_search."""
    head = _head(model)
    qhead = Int4WeightOnlyLinear.from_linear(head, spec["groupsize"], spec["sym"], spec["scale_search"])
    check_weight_sqnr("lm_head", head.weight, qhead.dequantize())
    _install_head(model, qhead)


def head_shell(model: nn.Module, spec: dict) -> None:
    """Install empty int4 head (and tied-embedding) shells so a `quantize_head` checkpoint loads."""
    _install_head(model, int4_shell(_head(model), spec))


def int4_shell(linear: nn.Linear, spec: dict, has_g_idx: bool = False) -> nn.Module:
    """An empty Int4WeightOnlyLinear for `linear` at spec's groupsize (with a g_idx buffer when `has_g_idx`)."""
    w = linear.weight
    return Int4WeightOnlyLinear(
        linear.in_features,
        linear.out_features,
        linear.bias is not None,
        spec["groupsize"],
        has_g_idx,
        device=w.device,
        dtype=w.dtype,
    )


INT4_WO = Quantizer(
    name="int4_wo",
    knobs={"groupsize": positive_even_int, "sym": boolean, "scale_search": boolean, "quantize_head": boolean},
    quantize=_quantize,
    shell=int4_shell,
    backfill={"scale_search": False, "quantize_head": False},
)
