"""Key/value caches: objects the caller creates and passes into `Transformer.forward`.

The interface every cache implements (the contiguous `KVCache`, the `RollingKVCache` for
sliding windows, the static one of the compiled decode step, and a paged one for serving):

    cache.seq_len                    tokens seen so far by the longest row (the position of
                                     the next token when all rows are equally long)
    cache.lengths                    None, or (B,) tokens held by each row when rows differ
                                     (the attention backend receives lengths + T as `kv_lengths`)
    cache.block_table                None, or (B, blocks) for a paged cache, whose `update`
                                     returns its block pools (handed to the backend as is)
    cache.update(layer, k, v)        store this step's k, v (B, Hkv, T, D) for one layer and
                                     return the keys/values to attend over, the new ones last
    cache.advance(T)                 after all layers ran: T more slots are filled in every row
    cache.truncate(n)                keep only the first n slots (rejected speculative tokens)
    cache.reset()

Buffers are allocated once, up front, for `max_seq_len` tokens (or a window's
worth), never inside `Attention`: static shapes are what `torch.compile` and CUDA
graphs need (see `llmstack.inference.compiled`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from llmstack.config import is_int


class _SlotBuffers(nn.Module):
    """What every cache shares: k and v buffers of shape (layers, B, Hkv, slots, D), allocated
    once, per-layer views of them, and the count of tokens seen."""

    def __init__(self, n_layers: int, batch_size: int, slots: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str | None):
        super().__init__()
        shape = (n_layers, batch_size, n_kv_heads, slots, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views, indexed once
        self.seq_len = 0
        self.lengths: Optional[torch.Tensor] = None
        self.block_table: Optional[torch.Tensor] = None

    def _apply(self, fn, recurse=True):  # .to(device) replaces the buffers: re-take the views
        super()._apply(fn, recurse)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))
        if self.lengths is not None:
            self.lengths = self.lengths.to(self.k.device)
        return self

    def advance(self, n: int) -> None:
        self.seq_len += n
        if self.lengths is not None:
            self.lengths += n

    def reset(self) -> None:
        self.seq_len = 0
        self.lengths = None


class KVCache(_SlotBuffers):
    """A contiguous, preallocated cache of shape (layers, B, Hkv, max_seq_len, D) for k and for v."""

    def __init__(self, n_layers: int, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__(n_layers, batch_size, max_seq_len, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_seq_len: Optional[int] = None, *,
                  dtype: Optional[torch.dtype] = None) -> "KVCache":
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.n_layers, batch_size, max_seq_len or cfg.max_seq_len, cfg.n_kv_heads, cfg.head_dim,
                   dtype=dtype or param.dtype, device=param.device)

    def set_lengths(self, lengths) -> None:
        """Let each row hold its own number of tokens (B ints, at most max_seq_len): row b's next
        tokens are stored from slot lengths[b] on and sit at those positions, and attention sees
        only its first lengths[b] + T slots. No padding goes in front of a shorter row."""
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=self.k.device)
        if lengths.shape != (self.k.shape[1],):
            raise ValueError(f"lengths must have one entry per row ({self.k.shape[1]}), got shape "
                             f"{tuple(lengths.shape)}")
        longest = int(lengths.max())
        if int(lengths.min()) < 0 or longest > self.max_seq_len:
            raise ValueError(f"lengths must be in [0, {self.max_seq_len}], got {lengths.tolist()}")
        self.lengths, self.seq_len = lengths.clone(), longest

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        start, end = self.seq_len, self.seq_len + T
        if end > self.max_seq_len:
            raise ValueError(f"KV cache is full: {end} tokens do not fit in max_seq_len={self.max_seq_len}")
        k_all, v_all = self._layers[layer]
        if self.lengths is not None:  # row b writes at its own slots lengths[b] .. lengths[b] + T - 1
            slots = (self.lengths[:, None] + torch.arange(T, device=k.device))[:, None, :, None]  # (B, 1, T, 1)
            k_all.scatter_(2, slots.expand_as(k), k)
            v_all.scatter_(2, slots.expand_as(v), v)
        else:
            k_all.narrow(2, start, T).copy_(k)  # narrow: a view, without indexing's overhead
            v_all.narrow(2, start, T).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)

    def truncate(self, n: int) -> None:
        """Forget every slot from n on (in every row); their stale contents are overwritten by later updates."""
        if not is_int(n) or not 0 <= n <= self.seq_len:
            raise ValueError(f"cannot truncate a cache holding {self.seq_len} tokens to {n}")
        self.seq_len = n
        if self.lengths is not None:
            self.lengths.clamp_(max=n)

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """2 (k and v) * layers * kv_heads * head_dim * bytes per element."""
        return 2 * n_layers * n_kv_heads * head_dim * torch.finfo(dtype).bits // 8


class RollingKVCache(_SlotBuffers):
    """A ring buffer for sliding-window models: memory for `window + extra_slots` tokens, however long the text.

    With a sliding window of W, a new token attends to itself and the W - 1 tokens
    before it, so older keys are never read again. Position p lives in slot
    p % slots. `update` returns the kept past (at most W - 1 tokens) followed by
    the new keys, in chronological order, so the attention's bottom-right aligned
    causal and window masks stay right without knowing about the ring; `seq_len`
    counts every token seen, so positions (RoPE) keep growing past the window.

    A prompt chunk longer than the ring is attended in full (a transient tensor of
    kept past + chunk) and only its last slots are stored. `extra_slots` keeps that
    many older tokens as well, so that `truncate` can roll back that far
    (speculative decoding); with none it can only drop the newest token.

    The keys returned are always the newest ones, so a padding mask over all the
    slots seen (`attn_mask`, as for `KVCache`) applies through its last columns:
    a left-padded batch of unequal prompts works as with the contiguous cache.
    """

    def __init__(self, n_layers: int, batch_size: int, window: int, n_kv_heads: int, head_dim: int, *,
                 extra_slots: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if extra_slots < 0:
            raise ValueError(f"extra_slots must be >= 0, got {extra_slots}")
        super().__init__(n_layers, batch_size, window + extra_slots, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.window, self.slots = window, window + extra_slots

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, *, extra_slots: int = 0,
                  dtype: Optional[torch.dtype] = None) -> "RollingKVCache":
        cfg = model.config
        if cfg.sliding_window is None:
            raise ValueError("RollingKVCache needs a sliding-window model (model.sliding_window is null); "
                             "use KVCache for full attention")
        param = next(model.parameters())
        return cls(cfg.n_layers, batch_size, cfg.sliding_window, cfg.n_kv_heads, cfg.head_dim,
                   extra_slots=extra_slots, dtype=dtype or param.dtype, device=param.device)

    def _slots_of(self, start: int, n: int) -> torch.Tensor:
        return torch.arange(start, start + n, device=self.k.device) % self.slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        past = min(self.seq_len, self.window - 1)  # kept tokens any new query can still see
        k_all, v_all = self._layers[layer]
        if past + T <= self.slots:
            # Decode and short chunks: the new tokens only overwrite slots older than `past`,
            # so write first and read past + new back in one gather.
            new = self._slots_of(self.seq_len, T)
            k_all.index_copy_(2, new, k)
            v_all.index_copy_(2, new, v)
            keep = self._slots_of(self.seq_len - past, past + T)
            return k_all.index_select(2, keep), v_all.index_select(2, keep)
        # A chunk longer than the ring: read the past before the chunk overwrites it.
        keep = self._slots_of(self.seq_len - past, past)
        k_out = torch.cat((k_all.index_select(2, keep), k), dim=2)  # (B, Hkv, past + T, D)
        v_out = torch.cat((v_all.index_select(2, keep), v), dim=2)
        n = min(T, self.slots)
        tail = self._slots_of(self.seq_len + T - n, n)
        k_all.index_copy_(2, tail, k[:, :, T - n:])
        v_all.index_copy_(2, tail, v[:, :, T - n:])
        return k_out, v_out

    def truncate(self, n: int) -> None:
        """Forget every token from n on. Possible while the window - 1 tokens before n are still in
        the ring: n >= seq_len - 1 - extra_slots, or anywhere before the ring first wrapped."""
        oldest_kept = max(0, self.seq_len - self.slots)
        lowest = oldest_kept + self.window - 1 if oldest_kept else 0
        if not is_int(n) or not lowest <= n <= self.seq_len:
            raise ValueError(f"cannot truncate a rolling cache of {self.seq_len} tokens to {n}: n must be in "
                             f"[{lowest}, {self.seq_len}] (older tokens left the ring; keep more with extra_slots)")
        self.seq_len = n
