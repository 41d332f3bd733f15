"""The tokenizer section of a job: a file, a tiktoken name, or one trained on the corpus."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llmstack.config import ConfigError, check_at_least, check_fraction, option
from llmstack.tokenizer.tokenizer import SPECIAL_TOKENS


@dataclass
class TokenizerConfig:
    path: Optional[str] = option(None, "a tokenizer file or folder: llmstack's tokenizer.json, a Hugging Face "
                                       "tokenizer.json or model folder, or a GGUF file")
    tiktoken: Optional[str] = option(None, '"gpt2", "cl100k_base", "o200k_base" (needs their files cached)')
    vocab_size: int = option(8192, "when trained on the corpus (neither path nor tiktoken set)")
    train_docs_fraction: float = option(1.0, "fraction of training documents used to train it")

    def validate(self) -> "TokenizerConfig":
        if self.path is not None and self.tiktoken is not None:
            raise ConfigError("tokenizer.path and tokenizer.tiktoken name two tokenizers; set one of them")
        check_at_least("tokenizer", self, 256 + len(SPECIAL_TOKENS), "vocab_size")  # every byte and special token
        check_fraction("tokenizer", self, "train_docs_fraction", low_open=True)
        return self
