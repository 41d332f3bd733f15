"""Loading any model, fine-tuned ones included: what `llmstack.from_pretrained` is.

A LoRA or QLoRA run's checkpoints hold the adapter alone (PEFT's adapter_config.json and
adapter_model.safetensors) beside the job config that names the base; loading one loads the
base and puts the adapter on it. Everything else is `llmstack.inference.loading.from_pretrained`'s.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import yaml
from torch import nn

from llmstack.finetune.lora import ADAPTER_WEIGHTS, load_adapter, remove_lora
from llmstack.inference.loading import from_pretrained as load_model
from llmstack.interop import resolve_checkpoint


def from_pretrained(path: str | os.PathLike, *, device: torch.device | str | None = None,
                    dtype: Optional[torch.dtype] = None, merge: bool = True) -> nn.Module:
    """A model in eval mode from a run directory (its newest checkpoint), a checkpoint directory, a
    Hugging Face directory (Llama, Mistral, Qwen2, Mixtral) or a GGUF file: float, quantized
    (`save_quantized`), or fine-tuned with adapters. An adapter checkpoint gives its base (loaded in
    float, for QLoRA too) with the adapter merged into the weights, or, with merge=False, kept
    as LoRALinear layers (to train further or `save_adapter`)."""
    if Path(path).suffix != ".gguf":
        path = resolve_checkpoint(path)
        if is_adapter_checkpoint(path):
            return load_finetuned(path, device=device, dtype=dtype, merge=merge)
    return load_model(path, device=device, dtype=dtype)


def is_adapter_checkpoint(path: str | os.PathLike) -> bool:
    """Whether a checkpoint directory holds an adapter (and the job config naming its base) instead of
    a model's weights."""
    path = Path(path)
    return ((path / ADAPTER_WEIGHTS).is_file() and (path / "config.yaml").is_file()
            and not any(path.glob("model*.safetensors")))


def load_finetuned(path: str | os.PathLike, *, device=None, dtype=None, merge: bool = True) -> nn.Module:
    """A LoRA/QLoRA run's checkpoint: its base with the adapter on, merged in with `merge`."""
    path = resolve_checkpoint(path)
    job = yaml.safe_load((path / "config.yaml").read_text()) or {}
    base = job.get("base")
    if not base:
        raise ValueError(f"{path} holds an adapter but its config.yaml names no base model")
    if not Path(base).exists():
        raise FileNotFoundError(f"{path} is an adapter for the base {base!r}, which does not exist here")
    model = from_pretrained(base, device=device, dtype=dtype)  # a base may itself be a fine-tuned run
    load_adapter(model, path)
    if merge:
        remove_lora(model, merge=True)
    return model.eval()
