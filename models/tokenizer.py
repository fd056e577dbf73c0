"""Tokenizer: a small interface over one `tokenizers.Tokenizer`.

On disk it uses the HF layout (`tokenizer.json` + `tokenizer_config.json`), so an HF model directory and a
directory this project writes load the same way. GGUF vocabularies are converted to this in `models/gguf.py`.
Chat templates are rendered with jinja2 in the environment transformers' `apply_chat_template` gives them (same
whitespace rules, `tojson` without HTML escaping or key sorting, `strftime_now`, `raise_exception`, `tools` and
`documents`), so the text we train and generate on is the text HF or vLLM would serve; tests hold it to
transformers for the default model's template and Llama 3, Qwen 2.5 and Mistral-style ones.
"""

from __future__ import annotations

import datetime as dt
import json
from functools import cached_property
from pathlib import Path

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment


class Tokenizer:
    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        bos_id: int | None,
        eos_id: int,
        pad_id: int | None = None,
        stop_ids: set[int] | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_id = eos_id
        # No pad token: padding positions are masked anyway, so any valid id serves; EOS is the usual choice.
        self.pad_id = eos_id if pad_id is None else pad_id
        self.stop_ids = set(stop_ids or ()) | {eos_id}
        self.add_bos = add_bos
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def token(self, i: int | None) -> str | None:
        return None if i is None else self.tok.id_to_token(i)

    @cached_property
    def _template(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # jinja2's own tojson escapes <, >, & and ' for HTML and sorts keys: tool schemas would then read
            # differently from what the model was trained on (and from what transformers renders).
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:  # Llama 3.1+ templates date their system prompt with it
            return dt.datetime.now().strftime(fmt)

        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        return env.from_string(self.chat_template)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}], tool calls and tool results included) with the
        model's jinja2 chat template. `tools` are JSON schemas (dicts), `documents` dicts for RAG templates; other
        keyword arguments reach the template as variables, as in transformers."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template: set task.chat=false, or use an instruct model")
        return self._template.render(
            messages=messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.token(self.bos_id) or "",
            eos_token=self.token(self.eos_id) or "",
            **kwargs,
        )

    # --- files -------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / "tokenizer.json"))
        config = {
            "bos_token": self.token(self.bos_id),
            "eos_token": self.token(self.eos_id),
            "pad_token": self.token(self.pad_id),
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template,
            "stop_tokens": sorted(self.token(i) for i in self.stop_ids),
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json in the checkpoint directory")
        tok = tokenizers.Tokenizer.from_file(str(path))
        cfg_path = d / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

        def tid(entry) -> int | None:
            # HF stores special tokens as strings or as {"content": ...} dicts.
            if isinstance(entry, dict):
                entry = entry.get("content")
            return None if entry is None else tok.token_to_id(entry)

        eos_id = tid(cfg.get("eos_token"))
        if eos_id is None:
            raise ValueError(f"{cfg_path}: no eos_token; add one to tokenizer_config.json")
        gen = d / "generation_config.json"
        stop = {tid(t) for t in cfg.get("stop_tokens", [])} - {None}
        if gen.is_file():
            g = json.loads(gen.read_text()).get("eos_token_id")
            stop |= set(g if isinstance(g, list) else [g] if g is not None else [])
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # HF's default for Llama tokenizers without the key: post-processor decides; we ask it.
            add_bos = tid(cfg.get("bos_token")) is not None and len(tok.encode("a").ids) > len(
                tok.encode("a", add_special_tokens=False).ids
            )
        template = cfg.get("chat_template")
        if isinstance(template, list):  # HF allows a list of named templates; take the default one.
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tok, tid(cfg.get("bos_token")), eos_id, tid(cfg.get("pad_token")), stop, bool(add_bos), template)

    @classmethod
    def bytes(cls) -> Tokenizer:
        """A byte-level tokenizer (256 byte tokens + <s>, </s>, <pad>) for the random `tiny` model: no files needed."""
        alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
        vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
        bpe = tokenizers.models.BPE(vocab=vocab, merges=[])
        tok = tokenizers.Tokenizer(bpe)
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        tok.add_special_tokens(["<s>", "</s>", "<pad>"])
        template = (
            "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
        )
        return cls(tok, 256, 257, 258, None, True, template)
