"""models/tokenizer.py: encode/decode, special tokens, chat templates and the HF on-disk layout."""

import json

import pytest

from models.tokenizer import Tokenizer

TEXTS = ["hello world", "héllo wörld 🙂 ∑", "def f(x):\n\treturn x  # tabs\n", "   spaces   ", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_tokenizer_round_trips(text):
    tok = Tokenizer.bytes()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == text
    assert len(tok.encode(text, bos=False)) == len(text.encode("utf-8"))


def test_save_and_reload_keeps_specials_and_template(tmp_path):
    tok = Tokenizer.bytes()
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos) == (256, 257, 258, True)
    assert again.stop_ids == {257}
    msgs = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(msgs) == tok.apply_chat_template(msgs) == "<s>user\nhi</s>\n<s>assistant\n"


def test_hf_generation_config_adds_stop_ids(tmp_path):
    tok = Tokenizer.bytes()
    tok.save(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 10]}))
    assert Tokenizer.from_dir(tmp_path).stop_ids == {257, 10}


def test_no_chat_template_is_a_clear_error():
    tok = Tokenizer.bytes()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
