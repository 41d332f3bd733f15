"""What the attention kernels share: conventions, argument checks, masks and launch helpers.

Conventions of `flash_attention.py` and `flash_decode.py`:
  * q is (batch, q_heads, q_len, head_dim); k and v are (batch, kv_heads, kv_len,
    head_dim) with q_heads a multiple of kv_heads (MHA, GQA, MQA).
  * The queries are the *last* q_len of the kv_len key slots, so the causal mask
    is aligned bottom-right: query i sits at absolute position p = i + kv_len - q_len
    and sees keys j <= p. A sliding `window` further limits it to keys j > p - window.
  * Scores are kept in base 2: qk_scale = scale * log2(e), so exp(x) becomes
    exp2(x * log2 e), which is one MUFU instruction on NVIDIA GPUs.
  * The log-sum-exp saved for backward (LSE) is also in base 2, fp32,
    shape (batch, q_heads, q_len), contiguous.
  * A query row that sees no key at all (causal with q_len > kv_len, or an
    empty cache) gets output 0 and LSE = +inf, so its backward terms are 0
    instead of NaN. (torch's SDPA returns NaN for such rows.)
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Read once at import: triton.jit itself decides at decoration time whether to
# build interpreted kernels, so the environment variable must be set before
# this module (or triton) is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_available() -> bool:
    """True when the kernels can run here: on a CUDA/ROCm GPU, or on the CPU under TRITON_INTERPRET=1."""
    return torch.cuda.is_available() or _INTERPRET


@triton.jit
def _visible(q_pos, k_idx, kv_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Which (query, key) pairs may attend; q_pos is the query's absolute position."""
    vis = k_idx < kv_len
    if CAUSAL:
        vis = vis & (k_idx <= q_pos)
    if HAS_WINDOW:
        vis = vis & (k_idx > q_pos - window)
    return vis


@triton.jit
def _decode_queries(Q, b, kv_h, kv_len, s_qb, s_qh, s_qm, s_qd, GROUP, Q_LEN, window, split, split_size,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """A decode program's query rows and key range. Rows are (query head in the group, query token)
    pairs, r = g * Q_LEN + t, all the query heads one KV head serves; the queries are the last Q_LEN
    of the row's kv_len keys (bottom-right causal alignment); the split covers keys [start, end)."""
    rows = tl.arange(0, BLOCK_R)
    r_ok = rows < GROUP * Q_LEN
    t = rows % Q_LEN
    h = kv_h * GROUP + rows // Q_LEN
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * s_qb + h[:, None] * s_qh + t[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = t + kv_len - Q_LEN
    start = split * split_size
    end = tl.minimum(start + split_size, kv_len)
    if HAS_WINDOW:
        start = tl.maximum(start, kv_len - Q_LEN - window + 1)  # oldest key any row's window reaches
    return q, q_pos, r_ok, t, h, offs_d, d_ok, start, end


@triton.jit
def _online_softmax_tile(qk, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One tile of keys in the streaming softmax of the decode kernels: qk (rows, keys) in base 2
    with -inf where a key is not visible, v (keys, D). Returns the running max, the normaliser and
    the unnormalised output after the tile (a row with no visible key so far keeps max -inf, sum 0)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _store_split(acc, l_i, m_i, O_part, LSE_part, b, h, t, r_ok, offs_d, H_Q, Q_LEN, NUM_SPLITS, split,
                 BLOCK_D: tl.constexpr):
    """A decode split's normalised output and base-2 log-sum-exp, for the combine kernel to merge; an
    empty split (past its row's length) gets LSE -inf, weight 0."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    part = (b * H_Q + h) * Q_LEN + t  # row of the (batch, q_head, q_len) output
    tl.store(LSE_part + part * NUM_SPLITS + split, lse, mask=r_ok)
    tl.store(O_part + (part * NUM_SPLITS + split)[:, None] * BLOCK_D + offs_d[None, :], acc, mask=r_ok[:, None])



def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int]) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k disagree on batch or head_dim: {tuple(q.shape)} vs {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q_heads ({q.shape[1]}) must be a multiple of kv_heads ({k.shape[1]}), kv_heads >= 1")
    _check_inputs(q, k, v, window, names="q, k, v")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int], *, names: str,
                  others: tuple = ()) -> None:
    """What every kernel entry checks once the shapes agree: one supported dtype, one device (with
    `others`, e.g. a block table), a head_dim the kernels take, the window, and a GPU or the interpreter."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"{names} must share one dtype of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if _INTERPRET and q.dtype == torch.bfloat16:
        raise ValueError("bfloat16 is computed wrongly by Triton's interpreter (TRITON_INTERPRET=1); use float32 "
                         "or float16 on the CPU")
    devices = [t.device for t in (q, k, v, *others)]
    if any(d != q.device for d in devices):
        raise ValueError(f"{names} must be on one device; got {', '.join(map(str, devices))}")
    if q.shape[3] > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[3]} > {_MAX_HEAD_DIM} is not supported")
    if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1):
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if q.device.type == "cpu" and not _INTERPRET:
        raise RuntimeError("Triton kernels need a GPU; on the CPU set TRITON_INTERPRET=1 before importing triton")


def _common(q: torch.Tensor, k: torch.Tensor, scale: Optional[float], causal: bool,
            window: Optional[int]) -> tuple[dict, float]:
    """(arguments shared by every kernel, the resolved softmax scale)."""
    head_dim = q.shape[3]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    return dict(
        H_Q=q.shape[1], GROUP=q.shape[1] // k.shape[1], Q_LEN=q.shape[2], KV_LEN=k.shape[2],
        window=window or 0,
        # The tensor cores take whole powers of two (and at least 16) along head_dim;
        # dims like 80 or 96 are padded and masked.
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        CAUSAL=causal, HAS_WINDOW=window is not None,
        # fp32 inputs: exact fp32 dots (tf32 would cost ~1e-3 relative error). Half inputs:
        # the backend's default (naming "tf32" would not compile where it is not offered, e.g. ROCm).
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
    ), scale


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def _device_ctx(t: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# CUDA's limit on a grid's second axis, where every kernel here puts batch * heads.
_MAX_GRID_Y = 65535


def _chunk_batch(fn):
    """Run a launcher on slices of the batch when batch * heads would pass the grid's limit.
    Every tensor argument and result of the launchers has the batch first; the first argument
    has the most heads."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        B, H = args[0].shape[:2]
        if B * H <= _MAX_GRID_Y:
            return fn(*args, **kwargs)
        step = _MAX_GRID_Y // H

        def cut(x, rows):
            return x[rows] if isinstance(x, torch.Tensor) else x

        parts = [fn(*(cut(a, rows) for a in args), **{key: cut(a, rows) for key, a in kwargs.items()})
                 for rows in (slice(i, i + step) for i in range(0, B, step))]
        return tuple(torch.cat(outs) for outs in zip(*parts))
    return run
