"""Decoding on a multi-core CPU: matrix-vector products split across threads, without touching the model.

A decode step multiplies one token's vector (or a few: a small batch, a speculative
chunk) by every weight matrix, so it is bound by how fast the weights stream from
memory. torch runs such a product, and inductor's code for it, on one core. Split by
output rows into one block per thread and run as one batched product, every core
streams a contiguous block of the weight as it is stored, and no output changes (each
is the same dot product). Measured with `scripts/bench_cpu.py --threads 2`: eager
decoding 1.4x, the compiled step 3x the tokens/s of the unsplit products.

`decoding_view(model)` is what generation runs: a copy of the model's module structure
whose `nn.Linear` layers (and a tied output head) are `SplitLinear`s, sharing every
parameter, buffer and setting with the model (nothing is copied but the module objects). The caller's model is never
changed.
"""
from __future__ import annotations

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
    structure, with `SplitLinear` for each `nn.Linear`, whose modules hold the very same
    parameters, buffers, config and other attributes as the model's; otherwise (a GPU, one
    thread, parameters that are not plain tensors) the model itself. Made anew for each call
    (a fraction of a millisecond), so it always reflects the model as it is."""
    threads = torch.get_num_threads()
    tensors = [*model.parameters(), *model.buffers()]
    if threads < 2 or not tensors or tensors[0].device.type != "cpu" \
            or any(type(t.data) is not torch.Tensor for t in tensors):
        return model
    copies: dict[int, nn.Module] = {}

    def clone(module: nn.Module) -> nn.Module:
        if id(module) not in copies:  # a module used twice stays one module
            # A shallow copy: a new object (its own train/eval flag) whose attributes are the
            # module's own objects; only its table of children is new, pointing at their copies.
            new = object.__new__(SplitLinear if type(module) is nn.Linear else type(module))
            new.__dict__.update(vars(module))
            copies[id(module)] = new
            new.__dict__["_modules"] = {name: None if child is None else clone(child)
                                        for name, child in module._modules.items()}
            if type(new) is SplitLinear:
                new.__dict__["splits"] = threads
        return copies[id(module)]

    view = clone(model)
    embed = getattr(view, "embed", None)
    if getattr(view, "lm_head", False) is None and type(embed) is nn.Embedding:
        # A tied output head (`F.linear(x, embed.weight)`, often the largest matrix) is split the same way.
        head = SplitLinear(embed.embedding_dim, embed.num_embeddings, bias=False, device="meta")
        head.weight, head.splits = embed.weight, threads
        del view.lm_head  # a plain attribute (None); the view's own, the model keeps its None
        view.lm_head = head
    return view
