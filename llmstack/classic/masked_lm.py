"""An encoder-only model trained to fill in masked tokens (BERT), beside the decoder-only one.

A causal LM predicts token t from tokens < t: it can generate, one token after another. A
masked LM sees the whole sequence, with some tokens hidden, and predicts the hidden ones
from both sides: better representations of a text it is given, no natural way to extend
one. `scripts/experiments/masked_vs_causal.py` trains both, at the same size on the same
corpus, and measures each at the other's job.

BERT's corruption (Devlin et al. 2019, section 3.1): choose 15% of the positions; of those,
80% become [MASK], 10% a random token, 10% stay as they are; the loss is over the chosen
positions only. The random and unchanged ones keep the model from learning that only
[MASK] positions matter, since at fine-tuning time there is no [MASK].
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmstack.classic.encoder_decoder import Encoder, Positions
from llmstack.model.config import ModelConfig
from llmstack.model.functional import linear_cross_entropy
from llmstack.model.transformer import init_linear


def mask_tokens(ids: torch.Tensor, *, mask_id: int, vocab_size: int, mask_prob: float = 0.15,
                can_mask: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10 corruption of token ids (B, T): (inputs, targets), targets -100 except at
    the chosen positions, where they hold the original token. `can_mask` (B, T) bool limits the
    choice (e.g. not padding). Random replacements are drawn from [0, vocab_size)."""
    def uniform():
        return torch.rand(ids.shape, generator=generator, device=ids.device)

    chosen = uniform() < mask_prob
    if can_mask is not None:
        chosen &= can_mask
    action = uniform()  # one draw decides among [MASK] (< 0.8), random (< 0.9) and unchanged
    inputs = ids.clone()
    inputs[chosen & (action < 0.8)] = mask_id
    randomised = chosen & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(0, vocab_size, ids.shape, generator=generator, device=ids.device)
    inputs[randomised] = random_ids[randomised]
    targets = torch.where(chosen, ids, torch.full_like(ids, -100))
    return inputs, targets


class MaskedLM(nn.Module):
    """Embedding -> encoder blocks (bidirectional `Block`s) -> norm -> head.

    The vocabulary is config.vocab_size tokens and includes the [MASK] token (`mask_id`, by
    default the last id, which a tokenizer of vocab_size - 1 tokens never produces)."""

    def __init__(self, config: ModelConfig, mask_id: Optional[int] = None):
        super().__init__()
        config.validate()
        self.config = config
        self.mask_id = config.vocab_size - 1 if mask_id is None else mask_id
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.positions = Positions(config)
        self.encoder = Encoder(config, config.n_layers)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, mean=0.0, std=std)
        self.encoder.init_weights(std, std / math.sqrt(2 * self.config.n_layers))
        if self.lm_head is not None:
            init_linear(self.lm_head, std)
        self.positions.init_buffers()

    def forward(self, input_ids: torch.Tensor, *, attn_mask: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, T, vocab) at every position; with targets (B, T) (-100 where nothing is
        asked, as `mask_tokens` makes them), the summed cross-entropy (float32) instead.
        attn_mask (B, T): True on real tokens; padding is hidden from every position."""
        x = self.embed(input_ids)  # (B, T, C)
        x, rope = self.positions(x, torch.arange(input_ids.shape[1], device=input_ids.device))
        if self.config.dropout:
            x = F.dropout(x, self.config.dropout, self.training)
        x = self.encoder(x, rope, attn_mask)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        if targets is None:
            return F.linear(x, weight)
        return linear_cross_entropy(x.flatten(0, 1), weight, targets.flatten())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
