"""LSTM vs GRU vs the quickstart Transformer: validation loss at equal parameters and equal wall-clock.

The three pretraining jobs `configs/pretrain/{quickstart,lstm,gru}.yaml` (2.35-2.36M
parameters each, the same corpus, tokenizer, batches, optimizer and schedule) run through
`llmstack.train.pretrain`, the loop `scripts/pretrain.py` runs. The Transformer trains for
its 300 steps; a 30-step probe of each recurrent model measures its step time, and the
model then trains for as many steps as fit in the Transformer's training time (warmup and
cosine decay stretched to them).

Training time is the number of steps times the median time of a step (from the intervals of
metrics.jsonl that hold no evaluation or checkpoint), so evaluations, saves and a busy moment
on the machine do not count. Validation loss is the job's own (train.eval_batches windows of the
held-out files) every 50 steps and at the end. Each run directory is a normal checkpoint:
`scripts/generate.py --checkpoint runs/experiments/recurrent_lm/lstm` samples from it.

    python scripts/experiments/recurrent_lm.py          # about 17 minutes on one thread
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
    base_steps, probe_steps = (6, 6) if args.quick else (300, 30)
    runs = {"Transformer": run("Transformer", "quickstart", base_steps, out / "quickstart", extra)}
    budget = runs["Transformer"]["train_s"]
    probes = {}
    for name in ("LSTM", "GRU"):
        job = JOBS[name]
        probes[name] = run(f"{name} (probe)", job, probe_steps, out / f"{job}-probe",
                           extra if args.quick else ["train.log_every=2"])  # more intervals to take the median of
        shutil.rmtree(out / f"{job}-probe")
        steps = max(1, round(budget / probes[name]["step_s"]))
        runs[name] = run(name, job, steps, out / job, extra)
    results = {"runs": runs, "probes": {k: {"steps": v["steps"], "step_s": v["step_s"]} for k, v in probes.items()},
               "budget_s": budget, "quick": args.quick,
               "setup": {"configs": {n: f"configs/pretrain/{j}.yaml" for n, j in JOBS.items()},
                         "train_time": "steps x median step time (intervals without evaluation or save)"}}
    print("\n| model | parameters | steps | tokens | training time | val loss |")
    for name, r in runs.items():
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['tokens'] / 1e6:.2f}M | {r['train_s']:.0f} s | "
              f"{r['val_loss']:.3f} |")

    plt = common.pyplot()
    fig, (ax_time, ax_tok) = plt.subplots(1, 2, figsize=(12, 4.3))
    for i, (name, r) in enumerate(runs.items()):
        steps, losses = zip(*r["val_curve"])
        label = f"{name} ({r['params'] / 1e6:.2f}M params): {r['steps']} steps"
        ax_time.plot([s * r["step_s"] for s in steps], losses, marker="o", color=f"C{i}", label=label)
        ax_tok.plot([s * r["tokens"] / r["steps"] / 1e6 for s in steps], losses, marker="o", color=f"C{i}", label=label)
    ax_time.axvline(budget, color="k", ls="--", lw=0.8)
    ax_time.set(xlabel="training time (s, one thread)", ylabel="validation loss (nats/token)",
                title=f"The Transformer's {base_steps} steps of training time for each")
    ax_tok.set(xlabel="training tokens (millions)", ylabel="validation loss (nats/token)",
               title="The same runs against tokens")
    for ax in (ax_time, ax_tok):
        ax.set_ylim(None, min(9.0, ax.get_ylim()[1]))
        ax.legend(fontsize=8)
    common.save_figure(fig, out / "recurrent_lm.png")
    common.write_results(out, results, started)


if __name__ == "__main__":
    sys.exit(main())
