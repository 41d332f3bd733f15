"""LSTM vs GRU vs the quickstart Transformer: validation loss at equal parameters, equal tokens and equal wall-clock.

The three pretraining jobs `configs/pretrain/{quickstart,lstm,gru}.yaml` (2.35-2.36M
parameters each, the same corpus, tokenizer, batches, optimizer and schedule) run through
`llmstack.train.pretrain`, the loop `scripts/pretrain.py` runs, twice over:

    equal tokens      300 steps each (1.2M tokens), as the configs say
    equal wall-clock  each recurrent model gets as many steps as fit in the time the
                      Transformer took for its 300 (warmup and cosine decay stretched to them)

Training time is the number of steps times the median time of a step (from the intervals of
metrics.jsonl that hold no evaluation or checkpoint), so evaluations, saves and a busy moment
on the machine do not count. Validation loss is the job's own (train.eval_batches windows of the
held-out files) every 50 steps and at the end. Each run directory is a normal checkpoint:
`scripts/generate.py --checkpoint runs/experiments/recurrent_lm/lstm` samples from it.

    python scripts/experiments/recurrent_lm.py          # about 25 minutes on one thread
    python scripts/experiments/recurrent_lm.py --quick
"""
from __future__ import annotations

import json
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import common
from llmstack.config import load_config
from llmstack.interop import build
from llmstack.train import PretrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[2]
JOBS = {"Transformer": "quickstart", "LSTM": "lstm", "GRU": "gru"}
EVAL_EVERY = 50


def quick_overrides(out: Path) -> list[str]:
    """A toy size on 30 files of the standard library copied as text (a tokenizer in a second)."""
    corpus = out / "quick-corpus"
    corpus.mkdir(exist_ok=True)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]
    for f in files:
        (corpus / f"{f.stem}.txt").write_text(f.read_text(encoding="utf-8", errors="replace")[:4000])
    return [f"data.source={corpus}/*.txt", "data.seq_len=32", "data.val_fraction=0.2",
            f"data.cache_dir={out / 'cache' / 'tokens'}", "tokenizer.vocab_size=300", "model.vocab_size=300",
            "model.dim=24", "model.n_layers=1", "model.max_seq_len=64", "train.batch_size=4", "train.warmup_steps=2",
            "train.eval_batches=2", "train.eval_every=3", "train.log_every=1"]


def run(name: str, job: str, steps: int, out_dir: Path, extra: list[str]) -> dict:
    """One pretraining job from scratch; its losses and step time from metrics.jsonl."""
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run, never a resumed one
    cfg = load_config(PretrainConfig, ROOT / "configs" / "pretrain" / f"{job}.yaml", overrides=[
        f"train.out_dir={out_dir}", f"train.max_steps={steps}", f"train.eval_every={EVAL_EVERY}",
        f"train.save_every={steps}", "train.log_every=10", "train.resume=never", "train.tensorboard=false",
        "data.num_proc=1", *extra])
    result = pretrain(cfg, progress=False)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    logs = [r for r in rows if "tokens_per_s" in r]
    # Intervals between log lines; those that end just after an evaluation or a save (and the
    # first, which holds the initial evaluation) are left out of the median.
    busy = {0, *(s for s, _ in evals), steps}
    times, prev_step = [], 0
    for r in logs:
        if not any(prev_step <= b < r["step"] for b in busy):
            times.append(cfg.train.batch_size * cfg.data.seq_len / r["tokens_per_s"])  # seconds per step
        prev_step = r["step"]
    step_s = statistics.median(times) if times else float("nan")
    params = build(cfg.model).num_params()
    out = {"name": name, "job": job, "params": params, "steps": steps, "tokens": steps * cfg.train.batch_size *
           cfg.data.seq_len, "val_loss": result.val["loss"], "val_bpb": result.val.get("bits_per_byte"), "step_s": step_s,
           "train_s": steps * step_s, "val_curve": evals, "out_dir": str(out_dir)}
    print(f"{name:<12} {steps:>4} steps, {params / 1e6:.2f}M params: val loss {out['val_loss']:.3f}, "
          f"{step_s:.3f} s/step, {out['train_s']:.0f} s of training")
    return out


def main() -> None:
    args = common.parser(__doc__, "recurrent_lm").parse_args()
    out = common.start(args)
    started = time.perf_counter()
    extra = quick_overrides(out) if args.quick else []
    base_steps = 6 if args.quick else 300
    equal_tokens = {name: run(name, job, base_steps, out / job, extra) for name, job in JOBS.items()}
    budget = equal_tokens["Transformer"]["train_s"]
    equal_time = {"Transformer": equal_tokens["Transformer"]}
    for name in ("LSTM", "GRU"):
        steps = max(1, round(budget / equal_tokens[name]["step_s"]))
        if abs(steps - base_steps) <= 0.02 * base_steps:  # within the noise of the timing: the same run
            equal_time[name] = equal_tokens[name]
        else:
            equal_time[name] = run(name, JOBS[name], steps, out / f"{JOBS[name]}-equal-time", extra)
    results = {"equal_tokens": equal_tokens, "equal_time": equal_time, "budget_s": budget, "quick": args.quick,
               "setup": { "configs": {n: f"configs/pretrain/{j}.yaml" for n, j in JOBS.items()},
                         "train_time": "steps x median step time (intervals without evaluation or save)"}}
    print(f"\n| model | parameters | val loss, {base_steps} steps | s/step | val loss, equal wall-clock (steps) |")
    for name in JOBS:
        a, b = equal_tokens[name], equal_time[name]
        print(f"| {name} | {a['params'] / 1e6:.2f}M | {a['val_loss']:.3f} | {a['step_s']:.2f} | "
              f"{b['val_loss']:.3f} ({b['steps']}) |")

    plt = common.pyplot()
    fig, (ax_tok, ax_time) = plt.subplots(1, 2, figsize=(12, 4.3))
    for i, name in enumerate(JOBS):
        a, b = equal_tokens[name], equal_time[name]
        steps, losses = zip(*a["val_curve"])
        tokens_per_step = a["tokens"] / a["steps"]
        ax_tok.plot([s * tokens_per_step / 1e6 for s in steps], losses, marker="o", color=f"C{i}",
                    label=f"{name} ({a['params'] / 1e6:.2f}M params)")
        steps, losses = zip(*b["val_curve"])
        ax_time.plot([s * b["step_s"] for s in steps], losses, marker="o", color=f"C{i}",
                     label=f"{name}: {b['steps']} steps")
    ax_tok.set(xlabel="training tokens (millions)", ylabel="validation loss (nats/token)",
               title=f"Equal tokens: {base_steps} steps each")
    ax_time.axvline(budget, color="k", ls="--", lw=0.8)
    ax_time.set(xlabel="training time (s, one thread)", ylabel="validation loss (nats/token)",
                title=f"Equal wall-clock: {budget:.0f} s each")
    for ax in (ax_tok, ax_time):
        ax.set_ylim(None, min(9.0, ax.get_ylim()[1]))
        ax.legend(fontsize=8)
    common.save_figure(fig, out / "recurrent_lm.png")
    common.write_results(out, results, started)


if __name__ == "__main__":
    sys.exit(main())
