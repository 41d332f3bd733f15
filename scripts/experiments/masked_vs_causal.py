"""Masked vs causal LM: an encoder and a decoder of the same size, each measured at its own job and the other's.

Both are built from the same blocks (`Block`; the encoder's attention bidirectional,
`llmstack.classic.masked_lm.MaskedLM`) with the same width, depth and vocabulary, and trained
for the same steps on the same windows of the standard library: the decoder on next-token
prediction (every token a target), the encoder on BERT's 15% masking (80/10/10), each
checked at its own job six times during training.

On held-out windows of 128 tokens:

    next token:  predict token p from tokens < p. The decoder's own job; the encoder gets the
                 prefix followed by one [MASK], the only way it can be asked.
    fill in:     predict token p given everything before *and after* it. The encoder's own
                 job ([MASK] at p); the decoder reads only the left side, or, at 16 times the
                 cost, rescores its 16 likeliest candidates by the whole window's likelihood.

    python scripts/experiments/masked_vs_causal.py          # about 6 minutes
    python scripts/experiments/masked_vs_causal.py --quick
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

import common
from llmstack.classic.masked_lm import MaskedLM, mask_tokens
from llmstack.model import ModelConfig, build_model

SEQ, BATCH = 128, 16


@torch.no_grad()
def next_token_scores(decoder, encoder, windows: torch.Tensor, positions: list[int]) -> dict:
    """Mean loss and accuracy of predicting windows[:, p] from windows[:, :p]."""
    mask_id = encoder.mask_id
    out = {"decoder": [], "encoder": []}
    for p in positions:
        target = windows[:, p]
        dec = decoder(windows[:, :p], logits_to_keep=1)[:, -1]
        masked = torch.cat([windows[:, :p], torch.full_like(windows[:, :1], mask_id)], dim=1)
        enc = encoder(masked)[:, -1, :mask_id]  # the [MASK] id itself is never an answer
        for name, logits in (("decoder", dec), ("encoder", enc)):
            out[name].append((F.cross_entropy(logits.float(), target).item(),
                              (logits.argmax(-1) == target).float().mean().item()))
    return {name: {"loss": float(np.mean([v[0] for v in vals])), "accuracy": float(np.mean([v[1] for v in vals]))}
            for name, vals in out.items()}


@torch.no_grad()
def fill_in_scores(decoder, encoder, windows: torch.Tensor, positions: list[int], k: int = 16) -> dict:
    """Predict windows[:, p] from both sides: the encoder with [MASK] at p; the decoder from the
    left only; the decoder rescoring its top-k left-context candidates by the whole window's
    log-likelihood (k = 0: not)."""
    mask_id = encoder.mask_id
    acc = {"encoder": [], "decoder (left context)": [], **({f"decoder (rescoring top {k})": []} if k else {})}
    loss = {"encoder": [], "decoder (left context)": []}
    for p in positions:
        target = windows[:, p]
        masked = windows.clone()
        masked[:, p] = mask_id
        enc = encoder(masked)[:, p, :mask_id]
        left = decoder(windows[:, :p], logits_to_keep=1)[:, -1]
        for name, logits in (("encoder", enc), ("decoder (left context)", left)):
            acc[name].append((logits.argmax(-1) == target).float().mean().item())
            loss[name].append(F.cross_entropy(logits.float(), target).item())
        if not k:
            continue
        candidates = left.topk(k, dim=-1).indices  # (B, k)
        B, T = windows.shape
        filled = windows[:, None, :].repeat(1, k, 1)  # (B, k, T): each candidate put in at p
        filled[:, :, p] = candidates
        flat = filled.flatten(0, 1)
        logp = torch.log_softmax(decoder(flat[:, :-1]).float(), dim=-1)  # (B k, T - 1, V)
        token_logp = logp.gather(-1, flat[:, 1:, None])[..., 0]  # log P(t_i | t_<i)
        score = token_logp[:, p - 1:].sum(-1).view(B, k)  # the candidate and everything after it
        best = candidates.gather(1, score.argmax(-1, keepdim=True))[:, 0]
        acc[f"decoder (rescoring top {k})"].append((best == target).float().mean().item())
    return {name: {"accuracy": float(np.mean(a)), **({"loss": float(np.mean(loss[name]))} if name in loss else {})}
            for name, a in acc.items()}


def main() -> None:
    args = common.parser(__doc__, "masked_vs_causal").parse_args()
    out = common.start(args)
    started = time.perf_counter()
    train, val, tok = common.lm_tokens(args.quick)
    dim, layers, steps, n_windows, n_checks = 96, 3, 1200, 128, 6
    if args.quick:
        dim, layers, steps, n_windows, n_checks = 32, 1, 10, 8, 2
    vocab = tok.vocab_size + 1  # and [MASK], which the tokenizer never produces
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=4, max_seq_len=SEQ + 1, tie_embeddings=True)
    torch.manual_seed(args.seed)
    decoder = build_model(cfg)
    decoder.init_weights()
    torch.manual_seed(args.seed)
    encoder = MaskedLM(cfg, mask_id=vocab - 1)
    encoder.init_weights()
    batches = common.lm_batches(train, BATCH, SEQ, args.seed)
    g = torch.Generator().manual_seed(args.seed)

    def causal_loss(step):
        x, y = batches.get_batch(step)
        return decoder(x, targets=y) / y.numel()

    def masked_loss(step):
        x, _ = batches.get_batch(step)
        inputs, targets = mask_tokens(x, mask_id=encoder.mask_id, vocab_size=tok.vocab_size, generator=g)
        return encoder(inputs, targets=targets) / max(1, int((targets != -100).sum()))

    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(val) - SEQ, n_windows)
    windows = torch.from_numpy(np.stack([val[s:s + SEQ] for s in starts]).astype(np.int64))
    positions = [SEQ // 4, SEQ // 2, 3 * SEQ // 4]

    results = {"model": {"dim": dim, "n_layers": layers, "vocab_size": vocab, "decoder_params": decoder.num_params(),
                         "encoder_params": encoder.num_params()}, "steps": steps, "seq_len": SEQ, "quick": args.quick}
    curves, checks = {}, {"decoder": [], "encoder": []}  # checks: (step, accuracy at its own job) during training
    own_job = {"decoder": "decoder (left context)", "encoder": "encoder"}  # next token = fill-in from the left
    for name, model, loss_fn in (("decoder", decoder, causal_loss), ("encoder", encoder, masked_loss)):

        def check(step, loss, name=name, model=model):
            if (step + 1) % max(1, steps // n_checks) == 0:
                model.eval()
                scores = fill_in_scores(decoder, encoder, windows, positions, k=0)
                checks[name].append((step + 1, scores[own_job[name]]["accuracy"]))
                model.train()

        t0 = time.perf_counter()
        curves[name] = common.fit(model, loss_fn, steps, [torch.optim.AdamW(model.parameters(), lr=3e-3,
                                                                            betas=(0.9, 0.95), weight_decay=0.1)],
                                  lr=3e-3, warmup=steps // 10, log=check)
        print(f"{name}: trained in {time.perf_counter() - t0:.0f} s, final training loss {curves[name][-1]:.3f}; "
              "accuracy at its own job by step: " + " ".join(f"{s}:{a:.1%}" for s, a in checks[name]))
    results["training_loss"] = {k: v[::5] for k, v in curves.items()}
    results["accuracy_during_training"] = checks

    decoder.eval(), encoder.eval()
    results["next_token"] = next_token_scores(decoder, encoder, windows, positions)
    results["fill_in"] = fill_in_scores(decoder, encoder, windows, positions)
    results["eval"] = {"windows": n_windows, "positions": positions}
    for task in ("next_token", "fill_in"):
        for name, r in results[task].items():
            print(f"{task:<10} {name:<28} accuracy {r['accuracy']:.1%}" +
                  (f", loss {r['loss']:.3f}" if "loss" in r else ""))

    plt = common.pyplot()
    fig, (ax, ax_curve, ax_acc) = plt.subplots(1, 3, figsize=(17, 4.3))
    bars = [("next token", "decoder", results["next_token"]["decoder"]),
            ("next token", "encoder", results["next_token"]["encoder"])]
    bars += [("fill in", name, r) for name, r in results["fill_in"].items()]
    colors = {"decoder": "C0", "encoder": "C1"}
    for i, (task, name, r) in enumerate(bars):
        ax.bar(i, r["accuracy"], color=colors.get(name.split(" ")[0], "C0"), alpha=1.0 if "rescoring" not in name else 0.5)
        ax.text(i, r["accuracy"] + 0.01, f"{r['accuracy']:.0%}", ha="center", fontsize=8)
    ax.set_xticks(range(len(bars)), [f"{task}\n{name}" for task, name, _ in bars], fontsize=7)
    ax.set(ylabel="top-1 accuracy on held-out windows", title="Each model at its own job and the other's")
    for name, curve in curves.items():
        window = max(1, steps // 40)
        smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
        ax_curve.plot(np.arange(len(smooth)) + window // 2, smooth, color=colors[name],
                      label=f"{name} ({'next token, all positions' if name == 'decoder' else '15% masked positions'})")
    ax_curve.set(xlabel="step", ylabel="training loss (its own objective)", title="Training")
    ax_curve.legend(fontsize=8)
    for name, label in (("decoder", "decoder: next token (= fill-in from the left)"), ("encoder", "encoder: fill-in")):
        at, acc = zip(*checks[name])
        ax_acc.plot(at, acc, marker="o", color=colors[name], label=label)
    ax_acc.set(xlabel="step", ylabel="top-1 accuracy on held-out windows", ylim=(0, None),
               title="Each at its own job, during training")
    ax_acc.legend(fontsize=8)
    common.save_figure(fig, out / "masked_vs_causal.png")
    common.write_results(out, results, started)


if __name__ == "__main__":
    main()
