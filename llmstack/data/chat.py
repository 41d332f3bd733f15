"""Conversations for supervised fine-tuning: read, rendered by a chat template, labelled, packed.

    chats = load_conversations("stdlib", "train")          # or "my_chats.jsonl"
    examples = [encode_conversation(tok, c) for c in chats]  # ids, and which of them the assistant wrote
    rows = pack(examples, seq_len=512)                      # several conversations per row
    batches = ChatBatches(rows, batch_size=8, pad_id=tok.pad_id)
    x, y, kwargs = batches.get_batch(step)                  # model(x, targets=y, **kwargs)

Data files are JSONL, one conversation per line, in either of the two common forms:

    {"messages": [{"role": "system", "content": ...}, {"role": "user", ...}, {"role": "assistant", ...}]}
    {"prompt": "...", "completion": "..."}               (a user turn and the assistant's answer)

**Labels.** The loss is taken on the assistant's tokens only. A conversation is rendered by the
model's chat template turn by turn: for each assistant message, the conversation before it with
the generation prompt (`<|im_start|>assistant\\n`), then with the message itself; what the second
adds to the first is the assistant's (its text and the end-of-turn token, so the model learns to
stop), the rest is context. Each piece is encoded on its own, so a label never straddles a
boundary. A template that does not render a conversation as a growing prefix (one that rewrites
earlier turns) is refused with the turn that breaks it.

**Packing.** Conversations are laid end to end in rows of `seq_len` tokens. Each row carries its
documents' positions (restarting at 0) and a mask that lets a token see only its own document,
so a packed row computes exactly what its conversations compute alone (tests/test_chat_data.py).

**The default data set** (`source: stdlib`) needs no download: every documented function of the
running interpreter's standard library becomes an instruction (its signature and docstring) and
an answer (its code without the docstring), split by file with the same hash as the pretraining
corpus, so the held-out instructions come from files a model pretrained here never saw.
"""
from __future__ import annotations

import ast
import glob
import json
import os
import sysconfig
import textwrap
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, TypeVar

import numpy as np
import torch

from llmstack.data.corpus import DataError, _is_val, stdlib_files

ROLES = ("system", "user", "assistant", "tool")
T = TypeVar("T")
TRUNCATION = ("truncate", "drop", "refuse")


# ---------------------------------------------------------------------- reading


def conversation_of(row: object, where: str) -> list[dict]:
    """The messages of one data row ({"messages": [...]} or {"prompt", "completion"}), checked;
    a DataError naming `where` (file:line) and the problem otherwise."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a line must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
    elif "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        # The conversational form of prompt/completion (lists of messages), as TRL reads it.
        prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        completion = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        messages = prompt + completion
    else:
        raise DataError(f"{where}: no 'messages' (nor 'prompt' and 'completion'); its keys are "
                        f"{', '.join(map(repr, row)) or 'none'}")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} is not a {{'role', 'content'}} object: {m!r:.120}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {m['role']!r} (roles: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} has content of type {type(m['content']).__name__}; "
                            "it must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message: nothing to learn from it")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with the assistant; it needs a prompt before")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_jsonl(path: str | os.PathLike, parse: Callable[[object, str], T]) -> list[T]:
    """`parse(row, "file:line")` of every line of a JSONL file, in order (blank lines skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e})") from None
            out.append(parse(row, f"{path}:{n}"))
    return out


def jsonl_split(source: str, split: str, val_fraction: float, parse: Callable[[object, str], T]) -> list[T]:
    """The rows of one split ("train", "val", "all") of the JSONL files `source` names (a path or a glob),
    split by a hash of each row's index over all files, as `load_corpus` splits JSONL rows."""
    files = sorted(glob.glob(os.path.expanduser(source), recursive=True))
    if not files:
        raise DataError(f"data.source {source!r} " + ("matches no file" if any(c in source for c in "*?[")
                                                      else "does not exist") + " (use 'stdlib' or a JSONL file)")
    bad = [f for f in files if Path(f).suffix.lower() not in (".jsonl", ".json")]
    if bad:
        raise DataError(f"data.source {source!r}: {bad[0]} is not a .jsonl file")
    every = [row for f in files for row in read_jsonl(f, parse)]
    return [r for i, r in enumerate(every) if split == "all" or _is_val(str(i), val_fraction) == (split == "val")]


def read_conversations(path: str | os.PathLike) -> list[list[dict]]:
    """Every conversation of one JSONL file, in order (blank lines skipped)."""
    return read_jsonl(path, conversation_of)


def load_conversations(source: str = "stdlib", split: str = "train", *, val_fraction: float = 0.02,
                       max_chars: int = 1200) -> list[list[dict]]:
    """The conversations of one split ("train", "val" or "all"): the standard-library instructions
    (`source: stdlib`, split by file as pretraining splits it), or the lines of JSONL files (a path
    or a glob), split by a hash of each line's index over all files."""
    if split not in ("train", "val", "all"):
        raise DataError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if source == "stdlib":
        chats = stdlib_instructions(split, val_fraction=val_fraction, max_chars=max_chars)
    else:
        chats = jsonl_split(source, split, val_fraction, conversation_of)
    if not chats:
        raise DataError(f"data.source {source!r} has no conversations in its {split} split "
                        f"(data.val_fraction={val_fraction})")
    return chats


# ---------------------------------------------------------------------- the standard-library instructions


def stdlib_instructions(split: str = "train", *, val_fraction: float = 0.02, max_chars: int = 1200) -> list[list[dict]]:
    """[user: "Write the Python function `name(args)`. <docstring>", assistant: its code] for every
    function and method of the standard library that has a docstring and a body of its own, its
    code (without the docstring) at most `max_chars` long. Files split as `load_corpus` splits them."""
    by_file = _stdlib_instructions(max_chars)
    pick = [split == "all" or _is_val(rel, val_fraction) == (split == "val") for rel, _ in by_file]
    chats = [pair for (rel, pairs), keep in zip(by_file, pick) if keep for pair in pairs]
    if split == "val":  # a function copied into several files (a backport, a vendored module) is not held out
        seen = {text for (rel, pairs), keep in zip(by_file, pick) if not keep for pair in pairs for text in pair}
        chats = [pair for pair in chats if not seen.intersection(pair)]
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in chats]


@lru_cache(maxsize=2)
def _stdlib_instructions(max_chars: int) -> list:
    """[(file, [(instruction, code), ...]), ...] for every file. Parsing the whole library takes
    seconds, so the result is cached on disk by the corpus's fingerprint (and in memory)."""
    from llmstack.data.corpus import corpus_fingerprint
    from llmstack.data.tokens import default_cache_dir
    from llmstack.io import atomic_write_text

    cache = default_cache_dir().parent / "instructions" / f"{corpus_fingerprint('stdlib')}-{max_chars}.json"
    if cache.is_file():
        try:
            return [(rel, [tuple(p) for p in pairs]) for rel, pairs in json.loads(cache.read_text())]
        except (json.JSONDecodeError, ValueError, TypeError):
            pass  # rebuilt below
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in stdlib_files():
        rel, pairs = str(path.relative_to(root)), []
        out.append((rel, pairs))
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # old files' invalid escape sequences
                tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError, OSError):
            continue  # a few test files are deliberately broken
        lines = source.splitlines()
        for node, owner in _functions(tree):
            pair = _instruction(node, owner, lines, max_chars)
            if pair is not None:
                pairs.append(pair)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(out))
    return out


def _functions(tree: ast.AST, owner: Optional[str] = None) -> Iterator[tuple[ast.AST, Optional[str]]]:
    """Functions and methods (with their class's name), nested ones included, in source order."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, owner
            yield from _functions(node, None)
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, node.name)
        else:
            yield from _functions(node, owner)


def _instruction(node, owner: Optional[str], lines: list[str], max_chars: int) -> Optional[tuple[str, str]]:
    doc = ast.get_docstring(node)
    if not doc or len(node.body) < 2:  # nothing but the docstring
        return None
    body = node.body[1:]
    if all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
           or (isinstance(s, ast.Raise) and "NotImplementedError" in ast.unparse(s)) for s in body):
        return None  # an abstract stub
    first, doc_node = node.lineno - 1, node.body[0]
    # The code without the docstring: the lines before it (the signature), then those after it.
    code = textwrap.dedent("\n".join(lines[first:doc_node.lineno - 1] + lines[doc_node.end_lineno:node.end_lineno]))
    if len(code) > max_chars or "\t" in code:
        return None
    signature = ast.unparse(node.args)
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    kind = "async function" if isinstance(node, ast.AsyncFunctionDef) else "function"
    name = f"{owner}.{node.name}" if owner else node.name
    if owner:
        kind = "method" if kind == "function" else "async method"
    doc = doc.strip()
    if len(doc) > 600:  # long docstrings: the first paragraphs that fit
        doc = doc[:600].rsplit("\n\n", 1)[0] if "\n\n" in doc[:600] else doc[:600].rsplit(" ", 1)[0] + " ..."
    return f"Write the Python {kind} `{name}({signature}){returns}`.\n\n{doc}", code


# ---------------------------------------------------------------------- encoding


@dataclass
class Example:
    """One conversation's token ids and, for each, whether the assistant wrote it (is learned)."""
    ids: list[int]
    assistant: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


def encode_conversation(tokenizer, messages: Sequence[dict]) -> Example:
    """`messages` rendered by the tokenizer's chat template and encoded, with the assistant's
    tokens marked (the module docstring says how). A tokenizer without a chat template, or a
    template that does not render the conversation as a growing prefix, is a ValueError."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template: set data.chat_template (a Jinja template, or "
                         "'chatml' when the tokenizer has <|im_start|> and <|im_end|>)")

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(list(messages[:upto]), add_generation_prompt=generation_prompt,
                                             tokenize=False)

    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(k, True), render(k + 1, False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(f"the chat template does not render this conversation turn by turn (it rewrites "
                             f"what comes before assistant message {k}), so the assistant's tokens cannot be "
                             "told apart; use another data.chat_template")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    if len(done) < len(rendered := render(len(messages), False)):
        if not rendered.startswith(done):
            raise ValueError("the chat template does not render this conversation turn by turn; use another "
                             "data.chat_template")
        pieces.append((rendered[len(done):], False))  # turns after the last answer: context only
    ids, assistant = [], []
    for text, learned in pieces:
        if text:
            piece = tokenizer.encode_chat(text)
            ids += piece
            assistant += [learned] * len(piece)
    return Example(ids, assistant)


def fit_length(example: Example, max_len: int, rule: str, where: str = "a conversation") -> Optional[Example]:
    """An example that fits `max_len` tokens: as it is; else by `rule`: "truncate" keeps its first
    max_len tokens (None when no assistant token is left), "drop" gives None, "refuse" is a DataError."""
    if len(example) <= max_len:
        return example
    if rule == "refuse":
        raise DataError(f"{where} has {len(example)} tokens, more than data.seq_len={max_len}; raise data.seq_len, "
                        "or set data.truncation to truncate or drop")
    if rule == "drop":
        return None
    cut = Example(example.ids[:max_len], example.assistant[:max_len])
    return cut if any(cut.assistant[1:]) else None  # the first token is never a target


# ---------------------------------------------------------------------- rows and batches


@dataclass
class Row:
    """A training row: token ids, targets (-100 where nothing is learned) and each token's
    document (0, 1, ...), for one conversation or several packed."""
    ids: np.ndarray
    targets: np.ndarray
    docs: np.ndarray


def targets_of(example: Example) -> np.ndarray:
    """Next-token targets: ids[t + 1] where the assistant wrote it, else -100; the last is -100."""
    ids = np.asarray(example.ids, dtype=np.int64)
    learned = np.asarray(example.assistant[1:] + [False])
    return np.where(learned, np.append(ids[1:], -100), -100)


def pack(examples: Sequence[Example], seq_len: int, *, packing: bool = True) -> list[Row]:
    """Rows of at most seq_len tokens. packing=True lays examples end to end in order, starting a
    new row when the next does not fit (each example must fit: see `fit_length`); False: one per row."""
    rows, cur = [], []

    def close():
        if cur:
            rows.append(Row(np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in cur]),
                            np.concatenate([targets_of(e) for e in cur]),
                            np.concatenate([np.full(len(e), d, dtype=np.int64) for d, e in enumerate(cur)])))
            cur.clear()

    for e in examples:
        if len(e) > seq_len:
            raise ValueError(f"an example of {len(e)} tokens is longer than seq_len={seq_len}; fit_length it first")
        if not packing or sum(map(len, cur)) + len(e) > seq_len:
            close()
        cur.append(e)
    close()
    return rows


def document_mask(docs: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool: True where query t may see key s, i.e. both belong to the same document
    (the model adds the causal mask)."""
    return docs[:, :, None] == docs[:, None, :]


def document_positions(docs: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that restart at 0 at each document of a packed row."""
    T = docs.shape[1]
    t = torch.arange(T, device=docs.device).expand_as(docs)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # where each token's document began
    return t - first


@lru_cache(maxsize=8)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded shuffle of range(n) for one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def sample_indices(n: int, seed: int, first: int, count: int) -> list[int]:
    """Positions first .. first + count - 1 of the stream of epochs of seeded shuffles of range(n): what
    a batch at a given step reads, a pure function of (seed, step) so that a resumed run reads the same."""
    return [int(epoch_order(n, seed, i // n)[i % n]) for i in range(first, first + count)]


class ChatBatches:
    """Batches of rows, a pure function of (seed, step, micro_step) as `TokenBatches` are, so a
    resumed run sees the same batches: epochs of a seeded shuffle, `batch_size` rows per micro-batch,
    `grad_accum` micro-batches per step. A batch is (x, y, model keyword arguments): a packed one
    passes each token's positions and the document mask; rows are padded at the end to the longest."""

    def __init__(self, rows: Sequence[Row], batch_size: int, *, pad_id: int = 0, seed: int = 0, grad_accum: int = 1,
                 device: Optional[torch.device | str] = None, name: str = "train"):
        if not rows:
            raise DataError(f"the {name} split has no conversation that fits data.seq_len")
        self.rows, self.batch_size, self.pad_id = list(rows), batch_size, pad_id
        self.seed, self.grad_accum, self.device = seed, grad_accum, torch.device(device or "cpu")
        self.packed = any(r.docs[-1] > 0 for r in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def get_batch(self, step: int, micro_step: int = 0):
        first = (step * self.grad_accum + micro_step) * self.batch_size
        return self.collate([self.rows[i] for i in sample_indices(len(self.rows), self.seed, first, self.batch_size)])

    def epoch(self, step: int) -> float:
        """Epochs completed after `step` optimizer steps."""
        return step * self.grad_accum * self.batch_size / len(self.rows)

    def eval_batches(self, n_batches: Optional[int] = None):
        """The rows in order, batch by batch: all of them, or `n_batches` batches spread evenly."""
        n = len(self.rows)
        total = -(-n // self.batch_size)
        if n_batches is None or n_batches >= total:
            picked = np.arange(n)
        else:
            picked = np.arange(n_batches * self.batch_size) * n // (n_batches * self.batch_size)
        for b in range(0, len(picked), self.batch_size):
            yield self.collate([self.rows[i] for i in picked[b:b + self.batch_size]])

    def collate(self, rows: Sequence[Row]):
        T = max(len(r.ids) for r in rows)
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), -100, dtype=torch.long)
        docs = torch.full((len(rows), T), -1, dtype=torch.long)  # padding: a document of its own, never learned
        for i, r in enumerate(rows):
            x[i, :len(r.ids)], y[i, :len(r.ids)], docs[i, :len(r.ids)] = (torch.from_numpy(r.ids),
                                                                          torch.from_numpy(r.targets),
                                                                          torch.from_numpy(r.docs))
        x, y, docs = x.to(self.device), y.to(self.device), docs.to(self.device)
        if not self.packed:  # one conversation per row, padded after it: the causal mask is all it needs
            return x, y, {}
        return x, y, {"positions": document_positions(docs), "attn_mask": document_mask(docs)}
