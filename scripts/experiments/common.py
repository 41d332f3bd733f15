"""What the experiments share: their command line, the corpus, a short training loop, results and figures.

Every experiment writes `results.json` and its PNG figures into `--out` (default
runs/experiments/NAME); `--quick` is a smoke run of seconds (what tests/test_experiments.py
runs), with the same code and outputs at a toy size.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from llmstack.cli import script_parser
from llmstack.runtime import set_threads


def parser(doc: Optional[str], name: str):
    p = script_parser(doc)
    p.add_argument("--out", default=f"runs/experiments/{name}", help=f"results folder (default runs/experiments/{name})")
    p.add_argument("--quick", action="store_true", help="a smoke run of seconds at a toy size")
    p.add_argument("--seed", type=int, default=0, help="seeds every model and batch (default 0)")
    return p


def start(args) -> Path:
    """Set threads and seeds; make and return the output folder."""
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _finite(value):
    """NaN and infinities (a diverged run) as null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_results(out: Path, results: dict, started: float) -> None:
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    results["threads"] = torch.get_num_threads()
    (out / "results.json").write_text(json.dumps(_finite(results), indent=2) + "\n")
    print(f"results: {out / 'results.json'} ({results['wall_time_s']} s on {results['threads']} thread(s))")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


# ---------------------------------------------------------------- the corpus

# The LM experiments train many small models; a 1024-token vocabulary keeps the output head
# (which dominates a tiny model's compute) small. Same corpus as the quickstart: the Python
# standard library, the same held-out files.
LM_VOCAB = 1024


def lm_tokens(quick: bool, vocab_size: int = LM_VOCAB) -> tuple[np.ndarray, np.ndarray, object]:
    """(train tokens, val tokens, tokenizer) of the standard library. Full: the pretraining job's
    tokenizer and token caches (`llmstack.train.build_tokenizer`, `llmstack.data.prepare_tokens`),
    built once and cached. Quick: a 300-token tokenizer trained on 40 files, in memory."""
    from llmstack.config import load_config
    from llmstack.data import load_corpus, prepare_tokens
    from llmstack.tokenizer import Tokenizer
    from llmstack.train import PretrainConfig, build_tokenizer

    if quick:
        docs = load_corpus("stdlib", "train")
        stride = max(1, len(docs) // 40)  # 40 files spread over the library, whatever its size (Debian's
        texts = [docs[i]["text"] for i in range(0, min(len(docs), 40 * stride), stride)]  # has no test package)
        tok = Tokenizer.train(texts, 300)
        ids = np.concatenate([np.asarray(tok.encode(t) + [tok.eos_id], dtype=np.int64) for t in texts])
        split = int(0.9 * len(ids))
        return ids[:split], ids[split:], tok
    cfg = load_config(PretrainConfig, overrides=["data.source=stdlib", f"tokenizer.vocab_size={vocab_size}"])
    tok = build_tokenizer(cfg, progress=False)
    tokens = prepare_tokens("stdlib", tok, val_fraction=cfg.data.val_fraction, progress=False)
    return np.asarray(tokens["train"]), np.asarray(tokens["val"]), tok


# ---------------------------------------------------------------- training

def fit(model: torch.nn.Module, loss_fn: Callable[[int], torch.Tensor], steps: int, optimizers: Iterable,
        *, lr: float, warmup: int = 0, min_lr_ratio: float = 0.1, clip: float = 1.0,
        log: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """`steps` optimizer steps on loss_fn(step) (a mean loss), warmup then cosine decay
    (`llmstack.train.lr_multiplier`), gradients clipped to `clip` (0: not). Returns the
    losses; stops early, padding with NaN, if the loss stops being finite."""
    from llmstack.train import lr_multiplier

    optimizers = list(optimizers)
    peak = [[g["lr"] for g in opt.param_groups] for opt in optimizers]  # each group's own peak lr
    losses = []
    model.train()
    for step in range(steps):
        factor = lr_multiplier(step, schedule="cosine", max_steps=steps, warmup_steps=warmup,
                               min_lr_ratio=min_lr_ratio)
        for opt, peaks in zip(optimizers, peak):
            for group, p in zip(opt.param_groups, peaks):
                group["lr"] = p * factor
        loss = loss_fn(step)
        if not math.isfinite(loss.item()):
            return losses + [float("nan")] * (steps - step)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for opt in optimizers:
            opt.step()
        losses.append(loss.item())
        if log is not None:
            log(step, losses[-1])
    model.eval()
    return losses


def lm_batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
    """`llmstack.data.TokenBatches` over a token array: get_batch(step) -> (x, y) of (B, T)."""
    from llmstack.data import TokenBatches

    return TokenBatches(tokens, batch_size, seq_len, seed=seed)


@torch.no_grad()
def lm_val_loss(model: torch.nn.Module, val: np.ndarray, seq_len: int, n_batches: int, batch_size: int = 16) -> float:
    """Mean next-token loss over `n_batches` batches of validation windows spread over the split
    (`llmstack.eval.evaluate` on `TokenBatches.eval_batches`)."""
    from llmstack.eval import evaluate

    return evaluate(model, lm_batches(val, batch_size, seq_len, 0).eval_batches(n_batches))["loss"]


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
