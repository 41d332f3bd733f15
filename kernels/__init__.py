"""Triton kernels, installed as `llmstack.kernels`. They import torch and triton only."""
import torch

# The dtypes the kernels are built for on a GPU. In float32 they keep exact fp32 dots,
# which tensor cores do not do, and every config spills registers on Hopper
# (`python scripts/check_kernels.py --dtype fp32`), so callers send float32 work on a
# GPU to torch. Under the interpreter float32 is what the tests use.
GPU_DTYPES = (torch.float16, torch.bfloat16)
