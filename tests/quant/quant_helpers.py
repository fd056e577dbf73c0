"""Helpers for the quantizer tests: a tiny random Transformer, GPTQ configs, dequantized twins.

A plain module (not a conftest.py) so that it cannot shadow tests/conftest.py, which other tests import from.
"""

from __future__ import annotations

import copy

import conftest
import torch

from models.llama import Transformer
from quant.checks import decoder_linears

# The quantizer tests' sizes on top of conftest's tiny model (their pinned values were made with these).
QUANT_OVERRIDES = dict(vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)


def gptq_cfg(**overrides) -> dict:
    """A full gptq qcfg for the tiny model (groupsize 32 divides hidden 64 and intermediate 128)."""
    cfg = dict(
        name="gptq",
        groupsize=32,
        sym=False,
        blocksize=128,
        percdamp=0.01,
        act_order=False,
        static_groups=False,
        true_sequential=True,
        nsamples=8,
        seqlen=32,
        calibration="test",
        sampling="corpus",
        seed=0,
        sink_weight=1,
        attention_weight=False,
        scale_search=False,
    )
    cfg.update(overrides)
    return cfg


def dequantized_twin(float_model: Transformer, qmodel: Transformer) -> Transformer:
    """A float copy of float_model whose decoder linears carry qmodel's dequantized weights."""
    twin = copy.deepcopy(float_model)
    qlayers = dict(qmodel.named_modules())
    with torch.no_grad():
        for name, linear in decoder_linears(twin).items():
            linear.weight.copy_(qlayers[name].dequantize())
    return twin


def tiny_model(**overrides) -> Transformer:
    return conftest.tiny_model(**{**QUANT_OVERRIDES, **overrides})


FAMILIES = ("qwen3", "gemma2", "gemma3", "phi3")


def family_model(family: str) -> Transformer:
    """A random tiny model of another family (conftest.FAMILY_HF's config) at the quantizer tests' sizes, in eval
    mode: sliding windows (8-12) shorter than the 32-token calibration windows, so their masks take part."""
    torch.manual_seed(0)
    args = conftest.family_args(family, vocab_size=256, max_position_embeddings=128)
    return Transformer(args).eval()


def calib_ids(nsamples: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (nsamples, seqlen), generator=torch.Generator().manual_seed(1))


def token_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
