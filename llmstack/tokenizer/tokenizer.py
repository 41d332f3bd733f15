"""`Tokenizer`: our trained BPE (or a named tiktoken encoding) behind tiktoken's fast encoder.

Saved as one JSON file beside checkpoints (`tokenizer.json`).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import tiktoken

from llmstack.tokenizer.bpe import GPT4_PATTERN, count_chunks, encode_reference, train_bpe

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end_of_turn|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *CHAT_TOKENS, *(f"<|reserved_{i}|>" for i in range(4))]


class Tokenizer:
    def __init__(self, encoding: tiktoken.Encoding, *, bos: str, eos: str, pad: str, spec: dict):
        self.encoding = encoding
        self.special_tokens: dict[str, int] = dict(encoding._special_tokens)
        self.bos_id = self.special_tokens[bos]
        self.eos_id = self.special_tokens[eos]
        self.pad_id = self.special_tokens[pad]
        self._spec = spec  # what `save` writes

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
    def _from_merges(cls, merges: list[bytes], pattern: str) -> "Tokenizer":
        ranks = {bytes([i]): i for i in range(256)}
        for i, token in enumerate(merges):
            ranks[token] = 256 + i
        special = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        spec = {"type": "bpe", "pattern": pattern,
                "merges": [base64.b64encode(t).decode("ascii") for t in merges],
                "special_tokens": SPECIAL_TOKENS}
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
        tmp.write_text(json.dumps(self._spec))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} not found")
        try:
            spec = json.loads(path.read_text())
            if spec["type"] == "tiktoken":
                return cls.from_tiktoken(spec["name"])
            if spec.get("special_tokens") != SPECIAL_TOKENS:
                raise ValueError("special tokens differ from this version's")
            merges = [base64.b64decode(m) for m in spec["merges"]]
            return cls._from_merges(merges, spec["pattern"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
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


class StreamDecoder:
    """Turns a stream of token ids into text as soon as it is valid UTF-8 (a character
    may be split across tokens, so bytes are held back until it is complete)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending = b""

    def push(self, token_id: int) -> str:
        self.pending += self.tokenizer.decode_bytes([token_id])
        for cut in range(len(self.pending), max(len(self.pending) - 4, -1), -1):
            try:
                text = self.pending[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.pending = self.pending[cut:]
            return text
        return ""

    def flush(self) -> str:
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text
