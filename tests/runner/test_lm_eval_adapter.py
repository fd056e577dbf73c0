"""LMEvalModel against lm-eval's own HF backend (HFLM over the same weights saved as an HF directory) and against a
plain forward of our model. Tiny random models: log-likelihoods agree within 1e-4, greedy flags and generations
exactly. The real-model check (SmolLM2 task scores) is in test_eval.py."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_tiny_hf
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from tokenizers.processors import TemplateProcessing

from models.checkpoint import load_checkpoint
from models.llama import Transformer
from models.tokenizer import Tokenizer
from runner.lm_eval_adapter import LMEvalModel, _pack

MAX_LEN = 256  # the tiny model's max_position_embeddings: long requests exercise left truncation and windows


def _tiny_dir(directory, bos: bool):
    """Tiny HF Llama whose tokenizer adds BOS or not, written so HF's tokenizer agrees (a post-processor adds it)."""
    make_tiny_hf(directory)
    tok = Tokenizer.bytes()
    tok.add_bos = bos
    if bos:
        tok.tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_id)])
    tok.save(directory)
    return directory


@pytest.fixture(scope="module", params=[False, True], ids=["no_bos", "bos"])
def pair(request, tmp_path_factory):
    """(our model + tokenizer, HFLM) over one tiny HF directory."""
    d = _tiny_dir(tmp_path_factory.mktemp("tiny"), request.param)
    args, sd, tok, _ = load_checkpoint("hf", d)
    model = Transformer(args)
    model.load_state_dict(sd)
    hf = HFLM(pretrained=str(d), batch_size=3, device="cpu", dtype="float32")
    return model.eval(), tok, hf


def _ours(pair, batch_size=3, max_gen_toks=16):
    model, tok, _ = pair
    return LMEvalModel(model, tok, batch_size, None, max_gen_toks, seed=0)


def _requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _text(n: int, seed: int) -> str:
    # Varied words (no repeats): HFLM shares logits between requests with equal context+continuation[:-1] and then
    # scores a shorter one at the wrong positions; distinct windows keep that quirk out of the comparison.
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "quick", "über", "naïve", "42", "—", "tree"]
    return " ".join(rng.choice(words) + str(rng.randrange(100)) for _ in range(n))


LL_REQUESTS = [
    ("The cat sat on", " the mat."),  # three choices of one context: packed into one row
    ("The cat sat on", " a hat"),
    ("The cat sat on", " nothing at all, really"),
    ("The cat sat on ", "the dog"),  # trailing space moves to the continuation
    ("", "hello world"),  # empty context: prefix token
    ("Question: what?\nAnswer:", " yes"),
    ("Über naïve café", " — ok"),  # multi-byte characters
    (_text(60, 1), " truncated from the left"),  # longer than max_length
    (_text(60, 1), " second choice of the long one"),
    ("x", "y" * 40),
]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_loglikelihood_matches_hflm(pair, batch_size):
    reqs = _requests("loglikelihood", LL_REQUESTS)
    ours = _ours(pair, batch_size).loglikelihood(reqs)
    theirs = pair[2].loglikelihood(reqs)
    for (lp, greedy), (ref_lp, ref_greedy), args in zip(ours, theirs, LL_REQUESTS, strict=True):
        assert lp == pytest.approx(ref_lp, abs=1e-4), args
        assert greedy == ref_greedy, args


def test_tokenization_matches_hflm(pair):
    ours, hf = _ours(pair), pair[2]
    for context, continuation in LL_REQUESTS:
        if context:
            assert ours._encode_pair(context, continuation) == hf._encode_pair(context, continuation)
        assert ours.tok_encode(context + continuation) == hf.tok_encode(context + continuation)
    assert ours.prefix_token_id == hf.prefix_token_id and ours.eot_token_id == hf.eot_token_id
    assert ours.max_length == hf.max_length == MAX_LEN


def test_loglikelihood_rolling_matches_hflm(pair):
    texts = [_text(5, 2), _text(70, 3), _text(200, 4)]  # one window, two, several (byte tokens: ~7 per word)
    reqs = _requests("loglikelihood_rolling", [(t,) for t in texts])
    ours = _ours(pair, batch_size=2).loglikelihood_rolling(reqs)
    theirs = pair[2].loglikelihood_rolling(reqs)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-4)


def test_rolling_equals_one_forward_when_it_fits(pair):
    """A text inside one window: the sum over its tokens of log p(token | prefix token and the tokens before it)."""
    model, tok, _ = pair
    lm = _ours(pair)
    text = _text(20, 5)
    tokens = lm.tok_encode(text)
    assert len(tokens) < MAX_LEN
    ids = torch.tensor([[lm.prefix_token_id, *tokens]])
    with torch.no_grad():
        logp = model(ids)[0, :-1].log_softmax(-1)  # [T, V]
    expected = logp.gather(-1, ids[0, 1:, None]).sum().item()
    (got,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert got == pytest.approx(expected, abs=1e-4)


def test_greedy_flag_and_packed_scores_equal_a_plain_forward(pair):
    """Continuations sharing a context (one packed row) score as a full forward of context + continuation; a
    continuation made of the model's own argmax tokens is greedy."""
    model, _, _ = pair
    context = [5, 70, 71, 72, 73]
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            greedy.append(int(model(torch.tensor([context + greedy]))[0, -1].argmax()))
    conts = [greedy, [80, 81], [greedy[0], 90, 91, 92], [7]]
    got = _ours(pair)._loglikelihood_tokens([(None, context, c) for c in conts])
    for cont, (lp, is_greedy) in zip(conts, got, strict=True):
        ids = torch.tensor([context + cont])
        with torch.no_grad():
            logp = model(ids)[0, len(context) - 1 : -1].log_softmax(-1)
        assert lp == pytest.approx(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item(), abs=1e-4)
        assert is_greedy == (cont == greedy[: len(cont)])
    assert got[0][1] and not got[1][1]


def test_pack_fills_rows_up_to_the_longest_unit_or_the_minimum():
    lengths = [200, 100, 100, 50, 30, 7]
    rows = _pack(lengths, max_length=1000)  # cap max(200, 256) = 256
    assert sorted(u for row in rows for u in row) == list(range(len(lengths)))
    assert all(sum(lengths[u] for u in row) <= 256 for row in rows)
    # longest first, then the longest that still fits
    assert [sorted(row) for row in rows] == [[0, 3], [1, 2, 4, 5]]
    # a unit longer than the cap has a row to itself
    assert [sorted(row) for row in _pack([300, 20, 20], max_length=128)] == [[0], [1, 2]]
    assert _pack([], 100) == []


def test_units_packed_in_one_row_score_as_separate_forwards(pair):
    """Two contexts with their continuations in one row: each continuation scores as a plain forward of its own
    context + continuation (the mask keeps the units apart, positions restart per unit)."""
    model, _, _ = pair
    lm = _ours(pair)
    requests = [([5, 70, 71], [80, 81]), ([5, 70, 71], [90]), ([6, 40, 41, 42, 43], [50, 51, 52])]
    seen = []
    score_rows = lm._score_rows

    def spy(rows, pairs, T):
        seen.append([len(row) for row in rows])
        return score_rows(rows, pairs, T)

    lm._score_rows = spy
    got = lm._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in requests])
    assert seen == [[2]]  # one forward, one row, two units
    for (ctx, cont), (lp, _) in zip(requests, got, strict=True):
        with torch.no_grad():
            logp = model(torch.tensor([ctx + cont]))[0, len(ctx) - 1 : -1].log_softmax(-1)
        assert lp == pytest.approx(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item(), abs=1e-4)


def test_generate_until_matches_hflm_and_honours_until(pair):
    prompts = ["Hello", "The quick brown fox", "a", _text(80, 6)]  # the last is left-truncated to fit
    lm, hf = _ours(pair, batch_size=2), pair[2]
    free = _requests("generate_until", [(p, {"until": [], "max_gen_toks": 12}) for p in prompts])
    ours = lm.generate_until(free)
    assert ours == hf.generate_until(free)
    # Stop each completion at a character it contains: both backends cut there.
    stops = [next((c for c in text[2:] if c.isprintable() and c != "\ufffd"), "@") for text in ours]
    cut = _requests(
        "generate_until", [(p, {"until": [s], "max_gen_toks": 12}) for p, s in zip(prompts, stops, strict=True)]
    )
    ours_cut = lm.generate_until(cut)
    assert ours_cut == hf.generate_until(cut)
    for full, s, text in zip(ours, stops, ours_cut, strict=True):
        assert text == full.split(s)[0]
    three = _requests("generate_until", [(prompts[1], {"until": [], "max_gen_toks": 3})])
    assert lm.generate_until(three) == hf.generate_until(three)
