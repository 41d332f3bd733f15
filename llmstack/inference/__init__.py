"""Generation, sampling, KV caches, quantization and speculative decoding."""
from llmstack.inference.generate import generate, sample_next

__all__ = ["generate", "sample_next"]
