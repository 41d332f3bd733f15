"""Every experiment of docs/classic.md runs (--quick, a toy size, in this process) and writes its results.json,
with the fields the docs quote, and its figure; and what the quick runs can already show, they show."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "scripts" / "experiments"

# experiment: (figure, the fields docs/classic.md quotes)
OUTPUTS = {
    "gradients": ("gradients.png", ["depth", "variants"]),
    "long_range": ("long_range.png", ["distances", "accuracy", "params", "chance"]),
    "seq2seq_attention": ("seq2seq_attention.png", ["test_lengths", "models"]),
    "optimizers": ("optimizers.png", ["steps", "optimizers"]),
    "masked_vs_causal": ("masked_vs_causal.png", ["next_token", "fill_in", "model"]),
    "scaling_laws": ("scaling_laws.png", ["runs", "fit", "bootstrap", "compute_optimal", "chinchilla"]),
    "icl": ("icl.png", ["shots", "small_model", "recall_optimum", "real_model"]),
}


def run_quick(name: str, out: Path, *extra: str) -> dict:
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        module = __import__(name)
        argv = sys.argv
        sys.argv = [f"{name}.py", "--quick", "--threads", "1", "--out", str(out), *extra]
        try:
            module.main()
        finally:
            sys.argv = argv
    finally:
        sys.path.remove(str(EXPERIMENTS))
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_experiment_quick_run_writes_its_results_and_figure(name, tmp_path):
    extra = ("--no-real",) if name == "icl" else ()  # loading a 135M model is not a smoke test
    results = run_quick(name, tmp_path, *extra)
    figure, fields = OUTPUTS[name]
    assert (tmp_path / figure).stat().st_size > 10_000
    missing = [f for f in fields if f not in results]
    assert not missing, f"{name}: results.json lacks {missing}"
    assert results["quick"] is True and results["wall_time_s"] > 0
    if name == "gradients":  # at init already: the x0.8 plain net loses its gradient, the residual one keeps it
        v = results["variants"]
        assert v["plain, init x 0.8"]["first_to_last_ratio_init"] < 0.2
        assert v["plain, init x 1.25"]["first_to_last_ratio_init"] > 5
        assert 0.3 < v["residual + LayerNorm (pre-norm)"]["first_to_last_ratio_init"] < 5
    if name == "scaling_laws":
        fit = results["fit"]
        assert all(math.isfinite(fit[k]) and fit[k] >= 0 for k in ("E", "A", "B", "alpha", "beta"))
        assert results["bootstrap"]["alpha"]["ci95"][0] <= results["bootstrap"]["alpha"]["ci95"][1]


def test_scaling_law_fit_recovers_known_exponents():
    """The fit on losses drawn from a known law, with a little noise, finds its exponents."""
    import numpy as np

    sys.path.insert(0, str(EXPERIMENTS))
    try:
        from scaling_laws import compute_optimal, fit_law, predict
    finally:
        sys.path.remove(str(EXPERIMENTS))
    law = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e4, 1e7, 8), np.geomspace(1e6, 1e8, 3)))
    L = predict(law, N, D) + np.random.default_rng(0).normal(0, 1e-3, N.shape)
    fit = fit_law(N, D, L)
    assert abs(fit["alpha"] - 0.34) < 0.03 and abs(fit["beta"] - 0.28) < 0.03 and abs(fit["E"] - 1.7) < 0.05
    n, d = compute_optimal(law, 1e20)  # at the optimum, a step along C = 6ND in either direction costs loss
    assert 6 * n * d == pytest.approx(1e20)
    assert predict(law, n, d) < min(predict(law, 1.2 * n, d / 1.2), predict(law, n / 1.2, 1.2 * d))
