"""Preference pairs for reward models and DPO: a prompt, a chosen and a rejected answer.

    pairs = load_pairs("stdlib", "train")               # or "my_pairs.jsonl"
    batches = PairBatches(encode_pairs(tok, pairs), batch_size=8)

JSONL, one pair per line, in either common form:

    {"prompt": "...", "chosen": "...", "rejected": "..."}
    {"chosen": [messages...], "rejected": [messages...]}     (whole conversations that differ in
                                                               the last assistant message; "prompt"
                                                               may hold the shared messages instead)

**The default pairs** (`source: stdlib`) need no download: the standard-library instructions of
`llmstack.data.chat` with the real code as the chosen answer and a corrupted one as the rejected:
the body cut in half, its lines in another order, or another function's code, in turn. Split by
file as pretraining and instruction tuning split it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from llmstack.data.chat import (ROLES, Example, encode_conversation, jsonl_split, read_jsonl, sample_indices,
                                stdlib_instructions, targets_of)
from llmstack.data.corpus import DataError

CORRUPTIONS = ("truncated", "shuffled", "other")


@dataclass
class Pair:
    prompt: list[dict]  # the messages before the answer
    chosen: str
    rejected: str


def _messages(value, where: str, key: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and m.get("role") in ROLES
                                              and isinstance(m.get("content"), str) for m in value):
        raise DataError(f"{where}: {key!r} must be a string or a list of {{'role', 'content'}} messages with roles "
                        f"{', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def pair_of(row: object, where: str) -> Pair:
    """A checked Pair from one JSONL row; a DataError naming `where` otherwise."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a line must be a JSON object, got {type(row).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise DataError(f"{where}: no {' and '.join(map(repr, missing))}; a preference pair has 'prompt', 'chosen' "
                        "and 'rejected'")
    prompt = _messages(row["prompt"], where, "prompt") if "prompt" in row else []
    answers = []
    for key in ("chosen", "rejected"):
        value = row[key]
        if isinstance(value, str):
            answers.append(value)
            continue
        conv = _messages(value, where, key)
        if not conv or conv[-1]["role"] != "assistant":
            raise DataError(f"{where}: {key!r} must end with an assistant message")
        if not prompt:
            prompt = conv[:-1]
        elif conv[:-1] not in ([], prompt):
            raise DataError(f"{where}: {key!r} continues another conversation than 'prompt'")
        answers.append(conv[-1]["content"])
    if not prompt:
        raise DataError(f"{where}: the pair has no prompt")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt ends with an assistant message; it must end with the user's turn")
    if answers[0] == answers[1]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical: the pair prefers nothing")
    return Pair(prompt, answers[0], answers[1])


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    return read_jsonl(path, pair_of)


def load_pairs(source: str = "stdlib", split: str = "train", *, val_fraction: float = 0.02,
               max_chars: int = 1200) -> list[Pair]:
    """The pairs of one split: the stdlib pairs, or the lines of JSONL files (split by line index)."""
    if source == "stdlib":
        pairs = stdlib_pairs(split, val_fraction=val_fraction, max_chars=max_chars)
    else:
        pairs = jsonl_split(source, split, val_fraction, pair_of)
    if not pairs:
        raise DataError(f"data.source {source!r} has no preference pairs in its {split} split")
    return pairs


def _corrupt(code: str, kind: str, other: str, seed: int) -> Optional[str]:
    lines = code.split("\n")
    head, body = lines[:1], lines[1:]
    if kind == "truncated":
        bad = "\n".join(head + body[:len(body) // 2]) if len(body) >= 2 else None
    elif kind == "shuffled":
        order = np.random.default_rng(seed).permutation(len(body))
        bad = "\n".join(head + [body[i] for i in order]) if len(body) >= 2 else None
    else:
        bad = other
    return bad if bad and bad != code else None


def stdlib_pairs(split: str = "train", *, val_fraction: float = 0.02, max_chars: int = 1200) -> list[Pair]:
    """The standard-library instructions with the real code chosen and a corrupted one rejected
    (`CORRUPTIONS` in turn; "other" takes the next instruction's code)."""
    chats = stdlib_instructions(split, val_fraction=val_fraction, max_chars=max_chars)
    pairs = []
    for i, (user, answer) in enumerate(chats):
        code = answer["content"]
        seed = int.from_bytes(hashlib.sha1(user["content"].encode()).digest()[:4], "big")
        other = chats[(i + 1) % len(chats)][1]["content"]
        bad = _corrupt(code, CORRUPTIONS[i % len(CORRUPTIONS)], other, seed) or _corrupt(code, "other", other, seed)
        if bad is not None:
            pairs.append(Pair([user], code, bad))
    return pairs


# ---------------------------------------------------------------------- encoding and batches


@dataclass
class EncodedPair:
    chosen: Example
    rejected: Example


def encode_pairs(tokenizer, pairs: Sequence[Pair], max_len: int, *, truncation: str = "truncate") -> list[EncodedPair]:
    """Each pair's two conversations through the chat template (`encode_conversation`), the answer's
    tokens marked; longer than max_len: cut (truncate, when both keep an answer token), dropped
    (drop) or a DataError (refuse)."""
    out = []
    for i, p in enumerate(pairs):
        c = encode_conversation(tokenizer, p.prompt + [{"role": "assistant", "content": p.chosen}])
        r = encode_conversation(tokenizer, p.prompt + [{"role": "assistant", "content": p.rejected}])
        if max(len(c), len(r)) > max_len:
            if truncation == "refuse":
                raise DataError(f"preference pair {i} has {max(len(c), len(r))} tokens, more than data.seq_len="
                                f"{max_len}; raise data.seq_len or set data.truncation to truncate or drop")
            if truncation == "drop":
                continue
            c, r = Example(c.ids[:max_len], c.assistant[:max_len]), Example(r.ids[:max_len], r.assistant[:max_len])
            if not any(c.assistant[1:]) or not any(r.assistant[1:]) or c.ids == r.ids:
                continue
        out.append(EncodedPair(c, r))
    return out


class PairBatches:
    """Batches of pairs, a pure function of (seed, step, micro_step) like `ChatBatches`. A batch is
    (x, units, extra): x (2B, T) the chosen rows then the rejected rows, padded at the end;
    units (B,) one per pair (what the trainer divides the summed loss by); extra: "targets"
    (2B, T) next-token targets on the answers (-100 elsewhere), "index" (B,) the pairs' indices
    (to look up precomputed reference log-probs), "lengths" (2B,) each row's tokens."""

    def __init__(self, pairs: Sequence[EncodedPair], batch_size: int, *, pad_id: int = 0, seed: int = 0,
                 grad_accum: int = 1, device: Optional[torch.device | str] = None, name: str = "train"):
        if not pairs:
            raise DataError(f"the {name} split has no preference pair that fits data.seq_len")
        self.pairs, self.batch_size, self.pad_id = list(pairs), batch_size, pad_id
        self.seed, self.grad_accum, self.device = seed, grad_accum, torch.device(device or "cpu")

    def __len__(self) -> int:
        return len(self.pairs)

    def get_batch(self, step: int, micro_step: int = 0):
        first = (step * self.grad_accum + micro_step) * self.batch_size
        return self.collate(sample_indices(len(self.pairs), self.seed, first, self.batch_size))

    def epoch(self, step: int) -> float:
        return step * self.grad_accum * self.batch_size / len(self.pairs)

    def eval_batches(self, n_batches: Optional[int] = None):
        """All pairs in order (or `n_batches` batches spread evenly over them)."""
        n = len(self.pairs)
        picked = np.arange(n) if n_batches is None or n_batches * self.batch_size >= n else \
            np.arange(n_batches * self.batch_size) * n // (n_batches * self.batch_size)
        for b in range(0, len(picked), self.batch_size):
            yield self.collate([int(i) for i in picked[b:b + self.batch_size]])

    def collate(self, indices: Sequence[int]):
        rows = [self.pairs[i].chosen for i in indices] + [self.pairs[i].rejected for i in indices]
        T = max(len(r) for r in rows)
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), -100, dtype=torch.long)
        for j, r in enumerate(rows):
            x[j, :len(r)] = torch.tensor(r.ids)
            y[j, :len(r)] = torch.from_numpy(targets_of(r))
        index = torch.tensor(list(indices))
        lengths = torch.tensor([len(r) for r in rows])
        return (x.to(self.device), torch.zeros(len(indices), device=self.device),
                {"targets": y.to(self.device), "index": index, "lengths": lengths.to(self.device)})
