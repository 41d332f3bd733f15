"""safetensors I/O: one file, or shards plus an index in the Hugging Face layout."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmstack.io import atomic_write_text

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def save_weights(state_dict: dict[str, torch.Tensor], directory: str | os.PathLike, *,
                 metadata: Optional[dict[str, str]] = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards and an index
    when the tensors exceed `max_shard_bytes`. Each file is written beside its final name
    and renamed into place."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage (tied weights): give each its own copy.
    tensors = {k: v.detach().contiguous().clone() if v.data_ptr() in _shared_ptrs(state_dict) else v.detach().contiguous()
               for k, v in state_dict.items()}
    metadata = {"format": "pt", **(metadata or {})}
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        _atomic_save(shards[0], directory / WEIGHTS_NAME, metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, directory / fname, metadata)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    atomic_write_text(directory / INDEX_NAME, json.dumps(index, indent=2))


def load_weights(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a single-file or sharded safetensors checkpoint: (state_dict, metadata)."""
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (directory / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")
    state, metadata = {}, {}
    for fname in files:
        path = directory / fname
        try:
            state.update(load_file(path))
            metadata.update(_read_metadata(path))
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            raise ValueError(f"checkpoint file {path} is truncated or corrupt ({e})") from None
    return state, metadata


def read_metadata(directory: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of a checkpoint directory (every shard's), without reading any tensor."""
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    elif (directory / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")
    metadata = {}
    for fname in files:
        try:
            metadata.update(_read_metadata(directory / fname))
        except (OSError, ValueError) as e:
            raise ValueError(f"checkpoint file {directory / fname} is truncated or corrupt ({e})") from None
    return metadata


def _read_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:  # header: 8-byte little-endian length, then JSON
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return header.get("__metadata__", {}) or {}


def _shared_ptrs(state_dict: dict[str, torch.Tensor]) -> set[int]:
    seen, shared = set(), set()
    for t in state_dict.values():
        p = t.data_ptr()
        (shared if p in seen else seen).add(p)
    return shared


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
