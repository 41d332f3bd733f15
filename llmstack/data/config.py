"""The data section of a job: which corpus, how it is split, the training window."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llmstack.config import ConfigError, check_at_least, check_fraction, option


@dataclass
class DataConfig:
    source: str = option("stdlib", '"stdlib", a local file/glob (.txt/.jsonl/.parquet) or "hf:NAME[:CONFIG]"')
    text_field: str = option("text", "the text column of JSONL/Parquet/Hub sources")
    val_fraction: float = option(
        0.02, "share of documents held out for validation (split by a hash of the document's path or index)")
    seq_len: int = option(256, "tokens per training window")
    cache_dir: Optional[str] = option(None, "default ~/.cache/llmstack/tokens ($LLMSTACK_CACHE)")
    num_proc: Optional[int] = option(None, "tokenizer processes; null: all cores")

    def validate(self) -> "DataConfig":
        check_at_least("data", self, 1, "seq_len", "num_proc")
        check_fraction("data", self, "val_fraction", high_open=True)
        if not self.source:
            raise ConfigError("data.source is empty; use stdlib, a file or glob, or hf:NAME")
        return self
