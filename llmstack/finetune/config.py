"""The fine-tuning job's schema: which base, which method, which conversations, the training loop."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from llmstack.config import ConfigError, check_at_least, check_fraction, option
from llmstack.train.config import TrainConfig

METHODS = ("full", "lora", "qlora")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # llmstack.finetune.lora.TARGETS


@dataclass
class LoraConfig:
    rank: int = option(8, "r: the adapters' inner dimension")
    alpha: float = option(16.0, "the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)")
    dropout: float = option(0.05, "dropout on the adapters' input")
    targets: list[str] = option(doc="layers to adapt: any of q, k, v, o, gate, up, down",
                                factory=lambda: list(LORA_TARGETS))
    rslora: bool = option(False, "rank-stabilised scaling alpha / sqrt(rank)")
    use_dora: bool = option(False, "DoRA: a trained magnitude per output row on top of the adapter")

    def validate(self) -> "LoraConfig":
        if not self.rank >= 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora.alpha must be a finite number > 0, got {self.alpha}")
        check_fraction("lora", self, "dropout", high_open=True)
        if not self.targets:
            raise ConfigError("lora.targets is empty; name layers to adapt among " + ", ".join(LORA_TARGETS))
        for t in self.targets:
            if t not in LORA_TARGETS:
                raise ConfigError(f"lora.targets: {t!r} is not a layer LoRA adapts; choose among "
                                  + ", ".join(LORA_TARGETS))
        return self


@dataclass
class ChatDataConfig:
    source: str = option("stdlib", '"stdlib" (instructions from the standard library) or JSONL file(s): a path '
                                   'or glob, {"messages": [...]} or {"prompt", "completion"} per line')
    val_fraction: float = option(0.02, "share held out for validation (stdlib: by file, as pretraining splits it)")
    seq_len: int = option(512, "tokens per row")
    packing: bool = option(True, "pack conversations into rows, each attending only to itself")
    truncation: Literal["truncate", "drop", "refuse"] = option(
        "truncate", "a conversation longer than seq_len: keep its first seq_len tokens, drop it, or stop")
    chat_template: Optional[str] = option(None, 'null: the base\'s own; "chatml"; or a Jinja chat template')
    max_examples: Optional[int] = option(None, "train on the first N conversations only (null: all)")
    max_chars: int = option(1200, "stdlib: longest function (characters of code) made an instruction")

    def validate(self) -> "ChatDataConfig":
        check_at_least("data", self, 1, "seq_len", "max_examples", "max_chars")
        check_fraction("data", self, "val_fraction", low_open=True, high_open=True)
        if not self.source:
            raise ConfigError("data.source is empty; use stdlib or a JSONL file")
        return self


@dataclass
class FinetuneConfig:
    base: str = option("runs/quickstart", "the model to start from: an llmstack run or checkpoint, a Hugging Face "
                                          "directory or a GGUF file")
    method: Literal["full", "lora", "qlora"] = option(
        "lora", "full: every weight trains; lora: adapters on a frozen base; qlora: adapters on an nf4 base")
    lora: LoraConfig = option(doc="the adapters (lora and qlora)", factory=LoraConfig)
    data: ChatDataConfig = option(doc="the conversations", factory=ChatDataConfig)
    train: TrainConfig = option(doc="the training loop, as in pretraining", factory=TrainConfig)

    def validate(self) -> "FinetuneConfig":
        if not self.base:
            raise ConfigError("base is empty; name a run, checkpoint, Hugging Face directory or GGUF file")
        if self.method != "full":
            self.lora.validate()
        self.data.validate()
        self.train.validate()
        return self
