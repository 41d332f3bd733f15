"""Processes: joining torchrun's process group, this rank's slice of each batch, sums over ranks.

    torchrun --standalone --nproc_per_node 2 scripts/pretrain.py --config ... parallel.dp_shard=2

torchrun starts one process per rank and describes the world in the environment (WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR); `setup` checks that the config's degrees multiply to that world
and joins the process group: NCCL on CUDA, gloo on the CPU. A plain `python` run is world size 1
and touches nothing here.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from llmstack.config import ConfigError
from llmstack.distributed.config import ParallelConfig


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup(cfg: ParallelConfig, device: torch.device) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, ...) when the world has more
    than one process, after checking it is the size the config asks for; returns the device this
    rank uses (cuda:LOCAL_RANK on GPUs). A plain `python` run is world size 1 and changes nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != cfg.world_size:
        raise ConfigError(f"the product of the parallel sizes is {cfg.world_size} but {world} processes run "
                          f"(WORLD_SIZE); launch with torchrun --nproc_per_node {cfg.world_size} or set "
                          f"parallel.dp_replicate={world}")
    if world == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


class RankSlice:
    """This rank's rows of each global batch of `batches` (any object with get_batch/eval_batches).
    Validation batches are not split: every rank evaluates the same ones."""

    def __init__(self, batches, rank: int, world: int):
        size = getattr(batches, "batch_size", None)
        if size is not None and size % world:
            raise ConfigError(f"train.batch_size={size} does not split over {world} data-parallel ranks; make it a "
                              f"multiple of {world}")
        self.batches, self.rank, self.world = batches, rank, world

    def get_batch(self, step: int, micro_step: int = 0):
        batch = self.batches.get_batch(step, micro_step)
        rows = batch[0].shape[0] // self.world
        part = slice(self.rank * rows, (self.rank + 1) * rows)
        out = [t[part] for t in batch[:2]]
        if len(batch) > 2:
            out.append({k: v[part] if torch.is_tensor(v) and v.dim() and v.shape[0] == batch[0].shape[0] else v
                        for k, v in batch[2].items()})
        return tuple(out)

    def eval_batches(self, n_batches: Optional[int] = None):
        return self.batches.eval_batches(n_batches)

    def __getattr__(self, name):
        return getattr(self.batches, name)


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()
