"""Quantizers for the decoder linears of models.llama.Transformer. The contract is in quant/base.py."""

from quant.base import QUANTIZERS, describe, prepare_for_load, quantize_model, quantizer

__all__ = ["QUANTIZERS", "describe", "prepare_for_load", "quantize_model", "quantizer"]
