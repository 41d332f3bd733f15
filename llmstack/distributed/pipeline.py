"""Pipeline parallelism with `torch.distributed.pipelining`: the blocks split into stages.

    parallel.pp=2 parallel.pp_schedule=1f1b parallel.pp_microbatches=4

Rank r holds stage r: a contiguous run of blocks, the embedding on the first stage, the final norm
and the output head on the last. Each step cuts the batch into micro-batches that flow through the
stages; activations go forward and their gradients back between neighbouring ranks (send/recv).
The schedule orders the work:

- `gpipe`: every micro-batch's forward, then every backward. Simple; each stage keeps the
  activations of all micro-batches.
- `1f1b`: after a warm-up, each stage alternates one forward and one backward, so it keeps at most
  `pp` micro-batches' activations. The same idle "bubble" as GPipe: (pp - 1) / (m + pp - 1) of
  the step for m micro-batches.
- `interleaved_1f1b`: each rank holds two stages (r and r + pp), which shrinks the bubble by
  that factor at the cost of more messages.

The loss is the summed cross-entropy of each micro-batch, scaled by the trainer's 1 / (target tokens
of the step), so the accumulated gradient is the one of the whole batch's mean (the schedule's own
division by the micro-batch count is off).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmstack.config import ConfigError
from llmstack.model.transformer import Transformer


def split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous runs of block indices, one per stage, sizes differing by at most one (earlier
    stages take the extra blocks: the last one also runs the output head)."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


class Stage(nn.Module):
    """Some of a Transformer's blocks, with the embedding when it comes first and the final norm and
    output head when it comes last. Its parameter names are the Transformer's (`layers.5.attn...`),
    so a checkpoint holds the same names whatever the number of stages."""

    inputs = Transformer.inputs
    rope_for = Transformer.rope_for
    head = Transformer.head

    def __init__(self, model: Transformer, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.config, self.first, self.last = model.config, first, last
        self.embed = model.embed if first else None
        self.pos_embed = model.pos_embed if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.register_buffer("rope_inv_freq", model.rope_inv_freq, persistent=False)
        self.rope_attention_factor = model.rope_attention_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or hidden states in; hidden states, or logits (last stage) out."""
        positions = torch.arange(x.shape[1], device=x.device)
        h = self.inputs(x, positions) if self.first else x
        rope = self.rope_for(positions, h.dtype)
        for layer in self.layers.values():
            h = layer(h, rope)
        return self.head(self.norm(h)) if self.last else h


class Pipeline:
    """This rank's stages of `model` and the schedule that runs them. `local` is one module holding
    every parameter this rank trains (what the optimizer and checkpoints see); the blocks of other
    ranks' stages are moved to the meta device (freed)."""

    def __init__(self, model: Transformer, plan):
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                  ScheduleInterleaved1F1B)

        cfg = plan.cfg
        per_rank = 2 if cfg.pp_schedule == "interleaved_1f1b" else 1
        n_stages = cfg.pp * per_rank
        chunks = split_layers(model.config.n_layers, n_stages)
        mine = [plan.pp_rank + k * cfg.pp for k in range(per_rank)]  # interleaved: stages r and r + pp
        self.has_first, self.has_last = 0 in mine, n_stages - 1 in mine
        modules = [Stage(model, chunks[s], s == 0, s == n_stages - 1) for s in mine]
        self.local = Stage(model, sorted(i for s in mine for i in chunks[s]), self.has_first, self.has_last)
        held = {id(m) for m in self.local.modules()}
        for m in (*model.layers, model.embed, model.pos_embed, model.norm, model.lm_head):
            if m is not None and id(m) not in held:
                m.to("meta")
        group = plan.mesh["pp"].get_group()
        self.stages = [PipelineStage(m, s, n_stages, plan.device, group=group) for m, s in zip(modules, mine)]
        self.group, self.scale = group, 1.0
        self.modules = modules
        kinds = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
        kind = kinds[cfg.pp_schedule]
        self.schedule = kind(self.stages if per_rank > 1 else self.stages[0], n_microbatches=cfg.microbatches,
                             loss_fn=self._loss, scale_grads=False)
        self.training = True

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        return loss * self.scale

    def _run(self, run, x: torch.Tensor, y: torch.Tensor, kwargs: dict, scale: float) -> float:
        if kwargs:
            raise ConfigError("pipeline parallelism runs plain token batches (no packed-document masks)")
        self.scale, losses = scale, []
        args = (x,) if self.has_first else ()
        run(*args, target=y if self.has_last else None, losses=losses if self.has_last else None)
        return float(sum(loss.item() for loss in losses)) / scale  # the micro-batches' summed losses

    def step(self, batch: tuple, scale: float) -> float:
        """Forward and backward of one batch through the pipeline; the summed loss on the last
        stage's rank, 0 on the others."""
        x, y, *rest = batch
        return self._run(lambda *a, **k: self.schedule.step(*a, return_outputs=False, **k), x, y,
                         rest[0] if rest else {}, scale)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, *, targets: torch.Tensor, **kwargs) -> torch.Tensor:
        """The summed loss of a batch, forward only, on every rank (what `evaluate` calls)."""
        value = self._run(self.schedule.eval, x, targets, kwargs, 1.0)
        t = torch.tensor([value], dtype=torch.float64, device=x.device)
        dist.all_reduce(t, group=self.group)  # only the last stage's rank holds a loss
        return t[0].float()

    def train(self, mode: bool = True) -> "Pipeline":
        self.training = mode
        self.local.train(mode)
        for m in self.modules:
            m.train(mode)
        return self

    def eval(self) -> "Pipeline":
        return self.train(False)
