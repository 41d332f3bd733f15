"""FlashAttention in Triton: forward, backward and split-KV decode.

    out = softmax(Q K^T * scale + mask) V

q is (batch, q_heads, q_len, head_dim); k and v are (batch, kv_heads, kv_len,
head_dim) with q_heads a multiple of kv_heads (MHA, GQA, MQA). The queries are
the *last* q_len of the kv_len key slots, so the causal mask is aligned
bottom-right: query i sits at absolute position p = i + kv_len - q_len and sees
keys j <= p. A sliding `window` further limits it to keys j > p - window.

Layout of this file, as in Triton's fused-attention tutorial:
  1. small @triton.jit helpers (masks, block ranges, masked loads)
  2. forward kernel (tiled, online softmax in base 2, saves log-sum-exp)
  3. backward kernels (delta = rowsum(dO * O), dK/dV, dQ); deterministic
  4. split-KV decode kernels (flash-decoding) for a few queries over a long cache
  5. launchers, the autograd.Function, and the public functions

Conventions every kernel shares:
  * Scores are kept in base 2: qk_scale = scale * log2(e), so exp(x) becomes
    exp2(x * log2 e), which is one MUFU instruction on NVIDIA GPUs.
  * The log-sum-exp saved for backward (LSE) is also in base 2, fp32,
    shape (batch, q_heads, q_len), contiguous.
  * A query row that sees no key at all (causal with q_len > kv_len, or an
    empty cache) gets output 0 and LSE = +inf, so its backward terms are 0
    instead of NaN. (torch's SDPA returns NaN for such rows.)
  * Blocks that need no mask take an unmasked code path (MASK=False); only the
    blocks on the diagonal, the window edge or a ragged tail pay for masking.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
from typing import Callable, Optional, Union

import torch
import triton
import triton.language as tl

from .launch import autotuned

# Read once at import: triton.jit itself decides at decoration time whether to
# build interpreted kernels, so the environment variable must be set before
# this module (or triton) is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_MAX_HEAD_DIM = 256


def is_available() -> bool:
    """True when the kernels can run here: on a CUDA/ROCm GPU, or on the CPU under TRITON_INTERPRET=1."""
    return torch.cuda.is_available() or _INTERPRET


# ---------------------------------------------------------------------------
# Autotuning configurations
# ---------------------------------------------------------------------------
# Under the interpreter every program runs serially in numpy: one small config,
# no benchmarking, and 16x16 tiles so that tests cross many block boundaries.
# On a GPU the tables below target Hopper (H100/H200) and still run elsewhere
# (configs that do not fit in shared memory are skipped by the autotuner).
# Rows are (BLOCK_M, BLOCK_N, num_warps, num_stages), one list per padded head
# dim (BLOCK_D up to 64, 128, 256): the fp32 accumulators grow with the head
# dim, so the tiles that fit in registers shrink. Every row compiles for sm_90
# without register spills and within its 227 KiB of shared memory, as
# `python scripts/check_kernels.py` reports, except the dK/dV rows at 256, where
# no tile avoids a small spill; the autotuner times only the rows of the call's tier.

_FWD_TABLE = {  # BLOCK_M query rows stay resident; BLOCK_N key rows stream past them
    64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 4), (128, 32, 4, 4),
         (64, 64, 4, 3), (64, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 8, 4), (128, 32, 4, 4),
          (64, 64, 4, 3), (64, 64, 4, 4)],
    256: [(64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 4, 4), (128, 64, 8, 2)],
}
_BWD_DKDV_TABLE = {  # BLOCK_N rows of K/V and their dK/dV stay resident; BLOCK_M query rows stream past
    64: [(32, 128, 8, 2), (16, 128, 8, 2), (16, 128, 8, 3), (32, 64, 8, 2), (32, 64, 8, 3), (64, 64, 8, 2),
         (16, 64, 4, 3)],
    128: [(16, 128, 8, 1), (16, 128, 8, 2), (16, 64, 8, 2), (16, 64, 8, 3), (32, 32, 4, 2), (16, 64, 4, 1)],
    256: [(16, 32, 4, 1), (16, 32, 4, 2), (16, 64, 8, 2)],
}
_BWD_DQ_TABLE = {  # like the forward: BLOCK_M query rows and their dQ stay resident
    64: [(128, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3)],
    128: [(128, 32, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3)],
    256: [(128, 32, 8, 2), (64, 32, 4, 3), (64, 32, 4, 2)],
}


def _tiered(table: dict) -> tuple[list, Optional[Callable[[dict], list]]]:
    """(configs, prune) for `autotuned` from a table keyed by the largest BLOCK_D of each tier."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)], None
    tiers = {tier: [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in rows]
             for tier, rows in table.items()}

    def prune(kwargs):
        return tiers[min(tier for tier in tiers if tier >= kwargs["BLOCK_D"])]  # the launchers pass it by name

    return [c for rows in tiers.values() for c in rows], prune


_FWD_CONFIGS, _FWD_PRUNE = _tiered(_FWD_TABLE)
_BWD_DKDV_CONFIGS, _BWD_DKDV_PRUNE = _tiered(_BWD_DKDV_TABLE)
_BWD_DQ_CONFIGS, _BWD_DQ_PRUNE = _tiered(_BWD_DQ_TABLE)


def _decode_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 3), (64, 4, 4)]
    ]


# Lengths enter the autotuning key rounded to a power of two (the *_BUCKET
# arguments, unused inside the kernels): keyed on exact lengths, every new
# prompt length would re-run the whole benchmark sweep.
_FWD_KEY = ["Q_LEN_BUCKET", "KV_LEN_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_WINDOW"]


# ---------------------------------------------------------------------------
# 1. Helpers
# ---------------------------------------------------------------------------


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
def _load(ptrs, row_mask, col_mask, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """tl.load with only the masks that are needed (an unmasked load vectorises best)."""
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=row_mask & col_mask, other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask, other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=col_mask, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _align_ranges(lo, full_lo, full_hi, BLOCK: tl.constexpr):
    """Snap a loop range to block starts. All inputs must be >= 0.

    lo: first index anyone needs; [full_lo, full_hi): indices every row/column of
    the program sees without masking. Returns block-aligned (lo, full_lo, full_hi)
    with lo <= full_lo <= full_hi; the caller runs masked blocks over
    [lo, min(full_lo, hi)), unmasked blocks over [full_lo, full_hi) and masked
    blocks over [full_hi, hi).
    """
    lo = (lo // BLOCK) * BLOCK
    full_lo = tl.maximum(((full_lo + BLOCK - 1) // BLOCK) * BLOCK, lo)
    full_hi = tl.maximum((full_hi // BLOCK) * BLOCK, full_lo)
    return lo, full_lo, full_hi


@triton.jit
def _kv_range(m0, Q_LEN, KV_LEN, window,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key blocks seen by query rows [m0, m0 + BLOCK_M): (lo, full_lo, full_hi, hi).

    Causal block skipping lives here: keys past the last row's diagonal are never
    loaded, nor (with a window) keys before the first row's window.
    """
    q_offset = KV_LEN - Q_LEN  # absolute position of query 0 (bottom-right alignment)
    lo = 0
    hi = KV_LEN
    full_lo = 0
    full_hi = KV_LEN  # rounded down below, so a ragged key tail is always masked
    if CAUSAL:
        hi = tl.minimum(KV_LEN, m0 + BLOCK_M + q_offset)  # last row sees keys <= m0+BLOCK_M-1+q_offset
        full_hi = tl.maximum(tl.minimum(KV_LEN, m0 + q_offset + 1), 0)  # first row sees keys <= m0+q_offset
    if HAS_WINDOW:
        lo = tl.maximum(m0 + q_offset - window + 1, 0)  # first row's oldest key
        full_lo = tl.maximum(m0 + BLOCK_M + q_offset - window, 0)  # last row's oldest key
    lo, full_lo, full_hi = _align_ranges(lo, full_lo, full_hi, BLOCK_N)
    return lo, full_lo, full_hi, hi


@triton.jit
def _q_range(n0, Q_LEN, KV_LEN, window,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query blocks that see keys [n0, n0 + BLOCK_N): (lo, full_lo, full_hi, hi). Mirror of _kv_range."""
    q_offset = KV_LEN - Q_LEN
    lo = 0
    hi = Q_LEN
    full_lo = 0
    full_hi = Q_LEN  # rounded down, so a ragged query tail is always masked
    if CAUSAL:
        lo = tl.maximum(n0 - q_offset, 0)  # first query whose diagonal reaches key n0
        full_lo = tl.maximum(n0 + BLOCK_N - 1 - q_offset, 0)  # first query that sees the whole block
    if HAS_WINDOW:
        hi = tl.minimum(Q_LEN, n0 + BLOCK_N - 1 - q_offset + window)  # last query whose window reaches the block
        full_hi = tl.maximum(tl.minimum(Q_LEN, n0 - q_offset + window), 0)
    # A ragged key tail: every query block must mask the missing keys.
    full_hi = tl.where(n0 + BLOCK_N > KV_LEN, 0, full_hi)
    lo, full_lo, full_hi = _align_ranges(lo, full_lo, full_hi, BLOCK_M)
    return lo, full_lo, full_hi, hi


# ---------------------------------------------------------------------------
# 2. Forward
# ---------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
               offs_m, offs_d, start, end, q_offset, KV_LEN, window, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < KV_LEN
        kT = _load(k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd, n_ok[None, :], d_ok[:, None],
                   MASK, HEAD_DIM != BLOCK_D)  # (BLOCK_D, BLOCK_N)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
        if MASK:
            vis = _visible(offs_m[:, None] + q_offset, offs_n[None, :], KV_LEN, window, CAUSAL, HAS_WINDOW)
            qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASK:
            # A row that has seen no key yet has m = -inf; subtracting 0 instead keeps
            # exp2(-inf - -inf) from turning its zeros into NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, n_ok[:, None], d_ok[None, :],
                  MASK, HEAD_DIM != BLOCK_D)  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@autotuned(_FWD_CONFIGS, _FWD_KEY, _FWD_PRUNE)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
              s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_om, s_od,
              H_Q, GROUP, Q_LEN, KV_LEN, qk_scale, window, Q_LEN_BUCKET, KV_LEN_BUCKET,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)  # one (batch, query head) per program column
    b = (off_bh // H_Q).to(tl.int64)  # int64: batch * stride overflows int32 on big tensors
    h = (off_bh % H_Q).to(tl.int64)
    kv_h = h // GROUP  # GQA: each query head reads its group's K/V, never a repeated copy
    q_base = Q + b * s_qb + h * s_qh
    k_base = K + b * s_kb + kv_h * s_kh
    v_base = V + b * s_vb + kv_h * s_vh

    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Q_LEN
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    q_offset = KV_LEN - Q_LEN

    lo, full_lo, full_hi, hi = _kv_range(m0, Q_LEN, KV_LEN, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    # Three passes over the key blocks: the window's leading edge (masked), the
    # blocks every row sees in full (no mask), the diagonal and ragged tail (masked).
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_kn, s_kd, s_vn, s_vd, offs_m, offs_d,
                               lo, tl.minimum(full_lo, hi), q_offset, KV_LEN, window, qk_scale,
                               HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_WINDOW, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_kn, s_kd, s_vn, s_vd, offs_m, offs_d,
                               full_lo, full_hi, q_offset, KV_LEN, window, qk_scale,
                               HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_WINDOW, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_kn, s_kd, s_vn, s_vd, offs_m, offs_d,
                               full_hi, hi, q_offset, KV_LEN, window, qk_scale,
                               HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_WINDOW, DOT_PRECISION)

    empty = l_i == 0.0  # rows that saw no key: output 0, LSE +inf (see module docstring)
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + off_bh.to(tl.int64) * Q_LEN + offs_m, lse, mask=m_ok)
    o_ptrs = O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------
# 3. Backward
# ---------------------------------------------------------------------------
# With P = exp2(S * log2e - LSE) recomputed from the saved LSE:
#   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  delta = rowsum(dO * O)
#   dQ = scale * dS K,  dK = scale * dS^T Q
# dK/dV and dQ come from two kernels so that each output is written by exactly
# one program with a fixed summation order: no atomics, bitwise reproducible.


@triton.jit
def _attn_bwd_preprocess(O, DO, Delta, s_ob, s_oh, s_om, s_od, s_dob, s_doh, s_dom, s_dod, H_Q, Q_LEN,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    off_bh = tl.program_id(1)
    b = (off_bh // H_Q).to(tl.int64)
    h = (off_bh % H_Q).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Q_LEN)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od, mask=mask, other=0.0)
    do = tl.load(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dom + offs_d[None, :] * s_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + off_bh.to(tl.int64) * Q_LEN + offs_m, delta, mask=offs_m < Q_LEN)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, s_qm, s_qd, s_dom, s_dod,
                    offs_n, offs_d, start, end, Q_LEN, KV_LEN, window, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    q_offset = KV_LEN - Q_LEN
    for start_m in tl.range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Q_LEN
        # Work transposed, (keys, queries), so dK and dV come out as plain dots.
        qT = _load(q_base + offs_m[None, :] * s_qm + offs_d[:, None] * s_qd, m_ok[None, :], d_ok[:, None],
                   MASK, HEAD_DIM != BLOCK_D)  # (BLOCK_D, BLOCK_M)
        if MASK:
            lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASK:
            vis = _visible(offs_m[None, :] + q_offset, offs_n[:, None], KV_LEN, window, CAUSAL, HAS_WINDOW)
            pT = tl.where(vis & m_ok[None, :], pT, 0.0)
        do = _load(do_base + offs_m[:, None] * s_dom + offs_d[None, :] * s_dod, m_ok[:, None], d_ok[None, :],
                   MASK, HEAD_DIM != BLOCK_D)  # (BLOCK_M, BLOCK_D)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if MASK:
            delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        else:
            delta = tl.load(delta_base + offs_m)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@autotuned(_BWD_DKDV_CONFIGS, _FWD_KEY, _BWD_DKDV_PRUNE)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, Delta,
                   s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                   s_dob, s_doh, s_dom, s_dod, s_dkb, s_dkh, s_dkn, s_dkd, s_dvb, s_dvh, s_dvn, s_dvd,
                   H_Q, GROUP, Q_LEN, KV_LEN, sm_scale, qk_scale, window, Q_LEN_BUCKET, KV_LEN_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1)  # one (batch, KV head) per program column
    H_KV = H_Q // GROUP
    b = (off_bh // H_KV).to(tl.int64)
    kv_h = (off_bh % H_KV).to(tl.int64)

    n0 = start_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < KV_LEN)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + b * s_kb + kv_h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * s_vb + kv_h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _q_range(n0, Q_LEN, KV_LEN, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    # GQA: the query heads sharing this KV head are summed here, in a fixed order,
    # instead of by atomics across programs.
    for g in range(GROUP):
        h = kv_h * GROUP + g
        q_base = Q + b * s_qb + h * s_qh
        do_base = DO + b * s_dob + h * s_doh
        row = (b * H_Q + h) * Q_LEN
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, Delta + row, s_qm, s_qd, s_dom, s_dod,
                                 offs_n, offs_d, lo, tl.minimum(full_lo, hi), Q_LEN, KV_LEN, window, qk_scale,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, HAS_WINDOW, DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, Delta + row, s_qm, s_qd, s_dom, s_dod,
                                 offs_n, offs_d, full_lo, full_hi, Q_LEN, KV_LEN, window, qk_scale,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, False, CAUSAL, HAS_WINDOW, DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, Delta + row, s_qm, s_qd, s_dom, s_dod,
                                 offs_n, offs_d, full_hi, hi, Q_LEN, KV_LEN, window, qk_scale,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, HAS_WINDOW, DOT_PRECISION)

    dk = dk * sm_scale  # dS was in natural units; the score was scale * q.k
    tl.store(DK + b * s_dkb + kv_h * s_dkh + offs_n[:, None] * s_dkn + offs_d[None, :] * s_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * s_dvb + kv_h * s_dvh + offs_n[:, None] * s_dvn + offs_d[None, :] * s_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
                  offs_m, offs_d, start, end, q_offset, KV_LEN, window, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < KV_LEN
        kT = _load(k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd, n_ok[None, :], d_ok[:, None],
                   MASK, HEAD_DIM != BLOCK_D)  # (BLOCK_D, BLOCK_N)
        vT = _load(v_base + offs_n[None, :] * s_vn + offs_d[:, None] * s_vd, n_ok[None, :], d_ok[:, None],
                   MASK, HEAD_DIM != BLOCK_D)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if MASK:
            vis = _visible(offs_m[:, None] + q_offset, offs_n[None, :], KV_LEN, window, CAUSAL, HAS_WINDOW)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@autotuned(_BWD_DQ_CONFIGS, _FWD_KEY, _BWD_DQ_PRUNE)
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, Delta,
                 s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                 s_dob, s_doh, s_dom, s_dod, s_dqb, s_dqh, s_dqm, s_dqd,
                 H_Q, GROUP, Q_LEN, KV_LEN, sm_scale, qk_scale, window, Q_LEN_BUCKET, KV_LEN_BUCKET,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    b = (off_bh // H_Q).to(tl.int64)
    h = (off_bh % H_Q).to(tl.int64)
    kv_h = h // GROUP

    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Q_LEN
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=mask, other=0.0)
    do = tl.load(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dom + offs_d[None, :] * s_dod, mask=mask, other=0.0)
    row = off_bh.to(tl.int64) * Q_LEN
    lse = tl.load(LSE + row + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + row + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * s_kb + kv_h * s_kh
    v_base = V + b * s_vb + kv_h * s_vh
    q_offset = KV_LEN - Q_LEN

    lo, full_lo, full_hi, hi = _kv_range(m0, Q_LEN, KV_LEN, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, s_kn, s_kd, s_vn, s_vd, offs_m, offs_d,
                       lo, tl.minimum(full_lo, hi), q_offset, KV_LEN, window, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_WINDOW, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, s_kn, s_kd, s_vn, s_vd, offs_m, offs_d,
                       full_lo, full_hi, q_offset, KV_LEN, window, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_WINDOW, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, s_kn, s_kd, s_vn, s_vd, offs_m, offs_d,
                       full_hi, hi, q_offset, KV_LEN, window, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_WINDOW, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd,
             dq.to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# 4. Split-KV decode (flash-decoding)
# ---------------------------------------------------------------------------
# With one query per head the tiled forward launches only batch * heads
# programs, each walking the whole cache alone, and most of the GPU idles.
# Here the cache is cut into `num_splits` chunks, one program per (chunk,
# batch, KV head), each writing a partial output and its LSE; a second kernel
# merges the partials. One program serves all GROUP * q_len query rows of its
# KV head, so each K/V byte is read once per KV head, which is what bounds decode.


@autotuned(_decode_configs(), ["KV_LEN_BUCKET", "HEAD_DIM", "BLOCK_R", "CAUSAL", "HAS_WINDOW", "HAS_KEY_MASK"])
@triton.jit
def _attn_decode_split(Q, K, V, O_part, LSE_part, Seqlens, KeyMask,
                       s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_mb, s_mn,
                       H_Q, GROUP, Q_LEN, KV_LEN, qk_scale, window, split_size, NUM_SPLITS, KV_LEN_BUCKET,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                       CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEQLENS: tl.constexpr,
                       HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    split = tl.program_id(0)
    off_bh = tl.program_id(1)  # (batch, KV head)
    H_KV = H_Q // GROUP
    b = (off_bh // H_KV).to(tl.int64)
    kv_h = (off_bh % H_KV).to(tl.int64)
    if HAS_SEQLENS:  # per-row valid length of a preallocated cache; slots beyond it are ignored
        kv_len = tl.minimum(tl.load(Seqlens + b).to(tl.int32), KV_LEN)
    else:
        kv_len = KV_LEN

    # Rows are (query head in the group, query token) pairs: r = g * Q_LEN + t.
    rows = tl.arange(0, BLOCK_R)
    r_ok = rows < GROUP * Q_LEN
    g = rows // Q_LEN
    t = rows % Q_LEN
    h = kv_h * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * s_qb + h[:, None] * s_qh + t[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = t + kv_len - Q_LEN  # bottom-right causal alignment against this row's own length

    start = split * split_size
    end = tl.minimum(start + split_size, kv_len)
    if HAS_WINDOW:
        start = tl.maximum(start, kv_len - Q_LEN - window + 1)  # oldest key any row's window reaches
    k_base = K + b * s_kb + kv_h * s_kh
    v_base = V + b * s_vb + kv_h * s_vh

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    # Every block is masked: decode is bound by memory, not by the mask's few ALU ops.
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        kT = tl.load(k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        vis = _visible(q_pos[:, None], offs_n[None, :], end, window, CAUSAL, HAS_WINDOW)
        if HAS_KEY_MASK:  # padding slots of a left-padded batch (one byte per key, beside its K and V rows)
            real = tl.load(KeyMask + b * s_mb + offs_n * s_mn, mask=n_ok, other=0)
            vis = vis & (real != 0)[None, :]
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # an empty chunk (past this row's length) contributes weight 0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    part = (b * H_Q + h) * Q_LEN + t  # row of the (batch, q_head, q_len) output
    tl.store(LSE_part + part * NUM_SPLITS + split, lse, mask=r_ok)
    tl.store(O_part + (part * NUM_SPLITS + split)[:, None] * BLOCK_D + offs_d[None, :], acc, mask=r_ok[:, None])


@triton.jit
def _attn_decode_combine(O_part, LSE_part, O, LSE, s_ob, s_oh, s_om, s_od, H_Q, Q_LEN, NUM_SPLITS,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # over batch * q_heads * q_len
    b = row // (H_Q * Q_LEN)
    h = (row // Q_LEN) % H_Q
    t = row % Q_LEN
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    lse = tl.load(LSE_part + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)  # each chunk's share of the softmax denominator
    o = tl.load(O_part + (row * NUM_SPLITS + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
                mask=s_ok[:, None], other=0.0)
    total = tl.sum(w, 0)
    total_safe = tl.where(total == 0.0, 1.0, total)  # 0: no key anywhere -> output 0, LSE +inf
    out = tl.sum(w[:, None] * o, 0) / total_safe
    tl.store(LSE + row, tl.where(total == 0.0, float("inf"), m + tl.math.log2(total_safe)))
    tl.store(O + b * s_ob + h * s_oh + t * s_om + offs_d * s_od, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


# ---------------------------------------------------------------------------
# 5. Launchers, autograd.Function, public API
# ---------------------------------------------------------------------------

_LOG2E = 1.4426950408889634

# flash_attention switches to split-KV for at most this many queries per head...
_DECODE_MAX_Q_LEN = 16
# ...as long as one program can hold all GROUP * q_len rows of a KV head.
_DECODE_MAX_ROWS = 64
# flash_decode itself accepts up to this many (more rows spill registers).
_DECODE_MAX_ROWS_EXPLICIT = 128


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int]) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k disagree on batch or head_dim: {tuple(q.shape)} vs {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q_heads ({q.shape[1]}) must be a multiple of kv_heads ({k.shape[1]}), kv_heads >= 1")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v must share one dtype of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if _INTERPRET and q.dtype == torch.bfloat16:
        raise ValueError("bfloat16 is computed wrongly by Triton's interpreter (TRITON_INTERPRET=1); use float32 "
                         "or float16 on the CPU")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
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


@_chunk_batch
def _forward(q, k, v, causal: bool, scale: Optional[float], window: Optional[int]):
    """Tiled forward. Returns (out, lse) with lse in base 2, fp32, (B, Hq, Tq)."""
    B, H_Q, Q_LEN, D = q.shape
    args, scale = _common(q, k, scale, causal, window)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H_Q, Q_LEN), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(Q_LEN, meta["BLOCK_M"]), B * H_Q)  # noqa: E731
    with _device_ctx(q):
        _attn_fwd[grid](q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                        qk_scale=scale * _LOG2E, Q_LEN_BUCKET=_bucket(Q_LEN), KV_LEN_BUCKET=_bucket(k.shape[2]), **args)
    return o, lse


def _num_splits(batch_kv_heads: int, kv_len: int, device: torch.device) -> tuple[int, int]:
    """(num_splits, split_size): enough programs to fill the GPU, chunks not too short."""
    if device.type != "cuda":
        align, target_programs, min_chunk = 16, 4, 32  # interpreter: a few splits, to exercise the merge
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        align, target_programs, min_chunk = 128, 2 * sms, 256
    splits = max(1, min(triton.cdiv(target_programs, batch_kv_heads), triton.cdiv(kv_len, min_chunk), 128))
    split_size = triton.cdiv(triton.cdiv(max(kv_len, 1), splits), align) * align
    return triton.cdiv(max(kv_len, 1), split_size), split_size


@_chunk_batch
def _decode_forward(q, k, v, causal: bool, scale: Optional[float], window: Optional[int],
                    seqlens: Optional[torch.Tensor] = None, num_splits: Optional[int] = None,
                    key_mask: Optional[torch.Tensor] = None):
    """Split-KV forward. Returns (out, lse) exactly like _forward. key_mask: (B, KV_LEN) uint8."""
    B, H_Q, Q_LEN, D = q.shape
    args, scale = _common(q, k, scale, causal, window)
    KV_LEN = k.shape[2]
    rows = args["GROUP"] * Q_LEN
    splits, split_size = _num_splits(B * k.shape[1], KV_LEN, q.device)
    if num_splits is not None:  # explicit override (tests, tuning)
        split_size = triton.cdiv(max(KV_LEN, 1), num_splits)
        splits = triton.cdiv(max(KV_LEN, 1), split_size)
    o_part = torch.empty((B, H_Q, Q_LEN, splits, args["BLOCK_D"]), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, H_Q, Q_LEN, splits), dtype=torch.float32, device=q.device)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H_Q, Q_LEN), dtype=torch.float32, device=q.device)
    # Dummy pointers when unused.
    seqlens_arg = seqlens if seqlens is not None else lse
    mask_arg = key_mask if key_mask is not None else lse
    mask_strides = key_mask.stride() if key_mask is not None else (0, 0)
    with _device_ctx(q):
        _attn_decode_split[(splits, B * k.shape[1])](
            q, k, v, o_part, lse_part, seqlens_arg, mask_arg, *q.stride(), *k.stride(), *v.stride(), *mask_strides,
            qk_scale=scale * _LOG2E, split_size=split_size, NUM_SPLITS=splits, KV_LEN_BUCKET=_bucket(KV_LEN),
            BLOCK_R=max(16, triton.next_power_of_2(rows)), HAS_SEQLENS=seqlens is not None,
            HAS_KEY_MASK=key_mask is not None, **args)
        _attn_decode_combine[(B * H_Q * Q_LEN,)](
            o_part, lse_part, o, lse, *o.stride(), H_Q, Q_LEN, splits,
            HEAD_DIM=D, BLOCK_D=args["BLOCK_D"], BLOCK_S=triton.next_power_of_2(splits))
    return o, lse


def _use_split_kv(q_len: int, kv_len: int, group: int) -> bool:
    """Few queries over many keys: the tiled forward would leave most of the GPU idle."""
    return q_len <= _DECODE_MAX_Q_LEN and group * q_len <= _DECODE_MAX_ROWS and kv_len >= 4 * q_len


def is_decode(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether flash_attention takes the split-KV decode path for these shapes (and flash_decode
    accepts them): a few queries per KV head over a longer key sequence."""
    return _use_split_kv(q.shape[2], k.shape[2], q.shape[1] // max(k.shape[1], 1))


@_chunk_batch
def _backward(do, q, k, v, o, lse, causal: bool, scale: Optional[float], window: Optional[int]):
    B, H_Q, Q_LEN, D = q.shape
    do = do.to(q.dtype)
    args, scale = _common(q, k, scale, causal, window)
    buckets = dict(Q_LEN_BUCKET=_bucket(Q_LEN), KV_LEN_BUCKET=_bucket(k.shape[2]))
    # Fresh contiguous buffers (empty_like would copy q's possibly transposed strides).
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty_like(lse)
    with _device_ctx(q):
        block_m = 16 if _INTERPRET else 128
        _attn_bwd_preprocess[(triton.cdiv(Q_LEN, block_m), B * H_Q)](
            o, do, delta, *o.stride(), *do.stride(), H_Q, Q_LEN,
            HEAD_DIM=D, BLOCK_D=args["BLOCK_D"], BLOCK_M=block_m)
        grid_kv = lambda meta: (triton.cdiv(k.shape[2], meta["BLOCK_N"]), B * k.shape[1])  # noqa: E731
        _attn_bwd_dkdv[grid_kv](q, k, v, do, dk, dv, lse, delta, *q.stride(), *k.stride(), *v.stride(),
                                *do.stride(), *dk.stride(), *dv.stride(),
                                sm_scale=scale, qk_scale=scale * _LOG2E, **buckets, **args)
        grid_q = lambda meta: (triton.cdiv(Q_LEN, meta["BLOCK_M"]), B * H_Q)  # noqa: E731
        _attn_bwd_dq[grid_q](q, k, v, do, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(),
                             *do.stride(), *dq.stride(),
                             sm_scale=scale, qk_scale=scale * _LOG2E, **buckets, **args)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window):
        if q.shape[2] == 0:  # no queries: nothing to launch, and no gradient to give
            o, lse = q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)
        elif is_decode(q, k):
            o, lse = _decode_forward(q, k, v, causal, scale, window)
        else:
            o, lse = _forward(q, k, v, causal, scale, window)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.window = causal, scale, window
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' gradients are not differentiable again
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        if q.shape[2] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None
        # Both forward paths save the same LSE, so one backward serves them.
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.window)
        return dq, dk, dv, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: Optional[float] = None, window: Optional[int] = None) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) V with FlashAttention; differentiable in q, k, v.

    q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D), Hq a multiple of Hkv. Any strides.
    causal: query i sees keys j <= i + Tk - Tq (bottom-right aligned).
    window: additionally only keys j > i + Tk - Tq - window (sliding window).
    scale: defaults to 1/sqrt(D). Returns (B, Hq, Tq, D), contiguous, in q's dtype.
    A few queries over a long key sequence (decode) take the split-KV path.
    """
    _check(q, k, v, window)
    return _FlashAttention.apply(q, k, v, causal, scale, window)


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                 kv_len: Union[int, torch.Tensor, None] = None, causal: bool = True,
                 window: Optional[int] = None, key_mask: Optional[torch.Tensor] = None,
                 num_splits: Optional[int] = None) -> torch.Tensor:
    """Split-KV attention for a few new queries over a (preallocated) KV cache. Inference only.

    q: (B, Hq, Tq, D), Tq small (1 for plain decoding, a few for speculative
    verification); k, v: (B, Hkv, capacity, D).
    kv_len: valid cache length, an int or a (B,) integer tensor (flash-attn's
    `cache_seqlens`); slots at or beyond it are ignored. Defaults to capacity.
    A tensor's values are not checked (that would wait for the device): each
    must lie in [0, capacity]; larger ones are read as capacity.
    The Tq queries are the last Tq valid slots of their row, so with causal
    query t sees keys j <= t + kv_len[b] - Tq.
    key_mask: optional (B, capacity) bool, True for real tokens: the padding slots of a
    left-padded batch (any pattern) are ignored. A row that sees no key gives zeros.
    num_splits: number of KV chunks; chosen to fill the device when None.
    Not differentiable: use flash_attention for training.
    """
    _check(q, k, v, window)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError("flash_decode is inference-only; use flash_attention when gradients are needed")
    if q.shape[1] // k.shape[1] * q.shape[2] > _DECODE_MAX_ROWS_EXPLICIT:
        # One program holds all GROUP * q_len rows of a KV head in registers.
        raise ValueError(f"flash_decode takes at most {_DECODE_MAX_ROWS_EXPLICIT} query rows per KV head "
                         f"(q_heads / kv_heads * q_len); use flash_attention for longer q_len")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be an integer >= 1 (or None: chosen for the device), got {num_splits!r}")
    if key_mask is not None:
        if key_mask.shape != (q.shape[0], k.shape[2]):
            raise ValueError(f"key_mask must have shape (batch, capacity) = ({q.shape[0]}, {k.shape[2]}), "
                             f"got {tuple(key_mask.shape)}")
        if key_mask.dtype.is_floating_point:
            raise ValueError(f"key_mask must hold booleans (True = a real token), got {key_mask.dtype}")
        # One byte per key for the kernel; a bool tensor is reinterpreted, not copied.
        key_mask = key_mask.to(device=q.device, dtype=torch.bool).view(torch.uint8)
    seqlens = None
    if isinstance(kv_len, torch.Tensor):
        if kv_len.dtype.is_floating_point or kv_len.dtype == torch.bool:
            raise ValueError(f"kv_len tensor must hold integers, got {kv_len.dtype}")
        if kv_len.shape != (q.shape[0],):
            raise ValueError(f"kv_len tensor must have shape ({q.shape[0]},), got {tuple(kv_len.shape)}")
        seqlens = kv_len.to(device=q.device, dtype=torch.int32).contiguous()
    elif kv_len is not None:
        if not 0 <= kv_len <= k.shape[2]:
            raise ValueError(f"kv_len {kv_len} outside [0, {k.shape[2]}]")
        k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # a view: strides carry over, nothing is copied
        key_mask = key_mask[:, :kv_len] if key_mask is not None else None
    if q.shape[2] == 0:
        return q.new_empty(q.shape)
    o, _ = _decode_forward(q, k, v, causal, scale, window, seqlens=seqlens, num_splits=num_splits,
                           key_mask=key_mask)
    return o
