"""llmstack: a readable, tested, fast PyTorch reference implementation of a modern LLM stack.

    >>> import llmstack
    >>> model = llmstack.from_pretrained("runs/quickstart")
    >>> ids = llmstack.generate(model, prompt_ids, max_new_tokens=50, temperature=0.8, top_p=0.95)
"""
from llmstack.config import ConfigError, ModelConfig, MoEConfig, RopeScaling, load_config, model_preset
from llmstack.model import KVCache, Transformer

__version__ = "0.1.0"

# Heavier entry points load on first use, so `import llmstack` stays quick.
_LAZY = {
    "from_pretrained": "llmstack.interop",
    "save_pretrained": "llmstack.interop",
    "load_tokenizer": "llmstack.interop",
    "generate": "llmstack.inference",
    "beam_search": "llmstack.inference",
    "speculative_generate": "llmstack.inference",
    "quantize_": "llmstack.inference",
    "Tokenizer": "llmstack.tokenizer",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmstack' has no attribute {name!r}")


__all__ = ["ConfigError", "KVCache", "ModelConfig", "MoEConfig", "RopeScaling", "Transformer", "load_config",
           "model_preset", *_LAZY]
