"""GGUF files (llama.cpp's format): the model's config and weights, dequantized to float.

A GGUF holds the hyperparameters as metadata under `{architecture}.*` keys, the
tokenizer and chat template under `tokenizer.*` (read by `llmstack.tokenizer`), and
each tensor in its own format: float (F32, F16, BF16) or one of llama.cpp's block
quantizations, which the `gguf` package dequantizes. Two conventions differ from
Hugging Face's: a weight is stored with its dimensions reversed (ne0 = in_features),
which numpy's row-major view of the data undoes, and llama.cpp's converter permutes
the rows of the Llama family's q and k projections for its interleaved RoPE, which
`_unpermute` reverses (Qwen2's are stored as they are).

    cfg, state = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # llmstack names, fused q/k/v
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from llmstack.interop.hf import fuse_projections
from llmstack.model import ModelConfig
from llmstack.tokenizer.chat import end_of_turn_ids
from llmstack.tokenizer.gguf import CONTROL

# Architectures whose tensors map onto the Transformer, and whether their q/k rows are permuted.
ARCHITECTURES = {"llama": True, "mistral": True, "qwen2": False}

_NAMES = [  # GGUF name -> ours; {i} is the layer
    (r"token_embd\.weight", "embed.weight"),
    (r"output_norm\.weight", "norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(?P<i>\d+)\.attn_norm\.weight", "layers.{i}.attn_norm.weight"),
    (r"blk\.(?P<i>\d+)\.ffn_norm\.weight", "layers.{i}.mlp_norm.weight"),
    (r"blk\.(?P<i>\d+)\.attn_(?P<p>q|k|v)\.(?P<w>weight|bias)", "layers.{i}.attn.{p}_proj.{w}"),
    (r"blk\.(?P<i>\d+)\.attn_output\.weight", "layers.{i}.attn.o_proj.weight"),
    (r"blk\.(?P<i>\d+)\.ffn_(?P<p>gate|up|down)\.weight", "layers.{i}.mlp.{p}_proj.weight"),
]
_COMPILED = [(re.compile(pattern + "$"), target) for pattern, target in _NAMES]


def _reader(path: str | os.PathLike):
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        return gguf, gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader) -> ModelConfig:
    """The ModelConfig a GGUF's metadata describes; an architecture we do not map is an error."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; llmstack loads {', '.join(ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("unsupported GGUF tensor rope_freqs.weight (Llama-3.1-style RoPE frequency factors); "
                         "load the Hugging Face directory of this model instead")

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    n_heads = get("attention.head_count")
    dim = get("embedding_length")
    scaling_type = get("rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise ValueError(f"unsupported GGUF RoPE scaling {scaling_type!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens) if tokens is not None else None)
    eos = [_field(reader, f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    # and the end-of-turn tokens the vocabulary defines, as control tokens: the stops of the tokenizer
    types = _field(reader, "tokenizer.ggml.token_type")
    if tokens is not None and types is not None:
        control = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == CONTROL}
        eos += end_of_turn_ids(control)
    cfg = ModelConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=get("block_count"),
        n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads),
        head_dim=get("attention.key_length") or get("rope.dimension_count") or dim // n_heads,
        ffn_hidden=get("feed_forward_length"),
        norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=get("rope.freq_base", 10000.0),
        max_seq_len=get("context_length", 2048),
        qkv_bias=arch == "qwen2",
        sliding_window=get("attention.sliding_window"),
        tie_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(t for t in eos if t is not None)),
    )
    return cfg.validate()


def read_gguf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its metadata alone."""
    return config_from_gguf(_reader(path)[1])


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: within each head, its converter interleaves the two
    halves that RoPE rotates together (rows 0, d/2, 1, d/2 + 1, ...); we keep them as halves."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, state dict in llmstack's names, float32) of a GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} not found")
    gguf, reader = _reader(path)
    cfg = config_from_gguf(reader)
    permuted = ARCHITECTURES[_field(reader, "general.architecture")]
    supported = {getattr(gguf.GGMLQuantizationType, n) for n in
                 ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}
    state, unknown = {}, []
    for tensor in reader.tensors:
        target = next((t.format(**m.groupdict()) for r, t in _COMPILED if (m := r.match(tensor.name))), None)
        if target is None:
            unknown.append(tensor.name)
            continue
        if tensor.tensor_type not in supported:
            raise ValueError(f"unsupported GGUF tensor type {tensor.tensor_type.name} ({tensor.name}); llmstack "
                             f"reads {', '.join(sorted(t.name for t in supported))}")
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        # GGUF lists dimensions fastest-first: (in, out) for a weight, which is numpy's (out, in).
        w = torch.from_numpy(array.reshape(tuple(int(n) for n in reversed(tensor.shape.tolist()))).copy())
        if permuted and re.search(r"attn_[qk]\.", tensor.name):
            w = _unpermute(w, cfg.n_heads if ".attn_q." in tensor.name else cfg.n_kv_heads)
        state[target] = w
    if unknown:
        raise ValueError(f"unexpected tensors in the GGUF file: {', '.join(unknown[:8])}"
                         + (" ..." if len(unknown) > 8 else ""))
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return cfg, fuse_projections(state)
