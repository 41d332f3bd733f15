"""Decoding on a multi-core CPU: matrix-vector products split across threads, without touching the model.

A decode step multiplies one token's vector (or a few: a small batch, a speculative
chunk) by every weight matrix, so it is bound by how fast the weights stream from
memory. torch runs such a product, and inductor's code for it, on one core. Split by
output rows into one block per thread and run as one batched product, every core
streams a contiguous block of the weight as it is stored, and no output changes (each
is the same dot product). Measured with `scripts/bench_cpu.py --threads 2`: eager
decoding 1.4x, the compiled step 3x the tokens/s of the unsplit products.

`decoding_view(model)` is what generation runs: a structural copy of the model whose
`nn.Linear` layers are `SplitLinear`s, sharing every parameter and buffer with the
model (no tensor is copied). The caller's model is never changed, and a view costs a
few milliseconds to make.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class SplitLinear(nn.Linear):
    """An `nn.Linear` whose products with at most `max_rows` rows of x (without autograd, on the
    CPU) run as `splits` blocks of output rows, one per thread."""

    max_rows = 16  # decode of a small batch; the split stayed faster up to 16 rows on 2 cores
    splits = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, splits = self.weight, self.splits
        out_features, in_features = w.shape
        rows = x.numel() // in_features
        if (rows > self.max_rows or out_features % splits or not x.is_cpu or torch.is_grad_enabled()
                or not w.is_contiguous()):
            return F.linear(x, w, self.bias)
        x_all = x.reshape(1, rows, in_features).expand(splits, rows, in_features)
        blocks = w.view(splits, out_features // splits, in_features).transpose(1, 2)  # (splits, in, out / splits)
        y = torch.bmm(x_all, blocks).transpose(0, 1).reshape(*x.shape[:-1], out_features)  # blocks side by side
        return y if self.bias is None else y + self.bias


def decoding_view(model: nn.Module) -> nn.Module:
    """`model` for decoding: on the CPU with more than one torch thread, a copy of its module
    structure that shares all its tensors and has `SplitLinear` for each `nn.Linear`; otherwise
    (a GPU, one thread, parameters that are not plain tensors) the model itself."""
    threads = torch.get_num_threads()
    tensors = [*model.parameters(), *model.buffers()]
    if threads < 2 or not tensors or tensors[0].device.type != "cpu" \
            or any(type(t.data) is not torch.Tensor for t in tensors):
        return model
    # Every tensor the modules hold is shared: parameters, buffers, and what a forward left behind
    # (a MoE layer's last auxiliary loss, which may still hold an autograd graph).
    shared = tensors + [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    view = copy.deepcopy(model, memo={id(t): t for t in shared})
    for module in view.modules():
        if type(module) is nn.Linear:
            module.__class__ = SplitLinear
            module.splits = threads
    return view
