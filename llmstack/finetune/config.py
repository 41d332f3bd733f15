"""The fine-tuning job's schema: which base, which method, which conversations, the training loop."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from llmstack.config import ConfigError, check_at_least, check_fraction, option
from llmstack.distributed.config import ParallelConfig
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
    source: str = option("stdlib", '"stdlib" (built from the standard library), "arithmetic[:N]" (grpo, ppo: '
                                   'sums and differences of 1..N, default 20) or JSONL file(s), a path or glob: '
                                   '{"messages"} or {"prompt", "completion"} (sft, grpo, ppo), '
                                   '{"prompt", "chosen", "rejected"} (reward, dpo)')
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
class DPOConfig:
    beta: float = option(0.1, "strength of the pull towards the reference (the KL penalty's inverse temperature)")
    loss: Literal["sigmoid", "robust", "ipo"] = option(
        "sigmoid", "sigmoid: DPO (cDPO with label_smoothing); robust: rDPO; ipo: IPO")
    label_smoothing: float = option(0.0, "the assumed share of flipped labels (cDPO, rDPO); < 0.5")

    def validate(self) -> "DPOConfig":
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"dpo.beta must be a finite number > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        return self


@dataclass
class RewardConfig:
    margin: float = option(0.0, "Bradley-Terry margin: -log sigmoid(r_chosen - r_rejected - margin)")


@dataclass
class RLConfig:
    task: str = option("python_function", 'the reward: "python_function" (the answer compiles and defines the '
                                          'function the prompt names), "python_signature" (its first line is that '
                                          'function\'s def), "python_parses" (it compiles), "arithmetic" (the '
                                          'answer\'s last integer is the exact value asked) or "module:function" / '
                                          '"file.py:function", f(prompt, answer) -> float, run in a child process')
    group_size: int = option(4, "GRPO: answers sampled per prompt (their rewards normalised within the group)")
    prompts_per_step: int = option(4, "prompts per optimizer step")
    max_new_tokens: int = option(96, "longest sampled answer")
    temperature: float = option(1.0, "sampling temperature of the rollouts")
    top_p: Optional[float] = option(None, "nucleus sampling of the rollouts (null: off)")
    kl_coef: float = option(0.04, "weight of the per-token KL to the reference")
    clip: float = option(0.2, "PPO/GRPO ratio clip")
    ppo_epochs: int = option(2, "PPO: optimisation passes over each rollout batch")
    gamma: float = option(1.0, "PPO: discount")
    lam: float = option(0.95, "PPO: GAE lambda")
    value_coef: float = option(0.5, "PPO: weight of the value loss")
    reward_model: Optional[str] = option(None, "PPO: a reward-model run (objective: reward); null: the task's reward")
    timeout: float = option(5.0, "seconds the reward check of one answer may take (in a subprocess)")
    eval_prompts: int = option(64, "held-out prompts whose success rate is measured")

    def validate(self) -> "RLConfig":
        check_at_least("rl", self, 1, "prompts_per_step", "max_new_tokens", "ppo_epochs", "eval_prompts")
        if self.group_size < 2:
            raise ConfigError(f"rl.group_size must be >= 2 (GRPO normalises rewards within a group), got "
                              f"{self.group_size}")
        for name in ("temperature", "timeout"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"rl.{name} must be a finite number > 0, got {getattr(self, name)}")
        check_at_least("rl", self, 0, "kl_coef", "clip", "value_coef")
        check_fraction("rl", self, "gamma", "lam")
        return self


@dataclass
class FinetuneConfig:
    base: str = option("runs/quickstart", "the model to start from: an llmstack run or checkpoint, a Hugging Face "
                                          "directory or a GGUF file")
    method: Literal["full", "lora", "qlora"] = option(
        "lora", "full: every weight trains; lora: adapters on a frozen base; qlora: adapters on an nf4 base")
    objective: Literal["sft", "reward", "dpo", "grpo", "ppo"] = option(
        "sft", "sft: answers (conversations); reward: a reward model on preference pairs; dpo: the policy on "
               "preference pairs; grpo, ppo: reinforcement learning from a reward")
    lora: LoraConfig = option(doc="the adapters (lora and qlora)", factory=LoraConfig)
    data: ChatDataConfig = option(doc="the conversations (sft), preference pairs (reward, dpo) or prompts (grpo, ppo)",
                                  factory=ChatDataConfig)
    dpo: DPOConfig = option(doc="Direct Preference Optimization (objective: dpo)", factory=DPOConfig)
    reward: RewardConfig = option(doc="the reward model (objective: reward)", factory=RewardConfig)
    rl: RLConfig = option(doc="GRPO and PPO (objective: grpo, ppo)", factory=RLConfig)
    train: TrainConfig = option(doc="the training loop, as in pretraining", factory=TrainConfig)
    parallel: ParallelConfig = option(doc="processes (torchrun): data-parallel replicas for sft so far",
                                      factory=ParallelConfig)

    def validate(self) -> "FinetuneConfig":
        if not self.base:
            raise ConfigError("base is empty; name a run, checkpoint, Hugging Face directory or GGUF file")
        if self.method != "full":
            self.lora.validate()
        self.data.validate()
        self.train.validate()
        self.parallel.validate()
        if self.parallel.world_size > 1:
            if self.objective != "sft" or self.parallel.sharded:
                raise ConfigError("fine-tuning runs on several processes as data-parallel replicas of an sft job "
                                  "(parallel.dp_replicate, with parallel.shard_optimizer for ZeRO-1) so far")
            self.parallel.check_model(None, self.train.batch_size)
        if self.objective == "dpo":
            self.dpo.validate()
        if self.objective in ("grpo", "ppo"):
            self.rl.validate()
        return self
