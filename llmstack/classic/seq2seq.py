"""Sequence to sequence with a GRU encoder and decoder, with or without Bahdanau (additive) attention.

    encoder:   h_1 .. h_S = GRU(embed(x_1 .. x_S))
    decoder:   s_0 = h_S;  at step t, from the previous token y_{t-1} and state s_{t-1}:
               c_t = context(s_{t-1});  s_t = GRUCell([embed(y_{t-1}); c_t], s_{t-1})
               logits_t = W_out [s_t; c_t; embed(y_{t-1})]

Without attention (Cho et al. 2014; Sutskever et al. 2014) the context is h_S at every step:
the whole source must pass through one fixed-size vector, the bottleneck. With attention
(Bahdanau et al. 2015) it is a weighted average of all the encoder's states, the weights
a softmax over scores that the decoder's state gives each source position:

    e_tj = v^T tanh(W_q s_{t-1} + W_k h_j),   a_t = softmax_j(e_tj),   c_t = sum_j a_tj h_j

(additive attention; the Transformer's scaled dot product q.k / sqrt(d) replaced it).
`scripts/experiments/seq2seq_attention.py` measures the bottleneck against source length
and draws the weights.

The recurrences run in torch's `nn.GRU` / `nn.GRUCell`, which compute what
`llmstack.classic.rnn.GRU` does (tested) several times faster. Shapes: B batch, S source
length, T target length, E embedding width, H hidden width.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class AdditiveAttention(nn.Module):
    """Bahdanau's scores v^T tanh(W_q query + W_k key_j) and the weighted average of the values
    (the keys themselves here). W_k keys is computed once per source (`project_keys`)."""

    def __init__(self, query_dim: int, key_dim: int, hidden: int):
        super().__init__()
        self.query_proj = nn.Linear(query_dim, hidden, bias=False)
        self.key_proj = nn.Linear(key_dim, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)  # v

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return self.key_proj(keys)  # (B, S, hidden)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, projected_keys: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, key_dim), weights (B, S)) for query (B, query_dim) over keys (B, S, key_dim);
        mask (B, S) True on real source tokens."""
        e = self.score(torch.tanh(self.query_proj(query)[:, None, :] + projected_keys)).squeeze(-1)  # (B, S)
        if mask is not None:
            e = e.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(e, dim=-1)
        return torch.bmm(weights[:, None, :], keys).squeeze(1), weights


class Source(NamedTuple):
    """What the decoder reads of an encoded source."""

    states: torch.Tensor  # (B, S, H) encoder states, zero past each row's length
    last: torch.Tensor  # (B, H) each row's final state h_S
    mask: torch.Tensor  # (B, S) True on real tokens
    keys: Optional[torch.Tensor]  # (B, S, hidden) W_k states, with attention


class Seq2Seq(nn.Module):
    """GRU encoder-decoder over one vocabulary (source and target share the embedding)."""

    def __init__(self, vocab_size: int, emb_dim: int, hidden: int, *, attention: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, emb_dim)
        self.encoder = nn.GRU(emb_dim, hidden, batch_first=True)
        self.attention = AdditiveAttention(hidden, hidden, hidden) if attention else None
        self.decoder = nn.GRUCell(emb_dim + hidden, hidden)
        self.out = nn.Linear(2 * hidden + emb_dim, vocab_size)

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> Source:
        """Encode right-padded sources src (B, S) of lengths src_lengths (B,); packing runs each
        row over its own tokens only, so h_S is its last real token's state."""
        packed = pack_padded_sequence(self.embed(src), src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        states, last = self.encoder(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=src.shape[1])  # (B, S, H)
        mask = torch.arange(src.shape[1], device=src.device)[None, :] < src_lengths[:, None]
        keys = self.attention.project_keys(states) if self.attention is not None else None
        return Source(states, last[0], mask, keys)

    def step(self, emb: torch.Tensor, s: torch.Tensor, source: Source):
        """One decoder step from the previous token's embedding (B, E) and state s (B, H):
        (new state (B, H), logits (B, vocab), attention weights (B, S) or None)."""
        if self.attention is not None:
            context, weights = self.attention(s, source.states, source.keys, source.mask)
        else:
            context, weights = source.last, None  # the bottleneck: one vector for every step
        s = self.decoder(torch.cat([emb, context], dim=-1), s)
        return s, self.out(torch.cat([s, context, emb], dim=-1)), weights

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor, *,
                return_attention: bool = False):
        """Logits (B, T, vocab) for target inputs tgt_in (B, T) (BOS, y_1, ..., y_{T-1}), teacher
        forced; with return_attention, also the weights (B, T, S) (None without attention)."""
        source = self.encode(src, src_lengths)
        s, emb = source.last, self.embed(tgt_in)  # s_0 = h_S
        logits, weights = [], []
        for t in range(tgt_in.shape[1]):
            s, step_logits, w = self.step(emb[:, t], s, source)
            logits.append(step_logits)
            weights.append(w)
        logits = torch.stack(logits, dim=1)
        if not return_attention:
            return logits
        return logits, (torch.stack(weights, dim=1) if self.attention is not None else None)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, src_lengths: torch.Tensor, max_new_tokens: int, *,
                 bos_id: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Greedy decoding: (tokens (B, max_new_tokens), attention weights (B, max_new_tokens, S) or None)."""
        source = self.encode(src, src_lengths)
        s = source.last
        token = torch.full((src.shape[0],), bos_id, dtype=torch.long, device=src.device)
        tokens, weights = [], []
        for _ in range(max_new_tokens):
            s, logits, w = self.step(self.embed(token), s, source)
            token = logits.argmax(-1)
            tokens.append(token)
            weights.append(w)
        return torch.stack(tokens, dim=1), (torch.stack(weights, dim=1) if self.attention is not None else None)
