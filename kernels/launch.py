"""Launching an autotuned kernel, or the same kernel with a pinned config for reproducible bits.

The tile sizes decide the order in which a kernel adds up its floating-point sums, so
two configs give results that differ in the last bits. The autotuner picks its config
by timing, and the timing can come out differently in another process or on another
rank, so an autotuned run is not bit-for-bit reproducible from one process to the next.
Under `torch.use_deterministic_algorithms(True)` every launch here skips the timing
and takes the first row of the call's table that the GPU can run: the same config, so
the same bits, in every process on the same kind of GPU. It may be a slower config
than the autotuner would find.
"""
from __future__ import annotations

import torch
import triton


def candidate_configs(kernel, args: tuple, kwargs: dict) -> list:
    """The configs an autotuned kernel would time for this call, after its early pruning,
    in table order; [None] (the kernel's own defaults) for a kernel that is not autotuned."""
    if not isinstance(kernel, triton.runtime.Autotuner):
        return [None]
    if kernel.early_config_prune is None:
        return list(kernel.configs)
    return list(kernel.early_config_prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs))


def launch(kernel, grid, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`; with torch's deterministic algorithms on, an autotuned
    kernel runs its first candidate config that fits the device instead of the timed best."""
    if not (isinstance(kernel, triton.runtime.Autotuner) and torch.are_deterministic_algorithms_enabled()):
        return kernel[grid](*args, **kwargs)
    configs = candidate_configs(kernel, args, kwargs)
    for config in configs[:-1]:
        try:
            return kernel.fn[grid](*args, **kwargs, **config.all_kwargs())
        except triton.runtime.errors.OutOfResources:  # e.g. more shared memory than this GPU has
            pass
    return kernel.fn[grid](*args, **kwargs, **configs[-1].all_kwargs())


__all__ = ["candidate_configs", "launch"]
