"""Batch normalization and layer normalization, written out (equal to `nn.BatchNorm1d` / `nn.LayerNorm`).

Both standardise activations, (x - mean) / sqrt(var + eps), then scale and shift by learned
per-feature parameters. They differ in what they average over:

    BatchNorm:  each feature over the batch (and length) axes. Training uses the batch's own
                statistics and keeps running averages of them; evaluation uses the running
                averages, so an example's output does not depend on the rest of its batch.
    LayerNorm:  each example over its own features. No batch statistics, nothing to track,
                the same computation in training and evaluation: what sequence models use,
                where batch statistics would mix positions and padding (RMSNorm, its
                successor in `llmstack.model`, also drops the centring).
"""
from __future__ import annotations

import torch
from torch import nn


class BatchNorm(nn.Module):
    """Batch normalization over axis 1 of (N, C) or (N, C, L) inputs, as `nn.BatchNorm1d`.

    In training, the mean and the biased variance of each feature over the batch normalise
    it, and the running averages move by `momentum` towards the mean and the *unbiased*
    variance (torch's convention). In eval mode the running averages normalise instead."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3):
            raise ValueError(f"BatchNorm expects (N, C) or (N, C, L), got shape {tuple(x.shape)}")
        axes = (0,) if x.dim() == 2 else (0, 2)  # every axis but the features'
        shape = (1, -1) if x.dim() == 2 else (1, -1, 1)  # (C,) statistics broadcast over those axes
        if self.training:
            n = x.numel() // x.shape[1]  # values averaged per feature
            if n < 2:
                raise ValueError("BatchNorm in training needs more than one value per feature (a batch of 1?)")
            mean = x.mean(axes)  # (C,)
            var = x.var(axes, correction=0)  # biased: the batch's own spread
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)  # unbiased estimate
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class LayerNorm(nn.Module):
    """Layer normalization over the last `len(normalized_shape)` axes, as `nn.LayerNorm`."""

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.normalized_shape))
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = tuple(range(-len(self.normalized_shape), 0))
        mean = x.mean(axes, keepdim=True)
        var = x.var(axes, keepdim=True, correction=0)
        y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight
        return y + self.bias if self.bias is not None else y
