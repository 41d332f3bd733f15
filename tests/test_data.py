"""Corpora, the token cache and deterministic batches."""
import json
import sysconfig

import numpy as np
import pytest
import torch

from llmstack.data import DataError, TokenBatches, load_corpus, prepare_tokens, stdlib_files


class ByteTokenizer:
    """Bytes as ids, 256 as end of text; counts its calls to show the cache is used."""

    vocab_size, eos_id = 257, 256

    def __init__(self):
        self.calls = 0

    def encode_batch(self, texts, *, eos=False):
        self.calls += 1
        return [list(t.encode("utf-8")) + ([256] if eos else []) for t in texts]

    def fingerprint(self):
        return "bytes-v1"


def test_stdlib_corpus_split_is_disjoint_stable_and_complete():
    train = load_corpus("stdlib", "train")
    val = load_corpus("stdlib", "val")
    assert len(train) > 500 and len(val) > 5
    assert not set(train["path"]) & set(val["path"])
    assert set(load_corpus("stdlib", "val")["path"]) == set(val["path"])
    assert all("site-packages" not in p for p in train["path"])
    root = sysconfig.get_paths()["stdlib"]
    assert len(train) + len(val) <= len(stdlib_files())
    assert len(train) + len(val) >= 0.98 * len(stdlib_files())  # only non-UTF-8 files are skipped
    assert "os.py" in set(train["path"]) | set(val["path"]) and root


@pytest.fixture()
def local_corpus(tmp_path):
    docs = [f"document number {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(200)]
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(d)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    return tmp_path, docs


def test_local_sources_load_and_split(local_corpus):
    tmp_path, docs = local_corpus
    txt = [*load_corpus(str(tmp_path / "txt" / "*.txt"), "train", val_fraction=0.1)["text"],
           *load_corpus(str(tmp_path / "txt" / "*.txt"), "val", val_fraction=0.1)["text"]]
    assert sorted(txt) == sorted(docs)
    # A text field names a column of JSON or Parquet rows; a plain text file is its own text.
    assert load_corpus(str(tmp_path / "txt" / "*.txt"), "all", text_field="body")["text"] == \
        load_corpus(str(tmp_path / "txt" / "*.txt"), "all")["text"]
    js = load_corpus(str(tmp_path / "c.jsonl"), "train", val_fraction=0.1, text_field="body")
    assert 150 < len(js) < 200
    import datasets
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "c.parquet"))
    pq = load_corpus(str(tmp_path / "c.parquet"), "val", val_fraction=0.1)
    assert set(pq["text"]) <= set(docs) and len(pq) > 0


def test_clear_errors(local_corpus, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="matches no file"):
        load_corpus(str(tmp_path / "*.nothing"))
    with pytest.raises(DataError, match="no field 'text'; its fields are body"):
        load_corpus(str(local_corpus[0] / "c.jsonl"))
    (tmp_path / "one.txt").write_text("only one")
    with pytest.raises(DataError, match="has no documents in its val split"):
        load_corpus(str(tmp_path / "one.txt"), "val", val_fraction=0.0)


def test_cache_round_trip_and_reuse(local_corpus, tmp_path):
    folder, docs = local_corpus
    source = str(folder / "txt" / "*.txt")
    tok = ByteTokenizer()
    tokens = prepare_tokens(source, tok, cache_dir=tmp_path / "cache", val_fraction=0.1, progress=False)
    train_docs = load_corpus(source, "train", val_fraction=0.1)["text"]
    expected = [i for d in train_docs for i in list(d.encode()) + [256]]
    assert tokens["train"].dtype == np.uint16
    assert np.array_equal(np.asarray(tokens["train"]), np.array(expected))
    calls = tok.calls
    again = prepare_tokens(source, tok, cache_dir=tmp_path / "cache", val_fraction=0.1, progress=False)
    assert tok.calls == calls  # read from the cache, not tokenized again
    assert np.array_equal(again["val"], tokens["val"])
    assert not list((tmp_path / "cache").rglob("*.tmp*"))


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = TokenBatches(tokens, 4, 16, seed=3)
    b = TokenBatches(tokens, 4, 16, seed=3)
    x, y = a.get_batch(7)
    assert x.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    assert torch.equal(x, b.get_batch(7)[0])
    assert not torch.equal(x, a.get_batch(8)[0])
    assert not torch.equal(x, a.get_batch(7, micro_step=1)[0])
    assert not torch.equal(x, TokenBatches(tokens, 4, 16, seed=4).get_batch(7)[0])
    # Resume: a fresh loader at steps 5..9 equals one that already produced 0..9.
    seen = [a.get_batch(s)[0] for s in range(10)]
    assert all(torch.equal(seen[s], TokenBatches(tokens, 4, 16, seed=3).get_batch(s)[0]) for s in range(5, 10))


def test_eval_batches_cover_the_stream_without_overlap():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = list(TokenBatches(tokens, 2, 10, name="val").eval_batches())
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert starts.tolist() == list(range(0, 990, 10))[: len(starts)]
    assert len(starts) == 98
    # A few batches are spread over the whole split, not taken from its start.
    few = torch.cat([x[:, 0] for x, _ in TokenBatches(tokens, 2, 10, name="val").eval_batches(3)]).tolist()
    assert len(few) == 6 and few[0] == 0 and few[-1] >= 800  # reaches the last fifth of the split
    assert all(b - a >= 10 for a, b in zip(few, few[1:]))  # still no overlap


def test_too_short_split_is_a_clear_error():
    with pytest.raises(DataError, match="val split has only 5 tokens; need at least seq_len\\+1 = 17"):
        TokenBatches(np.arange(5), 2, 16, name="val")
