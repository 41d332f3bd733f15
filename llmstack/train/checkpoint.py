"""Checkpoints: everything needed to rebuild the model and continue training exactly.

    run_dir/
      latest                       name of the newest checkpoint (written atomically)
      checkpoints/step_000200/
        config.yaml                the fully resolved job config
        model.safetensors          weights
        tokenizer.json
        trainer_state.pt           step, optimizer, grad scaler, every RNG (torch.save of
                                   tensors and plain containers; read with weights_only=True)

Each checkpoint is written to a temporary directory and renamed into place,
then `latest` is replaced: a crash at any moment leaves the previous checkpoint
loadable. `llmstack.from_pretrained(run_dir)` follows `latest`.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from llmstack.config import to_dict
from llmstack.interop import load_state_into, load_weights, save_weights
from llmstack.io import atomic_directory

LATEST = "latest"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, *, step: int, model: torch.nn.Module, optimizer, scaler,
                    tokenizer, config: Any, extra: Optional[dict] = None, keep_last: int = 2,
                    rng: Optional[dict] = None) -> Path:
    """`rng`: the RNG state to record, when not the current one (an interrupted step saves the
    state from the start of that step, so that resuming replays it exactly)."""
    run_dir = Path(run_dir)
    name = f"step_{step:06d}"
    target = run_dir / "checkpoints" / name
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng or rng_state(), **(extra or {})}
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()

    def write(tmp: Path) -> None:
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        save_weights(model.state_dict(), tmp, metadata={"format": "llmstack", "step": str(step)})
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        torch.save(state, tmp / "trainer_state.pt")

    atomic_directory(target, write)
    tmp_latest = run_dir / f"{LATEST}.tmp"
    tmp_latest.write_text(f"checkpoints/{name}\n")
    os.replace(tmp_latest, run_dir / LATEST)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"step_\d{6,}", p.name))


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint `latest` names; falls back to the newest complete one."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        path = run_dir / pointer.read_text().strip()
        if (path / "trainer_state.pt").is_file():
            return path
    complete = [p for p in list_checkpoints(run_dir) if (p / "trainer_state.pt").is_file()]
    return complete[-1] if complete else None


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer=None, scaler=None) -> dict:
    """Restore weights (and optimizer, scaler, RNG when given); returns the trainer state."""
    path = Path(path)
    state_dict, _ = load_weights(path)
    load_state_into(model, state_dict)
    try:
        state = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"trainer state {path / 'trainer_state.pt'} is truncated or corrupt ({e})") from None
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state
