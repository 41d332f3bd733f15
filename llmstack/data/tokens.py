"""Tokenized corpora cached as flat memory-mapped token files.

Documents are joined with the tokenizer's end-of-text token after each one.
The cache key covers the corpus (file names, sizes, times) and the tokenizer,
so a second run with the same inputs reads the file instead of tokenizing.
Files are written beside their final name and renamed into place: a run killed
mid-write never leaves a half file that a later run would trust.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from llmstack.data.corpus import DataError, corpus_fingerprint, load_corpus


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLMSTACK_CACHE", Path.home() / ".cache" / "llmstack")) / "tokens"


def prepare_tokens(source: str, tokenizer, *, cache_dir: Optional[str | os.PathLike] = None,
                   val_fraction: float = 0.02, text_field: str = "text", batch_docs: int = 256,
                   progress: bool = True) -> dict[str, np.ndarray]:
    """{"train": tokens, "val": tokens} as read-only memory maps (uint16 when the vocabulary fits)."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    key = hashlib.sha256("|".join([corpus_fingerprint(source, val_fraction=val_fraction, text_field=text_field),
                                   tokenizer.fingerprint(), np.dtype(dtype).name]).encode()).hexdigest()[:20]
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = folder / key
    out = {}
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        if not path.is_file():
            _tokenize_split(source, split, tokenizer, path, dtype, val_fraction, text_field, batch_docs, progress)
        out[split] = np.memmap(path, dtype=dtype, mode="r")
    return out


def _tokenize_split(source, split, tokenizer, path: Path, dtype, val_fraction, text_field, batch_docs, progress):
    from tqdm import tqdm

    t0 = time.perf_counter()
    ds = load_corpus(source, split, val_fraction=val_fraction, text_field=text_field)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    n_tokens = n_docs = n_bytes = 0
    total = len(ds) if hasattr(ds, "__len__") else None
    bar = tqdm(total=total, desc=f"tokenizing {split}", unit="doc", disable=not progress)
    try:
        with open(tmp, "wb") as f:
            batch: list[str] = []

            def flush():
                nonlocal n_tokens, n_docs, n_bytes
                for ids in tokenizer.encode_batch(batch, eos=True):
                    np.asarray(ids, dtype=dtype).tofile(f)
                    n_tokens += len(ids)
                n_docs += len(batch)
                n_bytes += sum(len(t.encode("utf-8")) for t in batch)
                bar.update(len(batch))
                batch.clear()

            for row in ds:
                batch.append(row["text"])
                if len(batch) >= batch_docs:
                    flush()
            if batch:
                flush()
        if n_tokens == 0:
            raise DataError(f"corpus {source!r} gave no tokens in its {split} split")
        os.replace(tmp, path)
    finally:
        bar.close()
        if tmp.exists():
            tmp.unlink()
    meta = {"source": source, "split": split, "documents": n_docs, "bytes": n_bytes, "tokens": n_tokens,
            "dtype": np.dtype(dtype).name, "tokenizer": tokenizer.fingerprint(),
            "seconds": round(time.perf_counter() - t0, 2)}
    meta_path = path.with_name(f"{split}.json")
    tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, meta_path)


def text_tokens(sources: str | Sequence[str], tokenizer, *, text_field: str = "text",
                batch_docs: int = 256) -> tuple[np.ndarray, dict]:
    """Every document of local files tokenized in memory, with no train/validation split: a text of
    one's own to evaluate a model on. Each source is a path or a glob (.txt/.md/.py/.rst: one document
    per file; .jsonl/.json/.parquet: one per row, its `text_field`). Documents are joined as
    `prepare_tokens` joins them, each followed by the tokenizer's EOS, and each starts with its BOS
    when the model expects one there (`tokenizer.add_bos_token`, as Llama's do).

    Returns (tokens, {"documents", "bytes", "tokens"}), the counts `token_stats` gives for a cached
    split. A source that matches nothing, or text with no characters at all, is a DataError."""
    sources = [sources] if isinstance(sources, str) else list(sources)
    if not sources:
        raise DataError("no text source given")
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_id is not None else []
    eos = getattr(tokenizer, "eos_id", None) is not None
    pieces, n_docs, n_bytes = [], 0, 0
    for source in sources:
        if not glob.glob(os.path.expanduser(source)):
            raise DataError(f"{source!r} " + ("matches no file" if any(c in source for c in "*?[") else
                                              "does not exist"))
        ds = load_corpus(source, "all", text_field=text_field)
        for start in range(0, len(ds), batch_docs):
            texts = ds[start:start + batch_docs]["text"]
            n_docs += len(texts)
            n_bytes += sum(len(t.encode("utf-8")) for t in texts)
            pieces += [np.asarray(bos + ids, dtype=dtype) for ids in tokenizer.encode_batch(texts, eos=eos)]
    if n_bytes == 0:
        raise DataError(f"{', '.join(sources)}: no text (every document is empty)")
    tokens = np.concatenate(pieces)
    return tokens, {"documents": n_docs, "bytes": n_bytes, "tokens": len(tokens)}


def token_stats(tokens: np.ndarray) -> dict:
    """The meta.json written beside a cached split (documents, bytes, tokens)."""
    path = Path(getattr(tokens, "filename", "") or "")
    meta = path.with_name(path.stem + ".json") if path.name else None
    return json.loads(meta.read_text()) if meta and meta.is_file() else {}
