"""The one attention dispatch point, and its backends.

Every backend computes the same thing:

    softmax(Q K^T * scale + mask) V

with q of shape (B, Hq, Tq, D) and k, v of shape (B, Hkv, Tk, D), Hq a multiple
of Hkv (grouped-query attention). The queries are the *last* Tq of the Tk key
slots, so the causal mask is aligned bottom-right: query i sees key slots
j <= i + Tk - Tq. That one convention covers training (Tq == Tk), prefill into
a cache and single-token decode (Tq == 1).

Extra masks: `key_mask` (B, Tk), True for real tokens, for batches of unequal
lengths, or (B, Tq, Tk), True where a query may see a key: per-document attention in
a packed batch (each token sees only its own document); `window` limits each query
to its last `window` key slots.

What a cache hands over (see `llmstack.model.kv_cache`):
- `kv_lengths` (B,): row b holds only its first kv_lengths[b] key slots, and its
  queries are the last Tq of *those* (bottom-right alignment per row), so rows of
  one batch can sit at different lengths without padding in front of them;
- `block_table` (B, blocks): k and v are pools of fixed-size blocks
  (n_blocks, Hkv, block_size, D) and row b's slot s lives in block
  block_table[b, s // block_size] (a paged cache). The `triton` backend reads
  them in place (a paged-decode kernel); the others gather each row's blocks
  into contiguous keys first (`gather_blocks`).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from llmstack import kernels  # its __init__ imports torch only
from llmstack.kernels import GPU_DTYPES

BACKENDS = ("naive", "sdpa", "triton")


def resolve_backend(name: str, device: torch.device | str | None = None, dtype: Optional[torch.dtype] = None) -> str:
    """`auto` picks our Triton kernel for float16/bfloat16 on CUDA when Triton is installed, else SDPA
    (float32 included: see llmstack.kernels.GPU_DTYPES)."""
    if name != "auto":
        return name
    device = torch.device(device) if device is not None else None
    if (device is not None and device.type == "cuda" and (dtype is None or dtype in GPU_DTYPES)
            and _triton_available()):
        return "triton"
    return "sdpa"


def _triton_available() -> bool:
    return kernels.available("flash_attention")


def build_mask(tq: int, tk: int, *, causal: bool, window: Optional[int], key_mask: Optional[torch.Tensor],
               device: torch.device, kv_lengths: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Boolean mask (True = attend), broadcastable to (B, H, Tq, Tk); None when nothing is masked."""
    mask = None
    kj = torch.arange(tk, device=device)
    if kv_lengths is not None:
        ends = kv_lengths.to(device)[:, None, None, None]  # (B, 1, 1, 1)
        qi = ends - tq + torch.arange(tq, device=device)[:, None]  # (B, 1, Tq, 1): each row's query slots
        mask = kj < ends
    else:
        qi = torch.arange(tk - tq, tk, device=device)[:, None]  # (Tq, 1): absolute slot of each query
    if causal:
        mask = kj <= qi if mask is None else mask & (kj <= qi)
    if window is not None:
        mask = kj > qi - window if mask is None else mask & (kj > qi - window)
    if key_mask is not None:
        # (B, 1, 1, Tk): padding hidden from every query; (B, 1, Tq, Tk): a mask per query
        km = (key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]).bool()
        mask = km if mask is None else mask & km
    if key_mask is not None or kv_lengths is not None:
        # A padding query may see no key at all, and softmax over nothing is NaN, which
        # would leak into gradients. Let such rows see every key; their output is never used.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def naive_attention(q, k, v, *, causal=True, key_mask=None, window=None, dropout_p=0.0, scale=None,
                    kv_lengths=None):
    """The explicit reference: softmax(Q K^T / sqrt(d_k)) V, with GQA by grouping query heads."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    qg = q.view(B, Hkv, Hq // Hkv, Tq, D)  # (B, Hkv, G, Tq, D): each KV head serves G query heads
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k).float() * scale  # (B, Hkv, G, Tq, Tk)
    mask = build_mask(Tq, Tk, causal=causal, window=window, key_mask=key_mask, device=q.device,
                      kv_lengths=kv_lengths)
    if mask is not None:
        mask = mask.unsqueeze(1) if mask.dim() == 4 else mask  # (B, 1, 1, Tq, Tk)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, v)
    return out.reshape(B, Hq, Tq, D)


def sdpa_attention(q, k, v, *, causal=True, key_mask=None, window=None, dropout_p=0.0, scale=None,
                   kv_lengths=None):
    """torch's fused scaled_dot_product_attention (flash / memory-efficient / cuDNN / math)."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if key_mask is None and window is None and kv_lengths is None and (not causal or Tq == Tk or Tq == 1):
        # Fast paths with no mask tensor. SDPA's is_causal is aligned top-left, which
        # equals ours only when Tq == Tk; a single query sees every key anyway.
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal and Tq == Tk and Tq > 1, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
        )
    mask = build_mask(Tq, Tk, causal=causal, window=window, key_mask=key_mask, device=q.device,
                      kv_lengths=kv_lengths)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)


def triton_attention(q, k, v, *, causal=True, key_mask=None, window=None, dropout_p=0.0, scale=None,
                     kv_lengths=None):
    """Our FlashAttention kernel. When decoding (a few queries, no gradient) the split-KV kernel
    also reads a padding mask and per-row lengths; a mask or per-row lengths with many queries,
    and attention dropout, fall back to SDPA."""
    from llmstack.kernels import flash_attention as fa, flash_decode as fd

    masked = key_mask is not None or kv_lengths is not None
    if (masked and dropout_p == 0.0 and fd.is_decode(q, k) and not _needs_grad(q, k, v)
            and (key_mask is None or key_mask.dim() == 2)):
        return fd.flash_decode(q, k, v, causal=causal, scale=scale, window=window, key_mask=key_mask,
                               kv_len=kv_lengths)
    if masked or dropout_p > 0.0:
        return sdpa_attention(q, k, v, causal=causal, key_mask=key_mask, window=window, dropout_p=dropout_p,
                              scale=scale, kv_lengths=kv_lengths)
    return fa.flash_attention(q, k, v, causal=causal, scale=scale, window=window)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


_IMPLS = {"naive": naive_attention, "sdpa": sdpa_attention, "triton": triton_attention}


def gather_blocks(pool: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Each row's blocks of a paged pool (n_blocks, Hkv, block_size, D) laid end to end:
    (B, Hkv, blocks * block_size, D) for a block table (B, blocks). One index_select of D-wide rows
    of the pool seen as (n_blocks * Hkv * block_size, D), straight into the output's layout
    (indexing blocks, then transposing, copies twice and was 6x slower on a CPU)."""
    return _gather_rows(pool, _block_rows(block_table, pool.shape[1], pool.shape[2]))


def _block_rows(block_table: torch.Tensor, Hkv: int, size: int) -> torch.Tensor:
    """(B, Hkv, blocks * size): the rows of the pool seen as (n_blocks * Hkv * size, D) to read."""
    B, n = block_table.shape
    heads = torch.arange(Hkv, device=block_table.device)[None, :, None, None]
    slots = torch.arange(size, device=block_table.device)
    return ((block_table[:, None, :, None] * Hkv + heads) * size + slots).view(B, Hkv, n * size)


def _gather_rows(pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return pool.reshape(-1, pool.shape[-1]).index_select(0, rows.reshape(-1)).view(*rows.shape, pool.shape[-1])


# What one more group costs in _paged_by_length, in gathered key slots: the dispatch of a gather
# and an attention call (~100 us on a CPU core) against ~0.25 us per slot (gather, then attend).
_GROUP_COST_SLOTS = 400


@functools.lru_cache(maxsize=16)  # the same lengths come back in every layer of a step
def _length_groups(lengths: tuple[int, ...], page: int) -> tuple[tuple[int, int], ...]:
    """Cut rows sorted by length, longest first, into runs [i, j) that each gather up to their first
    row's length (whole pages): the cuts that gather the fewest slots, a group counting as
    _GROUP_COST_SLOTS more (dynamic programming over the cut points)."""
    n = len(lengths)
    width = [-(-x // page) * page for x in lengths]
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + (j - i) * width[i] + _GROUP_COST_SLOTS
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j:
        groups.append((cut[j], j))
        j = cut[j]
    return tuple(reversed(groups))


def _paged_by_length(impl, q, k_pool, v_pool, block_table, kv_lengths, **kwargs) -> torch.Tensor:
    """The gather path on a CPU, for rows of different lengths: gathering every row up to the
    longest one's blocks copies, then attends over, slots that the length mask throws away (half
    of them when lengths spread evenly). Rows are sorted by length and cut into groups, each
    gathered only up to its own longest row."""
    page = k_pool.shape[2]
    lengths = kv_lengths.tolist()
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    groups = _length_groups(tuple(lengths[i] for i in order), page)
    out = q.new_empty(q.shape)
    for start, end in groups:
        rows = order[start:end]
        blocks = max(1, -(-lengths[rows[0]] // page))  # the group's longest row's blocks
        if len(groups) == 1:
            idx, table = slice(None), block_table[:, :blocks]
        else:
            idx = torch.tensor(rows, device=q.device)
            table = block_table.index_select(0, idx)[:, :blocks]
        index = _block_rows(table, k_pool.shape[1], page)  # one index for k and v
        k, v = _gather_rows(k_pool, index), _gather_rows(v_pool, index)
        out[idx] = impl(q[idx], k, v, kv_lengths=kv_lengths[idx], **kwargs)
    return out


def _paged_kernel(q: torch.Tensor, pool: torch.Tensor, key_mask, dropout_p: float) -> bool:
    """Whether attention over a paged pool reads it in place with the Triton paged-decode kernel
    (the `triton` backend, few queries per row, no padding mask or dropout), not through gather_blocks."""
    if key_mask is not None or dropout_p > 0.0 or _needs_grad(q, pool) or not kernels.available("paged_decode"):
        return False
    from llmstack.kernels import paged_decode as pd
    return pd.accepts(q, pool)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "sdpa", causal: bool = True,
              key_mask: Optional[torch.Tensor] = None, window: Optional[int] = None, dropout_p: float = 0.0,
              scale: Optional[float] = None, kv_lengths: Optional[torch.Tensor] = None,
              block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatch to a backend by name. Returns (B, Hq, Tq, D). `kv_lengths` and `block_table`: see
    the module docstring. With a block table, the `triton` backend reads the blocks in place
    (`llmstack.kernels.paged_decode`) when it can; every other case gathers them first."""
    try:
        impl = _IMPLS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}") from None
    if block_table is not None:
        if backend == "triton" and _paged_kernel(q, k, key_mask, dropout_p):
            from llmstack.kernels.paged_decode import paged_decode
            return paged_decode(q, k, v, block_table, kv_lengths, scale=scale, causal=causal, window=window)
        if q.device.type == "cpu" and kv_lengths is not None and key_mask is None and q.shape[0] > 1:
            return _paged_by_length(impl, q, k, v, block_table, kv_lengths, causal=causal, window=window,
                                    dropout_p=dropout_p, scale=scale)
        k, v = gather_blocks(k, block_table), gather_blocks(v, block_table)
    return impl(q, k, v, causal=causal, key_mask=key_mask, window=window, dropout_p=dropout_p, scale=scale,
                kv_lengths=kv_lengths)
