"""What instruction tuning changed, measured on held-out conversations.

    report = evaluate_instructions(model, tokenizer, chats, max_new_tokens=256)
    # {"answer_loss", "parse_rate", "exact_match", "rouge_l", "n", "samples"}

- **answer_loss**: mean cross-entropy (nats per token) of the reference answers' tokens, the
  conversation given: the loss fine-tuning lowers, read on the assistant's tokens only.
- **parse_rate**: the share of greedy answers that are valid Python (`ast.parse`, after taking
  the code out of a ```python fence when there is one), for code instructions.
- **exact_match**: answer == reference, whitespace at the ends ignored.
- **rouge_l**: ROUGE-L F1 between answer and reference, over word and punctuation tokens: the
  longest common subsequence, as precision and recall (Lin 2004, beta = 1).
"""
from __future__ import annotations

import ast
import re
from typing import Sequence

import torch

from llmstack.data.chat import ChatBatches, encode_conversation, pack
from llmstack.eval import evaluate
from llmstack.finetune.rewards import code_of
from llmstack.inference.generate import generate

_TOKEN = re.compile(r"\w+|[^\w\s]")


def parses(answer: str) -> bool:
    try:
        ast.parse(code_of(answer))
    except (SyntaxError, ValueError):  # ValueError: a NUL byte
        return False
    return True


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over word and punctuation tokens."""
    a, b = _TOKEN.findall(candidate), _TOKEN.findall(reference)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)  # the LCS by dynamic programming, one row at a time
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


@torch.no_grad()
def answer_loss(model: torch.nn.Module, tokenizer, chats: Sequence[Sequence[dict]], *, batch_size: int = 8,
                max_len: int | None = None) -> dict:
    """Mean loss (nats per token) on the assistant's tokens of `chats`, each run alone (no packing);
    conversations longer than `max_len` (default: the model's context) keep their first max_len tokens."""
    max_len = max_len or model.config.max_seq_len
    examples = []
    for chat in chats:
        e = encode_conversation(tokenizer, chat)
        e.ids, e.assistant = e.ids[:max_len], e.assistant[:max_len]
        examples.append(e)
    device = next(model.parameters()).device
    rows = pack(examples, max_len, packing=False)
    out = evaluate(model, ChatBatches(rows, batch_size, pad_id=0, device=device).eval_batches())
    return {"loss": out["loss"], "tokens": out["tokens"]}


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer, chats: Sequence[Sequence[dict]], *,
                     max_new_tokens: int = 256, batch_size: int = 8) -> list[str]:
    """The model's greedy answer to each conversation's last assistant turn (the turns before it as
    the prompt), stopping at its end-of-turn tokens."""
    prompts = [tokenizer.apply_chat_template(list(chat[:-1]), add_generation_prompt=True) for chat in chats]
    device = next(model.parameters()).device
    stops = [i for i in (getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id]) if i is not None]
    answers = []
    for b in range(0, len(prompts), batch_size):
        batch = [torch.tensor(p, device=device) for p in prompts[b:b + batch_size]]
        for prompt, out in zip(batch, generate(model, batch, max_new_tokens, temperature=0.0, stop_tokens=stops)):
            new = [int(t) for t in out[len(prompt):] if int(t) not in stops]
            answers.append(tokenizer.decode(new))
    return answers


def evaluate_instructions(model: torch.nn.Module, tokenizer, chats: Sequence[Sequence[dict]], *,
                          max_new_tokens: int = 256, batch_size: int = 8, samples: int = 3) -> dict:
    """answer_loss, parse_rate, exact_match and rouge_l over `chats` (each ending with the reference
    answer), and the first `samples` (instruction, reference, answer) triples."""
    model.eval()
    loss = answer_loss(model, tokenizer, chats, batch_size=batch_size)
    answers = generate_answers(model, tokenizer, chats, max_new_tokens=max_new_tokens, batch_size=batch_size)
    refs = [chat[-1]["content"] for chat in chats]
    n = len(chats)
    return {
        "n": n,
        "answer_loss": loss["loss"],
        "parse_rate": sum(parses(a) for a in answers) / n,
        "exact_match": sum(a.strip() == r.strip() for a, r in zip(answers, refs)) / n,
        "rouge_l": sum(rouge_l(a, r) for a, r in zip(answers, refs)) / n,
        "samples": [{"instruction": chat[-2]["content"], "reference": r, "answer": a}
                    for chat, r, a in list(zip(chats, refs, answers))[:samples]],
    }
