"""Tokenizer: the BPE trainer's definition, tiktoken == our reference encoder, round trips."""
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmstack.data.corpus import stdlib_files
from llmstack.tokenizer import SPECIAL_TOKENS, StreamDecoder, Tokenizer, count_chunks, train_bpe


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
