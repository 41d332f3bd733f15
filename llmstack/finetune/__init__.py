"""Fine-tuning: LoRA adapters applied from outside, in PEFT's format both ways (`llmstack.finetune.lora`)."""
from llmstack.finetune.lora import (
    TARGETS,
    LoRALinear,
    apply_lora,
    count_parameters,
    load_adapter,
    lora_layers,
    merge_lora,
    print_trainable_parameters,
    remove_lora,
    save_adapter,
    trainable_summary,
    unmerge_lora,
)

__all__ = ["TARGETS", "LoRALinear", "apply_lora", "count_parameters", "load_adapter", "lora_layers", "merge_lora",
           "print_trainable_parameters", "remove_lora", "save_adapter", "trainable_summary", "unmerge_lora"]
