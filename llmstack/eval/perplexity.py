"""Validation loss, perplexity and bits per byte."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch


def unpack_batch(batch: tuple) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(x, y, model keyword arguments) of a batch given as (x, y) or (x, y, kwargs)."""
    if len(batch) == 2:
        return batch[0], batch[1], {}
    return batch[0], batch[1], batch[2]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple], *,
             bytes_per_token: Optional[float] = None, autocast=None) -> dict:
    """Mean next-token loss (nats) over all target tokens; perplexity = exp(loss); bits per
    byte = loss / ln 2 / bytes_per_token, comparable across tokenizers. Batches are (x, y) or
    (x, y, keyword arguments for the model), as the trainer takes them."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        x, y, kwargs = unpack_batch(batch)
        with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
            total += model(x, targets=y, **kwargs).item()  # summed, float32, without (B, T, vocab) logits
        count += int((y != -100).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
    if bytes_per_token:
        out["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    return out
