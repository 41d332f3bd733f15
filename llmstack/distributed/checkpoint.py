"""Checkpoints of sharded training with `torch.distributed.checkpoint` (DCP).

When ranks hold different parts of the model (FSDP2, tensor or pipeline parallel), every rank writes
its own shards of the weights and the optimizer state into the checkpoint's `dcp/` folder, with
metadata saying which slice of which tensor each file holds, under the single-process parameter
names. Loading reads, for each rank of the new layout, the slices it needs: a run saved by two
ranks resumes on one, or on two with another strategy, and a single process's checkpoint resumes
on many (`load_full_state`). The weights are also written whole, as model.safetensors, so
`llmstack.from_pretrained` and every tool read a sharded run's checkpoint like any other.

Tensor parallelism reorders the rows of the fused q/k/v projection (`qkv_order`); checkpoints hold
them in the model's own order, so those tensors (and their AdamW moments) are gathered whole when
saved and re-split when loaded.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor

from llmstack.config import ConfigError


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _unpermute(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    full = _whole(t)
    out = torch.empty_like(full)
    out[order.to(full.device)] = full
    return out


def _permute_like(full: torch.Tensor, order: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    rows = full.to(like.device)[order.to(like.device)]
    return distribute_tensor(rows, like.device_mesh, like.placements) if isinstance(like, DTensor) else rows


def _optimizer_tensors(osd: dict, name: str) -> dict:
    """A parameter's optimizer state tensors shaped like it (AdamW's moments, not its step count)."""
    return {k: v for k, v in osd["state"].get(name, {}).items() if torch.is_tensor(v) and v.dim() > 0}


def training_state(plan, model: torch.nn.Module, optimizer) -> dict:
    """{"model": weights, "optim": optimizer state} keyed by parameter name, each rank its shards,
    TP's reordered q/k/v rows back in the model's order (whole)."""
    msd = get_model_state_dict(model)
    osd = get_optimizer_state_dict(model, optimizer)
    for name, order in plan.permuted.items():
        msd[name] = _unpermute(msd[name], order)
        # a new dict: the one returned is the optimizer's own state
        osd["state"][name] = {**osd["state"].get(name, {}), **{k: _unpermute(v, order) for k, v in
                                                                _optimizer_tensors(osd, name).items()}}
    return {"model": msd, "optim": osd}


def save_state(plan, model: torch.nn.Module, optimizer, directory: Path) -> None:
    """Every rank writes its shards of the weights and optimizer state into `directory` (a collective)."""
    dcp.save(training_state(plan, model, optimizer), checkpoint_id=str(directory))


def check_matches(state: dict, directory: Path) -> None:
    """ConfigError, on every rank alike, when the checkpoint's tensors are not this model's."""
    meta = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    for name, t in state["model"].items():
        saved = meta.get(f"model.{name}")
        if saved is None or tuple(getattr(saved, "size", ())) != tuple(t.shape):
            have = "missing" if saved is None else f"shape {tuple(saved.size)}"
            raise ConfigError(f"the distributed checkpoint {directory} holds another model: {name} is {have} there, "
                              f"{tuple(t.shape)} here")


def load_state(plan, model: torch.nn.Module, optimizer, directory: Path) -> None:
    """Read this rank's slices of a DCP checkpoint (saved with any layout) into `model` and `optimizer`."""
    state = training_state(plan, model, optimizer)  # the layout to fill: this run's shards
    check_matches(state, directory)
    with warnings.catch_warnings():  # one process reading: what DCP then warns about is what is meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory))
    params = dict(model.named_parameters())
    for name, order in plan.permuted.items():
        state["model"][name] = _permute_like(state["model"][name], order, params[name])
        for k, v in _optimizer_tensors(state["optim"], name).items():
            state["optim"]["state"][name][k] = _permute_like(v, order, params[name])
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def load_full_state(plan, model: torch.nn.Module, optimizer, weights: dict, optim_state: dict) -> None:
    """Resume a sharded run from a single process's checkpoint: its whole weights, and its optimizer
    state numbered as that process's optimizer held the parameters (`plan.param_names`)."""
    names = plan.param_names
    held = dict(model.named_parameters())  # a pipeline stage holds some of them
    osd = {"state": {names[i]: s for i, s in optim_state["state"].items() if names[i] in held},
           "param_groups": [{**g, "params": [names[i] for i in g["params"] if names[i] in held]}
                            for g in optim_state["param_groups"]]}
    own = get_model_state_dict(model)
    weights = {k: v for k, v in weights.items() if k in own}
    for name, order in plan.permuted.items():
        weights[name] = weights[name][order]
        for k, v in _optimizer_tensors(osd, name).items():
            osd["state"][name][k] = v[order]
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=full)
    set_optimizer_state_dict(model, optimizer, osd, options=full)


def full_weights(plan, model: torch.nn.Module) -> Optional[dict]:
    """Every weight whole and in the model's own order, on rank 0 (None on the others): what
    model.safetensors holds. A collective."""
    if plan.pipeline is not None:  # each stage's rank holds plain tensors of its own blocks
        parts = [None] * plan.world
        dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in model.state_dict().items()})
        merged = {k: v for part in parts for k, v in part.items()} if plan.rank == 0 else None
    else:
        merged = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        merged = merged if plan.rank == 0 else None
    if merged is not None:
        for name, order in plan.permuted.items():
            merged[name] = _unpermute(merged[name], order)
    return merged
