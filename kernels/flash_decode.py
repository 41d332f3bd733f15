"""Split-KV decode (flash-decoding) in Triton: a few new queries over a long KV cache.

With one query per head the tiled forward of `flash_attention.py` launches only
batch * heads programs, each walking the whole cache alone, and most of the GPU
idles. Here the cache is cut into `num_splits` chunks, one program per (chunk,
batch, KV head), each writing a partial output and its LSE; a second kernel
merges the partials. One program serves all GROUP * q_len query rows of its KV
head, so each K/V byte is read once per KV head, which is what bounds decode.
Per-row cache lengths (`kv_len` as a tensor) and a padding mask (`key_mask`)
let rows of one batch hold different lengths. Conventions: `attention_utils.py`.

Parts, as in every kernel file: the @triton.jit kernels, the launcher, the public function.
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from .attention_utils import (_INTERPRET, _LOG2E, _bucket, _check, _chunk_batch, _common, _decode_queries,
                              _device_ctx, _online_softmax_tile, _store_split, _visible)
from .attention_utils import is_available  # noqa: F401  (what llmstack.kernels.available asks)
from .launch import autotuned

# flash_attention switches to split-KV for at most this many queries per head...
_DECODE_MAX_Q_LEN = 16
# ...as long as one program can hold all GROUP * q_len rows of a KV head.
_DECODE_MAX_ROWS = 64
# flash_decode itself accepts up to this many (more rows spill registers).
_DECODE_MAX_ROWS_EXPLICIT = 128


def _decode_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 3), (64, 4, 4)]
    ]


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

    q, q_pos, r_ok, t, h, offs_d, d_ok, start, end = _decode_queries(
        Q, b, kv_h, kv_len, s_qb, s_qh, s_qm, s_qd, GROUP, Q_LEN, window, split, split_size, HEAD_DIM, BLOCK_D,
        BLOCK_R, HAS_WINDOW)
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
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        m_i, l_i, acc = _online_softmax_tile(qk, v, m_i, l_i, acc, DOT_PRECISION)
    _store_split(acc, l_i, m_i, O_part, LSE_part, b, h, t, r_ok, offs_d, H_Q, Q_LEN, NUM_SPLITS, split, BLOCK_D)


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
# Launcher and public function
# ---------------------------------------------------------------------------


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
