"""Typed configs, YAML loading, dotted overrides and validation.

Every config is a plain dataclass. `from_dict` turns a nested mapping (from
YAML) into one, and rejects what it does not know: an unknown key names the key
and the nearest valid ones, a wrong type names the key and the expected type.
Shape rules (heads dividing the width, ...) are checked in `validate()` before
any tensor is built.

    cfg = load_config(PretrainConfig, "configs/pretrain/quickstart.yaml",
                      overrides=["model.n_layers=4", "train.lr=3e-4"])
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


def is_int(value) -> bool:
    """An int, and not a bool (which Python counts as one): what integer arguments are checked with."""
    return isinstance(value, int) and not isinstance(value, bool)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what to do."""


# --------------------------------------------------------------------------- model


@dataclass
class RopeScaling:
    """How RoPE frequencies are stretched to run past the trained context.

    linear: positions divided by `factor` (position interpolation).
    ntk:    NTK-aware: the base theta grows by factor**(d/(d-2)), low frequencies stretch most.
    yarn:   NTK-by-parts interpolation plus an attention temperature (YaRN).
    llama3: Llama-3.1's by-wavelength blend of interpolated and original frequencies.
    """

    type: Literal["linear", "ntk", "yarn", "llama3"] = "linear"
    factor: float = 1.0
    original_max_seq_len: int = 8192  # the context the model was trained on
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: Optional[float] = None  # yarn; default 0.1 * ln(factor) + 1

    def validate(self) -> None:
        if self.factor < 1.0:
            raise ConfigError(f"model.rope_scaling.factor must be >= 1, got {self.factor}")


@dataclass
class MoEConfig:
    """Mixture of experts replacing the MLP of every block."""

    n_experts: int = 8
    top_k: int = 2
    expert_hidden: Optional[int] = None  # defaults to model.ffn_hidden
    n_shared_experts: int = 0  # always-on experts added to the routed output
    norm_topk_prob: bool = True  # Mixtral: renormalise the top-k softmax weights
    balancing: Literal["aux_loss", "bias"] = "aux_loss"  # "bias": auxiliary-loss-free
    aux_loss_coef: float = 0.01  # Switch load-balancing loss weight
    z_loss_coef: float = 0.001  # router z-loss weight
    bias_update_rate: float = 1e-3  # "bias" balancing: step of the per-expert bias

    def validate(self) -> None:
        if self.n_experts < 1:
            raise ConfigError(f"model.moe.n_experts must be >= 1, got {self.n_experts}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(
                f"model.moe.top_k={self.top_k} must be between 1 and model.moe.n_experts={self.n_experts}"
            )


@dataclass
class ModelConfig:
    """The shape of one decoder-only Transformer. Unset fields are derived in __post_init__."""

    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: = n_heads (MHA); 1: MQA; else GQA
    head_dim: Optional[int] = None  # None: dim // n_heads
    ffn_hidden: Optional[int] = None  # None: 4*dim (gelu) or 8/3*dim rounded to 64 (swiglu)
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    pos: Literal["rope", "learned", "sinusoidal", "none"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_seq_len: int = 2048
    bias: bool = False  # biases in the attention output and MLP projections (GPT-2)
    qkv_bias: bool = False  # biases in the q/k/v projections (Qwen2, GPT-2)
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE
    sliding_window: Optional[int] = None  # each token sees at most this many keys
    attn_backend: Literal["auto", "naive", "sdpa", "triton"] = "auto"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    tie_embeddings: bool = False
    moe: Optional[MoEConfig] = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0:
            if self.dim % self.n_heads:
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
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads} "
                "(each KV head must serve the same number of query heads)"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even model.head_dim, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"model.sliding_window must be >= 1 or null, got {self.sliding_window}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.rope_scaling is not None:
            self.rope_scaling.validate()
        if self.moe is not None:
            self.moe.validate()
        return self


# --------------------------------------------------------------------------- jobs


@dataclass
class TokenizerConfig:
    """Which tokenizer a run uses: a file, a tiktoken name, or one trained on the corpus."""

    path: Optional[str] = None  # a saved llmstack tokenizer file
    tiktoken: Optional[str] = None  # "gpt2", "cl100k_base", "o200k_base" (needs their files cached)
    vocab_size: int = 8192  # when trained on the corpus (neither path nor tiktoken set)
    train_docs_fraction: float = 1.0  # fraction of training documents used to train it


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib", a local file/glob (.txt/.jsonl/.parquet) or "hf:NAME[:CONFIG]"
    text_field: str = "text"
    val_fraction: float = 0.02
    seq_len: int = 256
    cache_dir: Optional[str] = None  # default ~/.cache/llmstack/tokens ($LLMSTACK_CACHE)
    num_proc: Optional[int] = None


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    seed: int = 1337
    max_steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: Literal["adamw"] = "adamw"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, linear, wsd)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: Literal["cosine", "wsd", "constant", "linear"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: fraction of steps spent decaying at the end
    grad_clip: float = 1.0  # 0 disables
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    device: str = "auto"  # "auto": cuda when available, else cpu
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    resume: Literal["never", "auto"] = "never"  # "auto": continue from out_dir when it holds a run
    max_bad_steps: int = 10  # NaN/inf losses in a row that stop the run
    tensorboard: bool = True


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "PretrainConfig":
        self.model.validate()
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} is above model.max_seq_len={self.model.max_seq_len}; "
                "lower data.seq_len or raise model.max_seq_len"
            )
        return self


# --------------------------------------------------------------------------- machinery

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _config_root() -> Path:
    """The `configs/` folder: beside the package in a checkout, inside it in a wheel."""
    if CONFIG_DIR.is_dir():
        return CONFIG_DIR
    return Path(__file__).resolve().parent / "configs"


def model_preset(name: str) -> ModelConfig:
    """A model preset by name (`configs/model/NAME.yaml`) or by path to a YAML file."""
    return from_dict(ModelConfig, _resolve_model(name), "model").validate()


def list_presets() -> list[str]:
    return sorted(p.stem for p in (_config_root() / "model").glob("*.yaml"))


def _resolve_model(value: Any) -> dict:
    """`model:` in a job may be a preset name/path, or a mapping with an optional `preset:` base."""
    if isinstance(value, str):
        path = Path(value)
        if path.suffix not in (".yaml", ".yml"):  # a preset name, e.g. "llama-3.2-1b"
            path = _config_root() / "model" / f"{value}.yaml"
        if not path.is_file():
            close = difflib.get_close_matches(str(value), list_presets(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; presets: {', '.join(list_presets())}"
            raise ConfigError(f"model preset {value!r} not found{hint}")
        return _resolve_model(yaml.safe_load(path.read_text()) or {})
    if isinstance(value, dict) and "preset" in value:
        base = _resolve_model(value["preset"])
        rest = {k: v for k, v in value.items() if k != "preset"}
        return _merge(base, rest)
    return value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if is_int(value):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if cls is ModelConfig:
        data = _resolve_model(data)
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(f'{prefix}.{c}' if prefix else c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint} (valid: {', '.join(fields)})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested mapping."""
    data = _merge({}, data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for k in keys[:-1]:
            if k == "model" and isinstance(node.get(k), str):
                node[k] = _resolve_model(node[k])
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = node[k]
        node[keys[-1]] = yaml.safe_load(text)
    return data


def load_config(cls: type, path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None) -> Any:
    """Read a YAML file into `cls`, apply dotted overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    data = apply_overrides(data, list(overrides or []))
    cfg = from_dict(cls, data)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def require_positive(args, *names: str) -> None:
    """Exit with one error line when a command-line flag is below 1 (`args.new_tokens` is
    `--new-tokens`; None means not given)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be an integer >= 1, got {value}")


def parse_cli(cls: type, argv: Optional[list[str]] = None, *, description: str = "", extra_args=None) -> tuple[Any, Any]:
    """The shared command line of every script: `--config FILE`, dotted overrides
    (`model.n_layers=4 train.lr=3e-4`) and `--print-config`.

    `extra_args(parser)` may add script-specific flags. Returns (config, parsed args).
    Config errors end the program with one line naming the key, not a traceback.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted overrides")
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"config error: {e}\n")
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        parser.exit(0)
    return cfg, args


def resolve_device(name: str):
    """A `torch.device` from a config or command-line value: "auto" is CUDA when available, else
    the CPU. A name torch does not know, or a CUDA device this machine lacks, is a ConfigError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ConfigError(f"device {name!r} is not available: torch sees {count} CUDA device(s)"
                              + ("" if torch.cuda.is_available() else " (a CPU-only build or no GPU)"))
    return device
