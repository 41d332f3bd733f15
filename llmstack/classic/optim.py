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
"""
from __future__ import annotations

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
