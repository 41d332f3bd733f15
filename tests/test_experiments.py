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
    "recurrent_lm": ("recurrent_lm.png", ["runs", "probes", "budget_s"]),
}


def experiment(name: str):
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(EXPERIMENTS))


def run_quick(name: str, out: Path, *extra: str) -> dict:
    module = experiment(name)
    argv = sys.argv
    sys.argv = [f"{name}.py", "--quick", "--threads", "1", "--out", str(out), *extra]
    try:
        module.main()
    finally:
        sys.argv = argv
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
    if name == "recurrent_lm":  # three pretraining jobs through the library, the same time for each
        assert set(results["runs"]) == {"Transformer", "LSTM", "GRU"}
        for name, r in results["runs"].items():
            assert math.isfinite(r["val_loss"]) and (tmp_path / Path(r["out_dir"]).name / "latest").is_file()
            if name != "Transformer":  # as many steps as the Transformer's time holds at the probed step time
                assert r["steps"] == max(1, round(results["budget_s"] / results["probes"][name]["step_s"]))
    if name == "scaling_laws":
        fit = results["fit"]
        assert all(math.isfinite(fit[k]) and fit[k] >= 0 for k in ("E", "A", "B", "alpha", "beta"))
        assert results["bootstrap"]["alpha"]["ci95"][0] <= results["bootstrap"]["alpha"]["ci95"][1]
        assert len(results["runs"]) == 4 * 4 and results["isoflop"]["profiles"]


def test_scaling_law_fit_recovers_known_exponents():
    """The fit on losses drawn from a known law, with a little noise, finds its exponents."""
    import numpy as np

    scaling_laws = experiment("scaling_laws")
    compute_optimal, fit_law, predict = scaling_laws.compute_optimal, scaling_laws.fit_law, scaling_laws.predict
    law = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e4, 1e7, 8), np.geomspace(1e6, 1e8, 3)))
    L = predict(law, N, D) + np.random.default_rng(0).normal(0, 1e-3, N.shape)
    fit = fit_law(N, D, L)
    assert abs(fit["alpha"] - 0.34) < 0.03 and abs(fit["beta"] - 0.28) < 0.03 and abs(fit["E"] - 1.7) < 0.05
    n, d = compute_optimal(law, 1e20)  # at the optimum, a step along C = 6ND in either direction costs loss
    assert 6 * n * d == pytest.approx(1e20)
    assert predict(law, n, d) < min(predict(law, 1.2 * n, d / 1.2), predict(law, n / 1.2, 1.2 * d))


def test_scaling_law_isoflop_profiles_find_the_law_s_optimum():
    """On losses drawn from a known law over a grid of sizes and budgets, each IsoFLOP parabola's
    minimum lies near the law's compute-optimal size, and N_opt ~ C^(beta / (alpha + beta))."""
    import numpy as np

    scaling_laws = experiment("scaling_laws")
    law = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e10, 25), np.geomspace(1e8, 1e12, 33)))
    L = scaling_laws.predict(law, N, D)
    profiles = [scaling_laws.isoflop_profile(N, D, L, C) for C in (1e20, 1e21, 1e22)]
    for p in profiles:
        n_opt, _ = scaling_laws.compute_optimal(law, p["compute"])
        assert p["n_opt"] == pytest.approx(n_opt, rel=0.15)
        assert p["tokens_per_param"] == pytest.approx(p["compute"] / 6 / p["n_opt"] ** 2)
    assert scaling_laws.isoflop_exponent(profiles) == pytest.approx(0.28 / 0.62, abs=0.03)
    flat = scaling_laws.isoflop_profile(N, D, scaling_laws.predict(law, N, 1e30), 1e21)  # loss falls with N only
    assert flat["n_opt"] is None


def test_scaling_law_budgets_branch_off_one_run_as_separate_runs_would():
    """A size's budgets share their constant-rate phase: the run for one budget is the same whether
    or not other budgets branched off before it."""
    import numpy as np

    scaling_laws = experiment("scaling_laws")
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 64, 20_000), rng.integers(0, 64, 4_000)
    tokens = [40 * 512, 60 * 512]
    both = scaling_laws.train_size(16, 1, tokens, train, val, 64, 0, 2)
    for budget, run in zip(tokens, both):
        alone = scaling_laws.train_size(16, 1, [budget], train, val, 64, 0, 2)[0]
        assert run["D"] == budget and run["val_loss"] == pytest.approx(alone["val_loss"], abs=1e-5)
        assert run["train_loss"] == pytest.approx(alone["train_loss"], abs=1e-5)


def test_icl_episodes_hold_one_rule_and_only_the_answers_are_targets():
    import numpy as np

    icl = experiment("icl")
    rng = np.random.default_rng(0)
    for _ in range(50):
        tokens, answer, pairs = icl.episode("rules", 4, rng)
        assert len(pairs) == 5 and tokens[0] == icl.BOS
        assert any(all(f(list(x)) == y for x, y in pairs) for f in icl.RULES.values())  # one rule for every shot
        assert [t for t, a in zip(tokens, answer) if a] == [s for _, y in pairs for s in y]
        _, _, pairs = icl.episode("recall", 8, rng)
        assert len({(k[0], v[0]) for k, v in pairs}) == len({k[0] for k, _ in pairs})  # one value per key
    x, y, query = icl.batch(lambda i: "rules", lambda i: 3, 8, rng)
    assert x.shape == y.shape == query.shape
    assert bool(((y != -100) | ~query).all()) and int(query.sum()) == 8 * 3  # the query's answer: 3 tokens a row
    optimum = [icl.recall_optimum(k) for k in icl.SHOTS]
    assert optimum[0] == 1 / icl.SYMBOLS and optimum == sorted(optimum) and optimum[-1] < 1


def test_the_synthetic_tasks_are_what_their_docs_say():
    import numpy as np

    long_range = experiment("long_range")
    x, keys = long_range.make_batch(64, 7, np.random.default_rng(0))
    assert x.shape == (64, 9) and (x[:, 0] == keys).all() and (x[:, -1] == long_range.QUERY).all()
    assert ((x[:, 1:-1] >= long_range.KEYS) & (x[:, 1:-1] < long_range.QUERY)).all()  # the gap holds no key

    s2s = experiment("seq2seq_attention")
    src, lengths, tgt_in, tgt_out = s2s.make_batch(np.array([3, 5]), np.random.default_rng(0))
    for i, n in enumerate(lengths.tolist()):
        assert tgt_out[i, :n].tolist() == src[i, :n].flip(0).tolist() and tgt_out[i, n] == s2s.EOS
        assert tgt_in[i, 0] == s2s.BOS and tgt_in[i, 1:n + 1].tolist() == tgt_out[i, :n].tolist()
        assert (src[i, n:] == s2s.PAD).all() and (tgt_out[i, n + 1:] == -100).all()


def test_vanishing_and_exploding_gradients_at_depth_and_what_stops_them():
    """At initialisation, in a 30-layer ReLU network: the gradient reaching layer 1 is ~0.8^30 of what
    reaches layer 30 with weights 0.8x Kaiming, ~1.25^30 of it with 1.25x, about equal with Kaiming's
    own scale, and about equal with any of them once the residual stream carries it."""
    import torch

    gradients = experiment("gradients")
    torch.manual_seed(0)
    x, y = torch.randn(512, 16), torch.randint(0, 10, (512,))

    def first_to_last(init, norm=None, residual=False):
        torch.manual_seed(0)
        model = gradients.DeepNet(16, 64, 30, 10, init=init, norm=norm, residual=residual)
        grads, _ = gradients.layer_grad_norms(model, x, y)
        return grads[0] / grads[-1]

    assert first_to_last(0.8) < 0.02 and first_to_last(1.25) > 50  # 0.8^29 = 0.0015, 1.25^29 = 650
    assert 0.3 < first_to_last(1.0) < 3
    for init in (0.8, 1.0, 1.25):
        assert 0.3 < first_to_last(init, "layer", residual=True) < 5
