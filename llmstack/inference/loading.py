"""Loading any checkpoint for use: float or quantized, llmstack's or Hugging Face's."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from llmstack.interop import from_pretrained as load_float, read_metadata, resolve_checkpoint


def from_pretrained(path: str | os.PathLike, *, device: torch.device | str | None = None,
                    dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A model in eval mode from a run directory (its newest checkpoint), a checkpoint directory
    or a Hugging Face directory (Llama, Mistral, Qwen2, Mixtral). A checkpoint written by
    `save_quantized` is rebuilt with its quantized layers (the scheme is in its metadata)."""
    path = resolve_checkpoint(path)
    if (path / "config.yaml").is_file() and "quantization" in read_metadata(path):
        from llmstack.inference.quantize import load_quantized

        return load_quantized(path, device=device, dtype=dtype)
    return load_float(path, device=device, dtype=dtype)
