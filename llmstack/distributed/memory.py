"""Memory per rank of each parallel strategy, computed from a model config (no model is built).

    from llmstack.distributed.memory import model_state_bytes, activation_bytes
    model_state_bytes(cfg, "fsdp", 8)       # parameters + gradients + AdamW state on one of 8 ranks

Model states: float32 parameters (4 bytes), gradients (4) and AdamW's two moments (8), 16 bytes per
parameter in one process. Which of them a rank keeps:

| strategy | parameters | gradients | optimizer state |
| --- | --- | --- | --- |
| ddp | all | all | all |
| zero1 | all | all | 1/N |
| zero2, fsdp (ZeRO-3) | 1/N | 1/N | 1/N |
| tp | blocks' 1/N, the rest whole | same | same |
| pp | one stage's | same | same |

ZeRO-2 also keeps every block's gathered parameters from forward to backward (FSDP2 without
resharding), ZeRO-3 about two blocks' at a time: `transient_bytes`. Activations follow Korthikanti et
al. (2022) with attention that keeps no score matrix (FlashAttention): about 34 bytes per hidden
unit per token per block in 16-bit autocast, divided by tp with sequence parallel ((10 + 24 / tp)
without), 2 with every block recomputed (only its input kept).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmstack.model.config import ModelConfig
from llmstack.model.transformer import Transformer

STRATEGIES = ("ddp", "zero1", "zero2", "fsdp", "tp", "pp")
STATE_BYTES = {"params": 4, "grads": 4, "optim": 8}  # float32 weights and gradients, AdamW's two moments


@dataclass
class Counts:
    total: int       # every parameter
    blocks: int      # the blocks' projections (what tp splits)
    per_block: int   # one block's parameters, norms included
    outside: int     # the rest, whole on every tp rank: embedding, norms, output head


def param_counts(cfg: ModelConfig) -> Counts:
    with torch.device("meta"):
        model = Transformer(cfg)
    total = model.num_params()
    per_block = sum(p.numel() for p in model.layers[0].parameters())
    linears = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                  for m in model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    return Counts(total, linears * cfg.n_layers, per_block, total - linears * cfg.n_layers)


def model_state_bytes(cfg: ModelConfig, strategy: str, n: int, *, counts: Counts | None = None) -> dict:
    """{"params", "grads", "optim"} bytes one of `n` ranks keeps (the largest pipeline stage for pp)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    c = counts or param_counts(cfg)
    if strategy == "tp":
        held = {k: c.blocks / n + c.outside for k in STATE_BYTES}
    elif strategy == "pp":  # the larger of the first stage (the embedding) and the last (final norm, head)
        embed = cfg.vocab_size * cfg.dim
        rest = c.total - c.per_block * cfg.n_layers - embed  # the final norm and the output head
        first = -(-cfg.n_layers // n) * c.per_block + embed
        last = cfg.n_layers // n * c.per_block + rest
        held = {k: max(first, last) for k in STATE_BYTES}
    else:
        shared = {"ddp": set(), "zero1": {"optim"}, "zero2": set(STATE_BYTES), "fsdp": set(STATE_BYTES)}[strategy]
        held = {k: c.total / n if k in shared else c.total for k in STATE_BYTES}
    return {k: held[k] * STATE_BYTES[k] for k in STATE_BYTES}


def transient_bytes(cfg: ModelConfig, strategy: str, n: int, *, param_bytes: int = 4,
                    counts: Counts | None = None) -> float:
    """Gathered parameters FSDP holds on top of its shards: every block's for ZeRO-2 (kept from forward
    to backward), two blocks' for ZeRO-3 (the one running and the next, prefetched)."""
    c = counts or param_counts(cfg)
    if strategy == "zero2":
        return c.blocks * param_bytes * (1 - 1 / n)
    if strategy == "fsdp":
        return 2 * c.per_block * param_bytes
    return 0.0


def activation_bytes(cfg: ModelConfig, strategy: str, n: int, *, tokens: int, recompute: bool = False,
                     sequence_parallel: bool = True) -> float:
    """Activations kept for backward by one rank for `tokens` tokens of its micro-batch (16-bit autocast):
    data parallel ranks each see their own tokens; tp splits per block; pp's first stage keeps up to
    `n` micro-batches of its 1/n of the blocks in flight (1F1B): about one micro-batch of all blocks."""
    per_token_block = 2 * cfg.dim if recompute else 34 * cfg.dim
    if strategy == "tp" and not recompute:
        per_token_block = cfg.dim * (34 / n if sequence_parallel else 10 + 24 / n)
    return per_token_block * tokens * cfg.n_layers


def plan_table(cfg: ModelConfig, n: int, *, tokens: int, recompute: bool = False) -> list[dict]:
    """One row per strategy on `n` ranks (and a single process), in GiB."""
    c = param_counts(cfg)
    rows = []
    for strategy, ranks in [("single", 1)] + [(s, n) for s in STRATEGIES]:
        s = "ddp" if strategy == "single" else strategy
        states = model_state_bytes(cfg, s, ranks, counts=c)
        act = activation_bytes(cfg, s, ranks, tokens=tokens, recompute=recompute)
        extra = transient_bytes(cfg, s, ranks, counts=c)
        gib = 2 ** 30
        rows.append({"strategy": strategy, "ranks": ranks, "params": states["params"] / gib,
                     "grads": states["grads"] / gib, "optim": states["optim"] / gib, "transient": extra / gib,
                     "activations": act / gib, "total": (sum(states.values()) + extra + act) / gib})
    return rows
