"""`LMEvalModel`: EleutherAI lm-eval's model interface over this project's `Transformer` and `Tokenizer`.

No Hugging Face model or hub access is involved: it scores with our model directly, float or quantized.
It subclasses lm-eval's `TemplateLM` (an `lm_eval.api.model.LM`) to reuse lm-eval's own request tokenization,
the code its HF backend (`HFLM`) runs as well, so both split a request into the same tokens:
- the context's trailing spaces move to the continuation; then `whole = encode(context + continuation)` and
  `encode(context)`, and the continuation is `whole[len(context tokens):]`;
- an empty context becomes the prefix token (BOS, else EOS).

`loglikelihood` scores as HFLM does: the model reads `(context + continuation)[-(max_length + 1):][:-1]` and each
continuation token is scored by the logits one position before it. What differs is the work done for it:
- Requests with the same (truncated) context, such as the choices of one multiple-choice question, form one unit:
  the context once, then each continuation minus its last token, with positions restarting after the context and
  a block mask so each continuation sees only the context and itself (the model's own mask rule,
  `models.llama.attention_mask`, with the unit as segment and the continuation as branch). The context's last position scores the first
  token of every continuation. A 4-choice question computes its context once instead of 4 times.
- Units are packed into rows (`_pack`: longest first, then the longest that still fits) of about the longest
  unit's length (at least `_PACK_MIN_TOKENS`); the mask also keeps units apart and positions restart per unit.
  Rows then need almost no padding: on 50 PIQA questions, 50% of the computed tokens were padding with one unit
  per row.
- The output head and log-softmax run only at scored positions, in chunks (fp32), never over [B, T, vocab]:
  `Transformer.hidden`, then `Transformer.output` on the scored positions.
- Rows are sorted longest first, so batches pad little and an out-of-memory error comes at once.
`loglikelihood_rolling` cuts each text into lm-eval's disjoint windows of `max_length` tokens (each token scored
once, with as much context as fits) and scores one window per row. `generate_until` runs the model's decoding loop
(models.generate.generate) in batches, honouring `until`, `max_gen_toks` and the sampling arguments.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from models.generate import generate
from models.llama import Transformer
from models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Output-head positions per chunk: bounds the fp32 [positions, vocab] logits to about 128 MiB at any vocabulary size.
_HEAD_CHUNK_ELEMENTS = 2**25
# Packed rows hold at least this many tokens (when the units allow): short units share a row instead of each being
# padded to the batch's longest. Masked attention over a row costs about row length per token, so rows stay short.
_PACK_MIN_TOKENS = 256


def _pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Units (by length) into rows of at most max(longest unit, _PACK_MIN_TOKENS) tokens (capped at max_length):
    each row starts with the longest unit left and repeatedly adds the longest one that still fits."""
    if not lengths:
        return []
    cap = min(max_length, max(max(lengths), _PACK_MIN_TOKENS))
    left = sorted((n, u) for u, n in enumerate(lengths))  # ascending
    rows = []
    while left:
        n, u = left.pop()
        row, space = [u], cap - n
        while left and left[0][0] <= space:
            j = bisect.bisect_right(left, (space, len(lengths))) - 1
            n, u = left.pop(j)
            row.append(u)
            space -= n
        rows.append(row)
    return rows


class LMEvalModel(TemplateLM):
    """lm-eval model over `model` and `tokenizer`. `batch_size` counts rows: a row holds one or more contexts, each
    with the continuations that share it (or one rolling window, or one prompt to generate from); a scoring forward also
    stays within `max_length` padded tokens. `max_length` None is the
    model's max_position_embeddings, as HFLM takes it from config.json. `info` lands in lm-eval's results config."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        batch_size: int,
        max_length: int | None,
        max_gen_toks: int,
        seed: int,
        info: dict | None = None,
    ):
        super().__init__()
        self.model, self.tok = model, tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.args.max_position_embeddings
        self.max_gen_toks = max_gen_toks
        self.seed = seed
        self.info = info or {}
        self._device = model.inv_freq.device
        self._bos_text = tokenizer.token(tokenizer.bos_id)

    # --- tokenization (the interface TemplateLM builds requests with) ------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # HFLM's rule: None is the tokenizer's own default (BOS or not), except for a text already starting with
        # BOS; False never adds BOS; True adds it when the tokenizer does.
        bos = self.tok.add_bos and add_special_tokens is not False
        if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
            bos = False
        return self.tok.encode(string, bos=bos)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    # --- chat templates (task.apply_chat_template=true) ------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        """Fingerprints lm-eval's request cache: the model name and the template."""
        digest = hashlib.sha256((self.tok.chat_template or "").encode()).hexdigest()[:12]
        return f"{self.info.get('model', 'model')}-{digest}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        return self.info

    # --- scoring ----------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation), context tokens, continuation tokens)] -> [(logprob, is_greedy)]."""
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        return self._score(pairs, pack=True, desc="loglikelihood", disable=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, req in enumerate(requests):
            (text,) = req.args
            tokens = self.tok_encode(text)
            for w in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(r)
        totals = [0.0] * len(requests)
        # Windows rarely share a context and are long: packing them would only trade the causal kernel for a mask.
        scores = self._score(windows, pack=False, desc="rolling", disable=disable_tqdm)
        for r, (logprob, _) in zip(owner, scores, strict=True):
            totals[r] += logprob
        return totals

    def _score(self, pairs: list[tuple[list[int], list[int]]], pack: bool, desc: str, disable: bool):
        L = self.max_length
        # A unit is one context and the continuations that share it: (context tokens, request indices).
        groups: dict[tuple[int, ...], list[int]] = {}
        units: list[tuple[tuple[int, ...], list[int]]] = []
        for i, (ctx, cont) in enumerate(pairs):
            if not 0 < len(cont) <= L:
                raise ValueError(f"a continuation of {len(cont)} tokens cannot be scored with max_length={L}")
            whole = (ctx + cont)[-(L + 1) :]
            key = tuple(whole[: len(whole) - len(cont)])
            if pack:
                groups.setdefault(key, []).append(i)
            else:
                units.append((key, [i]))
        for key, idxs in groups.items():  # split a group whose unit would outgrow max_length
            unit, n = [], len(key)
            for i in idxs:
                if unit and n + len(pairs[i][1]) - 1 > L:
                    units.append((key, unit))
                    unit, n = [], len(key)
                unit.append(i)
                n += len(pairs[i][1]) - 1
            units.append((key, unit))

        def length(unit) -> int:
            return len(unit[0]) + sum(len(pairs[i][1]) - 1 for i in unit[1])

        rows = _pack([length(u) for u in units], L) if pack else [[u] for u in range(len(units))]
        rows = [[units[u] for u in row] for row in rows]
        row_len = [sum(length(u) for u in row) for row in rows]
        order = sorted(range(len(rows)), key=lambda r: -row_len[r])
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        with tqdm(total=len(pairs), desc=desc, disable=disable) as bar:
            s = 0
            while s < len(order):
                # At most batch_size rows and max_length padded tokens (long rows such as rolling windows go one or
                # a few at a time, which bounds memory), and no row padded by more than 1/8 of its length (rows
                # are sorted, so that only cuts a batch where lengths are sparse, e.g. a few documents).
                T = row_len[order[s]]
                n = 1
                while n < min(self.batch_size, L // T) and s + n < len(order) and 8 * row_len[order[s + n]] >= 7 * T:
                    n += 1
                batch = [rows[r] for r in order[s : s + n]]
                for i, result in self._score_rows(batch, pairs, T):
                    out[i] = result
                bar.update(sum(len(u[1]) for row in batch for u in row))
                s += len(batch)
        return out

    @torch.no_grad()
    def _score_rows(self, rows, pairs, T: int):
        """Yield (request index, (logprob, is_greedy)) for the requests in `rows` (each a list of units, padded
        to T tokens). A unit is laid out as its context, then each continuation minus its last token, with
        positions restarting at 0 for the unit and again after the context for each continuation."""
        B = len(rows)
        ids = torch.full((B, T), self.tok.pad_id, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        unit_of = torch.full((B, T), -1, dtype=torch.long)  # unit number within the row (segment); -1 = padding
        seg = torch.full((B, T), -1, dtype=torch.long)  # branch: 0 = context, k = k-th continuation of the unit
        q_row, q_col, target, spans = [], [], [], []
        masked = False
        for b, row in enumerate(rows):
            off = 0
            masked |= len(row) > 1
            for u, (ctx, idxs) in enumerate(row):
                c = len(ctx)
                masked |= len(idxs) > 1
                ids[b, off : off + c], pos[b, off : off + c] = torch.tensor(ctx, dtype=torch.long), torch.arange(c)
                unit_of[b, off : off + c], seg[b, off : off + c] = u, 0
                last_ctx = off + c - 1  # scores the first token of every continuation
                off += c
                for k, i in enumerate(idxs, 1):
                    cont = pairs[i][1]
                    n = len(cont) - 1  # the last continuation token is only predicted, never read
                    ids[b, off : off + n] = torch.tensor(cont[:-1], dtype=torch.long)
                    pos[b, off : off + n] = torch.arange(c, c + n)
                    unit_of[b, off : off + n], seg[b, off : off + n] = u, k
                    spans.append((i, len(target), len(target) + n + 1))
                    q_row += [b] * (n + 1)
                    q_col += [last_ctx, *range(off, off + n)]
                    target += cont
                    off += n
        m, dev = self.model, self._device
        # One row holding several units or continuations needs the packed mask; else plain causal attention.
        x = m.hidden(
            ids.to(dev),
            position_ids=pos.to(dev),
            segment_ids=unit_of.to(dev) if masked else None,
            branch_ids=seg.to(dev) if masked else None,
        )  # [B, T, C]
        q_row = torch.tensor(q_row, device=dev)
        q_col = torch.tensor(q_col, device=dev)
        target = torch.tensor(target, device=dev)
        logprob = torch.empty(len(target), dtype=torch.float32, device=dev)
        greedy = torch.empty(len(target), dtype=torch.bool, device=dev)
        chunk = max(1, _HEAD_CHUNK_ELEMENTS // m.args.vocab_size)
        for s in range(0, len(target), chunk):
            e = s + chunk
            logits = m.output(x[q_row[s:e], q_col[s:e]]).float()  # [n, V]
            t = target[s:e, None]
            logprob[s:e] = (logits.gather(-1, t) - logits.logsumexp(-1, keepdim=True)).squeeze(-1)
            greedy[s:e] = logits.argmax(-1) == t.squeeze(-1)
        logprob, greedy = logprob.cpu().double(), greedy.cpu()
        for i, s, e in spans:
            yield i, (float(logprob[s:e].sum()), bool(greedy[s:e].all()))

    # --- generation -------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}  # requests with equal generation arguments run in the same batches
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        generator = torch.Generator(device=self._device).manual_seed(self.seed)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for idxs in groups.values():
                # lm-eval's own reading of the arguments, as HFLM does: stop strings as a list, max_gen_toks from
                # any of its aliases, do_sample False (or absent with temperature 0) means greedy.
                kw = dict(normalize_gen_kwargs(requests[idxs[0]].args[1], self.max_gen_toks))
                until, max_gen = kw.pop("until"), kw.pop("max_gen_toks")
                temperature = float(kw.pop("temperature")) if kw.pop("do_sample") else 0.0
                top_k, top_p = kw.pop("top_k", None), kw.pop("top_p", 1.0)
                if kw:
                    log.warning("generate_until ignores generation arguments %s", sorted(kw))
                # As HFLM: keep the last max_length - max_gen_toks prompt tokens so the completion fits.
                keep = self.max_length - max_gen
                if keep < 1:
                    raise ValueError(
                        f"max_gen_toks={max_gen} leaves no room for a prompt in max_length={self.max_length}"
                    )
                prompts = {i: self.tok_encode(requests[i].args[0])[-keep:] or [self.prefix_token_id] for i in idxs}
                order = sorted(idxs, key=lambda i: -len(prompts[i]))
                for s in range(0, len(order), self.batch_size):
                    chunk = order[s : s + self.batch_size]
                    results = generate(
                        self.model,
                        self.tok,
                        [prompts[i] for i in chunk],
                        max_new_tokens=max_gen,
                        temperature=temperature,
                        top_k=top_k,
                        top_p=top_p,
                        stop_ids=self.tok.stop_ids,
                        stop_strings=until,
                        generator=generator if temperature > 0 else None,
                    )
                    for i, r in zip(chunk, results, strict=True):
                        out[i] = r["text"]
                    bar.update(len(chunk))
        return out
