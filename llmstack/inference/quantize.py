"""Weight-only quantization for inference: int8 per output channel, int4 group-wise.

    quantize_(model, "int8")                         # every Linear, the embedding and head (routers stay float)
    quantize_(model, "int4", group_size=32)          # int4 layers, int8 embedding and head
    save_quantized(model, "runs/quickstart-int4")
    model = llmstack.from_pretrained("runs/quickstart-int4")   # scheme read from the file's metadata

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

Either way every element is within half a step of its original: |w - dequant(q)| <= scale / 2.

Where the products run:
- CUDA, float16/bfloat16, a few rows (decoding): the fused Triton dequantize-matmul
  (`llmstack.kernels.quant_matmul`); more rows (prefill): dequantize, then cuBLAS.
- CPU, int8, float32: integer arithmetic (`int8_matmul_cpu`): x in two int8 parts per row,
  times the int8 codes through torch._int_mm (exact int32 sums), scaled per row and per
  output. Faster than the float32 matmul at every row count on a 2-core x86 CPU (torch 2.13:
  SmolLM2-135M decodes 1.5x and prefills 512 tokens 1.25x faster than in float32), with the
  weight-only int8 result. The fused int8 x float kernel torch offers
  (`_weight_int8pack_mm`) costs 4-30x float32 there, and plain dynamic activation
  quantization (one int8 part) costs SmolLM2-135M 4% perplexity.
- CPU, int4, and other dtypes: dequantize, then the float matmul.

The embedding and the output head are quantized too, int8 by default whatever the layers'
scheme (`embedding=`): a lookup dequantizes only the rows it reads; a tied output head
(`tie_embeddings`) becomes a `TiedQuantizedHead` that multiplies by the quantized
embedding's own buffers, so the matrix is stored once. MoE `router`s stay
float (their small outputs pick experts discretely); `skip` names more.
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
DEFAULT_GROUP_SIZE = 32
DEFAULT_SKIP = ("router",)
# The fused kernel serves half-precision calls with at most this many rows of x
# (decoding); bigger calls (prefill) are compute-bound and go to dequantize + cuBLAS
# instead, as do float32 ones (see llmstack.kernels.GPU_DTYPES).
KERNEL_MAX_ROWS = 16

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


# ---------------------------------------------------------------------------
# The product
# ---------------------------------------------------------------------------


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


class _QuantizedWeight(nn.Module):
    """What a quantized layer and a quantized embedding share: the buffers of one quantized
    (rows, in) matrix, `qweight`, `scale` and (int4) `offset`, and its product with x."""

    def __init__(self, rows: int, in_features: int, *, scheme: str, group_size: Optional[int], device,
                 dtype: torch.dtype):
        super().__init__()
        self.in_features, self.scheme = in_features, check_scheme(scheme)
        self.group_size = group_size if scheme == "int4" else None
        if scheme == "int8":
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
        # bfloat16 would round. Seen as int16 bits, a dtype conversion passes them by; a move does not.
        grid = ("scale", "offset") if self.scheme == "int4" else ()
        for name in grid:
            self._buffers[name] = self._buffers[name].view(torch.int16)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name in grid:
                self._buffers[name] = self._buffers[name].view(torch.float16)

    def quantize_from(self, weight: torch.Tensor) -> None:
        if self.scheme == "int8":
            self.qweight, self.scale = quantize_int8(weight)
        else:
            self.qweight, self.scale, self.offset = quantize_int4(weight, self.group_size)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float matrix (rows, in) these buffers hold."""
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
        if x.is_cuda and x.dtype in GPU_DTYPES and x.numel() <= KERNEL_MAX_ROWS * self.in_features \
                and kernels.available("quant_matmul"):
            from llmstack.kernels import quant_matmul

            if self.scheme == "int8":
                return quant_matmul.int8_matmul(x, self.qweight, self.scale)
            return quant_matmul.int4_matmul(x, self.qweight, self.scale, self.offset, self.group_size)
        if self.scheme == "int8" and x.device.type == "cpu" and x.dtype == torch.float32:
            return int8_matmul_cpu(x, self.qweight, self.scale)
        return F.linear(x, self.dequantize(x.dtype))


class QuantizedLinear(_QuantizedWeight):
    """A Linear layer whose weight is stored quantized ("int8" or "int4", see the module docstring).
    Buffers (what the checkpoint holds): `qweight`, `scale`, `offset` (int4 only), `bias` (when
    the layer has one). `model.to(dtype)` converts the int8 scales and the bias and leaves the
    integer codes and the float16 int4 scales alone."""

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
        super().__init__(num_embeddings, embedding_dim, scheme=scheme, group_size=group_size, device=device,
                         dtype=dtype)
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, scheme: str, group_size: Optional[int] = None):
        w = embedding.weight
        module = cls(w.shape[0], w.shape[1], scheme=scheme, group_size=group_size, device=w.device, dtype=w.dtype)
        module.quantize_from(w)
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.rows(input_ids, self.dtype)  # (..., dim)

    def _apply(self, fn, recurse=True):
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # follows .to(dtype) like the model's floats
        return super()._apply(fn, recurse)

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
              skip: Sequence[str] = DEFAULT_SKIP, embedding: Optional[str] = "int8") -> nn.Module:
    """Replace, in place, each nn.Linear of `model` by a QuantizedLinear, and its token embedding
    by a QuantizedEmbedding (a tied head by a TiedQuantizedHead); returns `model`.

    scheme: "int8" (per output channel; group_size is ignored) or "int4" (group-wise, group_size
    an even divisor of every quantized layer's in_features), for the linear layers.
    embedding: the scheme of the embedding and the output head (tied or not), or None to keep
    them float. int8 by default: every logit goes through the head, and on SmolLM2-135M int4
    there costs +6.5% perplexity where int8 costs +0.3% (docs/performance.md).
    skip: module names left in float, matched against the full name ("layers.0.mlp.down_proj")
    or its last component ("lm_head").
    """
    check_scheme(scheme)
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
    if scheme not in (*SCHEMES, "none") or embedding not in (*SCHEMES, None):
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

    def scheme_of(name: str) -> str:  # int8 codes are int8, int4 ones two per uint8
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
