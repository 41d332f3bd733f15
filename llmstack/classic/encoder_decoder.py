"""The full Transformer of "Attention Is All You Need": an encoder, a decoder and cross-attention between them.

Built from the decoder-only model's parts (`llmstack.model.transformer`): the same `Block`,
`Attention`, `MLP` and norms, configured by the same `ModelConfig`. What the original adds:

    encoder:  blocks whose self-attention is bidirectional (every source token sees every other),
              `EncoderBlock`, a `Block` with `BidirectionalAttention` in place of `Attention`;
    decoder:  blocks with a third sub-layer between self-attention and the MLP, cross-attention
              (`CrossAttention`): queries from the target, keys and values from the encoder's
              output, so each target position reads the whole source (`DecoderBlock`).

Pre-norm residual blocks as in the decoder-only model (Vaswani et al. normalised after the
addition; `torch.nn.Transformer(norm_first=True)` is this layout, and with LayerNorm, GELU
and biases the two compute the same: `tests/test_classic.py`). Positions follow config.pos
(RoPE by default, `sinusoidal` for the paper's); cross-attention has none, since source and
target positions are not comparable. Shapes: B batch, S source tokens, T target tokens,
C model width, H heads, D head dim.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmstack.model.attention import attention, resolve_backend
from llmstack.model.config import ModelConfig
from llmstack.model.functional import linear_cross_entropy
from llmstack.model.kv_cache import KVCache
from llmstack.model.rope import apply_rope, rope_cos_sin, rope_frequencies
from llmstack.model.transformer import Attention, Block, init_linear, init_norm, make_norm, sinusoidal_embedding


class BidirectionalAttention(Attention):
    """`Attention` (the same projections, heads, q/k norms and RoPE) with every query seeing every
    key that `key_mask` does not hide: the encoder's self-attention. `Attention.forward` masks
    causally and writes to a cache, neither of which an encoder wants; this forward is its first
    half with causal=False."""

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None, cache=None,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("an encoder reads its whole input at once and keeps no cache")
        B, T, _ = x.shape
        H, Hkv = self.config.n_heads, self.config.n_kv_heads
        qkv = self.qkv_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H + 2Hkv, T, D)
        qk, v = qkv.split([H + Hkv, Hkv], dim=1)
        if self.q_norm is not None:
            q, k = qk.split([H, Hkv], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.split([H, Hkv], dim=1)
        y = attention(q, k, v, backend=resolve_backend(self.config.attn_backend, x.device, q.dtype), causal=False,
                      key_mask=key_mask, dropout_p=self.config.attn_dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class CrossAttention(nn.Module):
    """Queries from x (B, T, C), keys and values from the encoder's output `memory` (B, S, C);
    `memory_mask` (B, S) hides padded source tokens. q and kv are two projections because they
    read two different sequences."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=config.qkv_bias)
        self.kv_proj = nn.Linear(config.dim, 2 * config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=config.bias)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k, v = self.kv_proj(memory).view(B, memory.shape[1], -1, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        y = attention(q, k, v, backend=resolve_backend(self.config.attn_backend, x.device, q.dtype), causal=False,
                      key_mask=memory_mask, dropout_p=self.config.attn_dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        init_linear(self.q_proj, std)
        init_linear(self.kv_proj, std)
        init_linear(self.o_proj, residual_std)  # writes into the residual stream


class EncoderBlock(Block):
    """A `Block` whose self-attention is bidirectional."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.attn = BidirectionalAttention(config, layer_idx)


class DecoderBlock(Block):
    """A `Block` with cross-attention between its causal self-attention and its MLP:
    x + self_attn(norm(x)), then x + cross_attn(norm(x), memory), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.cross_norm = make_norm(config)
        self.cross_attn = CrossAttention(config)

    def forward(self, x, memory, memory_mask=None, rope=None, cache=None, key_mask=None):
        x = x + self._dropout(self.attn(self.attn_norm(x), rope, cache, key_mask))
        x = x + self._dropout(self.cross_attn(self.cross_norm(x), memory, memory_mask))
        return x + self._dropout(self.mlp(self.mlp_norm(x)))

    def _dropout(self, h: torch.Tensor) -> torch.Tensor:
        return F.dropout(h, self.dropout, self.training) if self.dropout else h

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        super().init_weights(std, residual_std)
        init_norm(self.cross_norm)
        self.cross_attn.init_weights(std, residual_std)


class Positions(nn.Module):
    """config.pos for the models here, as the decoder-only Transformer applies it: RoPE angles
    handed to the attention, or fixed sinusoids added to the embeddings ("none": neither)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.pos not in ("rope", "sinusoidal", "none"):
            raise ValueError(f"model.pos={config.pos!r}: the encoder models take rope, sinusoidal or none")
        self.config = config
        inv_freq, self.attention_factor = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor):
        """(x with sinusoids added if any, RoPE's (cos, sin) or None) for embeddings x (B, T, C)."""
        if self.config.pos == "sinusoidal":
            return x + sinusoidal_embedding(positions, self.config.dim).to(x.dtype), None
        if self.config.pos == "rope":
            return x, rope_cos_sin(positions, self.inv_freq, self.attention_factor, dtype=x.dtype)
        return x, None

    @torch.no_grad()
    def init_buffers(self) -> None:
        inv_freq, _ = rope_frequencies(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)
        self.inv_freq = inv_freq.to(self.inv_freq.device)


class Encoder(nn.Module):
    """`n_layers` encoder blocks and a final norm, over embeddings: (B, S, C) -> (B, S, C)."""

    def __init__(self, config: ModelConfig, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderBlock(config, i) for i in range(n_layers))
        self.norm = make_norm(config)

    def forward(self, x: torch.Tensor, rope=None, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, rope, None, key_mask)
        return self.norm(x)

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        for layer in self.layers:
            layer.init_weights(std, residual_std)
        init_norm(self.norm)


class EncoderDecoder(nn.Module):
    """Source ids -> encoder -> memory; target ids + memory -> decoder -> next-token logits.

    One embedding matrix for source and target tokens (a shared vocabulary, as in the paper),
    also the output head when config.tie_embeddings. config.n_layers decoder blocks and
    `n_encoder_layers` (default the same) encoder blocks."""

    def __init__(self, config: ModelConfig, n_encoder_layers: Optional[int] = None):
        super().__init__()
        config.validate()
        if config.moe is not None or config.sliding_window is not None:
            raise ValueError("the encoder-decoder model takes dense, full-attention configs (no moe, no sliding_window)")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.positions = Positions(config)
        self.encoder = Encoder(config, n_encoder_layers or config.n_layers)
        self.decoder = nn.ModuleList(DecoderBlock(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The decoder-only model's rules (`Transformer.init_weights`), the residual scaling by
        the depth of each stack."""
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, mean=0.0, std=std)
        self.encoder.init_weights(std, std / math.sqrt(2 * len(self.encoder.layers)))
        # Three residual branches per decoder block.
        residual_std = std / math.sqrt(3 * len(self.decoder))
        for layer in self.decoder:
            layer.init_weights(std, residual_std)
        init_norm(self.norm)
        if self.lm_head is not None:
            init_linear(self.lm_head, std)
        self.positions.init_buffers()

    def encode(self, src_ids: torch.Tensor, src_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The encoder's output (B, S, C) for source ids (B, S); src_mask (B, S) True on real tokens."""
        x = self.embed(src_ids)
        x, rope = self.positions(x, torch.arange(src_ids.shape[1], device=src_ids.device))
        if self.config.dropout:
            x = F.dropout(x, self.config.dropout, self.training)
        return self.encoder(x, rope, src_mask)

    def decode(self, tgt_ids: torch.Tensor, memory: torch.Tensor, src_mask: Optional[torch.Tensor] = None, *,
               cache: Optional[KVCache] = None) -> torch.Tensor:
        """The decoder's final hidden states (B, T, C), after its norm, for target ids (B, T);
        with a KVCache the T tokens continue what it holds."""
        start = cache.seq_len if cache is not None else 0
        x = self.embed(tgt_ids)
        x, rope = self.positions(x, torch.arange(start, start + tgt_ids.shape[1], device=tgt_ids.device))
        if self.config.dropout:
            x = F.dropout(x, self.config.dropout, self.training)
        for layer in self.decoder:
            x = layer(x, memory, src_mask, rope, cache)
        if cache is not None:
            cache.advance(tgt_ids.shape[1])
        return self.norm(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)

    def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor, *, src_mask: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, T, vocab) for every target position (teacher forcing); with targets (B, T)
        (-100: none), the summed cross-entropy instead (float32)."""
        x = self.decode(tgt_ids, self.encode(src_ids, src_mask), src_mask)
        if targets is None:
            return self.head(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return linear_cross_entropy(x.flatten(0, 1), weight, targets.flatten())

    @torch.no_grad()
    def generate(self, src_ids: torch.Tensor, max_new_tokens: int, *, bos_id: int,
                 src_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Greedy decoding (B, max_new_tokens) from `bos_id`: the source is encoded once, and the
        decoder's self-attention keys and values go to a KVCache as with the decoder-only model."""
        memory = self.encode(src_ids, src_mask)
        B = src_ids.shape[0]
        cfg = self.config
        cache = KVCache(cfg.n_layers, B, max_new_tokens, cfg.n_kv_heads, cfg.head_dim, dtype=memory.dtype,
                        device=memory.device)
        token = torch.full((B, 1), bos_id, dtype=torch.long, device=src_ids.device)
        out = []
        for _ in range(max_new_tokens):
            token = self.head(self.decode(token, memory, src_mask, cache=cache)[:, -1:]).argmax(-1)  # (B, 1)
            out.append(token)
        return torch.cat(out, dim=1)
