"""Running a trained model past its trained context: RoPE scaling applied at inference.

RoPE encodes the distance between two tokens as rotation angles. Past the
trained context a model meets angles (for the slow-rotating channels) it never
saw, and its loss climbs. The scalings in `llmstack.model.rope` map the longer
range back onto angles it knows: linear interpolation divides every position by
the factor, NTK-aware scaling grows the base so mostly the slow channels
stretch, YaRN and Llama-3 interpolate only the slow channels and keep the fast
ones (YaRN also sharpens attention). A sliding window of the trained length is
the other way: distances never exceed what training saw, at the price of
forgetting what lies further back.

    extend_context(model, 4 * model.config.max_seq_len, scaling="yarn")
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmstack.config import is_int
from llmstack.inference.generate import evaluating
from llmstack.model import RopeScaling
from llmstack.model.rope import rope_frequencies

SCALINGS = ("linear", "ntk", "yarn", "llama3")


def trained_context(model: nn.Module) -> int:
    """The context the model was trained at: `original_max_seq_len` of its RoPE scaling, if any."""
    cfg = model.config
    return cfg.rope_scaling.original_max_seq_len if cfg.rope_scaling is not None else cfg.max_seq_len


def extend_context(model: nn.Module, new_max_seq_len: int, scaling: Optional[str] = "linear",
                   factor: Optional[float] = None, *, sliding_window: Optional[int] = None) -> nn.Module:
    """Let a built (trained) model run on up to `new_max_seq_len` tokens. Returns the model, changed in place.

    scaling: "linear", "ntk", "yarn", "llama3", or None to keep the RoPE as it is
             (plain extrapolation). A scaling replaces any the model had, keeping the
             trained context as `original_max_seq_len`.
    factor:  how far the positions stretch; default new_max_seq_len / trained context.
    sliding_window: also limit every query to this many keys (e.g. the trained length).

    The model gets a new config object (other models built from the same config are not
    touched), its RoPE frequencies and attention factor are recomputed; no weight changes.
    """
    cfg = model.config
    trained = trained_context(model)
    if scaling is not None and scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {', '.join(SCALINGS)} or None, got {scaling!r}")
    if not is_int(new_max_seq_len) or new_max_seq_len < trained:
        raise ValueError(f"new_max_seq_len must be an integer >= the trained context ({trained}), "
                         f"got {new_max_seq_len!r}")
    if scaling is not None and cfg.pos != "rope":
        raise ValueError(f"RoPE scaling needs model.pos='rope', this model uses {cfg.pos!r}")
    if cfg.pos == "learned" and new_max_seq_len > cfg.max_seq_len:
        raise ValueError(f"a learned position table has no rows past model.max_seq_len={cfg.max_seq_len}")
    if scaling is None and factor not in (None, 1.0):
        raise ValueError(f"factor={factor} needs a scaling (one of {', '.join(SCALINGS)})")
    factor = new_max_seq_len / trained if factor is None else factor
    if not factor >= 1.0:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")

    rope_scaling = cfg.rope_scaling
    if scaling is not None:
        rope_scaling = RopeScaling(type=scaling, factor=float(factor), original_max_seq_len=trained)
    new_cfg = dataclasses.replace(cfg, max_seq_len=new_max_seq_len, rope_scaling=rope_scaling,
                                  sliding_window=sliding_window if sliding_window is not None else cfg.sliding_window)
    new_cfg.validate()
    for module in model.modules():  # Attention and friends hold the config object itself
        if getattr(module, "config", None) is cfg:
            module.config = new_cfg
    if cfg.pos == "rope":
        model.init_buffers()
        _, model.rope_attention_factor = rope_frequencies(new_cfg.head_dim, new_cfg.rope_theta, new_cfg.rope_scaling)
    return model


@torch.no_grad()
def loss_by_position(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token loss (nats) at each position over token windows (N, T + 1): a (T,) tensor.
    Position t is the loss of predicting token t + 1 having seen tokens 0..t."""
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    with evaluating(model):
        for chunk in windows.split(batch_size):
            logits = model(chunk[:, :-1])  # (B, T, V)
            loss = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none")  # (B, T)
            total += loss.sum(0).double().cpu()
    return (total / len(windows)).float()
