"""Fused dequantize-matmul for weight-only quantized linear layers: y = x @ dequant(W)^T.

x is (M, K) in float32, float16 or bfloat16; W has N rows (outputs) of K inputs,
stored in one of two forms:

    int8, per output channel:   qweight int8 (N, K), scale (N,)
                                W[n, k] = qweight[n, k] * scale[n]
    int4, group-wise (size G):  qweight uint8 (N, K // 2), scale and offset (N, K // G)
                                W[n, k] = q[n, k] * scale[n, k // G] + offset[n, k // G]
                                with q[n, 2j] the low nibble of qweight[n, j] and
                                q[n, 2j + 1] its high nibble (GGUF's Q4_1 grid)

Made for decoding, where M (batch x new tokens) is a handful of rows and the
time goes into reading W: the weight crosses memory once, in its packed form
(a quarter or an eighth of float32), and is dequantized in registers right
before the dot product; a float copy of W is never written.

Layout of this file: the @triton.jit kernels, then the launchers. There is no
autograd.Function: quantized weights serve inference and have no gradient.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .launch import autotuned

# Read once at import, as in flash_attention.py: triton.jit decides at decoration
# time whether to build interpreted kernels.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def is_available() -> bool:
    """True when the kernels can run here: on a CUDA/ROCm GPU, or on the CPU under TRITON_INTERPRET=1."""
    return torch.cuda.is_available() or _INTERPRET


def _configs():
    # Under the interpreter: one small config, so tests cross block boundaries in
    # every dimension. On a GPU, BLOCK_M=16 is the smallest tile tl.dot takes and
    # covers decoding; wide K tiles keep many weight bytes in flight per program.
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (16, 32, 128, 4, 3), (16, 64, 128, 4, 3), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4),
            (16, 32, 256, 4, 4), (16, 128, 64, 4, 4), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3),
        ]
    ]


# M enters the key rounded to a power of two (M_BUCKET, unused inside the kernels),
# so every new batch size does not re-run the tuning sweep.
_KEY = ["M_BUCKET", "N", "K"]


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@autotuned(_configs(), _KEY)
@triton.jit
def _int8_matmul(X, W, S, Y, M, N, K,
                 s_xm, s_xk, s_wn, s_wk, s_ym, s_yn, M_BUCKET,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: N * K can pass 2**31
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(X + offs_m[:, None] * s_xm + k[None, :] * s_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + offs_n[None, :] * s_wn + k[:, None] * s_wk, mask=k_ok[:, None] & n_ok[None, :], other=0)
        # int8 -> float is exact in every activation dtype (|q| <= 127 < 2**8).
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    # One scale per output column: applied once to the fp32 sum, not to every weight.
    scale = tl.load(S + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    tl.store(Y + offs_m[:, None] * s_ym + offs_n[None, :] * s_yn, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@autotuned(_configs(), _KEY + ["GROUP_SIZE"])
@triton.jit
def _int4_matmul(X, W, S, O, Y, M, N, K,
                 s_xm, s_xk, s_wn, s_wk, s_sn, s_sg, s_ym, s_yn, M_BUCKET,
                 GROUP_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_K // 2)  # byte columns of one K tile: inputs 2j (low nibble) and 2j+1 (high)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 2 + offs_j
        j_ok = j < K // 2
        x_mask = m_ok[:, None] & j_ok[None, :]
        # The even and odd inputs are loaded apart and meet the low and high nibbles in
        # two dots, so the unpacked values never need interleaving in registers.
        x_even = tl.load(X + offs_m[:, None] * s_xm + (2 * j)[None, :] * s_xk, mask=x_mask, other=0.0)
        x_odd = tl.load(X + offs_m[:, None] * s_xm + (2 * j + 1)[None, :] * s_xk, mask=x_mask, other=0.0)
        w_mask = j_ok[:, None] & n_ok[None, :]
        packed = tl.load(W + offs_n[None, :] * s_wn + j[:, None] * s_wk, mask=w_mask, other=0)  # (BLOCK_K/2, BLOCK_N)
        # Both nibbles of a byte share a group (G is even). Tiles need not align with
        # groups, so scale and offset are gathered per element; neighbours hit one cache line.
        g = (2 * j) // GROUP_SIZE
        so_offs = offs_n[None, :] * s_sn + g[:, None] * s_sg
        scale = tl.load(S + so_offs, mask=w_mask, other=0.0).to(tl.float32)
        offset = tl.load(O + so_offs, mask=w_mask, other=0.0).to(tl.float32)
        w_lo = (packed & 0xF).to(tl.float32) * scale + offset
        w_hi = (packed >> 4).to(tl.float32) * scale + offset
        acc = tl.dot(x_even, w_lo.to(x_even.dtype), acc, input_precision=DOT_PRECISION)
        acc = tl.dot(x_odd, w_hi.to(x_odd.dtype), acc, input_precision=DOT_PRECISION)
    tl.store(Y + offs_m[:, None] * s_ym + offs_n[None, :] * s_yn, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


def _check_x(x: torch.Tensor, K: int) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features but the weight has {K} inputs")
    if x.device.type == "cpu" and not _INTERPRET:
        raise RuntimeError("Triton kernels need a GPU; on the CPU set TRITON_INTERPRET=1 before importing triton")


def _launch_args(x2: torch.Tensor) -> dict:
    return dict(M_BUCKET=triton.next_power_of_2(max(x2.shape[0], 1)),
                # fp32 inputs: exact fp32 dots (tf32 would cost ~1e-3 relative error); half
                # inputs: the backend's default ("tf32" is not offered everywhere, e.g. ROCm).
                DOT_PRECISION="ieee" if x2.dtype == torch.float32 else None)


def _device_ctx(t: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ (qweight * scale[:, None])^T -> (..., N) in x's dtype.

    qweight: int8 (N, K); scale: (N,), any float dtype (read as fp32)."""
    N, K = qweight.shape
    if qweight.dtype != torch.int8 or scale.shape != (N,):
        raise ValueError(f"expected qweight int8 (N, K) and scale (N,); got {qweight.dtype} {tuple(qweight.shape)} "
                         f"and {tuple(scale.shape)}")
    _check_x(x, K)
    x2 = x.reshape(-1, K)  # (M, K)
    y = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(x2.shape[0], meta["BLOCK_M"]))  # noqa: E731
    with _device_ctx(x):
        _int8_matmul[grid](x2, qweight, scale, y, x2.shape[0], N, K, *x2.stride(), *qweight.stride(), *y.stride(),
                           **_launch_args(x2))
    return y.reshape(*x.shape[:-1], N)


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x (..., K) @ dequant(W)^T -> (..., N) in x's dtype, W group-wise int4 (see the module docstring).

    qweight: uint8 (N, K // 2); scale and offset: (N, K // group_size), any float dtype (read as fp32)."""
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    n_groups = K // group_size if group_size > 0 and group_size % 2 == 0 and K % group_size == 0 else None
    if n_groups is None:
        raise ValueError(f"group_size={group_size} must be an even number that divides K={K}")
    if qweight.dtype != torch.uint8 or scale.shape != (N, n_groups) or offset.shape != (N, n_groups):
        raise ValueError(f"expected qweight uint8 (N, K/2), scale and offset (N, K/{group_size}); got "
                         f"{qweight.dtype} {tuple(qweight.shape)}, {tuple(scale.shape)}, {tuple(offset.shape)}")
    if scale.stride() != offset.stride():
        raise ValueError("scale and offset must have the same strides (they share one index in the kernel)")
    _check_x(x, K)
    x2 = x.reshape(-1, K)  # (M, K)
    y = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(x2.shape[0], meta["BLOCK_M"]))  # noqa: E731
    with _device_ctx(x):
        _int4_matmul[grid](x2, qweight, scale, offset, y, x2.shape[0], N, K, *x2.stride(), *qweight.stride(),
                           *scale.stride(), *y.stride(), GROUP_SIZE=group_size, **_launch_args(x2))
    return y.reshape(*x.shape[:-1], N)
