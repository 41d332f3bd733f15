"""Conversations for fine-tuning (llmstack.data.chat): reading, assistant-only labels, packing with
per-document attention, deterministic batches, the standard-library instruction set."""
import ast
import json

import numpy as np
import pytest
import torch

from llmstack.data import DataError
from llmstack.data.chat import (ChatBatches, epoch_order, Example, conversation_of, document_positions, encode_conversation,
                                fit_length, load_conversations, pack, read_conversations, stdlib_instructions,
                                targets_of)
from llmstack.data.chat import _stdlib_instructions
from llmstack.data.corpus import _is_val, load_corpus
from llmstack.model import ModelConfig, Transformer
from llmstack.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    text = "def f(x):\n    return x + 1\nWrite the Python function. Hello there, how are you?\n" * 30
    return Tokenizer.train([text], 400)


CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add one."},
        {"role": "assistant", "content": "def f(x):\n    return x + 1"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Hello"}]


def learned_text(tok, example: Example) -> list[str]:
    """The decoded runs of assistant tokens."""
    runs, cur = [], []
    for i, a in zip(example.ids, example.assistant):
        if a:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_only_the_assistant_turns_are_learned(tok):
    ex = encode_conversation(tok, CHAT)
    # Each assistant message with its end-of-turn token (so the model learns to stop), nothing else.
    assert learned_text(tok, ex) == ["def f(x):\n    return x + 1<|im_end|>\n", "Hello<|im_end|>\n"]
    # The whole is the template's rendering, encoded: the pieces add up to the full conversation.
    assert tok.decode(ex.ids) == tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=False)
    assert tok.token_id("<|im_end|>") in ex.ids and tok.token_id("<|im_start|>") in ex.ids
    # Targets: position t predicts token t + 1 where the assistant wrote it, -100 elsewhere.
    y = targets_of(ex)
    for t in range(len(ex.ids)):
        expected = ex.ids[t + 1] if t + 1 < len(ex.ids) and ex.assistant[t + 1] else -100
        assert y[t] == expected


def test_prompt_completion_form_and_bad_rows(tmp_path):
    assert conversation_of({"prompt": "p", "completion": "c"}, "x") == [
        {"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    conv = [{"role": "user", "content": "p"}]
    assert conversation_of({"prompt": conv, "completion": [{"role": "assistant", "content": "c"}]}, "x")[1][
        "content"] == "c"
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n\n" + json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"chats.jsonl:3: no 'messages' \(nor 'prompt' and 'completion'\); its keys "
                                        r"are 'text'"):
        read_conversations(path)
    path.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"chats.jsonl:1: message 0 has unknown role 'robot'"):
        read_conversations(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match="no assistant message"):
        read_conversations(path)
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r"chats.jsonl:1: not JSON"):
        read_conversations(path)
    with pytest.raises(DataError, match="does not exist"):
        load_conversations(str(tmp_path / "missing.jsonl"))


def test_jsonl_split_is_disjoint_and_complete(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = load_conversations(str(path), "train", val_fraction=0.1)
    val = load_conversations(str(path), "val", val_fraction=0.1)
    assert len(train) + len(val) == 200 and 5 <= len(val) <= 40
    assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in val}


def test_template_problems_are_clear(tok):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template: set data.chat_template"):
        encode_conversation(NoTemplate(), CHAT)
    other = Tokenizer.train(["abc def " * 20], 300)
    # A template that writes the number of messages up front rewrites the start at every turn.
    other.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="does not render this conversation turn by turn"):
        encode_conversation(other, CHAT)


def test_fit_length_rules():
    ex = Example(list(range(10)), [False] * 5 + [True] * 5)
    assert fit_length(ex, 10, "refuse") is ex
    assert fit_length(ex, 7, "truncate").ids == list(range(7))
    assert fit_length(ex, 5, "truncate") is None  # no assistant token left to learn
    assert fit_length(ex, 7, "drop") is None
    with pytest.raises(DataError, match="has 10 tokens, more than data.seq_len=7"):
        fit_length(ex, 7, "refuse")


def test_packed_rows_equal_the_conversations_alone():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    model.init_weights()
    model.eval()
    rng = np.random.default_rng(0)
    examples = [Example(rng.integers(0, 64, n).tolist(), rng.random(n).__lt__(0.6).tolist()) for n in (9, 14, 5, 20)]
    rows = pack(examples, 32)
    assert [len(r.ids) for r in rows] == [28, 20]  # 9 + 14 + 5, then 20 (it would not fit in the first)
    batches = ChatBatches(rows, 2, pad_id=0)
    x, y, kwargs = batches.collate(rows)
    assert kwargs["positions"][0].tolist() == list(range(9)) + list(range(14)) + list(range(5))
    with torch.no_grad():
        packed = model(x, **kwargs)
        packed_loss = model(x, targets=y, **kwargs)
        alone_loss = 0.0
        starts = {0: [0, 9, 23], 1: [0]}
        for r, row_starts in starts.items():
            for s, e in zip(row_starts, examples[:3] if r == 0 else examples[3:]):
                ids = torch.tensor([e.ids])
                alone = model(ids)
                torch.testing.assert_close(packed[r, s:s + len(e)], alone[0], rtol=1e-5, atol=1e-5)
                alone_loss += model(ids, targets=torch.from_numpy(targets_of(e))[None]).item()
    assert packed_loss.item() == pytest.approx(alone_loss, rel=1e-5)
    # Without the document mask the rows would differ: the mask is what makes them equal.
    leaky = model(x, positions=kwargs["positions"])
    assert not torch.allclose(leaky[0, 9:23], packed[0, 9:23], atol=1e-3)


def test_document_positions():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_batches_are_deterministic_epochs():
    rows = pack([Example([1, 2, 3], [False, True, True]) for _ in range(10)], 3)
    a = ChatBatches(rows, 3, seed=5, grad_accum=2)
    b = ChatBatches(rows, 3, seed=5, grad_accum=2)
    for step in range(4):
        for m in range(2):
            assert all(torch.equal(u, v) for u, v in zip(a.get_batch(step, m)[:2], b.get_batch(step, m)[:2]))
    # Positions 0..9 of the sample stream are one shuffled epoch: every row exactly once.
    seen = [int(epoch_order(10, 5, 0)[i]) for i in range(10)]
    assert sorted(seen) == list(range(10))
    assert a.epoch(5) == pytest.approx(5 * 2 * 3 / 10)
    assert not a.packed and a.get_batch(0)[2] == {}


def test_stdlib_instructions_split_by_file_and_parse():
    train = stdlib_instructions("train")
    val = stdlib_instructions("val")
    assert len(train) > 3000 and len(val) > 50
    assert not {c[0]["content"] for c in val} & {c[0]["content"] for c in train}
    for chat in val:
        user, answer = chat
        assert user["role"] == "user" and answer["role"] == "assistant"
        assert user["content"].startswith("Write the Python ")
        ast.parse(answer["content"])  # every answer is valid Python on its own
        assert '"""' not in answer["content"].split("\n")[1]  # the docstring is in the question, not the answer
    # The split is the pretraining corpus's: held-out instructions come from its validation files.
    val_files = {rel for rel, pairs in _stdlib_instructions(1200) if pairs and _is_val(rel, 0.02)}
    assert val_files <= set(load_corpus("stdlib", "val")["path"])
    from_val_files = {q for rel, pairs in _stdlib_instructions(1200) if rel in val_files for q, _ in pairs}
    assert {c[0]["content"] for c in val} <= from_val_files
    assert len(val) >= 0.9 * len(from_val_files)  # only the few copied into train files are left out
