"""LSTM vs GRU vs the quickstart Transformer: validation loss at equal parameters and equal wall-clock.

The three pretraining jobs `configs/pretrain/{quickstart,lstm,gru}.yaml` (2.35-2.36M
parameters each, the same corpus, tokenizer, batches, optimizer and schedule) run through
`llmstack.train.pretrain`, the loop `scripts/pretrain.py` runs, shortened so that the whole
experiment takes minutes (the quickstart's 300 steps took 19 minutes for the three on one
thread): the Transformer trains for 100 steps, and each recurrent model for as many steps as
take the same time. Every run warms up over its first 10% of steps (the quickstart's 30 of
300) and decays by its cosine over the rest.

The step times that set those step counts come first: a training step of each model in turn
(the job's model, batch shape and optimizer; forward, backward, clipping, update), 3 untimed
then 8 timed rounds, the median of each, in CPU time of this process. On one thread that is
the wall-clock time of a step on an idle core, and unlike wall-clock it does not grow when
other work shares the core (a 20-step wall-clock probe on a busy machine measured an LSTM at
twice its step time). Each run's own wall-clock step time is also reported: the median of
the intervals of metrics.jsonl that hold no evaluation or checkpoint.
Validation loss is the job's own (train.eval_batches windows of the held-out files) every 25
steps and at the end. Each run directory is a normal checkpoint:
`scripts/generate.py --checkpoint runs/experiments/recurrent_lm/lstm` samples from it.

    python scripts/experiments/recurrent_lm.py          # about 7 minutes on one thread
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

import torch

import common
from llmstack.config import load_config
from llmstack.interop import build
from llmstack.train import PretrainConfig, build_optimizer, pretrain

ROOT = Path(__file__).resolve().parents[2]
JOBS = {"Transformer": "quickstart", "LSTM": "lstm", "GRU": "gru"}
EVAL_EVERY = 25
STEPS = 100  # the Transformer's; the recurrent models get its time
TIMING_ROUNDS, TIMING_WARMUP = 8, 3


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


def job_config(job: str, extra: list[str], *more: str) -> PretrainConfig:
    return load_config(PretrainConfig, ROOT / "configs" / "pretrain" / f"{job}.yaml",
                       overrides=["data.num_proc=1", *more, *extra])


def step_times(extra: list[str], rounds: int, warmup: int) -> dict[str, float]:
    """Median CPU seconds of one training step of each job's model (its batch shape, AdamW with its
    settings, clipping), the models taking turns. Random tokens: a step's cost does not depend
    on their values."""
    steppers = {}
    for name, job in JOBS.items():
        cfg = job_config(job, extra)
        torch.manual_seed(0)
        model = build(cfg.model)
        model.init_weights()
        model.train()
        t = cfg.train
        opt = build_optimizer(model, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), eps=t.eps)
        x = torch.randint(0, cfg.model.vocab_size, (t.batch_size, cfg.data.seq_len + 1))

        def one_step(model=model, opt=opt, x=x, clip=t.grad_clip):
            loss = model(x[:, :-1], targets=x[:, 1:]) / x[:, 1:].numel()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        steppers[name] = one_step
    times = {name: [] for name in steppers}
    for i in range(warmup + rounds):
        for name, one_step in steppers.items():
            t0 = time.process_time()
            one_step()
            if i >= warmup:
                times[name].append(time.process_time() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(name: str, job: str, steps: int, out_dir: Path, extra: list[str]) -> dict:
    """One pretraining job from scratch; its losses and (wall-clock) step time from metrics.jsonl."""
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run, never a resumed one
    cfg = job_config(job, extra, f"train.out_dir={out_dir}", f"train.max_steps={steps}",
                     f"train.eval_every={EVAL_EVERY}", f"train.save_every={steps}",
                     f"train.warmup_steps={max(1, steps // 10)}", "train.log_every=5", "train.resume=never",
                     "train.tensorboard=false")
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


def plot(results: dict, path: Path) -> None:
    """Validation loss against training time (steps x the CPU step time that set the budget: what
    one thread takes on an idle core) and against tokens."""
    plt = common.pyplot()
    fig, (ax_time, ax_tok) = plt.subplots(1, 2, figsize=(12, 4.3))
    runs = results["runs"]
    for i, (name, r) in enumerate(runs.items()):
        steps, losses = zip(*r["val_curve"])
        step_s = results["probes"][name]["step_s"]
        label = f"{name} ({r['params'] / 1e6:.2f}M params): {r['steps']} steps"
        ax_time.plot([s * step_s for s in steps], losses, marker="o", color=f"C{i}", label=label)
        ax_tok.plot([s * r["tokens"] / r["steps"] / 1e6 for s in steps], losses, marker="o", color=f"C{i}", label=label)
    ax_time.axvline(results["budget_s"], color="k", ls="--", lw=0.8)
    ax_time.set(xlabel="training time (s, one thread: steps x CPU time per step)", ylabel="validation loss (nats/token)",
                title=f"The Transformer's {runs['Transformer']['steps']} steps of training time for each")
    ax_tok.set(xlabel="training tokens (millions)", ylabel="validation loss (nats/token)",
               title="The same runs against tokens")
    for ax in (ax_time, ax_tok):
        ax.set_ylim(None, min(9.0, ax.get_ylim()[1]))
        ax.legend(fontsize=8)
    common.save_figure(fig, path)


def main() -> None:
    args = common.parser(__doc__, "recurrent_lm").parse_args()
    out = common.start(args)
    started = time.perf_counter()
    extra = quick_overrides(out) if args.quick else []
    base_steps, rounds, warmup = (6, 2, 1) if args.quick else (STEPS, TIMING_ROUNDS, TIMING_WARMUP)
    probes = {name: {"step_s": s} for name, s in step_times(extra, rounds, warmup).items()}
    print("CPU seconds per step: " + ", ".join(f"{n} {p['step_s']:.3f} s" for n, p in probes.items()))
    budget = base_steps * probes["Transformer"]["step_s"]  # the Transformer's training time, at the timed rate
    runs = {}
    for name, job in JOBS.items():
        steps = base_steps if name == "Transformer" else max(1, round(budget / probes[name]["step_s"]))
        runs[name] = run(name, job, steps, out / job, extra)
    results = {"runs": runs, "probes": probes, "budget_s": budget, "quick": args.quick,
               "setup": {"configs": {n: f"configs/pretrain/{j}.yaml" for n, j in JOBS.items()},
                         "budget": f"{base_steps} Transformer steps at the interleaved step time; each recurrent model "
                                   "as many steps as that time holds at its own interleaved step time",
                         "timing": f"{warmup} untimed and {rounds} timed interleaved rounds, median",
                         "train_time": "steps x median step time of the run (intervals without evaluation or save)"}}
    print("\n| model | parameters | steps | tokens | CPU s/step | training time | val loss | run's wall s/step |")
    for name, r in runs.items():
        cpu = probes[name]["step_s"]
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['tokens'] / 1e6:.2f}M | {cpu:.3f} | "
              f"{r['steps'] * cpu:.0f} s | {r['val_loss']:.3f} | {r['step_s']:.3f} |")

    plot(results, out / "recurrent_lm.png")
    common.write_results(out, results, started)


if __name__ == "__main__":
    sys.exit(main())
