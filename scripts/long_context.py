"""Validation loss by token position past the trained context, with each RoPE scaling.

Runs the checkpoint on validation windows `--factor` times its trained length,
as is (none), with linear / NTK / YaRN scaling, and with a sliding window of the
trained length; prints the mean loss in bins of positions and draws loss vs
position (a PNG, one line per method, the trained length marked).

    python scripts/long_context.py --checkpoint runs/quickstart
    python scripts/long_context.py --checkpoint runs/short-ctx --factor 4 --windows 256 --out long_context.png
"""
import copy
import sys
from pathlib import Path

import numpy as np
import torch

import llmstack
from llmstack.cli import positive_int, script_parser
from llmstack.config import ConfigError
from llmstack.data import DataError, prepare_tokens
from llmstack.inference.long_context import extend_context, loss_by_position, trained_context
from llmstack.interop import load_tokenizer, resolve_checkpoint
from llmstack.runtime import set_threads
from llmstack.train import load_run_config

METHODS = {  # name: extend_context arguments after new_max_seq_len
    "none": dict(scaling=None),
    "linear": dict(scaling="linear"),
    "ntk": dict(scaling="ntk"),
    "yarn": dict(scaling="yarn"),
    "window": dict(scaling=None, sliding_window="trained"),
}


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a run or checkpoint directory")
    parser.add_argument("--factor", type=positive_int, default=4,
                        help="window length as a multiple of the trained context (default 4)")
    parser.add_argument("--windows", type=positive_int, default=32,
                        help="validation windows averaged per position (default 32)")
    parser.add_argument("--bins", type=positive_int, default=8, help="bins of positions in the printed table")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help=f"(default: {' '.join(METHODS)})")
    parser.add_argument("--out", default=None, help="PNG path (default: long_context.png in the checkpoint's run)")
    args = parser.parse_args()
    methods = args.methods
    try:
        set_threads(args.threads)
        ckpt = resolve_checkpoint(args.checkpoint)
        cfg = load_run_config(ckpt)
        base = llmstack.from_pretrained(ckpt)
        tok = load_tokenizer(ckpt)
        tokens = prepare_tokens(cfg.data.source, tok, cache_dir=cfg.data.cache_dir, val_fraction=cfg.data.val_fraction,
                                text_field=cfg.data.text_field)["val"]
    except (ConfigError, ValueError, FileNotFoundError, DataError) as e:
        sys.exit(f"error: {e}")
    trained = trained_context(base)
    length = args.factor * trained
    n = min(args.windows, (len(tokens) - 1) // (length + 1))
    if n < 1:
        sys.exit(f"error: the validation split ({len(tokens)} tokens) is shorter than one window of {length + 1}")
    starts = np.arange(n) * (length + 1)  # consecutive, non-overlapping: the same every run
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(length + 1)].astype(np.int64))
    print(f"{ckpt}: trained context {trained}, {n} validation windows of {length} tokens")

    curves = {}
    for name in methods:
        kwargs = dict(METHODS[name])
        if kwargs.get("sliding_window") == "trained":
            kwargs["sliding_window"] = trained
        model = extend_context(copy.deepcopy(base), length, **kwargs)
        curves[name] = loss_by_position(model, windows).numpy()
        print(f"  {name:<7} mean loss {curves[name].mean():.3f}")

    edges = np.linspace(0, length, args.bins + 1).astype(int)
    header = "| positions   | " + " | ".join(f"{m:>7}" for m in methods) + " |"
    print("\nmean loss (nats/token) by position")
    print(header)
    print("|" + "-" * 13 + "|" + "|".join("-" * 9 for _ in methods) + "|")
    for lo, hi in zip(edges[:-1], edges[1:]):
        print(f"| {lo:>5}-{hi - 1:<5} | " + " | ".join(f"{curves[m][lo:hi].mean():>7.3f}" for m in methods) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out) if args.out else Path(ckpt).parent.parent / "long_context.png"
    smooth = max(1, length // 32)  # moving average: a single position is noisy over few windows
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, curve in curves.items():
        y = np.convolve(curve, np.ones(smooth) / smooth, mode="valid")
        ax.plot(np.arange(len(y)) + smooth // 2, y, label=name, lw=1.2)
    ax.axvline(trained, color="k", ls="--", lw=1, label=f"trained length ({trained})")
    ax.set(xlabel="token position", ylabel="validation loss (nats/token)",
           title=f"Loss by position at {args.factor}x the trained context ({n} windows, mean of {smooth})")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"\nplot: {out}")


if __name__ == "__main__":
    main()
