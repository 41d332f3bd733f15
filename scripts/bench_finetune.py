"""Full fine-tuning, LoRA and QLoRA on the same model and batch: what each trains, what it holds
in memory, and how long a step takes; then our LoRA step against transformers + PEFT.

For each method (full: every parameter trains; lora: `apply_lora` on --targets; qlora: the
linear layers quantized to nf4 by `quantize_`, then the same LoRA), in a fresh subprocess so
that each one's peak memory is its own:
- trainable parameters;
- bytes of weights (every parameter and buffer as stored: nf4 codes and statistics for qlora),
  of gradients and of the AdamW state, counted from the tensors that exist after a step;
- peak memory of the steps: on CUDA torch.cuda.max_memory_allocated (everything allocated,
  weights included); on the CPU the growth of the process's peak resident set (VmHWM, reset
  after the model is built and glibc's free memory is returned by malloc_trim) over its resident
  set before the first step: gradients, optimizer state and the activations and temporaries of a
  step, not the weights;
- the median time of a step: forward, loss (mean next-token cross-entropy), backward, AdamW.

Then LoRA against PEFT: `peft.get_peft_model` with the same rank, alpha and target modules on
the transformers twin of the same weights (`benchlib.hf_twin`), the same batch, a step each
timed alternately (`benchlib.time_pair`); ratio > 1.0x means ours is faster. Each library
computes the loss its usual way: ours `model(x, targets=y)` (head and loss fused in chunks),
transformers the logits, then F.cross_entropy.

    python scripts/bench_finetune.py --threads 1                       # benchlib's random Llama (~12M)
    python scripts/bench_finetune.py --threads 1 --quick               # a fast smoke run (explicit flags apply)
    python scripts/bench_finetune.py --checkpoint "$(python -c 'import llmstack; print(llmstack.smollm2_path())')" \\
        --threads 1 --batch-size 2 --seq-len 256 --targets q k v o gate up down
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch

from benchlib import device_name, hf_twin, quick_defaults, random_llama, time_pair
from llmstack.cli import add_device_argument, positive_int, script_parser
from llmstack.config import ConfigError
from llmstack.finetune import TARGETS, apply_lora, count_parameters
from llmstack.runtime import resolve_device, set_threads

METHODS = ("full", "lora", "qlora")
HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj"}


def load_model(args, device: torch.device) -> torch.nn.Module:
    import llmstack

    if args.checkpoint:
        model = llmstack.from_pretrained(args.checkpoint)
    else:
        model = random_llama(max_seq_len=max(512, args.seq_len))
    return model.float().to(device).train()


def prepare(method: str, model: torch.nn.Module, args) -> torch.nn.Module:
    if method == "full":
        return model.requires_grad_(True)
    if method == "qlora":
        from llmstack.inference.quantize import quantize_

        quantize_(model, "nf4")
    return apply_lora(model, rank=args.rank, alpha=args.alpha, targets=args.targets)


def batch(args, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=g).to(device)
    return seq[:, :-1], seq[:, 1:]


def our_step(model, opt, x, y):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        (model(x, targets=y) / y.numel()).backward()
        opt.step()
    return step


def hf_step(model, opt, x, y):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).backward()
        opt.step()
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_memory() -> None:
    """Give the memory glibc's allocator holds freed (loading, quantizing) back to the system: else
    the steps would reuse it unseen by the resident set, and their growth would understate them."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def measure(method: str, args, device: torch.device) -> dict:
    """One method's row, measured in this (fresh) process."""
    import gc

    model = prepare(method, load_model(args, device), args)
    x, y = batch(args, model.config.vocab_size, device)
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    step = our_step(model, opt, x, y)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _release_free_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
            rss_before = _status_kib("VmRSS") * 1024
        except (OSError, RuntimeError):  # not Linux, or not allowed: no honest CPU peak to give
            rss_before = None
    times = []
    for _ in range(args.iters + 1):  # the first step (allocating the optimizer state) is not timed
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = None if rss_before is None else _status_kib("VmHWM") * 1024 - rss_before
    stored = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return dict(
        method=method, trainable=trainable, total=total,
        weights=sum(t.nbytes for t in stored.values()),
        grads=sum(p.grad.nbytes for p in params if p.grad is not None),
        optimizer=sum(t.nbytes for state in opt.state.values() for t in state.values() if torch.is_tensor(t)),
        peak=peak, step=median(times[1:]))


def measure_in_subprocess(method: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--measure", method], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: measuring {method} failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peft_comparison(args, device: torch.device) -> tuple[float, float]:
    """(our LoRA step, PEFT's LoRA step), median seconds, timed alternately."""
    import peft

    model = load_model(args, device)
    hf = hf_twin(model, device=device).float().train()
    apply_lora(model, rank=args.rank, alpha=args.alpha, targets=args.targets)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                 target_modules=[HF_NAMES[t] for t in args.targets]))
    if count_parameters(model)[0] != sum(p.numel() for p in hf.parameters() if p.requires_grad):
        raise RuntimeError("our LoRA and PEFT's train different parameter counts")
    x, y = batch(args, model.config.vocab_size, device)
    ours = our_step(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4), x, y)
    theirs = hf_step(hf, torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4), x, y)
    return time_pair(ours, theirs, 1, args.iters, device=device)


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", help="any llmstack.from_pretrained path (default: benchlib's random Llama, "
                                             "~12M parameters)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="sequences per step (default 4)")
    parser.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default 256)")
    parser.add_argument("--rank", type=positive_int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=["q", "k", "v", "o"],
                        help="layers the adapters go on (default q k v o)")
    parser.add_argument("--iters", type=positive_int, default=None, help="timed steps of each (default 10)")
    add_device_argument(parser)
    parser.add_argument("--quick", action="store_true",
                        help="batch 2 of 64 tokens, 3 steps (a smoke run); flags given explicitly keep their value")
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)  # one method, in a subprocess
    args = parser.parse_args()
    quick_defaults(args, args.quick, dict(batch_size=(4, 2), seq_len=(256, 64), iters=(10, 3)))
    try:
        threads = set_threads(args.threads)
        device = resolve_device(args.device)
    except ConfigError as e:
        sys.exit(f"error: {e}")

    if args.measure:
        torch.manual_seed(0)
        print(json.dumps(measure(args.measure, args, device)))
        return

    argv = [*sys.argv[1:], "--threads", str(threads), "--device", str(device)]  # the children do as we do
    print(f"device: {device_name(device)} ({device.type}) | torch {torch.__version__} | {threads} threads | "
          f"float32 | pid {os.getpid()}")
    model_name = args.checkpoint or "benchlib.random_llama (BENCH_LLAMA)"
    print(f"model: {model_name} | batch {args.batch_size} x {args.seq_len} tokens | LoRA rank {args.rank}, "
          f"alpha {args.alpha:g} on {' '.join(args.targets)} | AdamW | median of {args.iters} steps")
    rows = [measure_in_subprocess(m, argv) for m in METHODS]
    peak_label = "peak MiB" if device.type == "cuda" else "peak RSS+ MiB"
    print(f"\n| {'method':<6} | {'trainable':>12} | {'weights MiB':>11} | {'grads MiB':>9} | {'AdamW MiB':>9} | "
          f"{'sum MiB':>8} | {peak_label:>13} | {'step ms':>8} |")
    print(f"|{'-' * 8}|{'-' * 14}|{'-' * 13}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 15}|{'-' * 10}|")
    mib = 2 ** 20
    for r in rows:
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / mib:.1f}"
        print(f"| {r['method']:<6} | {r['trainable']:>12,d} | {r['weights'] / mib:>11.2f} | {r['grads'] / mib:>9.2f} | "
              f"{r['optimizer'] / mib:>9.2f} | {(r['weights'] + r['grads'] + r['optimizer']) / mib:>8.2f} | "
              f"{peak:>13} | {r['step'] * 1e3:>8.1f} |")
    if device.type == "cuda":
        print("\npeak MiB: torch.cuda.max_memory_allocated over the steps (weights included).")
    else:
        print("\npeak RSS+ MiB: growth of the process's peak resident set over its resident set before the first "
              "step (each method in a fresh process): gradients, AdamW state, activations; not the weights.")

    ours, theirs = peft_comparison(args, device)
    print(f"\nLoRA step, same batch, timed alternately: llmstack {ours * 1e3:.1f} ms | transformers + PEFT "
          f"{theirs * 1e3:.1f} ms | {theirs / ours:.2f}x (> 1.0x: llmstack faster)")


if __name__ == "__main__":
    main()
