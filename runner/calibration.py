"""Calibration data for GPTQ: `nsamples` random windows of `seqlen` tokens from one tokenized corpus.

`quantizer.calibration` names a corpus under `paths.data_dir` or a file:
- `c4`: `c4/c4_demo.jsonl` (300 C4 documents, field `text`); the default, as in the GPTQ paper.
- `wikitext2`: `wikitext2/wiki.train.raw`, the split the GPTQ reference calibrates on. The shared data root has
  only the test split, which the quality check scores, so this name is usable once the train split is added.
- `alpaca`: `instruct/alpaca_5000.json` (instruction, input and output of each record).
- `tinyshakespeare`: `tinyshakespeare/input.txt`.
- any other value: a `.txt`, `.json` (array) or `.jsonl` file, absolute or under `paths.data_dir`. A json record is
  its `text` field when it has one, else its string fields joined by newlines; a plain string is itself.

`quantizer.sampling` picks how the windows are drawn (a torch generator seeded with `quantizer.seed`, no BOS):
- `corpus`: the documents are joined with blank lines and tokenized once; each window starts at a uniformly random
  token offset, so windows may overlap and may cross document boundaries.
- `document`: the GPTQ reference's C4 sampler: each window lies inside one document, drawn uniformly among those
  longer than `seqlen` tokens, at a uniformly random offset. A txt file is one document. Of the C4 sample's 300
  documents, 13 are longer than 2048 tokens (SmolLM2's tokenizer), so at seqlen 2048 the windows repeat documents.

The windows are cached under `paths.cache_dir/calibration/` keyed by the tokenizer, the corpus bytes, nsamples,
seqlen, seed, sampling and this module's code, so the jobs of a sweep tokenize and sample once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from models.atomic import atomic_path
from models.tokenizer import Tokenizer
from quant.gptq import SAMPLING
from runner.common import ConfigError, data_path, read_text

log = logging.getLogger(__name__)

CORPORA = {
    "c4": "c4/c4_demo.jsonl",
    "wikitext2": "wikitext2/wiki.train.raw",
    "alpaca": "instruct/alpaca_5000.json",
    "tinyshakespeare": "tinyshakespeare/input.txt",
}
SUFFIXES = (".txt", ".raw", ".json", ".jsonl")


def corpus_path(cfg: DictConfig) -> Path:
    """The file behind quantizer.calibration, with an error that says how to provide it when it is missing."""
    name = cfg.quantizer.calibration
    if name in CORPORA:
        p = Path(cfg.paths.data_dir).expanduser().resolve() / CORPORA[name]
        if not p.is_file():
            raise ConfigError(
                f"{p}: calibration data for quantizer.calibration={name} not found; put the file there, point "
                f"paths.data_dir (or LMRUNNER_DATA_DIR) at a data root that has {CORPORA[name]}, or set "
                "quantizer.calibration=PATH to a txt/json/jsonl file"
            )
        return p
    p = data_path(cfg, name, "quantizer.calibration")
    if p.suffix not in SUFFIXES:
        raise ConfigError(
            f"quantizer.calibration={name}: unknown corpus or file type; use one of {', '.join(CORPORA)} "
            f"or a file ending in {', '.join(SUFFIXES)}"
        )
    return p.resolve()


def _record_text(record, path: Path) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"]
        return "\n".join(v for v in record.values() if isinstance(v, str) and v)
    raise ConfigError(f"{path}: calibration records must be strings or objects, got {type(record).__name__}")


def read_documents(path: Path) -> list[str]:
    """The corpus's documents: the records of a json/jsonl file, or a txt file whole."""
    raw = read_text(path, "quantizer.calibration")
    if path.suffix in (".txt", ".raw"):
        return [raw]
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            records = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid {path.suffix[1:]} ({e}); fix the file or use a .txt corpus") from e
    if not isinstance(records, list):
        raise ConfigError(f"{path}: a .json calibration file must hold an array of records")
    return [t for t in (_record_text(r, path) for r in records) if t]


def read_corpus(path: Path) -> str:
    """The whole corpus as one string: documents joined by blank lines."""
    return "\n\n".join(read_documents(path))


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows [N, T] of `seqlen` consecutive tokens at uniformly random offsets of `ids` [L]."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=g)  # [N]
    return ids[starts[:, None] + torch.arange(seqlen)]  # [N, T]


def sample_document_windows(docs: list[torch.Tensor], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows [N, T], each inside one of `docs` (token ids [L_i]) longer than `seqlen`: the document
    uniformly among those, the offset uniformly within it (the GPTQ reference's C4 sampler)."""
    long_docs = [d for d in docs if d.numel() > seqlen]
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(nsamples, seqlen, dtype=torch.long)
    for n in range(nsamples):
        d = long_docs[int(torch.randint(len(long_docs), (), generator=g))]
        start = int(torch.randint(d.numel() - seqlen, (), generator=g))
        out[n] = d[start : start + seqlen]
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def calibration_windows(cfg: DictConfig, tokenizer: Tokenizer) -> torch.Tensor:
    """Token windows [quantizer.nsamples, quantizer.seqlen] (int64) for quantizer.calibration, cached on disk."""
    q = cfg.quantizer
    if q.nsamples < 1 or q.seqlen < 2:
        raise ConfigError(f"quantizer.nsamples={q.nsamples}, quantizer.seqlen={q.seqlen}: need nsamples>=1, seqlen>=2")
    if q.sampling not in SAMPLING:
        raise ConfigError(f"quantizer.sampling={q.sampling}: use one of {', '.join(SAMPLING)}")
    path = corpus_path(cfg)
    key = {
        "tokenizer": _sha256(tokenizer.tok.to_str().encode()),
        "corpus": _sha256(path.read_bytes()),
        "nsamples": q.nsamples,
        "seqlen": q.seqlen,
        "seed": q.seed,
        "sampling": q.sampling,
        "code": _sha256(Path(__file__).read_bytes()),  # how windows are read and drawn: a change is a new entry
    }
    cache = Path(cfg.paths.cache_dir).expanduser() / "calibration" / f"{_sha256(json.dumps(key).encode())}.safetensors"
    if cache.is_file():
        log.info("calibration windows from cache %s", cache)
        return load_file(str(cache))["input_ids"]
    if q.sampling == "document":
        docs = [torch.tensor(tokenizer.encode(d, bos=False), dtype=torch.long) for d in read_documents(path)]
        if not any(d.numel() > q.seqlen for d in docs):
            raise ConfigError(
                f"{path}: no document is longer than quantizer.seqlen={q.seqlen} tokens; lower quantizer.seqlen or "
                "use quantizer.sampling=corpus"
            )
        windows = sample_document_windows(docs, q.nsamples, q.seqlen, q.seed)
        n_tokens = sum(d.numel() for d in docs)
    else:
        ids = torch.tensor(tokenizer.encode(read_corpus(path), bos=False), dtype=torch.long)  # [L]
        if ids.numel() < q.seqlen:
            raise ConfigError(
                f"{path}: {ids.numel()} tokens, fewer than quantizer.seqlen={q.seqlen}; use a longer corpus or lower "
                "seqlen"
            )
        windows = sample_windows(ids, q.nsamples, q.seqlen, q.seed)
        n_tokens = ids.numel()
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        metadata = {k: str(v) for k, v in key.items()} | {"path": str(path)}
        save_file({"input_ids": windows}, str(tmp), metadata=metadata)
    log.info(
        "calibration: %d windows of %d tokens from %s (%d tokens, sampling=%s)",
        q.nsamples,
        q.seqlen,
        path,
        n_tokens,
        q.sampling,
    )
    return windows
