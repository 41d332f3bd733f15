"""Corpora, tokenized memory-mapped caches and deterministic batches (no model import)."""
from llmstack.data.config import DataConfig, saved_data_config
from llmstack.data.corpus import DataError, corpus_fingerprint, iter_texts, load_corpus, stdlib_files
from llmstack.data.loader import TokenBatches
from llmstack.data.tokens import default_cache_dir, prepare_tokens, text_tokens, token_stats

__all__ = ["DataConfig", "DataError", "TokenBatches", "corpus_fingerprint", "default_cache_dir", "iter_texts",
           "load_corpus", "prepare_tokens", "saved_data_config", "stdlib_files", "text_tokens", "token_stats"]
