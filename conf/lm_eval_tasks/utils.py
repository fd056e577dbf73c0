"""Dataset loaders for the lm-eval task YAMLs in this folder (`custom_dataset: !function utils.<loader>`).

Each loader reads the local copy of a benchmark under paths.data_dir (layouts: shared/data/PROVENANCE.md) and returns
the rows of the Hugging Face dataset that lm-eval's own task reads, with the same field names and types. The YAMLs
then apply lm-eval's definitions unchanged (prompts, process_docs, metrics), so only the reading of files is ours.

lm-eval calls a loader as `custom_dataset(**task metadata, **dataset_kwargs)`: `data_dir` comes from the metadata
that runner/eval.py gives the TaskManager, `files` (and `labels`) from the YAML's dataset_kwargs, as
{split: path relative to data_dir}. Other metadata keys (version, config_source) are ignored.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
from lm_eval.tasks.hellaswag import utils as hellaswag


def _read(data_dir: str, rel: str) -> str:
    return (Path(data_dir) / rel).read_text(encoding="utf-8")


def _jsonl(data_dir: str, rel: str) -> list[dict]:
    return [json.loads(line) for line in _read(data_dir, rel).splitlines() if line.strip()]


def _splits(rows_of, files: dict[str, str]) -> datasets.DatasetDict:
    """{split: dataset} from `rows_of(path)`, which returns a list of row dicts or a Dataset."""
    out = {}
    for split, rel in files.items():
        rows = rows_of(rel)
        out[split] = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(out)


def jsonl_rows(data_dir: str, files: dict[str, str], **_) -> datasets.DatasetDict:
    """Files already in the HF row layout: LAMBADA (OpenAI) `text`; WinoGrande `sentence, option1, option2, answer`."""
    return _splits(lambda rel: _jsonl(data_dir, rel), files)


# A WikiText level-1 heading line is " = Title = "; deeper levels repeat the "=" (" = = Section = = ").
_TITLE = re.compile(r" = [^=].* = ")


def wikitext_documents(data_dir: str, files: dict[str, str], **_) -> datasets.DatasetDict:
    """WikiText-2 raw as EleutherAI/wikitext_document_level: one row {"page"} per article.

    Articles start at level-1 heading lines and a page is its lines joined with "\\n", as that dataset builds them.
    The local file lacks the blank (" ") lines of the original (PROVENANCE.md), so pages miss them: word counts
    (lm-eval's word_perplexity denominator) are unchanged, byte counts are 0.2% lower.
    """

    def pages(rel: str) -> list[dict]:
        out: list[list[str]] = []
        for line in _read(data_dir, rel).splitlines():
            if _TITLE.fullmatch(line) or not out:
                out.append([])
            out[-1].append(line)
        return [{"page": "\n".join(lines)} for lines in out]

    return _splits(pages, files)


# The context's last piece when it is an unfinished, lower-case clause ("A man is sitting on a roof. he").
_CLAUSE = re.compile(r"(?:^|(?<=[.!?] ))[a-z][^.!?]*$")


def hellaswag_rows(data_dir: str, files: dict[str, str], **_) -> datasets.DatasetDict:
    """HellaSwag from llama.cpp's 6-line layout (`activity_label: ctx`, gold label, 4 endings) as Rowan/hellaswag
    rows, then lm-eval's own hellaswag process_docs (query, choices, gold).

    process_docs builds the query from `ctx_a + " " + ctx_b.capitalize()`, but the layout keeps only
    `ctx = ctx_a + " " + ctx_b`. ctx_b is taken to be a trailing lower-case clause (ActivityNet items, where it is
    the sentence the endings complete), else empty; the other rows then give the same query as the original fields.
    process_docs runs here, once: named in the YAML, lm-eval would re-run it each time it lists the documents
    (an in-memory dataset's map is not cached), 4 times per run over 10042 rows.
    """

    def rows(rel: str) -> list[dict]:
        lines = _read(data_dir, rel).splitlines()
        out = []
        for i in range(0, len(lines) - len(lines) % 6, 6):
            label, _, ctx = lines[i].partition(": ")
            m = _CLAUSE.search(ctx)
            ctx_a, ctx_b = (ctx[: m.start()].rstrip(), m.group()) if m and m.start() else (ctx, "")
            out.append(
                {
                    "activity_label": label,
                    "ctx_a": ctx_a,
                    "ctx_b": ctx_b,
                    "ctx": ctx,
                    "endings": lines[i + 2 : i + 6],
                    "label": lines[i + 1],
                }
            )
        return out

    return _splits(lambda rel: hellaswag.process_docs(datasets.Dataset.from_list(rows(rel))), files)


def arc_rows(data_dir: str, files: dict[str, str], **_) -> datasets.DatasetDict:
    """AI2 ARC from the original nested jsonl (`question.stem`, `question.choices[]`) as allenai/ai2_arc rows
    (`question`, `choices: {text, label}`, `answerKey`). The extra `para` field of the local ARC-Easy copy is dropped."""

    def rows(rel: str) -> list[dict]:
        return [
            {
                "id": r["id"],
                "question": r["question"]["stem"],
                "choices": {
                    "text": [c["text"] for c in r["question"]["choices"]],
                    "label": [c["label"] for c in r["question"]["choices"]],
                },
                "answerKey": r["answerKey"],
            }
            for r in _jsonl(data_dir, rel)
        ]

    return _splits(rows, files)


def piqa_rows(data_dir: str, files: dict[str, str], labels: dict[str, str], **_) -> datasets.DatasetDict:
    """PIQA from the authors' files: `goal, sol1, sol2` jsonl plus a labels file (one 0/1 a line) per split."""

    def rows(split: str) -> list[dict]:
        docs = _jsonl(data_dir, files[split])
        gold = _read(data_dir, labels[split]).split()
        if len(gold) != len(docs):
            raise ValueError(f"{labels[split]}: {len(gold)} labels for {len(docs)} rows of {files[split]}")
        return [{**d, "label": int(g)} for d, g in zip(docs, gold, strict=True)]

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows(split)) for split in files})
