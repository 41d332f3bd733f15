"""Corpora: where documents come from, split into train and validation.

The default needs no download: the Python standard library source of the
running interpreter, one document per file, split by a hash of the file's path
(stable across runs and machines). Local text/JSONL/Parquet files and Hub
dataset names go through the `datasets` library.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import datasets  # imported where used: it costs about a second, and most commands never need it


class DataError(ValueError):
    """A corpus that cannot be used; the message says what to do."""


def stdlib_files() -> list[Path]:
    """The .py files of the running interpreter's standard library (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def _is_val(key: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def _stdlib_dataset(split: str, val_fraction: float) -> datasets.Dataset:
    import datasets

    root = Path(sysconfig.get_paths()["stdlib"])
    paths, texts = [], []
    for path in stdlib_files():
        rel = str(path.relative_to(root))
        if split != "all" and _is_val(rel, val_fraction) != (split == "val"):
            continue
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately not UTF-8
        paths.append(rel)
    return datasets.Dataset.from_dict({"text": texts, "path": paths})


def _local_files(source: str) -> list[str]:
    files = sorted(glob.glob(os.path.expanduser(source), recursive=True))
    if not files:
        if any(ch in source for ch in "*?["):
            raise DataError(f"data.source glob {source!r} matches no file")
        raise DataError(f"data.source {source!r} does not exist (use 'stdlib', a file or glob, or 'hf:NAME')")
    return files


def _local_dataset(source: str, split: str, val_fraction: float, text_field: str) -> datasets.Dataset:
    import datasets

    files = _local_files(source)
    ext = {Path(f).suffix.lower() for f in files}
    if ext <= {".txt", ".md", ".py", ".rst"}:
        texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
        ds = datasets.Dataset.from_dict({"text": texts, "path": files})
        key = "path"
    elif ext <= {".jsonl", ".json"}:
        ds = datasets.load_dataset("json", data_files=files, split="train")
        key = None
    elif ext <= {".parquet"}:
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
        key = None
    else:
        raise DataError(f"data.source {source!r}: unsupported file types {sorted(ext)} "
                        "(use .txt, .jsonl/.json or .parquet, one kind at a time)")
    if key == "path":  # plain text files: the whole file is the text, whatever data.text_field says
        text_field = "text"
    if text_field not in ds.column_names:
        raise DataError(f"data.source {source!r} has no field {text_field!r}; its fields are "
                        f"{', '.join(ds.column_names)} (set data.text_field)")
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    if split == "all":
        return ds
    keys = ds["path"] if key else [str(i) for i in range(len(ds))]
    keep = [i for i, k in enumerate(keys) if _is_val(k, val_fraction) == (split == "val")]
    return ds.select(keep)


def load_corpus(source: str = "stdlib", split: str = "train", *, val_fraction: float = 0.02,
                text_field: str = "text"):
    """Documents of one split, as a `datasets.Dataset` with a "text" column (an iterable
    dataset for streamed Hub names). split "all": every document of stdlib or local files, unsplit
    (val_fraction is not used)."""
    if split not in ("train", "val", "all"):
        raise DataError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if source == "stdlib":
        ds = _stdlib_dataset(split, val_fraction)
    elif source.startswith("hf:"):
        import datasets

        if split == "all":
            raise DataError(f"split 'all' is for stdlib and local files; {source!r} is a Hub dataset")
        name, _, config = source[3:].partition(":")
        try:
            return datasets.load_dataset(name, config or None, split="train" if split == "train" else "validation",
                                         streaming=True)
        except Exception as e:
            raise DataError(f"cannot open Hub dataset {name!r} ({type(e).__name__}: {e}); it needs the network, "
                            "or use a local file with data.source=PATH") from None
    else:
        ds = _local_dataset(source, split, val_fraction, text_field)
    if len(ds) == 0:
        raise DataError(f"corpus {source!r} has no documents in its {split} split "
                        f"(data.val_fraction={val_fraction}); add documents or change data.val_fraction")
    return ds


def corpus_fingerprint(source: str, *, val_fraction: float = 0.02, text_field: str = "text") -> str:
    """Identifies a corpus and its split, for cache keys: file names, sizes and times."""
    h = hashlib.sha256(f"{source}|{val_fraction}|{text_field}".encode())
    if source == "stdlib":
        h.update(sys.version.encode())
        files = stdlib_files()
    elif source.startswith("hf:"):
        return h.hexdigest()[:16]
    else:
        files = [Path(f) for f in _local_files(source)]
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def iter_texts(ds) -> Iterator[str]:
    for row in ds:
        yield row["text"]
