"""task=eval: the local lm-eval task definitions over the shared data, the stage end to end on the tiny model
(float and a quantized native checkpoint), its bad-input errors, and (slow) SmolLM2 task scores against lm-eval's
own HF backend."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_cli, run_in_process
from lm_eval.tasks import TaskManager

import runner.eval
from runner import common
from runner.rundir import run_dir, run_stage

LOCAL = ["wikitext", "hellaswag", "arc_easy", "arc_challenge", "piqa", "lambada_openai", "winogrande"]


@pytest.fixture(scope="module")
def local_tasks(data_dir):
    tm = TaskManager(
        include_path=str(runner.eval.TASK_DIR), include_defaults=False, metadata={"data_dir": str(data_dir)}
    )
    return tm.load(LOCAL)["tasks"]


# --- the task definitions ---------------------------------------------------------------------------------------
def test_local_tasks_load_every_document(local_tasks):
    """Document counts of the local splits (PROVENANCE.md); lm-eval's functions named in the YAMLs resolve."""
    counts = {name: len(list(task.eval_docs)) for name, task in local_tasks.items()}
    assert counts == {
        "wikitext": 62,  # articles of the WikiText-2 test split, as EleutherAI/wikitext_document_level has them
        "hellaswag": 10042,
        "arc_easy": 2376,
        "arc_challenge": 1150,  # of 1172: the local copy lacks the numeric-key questions
        "piqa": 1838,
        "lambada_openai": 5153,
        "winogrande": 1267,
    }


def _first(task):
    doc = next(iter(task.eval_docs))
    choices = task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None
    return doc, task.doc_to_text(doc), task.doc_to_target(doc), choices


def test_prompts_follow_lm_eval(local_tasks):
    doc, text, target, choices = _first(local_tasks["hellaswag"])
    # ctx_b ("he") is capitalized by lm-eval's process_docs, as from the original fields.
    assert text == "Roof shingle removal: A man is sitting on a roof. He"
    assert choices[3] == "starts pulling up roofing on a roof." and target == 3

    doc, text, target, choices = _first(local_tasks["arc_easy"])
    assert text.startswith("Question: Which statement best explains why photosynthesis") and text.endswith("\nAnswer:")
    assert len(choices) == 4 and choices[target] == "Sunlight is the source of energy for nearly all ecosystems."

    doc, text, target, choices = _first(local_tasks["piqa"])
    assert text == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert target == 0 and len(choices) == 2

    doc, text, target, choices = _first(local_tasks["winogrande"])
    assert choices == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert text == 1 and target == "always got the easier cases."

    doc, text, target, _ = _first(local_tasks["lambada_openai"])
    assert target == " signs" and not text.endswith(" ")

    doc, text, target, _ = _first(local_tasks["wikitext"])
    assert doc["page"].startswith(" = Robert Boulter = \n Robert Boulter is an English film")
    assert "@-@" in doc["page"] and "@-@" not in target  # lm-eval's detokenizer applied to the target


def test_labels_match_their_files(local_tasks, data_dir):
    piqa = [d["label"] for d in local_tasks["piqa"].eval_docs]
    assert piqa == [int(x) for x in (data_dir / "eval/piqa/valid-labels.lst").read_text().split()]
    wino = [d["answer"] for d in local_tasks["winogrande"].eval_docs]
    assert wino == (data_dir / "eval/winogrande/dev-labels.lst").read_text().split()
    # ARC-Easy keeps its numeric answer keys: the gold index is found among the numeric labels.
    arc = [d for d in local_tasks["arc_easy"].eval_docs if d["answerKey"].isdigit()]
    assert arc and all(
        local_tasks["arc_easy"].doc_to_target(d) == d["choices"]["label"].index(d["answerKey"]) for d in arc
    )


# --- the stage --------------------------------------------------------------------------------------------------
def test_smoke_end_to_end(compose):
    cfg = compose(["task=eval", "debug=smoke"])
    metrics = run_stage(cfg, runner.eval.run)  # as python -m runner runs it: metrics.jsonl is written by the wrapper
    out = run_dir()
    for key in ("hellaswag/acc", "hellaswag/acc_norm", "arc_easy/acc", "arc_easy/acc_norm", "wikitext2_ppl/ppl"):
        assert math.isfinite(metrics[f"eval/{key}"]), key
    assert metrics["eval/wikitext2_ppl/windows"] == 2
    results = json.loads((out / "results.json").read_text())
    assert results["n-samples"]["hellaswag"]["effective"] == 4
    assert results["config"]["model"] == "tiny" and "samples" not in results
    assert (
        json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["eval/hellaswag/acc"]
        == metrics["eval/hellaswag/acc"]
    )


def test_every_local_task_with_sample_logs(compose):
    tasks = "[wikitext,arc_challenge,piqa,lambada_openai,winogrande]"
    cfg = compose(["task=eval", "debug=smoke", f"task.tasks={tasks}", "task.limit=1", "task.log_samples=true"])
    metrics = run_in_process(runner.eval, cfg)
    for key in (
        "wikitext/word_perplexity",
        "wikitext/byte_perplexity",
        "wikitext/bits_per_byte",
        "arc_challenge/acc_norm",
        "piqa/acc_norm",
        "lambada_openai/perplexity",
        "lambada_openai/acc",
        "winogrande/acc",
    ):
        assert math.isfinite(metrics[f"eval/{key}"]), key
    for task in ("wikitext", "arc_challenge", "piqa", "lambada_openai", "winogrande"):
        rows = (run_dir() / f"samples_{task}.jsonl").read_text().splitlines()
        assert len(rows) == 1 and "resps" in json.loads(rows[0])


def test_num_fewshot_and_seed(compose):
    """Few-shot examples come from the local validation split (ARC's dev file), drawn with task.seed."""
    overrides = ["task.tasks=[arc_easy]", "task.limit=2", "task.num_fewshot=2", "task.log_samples=true"]
    contexts = []
    for run, seed in (("a", 1), ("b", 2)):
        run_in_process(
            runner.eval, compose(["task=eval", "debug=smoke", *overrides, f"task.seed={seed}"], run_name=run)
        )
        rows = [json.loads(x) for x in (run_dir() / "samples_arc_easy.jsonl").read_text().splitlines()]
        contexts.append([r["arguments"][0][0] for r in rows])  # [request][context, continuation]
        assert json.loads((run_dir() / "results.json").read_text())["n-shot"]["arc_easy"] == 2
    assert all(c.count("Question:") == 3 for c in contexts[0])
    assert contexts[0] != contexts[1]


def test_apply_chat_template_and_fewshot_as_multiturn(compose):
    """As lm-eval's --apply_chat_template: each prompt rendered with the chat template, few-shot examples as
    user/assistant turns (fewshot_as_multiturn null follows apply_chat_template; false keeps them in one turn)."""
    overrides = ["task.tasks=[arc_easy]", "task.limit=1", "task.num_fewshot=1", "task.log_samples=true"]
    contexts = {}
    for run, extra in (("multi", []), ("single", ["task.fewshot_as_multiturn=false"])):
        cfg = compose(["task=eval", "debug=smoke", *overrides, "task.apply_chat_template=true", *extra], run_name=run)
        run_in_process(runner.eval, cfg)
        row = json.loads((run_dir() / "samples_arc_easy.jsonl").read_text().splitlines()[0])
        contexts[run] = row["arguments"][0][0]
    # The tiny tokenizer's template: <s>{role}\n{content}</s>\n per message, then <s>assistant\n.
    assert contexts["multi"].startswith("<s>user\nQuestion:") and contexts["multi"].endswith("<s>assistant\n")
    assert contexts["multi"].count("<s>user\n") == 2 and contexts["multi"].count("<s>assistant\n") == 2
    assert contexts["single"].count("<s>user\n") == 1 and contexts["single"].count("Question:") == 2


def test_quantized_native_checkpoint(compose, tmp_path):
    """checkpointer=native over an int4 checkpoint: the quantized model is rebuilt from its sidecars and scored."""
    from models.checkpoint import save_native
    from quant import quantize_model

    model, tok = common.load_model(compose(["task=eval", "debug=smoke"], run_name="load"))
    q = {"name": "int4_wo", "groupsize": 32, "sym": False}
    save_native(tmp_path / "q", quantize_model(model, q), tok, q)
    path = tmp_path / "q"
    overrides = ["task.tasks=[arc_easy,wikitext2_ppl]", "checkpointer=native", f"checkpointer.path={path}"]
    cfg = compose(["task=eval", "debug=smoke", *overrides])
    metrics = run_in_process(runner.eval, cfg)
    assert math.isfinite(metrics["eval/arc_easy/acc_norm"]) and math.isfinite(metrics["eval/wikitext2_ppl/ppl"])


@pytest.mark.parametrize(
    "override, message",
    [
        pytest.param(
            "task.tasks=[hellaswag,no_such_task]",
            "unknown task 'no_such_task'; local tasks: wikitext2_ppl, arc_challenge",
            marks=pytest.mark.slow,  # indexing lm-eval's whole registry first takes tens of seconds
        ),
        ("task.limit=0", "task.limit=0 is not valid: use a number > 0, or null"),
        ("task.limit=-3", "task.limit=-3 is not valid: use a number > 0, or null"),
        ("task.tasks=[]", "task.tasks is empty"),
        ("task.max_length=512", "task.max_length=512 exceeds the model's context of 256 tokens"),
        ("task.ppl_seqlen=300", "task.ppl_seqlen=300 exceeds the model's context of 256 tokens"),
        ("quantizer=gptq", "quantizer=gptq needs calibration, which only task=quantize runs"),
        ("task.fewshot_as_multiturn=true", "task.fewshot_as_multiturn=true needs task.apply_chat_template=true"),
    ],
)
def test_bad_input(compose, override, message):
    with pytest.raises(common.ConfigError, match=message.replace("[", r"\[")):
        run_in_process(runner.eval, compose(["task=eval", "debug=smoke", override]))


def test_cli_calibrating_quantizer_fails_with_one_line(tmp_path, data_dir):
    """quantizer=gptq cannot be applied at load time: one error line saying how to get a GPTQ checkpoint."""
    run = tmp_path / "run"
    args = ["task=eval", "debug=smoke", "quantizer=gptq", f"paths.data_dir={data_dir}", f"hydra.run.dir={run}"]
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "task=quantize" in errors[0] and "checkpointer=native" in errors[0]
    assert "Traceback" not in r.stderr
    assert json.loads((run / "status.json").read_text())["status"] == "failed"


def test_missing_data_file_names_it_and_the_root(compose, tmp_path):
    empty = tmp_path / "empty_data"
    empty.mkdir()
    cfg = compose(["task=eval", "debug=smoke", "task.tasks=[piqa]", f"paths.data_dir={empty}"])
    with pytest.raises(common.ConfigError, match=rf"{empty}/eval/piqa/valid.jsonl: data file not found.*{empty}"):
        run_in_process(runner.eval, cfg)


def test_cli_bad_input_is_one_line(tmp_path, data_dir):
    r = run_cli(
        ["task=eval", "debug=smoke", "task.limit=0", f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}"],
        tmp_path,
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: task.limit=0 is not valid: use a number > 0")


# --- SmolLM2 against lm-eval's HF backend -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf, tmp_path_factory):
    """SmolLM2 as an HF directory, converted through our GGUF checkpointer and models.checkpoint.save_hf."""
    from models.checkpoint import load_checkpoint, save_hf
    from models.llama import Transformer

    args, sd, tok, _ = load_checkpoint("gguf", smollm2_gguf)
    model = Transformer(args)
    model.load_state_dict(sd)
    return save_hf(tmp_path_factory.mktemp("smollm2_hf"), model, tok)


@pytest.mark.slow
def test_smollm2_task_scores_match_hflm(smollm2_hf, data_dir):
    """A few dozen documents of every local task (2 WikiText articles): equal accuracies, perplexities within 1e-4."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from models.checkpoint import load_checkpoint
    from models.llama import Transformer
    from runner.lm_eval_adapter import LMEvalModel

    args, sd, tok, _ = load_checkpoint("hf", smollm2_hf)
    model = Transformer(args)
    model.load_state_dict(sd)
    ours = LMEvalModel(model.eval(), tok, 8, None, 256, 0)
    theirs = HFLM(pretrained=str(smollm2_hf), batch_size=8, device="cpu", dtype="float32")
    tm = TaskManager(
        include_path=str(runner.eval.TASK_DIR), include_defaults=False, metadata={"data_dir": str(data_dir)}
    )

    def scores(lm, tasks, limit):
        r = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, bootstrap_iters=0)
        return {(t, k): v for t, res in r["results"].items() for k, v in res.items() if isinstance(v, float)}

    for tasks, limit in ((LOCAL[1:], 24), (["wikitext"], 2)):
        got, ref = scores(ours, tasks, limit), scores(theirs, tasks, limit)
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            assert got[key] == pytest.approx(value, rel=1e-4), key
