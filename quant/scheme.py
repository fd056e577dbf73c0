"""`Quantizer`: the record one quantization scheme fills in (quant/base.py lists them), and the knob checks.

A leaf module (no scheme imports), so each scheme module can build its record from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# A knob check returns None for a valid value, else the end of the sentence "quantizer.<key>=<value!r> ...".
Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Quantizer:
    """One quantization scheme (the contract is in quant/base.py).

    name: the `quantizer.name` value, equal to its conf/quantizer/<name>.yaml.
    knobs: knob name -> check, in the order quantizer.json records them. Exactly these keys are accepted.
    quantize(model, spec, calib): quantize the decoder linears in place; `spec` is the validated record.
    shell(linear, spec): an empty quantized module with the saved buffers' shapes (None: the linears stay float).
    needs_calibration: quantize needs calibration token ids [spec["nsamples"], spec["seqlen"]], which the runner
        builds only in task=quantize (runner/calibration.py), so such a scheme cannot be applied at load time.
    backfill: keys missing from a quantizer.json written before they existed -> what the code did then.
    """

    name: str
    knobs: Mapping[str, Check]
    quantize: Callable[[nn.Module, dict, torch.Tensor | None], None]
    shell: Callable[[nn.Linear, dict], nn.Module] | None
    needs_calibration: bool = False
    backfill: Mapping[str, Any] = field(default_factory=dict)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML true is not a group size


def positive_even_int(value) -> str | None:
    return None if _is_int(value) and value > 0 and value % 2 == 0 else "must be a positive even integer"


def positive_int(value) -> str | None:
    return None if _is_int(value) and value > 0 else "must be a positive integer"


def non_negative_int(value) -> str | None:
    return None if _is_int(value) and value >= 0 else "must be an integer >= 0"


def boolean(value) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def one_of(*choices: str) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def number_at_least_zero(hint: str) -> Check:
    def check(value) -> str | None:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        return None if ok else f"must be a number >= 0 ({hint})"

    return check


def positive_number(hint: str) -> Check:
    def check(value) -> str | None:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        return None if ok else f"must be a number > 0 ({hint})"

    return check


def any_value(value) -> str | None:
    return None
