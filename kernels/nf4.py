"""NF4 dequantization (QLoRA's 4-bit base weights) on the GPU: codes and double-quantized absmaxes
to a float matrix.

The layout is bitsandbytes' (see llmstack.inference.quantize.quantize_nf4): n weights, flattened
row-major, in blocks of BLOCK (64) that share an absmax; the absmaxes in groups of ABS_BLOCK (256)
that share an 8-bit scale:

    qweight       uint8 (ceil(n / 2),)  code of weight 2j in the high nibble of byte j, 2j + 1 in the low
    absmax        uint8 (blocks,)       index into the 256-value dynamic map
    absmax_scale  float32 (groups,)
    absmax_offset float32 ()
    w[i] = NF4[code_i] * (DYN[absmax[b]] * absmax_scale[b // ABS_BLOCK] + absmax_offset),  b = i // BLOCK

Each program expands BLOCK_BYTES bytes into 2 * BLOCK_BYTES weights; the even and odd weights are
stored apart, so the nibbles never need interleaving in registers. The arithmetic is the PyTorch
path's (float32, a product then a sum, then the product with the code value), so under the
interpreter the two agree bit for bit; compiled for a GPU the backend may fuse the first product
and sum into one rounding.

Layout of this file: the @triton.jit kernel, then the launcher. There is no autograd.Function: the
base weights are frozen (the gradient to x is taken through the dequantized matrix by the caller).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

# Read once at import, as in flash_attention.py: triton.jit decides at decoration
# time whether to build interpreted kernels.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

BLOCK = 64
ABS_BLOCK = 256
# Bytes per program: 2048 weights. Small tensors (the interpreter's tests) still cross several
# programs and end in a partial one.
_BLOCK_BYTES = 64 if _INTERPRET else 1024


def is_available() -> bool:
    """True when the kernel can run here: on a CUDA/ROCm GPU, or on the CPU under TRITON_INTERPRET=1."""
    return torch.cuda.is_available() or _INTERPRET


@triton.jit
def _nf4_dequantize(Q, ABSQ, ABS_SCALE, ABS_OFFSET, NF4, DYN, OUT, N,
                    BLOCK: tl.constexpr, ABS_BLOCK: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)  # byte index; int64: n can pass 2**31
    even = 2 * j  # the weight in the high nibble; 2j + 1 in the low one, in the same block (BLOCK is even)
    ok = even < N
    packed = tl.load(Q + j, mask=ok, other=0).to(tl.int32)
    b = even // BLOCK
    code = tl.load(ABSQ + b, mask=ok, other=0).to(tl.int32)
    scale = tl.load(ABS_SCALE + b // ABS_BLOCK, mask=ok, other=0.0)
    absmax = tl.load(DYN + code, mask=ok, other=0.0) * scale
    absmax = absmax + tl.load(ABS_OFFSET)
    w_even = tl.load(NF4 + (packed >> 4), mask=ok, other=0.0) * absmax
    w_odd = tl.load(NF4 + (packed & 0xF), mask=ok, other=0.0) * absmax
    tl.store(OUT + even, w_even.to(OUT.dtype.element_ty), mask=ok)
    tl.store(OUT + even + 1, w_odd.to(OUT.dtype.element_ty), mask=even + 1 < N)


def _device_ctx(t: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dequantize(qweight: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor,
               absmax_offset: torch.Tensor, nf4_code: torch.Tensor, dynamic_map: torch.Tensor,
               shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (shape) float matrix in `dtype` (float32, float16 or bfloat16) held by nf4 buffers (see
    the module docstring). nf4_code: the 16 float32 NF4 values; dynamic_map: the 256 float32 values
    of the 8-bit absmax code; both on the buffers' device."""
    n = math.prod(shape)
    blocks = -(-n // BLOCK)
    expected = ((n + 1) // 2, blocks, -(-blocks // ABS_BLOCK))
    if (qweight.numel(), absmax.numel(), absmax_scale.numel()) != expected or absmax_offset.numel() != 1:
        raise ValueError(f"nf4 buffers of {qweight.numel()} bytes, {absmax.numel()} absmaxes, {absmax_scale.numel()} "
                         f"absmax scales and {absmax_offset.numel()} offsets do not hold a {tuple(shape)} matrix "
                         f"(it needs {expected} and 1)")
    if qweight.dtype != torch.uint8 or absmax.dtype != torch.uint8:
        raise ValueError(f"qweight and absmax must be uint8; got {qweight.dtype} and {absmax.dtype}")
    if absmax_scale.dtype != torch.float32 or absmax_offset.dtype != torch.float32:
        raise ValueError(f"absmax_scale and absmax_offset must be float32; got {absmax_scale.dtype} and "
                         f"{absmax_offset.dtype}")
    if nf4_code.shape != (16,) or dynamic_map.shape != (256,):
        raise ValueError(f"expected 16 NF4 values and 256 dynamic-map values; got {tuple(nf4_code.shape)} and "
                         f"{tuple(dynamic_map.shape)}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16; got {dtype}")
    if qweight.device.type == "cpu" and not _INTERPRET:
        raise RuntimeError("Triton kernels need a GPU; on the CPU set TRITON_INTERPRET=1 before importing triton")
    out = torch.empty(n, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv((n + 1) // 2, _BLOCK_BYTES),)
    with _device_ctx(qweight):
        _nf4_dequantize[grid](qweight.contiguous(), absmax.contiguous(), absmax_scale.contiguous(),
                              absmax_offset.reshape(1), nf4_code.float().contiguous(),
                              dynamic_map.float().contiguous(), out, n,
                              BLOCK=BLOCK, ABS_BLOCK=ABS_BLOCK, BLOCK_BYTES=_BLOCK_BYTES)
    return out.view(*shape)
