"""Autotuned kernels that can also run a pinned config, for reproducible bits.

The tile sizes decide the order in which a kernel adds up its floating-point sums, so
two configs give results that differ in the last bits. The autotuner picks its config
by timing, and the timing can come out differently in another process or on another
rank, so an autotuned run is not bit-for-bit reproducible from one process to the next.
Under `torch.use_deterministic_algorithms(True)` a kernel here skips the timing and runs
the first of the call's configs that the GPU can launch: the same config, so the same
bits, in every process on the same kind of GPU. It may be slower than the timed best.

    @autotuned(configs, key=["N"], prune=lambda kwargs: ...)   # in place of @triton.autotune
    @triton.jit
    def kernel(...): ...

    kernel[grid](*args, **kwargs)                              # launched as usual

Under `torch.compile` both paths trace into the graph: the autotuned one as Triton's
autotuner (which inductor tunes), the pinned one as the plain kernel with its config's
meta-parameters. A compiled graph runs the first config without the fallback.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton


class Autotuned:
    """A @triton.jit kernel with its configs. `kernel[grid](...)` launches it through
    `triton.autotune`, or, with torch's deterministic algorithms on, with a pinned config.

    prune: kwargs of the launch -> the configs to consider for it, in order (e.g. the
    rows for its head dim); the first one is the pinned config.
    """

    def __init__(self, fn, configs: list, key: list[str], prune: Optional[Callable[[dict], list]] = None):
        self.fn, self.configs, self._prune = fn, list(configs), prune
        prune_by = None if prune is None else {
            "early_config_prune": lambda configs, named_args, **kwargs: prune(kwargs)}
        self.autotuner = triton.autotune(configs=self.configs, key=key, prune_configs_by=prune_by)(fn)

    def candidates(self, kwargs: dict) -> list:
        """The configs this launch would be tuned over, in table order."""
        return self.configs if self._prune is None else self._prune(kwargs)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if not torch.are_deterministic_algorithms_enabled():
                return self.autotuner[grid](*args, **kwargs)
            return self._pinned(grid, args, kwargs)
        return run

    def _pinned(self, grid, args, kwargs):
        configs = self.candidates(kwargs)
        for i, config in enumerate(configs):
            try:
                # Meta-parameters, warps and stages only: torch.compile takes no other launch options.
                return self.fn[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps,
                                     num_stages=config.num_stages)
            except triton.runtime.errors.OutOfResources:  # e.g. more shared memory than this GPU has
                if i == len(configs) - 1:
                    raise


def autotuned(configs: list, key: list[str], prune: Optional[Callable[[dict], list]] = None):
    """Decorator: `Autotuned(fn, configs, key, prune)`, used like `@triton.autotune`."""
    return lambda fn: Autotuned(fn, configs, key, prune)


__all__ = ["Autotuned", "autotuned"]
