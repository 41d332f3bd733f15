"""Integer-arithmetic questions: prompts for reinforcement learning with a reward a program checks.

    data.source: arithmetic        # a + b and a - b (a >= b) for operands 1..20
    data.source: arithmetic:50     # operands 1..50
    rl.task: arithmetic            # llmstack.finetune.rewards.arithmetic: the answer's last integer is exact

Every question is "What is a + b? Answer with the number only." (or a - b, never negative), each one
a conversation whose assistant turn is the exact value. The split is a pure function of the question,
independent of the run's seed: a question is held out when a hash of it falls below `val_fraction`,
and a + b and b + a hash alike, so a held-out sum is never seen in training in the other order.
"""
from __future__ import annotations

import hashlib

QUESTION = "What is {a} {op} {b}? Answer with the number only."
DEFAULT_MAX_OPERAND = 20


def is_arithmetic_source(source: str) -> bool:
    return source == "arithmetic" or source.startswith("arithmetic:")


def max_operand_of(source: str) -> int:
    """The largest operand that `data.source` (arithmetic or arithmetic:N) names."""
    _, _, n = source.partition(":")
    if not n:
        return DEFAULT_MAX_OPERAND
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"data.source {source!r}: write arithmetic:N with N the largest operand (an integer >= 1)")
    return int(n)


def problems(max_operand: int = DEFAULT_MAX_OPERAND) -> list[tuple[int, str, int]]:
    """Every (a, op, b) with operands in 1..max_operand: all sums, and the differences with a >= b."""
    r = range(1, max_operand + 1)
    return [(a, "+", b) for a in r for b in r] + [(a, "-", b) for a in r for b in r if a >= b]


def _key(a: int, op: str, b: int) -> float:
    """A number in [0, 1) fixed by the question (the same for a + b and b + a)."""
    if op == "+":
        a, b = min(a, b), max(a, b)
    digest = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def value(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def arithmetic_problems(split: str, *, val_fraction: float, max_operand: int = DEFAULT_MAX_OPERAND):
    """The (a, op, b) of one split ("train", "val" or "all"), in an order fixed by their hash."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    keyed = sorted((_key(*p), p) for p in problems(max_operand))
    return [p for k, p in keyed if split == "all" or (k < val_fraction) == (split == "val")]


def arithmetic_conversations(split: str, *, val_fraction: float, max_operand: int = DEFAULT_MAX_OPERAND):
    """[user: the question, assistant: its value] for each question of the split."""
    return [[{"role": "user", "content": QUESTION.format(a=a, op=op, b=b)},
             {"role": "assistant", "content": str(value(a, op, b))}]
            for a, op, b in arithmetic_problems(split, val_fraction=val_fraction, max_operand=max_operand)]
