"""Optimizers written out, one update rule each, to compare against `torch.optim`.

Each is a plain `torch.optim.Optimizer`, so it plugs into the same loops, and
each `step` is the textbook formula for one parameter tensor:

    SGD:        p -= lr * g
    Momentum:   v = mu * v + g;  p -= lr * v                 (nesterov: p -= lr * (g + mu * v))
    Adam:       m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
                p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
    AdamW:      Adam, with the weight decay applied to the weights directly
                (p -= lr * wd * p) instead of being added to the gradient, so it
                is not rescaled by Adam's per-parameter step size.
    Muon:       for weight matrices: momentum, then the update's matrix replaced by
                its nearest orthogonal one (U V^T of its SVD, approximated by five
                Newton-Schulz iterations), so every direction moves at the same rate.
"""
from __future__ import annotations

import math

import torch


class SGD(torch.optim.Optimizer):
    """Mini-batch stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay."""

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad + wd * p if wd else p.grad
                if mu:
                    state = self.state[p]
                    if "velocity" not in state:
                        state["velocity"] = g.clone()  # the first step has no history to decay
                    else:
                        state["velocity"].mul_(mu).add_(g)
                    v = state["velocity"]
                    g = g + mu * v if group["nesterov"] else v
                p.add_(g, alpha=-lr)
        return loss


class Adam(torch.optim.Optimizer):
    """Adam; with `decoupled=True` it is AdamW (use the `AdamW` class)."""

    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd and self.decoupled:
                    p.mul_(1 - lr * wd)  # AdamW: shrink the weights themselves
                elif wd:
                    g = g + wd * p  # Adam: L2 penalty folded into the gradient
                state = self.state[p]
                if not state:
                    state["t"], state["m"], state["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                state["t"] += 1
                t, m, v = state["t"], state["m"], state["v"]
                m.mul_(b1).add_(g, alpha=1 - b1)  # first moment: a running mean of gradients
                v.mul_(b2).addcmul_(g, g, value=1 - b2)  # second moment: running mean of squares
                m_hat = m / (1 - b1**t)  # both start at zero: undo that bias
                v_hat = v / (1 - b2**t)
                p.addcdiv_(m_hat, v_hat.sqrt().add_(eps), value=-lr)
        return loss


class AdamW(Adam):
    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
                  eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An approximation of U V^T for g = U S V^T (a matrix with every singular value near 1):
    X <- a X + (b X X^T + c (X X^T)^2) X, from X = g / ||g|| (so all singular values are <= 1).
    The quintic's coefficients push small singular values up fast rather than converging
    exactly: the result has them in roughly [0.7, 1.2], which trains as well (Jordan et al.
    2024). Run in bfloat16, as torch and the reference do: it is only an approximation."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.shape[0] > g.shape[1]
    if tall:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b X X^T + c (X X^T)^2, one rounding as torch's
        x = torch.addmm(x, poly, x, beta=a)  # a X + poly X
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (MomentUm Orthogonalized by Newton-schulz; Jordan et al. 2024) for 2-D weights, as
    `torch.optim.Muon`: Nesterov momentum, the update orthogonalised by `newton_schulz`, its
    step scaled by sqrt(max(1, rows / cols)), and decoupled weight decay. Embeddings, norms
    and biases go to another optimizer (AdamW)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon updates matrices only; got a parameter of shape {tuple(p.shape)} "
                                     "(give embeddings, norms and biases to AdamW)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                buf = state["momentum"]
                buf.lerp_(p.grad, 1 - mu)  # buf = mu * buf + (1 - mu) * g
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_steps"])
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.shape[0] / p.shape[1])))
        return loss
