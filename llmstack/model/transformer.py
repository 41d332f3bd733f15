"""The decoder-only Transformer, top to bottom: norms, positions, attention, MLP, block, model.

One `ModelConfig` describes GPT-2, Llama, Mistral, Qwen2 and Mixtral alike.
Features such as LoRA, quantization or parallelism are applied to a built model
from outside; nothing here knows about them. Shapes in comments:
B batch, T new tokens, S key slots, C model width, H heads, D head dim.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmstack.model.attention import attention, resolve_backend
from llmstack.model.config import ModelConfig
from llmstack.model.functional import linear_cross_entropy, rms_norm, swiglu
from llmstack.model.moe import MoE
from llmstack.model.rope import apply_rope, rope_cos_sin, rope_frequencies


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without centring or bias, computed in float32.

    Inference runs torch's `F.rms_norm`, training a hand-written backward pass
    (`llmstack.model.functional`). In 16-bit both apply the weight before rounding to x's
    dtype; Llama's reference rounds first: the two differ by at most one rounding."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


def make_norm(config: ModelConfig, dim: Optional[int] = None) -> nn.Module:
    dim = dim or config.dim
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def init_norm(norm: Optional[nn.Module]) -> None:
    """Gains to one, biases to zero (RMSNorm or nn.LayerNorm)."""
    if isinstance(norm, RMSNorm):
        norm.init_weights()
    elif norm is not None:
        norm.reset_parameters()


@torch.no_grad()
def init_linear(linear: nn.Linear, std: float) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The original Transformer's fixed positions: sin/cos at geometrically spaced frequencies."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.float()[..., None] * inv_freq
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class Attention(nn.Module):
    """Multi-head attention with any number of KV heads (MHA, GQA, MQA).

    Computes q, k, v, applies RoPE, stores k and v in the cache when given one,
    and hands everything to the backend named in the config. Head counts are read
    from the tensors, not the config, so a tensor-parallel shard of `qkv_proj`
    holding some of the heads (q, k and v rows of the same KV groups) runs as is.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.config = config  # read at call time, so `model.config.attn_backend = ...` switches backends
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.group = config.n_heads // config.n_kv_heads  # query heads per KV head
        # q, k and v come out of one matmul: (H + 2 * Hkv) * D outputs, split after.
        self.qkv_proj = nn.Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim,
                                  bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=config.bias)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None, cache=None,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H + 2Hkv, T, D), local heads
        Hkv = qkv.shape[1] // (self.group + 2)
        H = Hkv * self.group
        qk, v = qkv.split([H + Hkv, Hkv], dim=1)  # v: (B, Hkv, T, D)
        if self.q_norm is not None:
            q, k = qk.split([H, Hkv], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # the q and k heads rotate by the same angles: one call
        q, k = qk.split([H, Hkv], dim=1)  # (B, H, T, D), (B, Hkv, T, D)
        kv_lengths = block_table = None
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D): past keys, then these (or a paged pool)
            if cache.lengths is not None:
                kv_lengths = cache.lengths + T  # (B,): each row's keys, this step's included
            block_table = cache.block_table
            if key_mask is not None and key_mask.shape[-1] > k.shape[2]:
                key_mask = key_mask[..., -k.shape[2]:]  # a rolling cache returns only its newest S slots
        backend = resolve_backend(self.config.attn_backend, x.device, q.dtype)
        y = attention(q, k, v, backend=backend, causal=True, key_mask=key_mask, window=self.config.sliding_window,
                      dropout_p=self.config.attn_dropout if self.training else 0.0, kv_lengths=kv_lengths,
                      block_table=block_table)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        init_linear(self.qkv_proj, std)
        init_linear(self.o_proj, residual_std)  # writes into the residual stream
        init_norm(self.q_norm)
        init_norm(self.k_norm)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); or GELU: down(gelu(up(x))).

    gate and up stay two matmuls (unlike q, k, v): fused into one, the backward pass
    must concatenate their gradients, which made a CPU training step 5% slower
    (scripts/bench_cpu.py) for a 7% faster decode step."""

    def __init__(self, config: ModelConfig, hidden: int):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.gate_proj = nn.Linear(config.dim, hidden, bias=config.bias) if self.swiglu else None
        self.up_proj = nn.Linear(config.dim, hidden, bias=config.bias)
        self.down_proj = nn.Linear(hidden, config.dim, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        if self.gate_proj is not None:
            init_linear(self.gate_proj, std)
        init_linear(self.up_proj, std)
        init_linear(self.down_proj, residual_std)  # writes into the residual stream


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    The residual stream itself is never normalised ("Add & Norm" with the norm
    moved inside the branch), so gradients flow straight through the additions.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = make_norm(config)
        make_mlp = lambda hidden: MLP(config, hidden)  # noqa: E731
        self.mlp = MoE(config, make_mlp) if config.moe is not None else make_mlp(config.ffn_hidden)
        self.dropout = config.dropout

    def forward(self, x, rope=None, cache=None, key_mask=None):
        h = self.attn(self.attn_norm(x), rope, cache, key_mask)
        x = x + (F.dropout(h, self.dropout, self.training) if self.dropout else h)
        h = self.mlp(self.mlp_norm(x))
        return x + (F.dropout(h, self.dropout, self.training) if self.dropout else h)

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        init_norm(self.attn_norm)
        self.attn.init_weights(std, residual_std)
        init_norm(self.mlp_norm)
        self.mlp.init_weights(std, residual_std)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        if config.arch != "transformer":  # also what build_model and count_params see
            raise ValueError(f"model.arch={config.arch!r} is not a Transformer: build it with "
                             "llmstack.interop.build(config), which picks the model class from model.arch")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.dim) if config.pos == "learned" else None
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        # Tied embeddings reuse `embed.weight` in forward rather than aliasing a second
        # Parameter: aliases break silently when a model is moved off the meta device.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        inv_freq, self.rope_attention_factor = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (also after building on the meta device and `to_empty`):
        normal(0, init_std) for embeddings and projections, norms to one, biases to zero, and
        the projections that write into the residual stream (attention's o_proj, the MLP's
        down_proj) scaled by 1/sqrt(2 * n_layers), so the stream's variance does not grow
        with depth (GPT-2). Each module applies its own rules (`init_weights` on Attention,
        MLP, MoE, Block), so a module swapped in from outside brings its own."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed.weight, mean=0.0, std=std)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, mean=0.0, std=std)
        for layer in self.layers:
            layer.init_weights(std, residual_std)
        init_norm(self.norm)
        if self.lm_head is not None:
            init_linear(self.lm_head, std)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute non-persistent buffers (needed after `to_empty` from the meta device)."""
        inv_freq, _ = rope_frequencies(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)
        self.rope_inv_freq = inv_freq.to(self.rope_inv_freq.device)

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: torch.Tensor, *, positions: Optional[torch.Tensor] = None, cache=None,
                attn_mask: Optional[torch.Tensor] = None, logits_to_keep: Optional[int] = None,
                targets: Optional[torch.Tensor] = None, return_hidden: bool = False, return_aux: bool = False):
        """Logits (B, T, vocab) for input_ids (B, T); with `targets`, the loss instead.

        positions: (T,) or (B, T) absolute positions; default: where the cache is (its rows'
                   own lengths when they differ) + arange(T).
        cache:     a KVCache (or any object with its interface, see `llmstack.model.kv_cache`);
                   new keys/values are stored and it advances by T.
        attn_mask: (B, S) bool over all key slots (cached + new), True for real tokens; for
                   batches of unequal lengths. Or (B, T, S), True where query t may see slot s
                   (on top of the causal mask): documents packed in one row, each seeing only
                   itself (`llmstack.finetune.data.document_mask`). A cache that keeps only the
                   newest slots (`RollingKVCache`) is matched with the mask's last columns.
        logits_to_keep: compute logits for the last n positions only, (B, n, vocab): a prefill
                   needs one, and the output head over a whole prompt costs as much as a layer.
        targets:   (B, T) token ids to predict at each position (-100: none): returns the summed
                   cross-entropy (float32) instead of logits, from the head and the loss fused
                   chunk by chunk (`linear_cross_entropy`), so (B, T, vocab) logits never exist.
        return_hidden: return the final hidden states (B, T, dim), after the last norm, instead of
                   logits: what a reward or value head reads. `model.head(h)` gives the logits.
        return_aux: also return a dict with the MoE auxiliary loss and per-layer expert loads.
        """
        if return_hidden and targets is not None:
            raise ValueError("return_hidden and targets ask for two different outputs; pass one of them")
        B, T = input_ids.shape
        if positions is None:
            positions = self._positions(T, cache, input_ids.device)
        x = self.inputs(input_ids, positions)  # (B, T, C)
        rope = self.rope_for(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, cache, attn_mask)
        if cache is not None:
            cache.advance(T)
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]
        x = self.norm(x)
        if return_hidden:
            out = x
        elif targets is not None:
            out = self._loss(x, targets)
        else:
            out = self.head(x)
        return (out, self.aux_outputs()) if return_aux else out

    def inputs(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The residual stream's start (B, T, C): token embeddings, plus learned or sinusoidal
        positions, then dropout."""
        x = self.embed(input_ids)
        if self.config.pos == "learned":
            if int(positions.max()) >= self.config.max_seq_len:
                raise ValueError(f"position {int(positions.max())} is past the learned table "
                                 f"(model.max_seq_len={self.config.max_seq_len})")
            x = x + self.pos_embed(positions)
        elif self.config.pos == "sinusoidal":
            x = x + sinusoidal_embedding(positions, self.config.dim).to(x.dtype)
        if self.config.dropout:
            x = F.dropout(x, self.config.dropout, self.training)
        return x

    def rope_for(self, positions: torch.Tensor, dtype: torch.dtype) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """RoPE's (cos, sin) for `positions`, which every block rotates q and k by; None unless model.pos is rope."""
        if self.config.pos != "rope":
            return None
        return rope_cos_sin(positions, self.rope_inv_freq, self.rope_attention_factor, dtype=dtype)

    @staticmethod
    def _positions(T: int, cache, device: torch.device) -> torch.Tensor:
        """(T,) positions after what the cache holds, or (B, T) when its rows hold different lengths."""
        if cache is None:
            return torch.arange(T, device=device)
        if cache.lengths is not None:
            return cache.lengths[:, None] + torch.arange(T, device=device)
        return torch.arange(cache.seq_len, cache.seq_len + T, device=device)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) of final hidden states x (..., dim) (`forward(..., return_hidden=True)`)."""
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)

    def _loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy of the final hidden states x (B, T, C)."""
        x, targets = x.flatten(0, 1), targets.flatten()
        head = self.lm_head
        if head is None or (type(head) is nn.Linear and head.bias is None):
            return linear_cross_entropy(x, self.embed.weight if head is None else head.weight, targets)
        # A head replaced or wrapped from outside (quantized, with an adapter): its logits, then the loss.
        return F.cross_entropy(head(x).float(), targets, ignore_index=-100, reduction="sum")

    def aux_outputs(self) -> dict:
        """What the last forward left for the trainer: the summed MoE auxiliary loss and expert loads."""
        moes = [m for m in self.modules() if isinstance(m, MoE)]
        losses = [m.aux_loss for m in moes if m.aux_loss is not None]
        return {
            "aux_loss": torch.stack(losses).sum() if losses else None,
            "expert_load": torch.stack([m.expert_load for m in moes]) if moes else None,  # (layers, E)
        }

    # ------------------------------------------------------------------ accounting

    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:  # counted by module: a quantized embedding (from outside) holds buffers, not parameters
            n -= sum(p.numel() for p in self.embed.parameters())
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
        return n


def build_model(config: ModelConfig, *, device: torch.device | str | None = None,
                dtype: Optional[torch.dtype] = None) -> Transformer:
    """Build on the meta device (no memory, no init work), then allocate on `device` (default the
    CPU), uninitialised: call `init_weights()` or load a state dict next."""
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device or "cpu")
    model.init_buffers()
    if dtype is not None:
        model.to(dtype)
    return model


def count_params(config: ModelConfig, *, active: bool = False) -> int:
    """Parameter count from the config alone (built on the meta device, no memory used).
    active=True counts only the experts a token passes through (top_k + shared)."""
    with torch.device("meta"):
        model = Transformer(config)
    n = model.num_params()
    if active and config.moe is not None:
        per_expert = sum(p.numel() for p in model.layers[0].mlp.experts[0].parameters())
        n -= config.n_layers * per_expert * (config.moe.n_experts - config.moe.top_k)
    return n


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * active non-embedding parameters for
    the matmuls, plus 12 * layers * heads * head_dim * seq_len for attention scores and
    values (PaLM's appendix B). Used for MFU."""
    n = count_params(config, active=True) - config.vocab_size * config.dim
    if config.pos == "learned":
        n -= config.max_seq_len * config.dim
    if config.tie_embeddings:  # the tied matrix still does the output projection's matmul
        n += config.vocab_size * config.dim
    return 6 * n + 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
