"""Decoding for `models.llama.Transformer` (every family): a batch of token-id prompts completed with one static KV cache.

    results = generate(model, tokenizer, [ids, ...], max_new_tokens=32, temperature=0.0, top_k=None, top_p=1.0,
                       stop_ids=tokenizer.stop_ids, stop_strings=[], generator=None)

Prompts of different lengths are left-padded into one cache (cache slot == column of the padded batch): padded
keys are masked and each row gets its own RoPE positions, so every row decodes as it would alone. The prompt runs
in one eager prefill; each further token is one decode step of shape [B, 1], optionally through torch.compile.
Sliding-window layers use the same full-length cache (their mask hides keys older than the window). A LongRoPE
model (Phi-3) whose sequence first reaches past the pretraining length recomputes its cache once, eagerly, with the
long factors (`Transformer.rope_switch`), as transformers' Phi-3 generation does.
Sampling: `temperature` 0 is greedy (argmax; the generator is unused), otherwise softmax sampling restricted by
`top_k` (None: off) and `top_p` (1.0: off). A row ends at a stop id, at a stop string (cut from its text) or after
`max_new_tokens`.

Used by the generate stage (runner/generate.py) and by the eval adapter's generate_until (runner/lm_eval_adapter.py).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.llama import Transformer
from models.tokenizer import Tokenizer

# Inductor's decompose_mm_pass rewrites a batch-1 product whose weight is at most 2048 x 2048 (its CPU cut-off) as a
# fused multiply-reduce that streams the weight once; on SmolLM2's block linears it measured ~1.3x (bf16) and ~1.8x
# (fp32) faster than the BLAS GEMV (1 thread). Larger products, such as the output head, keep the BLAS call.
_COMPILE_OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}}


def _sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(-1)
        # Drop a token once the more likely ones already hold top_p of the mass; the most likely always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _visible(text: str, stop_strings: list[str]) -> tuple[str, bool]:
    """(text safe to show, whether a stop string ended it). Holds back a tail that may still grow into a stop
    string or is an unfinished UTF-8 character (decoded as U+FFFD)."""
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    if cuts:
        return text[: min(cuts)], True
    hold = max((k for s in stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    text = text[: len(text) - hold]
    return text.rstrip("\ufffd"), False


@dataclass
class _Batch:
    """Prompts left-padded into one static cache of S = P + max_new_tokens slots (slot == column of the batch)."""

    ids: torch.Tensor  # [B, P], left-padded prompts
    pad: torch.Tensor  # [B, 1], pad tokens in front of each row
    slots: torch.Tensor  # [S]
    # Equal lengths need neither masks nor per-row positions: the decode step then does the least work.
    key_padding_mask: torch.Tensor | None  # [B, S], True = real token; None when no row is padded

    def position_ids(self, input_pos: torch.Tensor) -> torch.Tensor | None:
        """RoPE positions [B, T] of cache slots input_pos [T]: each row counts from its first real token."""
        if self.key_padding_mask is None:
            return None
        return (input_pos[None] - self.pad).clamp(min=0)

    def step(self, model, tok: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """One decode step: logits [B, 1, V] for the tokens tok [B] fed back at cache slot slot [1]."""
        return model(
            tok[:, None], input_pos=slot, position_ids=self.position_ids(slot), key_padding_mask=self.key_padding_mask
        )


def _left_pad(prompts: list[list[int]], pad_id: int, max_new_tokens: int, ctx: int, dev: torch.device) -> _Batch:
    lens = [len(p) for p in prompts]
    if not prompts or min(lens) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    P = max(lens)
    S = P + max_new_tokens  # cache slots: prompt, then one per fed-back token
    if S > ctx:
        raise ValueError(f"generate: {P} prompt tokens + max_new_tokens={max_new_tokens} exceed the context of {ctx}")
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)  # [B, P], left-padded
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(p)
    pad = torch.tensor([P - n for n in lens], device=dev)[:, None]  # [B, 1]
    slots = torch.arange(S, device=dev)
    kpm = slots[None] >= pad if min(lens) != P else None  # [B, S]
    return _Batch(ids.to(dev), pad, slots, kpm)


class _Completions:
    """Each row's generated ids, visible text and finish reason, with the stop rules applied as tokens arrive."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        rows: int,
        stop_ids: set[int],
        stop_strings: list[str],
        on_text: Callable[[int, str], None] | None,
    ):
        self.tok, self.stop_ids, self.stop_strings, self.on_text = tokenizer, stop_ids, stop_strings, on_text
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.text = [""] * rows
        self.finish: list[str | None] = [None] * rows

    def take(self, toks: list[int]) -> bool:
        """Append each unfinished row's new token, apply the stop rules; True once every row has ended."""
        for b, t in enumerate(toks):
            if self.finish[b] is not None:
                continue
            self.ids[b].append(t)
            if t in self.stop_ids:
                self.finish[b] = "eos"
            if self.stop_strings or self.on_text is not None:
                gen = self.ids[b][:-1] if self.finish[b] else self.ids[b]
                self.text[b], hit = _visible(self.tok.decode(gen), self.stop_strings)
                if hit:
                    self.finish[b] = "stop"
                if self.on_text is not None:
                    self.on_text(b, self.text[b])
        return all(f is not None for f in self.finish)

    def results(self, prompt_lens: list[int], timings: dict) -> list[dict]:
        """The per-row result dicts of `generate` (each row's final text also goes to on_text)."""
        results = []
        for b, ids in enumerate(self.ids):
            reason = self.finish[b] or "length"
            if reason != "stop":  # no stop string in it: the whole decoded text, nothing held back
                self.text[b] = self.tok.decode(ids[:-1] if reason == "eos" else ids)
            if self.on_text is not None:
                self.on_text(b, self.text[b])
            results.append(
                {
                    "ids": ids,
                    "text": self.text[b],
                    "finish_reason": reason,
                    "prompt_tokens": prompt_lens[b],
                    "completion_tokens": len(ids),
                    "timings": timings,
                }
            )
        return results


def _compiled_step(model: Transformer, batch: _Batch, tok: torch.Tensor):
    """torch.compile of the model for the decode step, warmed up; returns (step, seconds spent compiling)."""
    t = time.perf_counter()
    # Static shapes: every decode step has the same [B, 1] input and [B, S] cache.
    step = torch.compile(model, dynamic=False, options=_COMPILE_OPTIONS)
    # Warm up on the last cache slot: a real step writes that slot again before anything attends to it.
    last = batch.slots[-1:]
    for _ in range(2):
        batch.step(step, tok, last)
    return step, time.perf_counter() - t


def _forward_slots(model: Transformer, batch: _Batch, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of ids [B, T] written at cache slots `slots` [T] (eager: prefill and re-prefill)."""
    return model(ids, input_pos=slots, position_ids=batch.position_ids(slots), key_padding_mask=batch.key_padding_mask)


def _decode(model: Transformer, step, batch: _Batch, tok: torch.Tensor, sample, rows, max_new_tokens: int) -> int:
    """Feed each sampled token back through `step` (the model, or its compiled decode step) until every row is done
    or max_new_tokens are out; returns the number of decode steps."""
    P = batch.ids.shape[1]
    fed = [batch.ids]  # every token in the cache so far, for the LongRoPE re-prefill
    n_steps = 0
    for i in range(1, max_new_tokens):
        fed.append(tok[:, None])
        if model.rope_switch is not None and P <= model.rope_switch == P + i - 1:
            # The first position past LongRoPE's pretraining length switches every rotation to the long factors:
            # recompute the cache over the whole sequence once (eager), as transformers' Phi-3 generation does.
            logits = _forward_slots(model, batch, torch.cat(fed, 1), batch.slots[: P + i])[:, -1:]
        else:
            logits = batch.step(step, tok, batch.slots[P + i - 1 : P + i])  # the slot of the token fed back
        tok = sample(logits[:, -1])
        n_steps += 1
        if rows.take(tok.tolist()):
            break
    return n_steps


@torch.no_grad()
def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float,
    stop_ids: set[int],
    stop_strings: list[str],
    generator: torch.Generator | None,
    compile: bool = False,
    on_text: Callable[[int, str], None] | None = None,
) -> list[dict]:
    """Complete a batch of tokenized prompts (lengths may differ) with one static KV cache.

    Returns one dict per prompt: `ids` (generated ids, a final stop id included), `text` (the completion, stop id
    and stop string cut off), `finish_reason` ("eos": a stop id, "stop": a stop string, "length"),
    `prompt_tokens`, `completion_tokens` and `timings` (shared by the batch): time_to_first_token_s (prefill),
    decode_s, decode_steps, compile_s. `temperature` 0 is greedy (generator unused). `on_text(row, text)`, when
    given, receives each row's visible completion after every token and once more when the row ends.
    """
    dev = model.inv_freq.device
    batch = _left_pad(prompts, tokenizer.pad_id, max_new_tokens, model.args.max_position_embeddings, dev)
    P = batch.ids.shape[1]
    sample = functools.partial(_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    rows = _Completions(tokenizer, len(prompts), stop_ids, stop_strings, on_text)

    # The norm weights stay in the activation dtype even when the linear weights are quantized. On CPU the cache
    # (and so attention) is float32 whatever the activations: see Transformer.setup_caches.
    act_dtype = model.model.norm.weight.dtype
    # q/k/v and gate/up as one matmul each where the layers allow it (int4): see Transformer.join_projections
    with model.join_projections():
        model.setup_caches(len(prompts), len(batch.slots), dtype=torch.float32 if dev.type == "cpu" else act_dtype)
        try:
            t0 = time.perf_counter()
            # Prefill runs eager: prompt lengths vary between calls, and int4 layers build their kernel layout here.
            tok = sample(_forward_slots(model, batch, batch.ids, batch.slots[:P])[:, -1])  # [B]
            done = rows.take(tok.tolist())
            ttft = time.perf_counter() - t0
            step, compile_s = model, 0.0
            if compile and not done and max_new_tokens > 1:  # nothing to compile for when no decode step follows
                step, compile_s = _compiled_step(model, batch, tok)
            t1 = time.perf_counter()
            n_steps = 0 if done else _decode(model, step, batch, tok, sample, rows, max_new_tokens)
            t2 = time.perf_counter()
        finally:
            model.clear_caches()

    timings = {
        "time_to_first_token_s": ttft,  # prefill and the first sample
        "decode_s": t2 - t1,
        "decode_steps": n_steps,
        "compile_s": compile_s,
    }
    return rows.results([len(p) for p in prompts], timings)
