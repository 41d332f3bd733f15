"""Linear layers tuned for decoding on the CPU.

A decode step multiplies one token's vector (or a few: a small batch, a
speculative chunk) by every weight matrix: each weight element is read once and
used once, so the step is bound by how fast the weights stream from memory, not
by arithmetic. Two things make that stream faster on the CPU (measured with
`scripts/bench_cpu.py` on 2 cores):

- the weight stored transposed in memory, (in, out)-contiguous: same values,
  same shape, only the strides differ;
- the product split along the input dimension into one slice per thread, run as
  one batched matmul, and the partial results summed: torch runs a plain
  matrix-vector product on a single core, the batched one gives every core its
  own slice of the weight to stream.

`use_decode_layout(model)` applies both to a model's `nn.Linear` layers by making
them `DecodeLinear`s. Parameters, state dict and results (up to float summation
order) are unchanged; inputs with more rows (prefill, training) take the usual
`F.linear` path. `generate`, `beam_search`, `speculative_generate` and
`CompiledDecoder` call it on CPU models.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DecodeLinear(nn.Linear):
    """An `nn.Linear` whose products with at most `max_rows` rows are split along the input
    dimension into `splits` slices, one per thread (see the module docstring). Its weight is
    (in, out)-contiguous."""

    max_rows = 16  # decode of a small batch; the split stayed faster up to 16 rows on 2 cores
    splits = 1  # set by use_decode_layout: the largest divisor of in_features up to the thread count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, splits = x.numel() // self.in_features, self.splits
        if rows > self.max_rows or splits == 1 or not x.is_cpu or not self.weight.t().is_contiguous():
            return F.linear(x, self.weight, self.bias)
        part = self.in_features // splits
        x_parts = x.reshape(rows, splits, part).transpose(0, 1)  # (splits, rows, part)
        w_parts = self.weight.t().view(splits, part, self.out_features)  # (splits, part, out), a view
        y = torch.bmm(x_parts, w_parts).sum(dim=0)  # (rows, out): the partial products summed
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def use_decode_layout(model: nn.Module) -> nn.Module:
    """Turn the CPU `nn.Linear` layers of `model` into `DecodeLinear`s, in place: the same
    module objects and parameters (an optimizer holding them is unaffected), their weights
    stored transposed in memory, split for torch's current thread count. Idempotent; returns
    the model."""
    threads = torch.get_num_threads()
    with torch.no_grad():
        for module in model.modules():
            if type(module) is nn.Linear and module.weight.device.type == "cpu" \
                    and type(module.weight.data) is torch.Tensor:
                module.weight.data = module.weight.data.t().contiguous().t()
                module.__class__ = DecodeLinear  # only forward differs; nothing else to convert
            if isinstance(module, DecodeLinear):
                module.splits = max(d for d in range(1, threads + 1) if module.in_features % d == 0)
    return model
