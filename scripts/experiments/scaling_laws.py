"""Scaling laws on a CPU: validation loss of 8 model sizes x 5 token budgets, L(N, D) fitted to them,
and the compute-optimal size read off IsoFLOP profiles.

Trains decoder-only Transformers (the quickstart's family: RoPE, RMSNorm, SwiGLU) from 1.8k to
107k non-embedding parameters N, each on D = 100k, 200k, 400k, 800k and 1.6M tokens of the
standard library (a factor of 16), with the same loop (AdamW, peak learning rate falling with
width) and a warmup-stable-decay schedule: warmup, a constant learning rate, then a linear
decay to zero over the last 20% of the run. Such a schedule matches a cosine one of the same
length (Hagele et al. 2024), and it lets the five budgets of one size share their constant
phase: the run for budget D branches off the shared one at 0.8 D and decays on its own copy of
the model and optimizer, on the same batches a separate run would see, so each result equals
a separate run of that length, and the five cost 1.9M tokens of training instead of 3.1M.

Two readings of the same 40 runs:
- approach 3 of Chinchilla (Hoffmann et al. 2022): L(N, D) = E + A / N^alpha + B / D^beta by least
  squares (for fixed exponents the rest is linear; the exponents by a grid, then a finer grid
  around the best), its uncertainty from the fit repeated on 1000 bootstrap resamples of the
  runs. Minimising L at fixed compute C = 6 N D gives N_opt ~ C^(beta / (alpha + beta)).
- approach 2 (IsoFLOP profiles): at each of several compute budgets C inside the measured grid,
  each size's loss at D = C / 6N (interpolated in log D between its measured budgets, never
  extrapolated), a parabola in log N through them, and its minimum N_opt(C); tokens per parameter
  D_opt / N_opt = C / 6 N_opt^2. Its uncertainty: the same on 1000 bootstrap resamples of the
  model sizes (each drawn with all its budgets).

    python scripts/experiments/scaling_laws.py            # about 6 minutes on one thread
    python scripts/experiments/scaling_laws.py --quick
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch

import common
from llmstack.model import ModelConfig, build_model
from llmstack.train import build_optimizer, lr_multiplier

# Small models and long runs: on this CPU's budget the compute-optimal models are tiny (a first sweep
# of 4k-332k parameters on 50k-800k tokens found the smallest model best at every compute budget).
SIZES = [(8, 1), (12, 1), (16, 1), (24, 1), (32, 1), (32, 2), (48, 2), (64, 2)]  # (dim, layers)
BUDGETS = [100_000, 200_000, 400_000, 800_000, 1_600_000]  # training tokens
SEQ, BATCH = 64, 8  # small batches: more steps per token, which these short runs need most
WARMUP = 20  # steps, shared by every budget of a size (a tenth of the shortest run's)
DECAY = 0.2  # the last fifth of each run decays linearly to zero
ISOFLOPS = [1e10, 1.8e10, 3.3e10, 6e10]  # C = 6 N D inside the grid: each meets at least 4 sizes
CHINCHILLA = {"alpha": 0.34, "beta": 0.28, "tokens_per_param": 20, "n_opt_exponent": 0.46,
              "n_opt_exponent_isoflop": 0.49}  # Hoffmann et al. 2022: approach 3, rule of thumb, approach 3, approach 2


def peak_lr(dim: int) -> float:
    """1e-2 at width 16, falling as 1/sqrt(width): narrow models take (and need) larger steps."""
    return 1e-2 * (16 / dim) ** 0.5


def train_size(dim: int, layers: int, budgets: list[int], train, val, vocab: int, seed: int,
               eval_batches: int) -> list[dict]:
    """One model size at every budget: a constant-rate trunk, and for each budget a branch that
    decays from 0.8 of its steps to its end. Returns one run per budget."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=max(1, dim // 16), max_seq_len=SEQ,
                      tie_embeddings=True)
    model = build_model(cfg)
    model.init_weights()
    lr = peak_lr(dim)
    opt = build_optimizer(model, lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    batches = common.lm_batches(train, BATCH, SEQ, seed)
    all_steps = [max(2, tokens // (SEQ * BATCH)) for tokens in budgets]
    branch_at = [steps - int(DECAY * steps) for steps in all_steps]
    n_params = model.num_params(exclude_embeddings=True)
    t0 = time.perf_counter()

    def step(m, o, i, factor):
        for group in o.param_groups:
            group["lr"] = lr * factor
        x, y = batches.get_batch(i)
        loss = m(x, targets=y) / y.numel()
        o.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        o.step()
        return loss.item()

    runs, done = [], 0
    model.train()
    for steps, start, tokens in sorted(zip(all_steps, branch_at, budgets)):
        while done < start:  # the shared trunk: warmup, then the constant rate
            step(model, opt, done, lr_multiplier(done, schedule="constant", max_steps=steps, warmup_steps=WARMUP))
            done += 1
        branch, branch_opt = copy.deepcopy((model, opt))  # the optimizer's state follows its parameters
        t_branch = time.perf_counter()
        losses = [step(branch, branch_opt, i, lr_multiplier(i, schedule="wsd", max_steps=steps, warmup_steps=WARMUP,
                                                             min_lr_ratio=0.0, decay_fraction=DECAY))
                  for i in range(start, steps)]
        branch.eval()
        runs.append({"dim": dim, "layers": layers, "lr": lr, "N": n_params, "D": steps * SEQ * BATCH,
                     "steps": steps, "train_loss": float(np.mean(losses[-5:])),
                     "val_loss": common.lm_val_loss(branch, val, SEQ, eval_batches),
                     "decay_seconds": round(time.perf_counter() - t_branch, 1)})
    runs[-1]["size_seconds"] = round(time.perf_counter() - t0, 1)
    return runs


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


def isoflop_profile(N: np.ndarray, D: np.ndarray, L: np.ndarray, C: float) -> dict:
    """Each size's loss at D = C / 6N, interpolated linearly in log D between its measured budgets
    (sizes whose budgets do not reach C / 6N are left out), and the parabola in log N through
    them: its minimum is N_opt(C). `n_opt` is None when the parabola opens downward or its
    minimum lies outside the sizes measured (the optimum is not bracketed)."""
    sizes, losses = [], []
    for n in np.unique(N):
        sel = N == n
        d, l = D[sel], L[sel]
        order = np.argsort(d)
        d, l = d[order], l[order]
        target = C / (6 * n)
        if d[0] <= target <= d[-1]:
            sizes.append(n)
            losses.append(float(np.interp(np.log(target), np.log(d), l)))
    out = {"compute": C, "N": [float(n) for n in sizes], "loss": losses, "n_opt": None}
    if len(sizes) < 3:
        return out
    x = np.log(sizes)
    c2, c1, c0 = np.polyfit(x, losses, 2)
    out["parabola"] = [float(c2), float(c1), float(c0)]
    if c2 <= 0:
        return out
    vertex = -c1 / (2 * c2)
    if x.min() <= vertex <= x.max():
        n_opt = float(np.exp(vertex))
        out.update(n_opt=n_opt, d_opt=C / (6 * n_opt), tokens_per_param=C / (6 * n_opt**2),
                   loss_opt=float(c0 - c1**2 / (4 * c2)))
    return out


def summary(values) -> dict:
    values = np.asarray(values, float)
    lo, hi = np.percentile(values, [2.5, 97.5])
    with np.errstate(over="ignore"):  # an extrapolated ratio can be astronomically large: its std is then inf
        return {"mean": float(values.mean()), "std": float(values.std()), "ci95": [float(lo), float(hi)]}


def isoflop_exponent(profiles: list[dict]) -> float | None:
    """a in N_opt ~ C^a, by least squares in log-log over the budgets whose optimum is bracketed."""
    pts = [(p["compute"], p["n_opt"]) for p in profiles if p["n_opt"]]
    if len(pts) < 2:
        return None
    c, n = np.log(np.array(pts)).T
    return float(np.polyfit(c, n, 1)[0])


def plot(results: dict, path) -> None:
    """The runs and the fitted law; the IsoFLOP profiles; the residuals."""
    from matplotlib.ticker import NullFormatter

    law, profiles, uncertainty = results["fit"], results["isoflop"]["profiles"], results["bootstrap"]
    N = np.array([r["N"] for r in results["runs"]], float)
    D = np.array([r["D"] for r in results["runs"]], float)
    L = np.array([r["val_loss"] for r in results["runs"]])
    plt = common.pyplot()
    fig, (ax, iso, res) = plt.subplots(1, 3, figsize=(16, 4.4))
    grid = np.geomspace(N.min() * 0.8, N.max() * 1.25, 100)
    for i, tokens in enumerate(sorted(set(D))):
        sel = D == tokens
        color = f"C{i}"
        ax.scatter(N[sel], L[sel], color=color, s=14, label=f"D = {tokens / 1e3:.0f}k tokens")
        ax.plot(grid, predict(law, grid, tokens), color=color, lw=1)
        res.scatter(N[sel], L[sel] - predict(law, N[sel], tokens), color=color, s=14)
    ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss (nats/token)",
           title=f"L = {law['E']:.2f} + {law['A']:.3g}/N^{law['alpha']:.2f} + {law['B']:.3g}/D^{law['beta']:.2f}")
    ax.legend(fontsize=8)
    for i, p in enumerate(profiles):
        if not p["N"]:
            continue
        color = f"C{i}"
        iso.scatter(p["N"], p["loss"], color=color, s=14, label=f"C = {p['compute']:.1e}")
        if "parabola" in p:
            x = np.linspace(np.log(min(p["N"])), np.log(max(p["N"])), 50)
            iso.plot(np.exp(x), np.polyval(p["parabola"], x), color=color, lw=1)
        if p["n_opt"]:
            iso.scatter([p["n_opt"]], [p["loss_opt"]], color=color, marker="*", s=120, edgecolor="k", zorder=3)
    iso.set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss at D = C / 6N",
            title="IsoFLOP profiles (Chinchilla's approach 2); * = N_opt(C)")
    iso.legend(fontsize=8)
    u = uncertainty
    res.axhline(0, color="k", lw=0.8)
    res.set(xscale="log", xlabel="non-embedding parameters N", ylabel="observed - fitted (nats/token)",
            title=f"residuals; bootstrap alpha {u['alpha']['mean']:.2f}+-{u['alpha']['std']:.2f}, "
                  f"beta {u['beta']['mean']:.2f}+-{u['beta']['std']:.2f}")
    iso.xaxis.set_minor_formatter(NullFormatter())
    common.save_figure(fig, path)


def main() -> None:
    args = common.parser(__doc__, "scaling_laws").parse_args()
    out = common.start(args)
    started = time.perf_counter()
    train, val, tok = common.lm_tokens(args.quick)
    sizes, budgets, isoflops, eval_batches, n_boot = SIZES, BUDGETS, ISOFLOPS, 32, 1000
    if args.quick:
        sizes, budgets, eval_batches, n_boot = SIZES[:4], [4_096, 8_192, 16_384, 32_768], 2, 100
        isoflops = [6 * 3_000 * 16_384]
    runs = []
    for dim, layers in sizes:
        for run in train_size(dim, layers, budgets, train, val, tok.vocab_size, args.seed, eval_batches):
            runs.append(run)
            print(f"N={run['N']:>9,} D={run['D']:>9,}: val loss {run['val_loss']:.3f}")
        print(f"  size done in {run['size_seconds']} s")
    N = np.array([r["N"] for r in runs], float)
    D = np.array([r["D"] for r in runs], float)
    L = np.array([r["val_loss"] for r in runs])

    # approach 3: the parametric law, and the runs resampled
    law = fit_law(N, D, L)
    rng = np.random.default_rng(args.seed)
    boot = [fit_law(N[idx], D[idx], L[idx]) for idx in (rng.integers(0, len(runs), len(runs)) for _ in range(n_boot))]
    uncertainty = {key: summary([b[key] for b in boot]) for key in ("alpha", "beta", "E", "A", "B")}
    uncertainty["n_opt_exponent"] = summary([b["beta"] / (b["alpha"] + b["beta"]) for b in boot])
    optimal = []
    for C in isoflops:
        n, d = compute_optimal(law, C)
        ratios = [np.divide(*compute_optimal(b, C)[::-1]) for b in boot]
        optimal.append({"compute": C, "N_opt": n, "D_opt": d, "tokens_per_param": d / n,
                        "tokens_per_param_bootstrap": summary(ratios)})

    # approach 2: IsoFLOP profiles, and the model sizes resampled
    profiles = [isoflop_profile(N, D, L, C) for C in isoflops]
    unique_n = np.unique(N)
    iso_boot = {C: [] for C in isoflops}
    iso_exp, unbracketed = [], 0
    for _ in range(n_boot):
        pick = rng.choice(unique_n, len(unique_n))
        idx = np.concatenate([np.flatnonzero(N == n) for n in pick])
        boot_profiles = [isoflop_profile(N[idx], D[idx], L[idx], C) for C in isoflops]
        for p in boot_profiles:
            if p["n_opt"]:
                iso_boot[p["compute"]].append(p["tokens_per_param"])
            else:
                unbracketed += 1
        e = isoflop_exponent(boot_profiles)
        if e is not None:
            iso_exp.append(e)
    for p in profiles:
        got = iso_boot[p["compute"]]
        p["bootstrap"] = {"bracketed": len(got), **(summary(got) if got else {})}
    isoflop = {"profiles": profiles, "n_opt_exponent": isoflop_exponent(profiles),
               "n_opt_exponent_bootstrap": summary(iso_exp) if iso_exp else None,
               "bootstrap": {"resamples": n_boot, "of": "model sizes, each with all its budgets",
                             "unbracketed_profiles": unbracketed}}

    results = {"runs": runs, "fit": law, "bootstrap": {"resamples": n_boot, **uncertainty},
               "compute_optimal": optimal, "isoflop": isoflop, "chinchilla": CHINCHILLA, "quick": args.quick,
               "setup": {"seq_len": SEQ, "batch_size": BATCH, "lr": "1e-2 * sqrt(16 / dim)", "vocab_size": tok.vocab_size,
                         "schedule": f"warmup {WARMUP} steps, constant, linear decay to 0 over the last {DECAY:.0%}",
                         "eval_tokens": eval_batches * 16 * SEQ, "N": "non-embedding parameters", "D": "training tokens",
                         "C": "6 N D"}}
    print(f"fit: L = {law['E']:.3f} + {law['A']:.3g}/N^{law['alpha']:.3f} + {law['B']:.3g}/D^{law['beta']:.3f} "
          f"(rmse {law['rmse']:.4f})")
    for key in ("alpha", "beta", "E"):
        u = uncertainty[key]
        print(f"  {key} = {law[key]:.3f}, bootstrap {u['mean']:.3f} +- {u['std']:.3f} (95% {u['ci95'][0]:.3f}-"
              f"{u['ci95'][1]:.3f}); Chinchilla {CHINCHILLA.get(key, '-')}")
    u = uncertainty["n_opt_exponent"]
    print(f"  N_opt ~ C^{law['beta'] / (law['alpha'] + law['beta']):.3f} (95% {u['ci95'][0]:.3f}-{u['ci95'][1]:.3f})")
    for o, p in zip(optimal, profiles):
        b = o["tokens_per_param_bootstrap"]
        print(f"  C = {o['compute']:.1e}: law: N_opt {o['N_opt']:,.0f}, {o['tokens_per_param']:.1f} tokens/param "
              f"(95% {b['ci95'][0]:.1f}-{b['ci95'][1]:.1f})")
        if p["n_opt"]:
            pb = p["bootstrap"]
            ci = f"95% {pb['ci95'][0]:.1f}-{pb['ci95'][1]:.1f}" if pb["bracketed"] else "-"
            print(f"      IsoFLOP: N_opt {p['n_opt']:,.0f}, {p['tokens_per_param']:.1f} tokens/param ({ci}, "
                  f"bracketed in {pb['bracketed']}/{n_boot})")
        else:
            print(f"      IsoFLOP: minimum not bracketed by the {len(p['N'])} sizes that reach it")
    if isoflop["n_opt_exponent"] is not None:
        print(f"  IsoFLOP N_opt ~ C^{isoflop['n_opt_exponent']:.3f}")

    plot(results, out / "scaling_laws.png")
    common.write_results(out, results, started)


if __name__ == "__main__":
    main()
