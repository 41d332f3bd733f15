"""llmstack: a readable, tested, fast PyTorch reference implementation of a modern LLM stack."""
__version__ = "0.1.0"
