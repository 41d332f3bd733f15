"""Training on many processes with PyTorch's distributed engine (torchrun, DeviceMesh, DTensor,
FSDP2, tensor and pipeline parallel, distributed checkpoints), applied to a built model from outside.

    torchrun --standalone --nproc_per_node 2 scripts/pretrain.py --config ... parallel.dp_shard=2

See docs/distributed.md for what each strategy splits, what it sends, and what it costs.
"""
from llmstack.distributed.config import ParallelConfig
from llmstack.distributed.parallelize import Parallelism, qkv_order
from llmstack.distributed.process import RankSlice, barrier, rank_and_world, setup

__all__ = ["ParallelConfig", "Parallelism", "RankSlice", "barrier", "qkv_order", "rank_and_world", "setup"]
