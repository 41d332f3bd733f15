"""Parallelism applied to a built model from outside, on PyTorch's own engine.

    plan = Parallelism(cfg.parallel, device)          # after `setup` joined the process group
    model, forward = plan.parallelize(model, names)    # tensor parallel, FSDP2 / DDP, or pipeline stages

The world is a DeviceMesh with four named dimensions, (pp, dp_replicate, dp_shard, tp), whose sizes
are the config's degrees; each strategy works on its sub-mesh:

- **dp_replicate** alone: DDP. Every rank holds the whole model; gradients are all-reduced in
  backward. With `shard_optimizer`, ZeRO-1: each rank keeps the AdamW state of a share of the
  parameters (torch's ZeroRedundancyOptimizer) and broadcasts its updated share.
- **dp_shard**: FSDP2 (`fully_shard` on every block, then the root). Parameters, gradients and
  optimizer state are split over the ranks; a block's parameters are all-gathered before its
  forward and backward and its gradients reduce-scattered after. `reshard_after_forward: false`
  keeps the gathered parameters from forward to backward (ZeRO-2). With dp_replicate too: HSDP
  (sharded within a group, replicated across groups).
- **tp**: tensor parallel with DTensor's `parallelize_module`. q/k/v and the MLP's gate/up are split
  by output columns (whole heads per rank), o_proj and down_proj by input rows; their partial
  outputs are summed (all-reduce, or reduce-scatter along the sequence with sequence parallel, where
  the norms and the residual stream hold a slice of the sequence). The attention reads its head
  counts from the tensors, so it runs on a rank's share of the heads unchanged. The embedding,
  the final norm and the output head stay whole on every rank.
- **pp**: pipeline parallel (`llmstack.distributed.pipeline`): the blocks split into stages.

Each data-parallel rank reads a disjoint slice of every global batch (`RankSlice`); ranks of one
tensor-parallel group read the same one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from llmstack.config import ConfigError
from llmstack.distributed.config import ParallelConfig
from llmstack.distributed.process import rank_and_world

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def qkv_order(n_heads: int, n_kv_heads: int, head_dim: int, tp: int) -> torch.Tensor:
    """Row order of a fused qkv projection that gives tensor-parallel rank r, as its contiguous
    1/tp of the rows, the q, k and v rows of its own KV groups: the model's rows are all q heads,
    then all k heads, then all v heads; these are [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], rank by rank."""
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    parts = [torch.arange(q), q + torch.arange(kv), q + kv + torch.arange(kv)]  # all q, all k, all v rows
    return torch.cat([part.view(tp, -1) for part in parts], dim=1).flatten()


class Parallelism:
    """How this process takes part: its coordinates in the mesh and the strategies the config names.
    With one process every method is the single-process behaviour."""

    def __init__(self, cfg: ParallelConfig | None = None, device: torch.device | str = "cpu"):
        self.cfg = cfg or ParallelConfig()
        self.device = torch.device(device)
        self.rank, self.world = rank_and_world()
        self.mesh = None
        self.pp_rank = self.dp_rank = self.tp_rank = 0
        if self.world > 1:
            from torch.distributed.device_mesh import init_device_mesh

            c = self.cfg
            self.mesh = init_device_mesh(self.device.type, (c.pp, c.dp_replicate, c.dp_shard, c.tp),
                                         mesh_dim_names=MESH_DIMS)
            self.pp_rank, replica, shard, self.tp_rank = self.mesh.get_coordinate()
            self.dp_rank = replica * c.dp_shard + shard
        self.dp_size = self.cfg.dp_size if self.world > 1 else 1
        self.permuted: dict[str, torch.Tensor] = {}  # parameter name -> row order (TP's fused qkv)
        self.param_names: list[str] = []  # the optimizer's parameters in order, by name (for checkpoints)
        self.pipeline = None

    # ------------------------------------------------------------------ who does what

    @property
    def sharded(self) -> bool:
        """Ranks hold different parts of the model: checkpoints go through torch.distributed.checkpoint."""
        return self.world > 1 and self.cfg.sharded

    @property
    def owns_loss(self) -> bool:
        """One rank per data-parallel slice reports its loss: the last pipeline stage's first TP rank."""
        return self.pp_rank == self.cfg.pp - 1 and self.tp_rank == 0 if self.world > 1 else True

    def sum_over_slices(self, value: float) -> float:
        """The sum of a per-slice number (a loss, a token count) over the data-parallel slices."""
        if self.world == 1:
            return value
        t = torch.tensor([value if self.owns_loss else 0.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    # ------------------------------------------------------------------ the model

    def parallelize(self, model: nn.Module, param_names: list[str] = ()) -> tuple[nn.Module, nn.Module | None]:
        """Apply the config's strategies to `model` in place; returns (the module whose parameters this
        rank trains and checkpoints, the module to call for a forward: DDP's wrapper, or None under a
        pipeline, which runs through `self.pipeline`). `param_names`: the trained parameters in the
        order a single process's optimizer holds them (how its checkpoints number them)."""
        self.param_names = list(param_names)
        if self.world == 1:
            return model, model
        c = self.cfg
        if c.pp > 1:
            from llmstack.distributed.pipeline import Pipeline

            self.pipeline = Pipeline(model, self)
            return self.pipeline.local, None
        if c.tp > 1:
            self.apply_tensor_parallel(model)
        if c.dp_shard > 1 or c.tp > 1:
            # FSDP2 over the data-parallel ranks (with tp alone, over one: it leaves the shards whole but
            # makes every parameter a DTensor, as the optimizer's batched updates need)
            self.apply_fsdp(model)
            return model, model
        return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=None if self.device.type == "cpu"
                                                                else [self.device])

    def apply_tensor_parallel(self, model: nn.Module) -> None:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                       RowwiseParallel, SequenceParallel, parallelize_module)

        cfg, mesh, sp = model.config, self.mesh["tp"], self.cfg.sequence_parallel
        order = qkv_order(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, self.cfg.tp)
        residual = Shard(1) if sp else Replicate()  # the residual stream between blocks
        for i, block in enumerate(model.layers):
            qkv = block.attn.qkv_proj
            with torch.no_grad():  # rank r's contiguous rows become its heads' q, k and v
                for name, p in qkv.named_parameters():
                    p.copy_(p[order.to(p.device)])
                    self.permuted[f"layers.{i}.attn.qkv_proj.{name}"] = order
            # With sequence parallel the stream stays a DTensor (sharded along the sequence) between the ops.
            out = {"output_layouts": residual, "use_local_output": not sp}
            plan = {"attn.qkv_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel(**out),
                    "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(**out)}
            if block.mlp.gate_proj is not None:
                plan["mlp.gate_proj"] = ColwiseParallel()
            if sp:  # the norms run on a slice of the sequence; attention and the MLP gather it whole
                plan.update({
                    "attn_norm": SequenceParallel(), "mlp_norm": SequenceParallel(),
                    "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                               desired_input_layouts=(Replicate(), None, None, None)),
                    "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                })
            parallelize_module(block, mesh, plan)
        if sp:  # the embedding's output enters the stream as a slice; the final norm sees all of it
            parallelize_module(model, mesh, {
                "embed": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                             use_local_output=False),
                "norm": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                           use_local_output=True),
            })

    def apply_fsdp(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        c = self.cfg
        mesh = self.mesh["dp_replicate", "dp_shard"] if c.dp_replicate > 1 else self.mesh["dp_shard"]
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[c.param_dtype], reduce_dtype=DTYPES[c.reduce_dtype])
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=c.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=c.reshard_after_forward)

    # ------------------------------------------------------------------ the optimizer step

    def clip_grad_norm(self, parameters, max_norm: float) -> float:
        """Scale gradients so that their global norm is at most `max_norm`; returns that norm. Over
        ranks, each shard counted once: a DTensor's local shard is counted by the ranks that hold
        it, divided by how many hold the same one; a pipeline stage's plain gradients likewise.
        (Partial gradients, pending a sum over ranks, are summed first.)"""
        params = [p for p in parameters if p.grad is not None]
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        from torch.distributed.tensor import DTensor, Replicate

        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in params:
            g, shards = p.grad, self.cfg.pp  # ranks that hold different values of this gradient
            if isinstance(g, DTensor):
                if any(pl.is_partial() for pl in g.placements):  # sequence-parallel norms: sum the parts first
                    g = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])
                # Shard, or FSDP's _StridedShard over tensor-parallel shards: both split along `dim`
                shards *= int(torch.tensor([g.device_mesh.size(i) for i, pl in enumerate(g.placements)
                                            if hasattr(pl, "dim")] or [1]).prod())
                g = g.to_local()
            total += g.double().pow(2).sum() * shards / self.world
        dist.all_reduce(total)
        norm = total.sqrt().item()
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for p in params:
                p.grad.mul_(coef)
        return norm

    @property
    def zero1(self) -> bool:
        """Whether the optimizer state is split over data-parallel replicas (ZeroRedundancyOptimizer)."""
        return self.world > 1 and self.cfg.shard_optimizer

    def before_save(self, optimizer) -> None:
        """Collectives every rank runs before rank 0 writes a checkpoint: ZeRO-1 gathers the optimizer
        state on rank 0."""
        if self.zero1:
            optimizer.consolidate_state_dict(to=0)

    def check_loss(self, loss_fn, next_token_loss) -> None:
        if self.world > 1 and loss_fn is not next_token_loss:
            raise ConfigError("parallel training runs the next-token loss (pretraining) so far")
