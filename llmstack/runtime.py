"""The machine a job runs on: which device, and how many CPU threads torch uses."""
from __future__ import annotations

import torch

from llmstack.config import ConfigError


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
