"""Scaling laws on a CPU: validation loss of 8 model sizes x 3 token budgets, and L(N, D) fitted to them.

Trains decoder-only Transformers (the quickstart's family: RoPE, RMSNorm, SwiGLU) from 4k to
1.3M non-embedding parameters N, each on D = 100k, 200k and 400k tokens of the standard library,
with the same loop (AdamW, warmup + cosine, peak learning rate falling with width), and fits Chinchilla's form

    L(N, D) = E + A / N^alpha + B / D^beta

by least squares (for fixed exponents the rest is linear; the exponents by a grid, then a
finer grid around the best). The exponents' uncertainty: the fit repeated on 1000 bootstrap
resamples of the runs. Compute-optimal sizes follow from the fit: minimising L at fixed
compute C = 6 N D gives N_opt ~ C^(beta / (alpha + beta)), and D_opt / N_opt tokens per parameter.

    python scripts/experiments/scaling_laws.py            # about 6 minutes on one thread
    python scripts/experiments/scaling_laws.py --quick
"""
from __future__ import annotations

import time

import numpy as np
import torch

import common
from llmstack.model import ModelConfig, build_model
from llmstack.train import build_optimizer

SIZES = [(16, 1), (24, 1), (32, 2), (48, 2), (64, 2), (96, 3), (128, 3), (160, 4)]  # (dim, layers)
BUDGETS = [100_000, 200_000, 400_000]  # training tokens
SEQ, BATCH = 64, 8  # small batches: more steps per token, which these short runs need most
CHINCHILLA = {"alpha": 0.34, "beta": 0.28, "tokens_per_param": 20}  # Hoffmann et al. 2022, approach 3 / rule of thumb


def peak_lr(dim: int) -> float:
    """1e-2 at width 16, falling as 1/sqrt(width): narrow models take (and need) larger steps."""
    return 1e-2 * (16 / dim) ** 0.5


def train_one(dim: int, layers: int, tokens: int, train, val, vocab: int, seed: int, eval_batches: int) -> dict:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=max(1, dim // 16), max_seq_len=SEQ,
                      tie_embeddings=True)
    model = build_model(cfg)
    model.init_weights()
    steps = max(1, tokens // (SEQ * BATCH))
    batches = common.lm_batches(train, BATCH, SEQ, seed)
    lr = peak_lr(dim)
    opt = build_optimizer(model, lr=lr, weight_decay=0.1, betas=(0.9, 0.95))

    def loss_fn(step):
        x, y = batches.get_batch(step)
        return model(x, targets=y) / y.numel()

    t0 = time.perf_counter()
    losses = common.fit(model, loss_fn, steps, [opt], lr=lr, warmup=max(1, steps // 10))
    return {"dim": dim, "layers": layers, "lr": lr, "N": model.num_params(exclude_embeddings=True), "D": steps * SEQ * BATCH,
            "train_loss": float(np.mean(losses[-5:])), "val_loss": common.lm_val_loss(model, val, SEQ, eval_batches),
            "seconds": round(time.perf_counter() - t0, 1)}


def fit_law(N: np.ndarray, D: np.ndarray, L: np.ndarray) -> dict:
    """Least-squares E, A, B >= 0 and exponents: a coarse grid over (alpha, beta) in [0.02, 1.5]^2,
    then a grid 20x finer around the best. For each (alpha, beta) the model is linear in
    (E, A, B), solved in closed form for all grid points at once."""
    # N and D divided by their geometric means, so the three columns have similar scales.
    n0, d0 = np.exp(np.log(N).mean()), np.exp(np.log(D).mean())

    def solve(alphas, betas):
        a, b = np.meshgrid(alphas, betas, indexing="ij")
        a, b = a.ravel(), b.ravel()  # (G,) grid points
        X = np.stack([np.ones((len(a), len(N))), (N / n0)[None, :] ** -a[:, None],
                      (D / d0)[None, :] ** -b[:, None]], axis=-1)  # (G, runs, 3)
        Xt = X.transpose(0, 2, 1)
        coef = np.linalg.solve(Xt @ X + 1e-12 * np.eye(3), (Xt @ L)[..., None])[..., 0]  # (G, 3): E, A', B'
        sse = (((X @ coef[..., None])[..., 0] - L) ** 2).sum(-1)
        sse[(coef < 0).any(-1)] = np.inf  # a negative term is not a law
        best = int(np.argmin(sse))
        return a[best], b[best], coef[best], sse[best]

    alpha, beta, _, _ = solve(np.linspace(0.02, 1.5, 75), np.linspace(0.02, 1.5, 75))
    step = 1.48 / 74
    alpha, beta, (E, A, B), sse = solve(np.linspace(max(0.005, alpha - step), alpha + step, 41),
                                        np.linspace(max(0.005, beta - step), beta + step, 41))
    return {"E": float(E), "A": float(A * n0**alpha), "B": float(B * d0**beta), "alpha": float(alpha),
            "beta": float(beta), "rmse": float(np.sqrt(sse / len(L)))}


def predict(law: dict, N, D):
    return law["E"] + law["A"] / np.asarray(N, float) ** law["alpha"] + law["B"] / np.asarray(D, float) ** law["beta"]


def compute_optimal(law: dict, C: float) -> tuple[float, float]:
    """(N_opt, D_opt) minimising L(N, D) at C = 6 N D: d/dN [A N^-a + B (C / 6N)^-b] = 0."""
    a, b = law["alpha"], law["beta"]
    G = (a * law["A"] / (b * law["B"])) ** (1 / (a + b))
    n = G * (C / 6) ** (b / (a + b))
    return n, C / 6 / n


def main() -> None:
    args = common.parser(__doc__, "scaling_laws").parse_args()
    out = common.start(args)
    started = time.perf_counter()
    train, val, tok = common.lm_tokens(args.quick)
    sizes, budgets, eval_batches, n_boot = SIZES, BUDGETS, 8, 1000
    if args.quick:
        sizes, budgets, eval_batches, n_boot = SIZES[:4], [8_192, 16_384, 32_768], 2, 100
    runs = []
    for dim, layers in sizes:
        for tokens in budgets:
            run = train_one(dim, layers, tokens, train, val, tok.vocab_size, args.seed, eval_batches)
            runs.append(run)
            print(f"N={run['N']:>9,} D={run['D']:>9,}: val loss {run['val_loss']:.3f} ({run['seconds']} s)")
    N = np.array([r["N"] for r in runs], float)
    D = np.array([r["D"] for r in runs], float)
    L = np.array([r["val_loss"] for r in runs])
    law = fit_law(N, D, L)
    rng = np.random.default_rng(args.seed)
    boot = [fit_law(N[idx], D[idx], L[idx]) for idx in (rng.integers(0, len(runs), len(runs)) for _ in range(n_boot))]
    compute = [1e10, 1e11, 1e12]

    def summary(values) -> dict:
        values = np.asarray(values, float)
        lo, hi = np.percentile(values, [2.5, 97.5])
        return {"mean": float(values.mean()), "std": float(values.std()), "ci95": [float(lo), float(hi)]}

    uncertainty = {key: summary([b[key] for b in boot]) for key in ("alpha", "beta", "E")}
    uncertainty["n_opt_exponent"] = summary([b["beta"] / (b["alpha"] + b["beta"]) for b in boot])
    optimal = []
    for C in compute:
        n, d = compute_optimal(law, C)
        ratios = [np.divide(*compute_optimal(b, C)[::-1]) for b in boot]
        optimal.append({"compute": C, "N_opt": n, "D_opt": d, "tokens_per_param": d / n,
                        "tokens_per_param_bootstrap": summary(ratios)})
    results = {"runs": runs, "fit": law, "bootstrap": {"resamples": n_boot, **uncertainty},
               "compute_optimal": optimal, "chinchilla": CHINCHILLA, "quick": args.quick,
               "setup": {"seq_len": SEQ, "batch_size": BATCH, "lr": "1e-2 * sqrt(16 / dim)", "vocab_size": tok.vocab_size,
                         "N": "non-embedding parameters", "D": "training tokens"}}
    print(f"fit: L = {law['E']:.3f} + {law['A']:.3g}/N^{law['alpha']:.3f} + {law['B']:.3g}/D^{law['beta']:.3f} "
          f"(rmse {law['rmse']:.4f})")
    for key in ("alpha", "beta"):
        u = uncertainty[key]
        print(f"  {key} = {law[key]:.3f}, bootstrap {u['mean']:.3f} +- {u['std']:.3f} (95% {u['ci95'][0]:.3f}-"
              f"{u['ci95'][1]:.3f}); Chinchilla {CHINCHILLA[key]}")
    for o in optimal:
        b = o["tokens_per_param_bootstrap"]
        print(f"  C = {o['compute']:.0e}: N_opt {o['N_opt']:,.0f}, D_opt {o['D_opt']:,.0f}, {o['tokens_per_param']:.1f} "
              f"tokens/param (95% {b['ci95'][0]:.1f}-{b['ci95'][1]:.1f}); Chinchilla ~{CHINCHILLA['tokens_per_param']}")

    plt = common.pyplot()
    fig, (ax, res) = plt.subplots(1, 2, figsize=(11, 4.2))
    grid = np.geomspace(N.min() * 0.8, N.max() * 1.25, 100)
    for i, tokens in enumerate(sorted(set(D))):
        sel = D == tokens
        color = f"C{i}"
        ax.scatter(N[sel], L[sel], color=color, label=f"D = {tokens / 1e3:.0f}k tokens")
        ax.plot(grid, predict(law, grid, tokens), color=color, lw=1)
        res.scatter(N[sel], L[sel] - predict(law, N[sel], tokens), color=color)
    ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss (nats/token)",
           title=f"L = {law['E']:.2f} + {law['A']:.3g}/N^{law['alpha']:.2f} + {law['B']:.3g}/D^{law['beta']:.2f}")
    ax.legend(fontsize=8)
    u = uncertainty
    res.axhline(0, color="k", lw=0.8)
    res.set(xscale="log", xlabel="non-embedding parameters N", ylabel="observed - fitted (nats/token)",
            title=f"residuals; bootstrap alpha {u['alpha']['mean']:.2f}+-{u['alpha']['std']:.2f}, "
                  f"beta {u['beta']['mean']:.2f}+-{u['beta']['std']:.2f}")
    common.save_figure(fig, out / "scaling_laws.png")
    common.write_results(out, results, started)


if __name__ == "__main__":
    main()
