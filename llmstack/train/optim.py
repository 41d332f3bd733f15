"""AdamW with decay and no-decay parameter groups."""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only. Norm gains, biases and embeddings are exempt: decaying a
    gain or a bias pulls it towards zero for no benefit, and an embedding row is only updated
    when its token appears, so decay would shrink rare tokens' rows the most."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8, shard: bool = False) -> torch.optim.Optimizer:
    """AdamW over `param_groups`. `shard`: ZeRO-1 over the data-parallel processes (torch's
    ZeroRedundancyOptimizer): each keeps the AdamW state of a share of the parameters, updates them
    and broadcasts them; `consolidate_state_dict` gathers the whole state for a checkpoint."""
    on_cuda = next(model.parameters()).is_cuda
    # fused: one kernel for all parameters on the GPU; foreach: batched ops on the CPU.
    kwargs = {"fused": True} if on_cuda else {"foreach": True}
    groups = param_groups(model, weight_decay)
    if not shard:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    opt = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW, lr=lr, betas=betas,
                                  eps=eps, weight_decay=weight_decay, **kwargs)
    opt.add_param_group(groups[1])
    return opt
