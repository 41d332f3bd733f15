"""nn.Modules only: the Transformer and its parts. No training, no I/O, no process groups."""
from llmstack.model.attention import attention, build_mask, resolve_backend
from llmstack.model.kv_cache import KVCache
from llmstack.model.moe import MoE
from llmstack.model.rope import apply_rope, rope_cos_sin, rope_frequencies
from llmstack.model.transformer import (
    MLP,
    Attention,
    Block,
    RMSNorm,
    Transformer,
    count_params,
    flops_per_token,
)

__all__ = [
    "Attention", "Block", "KVCache", "MLP", "MoE", "RMSNorm", "Transformer", "apply_rope", "attention",
    "build_mask", "count_params", "flops_per_token", "resolve_backend", "rope_cos_sin", "rope_frequencies",
]
