"""Learning-rate schedules as pure functions of the step (nothing to save but the step)."""
from __future__ import annotations

import math


def lr_multiplier(step: int, *, schedule: str, max_steps: int, warmup_steps: int, min_lr_ratio: float = 0.1,
                  decay_fraction: float = 0.2) -> float:
    """Factor on the peak learning rate at `step` (0-based).

    All schedules warm up linearly over `warmup_steps` (large early updates from
    random weights destabilise Adam's moment estimates), then:
    cosine:   half a cosine from 1 down to min_lr_ratio at max_steps;
    linear:   a straight line down to min_lr_ratio;
    wsd:      warmup-stable-decay: flat at 1, then linear to min_lr_ratio over the
              last `decay_fraction` of the steps (can be branched off at any time);
    constant: flat at 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - (1 - min_lr_ratio) * progress
    if schedule == "wsd":
        decay_start = max_steps - int(decay_fraction * max_steps)
        if step < decay_start:
            return 1.0
        return 1.0 - (1 - min_lr_ratio) * min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    raise ValueError(f"unknown schedule {schedule!r}")
