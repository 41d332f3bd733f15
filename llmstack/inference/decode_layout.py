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
    _parts = None  # the weight's (splits, in / splits, out) view, kept between no-grad calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, splits = x.numel() // self.in_features, self.splits
        w_parts = self._weight_parts() if rows <= self.max_rows and splits > 1 and x.is_cpu else None
        if w_parts is None:
            return F.linear(x, self.weight, self.bias)
        x_parts = x.reshape(rows, splits, self.in_features // splits).transpose(0, 1)  # (splits, rows, part)
        y = torch.bmm(x_parts, w_parts).sum(dim=0)  # (rows, out): the partial products summed
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        self._parts = None  # .to(), .half(), ... replace the weight: let the old one be freed now
        return super()._apply(fn, recurse)

    def _weight_parts(self):
        """The weight as `splits` slices along the input dimension, (splits, part, out), a view;
        None when the weight is no longer (in, out)-contiguous (replaced since the layout).
        Without autograd the view is kept and reused (a decode step makes dozens of these)
        for as long as the weight's storage is the same: a weight replaced by `.to()` or
        `.data = ...` lives elsewhere, and the kept view holds the old storage, so no new
        one can take its address. A compiled step traces the view instead (it costs nothing
        there)."""
        keep = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        parts = self._parts
        if keep and parts is not None and parts.data_ptr() == self.weight.data_ptr() and parts.shape[0] == self.splits:
            return parts
        w = self.weight.t()
        if not w.is_contiguous():
            return None
        parts = w.view(self.splits, self.in_features // self.splits, self.out_features)
        if keep:
            self._parts = parts.detach()
        return parts


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
