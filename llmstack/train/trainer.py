"""The training loop, shared by pretraining and (later) fine-tuning: it takes a loss function.

    result = train(model, cfg.train, batches, val_batches=val, run_dir="runs/x", tokenizer=tok, job_config=cfg)

One optimizer step per `step`: `grad_accum` micro-batches, each loss summed over
its tokens and divided by the token count of the *whole* step, so accumulation
gives the same gradient as one big batch whatever the padding.

Ctrl-C finishes the current step, saves, and stops (`StopOnInterrupt`); a resumed run
then continues bit for bit as if it had never stopped: same batches, RNG, optimizer
state and metrics rows.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from llmstack.config import ConfigError
from llmstack.distributed import Parallelism
from llmstack.eval.perplexity import evaluate, unpack_batch
from llmstack.train.config import TrainConfig
from llmstack.train.checkpoint import (FullWeights, checkpoint_step, latest_checkpoint, load_latest_checkpoint,
                                       save_checkpoint)
from llmstack.train.interrupt import StopOnInterrupt
from llmstack.train.metrics import MetricsLogger, plot_metrics
from llmstack.train.optim import build_optimizer, param_groups
from llmstack.train.recompute import apply_activation_checkpointing, checkpointed_blocks
from llmstack.train.schedule import lr_multiplier

# Dense bf16 peak FLOP/s, for the MFU estimate.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
              "4090": 165e12, "3090": 71e12}


class TrainingError(RuntimeError):
    pass


class NullLogger:
    """What ranks other than 0 log to."""

    def log(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def next_token_loss(model, batch) -> tuple[torch.Tensor, int, dict]:
    """Summed next-token cross-entropy over targets != -100, the token count, extra metrics.
    A batch is (x, y), or (x, y, keyword arguments for the model): a packed batch's positions and
    document mask (`llmstack.data.ChatBatches`). A MoE model's auxiliary loss is added, scaled by
    the token count so the trainer's division by tokens leaves it at its configured weight."""
    x, y, kwargs = unpack_batch(batch)
    loss, aux = model(x, targets=y, return_aux=True, **kwargs)  # the head and the loss fused, chunk by chunk
    n = int((y != -100).sum())
    metrics = {}
    if aux.get("aux_loss") is not None:
        loss = loss + aux["aux_loss"] * n
        metrics["aux_loss"] = aux["aux_loss"].item()
    return loss, n, metrics


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


@dataclass
class TrainResult:
    step: int
    train_loss: float
    val: dict
    bad_steps: int
    checkpoint: Optional[Path]
    first_val: Optional[dict] = None


def train(model: torch.nn.Module, cfg: TrainConfig, batches, *, val_batches=None, run_dir: str | Path,
          tokenizer=None, job_config: Any = None, loss_fn: Callable = next_token_loss, resume: bool = False,
          bytes_per_token: Optional[float] = None, flops_per_token: Optional[float] = None,
          progress: bool = True, weights: Optional[FullWeights] = None,
          evaluate_fn: Optional[Callable] = None, parallel: Optional[Parallelism] = None) -> TrainResult:
    """Train `model` for cfg.max_steps optimizer steps on `batches` (`get_batch(step, micro_step)`),
    evaluating on `val_batches` (`eval_batches(n)`), checkpointing into `run_dir`. Only parameters
    with requires_grad train (a frozen base with adapters: the adapters). `weights` says how
    checkpoints keep the weights (default: all of them, `FullWeights`).

    A batch is a tuple whose second element counts what the loss is summed over: its entries
    other than -100 (the target tokens; one per pair for a preference loss), so that the step's
    gradient is that of the mean. `loss_fn(model, batch)` returns (summed loss, count, metrics).
    `evaluate_fn(model, batches)` replaces the validation loss and perplexity: its dict, with
    a "loss", is logged with val_ before each key. `parallel` (`llmstack.distributed.Parallelism`,
    after its process group is joined) spreads the step over processes; `batches` then give this
    rank's slice of each global batch."""
    cfg.validate()
    run_dir = Path(run_dir)
    device = next(model.parameters()).device
    if cfg.activation_checkpointing != "none" and not checkpointed_blocks(model):
        try:
            apply_activation_checkpointing(model, cfg.activation_checkpointing, every=cfg.ac_every,
                                           policy=cfg.ac_policy)
        except ValueError as e:
            raise ConfigError(f"train.activation_checkpointing={cfg.activation_checkpointing}: {e}") from None
    plan = parallel or Parallelism(device=device)
    plan.check_loss(loss_fn, next_token_loss)
    rank, world = plan.rank, plan.world  # rank 0 writes metrics and the progress bar
    # How a single process's optimizer numbers the parameters (a checkpoint's optimizer state), then the
    # model split over the processes: `model` is what this rank trains, `forward_model` what it calls.
    names = {id(p): n for n, p in model.named_parameters()}
    model, forward_model = plan.parallelize(model, [names[id(p)] for g in param_groups(model, 0.0)
                                                    for p in g["params"]])
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                                eps=cfg.eps, shard=plan.zero1)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    autocast = autocast_for(cfg.precision, device)
    step, total_bad, tokens_seen, last_ckpt = 0, 0, 0, None
    if resume and (found := load_latest_checkpoint(run_dir, model, optimizer, scaler, weights, plan)) is not None:
        last_ckpt, state = found
        step, total_bad, tokens_seen = state["step"], state.get("bad_steps", 0), state.get("tokens_seen", 0)
    start_step = step
    # What the loss is summed over, for the metrics' names: tokens, or a loss function's own `unit`
    # (DPO's pairs, RL's answers).
    unit = getattr(loss_fn, "unit", "tokens")
    if cfg.compile and forward_model is not None:
        forward_model = torch.compile(forward_model)
    logger = (MetricsLogger(run_dir, tensorboard=cfg.tensorboard, resume_step=step if last_ckpt else None)
              if rank == 0 else NullLogger())
    # Model FLOPs utilisation: the FLOPs the model needs per token (6N plus attention) at the measured
    # tokens/s, over the device's dense bf16 peak (train.peak_tflops, or the GPU's from PEAK_FLOPS).
    peak = cfg.peak_tflops * 1e12 or next((v for k, v in PEAK_FLOPS.items()
                                           if device.type == "cuda" and k in torch.cuda.get_device_name()), None)

    def run_eval(at_step: int) -> dict:
        if val_batches is None:
            return {}
        if evaluate_fn is not None:
            with autocast():
                out = evaluate_fn(model, val_batches.eval_batches(cfg.eval_batches))
            logger.log({"step": at_step, **{f"val_{k}": v for k, v in out.items() if isinstance(v, (int, float))}})
            return out
        out = evaluate(plan.pipeline or model, val_batches.eval_batches(cfg.eval_batches),
                       bytes_per_token=bytes_per_token, autocast=autocast if cfg.precision != "fp32" else None)
        logger.log({"step": at_step, "val_loss": out["loss"], "val_ppl": out["perplexity"],
                    **({"val_bpb": out["bits_per_byte"]} if "bits_per_byte" in out else {})})
        return out

    def checkpoint(at_step: int) -> Path:
        return save_checkpoint(run_dir, step=at_step, model=model, optimizer=optimizer, scaler=scaler,
                               tokenizer=tokenizer, config=job_config if job_config is not None else cfg,
                               extra={"bad_steps": total_bad, "tokens_seen": tokens_seen}, keep_last=cfg.keep_last,
                               weights=weights, plan=plan)

    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, desc="training", unit="step", disable=not progress or rank != 0,
               dynamic_ncols=True)
    (plan.pipeline or model).train()
    bad_in_row, bad_kinds, last_loss, val, first_val = 0, set(), float("nan"), {}, None
    t_last, tokens_last = time.perf_counter(), tokens_seen
    # Ctrl-C sets stop.requested and the loop ends at the next step boundary, with every piece
    # of state (weights, optimizer, RNG, step, metrics) where the uninterrupted run had it.
    stop = StopOnInterrupt()
    try:
        with stop:
            if last_ckpt is None:  # a fresh run: the loss before any training
                first_val = run_eval(step)
            while step < cfg.max_steps and not stop.requested:
                lr = cfg.lr * lr_multiplier(step, schedule=cfg.schedule, max_steps=cfg.max_steps,
                                            warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio,
                                            decay_fraction=cfg.decay_fraction)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro = [batches.get_batch(step, m) for m in range(cfg.grad_accum)]
                # Targets of the whole step, all data-parallel slices': each rank's loss is scaled so that
                # the mean of the slices' gradients (DDP, FSDP) is the gradient of the global batch's mean loss.
                n_total = int(plan.sum_over_slices(sum(int((b[1] != -100).sum()) for b in micro)))
                scale = plan.dp_size / max(n_total, 1)
                loss_sum, extra = 0.0, {}
                for batch in micro:
                    if plan.pipeline is not None:  # forward and backward through the stages
                        loss_sum += plan.pipeline.step(batch, scale)
                        continue
                    with autocast():
                        loss, _, extra = loss_fn(forward_model, batch)
                    scaler.scale(loss * scale).backward()
                    loss_sum += loss.item()
                step_loss = plan.sum_over_slices(loss_sum) / max(n_total, 1)
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    grad_norm = plan.clip_grad_norm(model.parameters(), cfg.grad_clip)
                else:
                    grad_norm = float("nan")
                # A non-finite loss, or gradient norm (fp16's scaler handles its own), skips the update.
                nonfinite = ("loss" if not math.isfinite(step_loss) else "gradient norm"
                             if cfg.grad_clip > 0 and not math.isfinite(grad_norm) and not scaler.is_enabled()
                             else None)
                if nonfinite is None:
                    scaler.step(optimizer)
                    scaler.update()
                    tokens_seen += n_total
                    last_loss, bad_in_row, bad_kinds = step_loss, 0, set()
                elif scaler.is_enabled():  # an overflow: the scale backs off
                    if cfg.grad_clip <= 0:
                        scaler.unscale_(optimizer)  # what records it (clipping did so above)
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1  # from here on, `step` counts this step as done: every row below is logged under it
                bar.update(1)
                if nonfinite is not None:
                    bad_in_row, total_bad = bad_in_row + 1, total_bad + 1
                    bad_kinds.add(nonfinite)
                    logger.log({"step": step, "bad_step": True, "nonfinite": nonfinite, "loss": step_loss,
                                "grad_norm": grad_norm})
                    if bad_in_row >= cfg.max_bad_steps:
                        raise TrainingError(nonfinite_message(bad_in_row, bad_kinds, step, latest_checkpoint(run_dir),
                                                              cfg.precision))
                elif step % cfg.log_every == 0 or step == cfg.max_steps:
                    now = time.perf_counter()
                    tps = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                    t_last, tokens_last = now, tokens_seen
                    row = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, unit: tokens_seen,
                           f"{unit}_per_s": tps, **extra}
                    if flops_per_token:  # per device: the step's tokens are spread over all of them
                        row["flops_per_token"] = flops_per_token
                        row["tflops"] = tps * flops_per_token / world / 1e12
                        if peak:
                            row["mfu"] = row["tflops"] * 1e12 / peak
                    logger.log(row)
                    bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", **{f"{unit[:3]}_s": f"{tps:,.0f}"},
                                    **({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else
                                       {"tflops": f"{row['tflops']:.3g}"} if "tflops" in row else {}))
                if step % cfg.eval_every == 0 and step < cfg.max_steps:
                    val = run_eval(step)
                if step % cfg.save_every == 0 and step < cfg.max_steps:
                    last_ckpt = checkpoint(step)
            if step < cfg.max_steps:  # stopped by Ctrl-C, at a step boundary
                if step > 0 and (last_ckpt is None or checkpoint_step(last_ckpt) != step):
                    last_ckpt = checkpoint(step)
            else:  # the end (a run resumed at its end has nothing to add)
                if step > start_step:
                    val = run_eval(step)
                    last_ckpt = checkpoint(step)
                if rank == 0:
                    plot_metrics(run_dir / "metrics.jsonl", run_dir / "loss.png")
    except KeyboardInterrupt:  # a second Ctrl-C
        print(f"\nstopped without saving; the last checkpoint is {latest_checkpoint(run_dir)}")
        raise
    finally:
        bar.close()
        logger.close()
    if step < cfg.max_steps:
        print(f"\ninterrupted: saved {last_ckpt}; continue with --resume" if step > 0 else
              "\ninterrupted before the first step: nothing to save")
        raise KeyboardInterrupt
    return TrainResult(step=step, train_loss=last_loss, val=val, bad_steps=total_bad, checkpoint=last_ckpt,
                       first_val=first_val)


def nonfinite_message(in_row: int, kinds: set, step: int, checkpoint: Optional[Path], precision: str) -> str:
    """Why the loop stopped: what was non-finite, over which steps, and what is left to resume from."""
    what = " or ".join(sorted(kinds))
    saved = f"the last checkpoint is {checkpoint}" if checkpoint is not None else "no checkpoint was saved"
    return (f"{in_row} steps in a row with a non-finite {what} (steps {step - in_row + 1}-{step}): stopping; "
            f"{saved}. Lower train.lr" + (", or use bf16 instead of fp16" if precision == "fp16" else ""))


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
