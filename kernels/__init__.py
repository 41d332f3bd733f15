"""Triton kernels, installed as `llmstack.kernels`. They import torch and triton only;
this file imports torch only, so asking about the kernels does not import triton."""
import importlib

import torch

# The dtypes the kernels are built for on a GPU. In float32 they keep exact fp32 dots,
# which tensor cores do not do, and every config spills registers on Hopper
# (`python scripts/check_kernels.py --dtype fp32`), so callers send float32 work on a
# GPU to torch. Under the interpreter float32 is what the tests use.
GPU_DTYPES = (torch.float16, torch.bfloat16)

_AVAILABLE: dict[str, bool] = {}


@torch.compiler.assume_constant_result  # torch.compile asks once while tracing and keeps the answer
def available(name: str) -> bool:
    """Whether `llmstack.kernels.<name>` imports (triton is installed and supports this platform) and
    can run here (a GPU, or the CPU under TRITON_INTERPRET=1). Layers ask on every call; the answer
    is kept."""
    if name not in _AVAILABLE:
        try:
            _AVAILABLE[name] = importlib.import_module(f"{__name__}.{name}").is_available()
        except Exception:  # triton missing or unsupported platform
            _AVAILABLE[name] = False
    return _AVAILABLE[name]
