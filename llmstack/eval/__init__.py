"""Evaluation: perplexity and bits per byte."""
from llmstack.eval.perplexity import evaluate

__all__ = ["evaluate"]
