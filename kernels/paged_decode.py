"""Paged decode attention in Triton: a few new queries over keys and values kept in blocks.

A paged KV cache (vLLM's PagedAttention) keeps keys and values in a pool of fixed-size
blocks, (n_blocks, Hkv, page, D) per layer, and gives each sequence a block table: its
slot s lives in block table[b, s // page] at offset s % page. Gathering each row's blocks
into a contiguous copy before attention reads and writes every key twice; this kernel
reads them in place instead. It is `flash_decode.py`'s split-KV kernel with one more
indirection: each tile of BLOCK_N key slots looks up the blocks of its slots in the block
table, then loads their rows from the pool. The tile does not have to match the page: a
tile of 64 slots spans four 16-slot blocks, and a page smaller than a tile (the tests' 2
and 4) works the same way. Per-row lengths (`kv_len`) let rows of one batch hold different
lengths; GQA as in flash_decode (one program serves every query head of its KV head, so
each K/V byte is read once per KV head). The merge of the splits is flash_decode's.

Parts, as in every kernel file: the @triton.jit kernel, the launcher, the public function.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from .attention_utils import (_LOG2E, _bucket, _check_inputs, _decode_queries, _device_ctx,
                              _online_softmax_tile, _store_split, _visible)
from .attention_utils import is_available  # noqa: F401  (what llmstack.kernels.available asks)
from .flash_decode import _DECODE_MAX_ROWS_EXPLICIT, _attn_decode_combine, _decode_configs, _num_splits
from .launch import autotuned


@autotuned(_decode_configs(), ["KV_LEN_BUCKET", "HEAD_DIM", "BLOCK_R", "PAGE", "CAUSAL", "HAS_WINDOW"])
@triton.jit
def _paged_decode_split(Q, K, V, Table, Seqlens, O_part, LSE_part,
                        s_qb, s_qh, s_qm, s_qd, s_kp, s_kh, s_kn, s_kd, s_vp, s_vh, s_vn, s_vd, s_tb, s_tn,
                        H_Q, GROUP, Q_LEN, KV_LEN, qk_scale, window, split_size, NUM_SPLITS, KV_LEN_BUCKET,
                        PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_R: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    split = tl.program_id(0)
    off_bh = tl.program_id(1)  # (batch, KV head)
    H_KV = H_Q // GROUP
    b = (off_bh // H_KV).to(tl.int64)
    kv_h = (off_bh % H_KV).to(tl.int64)
    kv_len = tl.minimum(tl.load(Seqlens + b).to(tl.int32), KV_LEN)  # this row's keys

    q, q_pos, r_ok, t, h, offs_d, d_ok, start, end = _decode_queries(
        Q, b, kv_h, kv_len, s_qb, s_qh, s_qm, s_qd, GROUP, Q_LEN, window, split, split_size, HEAD_DIM, BLOCK_D,
        BLOCK_R, HAS_WINDOW)
    table = Table + b * s_tb
    k_head = K + kv_h * s_kh
    v_head = V + kv_h * s_vh

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        # The block of each slot of the tile, then the slot's row inside it: (BLOCK_N,) pool offsets.
        block = tl.load(table + (offs_n // PAGE) * s_tn, mask=n_ok, other=0).to(tl.int64)
        k_rows = block * s_kp + (offs_n % PAGE) * s_kn
        v_rows = block * s_vp + (offs_n % PAGE) * s_vn
        kT = tl.load(k_head + k_rows[None, :] + offs_d[:, None] * s_kd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        vis = _visible(q_pos[:, None], offs_n[None, :], end, window, CAUSAL, HAS_WINDOW)
        qk = tl.where(vis, qk, float("-inf"))
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :] * s_vd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        m_i, l_i, acc = _online_softmax_tile(qk, v, m_i, l_i, acc, DOT_PRECISION)
    _store_split(acc, l_i, m_i, O_part, LSE_part, b, h, t, r_ok, offs_d, H_Q, Q_LEN, NUM_SPLITS, split, BLOCK_D)


# ---------------------------------------------------------------------------
# Launcher and public function
# ---------------------------------------------------------------------------


def _paged_forward(q, k_pool, v_pool, table, seqlens, causal: bool, scale: float, window: Optional[int],
                   num_splits: Optional[int]) -> torch.Tensor:
    B, H_Q, Q_LEN, D = q.shape
    H_KV, page = k_pool.shape[1], k_pool.shape[2]
    KV_LEN = table.shape[1] * page  # the longest row's capacity
    group = H_Q // H_KV
    BLOCK_D = max(16, triton.next_power_of_2(D))
    splits, split_size = _num_splits(B * H_KV, KV_LEN, q.device)
    if num_splits is not None:  # explicit override (tests, tuning)
        split_size = triton.cdiv(max(KV_LEN, 1), num_splits)
        splits = triton.cdiv(max(KV_LEN, 1), split_size)
    o_part = torch.empty((B, H_Q, Q_LEN, splits, BLOCK_D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, H_Q, Q_LEN, splits), dtype=torch.float32, device=q.device)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H_Q, Q_LEN), dtype=torch.float32, device=q.device)
    with _device_ctx(q):
        _paged_decode_split[(splits, B * H_KV)](
            q, k_pool, v_pool, table, seqlens, o_part, lse_part, *q.stride(), *k_pool.stride(), *v_pool.stride(),
            *table.stride(), H_Q, group, Q_LEN, KV_LEN, scale * _LOG2E, window or 0, split_size, splits,
            _bucket(KV_LEN), PAGE=page, HEAD_DIM=D, BLOCK_D=BLOCK_D,
            BLOCK_R=max(16, triton.next_power_of_2(group * Q_LEN)), CAUSAL=causal, HAS_WINDOW=window is not None,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else None)
        _attn_decode_combine[(B * H_Q * Q_LEN,)](
            o_part, lse_part, o, lse, *o.stride(), H_Q, Q_LEN, splits,
            HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_S=triton.next_power_of_2(splits))
    return o


def accepts(q: torch.Tensor, k_pool: torch.Tensor) -> bool:
    """Whether paged_decode takes these shapes: one program holds all q_heads / kv_heads * q_len
    query rows of a KV head in registers (a prefill of many tokens goes through the gather path)."""
    return q.shape[1] // max(k_pool.shape[1], 1) * q.shape[2] <= _DECODE_MAX_ROWS_EXPLICIT


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                 kv_len: Union[int, torch.Tensor, None] = None, *, scale: Optional[float] = None,
                 causal: bool = True, window: Optional[int] = None,
                 num_splits: Optional[int] = None) -> torch.Tensor:
    """Attention of a few new queries per row over keys and values held in a paged pool. Inference only.

    q: (B, Hq, Tq, D), Tq small (1 for decoding); k_pool, v_pool: (n_blocks, Hkv, page, D), Hq a
    multiple of Hkv; block_table: (B, blocks) integers, row b's slot s in block
    block_table[b, s // page] (entries past a row's length are never read, but must be valid
    block numbers: pad with 0).
    kv_len: each row's number of keys, an int or a (B,) integer tensor; defaults to
    blocks * page. Values are not checked (that would wait for the device): each must lie in
    [0, blocks * page]. The Tq queries are the last Tq of their row's keys (bottom-right causal
    alignment: query t sees keys j <= t + kv_len[b] - Tq). A row that sees no key gives zeros.
    Returns (B, Hq, Tq, D), what the flash_decode of the gathered keys returns.
    """
    if q.dim() != 4 or k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(f"expected q (B, Hq, Tq, D) and pools (n_blocks, Hkv, page, D); got {tuple(q.shape)}, "
                         f"{tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    B, H_Q, _, D = q.shape
    if k_pool.shape[3] != D or k_pool.shape[1] == 0 or H_Q % k_pool.shape[1] != 0:
        raise ValueError(f"q {tuple(q.shape)} and pools {tuple(k_pool.shape)} disagree on head_dim, or q_heads "
                         "is not a multiple of kv_heads")
    _check_inputs(q, k_pool, v_pool, window, names="q and the pools (and the block table)", others=(block_table,))
    if block_table.dim() != 2 or block_table.shape[0] != B or block_table.dtype.is_floating_point:
        raise ValueError(f"block_table must be (batch, blocks) = ({B}, ...) integers, got {tuple(block_table.shape)} "
                         f"{block_table.dtype}")
    if not accepts(q, k_pool):
        raise ValueError(f"paged_decode takes at most {_DECODE_MAX_ROWS_EXPLICIT} query rows per KV head "
                         "(q_heads / kv_heads * q_len)")
    if torch.is_grad_enabled() and (q.requires_grad or k_pool.requires_grad or v_pool.requires_grad):
        raise RuntimeError("paged_decode is inference-only")
    capacity = block_table.shape[1] * k_pool.shape[2]
    if kv_len is None or not isinstance(kv_len, torch.Tensor):
        n = capacity if kv_len is None else kv_len
        if not 0 <= n <= capacity:
            raise ValueError(f"kv_len {n} outside [0, {capacity}]")
        seqlens = torch.full((B,), n, dtype=torch.int32, device=q.device)
    else:
        if kv_len.dtype.is_floating_point or kv_len.dtype == torch.bool or kv_len.shape != (B,):
            raise ValueError(f"kv_len tensor must hold ({B},) integers, got {tuple(kv_len.shape)} {kv_len.dtype}")
        seqlens = kv_len.to(device=q.device, dtype=torch.int32).contiguous()
    if q.shape[2] == 0 or B == 0:
        return q.new_zeros(q.shape)
    scale = 1.0 / D ** 0.5 if scale is None else scale
    return _paged_forward(q, k_pool, v_pool, block_table, seqlens, causal, scale, window, num_splits)
