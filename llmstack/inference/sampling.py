"""Sampling: turn next-token logits into a token, the way the common serving APIs define it.

The processing order is the usual one (transformers, vLLM):

    penalties on the raw logits -> temperature -> top-k -> top-p -> min-p -> sample

Penalties first, because they encode what was already said and must not be
scaled away by the temperature; the truncations last, each on the distribution
the previous step left. Temperature 0 means argmax of the penalised logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from llmstack.config import is_int

Generators = Optional[torch.Generator | Sequence[torch.Generator]]


@dataclass
class SamplingParams:
    """How to pick the next token. The defaults sample from the model's own distribution.

    temperature:        divide logits by it; 0 = greedy (argmax).
    top_k:              keep the k most likely tokens (ties at the k-th value are all kept).
    top_p:              nucleus: keep the smallest set of most likely tokens whose mass reaches p.
    min_p:              keep the tokens with p >= min_p * p_max.
    repetition_penalty: CTRL's: divide positive logits and multiply negative ones of every token
                        already in prompt + output by it (> 1 discourages repeats).
    frequency_penalty:  OpenAI's: subtract penalty * (times the token was generated).
    presence_penalty:   OpenAI's: subtract penalty once if the token was generated at all.
    seed:               seed of this request's random generator (None: torch's global one).
    """

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: Optional[int] = None

    def validate(self, vocab_size: Optional[int] = None) -> "SamplingParams":
        """Raise ValueError naming the first bad value and its allowed range; return self."""
        if not self.temperature >= 0 or math.isinf(self.temperature):  # `not >=` also catches NaN
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None:
            high = vocab_size if vocab_size is not None else "vocab_size"
            if not is_int(self.top_k) or self.top_k < 1 or (vocab_size is not None and self.top_k > vocab_size):
                raise ValueError(f"top_k must be an integer in [1, {high}], got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0 or math.isinf(self.repetition_penalty):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number (0 = off), got {getattr(self, name)}")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def make_generator(self, device: torch.device | str = "cpu") -> Optional[torch.Generator]:
        return torch.Generator(device=device).manual_seed(self.seed) if self.seed is not None else None


class TokenHistory:
    """What the penalties look at, per row: which tokens prompt + output contain (repetition
    penalty) and how many times each was generated (frequency and presence penalties)."""

    def __init__(self, prompts: Sequence[Sequence[int] | torch.Tensor], vocab_size: int,
                 device: torch.device | str = "cpu"):
        self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)  # (B, V)
        self.counts = torch.zeros(len(prompts), vocab_size, dtype=torch.float32, device=device)  # (B, V)
        for row, prompt in enumerate(prompts):
            self.seen[row, torch.as_tensor(prompt, dtype=torch.long, device=device)] = True

    def append(self, tokens: torch.Tensor) -> None:
        """Record one generated token per row, tokens: (B,)."""
        rows = torch.arange(len(tokens), device=tokens.device)
        self.seen[rows, tokens] = True
        self.counts[rows, tokens] += 1


def apply_penalties(logits: torch.Tensor, history: TokenHistory, params: SamplingParams) -> torch.Tensor:
    """Repetition, frequency and presence penalties on raw logits (B, V); returns float32 logits."""
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(history.seen, penalised, logits)
    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        logits = logits - params.frequency_penalty * history.counts \
            - params.presence_penalty * (history.counts > 0).float()
    return logits


def process_logits(logits: torch.Tensor, params: SamplingParams,
                   history: Optional[TokenHistory] = None) -> torch.Tensor:
    """The logits (B, V), float32, of the distribution `sample` draws from: removed tokens are
    -inf. At temperature 0 that distribution is one-hot at the argmax of the penalised logits."""
    logits = logits.float()
    if history is not None and params.has_penalties:
        logits = apply_penalties(logits, history, params)
    if params.greedy:
        best = logits.argmax(dim=-1, keepdim=True)
        return torch.full_like(logits, float("-inf")).scatter(-1, best, 0.0)
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p:
        # drop a token when the mass of the tokens ranked before it already reaches p.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p is not None and params.min_p > 0.0:
        probs = logits.softmax(dim=-1)  # the threshold is relative, so renormalising does not matter
        logits = logits.masked_fill(probs < params.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, *, history: Optional[TokenHistory] = None,
           generator: Generators = None) -> torch.Tensor:
    """Next token (B,) from logits (B, V). `generator` is one generator for the whole batch, or
    one per row, so that a row draws exactly what it would draw alone with that generator."""
    if params.greedy:
        if history is not None and params.has_penalties:
            logits = apply_penalties(logits, history, params)
        return logits.argmax(dim=-1)
    probs = process_logits(logits, params, history).softmax(dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if len(generator) != probs.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {probs.shape[0]} rows")
    return torch.cat([torch.multinomial(probs[row:row + 1], 1, generator=g)[0] for row, g in enumerate(generator)])


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, min_p: Optional[float] = None,
                generator: Generators = None) -> torch.Tensor:
    """Pick the next token (B,) from logits (B, V). Temperature 0 is greedy (argmax)."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return sample(logits, params.validate(logits.shape[-1]), generator=generator)
