"""Mixture of experts: a router sends each token to its top-k expert MLPs.

Dispatch is dropless: every (token, expert) assignment is computed. Tokens are
sorted by expert so each expert runs one matmul over a contiguous slice (a loop
over experts, never over tokens), then the weighted outputs are added back.

Balancing, so that the router does not collapse onto a few experts:
- "aux_loss": the Switch Transformer load-balancing loss
  E * sum_i f_i * P_i (f_i: fraction of assignments to expert i, P_i: mean router
  probability of i), plus the router z-loss mean(logsumexp(logits)^2) that keeps
  logits small. Both are returned to the trainer, weighted by their coefficients.
- "bias": auxiliary-loss-free (DeepSeek-V3): a per-expert bias is added to the
  scores used to *choose* experts (not to weight them) and nudged after each
  training forward towards under-loaded experts.
"""
from __future__ import annotations

import torch
from torch import nn

from llmstack.model.config import ModelConfig


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, make_mlp):
        super().__init__()
        moe = config.moe
        self.n_experts, self.top_k = moe.n_experts, moe.top_k
        self.norm_topk_prob = moe.norm_topk_prob
        self.balancing = moe.balancing
        self.aux_loss_coef, self.z_loss_coef = moe.aux_loss_coef, moe.z_loss_coef
        self.bias_update_rate = moe.bias_update_rate
        hidden = moe.expert_hidden or config.ffn_hidden
        self.router = nn.Linear(config.dim, moe.n_experts, bias=False)
        self.experts = nn.ModuleList(make_mlp(hidden) for _ in range(moe.n_experts))
        self.shared = make_mlp(hidden * moe.n_shared_experts) if moe.n_shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(moe.n_experts), persistent=True)
        # Filled by every forward: what the trainer adds to the loss and logs.
        self.aux_loss: torch.Tensor | None = None
        self.expert_load: torch.Tensor | None = None  # fraction of assignments per expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        logits = self.router(flat).float()  # (N, E)
        probs = logits.softmax(dim=-1)
        choice_scores = probs + self.expert_bias if self.balancing == "bias" else probs
        _, expert_idx = choice_scores.topk(self.top_k, dim=-1)  # (N, k)
        weights = probs.gather(-1, expert_idx)  # (N, k): the bias never weights an output
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)

        # Group the N*k assignments by expert: one contiguous slice per expert.
        flat_expert = expert_idx.reshape(-1)  # (N*k,)
        order = flat_expert.argsort(stable=True)
        token_of = order // self.top_k  # which token each sorted assignment belongs to
        counts = torch.bincount(flat_expert, minlength=self.n_experts)
        out = torch.zeros_like(flat)
        sorted_inputs = flat[token_of]
        sorted_weights = weights.reshape(-1)[order].to(x.dtype)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                y = self.experts[e](sorted_inputs[start:start + n]) * sorted_weights[start:start + n, None]
                out.index_add_(0, token_of[start:start + n], y)
            start += n
        if self.shared is not None:
            out = out + self.shared(flat)

        load = counts.float() / flat_expert.numel()
        self.expert_load = load.detach()
        if self.balancing == "aux_loss":
            balance = self.n_experts * (load * probs.mean(dim=0)).sum()
            z_loss = torch.logsumexp(logits, dim=-1).square().mean()
            self.aux_loss = self.aux_loss_coef * balance + self.z_loss_coef * z_loss
        else:
            self.aux_loss = None
            if self.training:
                with torch.no_grad():  # push bias up for under-loaded experts, down for over-loaded
                    self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        return out.view(B, T, C)

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.router.weight, mean=0.0, std=std)
        for expert in self.experts:
            expert.init_weights(std, residual_std)
        if self.shared is not None:
            self.shared.init_weights(std, residual_std)
        self.expert_bias.zero_()
