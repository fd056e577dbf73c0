"""Every option of every config group composes, resolves, and its `_target_`s instantiate (litgpt's config-hub idea)."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from models.llama import ModelArgs

CONF = Path(__file__).resolve().parents[2] / "conf"
# Groups whose options are chosen on the command line as group=option.
GROUPS = ["task", "model", "quantizer", "checkpointer", "data", "logger", "paths", "experiment", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS if (CONF / g).is_dir() for p in sorted((CONF / g).glob("*.yaml"))]
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))


def _targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node
        for v in node.values():
            yield from _targets(v)
    elif isinstance(node, list):
        for v in node:
            yield from _targets(v)


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(compose, group, option):
    if group == "experiment":  # an experiment picks its own task; smoke keeps it tiny
        overrides = [f"experiment={option}", "debug=smoke"]
    elif group == "task":
        overrides = [f"task={option}"]
    else:
        overrides = ["task=generate", f"{group}={option}"]
    cfg = compose(overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if resolved["model"]["args"] is not None:
        ModelArgs.from_dict(resolved["model"]["args"])
    for node in _targets(resolved):
        assert instantiate(node) is not None


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_a_smoke_variant_and_a_stage(compose, task):
    from runner.stages import STAGES

    cfg = compose([f"task={task}", "debug=smoke"])
    assert cfg.task.name == task and cfg.model.name == "tiny"
    assert task in STAGES
    assert (CONF / "debug_task" / f"smoke_{task}.yaml").is_file()


def test_typo_in_a_key_fails_in_struct_mode(compose):
    cfg = compose(["task=generate"])
    with pytest.raises(Exception, match="max_new_tokns"):
        cfg.task.max_new_tokns  # noqa: B018 - the access itself must fail


def test_checkpointer_auto_follows_the_model_format(compose):
    assert compose(["task=generate"]).checkpointer.name == "gguf"
    assert compose(["task=generate", "model=llama3_2_1b"]).checkpointer.name == "hf"
    assert compose(["task=generate", "checkpointer=native", "checkpointer.path=/x"]).checkpointer.name == "native"


def test_smoke_gptq_calibrates_within_the_tiny_context(compose):
    # A GPTQ smoke run's windows must fit the tiny model's context (longer ones are refused at start-up), and
    # debug=smoke must not touch other quantizers or runs without debug.
    cfg = compose(["task=quantize", "quantizer=gptq", "debug=smoke"])
    assert cfg.quantizer.seqlen <= cfg.model.args.max_position_embeddings
    assert compose(["task=quantize", "quantizer=gptq"]).quantizer.seqlen == 1024
    assert "seqlen" not in compose(["task=quantize", "quantizer=int4_wo", "debug=smoke"]).quantizer
