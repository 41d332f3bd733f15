"""The `parallel:` section of a job: how many processes, and how the work is split over them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmstack.config import ConfigError, check_at_least, option

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


@dataclass
class ParallelConfig:
    dp_replicate: int = option(1, "data-parallel replicas: each holds the whole model (DDP), or with dp_shard/tp "
                                  "its shards (HSDP); the product of dp_replicate, dp_shard, tp and pp is the "
                                  "world size")
    dp_shard: int = option(1, "data-parallel shards (FSDP2): parameters, gradients and optimizer state split "
                              "over them")
    tp: int = option(1, "tensor-parallel ranks: attention heads and MLP columns split over them")
    pp: int = option(1, "pipeline stages: the blocks split over them")
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = option(
        "1f1b", "pipeline schedule: gpipe (all forwards, then all backwards), 1f1b, interleaved_1f1b (two stages "
                "per rank)")
    pp_microbatches: int = option(0, "micro-batches per pipeline step; 0: twice the number of stages")
    sequence_parallel: bool = option(True, "tp: the norms and the residual stream split along the sequence")
    reshard_after_forward: bool = option(
        True, "dp_shard: free gathered parameters after forward (ZeRO-3); false keeps them until backward "
              "(ZeRO-2: more memory, one all-gather less per step)")
    shard_optimizer: bool = option(
        False, "dp_replicate alone: split the optimizer state over the replicas (ZeRO-1, ZeroRedundancyOptimizer)")
    param_dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", "dp_shard/tp: dtype parameters are gathered in and computed with (FSDP2 mixed precision)")
    reduce_dtype: Literal["float32", "bfloat16"] = option("float32", "dp_shard: dtype gradients are reduced in")

    def validate(self) -> "ParallelConfig":
        check_at_least("parallel", self, 1, "dp_replicate", "dp_shard", "tp", "pp")
        check_at_least("parallel", self, 0, "pp_microbatches")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule!r}: choose one of {', '.join(PP_SCHEDULES)}")
        if self.pp > 1 and self.world_size != self.pp:
            raise ConfigError(f"parallel.pp={self.pp} runs alone so far: set dp_replicate, dp_shard and tp to 1 "
                              "with it")
        if self.shard_optimizer and (self.dp_shard > 1 or self.tp > 1 or self.pp > 1):
            raise ConfigError("parallel.shard_optimizer (ZeRO-1) goes with dp_replicate alone; dp_shard shards the "
                              "optimizer state already")
        return self

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: how many slices each global batch is cut into."""
        return self.dp_replicate * self.dp_shard

    @property
    def sharded(self) -> bool:
        """Whether ranks hold different parts of the model (FSDP, TP, PP): checkpoints are then distributed."""
        return self.dp_shard > 1 or self.tp > 1 or self.pp > 1

    @property
    def microbatches(self) -> int:
        return self.pp_microbatches or 2 * self.pp

    def check_model(self, model, batch_size: int) -> None:
        """ConfigError when the model (a ModelConfig; None: not known yet) or the batch cannot be split
        this way."""
        if self.world_size == 1:
            return
        if batch_size % self.dp_size:
            raise ConfigError(f"train.batch_size={batch_size} does not split over {self.dp_size} data-parallel ranks "
                              f"(dp_replicate x dp_shard); make it a multiple of {self.dp_size}")
        if model is None:
            return
        if getattr(model, "arch", "transformer") != "transformer" and self.sharded:
            raise ConfigError(f"model.arch={model.arch}: dp_shard, tp and pp split a Transformer's blocks; use "
                              "parallel.dp_replicate for a recurrent model")
        if self.tp > 1:
            for key in ("n_heads", "n_kv_heads"):
                if getattr(model, key) % self.tp:
                    raise ConfigError(f"parallel.tp={self.tp} does not divide model.{key}={getattr(model, key)}: each "
                                      "tensor-parallel rank takes whole heads")
            if model.moe is not None:
                raise ConfigError("parallel.tp with a mixture of experts is not supported; use dp_shard")
            if model.qk_norm:
                raise ConfigError("parallel.tp with model.qk_norm is not supported (the per-head norms' gradients "
                                  "would be partial sums); use dp_shard")
        if self.pp > 1:
            stages = self.pp * (2 if self.pp_schedule == "interleaved_1f1b" else 1)
            if stages > model.n_layers:
                raise ConfigError(f"parallel.pp={self.pp} ({stages} stages with {self.pp_schedule}) is more than "
                                  f"model.n_layers={model.n_layers}: each stage needs a block")
            if model.tie_embeddings:
                raise ConfigError("parallel.pp with model.tie_embeddings: the first and last stage would share the "
                                  "embedding; set model.tie_embeddings=false")
            if model.moe is not None:
                raise ConfigError("parallel.pp with a mixture of experts is not supported (its auxiliary loss)")
            if (batch_size // self.dp_size) % self.microbatches:
                raise ConfigError(f"train.batch_size={batch_size} does not split into parallel.pp_microbatches="
                                  f"{self.microbatches} micro-batches")
            if self.pp_schedule == "interleaved_1f1b" and self.microbatches % self.pp:
                raise ConfigError(f"parallel.pp_microbatches={self.microbatches} must be a multiple of "
                                  f"parallel.pp={self.pp} for interleaved_1f1b")
