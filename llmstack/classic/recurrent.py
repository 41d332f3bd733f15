"""Recurrent language models (LSTM, GRU) that train and generate through the Transformer's pipeline.

    model: {arch: lstm, vocab_size: 4096, dim: 272, n_layers: 2, tie_embeddings: true}

`RecurrentLM` honours the parts of `Transformer.forward`'s contract that training, evaluation
and generation use (targets -> summed float32 cross-entropy; logits_to_keep; attn_mask for
left-padded batches; a cache object passed in and advanced), so `scripts/pretrain.py`,
`scripts/eval.py` and `scripts/generate.py` run it unchanged. It reads vocab_size, dim,
n_layers, dropout, tie_embeddings, max_seq_len and init_std from `ModelConfig`; the
attention fields mean nothing to it. Build it with `llmstack.interop.build(config)`.

Where a Transformer's cache grows by one key and value per token, a recurrent model's is its
state: (layers, B, dim) for h (and for the LSTM's c), the same size after 10 tokens or 10,000.
That is also why it cannot be rolled back (speculative decoding) or reordered cheaply per
token (beam search keeps KV caches): it keeps no per-token history.

The recurrence runs in torch's fused `nn.LSTM` / `nn.GRU`, not in the step-by-step
`llmstack.classic.rnn` modules: a training step of two 272-wide layers over 16 x 256 tokens
(forward + backward, one CPU thread) took 381 ms fused against 1648 ms for our LSTM
(GRU: 387 against 1399). The parameters have the same names and layout, so either loads the
other's weights and computes the same outputs (`tests/test_recurrent_lm.py`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmstack.model.config import ModelConfig
from llmstack.model.functional import linear_cross_entropy


class RecurrentState:
    """The cache of a `RecurrentLM`: its state after the tokens seen so far, h (and c for an
    LSTM) of shape (layers, B, dim), with the cache interface of `llmstack.model.kv_cache`
    (seq_len, lengths, block_table, advance, reset, truncate)."""

    lengths = None  # every row has seen the same number of tokens (padding included)
    block_table = None

    def __init__(self, n_layers: int, batch_size: int, dim: int, *, lstm: bool, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        self.h = torch.zeros(n_layers, batch_size, dim, dtype=dtype, device=device)
        self.c = torch.zeros_like(self.h) if lstm else None
        self.seq_len = 0

    @property
    def state(self):
        """What nn.LSTM (h, c) or nn.GRU (h) takes and returns."""
        return (self.h, self.c) if self.c is not None else self.h

    @state.setter
    def state(self, value) -> None:
        if self.c is not None:
            self.h, self.c = value
        else:
            self.h = value

    def advance(self, n: int) -> None:
        self.seq_len += n

    def reset(self) -> None:
        self.h = torch.zeros_like(self.h)
        if self.c is not None:
            self.c = torch.zeros_like(self.c)
        self.seq_len = 0

    def truncate(self, n: int) -> None:
        if n != self.seq_len:
            raise ValueError(f"cannot truncate a recurrent state of {self.seq_len} tokens to {n}: it holds only its "
                             "state after the last token, not one per token (speculative decoding needs a "
                             "Transformer's KV cache)")


class RecurrentLM(nn.Module):
    """Embedding -> `n_layers` LSTM or GRU layers of width `dim` -> output head (tied or not).

    Dropout (config.dropout) on the embeddings, between recurrent layers and before the head,
    as in Zaremba et al. (2014). Positions are implicit in the recurrence: `positions` is
    accepted and ignored."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        if config.arch not in ("lstm", "gru"):
            raise ValueError(f"RecurrentLM builds model.arch lstm or gru, got {config.arch!r}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        rnn = nn.LSTM if config.arch == "lstm" else nn.GRU
        self.rnn = rnn(config.dim, config.dim, config.n_layers, batch_first=True,
                       dropout=config.dropout if config.n_layers > 1 else 0.0)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self) -> None:
        """Embedding and untied head normal(0, 3 / sqrt(dim)); recurrent weights and biases uniform
        in +-1/sqrt(dim) (torch's default for nn.LSTM/GRU); an LSTM's forget-gate bias at 1, so the
        cell starts out remembering (Gers et al. 2000; Jozefowicz et al. 2015).

        Not the Transformer's init_std (0.02): the head reads h, whose entries lie in (-1, 1) with
        an RMS near 1/3, directly, with no final norm to rescale it, so 0.02 starts the logits
        near 0.1 and the first few hundred steps go into growing them (the quickstart-size LSTM
        stayed near the unigram loss for 300 steps); 3 / sqrt(dim) starts them near 1."""
        std = 3 / math.sqrt(self.config.dim)
        nn.init.normal_(self.embed.weight, mean=0.0, std=std)
        bound = 1 / math.sqrt(self.config.dim)
        for p in self.rnn.parameters():
            nn.init.uniform_(p, -bound, bound)
        if self.config.arch == "lstm":
            dim = self.config.dim
            for k in range(self.config.n_layers):
                getattr(self.rnn, f"bias_ih_l{k}")[dim:2 * dim].fill_(1.0)  # gates i, f, g, o: f
                getattr(self.rnn, f"bias_hh_l{k}")[dim:2 * dim].zero_()
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)

    def init_buffers(self) -> None:
        """Nothing to recompute: the model has no non-persistent buffers (the Transformer's RoPE
        tables have no counterpart here)."""

    def make_cache(self, batch_size: int, max_seq_len: Optional[int] = None) -> RecurrentState:
        """A zero state for `batch_size` rows. `max_seq_len` is accepted for `KVCache.for_model`'s
        sake and unused: the state is the same size however many tokens it has seen."""
        param = self.embed.weight
        return RecurrentState(self.config.n_layers, batch_size, self.config.dim, lstm=self.config.arch == "lstm",
                              dtype=param.dtype, device=param.device)

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: torch.Tensor, *, positions: Optional[torch.Tensor] = None,
                cache: Optional[RecurrentState] = None, attn_mask: Optional[torch.Tensor] = None,
                logits_to_keep: Optional[int] = None, targets: Optional[torch.Tensor] = None,
                return_hidden: bool = False, return_aux: bool = False):
        """Logits (B, T, vocab) for input_ids (B, T); the arguments as `Transformer.forward`'s.

        cache:     a `RecurrentState` (`make_cache`): the run starts from its state, which is then
                   replaced by the state after these T tokens.
        attn_mask: (B, S) bool, True for real tokens; its last T columns are this call's. A step
                   where it is False leaves that row's state unchanged, so each row of a
                   left-padded batch computes what it would alone.
        """
        if return_hidden and targets is not None:
            raise ValueError("return_hidden and targets ask for two different outputs; pass one of them")
        if cache is not None and not isinstance(cache, RecurrentState):
            raise ValueError(f"a recurrent LM keeps its state in a RecurrentState (model.make_cache), not a "
                             f"{type(cache).__name__}: beam search and speculative decoding, which reorder or roll "
                             "back a KV cache, need a Transformer")
        B, T = input_ids.shape
        x = self.embed(input_ids)  # (B, T, C)
        if self.config.dropout:
            x = F.dropout(x, self.config.dropout, self.training)
        state = cache.state if cache is not None else None
        mask = attn_mask[:, -T:] if attn_mask is not None else None  # (B, T): this call's tokens
        if mask is not None and not bool(mask.all()):
            x, state = self._masked_run(x, state, mask)
        else:
            x, state = self.rnn(x, state)  # fused over all T steps
        if cache is not None:
            cache.state = state
            cache.advance(T)
        if self.config.dropout:
            x = F.dropout(x, self.config.dropout, self.training)
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]
        if return_hidden:
            out = x
        elif targets is not None:
            out = self._loss(x, targets)
        else:
            out = self.head(x)
        return (out, {"aux_loss": None, "expert_load": None}) if return_aux else out

    def _masked_run(self, x: torch.Tensor, state, mask: torch.Tensor):
        """The recurrence one step at a time, keeping the old state in rows whose step is masked.
        Only prefills of left-padded batches come here; everything else runs fused."""
        B = x.shape[0]
        if state is None:
            h = x.new_zeros(self.config.n_layers, B, self.config.dim)
            state = (h, torch.zeros_like(h)) if self.config.arch == "lstm" else h
        outs = []
        for t in range(x.shape[1]):
            out, new = self.rnn(x[:, t:t + 1], state)  # out (B, 1, C)
            keep = mask[:, t].view(1, B, 1)  # broadcasts over (layers, B, C)
            if isinstance(new, tuple):
                state = tuple(torch.where(keep, n, s) for n, s in zip(new, state))
            else:
                state = torch.where(keep, new, state)
            outs.append(out)
        return torch.cat(outs, dim=1), state  # (B, T, C)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) of hidden states x (..., dim)."""
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)

    def _loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy (float32), the head and the loss fused chunk by chunk."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return linear_cross_entropy(x.flatten(0, 1), weight, targets.flatten())

    # ------------------------------------------------------------------ accounting

    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n


def build_recurrent_lm(config: ModelConfig, *, device: torch.device | str | None = None,
                       dtype: Optional[torch.dtype] = None) -> RecurrentLM:
    """As `llmstack.model.build_model`: built on the meta device, then allocated uninitialised on
    `device`; call `init_weights()` or load a state dict next. (Use `llmstack.interop.build`,
    which picks the builder from config.arch.)"""
    with torch.device("meta"):
        model = RecurrentLM(config)
    model.to_empty(device=device or "cpu")
    if dtype is not None:
        model.to(dtype)
    return model

