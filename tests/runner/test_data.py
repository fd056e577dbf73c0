"""runner/data.py: prompt masking, formats, blocks and packing, collation, the seeded sampler."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from models.tokenizer import Tokenizer
from runner import data
from runner.common import ConfigError

IGN = data.IGNORE_INDEX
INSTRUCT = OmegaConf.create({"format": "instruct", "prompt_template": None})


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.bytes()


def _split(tok, ids, labels):
    """(decoded masked tokens, decoded trained tokens)."""
    masked = [i for i, lab in zip(ids, labels, strict=True) if lab == IGN]
    trained = [lab for lab in labels if lab != IGN]
    return tok.decode(masked, skip_special=False), tok.decode(trained, skip_special=False)


def test_prompt_masking_masks_exactly_the_prompt(tok):
    rec = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    ids, labels = data.encode_record(tok, rec, INSTRUCT, False, None)
    msgs = [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert tok.decode(ids, skip_special=False) == prompt + "5</s>\n"
    masked, trained = _split(tok, ids, labels)
    assert masked == prompt
    assert trained == "5</s>\n"
    # the masked positions are exactly the leading prompt tokens
    n_prompt = len(tok.encode(prompt, bos=False))
    assert labels[:n_prompt] == [IGN] * n_prompt and IGN not in labels[n_prompt:]
    assert labels[n_prompt:] == ids[n_prompt:]


def test_history_turns_all_train_and_users_are_masked(tok):
    rec = {"instruction": "and 4?", "input": "", "output": "B2", "history": [["2+2?", "A1"]]}
    ids, labels = data.encode_record(tok, rec, INSTRUCT, False, None)
    trained = [lab for lab in labels if lab != IGN]
    assert tok.decode(trained, skip_special=False) == "A1</s>\nB2</s>\n"
    masked, _ = _split(tok, ids, labels)
    assert "2+2?" in masked and "and 4?" in masked and "A1" not in masked


def test_prompt_template_and_train_on_prompt(tok):
    cfg = OmegaConf.create({"format": "instruct", "prompt_template": "Q: {instruction} {input}\nA: "})
    rec = {"instruction": "capital of France?", "input": "", "output": "Paris"}
    ids, labels = data.encode_record(tok, rec, cfg, False, None)
    masked, trained = _split(tok, ids, labels)
    assert masked == "<s>Q: capital of France? \nA: "  # the byte tokenizer adds BOS to plain prompts
    assert trained == "Paris</s>" and ids[-1] == tok.eos_id
    ids2, labels2 = data.encode_record(tok, rec, cfg, True, None)
    assert ids2 == ids and labels2 == ids


def test_messages_format_and_non_incremental_template(tok):
    rec = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "yo"}]}  # fmt: skip
    ids, labels = data.encode_record(tok, rec, OmegaConf.create({"format": "messages"}), False, None)
    assert _split(tok, ids, labels)[1] == "yo</s>\n"
    bad = Tokenizer.bytes()
    bad.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if not add_generation_prompt %}!{% endif %}"
    )
    with pytest.raises(ConfigError, match="incrementally"):
        data.chat_segments(bad, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}])  # fmt: skip


def test_read_records_array_and_jsonl(tmp_path):
    recs = [{"a": 1}, {"a": 2}]
    (tmp_path / "x.json").write_text(json.dumps(recs))
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert data.read_records(tmp_path / "x.json") == recs == data.read_records(tmp_path / "x.jsonl")
    (tmp_path / "bad").write_text("{nope")
    with pytest.raises(ConfigError, match="bad"):
        data.read_records(tmp_path / "bad")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"a": "caf\xe9"}\n')  # issue 16: UnicodeDecodeError, no file name
    with pytest.raises(ConfigError, match=r"latin1\.jsonl \(data\.path\): not UTF-8"):
        data.read_records(tmp_path / "latin1.jsonl")


def test_blocks_make_every_token_a_target_once():
    ids = list(range(23))
    blocks = data._blocks(ids, ids, 5)
    assert all(len(b[0]) == 6 for b in blocks)
    targets = [x for b in blocks for x in b[0][1:]]
    assert targets == list(range(1, 21))


def test_collate_shifts_and_pads():
    x, y = data.collate([([1, 2, 3, 4], [IGN, IGN, 3, 4]), ([5, 6], [IGN, 6])], pad_id=0)
    assert x.tolist() == [[1, 2, 3], [5, 0, 0]]
    assert y.tolist() == [[IGN, 3, 4], [6, IGN, IGN]]


def test_micro_batches_group_by_length_the_same_for_any_world_size():
    examples = [([7] * n, [7] * n) for n in (5, 2, 9, 3, 8, 4, 2, 6)]
    one, n1 = data.micro_batches(examples, list(range(8)), 2, rank=0, world=1, pad_id=0)
    assert [x.shape[1] for x, _ in one] == [1, 3, 5, 8]  # sorted by length: little padding
    two = [data.micro_batches(examples, list(range(8)), 2, rank=r, world=2, pad_id=0) for r in (0, 1)]
    assert [b[0].tolist() for b in one] == [
        b[0].tolist() for b in (two[0][0][0], two[1][0][0], two[0][0][1], two[1][0][1])
    ]
    assert n1 == sum(n - 1 for n in (5, 2, 9, 3, 8, 4, 2, 6)) == two[0][1] + two[1][1]


def test_sampler_is_a_pure_function_of_position():
    s = data.Sampler(5, seed=3)
    stream = s.take(0, 12)
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))
    assert stream[:5] != stream[5:10]  # a new permutation each epoch
    assert data.Sampler(5, seed=3).take(7, 4) == stream[7:11]


def _write_jsonl(path, n):
    recs = [{"instruction": f"say {i}", "input": "", "output": f"{i} " * (i % 4 + 1)} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in recs))
    return path


def test_load_examples_split_packing_and_text(compose, tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", 20)
    over = ["task=finetune", "debug=smoke", f"data.path={path}", "data.val_size=4", "task.max_seq_len=48"]
    train, val = data.load_examples(compose(over), tok)
    assert len(train) == 16 and len(val) == 4
    assert not {tuple(e[0]) for e in train} & {tuple(e[0]) for e in val}
    assert (train, val) == data.load_examples(compose(over), tok)  # seeded split
    packed, _ = data.load_examples(compose([*over, "task.packing=true"]), tok)
    assert all(len(e[0]) == 49 for e in packed)
    assert sum(lab != IGN for e in packed for lab in e[1][1:]) <= sum(lab != IGN for e in train for lab in e[1])

    (tmp_path / "t.txt").write_text("to be or not to be " * 40)
    tcfg = compose(["task=finetune", "debug=smoke", "data=text", f"data.path={tmp_path / 't.txt'}", "data.val_size=2"])
    ttrain, tval = data.load_examples(tcfg, tok)
    assert len(tval) == 2 and all(len(e[0]) == 65 and e[0] == e[1] for e in ttrain + tval)
    assert ttrain[0][0][0] == tok.bos_id

    with pytest.raises(ConfigError, match="data.path"):
        data.load_examples(compose(["task=finetune", "debug=smoke", "data=messages"]), tok)


@pytest.mark.slow  # tokenizes the whole files (about 25 s on 2 cores)
@pytest.mark.parametrize("name", ["alpaca", "lima", "tinyshakespeare"])
def test_real_datasets_load(compose, tok, name):
    train, val = data.load_examples(compose(["task=finetune", "debug=smoke", f"data={name}"]), tok)
    assert train and val
    assert all(any(lab != IGN for lab in e[1][1:]) for e in train)
    assert torch.tensor([len(e[0]) for e in train]).max() <= 65
