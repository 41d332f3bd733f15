"""Weight-only quantization: int8 per output channel, int4 group-wise, NF4 for QLoRA.

    quantize_(model, "int8")                         # every Linear, the embedding and head (routers stay float)
    quantize_(model, "int4", group_size=32)          # int4 layers, int8 embedding and head
    save_quantized(model, "runs/quickstart-int4")
    model = llmstack.from_pretrained("runs/quickstart-int4")   # scheme read from the file's metadata
    quantize_(model, "nf4"); apply_lora(model, ...)  # QLoRA: a frozen 4-bit base under float adapters

Weights are stored as small integers plus float scales; decoding reads every weight
once per token, so a weight 4x or 8x smaller in memory is what makes a memory-bound
decode step faster. The schemes (W is (out, in); a row is one output channel):

    "int8"  symmetric, one scale per row:  scale = max|w_row| / 127,
            q = round(w / scale) in [-127, 127],  w ~ q * scale.
            Weight rows of a trained model are centred near zero, so a zero point
            buys nothing, and the scale applies once per output.
    "int4"  one (scale, offset) per group of `group_size` inputs of a row (GGUF's Q4_1):
            scale = (max - min) / 15, offset = min,
            q = round((w - offset) / scale) in [0, 15],  w ~ q * scale + offset.
            Sixteen levels are few: spread over the range the group has (not around
            0), they give the smallest step. scale and offset are stored in float16,
            as GGUF stores them: a Q4_1 file's weights re-quantize to the same grid.
            Two values per byte: input 2j in the low nibble, 2j + 1 in the high one.

    "nf4"   QLoRA's NormalFloat4, as bitsandbytes stores it (see `quantize_nf4`): the matrix
            flattened row-major in blocks of 64, each block's absmax, w / absmax rounded to the
            nearest of 16 fixed values (quantiles of a normal distribution), and the absmaxes
            themselves "double quantized" to 8 bits in blocks of 256. About 4.13 bits per weight.

int8 and int4: every element is within half a step of its original: |w - dequant(q)| <= scale / 2.

Where the products run:
- CUDA, float16/bfloat16, a few rows (decoding): the fused Triton dequantize-matmul
  (`llmstack.kernels.quant_matmul`); more rows (prefill): dequantize, then cuBLAS.
- CPU, int8, float32: integer arithmetic (`int8_matmul_cpu`): x in two int8 parts per row,
  times the int8 codes through torch._int_mm (exact int32 sums), scaled per row and per
  output, with the weight-only int8 result; for weights of 2^18 elements and up, where it
  beats dequantizing (`integer_product_pays`, measured per shape and row count). On a 2-core
  x86 CPU (torch 2.13) SmolLM2-135M decodes 1.3-1.5x and prefills 512 tokens 1.4x faster
  than in float32; smaller weights are dequantized. The fused int8 x float kernel torch offers
  (`_weight_int8pack_mm`) costs 4-30x float32 there, and plain dynamic activation
  quantization (one int8 part) costs SmolLM2-135M 4% perplexity.
- CPU, int4, and other dtypes: dequantize, then the float matmul.
- nf4, everywhere: dequantize (on CUDA with the Triton kernel `llmstack.kernels.nf4`), then the
  float matmul, in an autograd.Function that dequantizes again for the gradient to x instead of
  keeping a float copy of W between forward and backward: the base is frozen, but adapters below it
  need that gradient.

The embedding and the output head are quantized too, int8 by default whatever the layers'
scheme (`embedding=`): a lookup dequantizes only the rows it reads; a tied output head
(`tie_embeddings`) becomes a `TiedQuantizedHead` that multiplies by the quantized
embedding's own buffers, so the matrix is stored once. With nf4 they stay float by default, as
QLoRA keeps them: the head's gradient must reach the layers below (the CPU int8 product has none),
and nf4 serves linear layers only. MoE `router`s stay float (their small outputs pick experts
discretely); `skip` names more.
"""
from __future__ import annotations

import os
from pathlib import Path
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llmstack import kernels
from llmstack.interop import finish_loading, load_model_config, load_weights, resolve_checkpoint, save_pretrained
from llmstack.kernels import GPU_DTYPES
from llmstack.model import Transformer

SCHEMES = ("int8", "int4", "nf4")
DEFAULT_GROUP_SIZE = 32
DEFAULT_SKIP = ("router",)
# The fused kernel serves half-precision calls with at most this many rows of x
# (decoding); bigger calls (prefill) are compute-bound and go to dequantize + cuBLAS
# instead, as do float32 ones (see llmstack.kernels.GPU_DTYPES).
KERNEL_MAX_ROWS = 16

_INT8_MAX = 127
_INT4_LEVELS = 15

# NF4: blocks of 64 weights share an absmax; blocks of 256 absmaxes share an 8-bit scale
# (bitsandbytes' defaults for QLoRA, and the only ones its 4-bit matmul takes).
NF4_BLOCK = 64
NF4_ABSMAX_BLOCK = 256
# The NormalFloat4 code book: the values of the QLoRA paper (Dettmers et al. 2023, appendix E),
# copied from bitsandbytes (`get_4bit_type("nf4")` in bitsandbytes/functional.py, the same list as
# `_NF4_QUANT_TABLE` in bitsandbytes/backends/utils.py). Asymmetric: 7 negative values, 0, and 8
# positive ones, so that 0 is exact and both -1 and 1 exist. Code i is the i-th value.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (`create_dynamic_map()`, 256 sorted float32 values
    in [-1, 1]), which double quantization stores the absmaxes in: for each exponent 10^-6 .. 10^0,
    2^i evenly spaced fractions in (0.1, 1) of both signs, plus 0 and 1. Built as bitsandbytes
    builds it (float32 linspace and means), so the values are bit-identical."""
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """The float32 NF4 code book ("nf4") or dynamic map ("dynamic") on `device`, made once."""
    key = (name, torch.device(device))
    if key not in _TABLES:
        table = torch.tensor(NF4_CODE, dtype=torch.float32) if name == "nf4" else dynamic_map()
        _TABLES[key] = table.to(device)
    return _TABLES[key]


# ---------------------------------------------------------------------------
# Quantize / dequantize / pack
# ---------------------------------------------------------------------------


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; allowed: {', '.join(map(repr, SCHEMES))}")
    return scheme


def check_group_size(group_size: int, in_features: int, name: str = "weight") -> None:
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2 or in_features % group_size:
        raise ValueError(f"group_size={group_size!r} must be an even number that divides in_features={in_features} "
                         f"of {name}")


@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight int8 (out, in), scale (out,) in weight's dtype): symmetric, per output channel."""
    w = weight.detach().float().contiguous()
    scale = (w.abs().amax(dim=1) / _INT8_MAX).to(weight.dtype).float()  # (out,), rounded as it will be stored
    q = torch.round(w / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-_INT8_MAX, _INT8_MAX)
    return q.to(torch.int8), scale.to(weight.dtype)


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(out, in) float weight, computed in float32 and rounded to `dtype` (default: scale's)."""
    return (qweight.float() * scale.float()[:, None]).to(dtype or scale.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., 2n) values in [0, 15] -> (..., n) uint8: element 2j in the low nibble, 2j+1 in the high one."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: (..., n) uint8 -> (..., 2n) uint8 in [0, 15]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight uint8 (out, in/2), scale and offset float16 (out, in/group_size)): group-wise along the inputs."""
    out_features, in_features = weight.shape
    check_group_size(group_size, in_features)
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)  # (out, groups, G)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    # Stored in float16, rounded so that the grid still spans the group (offset down, scale up when
    # rounding to nearest falls short): every weight stays within half a step. Values already on a
    # float16 grid (a GGUF Q4_1 file's) keep exactly their scale and offset.
    offset = _round_half(lo, lo, direction=-1)
    scale = _round_half((hi - offset.float()) / _INT4_LEVELS, hi, direction=1,
                        covers=lambda s: offset.float() + _INT4_LEVELS * s.float())
    safe = scale.float().clamp_min(torch.finfo(torch.float16).tiny)  # a constant group: scale 0, every code 0
    q = torch.round((w - offset.float()[..., None]) / safe[..., None]).clamp_(0, _INT4_LEVELS)
    return pack_int4(q.reshape(out_features, in_features)), scale, offset


def _round_half(value: torch.Tensor, bound: torch.Tensor, direction: int, covers=lambda v: v.float()) -> torch.Tensor:
    """`value` rounded to float16, moved one float16 step in `direction` (-1 down, +1 up) where the
    rounded value no longer covers `bound` (covers(rounded) <= bound for down, >= bound for up)."""
    rounded = value.half()
    short = covers(rounded) > bound if direction < 0 else covers(rounded) < bound
    step = torch.nextafter(rounded, torch.full_like(rounded, direction * float("inf")))
    return torch.where(short, step, rounded)


def dequantize_int4(qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(rows, in) float weight, computed in float32 and rounded to `dtype` (default float32)."""
    rows = qweight.shape[0]
    w = unpack_int4(qweight).reshape(rows, -1, group_size).float()  # (rows, groups, G)
    w.mul_(scale.float()[..., None]).add_(offset.float()[..., None])  # in place: one float copy of W, not three
    return w.reshape(rows, -1).to(dtype or torch.float32)


def nf4_sizes(numel: int) -> tuple[int, int, int]:
    """(bytes of codes, absmax blocks, absmax groups) of an nf4 matrix of `numel` weights."""
    blocks = -(-numel // NF4_BLOCK)
    return (numel + 1) // 2, blocks, -(-blocks // NF4_ABSMAX_BLOCK)


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the value of the sorted `code` nearest to each x (a tie goes to the lower one, as
    bitsandbytes' argmin does), as uint8."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x, midpoints).to(torch.uint8)


def _blockwise(x: torch.Tensor, block: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' block-wise quantization of a flat float32 x: (codes uint8 like x, absmax
    float32 per block). The last block may be shorter; an all-zero block gets absmax 0, codes of 0."""
    n = x.numel()
    blocks = F.pad(x, (0, -n % block)).view(-1, block)  # zero padding leaves every absmax as it was
    absmax = blocks.abs().amax(dim=1)
    # x * (1 / absmax), not x / absmax: bitsandbytes multiplies by the reciprocal (one rounding more).
    inverse = torch.where(absmax > 0, 1 / absmax, torch.zeros_like(absmax))
    normalized = (blocks * inverse[:, None]).clamp_(-1, 1).flatten()[:n]
    return _nearest(normalized, code), absmax


def pack_nf4(codes: torch.Tensor) -> torch.Tensor:
    """Flat codes in [0, 15] -> uint8, bitsandbytes' order: element 2j in the HIGH nibble of byte j,
    2j + 1 in the low one (the reverse of pack_int4); an odd count ends with a zero nibble."""
    codes = F.pad(codes.to(torch.uint8), (0, codes.numel() % 2))
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nf4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of pack_nf4: the first `numel` codes, uint8."""
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).flatten()[:numel]


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NF4 with double quantization, as bitsandbytes' quantize_4bit(blocksize=64, quant_type="nf4",
    compress_statistics=True) computes it. Any shape and size:

        w flattened row-major, in blocks of 64 (the last one may be shorter)
        absmax_b = max |w| over block b                           (float32)
        code     = nearest NF4 value to w * (1 / absmax_b)         (4 bits, two per byte)
        absmax_offset = mean of the absmaxes                       (float32 scalar)
        absmax_b - absmax_offset, in blocks of 256, block-wise 8-bit in the dynamic map:
        absmax (uint8 per block) and absmax_scale (float32 per 256 blocks)

    Codes are chosen against the exact absmax; dequantization uses the 8-bit one (`dequantize_nf4`).
    Returns (qweight uint8 (ceil(n/2),), absmax uint8 (blocks,), absmax_scale float32 (groups,),
    absmax_offset float32 ())."""
    w = weight.detach().float().flatten()
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty weight to nf4")
    codes, absmax = _blockwise(w, NF4_BLOCK, _table("nf4", w.device))
    offset = absmax.mean()
    qabsmax, absmax_scale = _blockwise(absmax - offset, NF4_ABSMAX_BLOCK, _table("dynamic", w.device))
    return pack_nf4(codes), qabsmax, absmax_scale, offset


def nf4_absmax(absmax: torch.Tensor, absmax_scale: torch.Tensor, absmax_offset: torch.Tensor) -> torch.Tensor:
    """The absmax of each block back from its double quantization, float32 (blocks,):
    dynamic[absmax] * absmax_scale[block // 256] + absmax_offset (a product, then a sum: the Triton
    kernel rounds the same way)."""
    scale = absmax_scale.float().repeat_interleave(NF4_ABSMAX_BLOCK)[: absmax.numel()]
    return _table("dynamic", absmax.device)[absmax.long()] * scale + absmax_offset.float()


def dequantize_nf4(qweight: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor,
                   absmax_offset: torch.Tensor, shape: Sequence[int], dtype: Optional[torch.dtype] = None
                   ) -> torch.Tensor:
    """The float matrix of `shape`: NF4[code] * absmax of its block, computed in float32 and
    rounded to `dtype` (default float32)."""
    numel = math.prod(shape)
    if nf4_sizes(numel) != (qweight.numel(), absmax.numel(), absmax_scale.numel()):
        raise ValueError(f"nf4 buffers of {qweight.numel()} bytes, {absmax.numel()} absmaxes and "
                         f"{absmax_scale.numel()} absmax scales do not hold a {tuple(shape)} matrix "
                         f"(it needs {nf4_sizes(numel)})")
    block_absmax = nf4_absmax(absmax, absmax_scale, absmax_offset)
    values = _table("nf4", qweight.device)[unpack_nf4(qweight, numel).long()]
    w = F.pad(values, (0, -numel % NF4_BLOCK)).view(-1, NF4_BLOCK) * block_absmax[:, None]
    return w.flatten()[:numel].view(*shape).to(dtype or torch.float32)


# ---------------------------------------------------------------------------
# The product
# ---------------------------------------------------------------------------


# When int8_matmul_cpu beats dequantizing (measured per shape on a 2-core x86 CPU, torch 2.13, 1 and
# 2 threads, 1-256 rows): its fixed cost, about 60 us for quantizing x, pays off from weights of
# 2^18 elements up (576 x 576: 0.7-0.95x the dequantized matmul's time; 1536 x 576: 0.35-0.6x;
# 49152 x 576: 0.03-0.7x), and not below (192 x 512: 1.1-1.6x). With a short inner dimension
# (192) the integer product of many rows loses (4096 x 192 at 256 rows: 2.6x) while a few rows win
# (0.04-0.08x).
INT_PRODUCT_MIN_WEIGHTS = 1 << 18
INT_PRODUCT_SHORT_INPUT = 512
INT_PRODUCT_SHORT_INPUT_MAX_ROWS = 16


def integer_product_pays(rows: int, out_features: int, in_features: int) -> bool:
    """Whether `int8_matmul_cpu` is the faster eager CPU product for `rows` rows of x by this weight
    (a compiled step takes it for every weight: the quantization of x fuses into few kernels)."""
    if out_features * in_features < INT_PRODUCT_MIN_WEIGHTS:
        return False
    return in_features >= INT_PRODUCT_SHORT_INPUT or rows <= INT_PRODUCT_SHORT_INPUT_MAX_ROWS


def int8_matmul_cpu(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., in) float32 @ (qweight * scale[:, None])^T on the CPU, in integer arithmetic.

    torch._int_mm multiplies int8 by int8 into exact int32 sums, several times faster per
    weight than float32 reads it. x is written in two int8 parts, per row: x = s q1 + r with
    s = max|x_row| / 127 and q1 = round(x / s), then the remainder (|r| <= s/2) on a grid 254
    times finer, q2 = round(r / (s/254)). Both go through one _int_mm (2 rows per input row),
    and x is represented to within max|x_row| / 64516: as the weights are int8, the product
    is the weight-only int8 product up to float rounding (the perplexity of SmolLM2-135M moves
    by under 0.01%), where one int8 part alone (plain dynamic activation quantization) costs
    it about 4%."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    rows = x.shape[0]
    s = x.abs().amax(dim=1, keepdim=True).div_(_INT8_MAX).clamp_min_(torch.finfo(torch.float32).tiny)
    q1 = torch.round(x / s)
    fine = s / (2 * _INT8_MAX)
    q2 = torch.round((x - q1 * s).div_(fine)).clamp_(-_INT8_MAX, _INT8_MAX)
    y = torch._int_mm(torch.cat((q1, q2)).to(torch.int8), qweight.t()).float()
    out = torch.addcmul(y[:rows].mul_(s), y[rows:], fine).mul_(scale.float())
    return out.reshape(*shape[:-1], -1)


class _DequantizedLinear(torch.autograd.Function):
    """x @ W^T for a quantized W that has no gradient: W is dequantized in forward and again in
    backward (for the gradient to x), so no float copy of it lives from one to the other. With
    F.linear on the dequantized W, autograd would keep that copy of every layer for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "_QuantizedWeight") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return grad_y @ ctx.layer.dequantize(grad_y.dtype), None


class _QuantizedWeight(nn.Module):
    """What a quantized layer and a quantized embedding share: the buffers of one quantized
    (rows, in) matrix, `qweight`, `scale` and (int4) `offset`, or (nf4) `qweight`, `absmax`,
    `absmax_scale` and `absmax_offset`; its product with x. `dtype` is the float dtype the matrix
    had (and follows model.to(dtype)): what `dequantize()` and adapters on the layer use."""

    # Buffers that keep their dtype through model.to(dtype), and the integer type of their size
    # that carries them past it: int4's float16 Q4_1 grid, nf4's float32 double-quantization state.
    _FIXED = {"int4": (("scale", "offset"), torch.int16), "nf4": (("absmax_scale", "absmax_offset"), torch.int32)}

    def __init__(self, rows: int, in_features: int, *, scheme: str, group_size: Optional[int], device,
                 dtype: torch.dtype):
        super().__init__()
        self.in_features, self.scheme, self.dtype = in_features, check_scheme(scheme), dtype
        self.weight_shape = (rows, in_features)
        self.group_size = group_size if scheme == "int4" else None
        if scheme == "nf4":
            nbytes, blocks, groups = nf4_sizes(rows * in_features)
            self.register_buffer("qweight", torch.empty(nbytes, dtype=torch.uint8, device=device))
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scale", torch.empty(groups, dtype=torch.float32, device=device))
            self.register_buffer("absmax_offset", torch.empty((), dtype=torch.float32, device=device))
            self.scale = self.offset = None
        elif scheme == "int8":
            self.register_buffer("qweight", torch.empty(rows, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(rows, dtype=dtype, device=device))
            self.offset = None
        else:
            check_group_size(group_size, in_features)
            groups = in_features // group_size
            self.register_buffer("qweight", torch.empty(rows, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scale", torch.empty(rows, groups, dtype=torch.float16, device=device))
            self.register_buffer("offset", torch.empty(rows, groups, dtype=torch.float16, device=device))

    def _apply(self, fn, recurse=True):
        # int4 scales and offsets stay float16 through model.to(dtype): they are the Q4_1 grid, which
        # bfloat16 would round; nf4's double-quantization state stays float32 as bitsandbytes keeps it.
        # Seen as integer bits, a dtype conversion passes them by; a move does not.
        fixed, bits = self._FIXED.get(self.scheme, ((), None))
        dtypes = {name: self._buffers[name].dtype for name in fixed}
        for name in fixed:
            self._buffers[name] = self._buffers[name].view(bits)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # follows .to(dtype) like the model's floats
        try:
            return super()._apply(fn, recurse)
        finally:
            for name in fixed:
                self._buffers[name] = self._buffers[name].view(dtypes[name])

    def quantize_from(self, weight: torch.Tensor) -> None:
        if self.scheme == "nf4":
            self.qweight, self.absmax, self.absmax_scale, self.absmax_offset = quantize_nf4(weight)
        elif self.scheme == "int8":
            self.qweight, self.scale = quantize_int8(weight)
        else:
            self.qweight, self.scale, self.offset = quantize_int4(weight, self.group_size)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float matrix (rows, in) these buffers hold."""
        if self.scheme == "nf4":
            if self.qweight.is_cuda and kernels.available("nf4"):
                from llmstack.kernels import nf4

                return nf4.dequantize(self.qweight, self.absmax, self.absmax_scale, self.absmax_offset,
                                      _table("nf4", self.qweight.device), _table("dynamic", self.qweight.device),
                                      self.weight_shape, dtype or torch.float32)
            return dequantize_nf4(self.qweight, self.absmax, self.absmax_scale, self.absmax_offset,
                                  self.weight_shape, dtype)
        if self.scheme == "int8":
            return dequantize_int8(self.qweight, self.scale, dtype)
        return dequantize_int4(self.qweight, self.scale, self.offset, self.group_size, dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` (any shape) of the float matrix: (..., in)."""
        if self.scheme == "int8":
            return self.qweight[ids].to(dtype) * self.scale[ids, None].to(dtype)
        q = unpack_int4(self.qweight[ids]).unflatten(-1, (-1, self.group_size)).float()  # (..., groups, G)
        return (q * self.scale[ids, :, None].float() + self.offset[ids, :, None].float()).flatten(-2).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) @ W^T -> (..., rows), in x's dtype."""
        if self.scheme == "nf4":
            return _DequantizedLinear.apply(x, self)
        if x.is_cuda and x.dtype in GPU_DTYPES and x.numel() <= KERNEL_MAX_ROWS * self.in_features \
                and kernels.available("quant_matmul"):
            from llmstack.kernels import quant_matmul

            if self.scheme == "int8":
                return quant_matmul.int8_matmul(x, self.qweight, self.scale)
            return quant_matmul.int4_matmul(x, self.qweight, self.scale, self.offset, self.group_size)
        if self.scheme == "int8" and x.device.type == "cpu" and x.dtype == torch.float32 \
                and (torch.compiler.is_compiling()  # compiled, quantizing x fuses away: its fixed cost is gone
                     or integer_product_pays(x.numel() // self.in_features, *self.qweight.shape)):
            return int8_matmul_cpu(x, self.qweight, self.scale)
        return F.linear(x, self.dequantize(x.dtype))


class QuantizedLinear(_QuantizedWeight):
    """A Linear layer whose weight is stored quantized ("int8", "int4" or "nf4", see the module
    docstring). Buffers (what the checkpoint holds): `qweight`, `scale`, `offset` (int4 only), or
    nf4's `qweight`, `absmax`, `absmax_scale`, `absmax_offset`; `bias` (when the layer has one).
    `model.to(dtype)` converts the int8 scales and the bias and leaves the integer codes, the
    float16 int4 scales and the float32 nf4 state alone."""

    def __init__(self, in_features: int, out_features: int, *, scheme: str, group_size: Optional[int] = None,
                 bias: bool = False, device=None, dtype: torch.dtype = torch.float32):
        super().__init__(out_features, in_features, scheme=scheme, group_size=group_size, device=device, dtype=dtype)
        self.out_features = out_features
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: Optional[int] = None) -> "QuantizedLinear":
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, scheme=scheme, group_size=group_size,
                     bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        module.quantize_from(w)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{group}, "
                f"bias={self.bias is not None}")


class QuantizedEmbedding(_QuantizedWeight):
    """A token embedding stored quantized: a lookup dequantizes the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, scheme: str, group_size: Optional[int] = None,
                 device=None, dtype: torch.dtype = torch.float32):
        if scheme == "nf4":
            raise ValueError("nf4 is for linear layers; quantize the embedding and head with 'int8' or 'int4', "
                             "or keep them float (embedding=None)")
        super().__init__(num_embeddings, embedding_dim, scheme=scheme, group_size=group_size, device=device,
                         dtype=dtype)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, scheme: str, group_size: Optional[int] = None):
        w = embedding.weight
        module = cls(w.shape[0], w.shape[1], scheme=scheme, group_size=group_size, device=w.device, dtype=w.dtype)
        module.quantize_from(w)
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.rows(input_ids, self.dtype)  # (..., dim)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme}{group}"


class TiedQuantizedHead(nn.Module):
    """The output head of a tied model whose embedding is quantized: logits = x @ E^T with the
    embedding's own quantized buffers. It holds the embedding without registering it, so the
    state dict (and the file) holds the matrix once."""

    def __init__(self, embedding: QuantizedEmbedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: no second copy in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.matmul(x)

    def extra_repr(self) -> str:
        return "tied to the quantized embedding"


# ---------------------------------------------------------------------------
# Applying it to a model
# ---------------------------------------------------------------------------


def _linears_to_quantize(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """(name, module) of each nn.Linear not named in `skip` (by full name or last component)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name not in skip and name.rsplit(".", 1)[-1] not in skip]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def quantize_(model: nn.Module, scheme: str, *, group_size: int = DEFAULT_GROUP_SIZE,
              skip: Sequence[str] = DEFAULT_SKIP, embedding: Optional[str] = "default") -> nn.Module:
    """Replace, in place, each nn.Linear of `model` by a QuantizedLinear, and its token embedding
    by a QuantizedEmbedding (a tied head by a TiedQuantizedHead); returns `model`.

    scheme: "int8" (per output channel; group_size is ignored), "int4" (group-wise, group_size
    an even divisor of every quantized layer's in_features) or "nf4" (QLoRA's: blocks of 64 over the
    flattened matrix, any size; group_size is ignored), for the linear layers.
    embedding: the scheme of the embedding and the output head (tied or not, "int8" or "int4"), or
    None to keep them float. "default": int8 for int8 and int4 layers (every logit goes through
    the head, and on SmolLM2-135M int4 there costs +6.5% perplexity where int8 costs +0.3%,
    docs/performance.md); float for nf4, as QLoRA keeps them (training needs the head's gradient,
    which the CPU int8 product does not give).
    skip: module names left in float, matched against the full name ("layers.0.mlp.down_proj")
    or its last component ("lm_head").
    """
    check_scheme(scheme)
    if embedding == "default":
        embedding = None if scheme == "nf4" else "int8"
    if embedding == "nf4":
        raise ValueError("embedding='nf4': nf4 is for linear layers; quantize the embedding and head with "
                         "'int8' or 'int4', or keep them float (embedding=None)")
    if embedding is not None:
        check_scheme(embedding)
    if any(isinstance(m, _QuantizedWeight) for m in model.modules()):
        raise ValueError("model is already quantized; quantize a float model")
    targets = [(name, m, embedding if name == "lm_head" else scheme) for name, m in _linears_to_quantize(model, skip)]
    targets = [t for t in targets if t[2] is not None]
    embed = getattr(model, "embed", None)
    if embedding is not None and "embed" not in skip and isinstance(embed, nn.Embedding):
        targets.append(("embed", embed, embedding))
    for name, module, kind in targets:  # check every layer before touching any: an error leaves the model as it was
        if kind == "int4":
            check_group_size(group_size, module.weight.shape[1], name)
    for name, module, kind in targets:
        if name == "embed":
            model.embed = QuantizedEmbedding.from_embedding(module, kind, group_size)
            if getattr(model, "lm_head", "untied") is None:  # tied: the head multiplies by the embedding
                model.lm_head = TiedQuantizedHead(model.embed)
        else:
            _replace(model, name, QuantizedLinear.from_linear(module, kind, group_size))
    return model


def quantization_of(model: nn.Module) -> Optional[dict]:
    """{"scheme", "group_size", "embedding"} of a quantized model (None for a float one): the scheme
    of its linear layers, the group size of its int4 matrices (else None), and the scheme of the
    embedding and output head (None when they are float)."""
    head = getattr(model, "lm_head", None)
    quantized = [m for m in model.modules() if isinstance(m, _QuantizedWeight)]
    if not quantized:
        return None
    outer = [m for m in quantized if isinstance(m, QuantizedEmbedding) or m is head]
    layers = {m.scheme for m in quantized if not any(m is o for o in outer)}
    embeds = {m.scheme for m in outer}
    groups = {m.group_size for m in quantized if m.group_size is not None}
    if len(layers) > 1 or len(embeds) > 1 or len(groups) > 1:
        raise ValueError(f"model mixes quantization settings (layers {sorted(layers)}, embedding and head "
                         f"{sorted(embeds)}, group sizes {sorted(groups)}); one of each per checkpoint")
    return {"scheme": layers.pop() if layers else None, "group_size": groups.pop() if groups else None,
            "embedding": embeds.pop() if embeds else None}


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------
# The scheme lives in the safetensors metadata ("quantization" for the linear layers,
# "quantization_embedding" when the embedding is quantized, "quantization_group_size" for
# int4), never in a file name. Which layers are quantized is
# read from the tensors themselves: a layer saved with a `qweight` is rebuilt quantized,
# so a checkpoint reloads with exactly the structure it was saved with.


def save_quantized(model: nn.Module, directory: str | os.PathLike, *, extra_config: Optional[dict] = None) -> None:
    """Write a quantized model as an llmstack checkpoint (config.yaml + model.safetensors).

    extra_config: further top-level sections for config.yaml (e.g. the training job's
    tokenizer/data sections, so that scripts reading the job config work on it)."""
    info = quantization_of(model)
    if info is None:
        raise ValueError("model is not quantized: call quantize_(model, scheme) first, or use save_pretrained")
    metadata = {"quantization": info["scheme"] or "none"}
    if info["group_size"] is not None:
        metadata["quantization_group_size"] = str(info["group_size"])
    if info["embedding"] is not None:
        metadata["quantization_embedding"] = info["embedding"]
    save_pretrained(model, directory, metadata=metadata, extra_config=extra_config)


def load_quantized(directory: str | os.PathLike, *, device: torch.device | str | None = None,
                   dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load a checkpoint written by save_quantized (llmstack.from_pretrained calls this when the
    metadata names a scheme). Returns the model in eval mode."""
    directory = resolve_checkpoint(directory)
    state, metadata = load_weights(directory)
    scheme, embedding = metadata.get("quantization"), metadata.get("quantization_embedding")
    if scheme not in (*SCHEMES, "none") or embedding not in (*SCHEMES, None) or embedding == "nf4":
        raise ValueError(f"{Path(directory)} names quantization scheme {scheme!r} (embedding {embedding!r}) in its "
                         f"metadata; this version of llmstack knows {', '.join(map(repr, SCHEMES))}")
    group_size = None
    if "int4" in (scheme, embedding):
        try:
            group_size = int(metadata["quantization_group_size"])
        except (KeyError, ValueError):
            raise ValueError(f"{Path(directory)}: int4 checkpoint without a valid quantization_group_size in its "
                             f"metadata") from None
        if any(name.endswith(".zero") for name in state):
            raise ValueError(f"{Path(directory)} holds int4 weights with integer zero points, written by an earlier "
                             f"version; quantize the float checkpoint again")
    dtype_of_floats = state["norm.weight"].dtype  # the model's float dtype (the final norm is never quantized)

    def scheme_of(name: str) -> str:  # nf4 has absmaxes; int8 codes are int8, int4 ones two per uint8
        if f"{name}.absmax" in state:
            return "nf4"
        return "int8" if state[f"{name}.qweight"].dtype == torch.int8 else "int4"

    with torch.device("meta"):  # no memory, no init work: every tensor comes from the file
        model = Transformer(load_model_config(directory))
        for name, linear in _linears_to_quantize(model, skip=()):
            if f"{name}.qweight" in state:
                _replace(model, name, QuantizedLinear(linear.in_features, linear.out_features, scheme=scheme_of(name),
                                                      group_size=group_size, bias=linear.bias is not None,
                                                      dtype=dtype_of_floats))
        if "embed.qweight" in state:
            model.embed = QuantizedEmbedding(model.config.vocab_size, model.config.dim, scheme=scheme_of("embed"),
                                             group_size=group_size, dtype=dtype_of_floats)
            if model.lm_head is None:
                model.lm_head = TiedQuantizedHead(model.embed)
    model.to_empty(device="cpu")
    return finish_loading(model, state, device=device, dtype=dtype)
