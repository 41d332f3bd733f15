"""The machine a job runs on: which device, and how many CPU threads torch uses.

    device = resolve_device(cfg.train.device)     # "auto", "cpu", "cuda", "cuda:1"
    set_threads(args.threads)                     # --threads N, else $LLMSTACK_THREADS, else cores - 1
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from llmstack.config import ConfigError


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device, *, auto: Optional[torch.dtype] = None) -> torch.dtype:
    """A torch dtype from `fp32`, `fp16`, `bf16` or `auto` (`auto`, or bf16 on CUDA and fp32 on the CPU)."""
    if name == "auto":
        return auto or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """A `torch.device` from a config or command-line value: "auto" is CUDA when available, else
    the CPU. A name torch does not know, or a CUDA device this machine lacks, is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ConfigError(f"device {name!r} is not available: torch sees {count} CUDA device(s)"
                              + ("" if torch.cuda.is_available() else " (a CPU-only build or no GPU)"))
    return device


THREADS_ENV = "LLMSTACK_THREADS"


def default_threads() -> int:
    """One fewer than the cores this process may use, and at least one.

    torch's own default, one thread per core, falls off a cliff when anything else runs:
    every parallel region waits for its slowest thread, and a thread that shares a core
    with another busy process waits for that core. A quickstart training step (batch
    16 x 256: forward, backward, clipping, AdamW) on a 2-core machine:

        2 threads: 0.58 s idle; 1.91 s beside a busy `while True: pass`; 2.04 s beside a
                   second training job (also 2 threads)
        1 thread:  0.97 s idle; 0.99 s beside the busy loop;          1.00 s beside a
                   second training job (also 1 thread)

    Leaving one core free costs up to 1.7x on an idle 2-core machine (less with more cores)
    and saves 2x, or far more, on a busy one. The count depends only on the machine, not on
    its load at startup, so a resumed run uses the count of the run it continues: another
    count may change the float results in the last bits. On a machine you have to yourself,
    --threads or $LLMSTACK_THREADS set to all cores is faster."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def set_threads(n: Optional[int] = None) -> int:
    """Set how many CPU threads torch uses, and return the count: `n` (a script's --threads),
    else $LLMSTACK_THREADS, else the count torch took from $OMP_NUM_THREADS when that is set,
    else `default_threads()`. A count below 1, or an environment value that is not an
    integer, is a ConfigError."""
    source = "--threads"
    if n is None:
        text = os.environ.get(THREADS_ENV, "").strip()
        if not text:
            if os.environ.get("OMP_NUM_THREADS", "").strip():
                return torch.get_num_threads()
            n = default_threads()
        else:
            source = THREADS_ENV
            try:
                n = int(text)
            except ValueError:
                raise ConfigError(f"{THREADS_ENV}={text!r}: the thread count must be an integer >= 1") from None
    if n < 1:
        raise ConfigError(f"{source} must be an integer >= 1, got {n}")
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n
