"""Vanishing and exploding gradients: the gradient's norm at every layer of a deep network, at init and after training.

A 30-layer ReLU network of width 64 learns a random teacher's 10-way classification, in
seven variants that differ only in initialisation, normalisation and residual connections:

    plain, Kaiming init        W ~ N(0, 2 / fan_in): each layer keeps the signal's scale
    plain, init x 0.8          each layer shrinks the backward signal by ~0.8: 0.8^30 ~ 1e-3
    plain, init x 1.25         ... or grows it by ~1.25: 1.25^30 ~ 800
    + BatchNorm / + LayerNorm  the x 0.8 network with a norm after every linear layer
                               (`llmstack.classic.norms`): the scale is reset at each layer
    residual                   h + W relu(h), W's std scaled by 1/sqrt(depth) (GPT-2's rule):
                               the identity path carries the gradient past every layer
    residual + LayerNorm       h + W relu(LN(h)): the pre-norm block of the Transformer

It records, on a fixed batch at init and after 1500 SGD steps (momentum 0.9, the same
learning rate for all, no clipping), the norm of the gradient that reaches each layer's
output h_l, ||dL/dh_l|| (the backward signal), and of each weight's, ||dL/dW_l||, with the
loss curves and the test accuracy, and draws the first and the loss.

The weight gradients hide the problem in a plain network: dL/dW_l = dL/dz_l h_{l-1}^T, and
with a uniform init multiplier the backward signal shrinks towards the input by as much as
the activations grow (or the reverse), so ||dL/dW_l|| is nearly flat across layers while
its scale is off by 0.8^30 everywhere. The backward signal shows where it is lost.

    python scripts/experiments/gradients.py          # about a minute
    python scripts/experiments/gradients.py --quick
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import common
from llmstack.classic.norms import BatchNorm, LayerNorm

VARIANTS = {  # name: (init multiplier on Kaiming's std, norm, residual)
    "plain, Kaiming init": (1.0, None, False),
    "plain, init x 0.8": (0.8, None, False),
    "plain, init x 1.25": (1.25, None, False),
    "init x 0.8 + BatchNorm": (0.8, "batch", False),
    "init x 0.8 + LayerNorm": (0.8, "layer", False),
    "residual": (1.0, None, True),
    "residual + LayerNorm (pre-norm)": (1.0, "layer", True),
}


class DeepNet(nn.Module):
    def __init__(self, n_in: int, width: int, depth: int, n_out: int, *, init: float, norm, residual: bool):
        super().__init__()
        self.residual = residual
        self.inp = nn.Linear(n_in, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        make = {"batch": BatchNorm, "layer": LayerNorm, None: None}[norm]
        self.norms = nn.ModuleList(make(width) for _ in range(depth)) if make else None
        self.out = nn.Linear(width, n_out)
        std = init * math.sqrt(2 / width)  # Kaiming for ReLU, times the variant's multiplier
        if residual:
            std /= math.sqrt(depth)  # each branch adds a little, so the sum of depth branches stays O(1)
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.normal_(0, std)
                layer.bias.zero_()

    def forward(self, x, keep: list | None = None):
        """Logits; each layer's output h_l is appended to `keep` when given."""
        h = F.relu(self.inp(x))
        for i, layer in enumerate(self.layers):
            norm = self.norms[i] if self.norms is not None else None
            if self.residual:  # pre-norm: the branch reads a normalised copy, the stream is never normalised
                h = h + layer(F.relu(norm(h) if norm is not None else h))
            else:  # post-linear norm, before the non-linearity (Ioffe & Szegedy's placement)
                z = layer(h)
                h = F.relu(norm(z) if norm is not None else z)
            if keep is not None:
                h.retain_grad()
                keep.append(h)
        return self.out(h)


def layer_grad_norms(model: DeepNet, x, y) -> tuple[list[float], list[float]]:
    """(||dL/dh_l||, ||dL/dW_l||) for every layer, on one batch."""
    model.zero_grad()
    hs: list[torch.Tensor] = []
    F.cross_entropy(model(x, hs), y).backward()
    return [h.grad.norm().item() for h in hs], [layer.weight.grad.norm().item() for layer in model.layers]


def main() -> None:
    args = common.parser(__doc__, "gradients").parse_args()
    out = common.start(args)
    started = time.perf_counter()
    depth, width, steps, n_in, n_classes = 30, 64, 1500, 16, 10
    if args.quick:
        depth, steps = 12, 60
    g = torch.Generator().manual_seed(args.seed)
    teacher = [torch.randn(n_in, 64, generator=g), torch.randn(64, n_classes, generator=g)]
    x_all = torch.randn(8192 + 2048, n_in, generator=g)
    y_all = (torch.tanh(x_all @ teacher[0]) @ teacher[1]).argmax(-1)
    x_train, y_train, x_test, y_test = x_all[:8192], y_all[:8192], x_all[8192:], y_all[8192:]
    probe = slice(0, 512)  # the fixed batch the gradients are measured on

    results = {"depth": depth, "width": width, "steps": steps, "optimizer": "SGD momentum 0.9, lr 0.01, no clipping",
               "variants": {}, "quick": args.quick}
    for name, (init, norm, residual) in VARIANTS.items():
        torch.manual_seed(args.seed)
        model = DeepNet(n_in, width, depth, n_classes, init=init, norm=norm, residual=residual)
        at_init, weights_init = layer_grad_norms(model, x_train[probe], y_train[probe])
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        batch_rng = np.random.default_rng(args.seed)

        def loss_fn(step):
            idx = torch.from_numpy(batch_rng.integers(0, len(x_train), 128))
            return F.cross_entropy(model(x_train[idx]), y_train[idx])

        losses = common.fit(model, loss_fn, steps, [opt], lr=0.01, clip=0.0, min_lr_ratio=1.0)
        model.train()  # measure as at init (BatchNorm on batch statistics)
        trained, weights_trained = layer_grad_norms(model, x_train[probe], y_train[probe])
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
        diverged = not math.isfinite(losses[-1])
        results["variants"][name] = {
            "grad_norm_init": at_init, "grad_norm_trained": trained, "weight_grad_norm_init": weights_init,
            "weight_grad_norm_trained": weights_trained, "losses": losses[::10],
            "first_to_last_ratio_init": at_init[0] / at_init[-1], "final_loss": float(np.mean(losses[-50:])),
            "test_accuracy": accuracy, "diverged": diverged}
        print(f"{name:<34} ||dL/dh_1|| / ||dL/dh_{depth}|| at init {at_init[0] / at_init[-1]:9.3g}; "
              f"final loss {results['variants'][name]['final_loss']:.3f}, test accuracy {accuracy:.1%}"
              + (" (diverged)" if diverged else ""))

    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    layers = np.arange(1, depth + 1)
    for i, (name, r) in enumerate(results["variants"].items()):
        style = dict(color=f"C{i}", lw=1.4, label=name)
        axes[0].plot(layers, r["grad_norm_init"], **style)
        axes[1].plot(layers, r["grad_norm_trained"], **style)
        axes[2].plot(np.arange(len(r["losses"])) * 10, r["losses"], **style)
    axes[0].set(yscale="log", xlabel="layer l (1 = nearest the input)", ylabel="||dL/dh_l||",
                title="gradient reaching each layer, at initialisation")
    axes[1].set(yscale="log", xlabel="layer l (1 = nearest the input)", ylabel="||dL/dh_l||",
                title=f"... after {steps} SGD steps")
    axes[2].set(xlabel="step", ylabel="training loss (cross-entropy)", ylim=(0, 2.6),
                title="training loss (a run that diverged ends)")
    axes[0].legend(fontsize=7)
    common.save_figure(fig, out / "gradients.png")
    common.write_results(out, results, started)


if __name__ == "__main__":
    main()
