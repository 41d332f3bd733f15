"""The long-range problem: recall a token seen `distance` steps ago, with an RNN, an LSTM, a GRU and a Transformer.

Each sequence is a key (one of 8 symbols), `distance` noise tokens (8 other symbols), and a
query token; the model must output the key at the query. Nothing in between helps: the only
way is to carry the key across the gap. Each model (about 35k parameters) is trained from
scratch for each distance, for the same number of steps on fresh random sequences, and
tested on 2000 new ones; chance is 1/8.

An RNN's gradient from the query back to the key passes through `distance` Jacobians
diag(1 - h^2) W_hh, and it shrinks geometrically (`llmstack.classic.rnn.rnn_bptt` computes it);
the LSTM's cell and the GRU's update gate add the old state to the new one, a path whose
Jacobian is a gate the network can hold at 1; attention reads the key directly, at any distance.

    python scripts/experiments/long_range.py          # about 5 minutes
    python scripts/experiments/long_range.py --quick
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import common
from llmstack.model import ModelConfig, Transformer

KEYS, NOISE = 8, 8
QUERY = KEYS + NOISE  # token ids: keys 0..7, noise 8..15, the query 16
VOCAB = QUERY + 1


def make_batch(n: int, distance: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    keys = rng.integers(0, KEYS, n)
    noise = rng.integers(KEYS, KEYS + NOISE, (n, distance))
    x = np.concatenate([keys[:, None], noise, np.full((n, 1), QUERY)], axis=1)  # (n, distance + 2)
    return torch.from_numpy(x), torch.from_numpy(keys)


class RecurrentClassifier(nn.Module):
    """Embedding -> one recurrent layer (torch's fused RNN / LSTM / GRU, equal to
    llmstack.classic.rnn's) -> a linear readout of the last state."""

    def __init__(self, kind: str, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.rnn = {"RNN": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU}[kind](hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, KEYS)
        if kind == "LSTM":  # forget gate bias 1 (as llmstack.classic.recurrent.RecurrentLM): start by remembering
            with torch.no_grad():
                self.rnn.bias_ih_l0[hidden:2 * hidden].fill_(1.0)
                self.rnn.bias_hh_l0[hidden:2 * hidden].zero_()

    def forward(self, x):
        h, _ = self.rnn(self.embed(x))
        return self.out(h[:, -1])


class TransformerClassifier(nn.Module):
    """Two blocks of the decoder-only model (RoPE, causal) with the logits of the key symbols at the
    last position read as the answer."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.model = Transformer(ModelConfig(vocab_size=VOCAB, dim=dim, n_layers=2, n_heads=4, ffn_hidden=2 * dim,
                                             max_seq_len=max_len, tie_embeddings=True))
        self.model.init_weights()

    def forward(self, x):
        return self.model(x, logits_to_keep=1)[:, -1, :KEYS]


def build(kind: str, max_len: int) -> nn.Module:
    if kind == "Transformer":
        return TransformerClassifier(40, max_len)
    return RecurrentClassifier(kind, {"RNN": 128, "LSTM": 64, "GRU": 74}[kind])  # 33-36k parameters each


def draw(results: dict, path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    distances = results["distances"]
    for i, kind in enumerate(results["kinds"]):
        ax.plot(distances, results["accuracy"][kind], marker="o", color=f"C{i}",
                label=f"{kind} ({results['params'][kind] / 1e3:.0f}k params)")
    ax.axhline(results["chance"], color="k", ls="--", lw=0.8, label="chance")
    ax.set(xscale="log", xlabel="distance between the key and the query (tokens)", ylabel="test accuracy",
           ylim=(0, 1.05), title=f"Recall across a gap: {results['steps']} training steps per model and distance")
    ax.set_xticks(distances, [str(d) for d in distances])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def main() -> None:
    args = common.parser(__doc__, "long_range").parse_args()
    out = common.start(args)
    started = time.perf_counter()
    kinds = ["RNN", "LSTM", "GRU", "Transformer"]
    distances, steps, batch, n_test = [2, 5, 10, 20, 40, 80], 1000, 32, 2000
    if args.quick:
        distances, steps, n_test = [2, 10], 30, 200
    results = {"kinds": kinds, "distances": distances, "steps": steps, "batch_size": batch, "chance": 1 / KEYS,
               "accuracy": {k: [] for k in kinds}, "params": {}, "quick": args.quick}
    for kind in kinds:
        for distance in distances:
            torch.manual_seed(args.seed)
            model = build(kind, distance + 2)
            results["params"][kind] = sum(p.numel() for p in model.parameters())
            rng = np.random.default_rng([args.seed, distance])
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

            def loss_fn(step):
                x, y = make_batch(batch, distance, rng)
                return F.cross_entropy(model(x), y)

            common.fit(model, loss_fn, steps, [opt], lr=3e-3, warmup=steps // 10)
            x, y = make_batch(n_test, distance, np.random.default_rng([args.seed, distance, 1]))
            with torch.no_grad():
                accuracy = (model(x).argmax(-1) == y).float().mean().item()
            results["accuracy"][kind].append(accuracy)
            print(f"{kind:<11} distance {distance:>4}: accuracy {accuracy:.1%}")

    draw(results, out / "long_range.png")
    common.write_results(out, results, started)


if __name__ == "__main__":
    main()
