"""Attention in sequence to sequence: reversing a sequence, with and without Bahdanau attention, against its length.

Two GRU encoder-decoders (`llmstack.classic.seq2seq.Seq2Seq`, the same sizes) learn to output
their input reversed, on sources of 4 to 32 symbols (20 symbols, uniformly random). Without
attention, the decoder sees the source only through the encoder's last state, one vector of
128 numbers for up to 32 symbols: the bottleneck. With attention it reads every encoder state
at every step, and the weights it learns form the anti-diagonal that reversal needs (drawn as
a heat map). Greedy decoding, tested per source length (including 40 and 48, longer than any
in training): token accuracy and whole-sequence accuracy.

    python scripts/experiments/seq2seq_attention.py          # about 4 minutes
    python scripts/experiments/seq2seq_attention.py --quick
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

import common
from llmstack.classic.seq2seq import Seq2Seq

PAD, BOS, EOS, FIRST = 0, 1, 2, 3
SYMBOLS = 20
VOCAB = FIRST + SYMBOLS


def make_batch(lengths: np.ndarray, rng: np.random.Generator):
    """Right-padded sources (B, S), their lengths, decoder inputs (BOS + reversed) and targets
    (reversed + EOS, -100 on padding)."""
    B, S = len(lengths), int(lengths.max())
    src = np.full((B, S), PAD)
    tgt_in = np.full((B, S + 1), PAD)
    tgt_out = np.full((B, S + 1), -100)
    for i, n in enumerate(lengths):
        seq = rng.integers(FIRST, VOCAB, n)
        src[i, :n] = seq
        tgt_in[i, 0], tgt_in[i, 1:n + 1] = BOS, seq[::-1]
        tgt_out[i, :n], tgt_out[i, n] = seq[::-1], EOS
    as_tensor = lambda a: torch.from_numpy(a).long()  # noqa: E731
    return as_tensor(src), as_tensor(lengths), as_tensor(tgt_in), as_tensor(tgt_out)


@torch.no_grad()
def evaluate(model: Seq2Seq, length: int, n: int, seed: int) -> tuple[float, float]:
    """(token accuracy, sequence accuracy) of greedy decoding on n sources of `length`."""
    src, lengths, _, tgt_out = make_batch(np.full(n, length), np.random.default_rng([seed, length]))
    tokens, _ = model.generate(src, lengths, length + 1, bos_id=BOS)
    correct = tokens == tgt_out  # the reversed source, then EOS
    return correct.float().mean().item(), correct.all(dim=1).float().mean().item()


def main() -> None:
    args = common.parser(__doc__, "seq2seq_attention").parse_args()
    out = common.start(args)
    started = time.perf_counter()
    steps, batch, min_len, max_len, test_lengths, n_test = 1200, 64, 4, 32, [4, 8, 12, 16, 20, 24, 28, 32, 40, 48], 200
    if args.quick:
        steps, max_len, test_lengths, n_test = 20, 8, [4, 8], 20
    results = {"steps": steps, "batch_size": batch, "train_lengths": [min_len, max_len], "test_lengths": test_lengths,
               "models": {}, "quick": args.quick}
    models = {}
    for name, attention in (("attention", True), ("no attention", False)):
        torch.manual_seed(args.seed)
        model = Seq2Seq(VOCAB, 32, 128, attention=attention)
        rng = np.random.default_rng(args.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

        def loss_fn(step):
            src, lengths, tgt_in, tgt_out = make_batch(rng.integers(min_len, max_len + 1, batch), rng)
            logits = model(src, lengths, tgt_in)
            return F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=-100)

        t0 = time.perf_counter()
        losses = common.fit(model, loss_fn, steps, [opt], lr=3e-3, warmup=steps // 20)
        token_acc, seq_acc = zip(*(evaluate(model, n, n_test, args.seed) for n in test_lengths))
        models[name] = model
        results["models"][name] = {"params": sum(p.numel() for p in model.parameters()), "losses": losses[::10],
                                   "token_accuracy": list(token_acc), "sequence_accuracy": list(seq_acc),
                                   "train_seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:<13} " + " ".join(f"{n}:{a:.0%}" for n, a in zip(test_lengths, token_acc)) + " (token accuracy)")

    example = make_batch(np.array([min(20, max_len)]), np.random.default_rng(123))
    _, weights = models["attention"](example[0], example[1], example[2], return_attention=True)  # (1, T, S)
    results["heatmap_source"] = example[0][0].tolist()

    plt = common.pyplot()
    fig, (ax, ax_seq, ax_map) = plt.subplots(1, 3, figsize=(15, 4.3))
    for i, (name, r) in enumerate(results["models"].items()):
        ax.plot(test_lengths, r["token_accuracy"], marker="o", color=f"C{i}", label=name)
        ax_seq.plot(test_lengths, r["sequence_accuracy"], marker="o", color=f"C{i}", label=name)
    for a, what in ((ax, "token accuracy"), (ax_seq, "whole-sequence accuracy")):
        a.axvspan(min_len, max_len, color="0.92", zorder=0, label="training lengths")
        a.set(xlabel="source length", ylabel=what, ylim=(0, 1.02), title=f"Reversal, greedy decoding: {what}")
        a.legend(fontsize=8)
    ax_map.imshow(weights[0].detach().numpy(), cmap="viridis", aspect="auto")
    ax_map.set(xlabel="source position", ylabel="output step", title="attention weights (one length-20 source)")
    common.save_figure(fig, out / "seq2seq_attention.png")
    common.write_results(out, results, started)


if __name__ == "__main__":
    main()
