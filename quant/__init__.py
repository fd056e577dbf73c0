"""Quantizers for the decoder linears of models.llama.Transformer. The contract is in quant/base.py."""

from quant.base import describe, prepare_for_load, quantize_model

__all__ = ["describe", "prepare_for_load", "quantize_model"]
