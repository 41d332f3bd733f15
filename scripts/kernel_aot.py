"""Compile the Triton kernels for a GPU that is not here, and report what each config costs.

Triton compiles ahead of time for any architecture its wheel has a backend for
(it ships NVIDIA's ptxas), so whether every autotuning config of every kernel
compiles for a Hopper GPU, how many registers it takes, whether it spills to
local memory and how much shared memory it needs can all be checked on a
machine with no GPU at all. A config that spills is slow; one that needs more
shared memory than the GPU has fails to launch (the autotuner then skips it).

What is compiled is exactly what the launchers would launch: each public
function (flash_attention's forward and backward, flash_decode, the int8/int4
matmuls) is called on "meta" tensors (shapes and strides, no memory) with the
kernels swapped for recorders, and the recorded arguments are specialised the
way Triton's runtime does it (an integer equal to 1 becomes a constant, one
divisible by 16 gets a divisibility hint, pointers are 16-byte aligned).

`scripts/check_kernels.py` prints the table; tests compile a few configs. This is
kernel developer tooling: it lives beside the scripts, not in the installed package.
Needs a process without TRITON_INTERPRET=1 (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import re
import subprocess
import tempfile
from typing import Callable, Iterator, Optional

import torch
import triton

from llmstack.kernels import flash_attention as fa
from llmstack.kernels import flash_decode as fd
from llmstack.kernels import quant_matmul as qm
from llmstack.kernels.attention_utils import _INTERPRET
from llmstack.kernels.launch import Autotuned

# Shared memory one block may use, by compute capability (CUDA programming guide, table of
# technical specifications): H100/H200 227 KiB, A100 163 KiB, consumer Ampere/Ada 99 KiB.
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024}

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
                 torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}


def toolchain_available() -> bool:
    """True when this Triton build carries the NVIDIA backend's ptxas and cuobjdump (Linux x86 wheels do)."""
    try:
        return all(os.path.exists(tool.path) for tool in (triton.knobs.nvidia.ptxas, triton.knobs.nvidia.cuobjdump))
    except Exception:  # a build without the NVIDIA backend, or an older Triton without knobs
        return False


@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher made it: the kernel (Autotuned or a JITFunction) and its arguments."""
    name: str
    kernel: object
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Report:
    """One config of one launch, compiled for `arch`."""
    case: str  # which call of which public function
    kernel: str
    config: str  # e.g. "BLOCK_M=128 BLOCK_N=64 w4 s3"
    registers: Optional[int] = None  # per thread, at most 255
    stack_bytes: Optional[int] = None  # local memory per thread: register spills
    shared_bytes: Optional[int] = None
    shared_limit: Optional[int] = None
    mma: Optional[str] = None  # tensor-core instructions in the PTX: "wgmma" (Hopper), "mma" (Ampere's), or "none"
    error: Optional[str] = None  # the compiler's complaint, when it failed

    @property
    def fits(self) -> bool:
        """Compiles, fits in shared memory and does not spill."""
        return (self.error is None and self.stack_bytes == 0
                and (self.shared_limit is None or self.shared_bytes <= self.shared_limit))


@contextlib.contextmanager
def recording(module, names: list[str]) -> Iterator[list[Launch]]:
    """Swap module-level kernels for recorders: `kernel[grid](*args, **kwargs)` records instead of launching."""
    launches: list[Launch] = []

    class _Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.name, self.kernel, args, kwargs))

    saved = {n: getattr(module, n) for n in names}
    for n, kernel in saved.items():
        setattr(module, n, _Recorder(n, kernel))
    try:
        yield launches
    finally:
        for n, kernel in saved.items():
            setattr(module, n, kernel)


def attention_launches(batch: int = 2, q_heads: int = 16, kv_heads: int = 4, seqlen: int = 4096, head_dim: int = 128,
                       dtype: torch.dtype = torch.bfloat16, causal: bool = True,
                       window: Optional[int] = None) -> list[Launch]:
    """The launches of one flash_attention forward and backward (prefill/training shapes)."""
    q = torch.empty(batch, q_heads, seqlen, head_dim, dtype=dtype, device="meta")
    k = torch.empty(batch, kv_heads, seqlen, head_dim, dtype=dtype, device="meta")
    with recording(fa, ["_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"]) as launches:
        o, lse = fa._forward(q, k, k, causal, None, window)
        fa._backward(torch.empty_like(o), q, k, k, o, lse, causal, None, window)
    return launches


def decode_launches(batch: int = 1, q_heads: int = 32, kv_heads: int = 8, q_len: int = 1, kv_len: int = 8192,
                    head_dim: int = 128, dtype: torch.dtype = torch.bfloat16, num_splits: int = 16,
                    padded: bool = False) -> list[Launch]:
    """The launches of one flash_decode call (split-KV: partial outputs, then the combine);
    padded: with the key mask of a left-padded batch."""
    q = torch.empty(batch, q_heads, q_len, head_dim, dtype=dtype, device="meta")
    k = torch.empty(batch, kv_heads, kv_len, head_dim, dtype=dtype, device="meta")
    key_mask = torch.empty(batch, kv_len, dtype=torch.uint8, device="meta") if padded else None
    with recording(fd, ["_attn_decode_split", "_attn_decode_combine"]) as launches:
        fd._decode_forward(q, k, k, True, None, None, num_splits=num_splits, key_mask=key_mask)
    return launches


def matmul_launches(m: int = 1, n: int = 4096, k: int = 4096, dtype: torch.dtype = torch.bfloat16,
                    group_size: int = 32) -> list[Launch]:
    """The launches of one int8 and one int4 dequantize-matmul (decode shapes: m rows)."""
    x = torch.empty(m, k, dtype=dtype, device="meta")
    with recording(qm, ["_int8_matmul", "_int4_matmul"]) as launches:
        qm.int8_matmul(x, torch.empty(n, k, dtype=torch.int8, device="meta"),
                       torch.empty(n, dtype=torch.float32, device="meta"))
        groups = torch.empty(n, k // group_size, dtype=torch.float16, device="meta")
        qm.int4_matmul(x, torch.empty(n, k // 2, dtype=torch.uint8, device="meta"), groups, groups, group_size)
    return launches


def _configs(launch: Launch) -> list[Optional[triton.Config]]:
    """The configs the autotuner would time for this launch, in table order; [None] (Triton's
    default warps and stages) for a kernel that is not autotuned."""
    return launch.kernel.candidates(launch.kwargs) if isinstance(launch.kernel, Autotuned) else [None]


def _source(launch: Launch, config: Optional[triton.Config]):
    """(ASTSource, options) specialised as Triton's runtime would for these arguments."""
    fn = launch.kernel.fn if isinstance(launch.kernel, Autotuned) else launch.kernel
    values = dict(zip(fn.arg_names, launch.args))
    values.update(launch.kwargs)
    if config is not None:
        values.update(config.kwargs)
    # From the annotations (strings under `from __future__ import annotations`), which
    # compiled and interpreted kernels both keep.
    constexpr_names = {p.name for p in inspect.signature(fn.fn).parameters.values() if "constexpr" in str(p.annotation)}
    missing = [n for n in fn.arg_names if n not in values]
    if missing:
        raise ValueError(f"{launch.name}: no value recorded for {missing}")
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = values[name]
        if name in constexpr_names or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # device allocations are at least 256-byte aligned
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: cannot specialise {name}={v!r}")
    options = {} if config is None else dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), options


def _config_name(config: Optional[triton.Config]) -> str:
    if config is None:
        return "default"
    return " ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f" w{config.num_warps} s{config.num_stages}"


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the one kernel in a cubin, read with cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
    return int(match.group(1)), int(match.group(2))


def _mma_kind(ptx: str) -> str:
    """Which tensor-core instructions a kernel's dots became. On Hopper only warpgroup MMA (wgmma, issued
    by 4 warps on tiles of at least 64 rows) reaches full throughput; Ampere's per-warp mma.sync cannot
    reach Hopper's peak. Triton picks wgmma when the tile shape and warp count allow it."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if re.search(r"\bmma\.sync", ptx) else "none"


def compile_launch(launch: Launch, case: str = "", arch: int = 90,
                   configs: Optional[list] = None) -> list[Report]:
    """Compile every config of a launch for CUDA compute capability `arch` (90: Hopper): by default the
    ones the autotuner would time, in table order (the first is the one deterministic mode pins)."""
    if _INTERPRET:
        raise RuntimeError("kernels built under TRITON_INTERPRET=1 are interpreted and cannot be compiled; "
                           "run without it")
    target = triton.backends.compiler.GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    reports = []
    for config in _configs(launch) if configs is None else configs:
        report = Report(case, launch.name, _config_name(config), shared_limit=SHARED_MEMORY_LIMIT.get(arch))
        try:
            src, options = _source(launch, config)
            compiled = triton.compile(src, target=target, options=backend.parse_options(options).__dict__)
            report.registers, report.stack_bytes = _resources(compiled.asm["cubin"])
            report.shared_bytes = compiled.metadata.shared
            report.mma = _mma_kind(compiled.asm["ptx"])
        except Exception as e:  # a compiler error is a finding, reported with the others
            report.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        reports.append(report)
    return reports


# Training masks: name -> (causal, window).
MASKS = {"causal": (True, None), "full": (False, None), "window": (True, 1024)}


def standard_cases(head_dims=(64, 128), dtype: torch.dtype = torch.bfloat16,
                   masks=("causal",)) -> list[tuple[str, Callable]]:
    """(case name, () -> launches) for the shapes the benchmarks run: GQA training at 4k tokens under
    each of `masks` (MASKS), batch-1 decode over an 8k cache (one token, and 4 speculative tokens),
    one token for each row of a left-padded batch of 8, and decode-time matmuls."""
    cases = []
    for d in head_dims:
        for mask in masks:
            causal, window = MASKS[mask]
            cases.append((f"train {mask} d{d}" if mask != "causal" else f"train d{d}",
                          lambda d=d, causal=causal, window=window: attention_launches(
                              head_dim=d, dtype=dtype, causal=causal, window=window)))
        cases.append((f"decode q1 d{d}", lambda d=d: decode_launches(head_dim=d, dtype=dtype)))
        cases.append((f"decode q4 d{d}", lambda d=d: decode_launches(head_dim=d, dtype=dtype, q_len=4)))
        cases.append((f"decode padded d{d}", lambda d=d: decode_launches(batch=8, head_dim=d, dtype=dtype,
                                                                         num_splits=4, padded=True)))
    cases.append(("matmul m1", lambda: matmul_launches(dtype=dtype)))
    return cases


__all__ = ["Launch", "MASKS", "Report", "SHARED_MEMORY_LIMIT", "attention_launches", "compile_launch",
           "decode_launches", "matmul_launches", "recording", "standard_cases", "toolchain_available"]
