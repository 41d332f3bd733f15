"""Triton kernels, installed as `llmstack.kernels`. They import torch and triton only."""
