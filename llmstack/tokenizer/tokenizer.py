"""`Tokenizer`: our trained BPE (or a named tiktoken encoding) behind tiktoken's fast encoder.

Saved as one JSON file beside checkpoints (`tokenizer.json`), which lists its special tokens:
a file keeps the ones it was trained with when this list changes. Chats use ChatML
(`<|im_start|>{role}\n{content}<|im_end|>\n`) when the file has its two tokens.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import tiktoken

from llmstack.tokenizer.bpe import GPT4_PATTERN, count_chunks, encode_reference, train_bpe
from llmstack.tokenizer.chat import CHATML, end_of_turn_ids, render_chat

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TOKENS = [IM_START, IM_END]
# Eleven in all, as before ChatML (which needs two chat tokens where there were four): the same
# vocabulary size gives the same merges and the same ids for BOS, EOS and PAD.
SPECIAL_TOKENS = [BOS, EOS, PAD, *CHAT_TOKENS, *(f"<|reserved_{i}|>" for i in range(6))]


class Tokenizer:
    """`encode` treats text as text: a special token's spelling in it (say "<|im_end|>") is encoded as
    ordinary characters, never as the special token, so no document can forge one. Special tokens
    enter only through `bos`/`eos` and `apply_chat_template`."""

    add_bos_token = False  # models trained here see documents separated by EOS, with no BOS in front

    def __init__(self, encoding: tiktoken.Encoding, *, bos: str, eos: str, pad: str, spec: dict):
        self.encoding = encoding
        self.special_tokens: dict[str, int] = dict(encoding._special_tokens)
        self.bos_id: Optional[int] = self.special_tokens.get(bos)
        self.eos_id: Optional[int] = self.special_tokens.get(eos)
        self.pad_id: Optional[int] = self.special_tokens.get(pad)
        self._bos, self._eos = bos, eos
        self._spec = spec  # what `save` writes
        chatml = IM_START in self.special_tokens and IM_END in self.special_tokens
        self.chat_template: Optional[str] = CHATML if chatml else None
        stops = [self.eos_id, *end_of_turn_ids(self.special_tokens)]
        self.stop_ids: list[int] = list(dict.fromkeys(i for i in stops if i is not None))

    # ------------------------------------------------------------------ construction

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, pattern: str = GPT4_PATTERN,
              verbose: bool = False) -> "Tokenizer":
        """Train byte-level BPE; `vocab_size` counts the 256 bytes, the merges and the special tokens."""
        minimum = 256 + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise ValueError(f"vocab_size={vocab_size} is too small: 256 byte tokens and {len(SPECIAL_TOKENS)} "
                             f"special tokens need at least {minimum}")
        t0 = time.perf_counter()
        chunks = count_chunks(texts, pattern)
        if not chunks:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        merges = train_bpe(chunks, vocab_size - minimum, progress=verbose)
        if verbose:
            print(f"trained {256 + len(merges)} tokens from {len(chunks)} unique chunks "
                  f"in {time.perf_counter() - t0:.1f}s")
        return cls._from_merges(merges, pattern)

    @classmethod
    def _from_merges(cls, merges: list[bytes], pattern: str,
                     special_tokens: Sequence[str] = tuple(SPECIAL_TOKENS)) -> "Tokenizer":
        ranks = {bytes([i]): i for i in range(256)}
        for i, token in enumerate(merges):
            ranks[token] = 256 + i
        special = {name: len(ranks) + i for i, name in enumerate(special_tokens)}
        if len(special) != len(special_tokens) or not all(isinstance(t, str) and t for t in special_tokens):
            raise ValueError(f"the special tokens must be distinct non-empty strings, not {list(special_tokens)}")
        spec = {"type": "bpe", "pattern": pattern,
                "merges": [base64.b64encode(t).decode("ascii") for t in merges],
                "special_tokens": list(special_tokens)}
        enc = tiktoken.Encoding(name="llmstack-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        return cls(enc, bos=BOS, eos=EOS, pad=PAD, spec=spec)

    @classmethod
    def from_tiktoken(cls, name: str) -> "Tokenizer":
        """A named tiktoken encoding ("gpt2", "cl100k_base", "o200k_base"). Its files must be
        cached locally (TIKTOKEN_CACHE_DIR) when there is no network."""
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # network errors, unknown names
            raise RuntimeError(
                f"cannot load the tiktoken encoding {name!r} ({type(e).__name__}: {e}). It is downloaded on first "
                "use: connect to the network once or point TIKTOKEN_CACHE_DIR at a cached copy, or train one "
                "offline with scripts/train_tokenizer.py") from None
        eot = "<|endoftext|>"
        return cls(enc, bos=eot, eos=eot, pad=eot, spec={"type": "tiktoken", "name": name})

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        spec = dict(self._spec)
        if self.chat_template != (CHATML if IM_START in self.special_tokens and IM_END in self.special_tokens
                                  else None):
            spec["chat_template"] = self.chat_template  # one set by hand (a fine-tuning job's data.chat_template)
        tmp.write_text(json.dumps(spec))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} not found")
        try:
            spec = json.loads(path.read_text())
            if spec["type"] == "tiktoken":
                tok = cls.from_tiktoken(spec["name"])
            elif spec["type"] != "bpe":
                raise ValueError(f"unknown type {spec['type']!r}")
            else:
                merges = [base64.b64decode(m, validate=True) for m in spec["merges"]]
                # the file's own special tokens: one saved by an earlier version keeps the ones it was trained with
                tok = cls._from_merges(merges, spec["pattern"], spec["special_tokens"])
            if "chat_template" in spec:
                tok.chat_template = spec["chat_template"]
            return tok
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:  # binascii.Error is a ValueError
            raise ValueError(f"tokenizer file {str(path)!r} is corrupt or truncated ({e})") from None

    def fingerprint(self) -> str:
        """A short hash that identifies this tokenizer (a cache key for tokenized corpora)."""
        return hashlib.sha256(json.dumps(self._spec, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ encode / decode

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Ordinary text: a special token's spelling in the text is encoded as plain text."""
        ids = self.encoding.encode_ordinary(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False,
                     num_threads: int = 8) -> list[list[int]]:
        """Many texts at once on tiktoken's threads (the GIL is released while encoding)."""
        out = self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)
        if bos or eos:
            out = [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out]
        return out

    def token_id(self, special: str) -> int:
        return self.special_tokens[special]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        try:
            return self.encoding.decode_bytes(ids)
        except KeyError:  # tiktoken's message names neither the id nor the vocabulary
            bad = next(i for i in ids if not self._decodes(i))
            raise ValueError(f"token id {bad} is not in the tokenizer's vocabulary ({self.vocab_size} ids)") from None

    def _decodes(self, token_id: int) -> bool:
        try:
            self.encoding.decode_single_token_bytes(token_id)
            return True
        except KeyError:
            return False

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def encode_reference(self, text: str) -> list[int]:
        """The same ids as `encode`, computed in plain Python from the merge ranks (slow; for tests)."""
        return encode_reference(text, self.encoding._mergeable_ranks, self.encoding._pat_str)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                            tokenize: bool = True, **kwargs: Any) -> list[int] | str:
        """The conversation in ChatML, ending with `<|im_start|>assistant\n` (`add_generation_prompt`):
        ids, the chat tokens as their special ids and the messages as text, or the string with
        `tokenize=False`. A tokenizer saved before ChatML has no chat template (a ValueError)."""
        if self.chat_template is None:
            raise ValueError(f"this tokenizer has no chat template: its special tokens {sorted(self.special_tokens)} "
                             f"lack {IM_START} and {IM_END} (it was saved before llmstack used ChatML)")
        variables = {"bos_token": self._bos, "eos_token": self._eos}
        text = render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           **{**variables, **kwargs})
        return self.encode_chat(text) if tokenize else text

    def encode_chat(self, text: str) -> list[int]:
        """Ids of text rendered by a chat template: the template's chat tokens become their special ids,
        and so does a message that spells one out, as with transformers' apply_chat_template."""
        return self.encoding.encode(text, allowed_special="all")


class StreamDecoder:
    """Turns a stream of token ids into text as soon as it is final, for either tokenizer class.

    It decodes a short window of the latest tokens whole (merges and byte fallback can span
    token boundaries, and a SentencePiece decoder drops the space before the first token of
    what it decodes) and emits what is new, holding back a trailing U+FFFD: an incomplete
    UTF-8 character, until its last byte arrives. The window restarts at each point where
    the text is complete, keeping the tokens since the point before as context, so each
    push decodes a few tokens, not the whole continuation."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode
        self.ids: list[int] = []
        self._start = 0  # the window: ids[_start:] are decoded together
        self._shown = 0  # characters of the window's text already emitted
        self._complete = 0  # the latest point where the text was complete

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids[self._start:])
        stable = len(text.rstrip("\ufffd"))
        new = text[self._shown:stable]
        self._shown = max(self._shown, stable)
        if stable == len(text):  # complete: restart the window at the previous complete point
            if self._complete > self._start:
                self._start = self._complete
                self._shown = len(self.decode(self.ids[self._start:]))
            self._complete = len(self.ids)
        return new

    def flush(self) -> str:
        """What is held back (call once the stream has ended); the decoder starts afresh."""
        text = self.decode(self.ids[self._start:])[self._shown:]
        self.ids, self._start, self._shown, self._complete = [], 0, 0, 0
        return text
