"""Fine-tuning: LoRA/DoRA adapters applied from outside, in PEFT's format both ways (`llmstack.finetune.lora`);
the fine-tuning job (`finetune(cfg)`, `FinetuneConfig`), and loading what it writes (`from_pretrained`)."""
import importlib

from llmstack.finetune.lora import (
    TARGETS,
    LoRALinear,
    adapter_parameters,
    apply_lora,
    count_parameters,
    load_adapter,
    load_adapter_tensors,
    lora_layers,
    merge_lora,
    print_trainable_parameters,
    remove_lora,
    save_adapter,
    trainable_summary,
    unmerge_lora,
)

# The job and its loaders import the training loop and the data pipeline: loaded on first use.
_LAZY = {"FinetuneConfig": "llmstack.finetune.config", "finetune": "llmstack.finetune.job",
         "from_pretrained": "llmstack.finetune.loading", "load_finetuned": "llmstack.finetune.loading",
         "evaluate_instructions": "llmstack.finetune.evaluate"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmstack.finetune' has no attribute {name!r}")


__all__ = ["TARGETS", "LoRALinear", "adapter_parameters", "apply_lora", "count_parameters", "load_adapter",
           "load_adapter_tensors", "lora_layers", "merge_lora", "print_trainable_parameters", "remove_lora",
           "save_adapter", "trainable_summary", "unmerge_lora", *_LAZY]
