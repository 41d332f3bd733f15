"""Two layers with their backward pass written out by hand, for training speed.

Autograd differentiates `F.rms_norm` and `F.silu(gate) * up` op by op: it keeps every
intermediate and allocates a fresh tensor for each step of the chain rule. On the CPU
the allocations cost as much as the arithmetic (each large one page-faults its memory
in), so writing the gradients out with fewer, in-place passes is measurably faster:
about 2% (RMSNorm) and 3-5% (SwiGLU) of the training step of `scripts/bench_cpu.py`
(A/B in one process). RoPE's own, `RotaryFunction`, lives with the rest of RoPE in
`llmstack/model/rope.py`.

Both take the plain path when no gradient is needed (inference), and both are checked
against autograd through the plain formulas in tests/test_model.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, computed in float32 (or float64)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormFunction.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLUFunction.apply(gate, up)
    return F.silu(gate).mul_(up)


class RMSNormFunction(torch.autograd.Function):
    """With r = rsqrt(mean(x^2) + eps), x̂ = x * r and p = dy * x̂ (C channels):

        dweight = sum over rows of p        dx = r * (dy * weight - x̂ * mean(dy * weight * x̂))

    where mean(dy * weight * x̂) = (p @ weight) / C, a matrix-vector product. Three new
    tensors where autograd makes about ten. Saves x and r (one number per row); x̂ is
    recomputed. Autocast is switched off inside: it would run the products in 16-bit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            xf = x.to(torch.promote_types(x.dtype, torch.float32))
            norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)  # (..., 1), no x^2 tensor
            rstd = norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
            ctx.save_for_backward(x, weight, rstd)
            return (xf * rstd).mul_(weight).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            x_hat = x.to(rstd.dtype) * rstd
            dy = dy.to(rstd.dtype)
            p = dy * x_hat
            dweight = p.flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
            dx = None
            if ctx.needs_input_grad[0]:
                w = weight.to(rstd.dtype)
                mean_g_xhat = (p @ w).unsqueeze_(-1).div_(x.shape[-1])
                dx = (dy * w).addcmul_(x_hat, mean_g_xhat, value=-1).mul_(rstd).to(x.dtype)
        return dx, dweight, None


class SwiGLUFunction(torch.autograd.Function):
    """h = silu(gate) * up, with dup = silu(gate) * dh and dgate = silu'(gate) * up * dh.

    Saves gate and up only (autograd also keeps silu(gate)) and recomputes silu(gate) in
    the backward pass: two new tensors there instead of three, one in the forward instead
    of two."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        dup = F.silu(gate).mul_(dh) if ctx.needs_input_grad[1] else None
        dgate = None
        if ctx.needs_input_grad[0]:
            dgate = dh * up
            torch.ops.aten.silu_backward.grad_input(dgate, gate, grad_input=dgate)  # in place: dgate *= silu'(gate)
        return dgate, dup
