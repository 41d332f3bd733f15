"""The model's schema: `ModelConfig` (with `RopeScaling` and `MoEConfig`) and the named presets.

One `ModelConfig` describes GPT-2, Llama, Mistral, Qwen2 and Mixtral alike. Unset
fields are derived in `__post_init__`; `validate()` checks the rules between fields
before any tensor is built. Presets are YAML files in `configs/model/`.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from llmstack.config import ConfigError, check_at_least, from_dict, merge, option


@dataclass
class RopeScaling:
    """How RoPE frequencies are stretched to run past the trained context.

    linear: positions divided by `factor` (position interpolation).
    ntk:    NTK-aware: the base theta grows by factor**(d/(d-2)), low frequencies stretch most.
    yarn:   NTK-by-parts interpolation plus an attention temperature (YaRN).
    llama3: Llama-3.1's by-wavelength blend of interpolated and original frequencies.
    """

    type: Literal["linear", "ntk", "yarn", "llama3"] = option("linear", "linear (position interpolation), ntk, yarn, llama3")
    factor: float = option(1.0, "how many times longer than the trained context")
    original_max_seq_len: int = option(8192, "the context the model was trained on")
    low_freq_factor: float = option(1.0, "llama3")
    high_freq_factor: float = option(4.0, "llama3")
    beta_fast: float = option(32.0, "yarn")
    beta_slow: float = option(1.0, "yarn")
    attention_factor: Optional[float] = option(None, "yarn; default 0.1 * ln(factor) + 1")

    def validate(self) -> None:
        if not self.factor >= 1.0:
            raise ConfigError(f"model.rope_scaling.factor must be >= 1, got {self.factor}")


@dataclass
class MoEConfig:
    """Mixture of experts replacing the MLP of every block."""

    n_experts: int = option(8, "routed experts per layer")
    top_k: int = option(2, "experts each token is sent to")
    expert_hidden: Optional[int] = option(None, "defaults to model.ffn_hidden")
    n_shared_experts: int = option(0, "always-on experts added to the routed output")
    norm_topk_prob: bool = option(True, "Mixtral: renormalise the top-k softmax weights")
    balancing: Literal["aux_loss", "bias"] = option("aux_loss", '"bias": auxiliary-loss-free')
    aux_loss_coef: float = option(0.01, "Switch load-balancing loss weight")
    z_loss_coef: float = option(0.001, "router z-loss weight")
    bias_update_rate: float = option(1e-3, '"bias" balancing: step of the per-expert bias')

    def validate(self) -> None:
        check_at_least("model.moe", self, 1, "n_experts", "expert_hidden")
        check_at_least("model.moe", self, 0, "n_shared_experts")
        if not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(
                f"model.moe.top_k={self.top_k} must be between 1 and model.moe.n_experts={self.n_experts}"
            )


@dataclass
class ModelConfig:
    """The shape of one decoder-only Transformer. Unset fields are derived in __post_init__."""

    arch: Literal["transformer", "lstm", "gru"] = option(
        "transformer", "transformer, or a recurrent LM (lstm, gru: reads vocab_size, dim, n_layers, dropout, "
        "tie_embeddings, max_seq_len, init_std and ignores the attention fields); build with llmstack.interop.build")
    vocab_size: int = option(8192, "tokens in the vocabulary (>= the tokenizer's)")
    dim: int = option(256, "width of the residual stream")
    n_layers: int = option(4, "Transformer blocks")
    n_heads: int = option(4, "query heads")
    n_kv_heads: Optional[int] = option(None, "null: = n_heads (MHA); 1: MQA; else GQA")
    head_dim: Optional[int] = option(None, "null: dim // n_heads")
    ffn_hidden: Optional[int] = option(None, "null: 4*dim (gelu) or 8/3*dim rounded to 64 (swiglu)")
    mlp: Literal["swiglu", "gelu"] = option("swiglu", "feed-forward: SwiGLU (Llama) or GELU (GPT-2)")
    norm: Literal["rmsnorm", "layernorm"] = option("rmsnorm", "RMSNorm (Llama) or LayerNorm (GPT-2)")
    norm_eps: float = option(1e-5, "epsilon of every norm")
    pos: Literal["rope", "learned", "sinusoidal", "none"] = option(
        "rope", "positions: rotary, learned table, fixed sinusoids, or none")
    rope_theta: float = option(10000.0, "RoPE base")
    rope_scaling: Optional[RopeScaling] = option(None, "stretch RoPE past the trained context")
    max_seq_len: int = option(2048, "longest sequence the model (and its caches) handle")
    bias: bool = option(False, "biases in the attention output and MLP projections (GPT-2)")
    qkv_bias: bool = option(False, "biases in the q/k/v projections (Qwen2, GPT-2)")
    qk_norm: bool = option(False, "RMSNorm over each head's q and k before RoPE")
    sliding_window: Optional[int] = option(None, "each token sees at most this many keys")
    attn_backend: Literal["auto", "naive", "sdpa", "triton"] = option(
        "auto", "auto: our Triton kernel on CUDA in float16/bfloat16 when Triton is installed, else sdpa")
    dropout: float = option(0.0, "dropout on embeddings and residual branches (training only)")
    attn_dropout: float = option(0.0, "dropout on attention probabilities (training only)")
    tie_embeddings: bool = option(False, "the output head reuses the embedding matrix")
    moe: Optional[MoEConfig] = option(None, "mixture of experts replacing every MLP; null: dense")
    init_std: float = option(0.02, "std of the normal init; residual projections get std/sqrt(2*n_layers)")
    bos_token_id: Optional[int] = option(None, "the token a text starts with, when the model was trained with one")
    eos_token_ids: list[int] = option(doc="tokens that end a generation (end of text, end of turn); "
                                          "generate stops at them unless told otherwise", factory=list)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0:
            if self.dim % self.n_heads and self.arch == "transformer":  # a recurrent LM has no heads
                raise ConfigError(
                    f"model.n_heads={self.n_heads} does not divide model.dim={self.dim}; "
                    "change one of them or set model.head_dim explicitly"
                )
            self.head_dim = self.dim // self.n_heads
        if self.ffn_hidden is None:
            if self.mlp == "gelu":
                self.ffn_hidden = 4 * self.dim
            else:  # keep SwiGLU's 3 matrices at the cost of a 4*dim GELU MLP's 2
                self.ffn_hidden = 64 * math.ceil(8 * self.dim / 3 / 64)

    def validate(self) -> "ModelConfig":
        check_at_least("model", self, 1, "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                       "ffn_hidden", "max_seq_len", "sliding_window")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                raise ConfigError(f"model.{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.arch != "transformer":  # a recurrent LM reads none of the attention fields checked below
            if self.moe is not None:
                raise ConfigError(f"model.moe is set but model.arch={self.arch} has no MLP to replace; "
                                  "set model.moe to null or model.arch to transformer")
            return self
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads} "
                "(each KV head must serve the same number of query heads)"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even model.head_dim, got {self.head_dim}")
        for token in ([self.bos_token_id] if self.bos_token_id is not None else []) + list(self.eos_token_ids):
            if not 0 <= token < self.vocab_size:
                raise ConfigError(f"model: special token id {token} is outside the vocabulary "
                                  f"(model.vocab_size={self.vocab_size})")
        if self.rope_scaling is not None:
            self.rope_scaling.validate()
        if self.moe is not None:
            self.moe.validate()
        return self

    @classmethod
    def resolve_config_value(cls, value: Any) -> Any:
        """`model:` in a job may be a preset name or path, or a mapping with an optional `preset:` base."""
        if isinstance(value, str):
            path = Path(value)
            if path.suffix not in (".yaml", ".yml"):  # a preset name, e.g. "llama-3.2-1b"
                path = config_root() / "model" / f"{value}.yaml"
            if not path.is_file():
                close = difflib.get_close_matches(str(value), list_presets(), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; presets: {', '.join(list_presets())}"
                raise ConfigError(f"model preset {value!r} not found{hint}")
            return cls.resolve_config_value(yaml.safe_load(path.read_text()) or {})
        if isinstance(value, dict) and "preset" in value:
            rest = {k: v for k, v in value.items() if k != "preset"}
            return merge(cls.resolve_config_value(value["preset"]), rest)
        return value


def config_root() -> Path:
    """The `configs/` folder: beside the package in a checkout, inside it in a wheel."""
    package = Path(__file__).resolve().parent.parent
    checkout = package.parent / "configs"
    return checkout if checkout.is_dir() else package / "configs"


def model_preset(name: str) -> ModelConfig:
    """A model preset by name (`configs/model/NAME.yaml`) or by path to a YAML file."""
    return from_dict(ModelConfig, name, "model").validate()


def list_presets() -> list[str]:
    return sorted(p.stem for p in (config_root() / "model").glob("*.yaml"))
