"""Start-up checks of numeric knobs: one table per stage, `key -> rule`, checked by `check` before any work.

A rule says what a value must be (`integer(lo=1)`, `number(gt=0, le=1)`, `null=True` to also accept null), so a
string, a negative or a zero where none makes sense fails at once with one line naming the key and the valid range,
instead of a TypeError deep in the run or, worse, a run that finishes "ok" having done the wrong thing.

    check(cfg.task, "task", {"max_steps": integer(lo=1), "optimizer.lr": number(gt=0)})
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from runner.common import ConfigError


@dataclass(frozen=True)
class Rule:
    """A number's type and range. Bounds are inclusive (lo, hi) or exclusive (gt, lt); None: unbounded."""

    integral: bool
    lo: float | None = None
    gt: float | None = None
    hi: float | None = None
    lt: float | None = None
    null: bool = False  # null is a valid value (its meaning is in the YAML comment)

    def ok(self, value) -> bool:
        if value is None:
            return self.null
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integral and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        return not (
            (self.lo is not None and value < self.lo)
            or (self.gt is not None and value <= self.gt)
            or (self.hi is not None and value > self.hi)
            or (self.lt is not None and value >= self.lt)
        )

    def describe(self) -> str:
        kind = "an integer" if self.integral else "a number"
        low = ("[", self.lo) if self.lo is not None else ("(", self.gt) if self.gt is not None else None
        high = ("]", self.hi) if self.hi is not None else (")", self.lt) if self.lt is not None else None
        if low and high:  # an interval: (0, 1]
            text = f"{kind} in {low[0]}{_fmt(low[1])}, {_fmt(high[1])}{high[0]}"
        elif low:
            text = f"{kind} {'>=' if low[0] == '[' else '>'} {_fmt(low[1])}"
        elif high:
            text = f"{kind} {'<=' if high[0] == ']' else '<'} {_fmt(high[1])}"
        else:
            text = kind
        return text + (", or null" if self.null else "")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def integer(lo: int | None = None, hi: int | None = None, null: bool = False) -> Rule:
    return Rule(integral=True, lo=lo, hi=hi, null=null)


def number(
    lo: float | None = None,
    gt: float | None = None,
    hi: float | None = None,
    lt: float | None = None,
    null: bool = False,
) -> Rule:
    return Rule(integral=False, lo=lo, gt=gt, hi=hi, lt=lt, null=null)


def check(node: DictConfig, prefix: str, rules: Mapping[str, Rule]) -> None:
    """Raise a one-line ConfigError for the first key of `rules` (dotted, under `node`) whose value breaks its rule."""
    for key, rule in rules.items():
        value = OmegaConf.select(node, key, throw_on_missing=True)
        if not rule.ok(value):
            raise ConfigError(f"{prefix}.{key}={value!r} is not valid: use {rule.describe()}")


def within_context(lengths: Mapping[str, int | None], context_len: int) -> None:
    """Refuse a length knob (`{"task.max_seq_len": 4096}`; None: not used) longer than the model's context: it would
    run on positions the model was never trained for."""
    for key, n in lengths.items():
        if n is not None and n > context_len:
            raise ConfigError(
                f"{key}={n} exceeds the model's context of {context_len} tokens (model.max_position_embeddings); "
                f"lower {key}"
            )


def string_list(node: DictConfig, prefix: str, key: str) -> list[str]:
    """A list-of-strings knob; a single string is taken deliberately as a one-element list (task.stop="Q:" means
    ["Q:"], never its characters)."""
    value = node[key]
    if isinstance(value, str):
        return [value]
    items = list(value) if OmegaConf.is_list(value) else None
    if items is None or not all(isinstance(s, str) for s in items):
        raise ConfigError(f"{prefix}.{key}={value!r} is not valid: use a list of strings, e.g. {prefix}.{key}=[a,b]")
    return items
