"""Optimizers on the same small language model: SGD, momentum, Adam, Adam with L2, AdamW and Muon.

Every run trains the same Transformer (2 layers, width 64, from the same initial weights, on the
same batches of the standard library) for 300 steps with warmup, cosine decay and gradient
clipping; only the update rule differs, each from `llmstack.classic.optim` (tested equal to
torch.optim). Each optimizer gets three or four learning rates and is drawn at its best; every run's
final validation loss is in results.json.

    SGD           the raw gradient: a step size that suits one direction is wrong for others
    momentum      a running sum of gradients: consistent directions speed up, noise averages out
    Adam          each parameter's step divided by its gradient's running RMS
    Adam + L2     weight decay folded into the gradient, which Adam then rescales (0.1)
    AdamW         decay applied to the weights directly (0.1), what the trainer uses
    Muon          momentum, then each matrix's update orthogonalised (Newton-Schulz); embeddings
                  and norms stay with AdamW

    python scripts/experiments/optimizers.py          # about 4 minutes
    python scripts/experiments/optimizers.py --quick
"""
from __future__ import annotations

import time

import numpy as np
import torch

import common
from llmstack.classic.optim import SGD, Adam, AdamW, Muon
from llmstack.model import ModelConfig, build_model
from llmstack.train import param_groups

SEQ, BATCH = 64, 16


def make_optimizers(name: str, model: torch.nn.Module, lr: float) -> list[torch.optim.Optimizer]:
    if name == "SGD":
        return [SGD(model.parameters(), lr=lr)]
    if name == "momentum":
        return [SGD(model.parameters(), lr=lr, momentum=0.9)]
    if name == "Adam":
        return [Adam(model.parameters(), lr=lr, betas=(0.9, 0.95))]
    if name == "Adam + L2":
        return [Adam(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))]
    if name == "AdamW":
        return [AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))]
    if name == "Muon":  # hidden matrices to Muon; the embedding (also the tied head) and norms to AdamW
        embed = model.embed.weight
        matrices = [p for p in model.parameters() if p.dim() == 2 and p is not embed]
        rest = [p for p in model.parameters() if p.dim() != 2 or p is embed]
        return [Muon(matrices, lr=lr, weight_decay=0.1), AdamW(rest, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)]
    raise ValueError(name)


# Steps of about 3x around each rule's usual value, widened where the best was at an end (Adam + L2's
# still is at 3e-2: its loss is an upper bound).
LEARNING_RATES = {"SGD": [0.3, 1.0, 3.0, 10.0], "momentum": [0.03, 0.1, 0.3], "Adam": [1e-3, 3e-3, 1e-2],
                  "Adam + L2": [1e-3, 3e-3, 1e-2, 3e-2], "AdamW": [1e-3, 3e-3, 1e-2],
                  "Muon": [0.005, 0.01, 0.02, 0.05]}


def main() -> None:
    args = common.parser(__doc__, "optimizers").parse_args()
    out = common.start(args)
    started = time.perf_counter()
    train, val, tok = common.lm_tokens(args.quick)
    steps, eval_batches = 300, 16
    rates = LEARNING_RATES
    if args.quick:
        steps, eval_batches = 15, 2
        rates = {k: v[1:2] for k, v in LEARNING_RATES.items()}
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, max_seq_len=SEQ, tie_embeddings=True)
    torch.manual_seed(args.seed)
    initial = build_model(cfg)
    initial.init_weights()
    batches = common.lm_batches(train, BATCH, SEQ, args.seed)
    results = {"steps": steps, "model": {"dim": 64, "n_layers": 2, "params": initial.num_params()},
               "optimizers": {}, "quick": args.quick}
    for name, lrs in rates.items():
        runs = []
        for lr in lrs:
            model = build_model(cfg)
            model.load_state_dict(initial.state_dict())  # the same start for every run

            def loss_fn(step):
                x, y = batches.get_batch(step)
                return model(x, targets=y) / y.numel()

            losses = common.fit(model, loss_fn, steps, make_optimizers(name, model, lr), lr=lr, warmup=steps // 10)
            diverged = not np.isfinite(losses[-1])
            val_loss = float("nan") if diverged else common.lm_val_loss(model, val, SEQ, eval_batches)
            runs.append({"lr": lr, "val_loss": val_loss, "losses": losses, "diverged": diverged})
            print(f"{name:<10} lr {lr:<6g} val loss {val_loss:.3f}")
        best = min(runs, key=lambda r: r["val_loss"] if np.isfinite(r["val_loss"]) else np.inf)
        results["optimizers"][name] = {"best_lr": best["lr"], "best_val_loss": best["val_loss"],
                                       "runs": [{k: v for k, v in r.items() if k != "losses"} for r in runs],
                                       "losses": best["losses"]}

    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    window = max(1, steps // 30)
    for i, (name, r) in enumerate(results["optimizers"].items()):
        curve = np.convolve(r["losses"], np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(curve)) + window // 2, curve, color=f"C{i}",
                label=f"{name} (lr {r['best_lr']:g}): val {r['best_val_loss']:.3f}")
    ax.set(xlabel="step", ylabel=f"training loss (mean of {window} steps)", ylim=(None, 7.5),
           title="One small LM, six optimizers (each at its best learning rate)")
    ax.legend(fontsize=8)
    common.save_figure(fig, out / "optimizers.png")
    common.write_results(out, results, started)


if __name__ == "__main__":
    main()
