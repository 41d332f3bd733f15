"""Byte-level BPE trained here, encoded by tiktoken; named tiktoken encodings too."""
from llmstack.tokenizer.bpe import GPT4_PATTERN, count_chunks, encode_reference, train_bpe
from llmstack.tokenizer.config import TokenizerConfig
from llmstack.tokenizer.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, StreamDecoder, Tokenizer

__all__ = ["BOS", "EOS", "GPT4_PATTERN", "PAD", "SPECIAL_TOKENS", "StreamDecoder", "Tokenizer", "TokenizerConfig",
           "count_chunks", "encode_reference", "train_bpe"]
