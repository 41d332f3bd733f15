"""Weight-only quantization for inference: int8 per output channel, int4 group-wise.

    quantize_(model, "int8")                        # every nn.Linear except the output head
    quantize_(model, "int4", group_size=64)
    save_quantized(model, "runs/quickstart-int4")
    model = llmstack.from_pretrained("runs/quickstart-int4")   # scheme read from the file's metadata

Weights are stored as small integers plus float scales; activations stay in
float, and each layer dequantizes its weight on the fly (on the CPU, int8 goes
through PyTorch's fused int8 x float kernel instead). Decoding reads every
weight once per token, so a weight 4x or 8x smaller in memory is what makes a
GPU decode step faster (the fused kernel in `llmstack.kernels.quant_matmul`).

The schemes (W is (out, in); a row is one output channel):

    "int8"  symmetric, one scale per row:  scale = max|w_row| / 127,
            q = round(w / scale) in [-127, 127],  w ~ q * scale.
            Weight rows of a trained model are centred near zero, so a zero point
            buys nothing, and the kernel applies the scale once per output.
    "int4"  asymmetric, one (scale, zero) per group of `group_size` inputs of a row:
            scale = (max - min) / 15, zero = round(-min / scale),
            q = round(w / scale) + zero in [0, 15],  w ~ (q - zero) * scale.
            Sixteen levels are few: a symmetric grid ([-7, 7] around 0) wastes
            the levels on the side of 0 a skewed group does not reach, while
            min/max uses all 16 over the range the group has: a smaller step,
            hence smaller errors (down to half, for a group on one side of 0).
            min and max are widened to include 0 so
            that the zero point is an integer in [0, 15] (it fits a uint8 and
            the grid still covers the whole group). Two values per byte: input
            2j in the low nibble, 2j+1 in the high one.

Either way every element is within half a step of its original:
|w - dequant(q)| <= scale / 2.

What stays in float: the token embedding, which is a lookup of one row per
token (quantizing it would save memory but no time) and, in a tied model, is
also the output head: the Transformer multiplies by `embed.weight` directly,
and giving it a quantized twin would make the base model know about
quantization. An untied `lm_head` stays float by default as well, since its
errors go straight into the logits, and so do MoE `router`s, whose small
outputs pick experts discretely. Pass `skip=()` to quantize an untied head too.
(In the quickstart model the tied embedding is a third of the parameters, so it
is most of a quantized checkpoint's size.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llmstack import kernels
from llmstack.interop import finish_loading, load_model_config, load_weights, resolve_checkpoint, save_pretrained
from llmstack.kernels import GPU_DTYPES
from llmstack.model import Transformer

SCHEMES = ("int8", "int4")
DEFAULT_SKIP = ("lm_head", "router")
# The fused kernel serves half-precision calls with at most this many rows of x
# (decoding); bigger calls (prefill) are compute-bound and go to dequantize + cuBLAS
# instead, as do float32 ones (see llmstack.kernels.GPU_DTYPES).
KERNEL_MAX_ROWS = 16

# A private aten op (used by gpt-fast on the CPU); checked at import so that a torch
# without it falls back to dequantize + matmul.
_HAS_INT8PACK_MM = hasattr(torch, "_weight_int8pack_mm")

_INT8_MAX = 127
_INT4_LEVELS = 15


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
    w = weight.detach().float().contiguous()  # row-major codes even from a transposed layout (DecodeLinear)
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
    """(qweight uint8 (out, in/2), scale (out, in/group_size) in weight's dtype, zero uint8 like scale):
    asymmetric, group-wise along the inputs."""
    out_features, in_features = weight.shape
    check_group_size(group_size, in_features)
    w = weight.detach().float().contiguous()  # row-major codes even from a transposed layout (DecodeLinear)
    w = w.view(out_features, in_features // group_size, group_size)  # (out, groups, G)
    lo = w.amin(dim=-1).clamp(max=0.0)  # widened to include 0: the zero point is then an integer in [0, 15]
    hi = w.amax(dim=-1).clamp(min=0.0)
    # Round the scale to its storage dtype first, so the zero point and the codes are
    # computed against the scale that dequantization will actually use.
    scale = ((hi - lo) / _INT4_LEVELS).to(weight.dtype).float()
    safe = scale.clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero group: scale 0, codes = zero
    zero = torch.round(-lo / safe).clamp_(0, _INT4_LEVELS)
    q = (torch.round(w / safe[..., None]) + zero[..., None]).clamp_(0, _INT4_LEVELS)
    return pack_int4(q.reshape(out_features, in_features)), scale.to(weight.dtype), zero.to(torch.uint8)


def dequantize_int4(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(out, in) float weight, computed in float32 and rounded to `dtype` (default: scale's)."""
    out_features = qweight.shape[0]
    w = unpack_int4(qweight).reshape(out_features, -1, group_size).float()  # (out, groups, G)
    w.sub_(zero.float()[..., None]).mul_(scale.float()[..., None])  # in place: one float copy of W, not three
    return w.reshape(out_features, -1).to(dtype or scale.dtype)


# ---------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """A Linear layer whose weight is stored quantized ("int8" or "int4", see the module docstring).

    Buffers (what the checkpoint holds): `qweight`, `scale`, `zero` (int4 only),
    `bias` (when the layer has one). `model.to(dtype)` converts scale and bias and
    leaves the integer codes alone.
    """

    def __init__(self, in_features: int, out_features: int, *, scheme: str, group_size: Optional[int] = None,
                 bias: bool = False, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = check_scheme(scheme)
        self.group_size = group_size if scheme == "int4" else None
        if scheme == "int8":
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
            self.zero = None
        else:
            check_group_size(group_size, in_features)
            groups = in_features // group_size
            self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scale", torch.empty(out_features, groups, dtype=dtype, device=device))
            self.register_buffer("zero", torch.empty(out_features, groups, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: Optional[int] = None) -> "QuantizedLinear":
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, scheme=scheme, group_size=group_size,
                     bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        if scheme == "int8":
            module.qweight, module.scale = quantize_int8(w)
        else:
            module.qweight, module.scale, module.zero = quantize_int4(w, group_size)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float weight (out, in) this layer multiplies by."""
        if self.scheme == "int8":
            return dequantize_int8(self.qweight, self.scale, dtype)
        return dequantize_int4(self.qweight, self.scale, self.zero, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.is_cuda and x.dtype in GPU_DTYPES and x.numel() <= KERNEL_MAX_ROWS * self.in_features
                and _kernel_available()):
            from llmstack.kernels import quant_matmul

            if self.scheme == "int8":
                y = quant_matmul.int8_matmul(x, self.qweight, self.scale)
            else:
                y = quant_matmul.int4_matmul(x, self.qweight, self.scale, self.zero, self.group_size)
        elif self.scheme == "int8" and x.device.type == "cpu" and _HAS_INT8PACK_MM:
            # PyTorch's fused CPU kernel for exactly this layout (int8 rows, one scale each):
            # no float copy of the weight per call, the copy that made decoding several
            # times slower than float in scripts/bench_quantize.py.
            x2 = x.reshape(-1, self.in_features).contiguous()
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scale.to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
        elif self.scheme == "int8" and x.dtype != torch.float16:
            # Scale the outputs, not the weight: (x @ q^T) * scale is the same product with
            # one multiply per output instead of one per weight. Not in float16, where
            # x @ q^T (|q| up to 127) can overflow before the scale brings it back.
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{group}, "
                f"bias={self.bias is not None}")


def _kernel_available() -> bool:
    return kernels.available("quant_matmul")


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
def quantize_(model: nn.Module, scheme: str, *, group_size: int = 64,
              skip: Sequence[str] = DEFAULT_SKIP) -> nn.Module:
    """Replace, in place, each nn.Linear of `model` by a QuantizedLinear; returns `model`.

    scheme: "int8" (per output channel; group_size is ignored) or "int4" (group-wise,
    group_size an even divisor of every quantized layer's in_features).
    skip: module names left in float, matched against the full name ("layers.0.mlp.down_proj")
    or its last component ("lm_head"). The embedding is never quantized (see the module docstring).
    """
    check_scheme(scheme)
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("model is already quantized; quantize a float model")
    targets = _linears_to_quantize(model, skip)
    if scheme == "int4":  # check every layer before touching any, so an error leaves the model as it was
        for name, linear in targets:
            check_group_size(group_size, linear.in_features, name)
    for name, linear in targets:
        _replace(model, name, QuantizedLinear.from_linear(linear, scheme, group_size))
    return model


def quantization_of(model: nn.Module) -> Optional[dict]:
    """{"scheme", "group_size"} of a quantized model (None for a float one)."""
    found = {(m.scheme, m.group_size) for m in model.modules() if isinstance(m, QuantizedLinear)}
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"model mixes quantization settings {sorted(found, key=str)}; one per checkpoint")
    scheme, group_size = found.pop()
    return {"scheme": scheme, "group_size": group_size}


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------
# The scheme lives in the safetensors metadata ("quantization", and for int4
# "quantization_group_size"), never in a file name. Which layers are quantized is
# read from the tensors themselves: a layer saved with a `qweight` is rebuilt as a
# QuantizedLinear, so a checkpoint reloads with exactly the structure it was saved with.


def save_quantized(model: nn.Module, directory: str | os.PathLike, *, extra_config: Optional[dict] = None) -> None:
    """Write a quantized model as an llmstack checkpoint (config.yaml + model.safetensors).

    extra_config: further top-level sections for config.yaml (e.g. the training job's
    tokenizer/data sections, so that scripts reading the job config work on it)."""
    info = quantization_of(model)
    if info is None:
        raise ValueError("model is not quantized: call quantize_(model, scheme) first, or use save_pretrained")
    metadata = {"quantization": info["scheme"]}
    if info["group_size"] is not None:
        metadata["quantization_group_size"] = str(info["group_size"])
    save_pretrained(model, directory, metadata=metadata, extra_config=extra_config)


def load_quantized(directory: str | os.PathLike, *, device: torch.device | str | None = None,
                   dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load a checkpoint written by save_quantized (llmstack.from_pretrained calls this when the
    metadata names a scheme). Returns the model in eval mode."""
    directory = resolve_checkpoint(directory)
    state, metadata = load_weights(directory)
    scheme = metadata.get("quantization")
    if scheme not in SCHEMES:
        raise ValueError(f"{Path(directory)} names quantization scheme {scheme!r} in its metadata; this version of "
                         f"llmstack knows {', '.join(map(repr, SCHEMES))}")
    group_size = None
    if scheme == "int4":
        try:
            group_size = int(metadata["quantization_group_size"])
        except (KeyError, ValueError):
            raise ValueError(f"{Path(directory)}: int4 checkpoint without a valid quantization_group_size in its "
                             f"metadata") from None
    with torch.device("meta"):  # no memory, no init work: every tensor comes from the file
        model = Transformer(load_model_config(directory))
        for name, linear in _linears_to_quantize(model, skip=()):
            if f"{name}.qweight" in state:
                dtype_of = state[f"{name}.scale"].dtype
                _replace(model, name, QuantizedLinear(linear.in_features, linear.out_features, scheme=scheme,
                                                      group_size=group_size, bias=linear.bias is not None,
                                                      dtype=dtype_of))
    model.to_empty(device="cpu")
    return finish_loading(model, state, device=device, dtype=dtype)
