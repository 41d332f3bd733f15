"""Key/value caches: objects the caller creates and passes into `Transformer.forward`.

The interface every cache implements (the contiguous one here; a rolling one for
sliding windows and a paged one for serving follow the same shape):

    cache.seq_len                    slots filled so far (the position of the next token)
    cache.update(layer, k, v)        store this step's k, v (B, Hkv, T, D) for one layer and
                                     return the keys/values to attend over, the new ones last
    cache.advance(T)                 after all layers ran: T more slots are filled
    cache.truncate(n)                keep only the first n slots (rejected speculative tokens)
    cache.reset()

Buffers are allocated once, up front, for `max_seq_len` tokens (static shapes:
what `torch.compile` and CUDA graphs need), never inside `Attention`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class KVCache(nn.Module):
    """A contiguous, preallocated cache of shape (layers, B, Hkv, max_seq_len, D) for k and for v."""

    def __init__(self, n_layers: int, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        shape = (n_layers, batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views, indexed once
        self.max_seq_len = max_seq_len
        self.seq_len = 0

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_seq_len: Optional[int] = None, *,
                  dtype: Optional[torch.dtype] = None) -> "KVCache":
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.n_layers, batch_size, max_seq_len or cfg.max_seq_len, cfg.n_kv_heads, cfg.head_dim,
                   dtype=dtype or param.dtype, device=param.device)

    def _apply(self, fn, recurse=True):  # .to(device) replaces the buffers: re-take the views
        super()._apply(fn, recurse)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))
        return self

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.seq_len, self.seq_len + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache is full: {end} tokens do not fit in max_seq_len={self.max_seq_len}")
        k_all, v_all = self._layers[layer]
        k_all[:, :, start:end] = k
        v_all[:, :, start:end] = v
        return k_all[:, :, :end], v_all[:, :, :end]

    def advance(self, n: int) -> None:
        self.seq_len += n

    def truncate(self, n: int) -> None:
        """Forget every slot from n on; their stale contents are overwritten by later updates."""
        if not 0 <= n <= self.seq_len:
            raise ValueError(f"cannot truncate a cache holding {self.seq_len} tokens to {n}")
        self.seq_len = n

    def reset(self) -> None:
        self.seq_len = 0

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """2 (k and v) * layers * kv_heads * head_dim * bytes per element."""
        return 2 * n_layers * n_kv_heads * head_dim * torch.finfo(dtype).bits // 8
