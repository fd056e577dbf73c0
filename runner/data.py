"""Finetune data: records on disk -> (token ids, loss labels) examples -> padded, shifted batches.

Formats (`data.format`, chosen in conf/data/*.yaml; never guessed from the file name):
- `instruct`: records with `instruction`, `input`, `output` and optionally `history` ([[user, assistant], ...], as
  LLaMA-Factory's LIMA file). A JSON array or JSONL, told apart by the first character. Each record becomes a
  conversation: earlier `history` turns, then user = instruction (+ blank line + input), assistant = output.
- `messages`: JSONL (or a JSON array) of {"messages": [{"role": ..., "content": ...}, ...]}.
- `text`: a plain text file for continued pre-training: tokenized as one stream and cut into blocks.

Conversations are rendered with the tokenizer's chat template, unless `data.prompt_template` (instruct only) gives a
plain prompt such as "{instruction}\\n{input}\\n" for base models without one; the response then ends with EOS.
Labels are -100 (ignored by the loss) on every prompt token unless `task.train_on_prompt`, so the model trains on
responses only. To find the prompt/response boundary without tokenizer-specific offsets, the template is rendered once
per assistant turn: the prefix up to the turn's generation prompt is prompt, the rest of the turn is response.
Each piece is tokenized on its own, so the ids are exactly the concatenation of the pieces' ids.

Examples are truncated to `task.max_seq_len + 1` tokens (inputs and shifted targets both have max_seq_len). With
`task.packing`, training examples are concatenated and cut into full blocks (no padding; attention crosses example
boundaries, as in GPT-style pre-training, since the model takes no block-diagonal mask). The validation split is
`data.val_size` records chosen by a seeded shuffle (for text: the last `val_size` blocks).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from models.tokenizer import Tokenizer
from runner.common import ConfigError, data_path, read_text

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
FORMATS = ("instruct", "messages", "text")

Example = tuple[list[int], list[int]]  # (token ids, labels), same length


def read_records(path: Path) -> list[dict]:
    """A JSON array or JSONL file of objects (a JSON array starts with '[')."""
    text = read_text(path, "data.path")
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not a JSON array or JSONL file ({e})") from e


def to_messages(record: dict, fmt: str, path: Path) -> list[dict]:
    if fmt == "messages":
        if "messages" not in record:
            raise ConfigError(f"{path}: data.format=messages needs a 'messages' list in each record")
        return record["messages"]
    if "instruction" not in record or "output" not in record:
        raise ConfigError(f"{path}: data.format=instruct needs 'instruction' and 'output' in each record")
    msgs = []
    for user, assistant in record.get("history") or []:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [*msgs, {"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def chat_segments(tok: Tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_response) pieces, ending after the last assistant turn."""
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ConfigError(
                "the tokenizer's chat template does not render conversations incrementally, so prompt tokens "
                "cannot be masked; use data.prompt_template or task.train_on_prompt=true"
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return pieces


def encode_record(tok: Tokenizer, record: dict, data: DictConfig, train_on_prompt: bool, path: Path) -> Example:
    if data.format == "instruct" and data.prompt_template is not None:
        fields = {"instruction": record["instruction"], "input": record.get("input") or ""}
        prompt = tok.encode(data.prompt_template.format(**fields))
        pieces = [(prompt, False), (tok.encode(record["output"], bos=False) + [tok.eos_id], True)]
    else:
        # The template writes its own BOS/special tokens (HF's apply_chat_template(tokenize=True) adds none either).
        segs = chat_segments(tok, to_messages(record, data.format, path))
        pieces = [(tok.encode(text, bos=False), is_response) for text, is_response in segs]
    ids, labels = [], []
    for piece, is_response in pieces:
        ids += piece
        labels += piece if (is_response or train_on_prompt) else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _blocks(ids: list[int], labels: list[int], seq_len: int) -> list[Example]:
    # Blocks of seq_len + 1 tokens with stride seq_len: each token is a target exactly once.
    n = (len(ids) - 1) // seq_len
    return [(ids[i * seq_len : (i + 1) * seq_len + 1], labels[i * seq_len : (i + 1) * seq_len + 1]) for i in range(n)]


def load_examples(cfg: DictConfig, tok: Tokenizer) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples for cfg.data, tokenized for `tok` and cut to task.max_seq_len."""
    data, t = cfg.data, cfg.task
    if data.format not in FORMATS:
        raise ConfigError(f"data.format={data.format!r} is unknown; valid: {', '.join(FORMATS)}")
    if data.path is None:
        raise ConfigError(f"data={data.name} needs data.path=FILE (absolute or under paths.data_dir)")
    path = data_path(cfg, data.path, "data.path")
    seq = t.max_seq_len
    if data.format == "text":
        ids = tok.encode(read_text(path, "data.path"))
        blocks = _blocks(ids, ids, seq)
        if len(blocks) <= data.val_size:
            raise ConfigError(f"{path}: {len(blocks)} blocks of {seq} tokens, need more than data.val_size")
        return blocks[: len(blocks) - data.val_size], blocks[len(blocks) - data.val_size :]
    records = read_records(path)
    if len(records) <= data.val_size:
        raise ConfigError(f"{path}: {len(records)} records, need more than data.val_size={data.val_size}")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    splits = []
    for part in (order[data.val_size :], order[: data.val_size]):
        examples = [encode_record(tok, records[i], data, t.train_on_prompt, path) for i in part]
        # Truncation can cut a long prompt's whole response away; such examples teach nothing.
        examples = [(ids[: seq + 1], lab[: seq + 1]) for ids, lab in examples]
        splits.append([e for e in examples if any(x != IGNORE_INDEX for x in e[1][1:])])
    train, val = splits
    if t.packing:
        train = _blocks([x for e in train for x in e[0]], [x for e in train for x in e[1]], seq)
    if not train or not val:
        raise ConfigError(f"{path}: no trainable examples at task.max_seq_len={seq}; raise it")
    return train, val


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs [B, T] and next-token targets [B, T] (targets are labels shifted left by one)."""
    T = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labels) in enumerate(examples):
        inputs[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[i, : len(ids) - 1] = torch.tensor(labels[1:])
    return inputs, targets


def micro_batches(
    examples: list[Example], indices: list[int], size: int, rank: int, world: int, pad_id: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """This rank's collated micro-batches of one global batch, and the count of real input tokens in them.

    Sorting the batch by length first wastes less compute on padding (the step's gradient is the same sum).
    Consecutive groups go to ranks in turn: ranks get similar shares, and any world size forms the same groups.
    """
    order = sorted(indices, key=lambda i: len(examples[i][0]))
    groups = [order[j : j + size] for j in range(0, len(order), size)][rank::world]
    n_tokens = sum(len(examples[i][0]) - 1 for g in groups for i in g)
    return [collate([examples[i] for i in g], pad_id) for g in groups], n_tokens


class Sampler:
    """An endless, seeded stream of example indices: epoch e is a permutation seeded with seed + e.

    Position p of the stream is a pure function of p, so the data position in a checkpoint is one integer.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}

    def take(self, start: int, count: int) -> list[int]:
        out = []
        for p in range(start, start + count):
            epoch = p // self.n
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
            out.append(self._perms[epoch][p % self.n])
        return out
