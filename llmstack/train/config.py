"""The training job's schema: `TrainConfig` (the loop) and `PretrainConfig` (the whole job)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from llmstack.config import ConfigError, check_at_least, check_fraction, option
from llmstack.data.config import DataConfig
from llmstack.model.config import ModelConfig
from llmstack.tokenizer.config import TokenizerConfig
from llmstack.distributed.config import ParallelConfig


@dataclass
class TrainConfig:
    out_dir: str = option("runs/default", "run directory: checkpoints, metrics, plots")
    seed: int = option(1337, "seeds the init, the batch order and every RNG")
    max_steps: int = option(1000, "optimizer steps")
    batch_size: int = option(8, "sequences per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    optimizer: Literal["adamw"] = option("adamw", "AdamW with decay / no-decay parameter groups")
    lr: float = option(3e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final lr = lr * min_lr_ratio (cosine, linear, wsd)")
    weight_decay: float = option(0.1, "on weight matrices only; norms, biases and embeddings are exempt")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    schedule: Literal["cosine", "wsd", "constant", "linear"] = option("cosine", "learning-rate schedule after warmup")
    warmup_steps: int = option(100, "linear warmup from 0")
    decay_fraction: float = option(0.2, "wsd: fraction of steps spent decaying at the end")
    grad_clip: float = option(1.0, "0 disables")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "fp32; bf16 autocast; fp16 autocast with a gradient scaler")
    compile: bool = option(False, "torch.compile the model")
    activation_checkpointing: Literal["none", "full", "selective"] = option(
        "none", "recompute activations in backward: every block (full) or some (selective): less memory, more time")
    ac_policy: Literal["layer", "op"] = option(
        "layer", "selective: every ac_every-th block (layer), or every block keeping matmul and attention outputs (op)")
    ac_every: int = option(2, "selective, layer policy: checkpoint every ac_every-th block")
    device: str = option("auto", '"auto": cuda when available, else cpu')
    peak_tflops: float = option(0.0, "the device's peak TFLOP/s for the MFU in the log; 0: known GPUs' dense bf16 "
                                     "peak, else no MFU (TFLOP/s per device are logged either way)")
    eval_every: int = option(100, "steps between validation passes")
    eval_batches: int = option(20, "validation batches per pass")
    log_every: int = option(10, "steps between metrics.jsonl lines")
    save_every: int = option(500, "steps between checkpoints (and one at the end, and on Ctrl-C)")
    keep_last: int = option(2, "checkpoints kept; older ones are deleted")
    resume: Literal["never", "auto"] = option("never", '"auto": continue from out_dir when it holds a run')
    max_bad_steps: int = option(10, "non-finite steps (loss or gradient norm) in a row that stop the run")
    tensorboard: bool = option(True, "also log to TensorBoard when it is installed")

    def validate(self) -> "TrainConfig":
        check_at_least("train", self, 1, "max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches",
                       "log_every", "save_every", "keep_last", "max_bad_steps", "ac_every")
        check_at_least("train", self, 0, "warmup_steps", "weight_decay", "grad_clip", "peak_tflops")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr must be a finite number > 0, got {self.lr}")
        check_fraction("train", self, "min_lr_ratio", "decay_fraction")
        check_fraction("train", self, "beta1", "beta2", high_open=True)
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"train.eps must be a finite number > 0, got {self.eps}")
        if not self.out_dir:
            raise ConfigError("train.out_dir is empty; name a run directory")
        return self


@dataclass
class PretrainConfig:
    model: ModelConfig = option(doc="the model: a preset name, or a mapping (optionally with preset: BASE)",
                                factory=ModelConfig)
    tokenizer: TokenizerConfig = option(doc="which tokenizer", factory=TokenizerConfig)
    data: DataConfig = option(doc="which corpus", factory=DataConfig)
    train: TrainConfig = option(doc="the training loop", factory=TrainConfig)
    parallel: ParallelConfig = option(doc="processes and how the work is split over them (torchrun)",
                                      factory=ParallelConfig)

    def validate(self) -> "PretrainConfig":
        self.model.validate()
        self.parallel.validate()
        self.parallel.check_model(self.model, self.train.batch_size)
        self.tokenizer.validate()
        self.data.validate()
        self.train.validate()
        if not self.data.val_fraction > 0:
            raise ConfigError(f"data.val_fraction must be in (0, 1) for pretraining, which evaluates on held-out "
                              f"documents; got {self.data.val_fraction}")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} is above model.max_seq_len={self.model.max_seq_len}; "
                "lower data.seq_len or raise model.max_seq_len"
            )
        return self
