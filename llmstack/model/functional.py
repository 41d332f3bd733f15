"""Layers whose backward pass is written out by hand, for training speed and memory.

Autograd differentiates `F.rms_norm`, `F.silu(gate) * up` or an output head followed by
`F.cross_entropy` op by op: it keeps every intermediate and allocates a fresh tensor for
each step of the chain rule. On the CPU the allocations cost as much as the arithmetic
(each large one page-faults its memory in), so writing the gradients out with fewer,
in-place passes is measurably faster: about 2% (RMSNorm) and 3-5% (SwiGLU) of the
training step of `scripts/bench_cpu.py` (A/B in one process). `linear_cross_entropy`
also never holds the whole (tokens, vocab) logits. RoPE's own, `RotaryFunction`, lives
with the rest of RoPE in `llmstack/model/rope.py`.

Each takes the plain path when no gradient is needed (inference), and each is checked
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
            dweight = p.sum(tuple(range(p.dim() - 1))).to(weight.dtype) if ctx.needs_input_grad[1] else None
            dx = None
            if ctx.needs_input_grad[0]:
                w = weight.to(rstd.dtype)
                mean_g_xhat = (p @ w).unsqueeze(-1).div_(x.shape[-1])
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


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, chunk_size: int = 512) -> torch.Tensor:
    """sum over rows of cross_entropy(hidden @ weight.T, targets), float32, skipping targets
    equal to `ignore_index`: the output head and the loss in one, `chunk_size` rows at a
    time, so the (rows, vocab) logits never exist at once (chunk_size * vocab floats do).

    hidden (N, C), weight (vocab, C), targets (N,). On the CPU this makes a training step
    of the quickstart model 8-11% faster (A/B in one process; chunks of 512 rows beat 1024
    and 2048 there: 8 MB of logits stay in cache); on a GPU it is the memory: a Llama-3
    vocabulary's logits for 16k tokens would take 8 GB in float32."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, chunk_size)
    dtype = _matmul_dtype(hidden)
    loss = torch.zeros((), dtype=_float(dtype), device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        for start in range(0, hidden.shape[0], chunk_size):
            logits = (hidden[start:start + chunk_size].to(dtype) @ w.t()).to(loss.dtype)
            loss += F.cross_entropy(logits, targets[start:start + chunk_size], ignore_index=ignore_index,
                                    reduction="sum")
    return loss


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """What autocast would run a matmul of `t` in (switched off inside the functions here)."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def _float(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64


class LinearCrossEntropyFunction(torch.autograd.Function):
    """The loss is a sum, so its gradient is known before anyone asks for it: per chunk,
    d loss / d logits = softmax(logits) - onehot(target) (zero on ignored rows), and

        dhidden = dlogits @ weight        dweight = sum over chunks of dlogits.T @ hidden

    are computed in the forward pass, right after each chunk's loss, overwriting the
    chunk's logits with its softmax in place. The backward pass only scales them by the
    incoming gradient. Same matmuls as the unfused head + loss, in autocast's dtype when
    autocast is on; softmax, loss and dweight's sum in float32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_size: int):
        dtype = _matmul_dtype(hidden)
        dhidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dweight = torch.zeros(weight.shape, dtype=_float(dtype), device=weight.device) \
            if ctx.needs_input_grad[1] else None
        loss = torch.zeros((), dtype=_float(dtype), device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, hidden.shape[0], chunk_size):
                h, t = hidden[start:start + chunk_size].to(dtype), targets[start:start + chunk_size]
                logits = (h @ w.t()).to(loss.dtype)  # (n, vocab)
                lse = torch.logsumexp(logits, dim=-1)
                keep = t != ignore_index
                t = torch.where(keep, t, 0)
                loss += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * keep).sum()
                dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                dlogits[torch.arange(len(t), device=t.device), t] -= 1.0
                dlogits = dlogits.mul_(keep[:, None]).to(dtype)
                if dhidden is not None:
                    dhidden[start:start + chunk_size] = dlogits @ w
                if dweight is not None:
                    if dtype == dweight.dtype:
                        dweight.addmm_(dlogits.t(), h)
                    else:
                        dweight += (dlogits.t() @ h).to(dweight.dtype)
        ctx.save_for_backward(dhidden, dweight.to(weight.dtype) if dweight is not None else None)
        return loss

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        dhidden, dweight = ctx.saved_tensors
        return (dhidden * dloss.to(dhidden.dtype) if dhidden is not None else None,
                dweight * dloss.to(dweight.dtype) if dweight is not None else None, None, None, None)
