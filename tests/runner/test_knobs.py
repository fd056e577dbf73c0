"""runner/knobs.py, and the fuzz test of issue 16: every numeric task and quantizer knob, fed a string, a negative
number and zero, on the tiny model, stops the run with one line naming the key, exit code != 0, no traceback and
status.json "failed". In process (run_stage, as `python -m runner` calls it) to stay fast: the checks run before
any model is loaded."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import CONF_DIR
from omegaconf import OmegaConf

from quant import QUANTIZERS
from runner import eval as eval_stage
from runner import export, finetune, generate, quantize
from runner.common import ConfigError
from runner.knobs import check, integer, number, string_list
from runner.rundir import run_stage

STAGES = {"finetune": finetune, "generate": generate, "eval": eval_stage, "quantize": quantize, "export": export}

# Keys where zero is a meaningful setting (the YAML comment says which): zero must pass the check.
ZERO_OK = {
    "task.temperature",  # greedy
    "task.seed",
    "task.num_fewshot",
    "task.bootstrap_iters",  # no stderr
    "task.optimizer.weight_decay",
    "task.scheduler.warmup_steps",
    "task.scheduler.min_lr_ratio",
    "task.lora.dropout",
    "quantizer.percdamp",
    "quantizer.seed",
}


def _numeric_leaves(node, prefix: str) -> list[str]:
    """Dotted keys of the YAML's numeric values (lists such as betas are not knobs of one number)."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _numeric_leaves(v, f"{prefix}.{key}")]
    is_number = isinstance(node, int | float) and not isinstance(node, bool)
    is_seed_interpolation = node == "${seed}"
    return [prefix] if is_number or is_seed_interpolation else []


def _cases() -> list[tuple[str, str, str]]:
    """(stage, extra override, dotted key) for every numeric knob: the stage's table plus every numeric value in its
    YAML (so a new numeric knob without a rule fails here), and every quantizer's numeric knobs."""
    cases = []
    for name, stage in STAGES.items():
        yaml_keys = _numeric_leaves(yaml.safe_load((CONF_DIR / "task" / f"{name}.yaml").read_text()), "task")
        table = [f"task.{k}" for k in stage.KNOBS]
        missing = sorted(set(yaml_keys) - set(table))
        assert not missing, f"{name}: numeric knobs without a rule in {stage.__name__}.KNOBS: {missing}"
        extra = "quantizer=int8_wo" if name == "quantize" else ""
        cases += [(name, extra, k) for k in table]
    cases.append(("finetune", "", "data.val_size"))
    for q in QUANTIZERS:
        path = CONF_DIR / "quantizer" / f"{q}.yaml"
        for key in _numeric_leaves(yaml.safe_load(path.read_text()), "quantizer"):
            cases.append(("quantize", f"quantizer={q}", key))
    return cases


CASES = _cases()


@pytest.mark.parametrize("stage_name, extra, key", CASES, ids=[f"{c[0]}-{c[1] or 'base'}-{c[2]}" for c in CASES])
def test_bad_numeric_value_fails_with_one_line_naming_the_key(compose, tmp_path, capsys, stage_name, extra, key):
    cfg = compose([f"task={stage_name}", "debug=smoke", *([extra] if extra else [])])
    values = ["abc", -3] + ([] if key in ZERO_OK else [0])
    for value in values:
        OmegaConf.update(cfg, key, value, force_add=False)
        with pytest.raises(SystemExit) as exit_info:
            run_stage(cfg, STAGES[stage_name].run)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert exit_info.value.code not in (0, None), (key, value)
        assert len(lines) == 1 and "Traceback" not in err, (key, value, err)
        assert f"{key}={value!r}" in lines[0], (key, value, lines[0])
        status = json.loads((tmp_path / "run" / "status.json").read_text())
        assert status["status"] == "failed" and key in status["error"], (key, value, status["error"])
    if key in ZERO_OK:  # zero is a valid setting of this key: its check lets it through
        group, _, name = key.partition(".")
        if group == "task":
            assert STAGES[stage_name].KNOBS[name].ok(0), key
        elif group == "quantizer":
            assert QUANTIZERS[cfg.quantizer.name].knobs[name](0) is None, key


def test_rule_messages_give_the_valid_range(compose):
    cfg = compose(["task=generate", "debug=smoke", "task.top_p=2"])
    with pytest.raises(ConfigError, match=r"^task.top_p=2 is not valid: use a number in \(0, 1\]$"):
        check(cfg.task, "task", generate.KNOBS)
    assert integer(lo=1, null=True).describe() == "an integer >= 1, or null"
    assert not integer(lo=0).ok(True) and not integer(lo=0).ok(1.5) and not number(lo=0).ok(float("nan"))
    assert number(gt=0).ok(1) and integer(lo=1, null=True).ok(None)


def test_a_stop_string_is_one_stop_string_not_its_characters(compose):
    # issue 16: task.stop=Question: was split into characters, stopping at the first Q, u, e, ...
    cfg = compose(["task=generate", "debug=smoke", "task.stop=Question:"])
    assert string_list(cfg.task, "task", "stop") == ["Question:"]
    assert generate._check_knobs(cfg.task) == ["Question:"]
    cfg = compose(["task=generate", "debug=smoke", "task.stop=[a,bc]"])
    assert generate._check_knobs(cfg.task) == ["a", "bc"]
    cfg = compose(["task=generate", "debug=smoke", "task.stop=[1,2]"])
    with pytest.raises(ConfigError, match=r"task.stop=.*a list of strings"):
        generate._check_knobs(cfg.task)
