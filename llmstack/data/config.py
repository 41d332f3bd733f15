"""The data section of a job: which corpus, how it is split, the training window."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from llmstack.config import ConfigError, check_at_least, check_fraction, from_dict, option


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


def saved_data_config(checkpoint: str | os.PathLike) -> Optional[DataConfig]:
    """The data section of the job config saved in a checkpoint directory (config.yaml), or None
    where there is none: a Hugging Face directory, a GGUF file, or a checkpoint converted from one
    (its config.yaml holds only the model)."""
    path = Path(checkpoint) / "config.yaml"
    job = yaml.safe_load(path.read_text()) if path.is_file() else None
    if not isinstance(job, dict) or job.get("data") is None:
        return None
    return from_dict(DataConfig, job["data"], "data").validate()
