"""nn.Modules only: the Transformer and its parts, and its config. No training, no I/O, no process groups."""
from llmstack.model.attention import attention, build_mask, resolve_backend
from llmstack.model.config import ModelConfig, MoEConfig, RopeScaling, list_presets, model_preset
from llmstack.model.kv_cache import KVCache, RollingKVCache
from llmstack.model.moe import MoE
from llmstack.model.rope import apply_rope, rope_cos_sin, rope_frequencies
from llmstack.model.transformer import (
    MLP,
    Attention,
    Block,
    RMSNorm,
    Transformer,
    build_model,
    count_params,
    flops_per_token,
)

__all__ = [
    "MLP", "Attention", "Block", "KVCache", "MoE", "MoEConfig", "ModelConfig", "RMSNorm", "RollingKVCache",
    "RopeScaling", "Transformer", "apply_rope", "attention", "build_mask", "build_model", "count_params",
    "flops_per_token", "list_presets", "model_preset", "resolve_backend", "rope_cos_sin", "rope_frequencies",
]
