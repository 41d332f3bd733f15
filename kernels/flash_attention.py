"""FlashAttention in Triton: the tiled forward and backward, differentiable.

    out = softmax(Q K^T * scale + mask) V

Conventions (shapes, bottom-right causal alignment, base-2 scores and LSE, rows
that see no key) are those of `attention_utils.py`; a few queries over a long
key sequence (decode) take the split-KV kernels of `flash_decode.py`.

Layout of this file, as in Triton's fused-attention tutorial:
  1. small @triton.jit helpers (block ranges, masked loads)
  2. forward kernel (tiled, online softmax in base 2, saves log-sum-exp)
  3. backward kernels (delta = rowsum(dO * O), dK/dV, dQ); deterministic
  4. launchers, the autograd.Function, and the public function

Blocks that need no mask take an unmasked code path (MASK=False); only the
blocks on the diagonal, the window edge or a ragged tail pay for masking.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from .attention_utils import (_INTERPRET, _LOG2E, _bucket, _check, _chunk_batch, _common, _device_ctx,
                              _visible)
from .attention_utils import is_available  # noqa: F401  (what llmstack.kernels.available asks)
from .flash_decode import _decode_forward, is_decode
from .launch import autotuned


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


# Lengths enter the autotuning key rounded to a power of two (the *_BUCKET
# arguments, unused inside the kernels): keyed on exact lengths, every new
# prompt length would re-run the whole benchmark sweep.
_FWD_KEY = ["Q_LEN_BUCKET", "KV_LEN_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_WINDOW"]


# ---------------------------------------------------------------------------
# 1. Helpers
# ---------------------------------------------------------------------------


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
# 4. Launchers, autograd.Function, public API
# ---------------------------------------------------------------------------

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


