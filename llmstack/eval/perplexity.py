"""Validation loss, perplexity and bits per byte."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             bytes_per_token: Optional[float] = None, autocast=None) -> dict:
    """Mean next-token loss (nats) over all target tokens; perplexity = exp(loss); bits per
    byte = loss / ln 2 / bytes_per_token, comparable across tokenizers."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
            total += model(x, targets=y).item()  # summed, float32, without (B, T, vocab) logits
        count += int((y != -100).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
    if bytes_per_token:
        out["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    return out
