"""Batches of fixed-length windows drawn deterministically from (seed, step).

There is no iterator state: the batch for step s is a pure function of
(seed, s, micro_step), so a resumed run sees exactly the batches the
uninterrupted run would have, with nothing to save but the step.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from llmstack.data.corpus import DataError


class TokenBatches:
    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0,
                 device: Optional[torch.device | str] = None, name: str = "train"):
        if len(tokens) < seq_len + 1:
            raise DataError(f"the {name} split has only {len(tokens)} tokens; need at least seq_len+1 = "
                            f"{seq_len + 1}: lower data.seq_len or use a bigger corpus")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.device = seed, torch.device(device or "cpu")

    def _windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        chunk = torch.from_numpy(self.tokens[idx].astype(np.int64))  # (B, T + 1)
        x, y = chunk[:, :-1], chunk[:, 1:]
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def get_batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape (batch_size, seq_len); y is x shifted by one token."""
        rng = np.random.default_rng([self.seed, step, micro_step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        return self._windows(starts)

    def eval_batches(self, n_batches: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows, the same every time: all of the split, or with `n_batches`
        that many batches of windows spread evenly over it. A prefix of the split would be a
        biased sample: a corpus is ordered by document, and the first documents are no
        more typical than the last."""
        n_windows = (len(self.tokens) - 1) // self.seq_len
        total = n_windows // self.batch_size
        if n_batches is not None:
            total = min(total, n_batches)
        if total == 0:  # fewer windows than a batch: one short batch
            yield self._windows(np.arange(max(n_windows, 1)) * self.seq_len)
            return
        # Window indices evenly spaced over the split (every window when all are asked for).
        picked = np.arange(total * self.batch_size) * n_windows // (total * self.batch_size)
        for b in range(total):
            yield self._windows(picked[b * self.batch_size:(b + 1) * self.batch_size] * self.seq_len)

    def all_windows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every complete window of the split, in order: consecutive, non-overlapping (each window's
        last target is the next one's first input), in batches of batch_size, the last batch smaller
        when the windows do not fill it. What scoring a whole text needs; only the tail shorter
        than a window is left out."""
        starts = np.arange((len(self.tokens) - 1) // self.seq_len) * self.seq_len
        for b in range(0, len(starts), self.batch_size):
            yield self._windows(starts[b:b + self.batch_size])

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len}
