"""Checkpoints: everything needed to rebuild the model and continue training exactly.

    run_dir/
      latest                       name of the newest checkpoint (written atomically)
      checkpoints/step_000200/
        config.yaml                the fully resolved job config
        model.safetensors          weights
        tokenizer.json
        trainer_state.pt           step, optimizer, grad scaler, every RNG (torch.save of
                                   tensors and plain containers; read with weights_only=True)
        dcp/                       sharded runs (FSDP2, tensor, pipeline parallel): every rank's
                                   shards of the weights and optimizer state, which any layout
                                   (one process included) resumes from; model.safetensors is
                                   then the weights gathered whole, trainer_state has no optimizer

Each checkpoint is written to a temporary directory and renamed into place,
then `latest` is replaced: a crash at any moment leaves the previous checkpoint
loadable, and the next save clears the temporaries it left. Resuming and
`llmstack.from_pretrained(run_dir)` follow `latest`, or fall back to the newest
complete checkpoint when it names a missing one; resuming also falls back past a
checkpoint whose files are corrupt.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from llmstack.config import to_dict
from llmstack.distributed import Parallelism, barrier
from llmstack.distributed import checkpoint as distributed
from llmstack.interop import load_state_into, load_weights, run_checkpoints, save_weights
from llmstack.io import atomic_directory, atomic_write_text, remove_stale_temporaries

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


class FullWeights:
    """How a checkpoint holds the model's weights: all of them, in model.safetensors. A fine-tuning
    job that trains adapters on a frozen base passes another (`llmstack.finetune.AdapterWeights`:
    the adapter alone, in PEFT's files)."""

    def write(self, model: torch.nn.Module, directory: Path, step: int) -> None:
        save_weights(model.state_dict(), directory, metadata={"format": "llmstack", "step": str(step)})

    def read(self, directory: Path) -> Any:
        """What `restore` needs, read whole first: a ValueError or FileNotFoundError when it is corrupt."""
        return load_weights(directory)[0]

    def restore(self, model: torch.nn.Module, state: Any) -> None:
        load_state_into(model, state)


def save_checkpoint(run_dir: str | os.PathLike, *, step: int, model: torch.nn.Module, optimizer, scaler,
                    tokenizer, config: Any, extra: Optional[dict] = None, keep_last: int = 2,
                    weights: Optional[FullWeights] = None, plan: Optional[Parallelism] = None) -> Path:
    """Write checkpoints/step_N whole, then point `latest` at it, then prune: checkpoints after
    step N (a continuation that a resume from an older one abandoned) and all but the newest
    `keep_last`. `weights` says how the model's weights are kept (default: `FullWeights`).
    Under `plan` with several processes every rank calls it: sharded runs first write their
    shards (DCP) into a folder that rank 0 then moves into the checkpoint; rank 0 writes the rest."""
    weights = weights or FullWeights()
    plan = plan or Parallelism()
    run_dir = Path(run_dir)
    name = f"step_{step:06d}"
    target = run_dir / "checkpoints" / name
    if plan.rank == 0:
        remove_interrupted_saves(run_dir)
    plan.before_save(optimizer)
    whole, shards = None, run_dir / "checkpoints" / f".{name}.dcp"
    if plan.sharded:
        barrier()  # the folder is clear before the shards go in
        distributed.save_state(plan, model, optimizer, shards)
        whole = distributed.full_weights(plan, model)
    if plan.rank != 0:  # rank 0 writes the rest; the others wait until it has
        barrier()
        return target
    state = {"step": step, "rng": rng_state(), **(extra or {})}
    if not plan.sharded:  # sharded runs keep it in dcp/
        state["optimizer"] = optimizer.state_dict()
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()

    def write(tmp: Path) -> None:
        (tmp / "config.yaml").write_text(yaml.safe_dump(config if isinstance(config, dict) else to_dict(config),
                                                        sort_keys=False))
        if whole is not None:
            save_weights(whole, tmp, metadata={"format": "llmstack", "step": str(step)})
            shards.rename(tmp / "dcp")
        else:
            weights.write(model, tmp, step)
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        torch.save(state, tmp / "trainer_state.pt")

    atomic_directory(target, write)
    atomic_write_text(run_dir / LATEST, f"checkpoints/{name}\n")
    checkpoints = list_checkpoints(run_dir)
    abandoned = [p for p in checkpoints if checkpoint_step(p) > step]
    kept = [p for p in checkpoints if checkpoint_step(p) <= step]
    for old in abandoned + (kept[:-keep_last] if keep_last > 0 else []):
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return target


def remove_interrupted_saves(run_dir: str | os.PathLike) -> None:
    """Delete the temporaries that a process killed midway left in a run directory (a half-written
    checkpoint folder, `latest`, metrics.jsonl). Saving and resuming call it: one process trains a
    run at a time."""
    remove_stale_temporaries(Path(run_dir) / "checkpoints")
    remove_stale_temporaries(run_dir, names=[LATEST, "metrics.jsonl"])
    for partial in Path(run_dir).glob("checkpoints/.step_*.dcp"):  # shards whose checkpoint was never completed
        shutil.rmtree(partial, ignore_errors=True)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoint folders, oldest first (complete or not)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"step_\d{6,}", p.name)),
                  key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint `latest` names; falls back to the newest complete one."""
    candidates = run_checkpoints(run_dir)
    return candidates[0] if candidates else None


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, overwritten): an older checkpoint may do."""


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer=None, scaler=None,
                    weights: Optional[FullWeights] = None, plan: Optional[Parallelism] = None) -> dict:
    """Restore weights (and optimizer, scaler, RNG when given); returns the trainer state. Both
    files are read before anything is restored, so a corrupt one leaves the model as it was.
    Under `plan` every rank calls it: a sharded run's checkpoint (dcp/) is read in this run's
    layout, whatever layout wrote it; a single process's into this run's shards."""
    path = Path(path)
    weights = weights or FullWeights()
    plan = plan or Parallelism()
    sharded_ckpt = optimizer is not None and (path / "dcp").is_dir()
    try:
        state_dict = None if sharded_ckpt else weights.read(path)
    except (ValueError, FileNotFoundError) as e:
        raise CorruptCheckpointError(str(e)) from None
    try:
        state = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
    except Exception as e:
        raise CorruptCheckpointError(f"trainer state {path / 'trainer_state.pt'} is truncated or corrupt ({e})") \
            from None
    if sharded_ckpt:
        distributed.load_state(plan, model, optimizer, path / "dcp")
    elif plan.sharded and optimizer is not None:
        distributed.load_full_state(plan, model, optimizer, state_dict, state["optimizer"])
    else:
        weights.restore(model, state_dict)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state


def load_latest_checkpoint(run_dir: str | os.PathLike, model: torch.nn.Module, optimizer=None,
                           scaler=None, weights: Optional[FullWeights] = None,
                           plan: Optional[Parallelism] = None) -> Optional[tuple[Path, dict]]:
    """Resume: load the newest checkpoint that reads; when one is corrupt, say so and fall back to
    the one before. (path, trainer state), or None when the run has no checkpoint."""
    remove_interrupted_saves(run_dir)
    candidates = run_checkpoints(run_dir)
    for i, path in enumerate(candidates):
        try:
            return path, load_checkpoint(path, model, optimizer, scaler, weights, plan)
        except CorruptCheckpointError as e:
            if i + 1 == len(candidates):
                raise CorruptCheckpointError(f"{e}; no earlier checkpoint of {run_dir} to fall back to") from None
            print(f"resume: {e}; falling back to {candidates[i + 1]}", file=sys.stderr)
    return None
