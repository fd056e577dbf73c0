"""The quantizer contract: how a `quantizer` config turns a float `models.llama.Transformer` into a quantized one,
and how a saved quantized checkpoint loads again.

What gets quantized: every nn.Linear inside `model.model.layers` (q/k/v/o and gate/up/down of each block,
`quant.checks.decoder_linears`). Norms stay float; so do the embedding and the output head unless an int4 scheme's
`quantize_head` knob says otherwise (int8 or int4, round to nearest, quant/head.py): the head is the most
quantization-sensitive layer, but on a small model it is a large share of the bytes a decode step reads.

The config (`qcfg`) is the resolved `quantizer` group as a plain dict: `name` plus that quantizer's knobs, exactly
the keys of its record's `knobs` (an unknown or missing key is an error, so a typo cannot fall back silently).
`QUANTIZERS` below is the one list of schemes; each scheme's module documents its knobs:

    none      no knobs                   Float model.
    int8_wo   quant/int8_wo.py           torchao per-row int8 weights.
    int4_wo   quant/int4_wo.py           Round-to-nearest group-wise uint4.
    gptq      quant/gptq.py              GPTQ, int4_wo's storage; needs calibration token ids.

Contract, in the order the runner calls it (gpt-fast's two-phase quantized loading):

1. `describe(qcfg) -> dict`: validate qcfg and return the JSON-able record written to `quantizer.json`
   (`name` + knobs). Everything needed to rebuild the module structure is in it. `quantizer(qcfg)` gives the
   scheme's `quant.scheme.Quantizer` record (e.g. its `needs_calibration`).
2. `quantize_model(model, qcfg, calib=None) -> model`: quantize the decoder linears in place (`calib` is the
   calibration LongTensor of a scheme that `needs_calibration`, unused by the others). Afterwards
   `model.state_dict()` holds only plain tensors (quantized modules keep packed buffers, no tensor subclasses),
   so it saves with safetensors.
3. Loading: build the float model (any init, any device), `prepare_for_load(model, describe_record)` swaps
   the decoder linears for empty quantized shells with the saved buffers' shapes, then
   `model.load_state_dict(saved, assign=True)` puts the saved tensors in place. Shapes come only from the
   record and the model's own layer sizes, never from file names.

A new scheme is one module that defines a `quant.scheme.Quantizer` record (its knobs with their checks,
`quantize`, `shell`, `needs_calibration`, `backfill`; say in the module docstring what it does and what its knobs
trade), one line in `QUANTIZERS`, and one conf/quantizer/<name>.yaml with the knobs' defaults.
(A Hydra ConfigStore schema is not used: the YAML holds the defaults, `describe` checks the values, and a
quantizer.json read back from disk needs the same checks, which a compose-time schema would not give it.)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from quant.checks import decoder_linears
from quant.gptq import GPTQ
from quant.head import head_shell, quantize_head
from quant.int4_wo import INT4_WO
from quant.int8_wo import INT8_WO
from quant.scheme import Quantizer

NONE = Quantizer(name="none", knobs={}, quantize=lambda model, spec, calib: None, shell=None)

# The one list of quantization schemes: quantizer.name -> record.
QUANTIZERS: dict[str, Quantizer] = {q.name: q for q in (NONE, INT8_WO, INT4_WO, GPTQ)}


def quantizer(qcfg: Mapping) -> Quantizer:
    """The record of qcfg's scheme; ValueError for an unknown name."""
    name = qcfg["name"] if "name" in qcfg else None
    if name not in QUANTIZERS:
        raise ValueError(f"quantizer.name={name!r} is not one of {sorted(QUANTIZERS)}")
    return QUANTIZERS[name]


def describe(qcfg: Mapping) -> dict:
    """Validated `quantizer.json` record: {"name": ..., <that quantizer's knobs>}."""
    q = quantizer(qcfg)
    qcfg = {**q.backfill, **qcfg}
    keys = set(qcfg) - {"name"}
    missing, unknown = sorted(set(q.knobs) - keys), sorted(keys - set(q.knobs))
    if missing or unknown:
        raise ValueError(f"quantizer {q.name!r} takes exactly {list(q.knobs)}; missing {missing}, unknown {unknown}")
    record = {"name": q.name, **{k: qcfg[k] for k in q.knobs}}
    for key, check in q.knobs.items():
        problem = check(record[key])
        if problem is not None:
            raise ValueError(f"quantizer.{key}={record[key]!r} {problem}")
    return record


def quantize_model(model: nn.Module, qcfg: Mapping, calib: torch.Tensor | None = None) -> nn.Module:
    """Quantize model's decoder linears in place as `qcfg` says; returns the model (see the contract above)."""
    spec = describe(qcfg)
    q = QUANTIZERS[spec["name"]]
    if q.needs_calibration and calib is None:
        raise ValueError(f"quantizer {q.name} needs calibration token ids [nsamples, seqlen] (calib=None given)")
    q.quantize(model, spec, calib)
    if "quantize_head" in spec:
        quantize_head(model, spec)
    return model


def prepare_for_load(model: nn.Module, qcfg: Mapping) -> nn.Module:
    """Swap the decoder linears for empty quantized shells so a saved quantized state dict loads with
    `model.load_state_dict(sd, assign=True)`. `qcfg` is the `quantizer.json` record (or the config)."""
    spec = describe(qcfg)
    shell = QUANTIZERS[spec["name"]].shell
    if shell is not None:
        for name, linear in decoder_linears(model).items():
            model.set_submodule(name, shell(linear, spec))
    if "quantize_head" in spec:
        head_shell(model, spec)
    return model
