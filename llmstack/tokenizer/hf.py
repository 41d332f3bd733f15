"""`HFTokenizer`: a downloaded model's tokenizer, behind the `tokenizers` package (Hugging Face's
Rust tokenizer), with the same interface as llmstack's own `Tokenizer`.

    tok = HFTokenizer.from_file("Llama-3.2-1B-Instruct/tokenizer.json")   # or llmstack.tokenizer.load(dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])   # the prompt, ready to generate from
    tok.stop_ids                                                         # EOS and the end-of-turn tokens

What encodes text is the tokenizer.json pipeline itself (normalizer, pre-tokenizer, BPE
model, added tokens); what llmstack needs beyond it comes from the files beside it, read the
way transformers reads them: `tokenizer_config.json` (BOS/EOS/PAD/UNK, `add_bos_token`,
the chat template, `added_tokens_decoder`), `chat_template.jinja` or `chat_template.json`
(newer files keep the template there), `generation_config.json` and `config.json` (token ids
the tokenizer config lacks, and every id of an `eos_token_id` list, which become `stop_ids`).
`llmstack.tokenizer.gguf` builds the same class from a GGUF file's metadata.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from llmstack.tokenizer.chat import end_of_turn_ids, render_chat

NAMED = ("bos_token", "eos_token", "pad_token", "unk_token")


class HFTokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens, BOS convention and chat template of its model.

    `encode` follows transformers' `encode(text, add_special_tokens=False)`: added tokens
    (special or not) spelled out in the text ARE encoded as their ids, e.g. "<|im_end|>" in
    the text becomes the <|im_end|> token; BOS/EOS are added only when asked (`bos=True`;
    `add_bos_token` says whether the model expects one in front of a prompt)."""

    def __init__(self, backend, *, bos_token: Optional[str] = None, eos_token: Optional[str] = None,
                 pad_token: Optional[str] = None, unk_token: Optional[str] = None, add_bos_token: bool = False,
                 chat_template: Optional[str] = None, extra_stop_ids: Iterable[int] = ()):
        from tokenizers import AddedToken

        self.backend = backend
        backend.no_truncation()  # a tokenizer.json may carry truncation or padding; encode must return every id
        backend.no_padding()
        names = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in dict.fromkeys(names.values()) if t is not None and t not in added]
        if missing:  # transformers registers named special tokens as special added tokens too
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        ids = {}
        for key, token in names.items():
            ids[key] = None if token is None else backend.token_to_id(token)
        self._names = names
        self.bos_id: Optional[int] = ids["bos_token"]
        self.eos_id: Optional[int] = ids["eos_token"]
        self.pad_id: Optional[int] = ids["pad_token"]
        self.unk_id: Optional[int] = ids["unk_token"]
        self.add_bos_token = bool(add_bos_token) and self.bos_id is not None
        self.chat_template = chat_template
        added_tokens = sorted(backend.get_added_tokens_decoder().items())
        self.special_tokens: dict[str, int] = {t.content: i for i, t in added_tokens if t.special}
        for token, i in zip(names.values(), ids.values()):
            if token is not None:
                self.special_tokens.setdefault(token, i)
        stops = [self.eos_id, *extra_stop_ids, *end_of_turn_ids(self.special_tokens)]
        self.stop_ids: list[int] = list(dict.fromkeys(int(i) for i in stops if i is not None))
        vocab = backend.get_vocab(with_added_tokens=True)
        self._n_ids = max(vocab.values(), default=-1) + 1
        self._has_holes = len(set(vocab.values())) < self._n_ids
        self._fingerprint: Optional[str] = None

    # ------------------------------------------------------------------ files

    @classmethod
    def from_file(cls, path: str | os.PathLike, text: Optional[str] = None) -> "HFTokenizer":
        """A Hugging Face tokenizer.json (`text`: its contents, when already read) with the config files
        beside it."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        text = path.read_text(encoding="utf-8") if text is None else text
        try:
            backend = Backend.from_str(text)
        except Exception as e:  # the Rust side raises plain Exceptions
            raise ValueError(f"{path} is a Hugging Face tokenizer.json that the tokenizers package cannot read "
                             f"({e})") from None
        folder = path.parent
        config = _read_json(folder / "tokenizer_config.json")
        model_config = _read_json(folder / "config.json")
        generation = _read_json(folder / "generation_config.json")

        names = {key: _content(config.get(key)) for key in NAMED}
        for key in NAMED:  # a tokenizer config without the token: the model's config may give its id
            token_id = _first_id(generation.get(f"{key}_id", model_config.get(f"{key}_id")))
            if names[key] is None and key not in config and token_id is not None:
                names[key] = backend.id_to_token(token_id)
        _add_config_tokens(backend, config.get("added_tokens_decoder") or {})

        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:  # what the tokenizer.json's post-processor does, as transformers then does too
            bos_id = None if names["bos_token"] is None else backend.token_to_id(names["bos_token"])
            with_special = backend.encode("a", add_special_tokens=True).ids
            plain = backend.encode("a", add_special_tokens=False).ids
            add_bos = bos_id is not None and with_special[:1] == [bos_id] and plain[:1] != [bos_id]
        stops = [*(config.get("stop_ids") or []), *_ids(generation.get("eos_token_id")),
                 *_ids(model_config.get("eos_token_id"))]
        return cls(backend, **names, add_bos_token=add_bos, chat_template=_chat_template(folder, config),
                   extra_stop_ids=stops)

    def save(self, path: str | os.PathLike) -> None:
        """Write `path` (the tokenizer.json) and tokenizer_config.json beside it: `load(path)` gives this
        tokenizer back, and transformers' AutoTokenizer reads the folder."""
        path = Path(path)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # transformers then uses tokenizer.json as it is
            **self._names,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "stop_ids": self.stop_ids,  # llmstack's: the end-of-generation ids generation_config.json gave
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        _write_utf8(path, self.backend.to_str())  # the vocabulary spelled as it is, not \u-escaped
        _write_utf8(path.with_name("tokenizer_config.json"), json.dumps(config, indent=2, ensure_ascii=False))

    def fingerprint(self) -> str:
        """A short hash of what turns text into ids and back (normalizer, pre-tokenizer, model, added
        tokens, decoder) and of the BOS/EOS ids: a cache key for tokenized corpora, and what a draft
        model's tokenizer must share with the target's."""
        if self._fingerprint is None:
            spec = json.loads(self.backend.to_str())
            keep = {k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "model", "added_tokens", "decoder")}
            keep["ids"] = [self.bos_id, self.eos_id]
            self._fingerprint = hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
        return self._fingerprint

    # ------------------------------------------------------------------ encode / decode

    @property
    def vocab_size(self) -> int:
        """One more than the largest id, added tokens included."""
        return self._n_ids

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """`text`'s ids, as transformers' `encode(text, add_special_tokens=False)`: special-token spellings
        in the text become their ids. `bos`/`eos` add the model's BOS/EOS."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Many texts at once, on the tokenizers package's threads."""
        encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encodings]

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        if eos:
            if self.eos_id is None:
                raise ValueError("this tokenizer has no EOS token")
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens spelled out (transformers' `decode(ids)`; a BPE tokenizer's
        output is never "cleaned up"). An incomplete UTF-8 character decodes as U+FFFD."""
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self._n_ids
                    or (self._has_holes and any(self.backend.id_to_token(i) is None for i in ids))):
            bad = next(i for i in ids if not 0 <= i < self._n_ids or self.backend.id_to_token(i) is None)
            raise ValueError(f"token id {bad} is not in the tokenizer's vocabulary ({self._n_ids} ids)")
        return self.backend.decode(ids, skip_special_tokens=False)

    def token_id(self, special: str) -> int:
        return self.special_tokens[special]

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                            tokenize: bool = True, **kwargs: Any) -> list[int] | str:
        """The conversation rendered by the model's chat template (`llmstack.tokenizer.chat`), as ids with
        its special tokens recognised (what transformers' apply_chat_template returns), or as the
        string with `tokenize=False`. `kwargs` reach the template (tools, documents, ...)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (its tokenizer_config.json or GGUF metadata "
                             "holds none)")
        variables = {k: v for k, v in self._names.items() if v is not None}
        text = render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           **{**variables, **kwargs})
        return self.encode_chat(text) if tokenize else text

    def encode_chat(self, text: str) -> list[int]:
        """Ids of text rendered by a chat template, its special-token spellings as their ids (`encode`)."""
        return self.encode(text)


# ---------------------------------------------------------------------- the config files

def _write_utf8(path: Path, text: str) -> None:
    """llmstack.io.atomic_write_text in UTF-8 whatever the locale: the same `.NAME.tmp-*` temporary,
    renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt or truncated ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def _content(token: Any) -> Optional[str]:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken's dict."""
    return token.get("content") if isinstance(token, dict) else token


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _first_id(value: Any) -> Optional[int]:
    ids = _ids(value)
    return ids[0] if ids else None


def _chat_template(folder: Path, config: dict) -> Optional[str]:
    """Newer files keep the template in chat_template.jinja (or chat_template.json); older ones in
    tokenizer_config.json, as a string or a list of named templates (the one named "default")."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _add_config_tokens(backend, decoder: dict) -> None:
    """Added tokens that tokenizer_config.json lists and tokenizer.json lacks (transformers adds them)."""
    from tokenizers import AddedToken

    have = {t.content for t in backend.get_added_tokens_decoder().values()}
    for _, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        if isinstance(spec, dict) and spec.get("content") and spec["content"] not in have:
            token = AddedToken(spec["content"], single_word=spec.get("single_word", False),
                               lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                               normalized=spec.get("normalized", not spec.get("special", False)),
                               special=spec.get("special", False))
            (backend.add_special_tokens if token.special else backend.add_tokens)([token])
