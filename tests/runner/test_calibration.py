"""Calibration sampling (runner/calibration.py): shapes, determinism, corpora, files, caching and missing data."""

import json

import pytest
import torch

from models.tokenizer import Tokenizer
from runner.calibration import calibration_windows, read_corpus, sample_document_windows, sample_windows
from runner.common import ConfigError


@pytest.fixture
def gptq_cfg(compose, tmp_path):
    def _cfg(*overrides):
        return compose(
            ["task=quantize", "debug=smoke", "quantizer=gptq", f"paths.cache_dir={tmp_path / 'cache'}", *overrides]
        )

    return _cfg


def test_sample_windows_are_seeded_slices_of_the_corpus():
    ids = torch.arange(1000)
    w = sample_windows(ids, nsamples=8, seqlen=50, seed=3)
    assert w.shape == (8, 50) and w.dtype == torch.long
    # Consecutive tokens: each row is ids[start : start + 50].
    assert torch.equal(w[:, 1:] - w[:, :-1], torch.ones(8, 49, dtype=torch.long))
    assert int(w.max()) < 1000
    assert torch.equal(w, sample_windows(ids, 8, 50, seed=3))
    assert not torch.equal(w, sample_windows(ids, 8, 50, seed=4))


def test_a_corpus_of_exactly_one_window_gives_that_window():
    ids = torch.arange(64)
    assert torch.equal(sample_windows(ids, 3, 64, seed=0), ids.expand(3, 64))


def test_document_windows_lie_inside_one_long_document():
    # Documents as disjoint id ranges: doc d holds d*1000 .. d*1000 + len - 1.
    lengths = [30, 120, 64, 200, 65]
    docs = [torch.arange(d * 1000, d * 1000 + n) for d, n in enumerate(lengths)]
    w = sample_document_windows(docs, nsamples=40, seqlen=64, seed=0)
    assert w.shape == (40, 64)
    assert torch.equal(w[:, 1:] - w[:, :-1], torch.ones(40, 63, dtype=torch.long))  # never crosses a document
    used = set((w[:, 0] // 1000).tolist())
    assert used <= {1, 3, 4} and len(used) > 1  # only documents longer than seqlen (64 itself is not)
    assert torch.equal(w, sample_document_windows(docs, 40, 64, seed=0))
    assert not torch.equal(w, sample_document_windows(docs, 40, 64, seed=1))


def test_document_sampling_needs_a_document_longer_than_a_window(gptq_cfg, tmp_path):
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": "x" * 40}) for _ in range(10)))
    base = [f"quantizer.calibration={tmp_path / 'docs.jsonl'}", "quantizer.seqlen=64", "quantizer.nsamples=2"]
    assert calibration_windows(gptq_cfg(*base), Tokenizer.bytes()).shape == (2, 64)  # corpus sampling joins them
    with pytest.raises(ConfigError, match=r"docs\.jsonl: no document is longer than quantizer\.seqlen=64"):
        calibration_windows(gptq_cfg(*base, "quantizer.sampling=document"), Tokenizer.bytes())
    with pytest.raises(ConfigError, match=r"quantizer\.sampling=random: use one of corpus, document"):
        calibration_windows(gptq_cfg(*base, "quantizer.sampling=random"), Tokenizer.bytes())


@pytest.mark.parametrize("corpus", ["c4", "alpaca", "tinyshakespeare"])
def test_named_corpora_give_windows_of_the_configured_shape(gptq_cfg, corpus):
    cfg = gptq_cfg(f"quantizer.calibration={corpus}", "quantizer.nsamples=5", "quantizer.seqlen=96")
    w = calibration_windows(cfg, Tokenizer.bytes())
    assert w.shape == (5, 96) and w.dtype == torch.long
    assert int(w.min()) >= 0 and int(w.max()) < Tokenizer.bytes().vocab_size


def test_windows_are_deterministic_for_a_seed_and_cached(gptq_cfg, tmp_path):
    tok = Tokenizer.bytes()
    cfg = gptq_cfg("quantizer.nsamples=4", "quantizer.seqlen=32", "seed=7")
    first = calibration_windows(cfg, tok)
    cached = list((tmp_path / "cache" / "calibration").glob("*.safetensors"))
    assert len(cached) == 1
    assert torch.equal(first, calibration_windows(cfg, tok))  # read back from the cache
    cached[0].unlink()
    assert torch.equal(first, calibration_windows(cfg, tok))  # recomputed: the same windows
    other = calibration_windows(gptq_cfg("quantizer.nsamples=4", "quantizer.seqlen=32", "seed=8"), tok)
    assert not torch.equal(first, other)
    assert len(list((tmp_path / "cache" / "calibration").glob("*.safetensors"))) == 2


def test_missing_named_corpus_is_a_config_error_naming_the_file(gptq_cfg, tmp_path):
    cfg = gptq_cfg(f"paths.data_dir={tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match=r"c4/c4_demo\.jsonl.*paths\.data_dir"):
        calibration_windows(cfg, Tokenizer.bytes())


def test_wikitext2_calibrates_on_the_train_split_never_the_scored_test_split(gptq_cfg, tmp_path):
    cfg = gptq_cfg(f"paths.data_dir={tmp_path}", "quantizer.calibration=wikitext2")
    with pytest.raises(ConfigError, match=r"wikitext2/wiki\.train\.raw"):
        calibration_windows(cfg, Tokenizer.bytes())


def test_missing_file_is_a_config_error_naming_it(gptq_cfg, tmp_path):
    cfg = gptq_cfg(f"quantizer.calibration={tmp_path / 'nope.txt'}")
    with pytest.raises(ConfigError, match=r"nope\.txt: data file not found \(quantizer\.calibration=.*; fix the path"):
        calibration_windows(cfg, Tokenizer.bytes())


def test_unknown_file_type_is_refused(gptq_cfg, tmp_path):
    (tmp_path / "corpus.csv").write_text("a,b\n" * 100)
    with pytest.raises(ConfigError, match=r"corpus\.csv"):
        calibration_windows(gptq_cfg(f"quantizer.calibration={tmp_path / 'corpus.csv'}"), Tokenizer.bytes())


def test_corpus_shorter_than_a_window_is_refused(gptq_cfg, tmp_path):
    (tmp_path / "short.txt").write_text("too short")
    cfg = gptq_cfg(f"quantizer.calibration={tmp_path / 'short.txt'}", "quantizer.seqlen=64")
    with pytest.raises(ConfigError, match=r"short\.txt.*fewer than quantizer\.seqlen=64"):
        calibration_windows(cfg, Tokenizer.bytes())


def test_txt_json_and_jsonl_files_read_as_documents(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\n")
    assert read_corpus(tmp_path / "a.txt") == "plain text\n"
    records = [{"text": "first doc", "meta": "x"}, {"instruction": "Do it.", "input": "", "output": "Done."}, "bare"]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    expected = "first doc\n\nDo it.\nDone.\n\nbare"
    assert read_corpus(tmp_path / "a.json") == expected
    assert read_corpus(tmp_path / "a.jsonl") == expected


def test_relative_file_resolves_under_the_data_dir(gptq_cfg, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.jsonl").write_text(json.dumps({"text": "x" * 500}) + "\n")
    cfg = gptq_cfg(f"paths.data_dir={tmp_path / 'data'}", "quantizer.calibration=mine.jsonl", "quantizer.seqlen=100")
    w = calibration_windows(cfg, Tokenizer.bytes())
    assert w.shape == (cfg.quantizer.nsamples, 100)
    assert set(w.flatten().tolist()) == set(Tokenizer.bytes().encode("x", bos=False))
