"""llmstack: a readable, tested, fast PyTorch reference implementation of a modern LLM stack.

    >>> import llmstack
    >>> model = llmstack.from_pretrained("runs/quickstart")
    >>> tok = llmstack.load_tokenizer("runs/quickstart")
    >>> ids = llmstack.generate(model, tok.encode("def fib(n):"), max_new_tokens=50, temperature=0.8, top_p=0.95)

Every name below is imported on first use, so `import llmstack` (and `import
llmstack.config`, `import llmstack.data`, ...) loads only what is asked for.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "ConfigError": "llmstack.config",
    "load_config": "llmstack.config",
    "ModelConfig": "llmstack.model",
    "MoEConfig": "llmstack.model",
    "RopeScaling": "llmstack.model",
    "Transformer": "llmstack.model",
    "KVCache": "llmstack.model",
    "build_model": "llmstack.model",
    "model_preset": "llmstack.model",
    "from_pretrained": "llmstack.finetune.loading",
    "save_pretrained": "llmstack.interop",
    "save_hf": "llmstack.interop",
    "load_tokenizer": "llmstack.interop",
    "smollm2_path": "llmstack.interop",
    "generate": "llmstack.inference",
    "generate_text": "llmstack.inference",
    "chat": "llmstack.inference",
    "beam_search": "llmstack.inference",
    "speculative_generate": "llmstack.inference",
    "quantize_": "llmstack.inference",
    "Tokenizer": "llmstack.tokenizer",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'llmstack' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
