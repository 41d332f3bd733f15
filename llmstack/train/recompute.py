"""Activation checkpointing: keep fewer activations for backward and recompute the rest.

    apply_activation_checkpointing(model, "full")                     every block recomputed in backward
    apply_activation_checkpointing(model, "selective", every=2)       every 2nd block
    apply_activation_checkpointing(model, "selective", policy="op")   every block, keeping matmul and
                                                                      attention outputs (torchtitan's op-level
                                                                      selective checkpointing)

A block's activations (its norms, projections, attention and MLP intermediates) are what a training
step keeps most of; a checkpointed block keeps only its input and runs its forward again during
backward (`torch.utils.checkpoint`, non-reentrant), trading compute (about one more forward: a third
more per step) for memory. Op-level checkpointing keeps the outputs of the expensive ops (matmuls,
attention) and recomputes only the cheap ones (norms, activations, elementwise), so it saves less
memory and costs little time.

It is applied from outside, per block instance (its `forward` is replaced), so module names and
state-dict keys do not change: checkpoints, LoRA adapters and PEFT names are as without it.
Gradients are those of the plain model (tests/test_recompute.py).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")
POLICIES = ("layer", "op")

# The ops whose outputs op-level checkpointing keeps: recomputing them would cost most.
_SAVE = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
         torch.ops.aten._scaled_dot_product_flash_attention.default,
         torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
         torch.ops.aten._scaled_dot_product_efficient_attention.default,
         torch.ops.aten._scaled_dot_product_cudnn_attention.default}


def _keep_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _op_context():
    return create_selective_checkpoint_contexts(_keep_expensive)


def _checkpointed(forward, context_fn, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation and generation: nothing to save, nothing to recompute
        return forward(*args, **kwargs)
    kw = {"context_fn": context_fn} if context_fn is not None else {}
    return checkpoint(forward, *args, use_reentrant=False, **kw, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", *, every: int = 1,
                                   policy: str = "layer") -> nn.Module:
    """Checkpoint `model.layers`' blocks in place (see the module docstring); returns `model`. mode
    "none" does nothing; "selective" with policy "layer" takes every `every`-th block (the first, then
    every-th after), with policy "op" every block at op level. Applying twice is an error."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing {mode!r}: choose one of {', '.join(MODES)}")
    if policy not in POLICIES:
        raise ValueError(f"selective activation checkpointing policy {policy!r}: choose one of {', '.join(POLICIES)}")
    if every < 1:
        raise ValueError(f"activation checkpointing every={every}: must be >= 1")
    if mode == "none":
        return model
    # The model's blocks, or those of the Transformer inside a wrapper (a reward model, PPO's policy).
    layers = next((m.layers for m in model.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList)
                   and len(m.layers) and hasattr(m.layers[0], "attn")), None)
    if layers is None:
        raise ValueError(f"activation checkpointing works on a Transformer's blocks; {type(model).__name__} "
                         "has none (a recurrent model keeps no per-block activations to drop)")
    if any("forward" in vars(block) for block in layers):
        raise ValueError("the model's blocks are checkpointed already (or their forward replaced)")
    op_level = mode == "selective" and policy == "op"
    for i, block in enumerate(layers):
        if mode == "full" or op_level or i % every == 0:
            block.forward = functools.partial(_checkpointed, type(block).forward.__get__(block),
                                              _op_context if op_level else None)
    return model


def checkpointed_blocks(model: nn.Module) -> list[int]:
    """Indices of the blocks whose forward is checkpointed."""
    layers = next((m.layers for m in model.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList)), [])
    return [i for i, b in enumerate(layers) if isinstance(vars(b).get("forward"), functools.partial)
            and vars(b)["forward"].func is _checkpointed]
