"""Tokenizers: the BPE trainer's definition, tiktoken == our reference encoder, round trips; downloaded
models' tokenizers (Hugging Face folders, GGUF files) == transformers' AutoTokenizer."""
import hashlib
import json
import re
import struct
from pathlib import Path
from unittest import mock

import gguf
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders as tk_decoders
from tokenizers import models as tk_models
from tokenizers import normalizers as tk_normalizers
from tokenizers import pre_tokenizers as tk_pre
from tokenizers import processors as tk_processors
from tokenizers import trainers as tk_trainers

import llmstack
import llmstack.tokenizer
from llmstack.data.corpus import stdlib_files
from llmstack.io import atomic_directory
from llmstack.tokenizer.gguf import merges_from_scores, read_metadata
from llmstack.tokenizer import SPECIAL_TOKENS, HFTokenizer, StreamDecoder, Tokenizer, count_chunks, train_bpe


@pytest.fixture(scope="module")
def corpus():
    texts = []
    for path in stdlib_files()[:60]:
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return texts


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.train(corpus, 1024)


def test_first_merges_follow_the_counts():
    # "aaabdaaabac": (a, a) is the most frequent pair, as in the classic example.
    merges = train_bpe(count_chunks(["aaabdaaabac"], pattern=r".+"), 3)
    assert merges[0] == b"aa"  # 4 occurrences
    # Now "ZabdZabac": (Z, a) and (a, b) both occur twice; the smaller ids (a=97, b=98) win.
    assert merges[1:] == [b"ab", b"aaab"]


def test_tie_break_is_deterministic_and_by_smallest_pair():
    # Every pair occurs once: the smallest (left, right) ids win, so (a, b) before (c, d).
    merges = train_bpe(count_chunks(["cd ab"], pattern=r"\S+"), 2)
    assert merges == [b"ab", b"cd"]


def test_training_is_deterministic(corpus):
    a = Tokenizer.train(corpus[:20], 600)
    b = Tokenizer.train(corpus[:20], 600)
    assert a.fingerprint() == b.fingerprint()


def test_vocab_size_counts_everything(tok):
    assert tok.vocab_size == 1024
    assert sorted(tok.special_tokens.values()) == list(range(1024 - len(SPECIAL_TOKENS), 1024))


def test_tiktoken_equals_reference_encoder(tok, corpus):
    for text in corpus[:10]:
        sample = text[:4000]
        assert tok.encode(sample) == tok.encode_reference(sample)


def test_merges_compress(tok, corpus):
    text = corpus[-1]
    assert len(tok.encode(text)) < 0.5 * len(text.encode("utf-8"))


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_arbitrary_unicode(text):
    tok = _small_tokenizer()
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text) == tok.encode_reference(text)


_SMALL = []


def _small_tokenizer():
    if not _SMALL:
        _SMALL.append(Tokenizer.train(["héllo wörld 你好 🙂 def f(x): return x\n\t  " * 20], 300))
    return _SMALL[0]


def test_special_token_text_is_not_special(tok):
    ids = tok.encode("<|end_of_text|>")
    assert tok.eos_id not in ids
    assert tok.decode(ids) == "<|end_of_text|>"
    assert tok.encode("x", bos=True, eos=True)[0] == tok.bos_id
    assert tok.encode("x", bos=True, eos=True)[-1] == tok.eos_id


def test_save_load_round_trip_and_corruption(tok, corpus, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    back = Tokenizer.load(path)
    assert back.encode(corpus[3]) == tok.encode(corpus[3])
    assert back.fingerprint() == tok.fingerprint()
    path.write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        Tokenizer.load(path)
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing.json")


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match=r"need at least 2\d\d"):
        Tokenizer.train(["abc"], 260)


def test_stream_decoder_reproduces_decode(tok):
    text = "naïve café — 東京 🙂 ok"
    ids = tok.encode(text)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_named_tiktoken_error_is_clear_offline():
    with mock.patch("tiktoken.get_encoding", side_effect=ConnectionError("no network")):
        with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR"):
            Tokenizer.from_tiktoken("cl100k_base")


def test_named_tiktoken_when_cached():
    try:
        tok = Tokenizer.from_tiktoken("gpt2")
    except RuntimeError:
        pytest.skip("gpt2 encoding not cached on this machine")
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.eos_id == 50256


# ---------------------------------------------------------------------- ChatML, old files, load()

OLD_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>",
                      "<|end_of_turn|>", *(f"<|reserved_{i}|>" for i in range(4))]


def test_our_tokenizer_speaks_chatml(tok):
    im_start, im_end = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    assert tok.stop_ids == [tok.eos_id, im_end]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(): <|im_end|>"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\ndef f(): <|im_end|><|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages)
    # the chat tokens as their ids (the template's, and one a message spells, as transformers does), the rest as text
    assert ids == ([im_start, *tok.encode("system\nBe brief."), im_end, *tok.encode("\n"),
                    im_start, *tok.encode("user\ndef f(): "), im_end, im_end, *tok.encode("\n"),
                    im_start, *tok.encode("assistant\n")])
    assert tok.decode(ids) == text
    assert tok.encode("<|im_end|>").count(im_end) == 0  # plain text never turns into a special token
    assert tok.apply_chat_template(messages[1:], add_generation_prompt=False, tokenize=False).endswith("<|im_end|>\n")


def test_a_tokenizer_saved_with_other_special_tokens_still_loads(tmp_path):
    new = _small_tokenizer()
    spec = {"type": "bpe", "pattern": new._spec["pattern"], "merges": new._spec["merges"],
            "special_tokens": OLD_SPECIAL_TOKENS}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    old = llmstack.tokenizer.load(tmp_path)
    n = 256 + len(spec["merges"])
    assert old.special_tokens == {t: n + i for i, t in enumerate(OLD_SPECIAL_TOKENS)}
    assert (old.bos_id, old.eos_id, old.pad_id) == (n, n + 1, n + 2)
    text = "héllo <|user|> wörld\n"
    assert old.encode(text) == new.encode(text) and old.decode(old.encode(text)) == text
    # its own tokens, no chat template, and the fingerprint the previous version computed (cache keys survive)
    assert old.chat_template is None and old.stop_ids == [n + 1]
    with pytest.raises(ValueError, match="no chat template"):
        old.apply_chat_template([{"role": "user", "content": "hi"}])
    assert old.fingerprint() == hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    old.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["special_tokens"] == OLD_SPECIAL_TOKENS


def test_save_load_keeps_chat_template_and_stop_ids(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    back = llmstack.tokenizer.load(tmp_path)
    assert isinstance(back, Tokenizer)
    assert (back.stop_ids, back.chat_template) == (tok.stop_ids, tok.chat_template)
    assert back.fingerprint() == tok.fingerprint()
    chat = [{"role": "user", "content": "hi"}]
    assert back.apply_chat_template(chat) == tok.apply_chat_template(chat)


def test_load_says_what_a_file_is_not(tok, tmp_path):
    not_ours = "is not a tokenizer llmstack can read: neither llmstack's tokenizer.json, a Hugging Face"
    for name, content in [("notes.txt", b"hello"), ("blob.bin", bytes(range(256))), ("tokenizer.json", b"{\"a\": 1}"),
                          ("list.json", b"[1, 2]"), ("model.gguf", b"GGML....")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=not_ours):
            llmstack.tokenizer.load(tmp_path / name)
    tok.save(tmp_path / "ours.json")
    (tmp_path / "ours.json").write_text((tmp_path / "ours.json").read_text()[:200])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        llmstack.tokenizer.load(tmp_path / "ours.json")
    (tmp_path / "hf.json").write_text('{"version": "1.0", "truncation": null, "added_tokens": [{"id"')
    with pytest.raises(ValueError, match="corrupt or truncated"):
        llmstack.tokenizer.load(tmp_path / "hf.json")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 5) + b"\x01")
    with pytest.raises(ValueError, match="truncated or corrupt GGUF"):
        llmstack.tokenizer.load(tmp_path / "cut.gguf")
    with pytest.raises(FileNotFoundError):
        llmstack.tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        llmstack.tokenizer.load(tmp_path / "empty")


# ---------------------------------------------------------------------- downloaded models' tokenizers
#
# Tiny tokenizers trained here with the `tokenizers` package, each configured as its family's
# tokenizer.json is (pre-tokenizer, normalizer, model options, added tokens), saved as a Hugging
# Face folder and as a GGUF file; transformers' AutoTokenizer is the reference for both.

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

TEXTS = [
    "", " ", "hello world", "Hello, World! It's a test; we'll see.", "  leading and trailing  ",
    "\t\ttabs\tand\n\nnewlines\r\n", "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "naïve café résumé Ünïcödé", "東京 你好世界 こんにちは 한국어", "emoji 🙂🚀👩‍💻 and 🇫🇷", "numbers 123 4567 3.14159 1e-9",
    "    four spaces", "a" * 40, "e\u0301 decomposed", "x\u00a0y\u3000z", "trailing newline\n", "   ",
    "<|endoftext|> <|im_start|>user\nhi<|im_end|>", "<s> </s> <unk> text", "<|begin_of_text|><|eot_id|>x",
    "x<|im_end|>y", "<0x0A> literal", "if(a<b){return\"ok\";}//done", "<s>word</s>after", "</s>x <s> y",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 12:45 and we'll be late; they're here.\n" * 3,
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\nclass Stack:\n\tpass\n" * 3,
    "naïve café résumé Ünïcödé données 東京 你好世界 こんにちは 한국어 🙂🚀 3.14159 1234567890\r\n" * 3,
    "for (int i = 0; i < 10; i++) { sum += a[i]; }  // C\n    indented    text\twith\ttabs\n" * 3,
]


def _byte_level(pre_tokenizer, specials, *, normalizer=None, ignore_merges=False):
    backend = tokenizers.Tokenizer(tk_models.BPE(ignore_merges=ignore_merges))
    backend.normalizer, backend.pre_tokenizer, backend.decoder = normalizer, pre_tokenizer, tk_decoders.ByteLevel()
    trainer = tk_trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                     initial_alphabet=tk_pre.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    return backend


def _sentencepiece():
    """Llama 2's layout: <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF> (in the vocabulary, not added
    tokens), then ▁-words; byte fallback for the characters left out of the small alphabet."""
    specials = ["<unk>", "<s>", "</s>"]
    backend = tokenizers.Tokenizer(tk_models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = tk_pre.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = tk_decoders.Sequence([tk_decoders.Replace("▁", " "), tk_decoders.ByteFallback(),
                                            tk_decoders.Fuse(), tk_decoders.Strip(" ", 1, 0)])
    trainer = tk_trainers.BpeTrainer(vocab_size=700, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)],
                                     limit_alphabet=50, show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    spec = json.loads(backend.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials]
    return _with_bos(tokenizers.Tokenizer.from_str(json.dumps(spec)), "<s>")


def _split_then_bytes(regex):
    return tk_pre.Sequence([tk_pre.Split(tokenizers.Regex(regex), "isolated"),
                            tk_pre.ByteLevel(add_prefix_space=False, use_regex=False)])


def _with_bos(backend, bos):
    """The post-processor that puts BOS in front (Llama 2's and 3's tokenizer.json have one, and no
    add_bos_token in their tokenizer_config.json: what the post-processor does is the convention)."""
    backend.post_processor = tk_processors.TemplateProcessing(single=f"{bos} $A",
                                                              special_tokens=[(bos, backend.token_to_id(bos))])
    return backend


SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|eom_id|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# name: (backend builder, tokenizer_config.json, generation_config.json, GGUF: (model, pre, ids), stop tokens)
FAMILIES = {
    "llama3": (lambda: _with_bos(_byte_level(_split_then_bytes(LLAMA3_SPLIT), LLAMA3_SPECIALS, ignore_merges=True),
                                 "<|begin_of_text|>"),
               {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>"},
               {"eos_token_id": [1, 5, 4]},
               ("gpt2", "llama-bpe", {"bos": 0, "eos": 4}),
               ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]),
    "qwen2": (lambda: _byte_level(_split_then_bytes(QWEN2_SPLIT), CHATML_SPECIALS, normalizer=tk_normalizers.NFC()),
              {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "add_prefix_space": False},
              {"eos_token_id": [2, 0]},
              ("gpt2", "qwen2", {"eos": 2, "padding": 0}),
              ["<|im_end|>", "<|endoftext|>"]),
    "gpt2": (lambda: _byte_level(tk_pre.ByteLevel(add_prefix_space=False), ["<|endoftext|>"]),
             {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>"},
             None,
             ("gpt2", "gpt-2", {"bos": 0, "eos": 0, "unknown": 0}),
             ["<|endoftext|>"]),
    "smollm2": (lambda: _byte_level(tk_pre.Sequence([tk_pre.Digits(individual_digits=True),
                                                     tk_pre.ByteLevel(add_prefix_space=False)]),
                                    CHATML_SPECIALS + ["<repo_name>", "<file_sep>"]),
                {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                 "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "chat_template": SMOLLM2_TEMPLATE},
                None,
                ("gpt2", "smollm", {"bos": 1, "eos": 2, "padding": 2, "unknown": 0}),
                ["<|im_end|>", "<|endoftext|>"]),
    "llama2": (_sentencepiece,
               {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "legacy": False},
               None,
               ("llama", None, {"bos": 1, "eos": 2, "unknown": 0}),
               ["</s>"]),
}


def _write_gguf(backend, path, *, model, pre, ids, merges=True, scores=None, add_bos=None, template=None):
    """A GGUF file holding only the tokenizer metadata llama.cpp's converter writes (and what transformers
    needs to read a model config from it)."""
    spec = json.loads(backend.to_str())
    tokens = [None] * backend.get_vocab_size()
    types = [1] * len(tokens)  # normal
    for token, i in spec["model"]["vocab"].items():
        tokens[i] = token
        if model == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types[i] = 6  # byte
    for added in spec["added_tokens"]:
        tokens[added["id"]], types[added["id"]] = added["content"], 3 if added["special"] else 4
    if model == "llama" and "unknown" in ids:
        types[ids["unknown"]] = 2
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in [("context_length", 64), ("embedding_length", 8), ("block_count", 1),
                       ("feed_forward_length", 16), ("attention.head_count", 2), ("attention.head_count_kv", 2),
                       ("rope.dimension_count", 4)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges:
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for key, value in ids.items():
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if template is not None:
        writer.add_chat_template(template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _scores_from_merges(backend) -> list[float]:
    """SentencePiece-like scores: a token made by an earlier merge scores higher (what llama.cpp reads)."""
    spec = json.loads(backend.to_str())
    made_by = {}
    for rank, merge in enumerate(spec["model"]["merges"]):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        made_by.setdefault(left + right, rank)
    vocab = spec["model"]["vocab"]
    return [-float(made_by.get(token, 0)) for token in sorted(vocab, key=vocab.get)]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (Hugging Face folder, GGUF file); "llama2-scores": the GGUF without merges (scores only)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, (build, config, generation, (model, pre, ids), _) in FAMILIES.items():
        backend = build()
        folder = root / name
        folder.mkdir()
        backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        if generation is not None:
            (folder / "generation_config.json").write_text(json.dumps(generation))
        _write_gguf(backend, root / f"{name}.gguf", model=model, pre=pre, ids=ids,
                    add_bos=True if name == "llama3" else None, template=config.get("chat_template"))
        out[name] = (folder, root / f"{name}.gguf")
        if name == "llama2":
            _write_gguf(backend, root / "llama2-scores.gguf", model=model, pre=pre, ids=ids, merges=False,
                        scores=_scores_from_merges(backend))
            out["llama2-scores"] = (folder, root / "llama2-scores.gguf")
    return out


def _auto(path):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = Path(path)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def _assert_same_as_transformers(ours, ref, texts):
    for text in texts:
        ids = ref.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, bos=ours.add_bos_token) == ref.encode(text), text  # the BOS convention
        assert ours.decode(ids) == ref.decode(ids), text
    assert ours.encode_batch(texts, eos=True) == [ref.encode(t, add_special_tokens=False) + [ref.eos_token_id]
                                                  for t in texts]
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert all(ours.special_tokens[t] == ref.convert_tokens_to_ids(t) for t in ref.all_special_tokens)


def _round_trips(name, text):
    if name == "qwen2" and "\u0301" in text:
        return False  # NFC joins e + U+0301 into é
    if name == "llama2" and (text[:1].isspace() or not text):
        return False  # the prefix space SentencePiece adds is dropped again, and with it a space of the text's
    return True


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hugging_face_tokenizer_matches_transformers(families, name):
    folder, _ = families[name]
    ours, ref = llmstack.tokenizer.load(folder), _auto(folder)
    assert isinstance(ours, HFTokenizer)
    _assert_same_as_transformers(ours, ref, TEXTS)
    assert ours.vocab_size == len(ref)
    assert ours.stop_ids == [ours.special_tokens[t] for t in FAMILIES[name][4]]
    for text in TEXTS:
        if _round_trips(name, text):
            assert ours.decode(ours.encode(text)) == text


@pytest.mark.parametrize("order", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_gguf_metadata_reads_as_the_gguf_package_reads_it(tmp_path, order):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama", endianess=order)
    writer.add_token_list(["a", "b", "ab", "é🙂"])
    writer.add_token_types([1, 1, 3, 4])
    writer.add_token_scores([0.5, -1.0, 2.0, 0.25])
    for add, key, value in [(writer.add_bool, "flag", True), (writer.add_uint64, "u64", 2**40),
                            (writer.add_int8, "i8", -3), (writer.add_float64, "f64", 1.5),
                            (writer.add_uint16, "u16", 7), (writer.add_int64, "i64", -2**40),
                            (writer.add_string, "text", "東京"), (writer.add_array, "strings", ["p", "qq"]),
                            (writer.add_array, "nested", [[1, 2], [3]])]:
        add(f"x.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = read_metadata(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    ref = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert ours.pop("x.nested") == [[1, 2], [3]]  # the gguf package flattens arrays of arrays
    ref.pop("x.nested")
    assert ours == ref
    assert read_metadata(tmp_path / "m.gguf", wanted=lambda key: key.startswith("x.t")) == {"x.text": "東京"}


def test_merges_recovered_from_scores_are_transformers(families):
    from transformers.tokenization_utils_base import generate_merges

    meta = read_metadata(families["llama2-scores"][1])
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    # many ties: tokens of equal score, tokens that split into two tokens in several ways
    assert merges_from_scores(tokens, scores) == generate_merges({t: i for i, t in enumerate(tokens)},
                                                                 dict(zip(tokens, scores)))


@pytest.mark.parametrize("name", [*FAMILIES, "llama2-scores"])
def test_gguf_tokenizer_matches_transformers(families, name):
    _, path = families[name]
    ours, ref = llmstack.tokenizer.load(path), _auto(path)
    texts = TEXTS
    if name == "llama3":  # transformers' loader adds a <|endoftext|> token that the file does not have
        texts = [t for t in TEXTS if "<|endoftext|>" not in t]
        assert len(ref) == ours.vocab_size + 1 and "<|endoftext|>" not in ours.special_tokens
    else:
        assert ours.vocab_size == len(ref)
    _assert_same_as_transformers(ours, ref, texts)
    family = name.removesuffix("-scores")
    assert ours.stop_ids[0] == ours.eos_id
    assert set(ours.stop_ids) == {ours.special_tokens[t] for t in FAMILIES[family][4]}  # by their names
    # the same ids as the tokenizer.json the file was made from (Qwen2's has an NFC normalizer, which
    # neither a GGUF nor llama.cpp has)
    hf = llmstack.tokenizer.load(families[family][0])
    assert [ours.encode(t) for t in TEXTS if name != "qwen2" or "\u0301" not in t] == \
        [hf.encode(t) for t in TEXTS if name != "qwen2" or "\u0301" not in t]


@pytest.mark.parametrize("name,kind", [("llama3", "hf"), ("qwen2", "hf"), ("llama2", "hf"), ("smollm2", "gguf"),
                                       ("llama3", "gguf"), ("llama2-scores", "gguf")])
def test_hugging_face_tokenizer_save_load_round_trip(families, name, kind, tmp_path):
    tok = llmstack.tokenizer.load(families[name][0 if kind == "hf" else 1])
    # into a checkpoint folder, twice: the second save replaces a folder holding tokenizer_config.json
    for _ in range(2):
        atomic_directory(tmp_path / "ckpt", lambda tmp: tok.save(tmp / "tokenizer.json"))
    back = llmstack.tokenizer.load(tmp_path / "ckpt" / "tokenizer.json")
    assert [back.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    for attr in ("stop_ids", "chat_template", "bos_id", "eos_id", "pad_id", "add_bos_token", "special_tokens",
                 "vocab_size"):
        assert getattr(back, attr) == getattr(tok, attr), attr
    assert back.fingerprint() == tok.fingerprint()
    ref = _auto(tmp_path / "ckpt")  # transformers reads the folder
    for text in TEXTS:
        assert ref.encode(text, add_special_tokens=False) == tok.encode(text)
        assert ref.encode(text) == tok.encode(text, bos=tok.add_bos_token)
    if tok.chat_template is not None:
        chat = [{"role": "user", "content": "Hi!"}]
        assert ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
            tok.apply_chat_template(chat, tokenize=False)


def test_fingerprint_tells_tokenizers_apart(families):
    prints = {name: llmstack.tokenizer.load(families[name][0]).fingerprint() for name in FAMILIES}
    assert len(set(prints.values())) == len(prints)
    assert llmstack.tokenizer.load(families["gpt2"][0]).fingerprint() == prints["gpt2"]  # stable


@pytest.mark.parametrize("name", ["llama2", "smollm2"])
def test_stream_decoder_streams_a_hugging_face_tokenizer_cheaply(families, name):
    tok = llmstack.tokenizer.load(families[name][0])
    text = "naïve café — 東京 🙂 ok\n" * 20 + "  def f(x):\n\treturn 🇫🇷"
    ids = tok.encode(text)
    windows = []

    def decode(ids):
        windows.append(len(ids))
        return tok.decode(ids)

    stream = StreamDecoder(tok)
    stream.decode = decode
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert max(windows) <= 16 < len(ids)  # each push decodes a few tokens, not the whole continuation


def test_hugging_face_decode_names_an_unknown_id(families):
    tok = llmstack.tokenizer.load(families["gpt2"][0])
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size} is not in the tokenizer's vocabulary"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])


def test_llama3_gguf_takes_a_word_of_the_vocabulary_whole(tmp_path):
    """Llama 3's tokenizer.json sets ignore_merges (so does llama.cpp for its GGUF files): a piece that is in
    the vocabulary is one token even when the merges would not build it. transformers' GGUF loader
    misses this; Qwen2's tokenizer merges as usual."""
    vocab = {c: i for i, c in enumerate(tk_pre.ByteLevel.alphabet())}
    for token in ("bc", "ab", "abc"):
        vocab[token] = len(vocab)
    merges = [("b", "c"), ("a", "b"), ("ab", "c")]  # "abc" merges to a + bc, and no merge joins those

    def backend(ignore_merges):
        b = tokenizers.Tokenizer(tk_models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
        b.pre_tokenizer = _split_then_bytes(LLAMA3_SPLIT)
        b.decoder = tk_decoders.ByteLevel()
        return b

    assert backend(True).encode("abc").ids == [vocab["abc"]]
    assert backend(False).encode("abc").ids == [vocab["a"], vocab["bc"]]
    for pre, ignore in [("llama-bpe", True), ("qwen2", False)]:
        _write_gguf(backend(ignore), tmp_path / f"{pre}.gguf", model="gpt2", pre=pre, ids={})
        tok = llmstack.tokenizer.load(tmp_path / f"{pre}.gguf")
        assert tok.encode("abc ab,abc") == backend(ignore).encode("abc ab,abc").ids


def test_gguf_of_another_kind_is_a_clear_error(tmp_path):
    backend = _byte_level(tk_pre.ByteLevel(add_prefix_space=False), ["<|endoftext|>"])
    _write_gguf(backend, tmp_path / "t5.gguf", model="t5", pre=None, ids={})
    with pytest.raises(ValueError, match="tokenizer.ggml.model = 't5'"):
        llmstack.tokenizer.load(tmp_path / "t5.gguf")
    _write_gguf(backend, tmp_path / "odd.gguf", model="gpt2", pre="no-such-pre", ids={})
    with pytest.raises(ValueError, match="tokenizer.ggml.pre = 'no-such-pre'"):
        llmstack.tokenizer.load(tmp_path / "odd.gguf")


def test_load_tokenizer_reads_model_folders_and_gguf_files(families, tmp_path):
    folder, gguf_file = families["smollm2"]
    assert isinstance(llmstack.load_tokenizer(folder), HFTokenizer)
    assert llmstack.load_tokenizer(gguf_file).encode("hi 12") == llmstack.load_tokenizer(folder).encode("hi 12")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "model.gguf").write_bytes(gguf_file.read_bytes())
    assert llmstack.load_tokenizer(tmp_path / "only").chat_template == SMOLLM2_TEMPLATE


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2):
    path = smollm2
    ours, ref = llmstack.tokenizer.load(path), _auto(path)
    code = Path(llmstack.tokenizer.__file__).with_name("gguf.py").read_text()[:6000]
    texts = [*TEXTS, code, "<repo_name>llmstack<file_sep>README.md\n# llmstack", "x = [1, 22, 333]\n"]
    _assert_same_as_transformers(ours, ref, texts)
    for text in texts:
        assert ours.decode(ours.encode(text)) == text
    assert ours.vocab_size == len(ref) == 49152 and not ours.add_bos_token
    assert ours.stop_ids == [ref.eos_token_id, ref.convert_tokens_to_ids("<|endoftext|>")]  # <|im_end|>, <|endoftext|>
    for chat in ([{"role": "user", "content": "What is 2+2?"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]):
        for prompt in (True, False):
            assert ours.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False) == \
                ref.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)
            assert ours.apply_chat_template(chat, add_generation_prompt=prompt) == \
                ref.apply_chat_template(chat, add_generation_prompt=prompt, return_dict=False)
    # Digits other than 0-9: SmolLM2's own tokenizer.json (and llama.cpp) split each digit off before the
    # byte-level regex, which transformers' GGUF loader does not do.
    own = tokenizers.Tokenizer.from_str(ref.backend_tokenizer.to_str())
    own.pre_tokenizer = tk_pre.Sequence([tk_pre.Digits(individual_digits=True),
                                         tk_pre.ByteLevel(add_prefix_space=False)])
    for text in [*texts, "Arabic ١٢٣, superscript x³, ½ and Ⅻ"]:
        assert ours.encode(text) == own.encode(text, add_special_tokens=False).ids
