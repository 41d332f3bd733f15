"""Tokenizers: the byte-level BPE trained here (tiktoken-encoded), and downloaded models' own
(Hugging Face tokenizer.json or GGUF metadata) behind one interface; `load` reads any of them."""
from llmstack.tokenizer.auto import load
from llmstack.tokenizer.bpe import GPT4_PATTERN, count_chunks, encode_reference, train_bpe
from llmstack.tokenizer.chat import CHATML, render_chat
from llmstack.tokenizer.config import TokenizerConfig
from llmstack.tokenizer.hf import HFTokenizer
from llmstack.tokenizer.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, StreamDecoder, Tokenizer

__all__ = ["BOS", "CHATML", "EOS", "GPT4_PATTERN", "HFTokenizer", "PAD", "SPECIAL_TOKENS", "StreamDecoder", "Tokenizer",
           "TokenizerConfig", "count_chunks", "encode_reference", "load", "render_chat", "train_bpe"]
