"""Training: the loop, AdamW groups, schedules, precision, checkpoints, the pretraining job."""
from llmstack.train.checkpoint import (CorruptCheckpointError, latest_checkpoint, load_checkpoint,
                                       load_latest_checkpoint, save_checkpoint)
from llmstack.train.config import PretrainConfig, TrainConfig
from llmstack.train.interrupt import StopOnInterrupt
from llmstack.train.optim import build_optimizer, param_groups
from llmstack.train.pretrain import build_tokenizer, load_run_config, pretrain
from llmstack.train.schedule import lr_multiplier
from llmstack.train.trainer import TrainingError, TrainResult, next_token_loss, train

__all__ = ["CorruptCheckpointError", "PretrainConfig", "StopOnInterrupt", "TrainConfig", "TrainResult", "TrainingError",
           "build_optimizer", "build_tokenizer", "latest_checkpoint", "load_checkpoint", "load_latest_checkpoint",
           "load_run_config", "lr_multiplier", "next_token_loss", "param_groups", "pretrain", "save_checkpoint", "train"]
