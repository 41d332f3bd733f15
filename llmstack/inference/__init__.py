"""Generation, sampling, KV caches, quantization and speculative decoding."""
from llmstack.inference.generate import generate, sample_next, stream_generate, use_decode_layout

__all__ = ["generate", "sample_next", "stream_generate", "use_decode_layout"]
