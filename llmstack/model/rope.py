"""Rotary position embeddings (RoPE) and the ways to stretch them past the trained context.

RoPE rotates each pair of channels of q and k by an angle proportional to the
token's position, so that q·k depends only on the distance between tokens.
We use the "rotate half" layout (channel i pairs with channel i + d/2), the one
Llama checkpoints on the Hugging Face hub are stored in.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from llmstack.model.config import RopeScaling


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) in float32, and the factor applied to cos/sin (YaRN)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    attention_factor = 1.0
    if scaling is None or scaling.factor == 1.0 and scaling.type != "llama3":
        return inv_freq.float(), attention_factor

    factor = scaling.factor
    if scaling.type == "linear":  # position interpolation: positions / factor
        inv_freq = inv_freq / factor
    elif scaling.type == "ntk":  # NTK-aware: grow the base so the lowest frequency stretches by `factor`
        inv_freq = 1.0 / ((theta * factor ** (head_dim / (head_dim - 2))) ** exponents)
    elif scaling.type == "llama3":
        # Long wavelengths (> old context / low_freq_factor) are interpolated, short ones
        # (< old context / high_freq_factor) kept, the band between blended smoothly.
        old = scaling.original_max_seq_len
        low_wavelen = old / scaling.low_freq_factor
        high_wavelen = old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(between, blended, inv_freq)
    elif scaling.type == "yarn":
        # NTK-by-parts: dimensions that rotate fewer than beta_slow times over the old
        # context are interpolated, more than beta_fast times kept, a linear ramp between.
        old = scaling.original_max_seq_len

        def dim_for_rotations(n_rot: float) -> float:
            return head_dim * math.log(old / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(dim_for_rotations(scaling.beta_fast)), 0)
        high = min(math.ceil(dim_for_rotations(scaling.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (keep original), 0: interpolate
        inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
        attention_factor = scaling.attention_factor or (0.1 * math.log(factor) + 1.0)
    else:
        raise ValueError(f"unknown RoPE scaling type {scaling.type!r}")
    return inv_freq.float(), attention_factor


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (*positions.shape, head_dim), computed in float32, returned in `dtype`.

    The first half of sin is negated ahead of time, so that `apply_rope` needs no
    negation on every layer."""
    angles = positions.float()[..., None] * inv_freq  # (..., T, d/2)
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    # (..., T, d): channel i and i + d/2 share an angle
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the cos/sin of `rope_cos_sin`, of shape (T, D) or (B, T, D).

    With x = [x1, x2] (halves), the result is [x1 cos - x2 sin, x2 cos + x1 sin]:
    x * cos + [x2, x1] * [-sin, sin]."""
    if cos.dim() == 3:  # per-row positions: (B, T, D) -> (B, 1, T, D)
        cos, sin = cos[:, None], sin[:, None]
    if torch.is_grad_enabled() and x.requires_grad:
        return RotaryFunction.apply(x, cos, sin)
    return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + [x2, x1] * sin, without building [x2, x1]: one new tensor instead of four."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half])
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


class RotaryFunction(torch.autograd.Function):
    """RoPE with its gradient written out. A rotation's inverse is its transpose, the
    rotation by minus the angle, so dx = rotate(dy, cos, -sin): one new tensor in the
    backward pass where autograd makes four (tests/test_model.py checks it against autograd)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, -sin), None, None
