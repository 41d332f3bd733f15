"""LoRA: low-rank adapters put on a built model's Linear layers from outside.

    apply_lora(model, rank=8, alpha=16, targets=("q", "v"))  wrap the target layers, freeze the rest
    apply_lora(model, ..., use_dora=True)                    DoRA: a trained magnitude per output row too
    merge_lora(model) / unmerge_lora(model)                  fold s * B A into the base weights and back
    remove_lora(model, merge=True)                           plain nn.Linear layers again
    save_adapter(model, dir) / load_adapter(model, dir)      PEFT's adapter directory, both ways
    print_trainable_parameters(model)                        "trainable params: N || all params: M || ..."

An adapted layer computes

    y = base(x) + s * B A dropout(x),    A (r, in), B (out, r), s = alpha / r  (alpha / sqrt(r): rsLoRA)

with B zero at the start, so the adapted model begins equal to its base, and A
kaiming-uniform (a = sqrt(5)) as PEFT initialises it. Only A and B train.

q, k and v are one matmul here (`attn.qkv_proj`, output rows q, then k, then v);
Hugging Face models and PEFT keep three Linear layers, each with its own adapter.
So one `LoRALinear` holds one adapter per *part* of its output rows: an adapter on
q alone adds to q's rows and leaves k's and v's untouched, and adapters on q, k and
v are exactly PEFT's three, so saving and loading them renames and never reshapes.
The parts' updates are still one product: x A^T with every part's A stacked, times
a B that holds each part's s * B in its rows and rank columns (zero elsewhere),
added into the base's output in place.

DoRA (`use_dora=True`, as PEFT computes it) adds a magnitude m per output row of each part:

    W' = m * (W + s B A) / ||W + s B A||_row,    the norm detached from the gradient (the paper's 4.3)

computed as y + (k - 1) x W^T + k s B A x with k = m / ||W + s B A||_row, and m starts as the
row norms of W, so the adapted model still begins equal to its base.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmstack.io import atomic_directory

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# The layers targets adapt, by their last name component: `<target>_proj`, q, k and v in the fused one.
_LAYERS = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_QKV = ("q", "k", "v")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT saves a causal LM's adapter under the Hugging Face model's names behind this prefix
# (PeftModelForCausalLM.base_model is the LoraModel, whose .model is the transformers model).
PEFT_PREFIX = "base_model.model."
# The Hugging Face architectures whose PEFT adapters map onto ours (separate q/k/v/o and
# gate/up/down Linear layers under the same names).
PEFT_BASES = ("llama", "mistral", "qwen2", "mixtral")
# DoRA's magnitude of each output row, under PEFT's name (its module holds it as `<name>.default.weight`).
MAGNITUDE = "lora_magnitude_vector"
_PEFT_KEY = re.compile(rf"base_model\.model\.(?P<module>.+)\.(?:lora_(?P<ab>[AB])\.weight|(?P<m>{MAGNITUDE}))")


class LoRALinear(nn.Module):
    """A Linear-like `base` (nn.Linear, or any module with in_features/out_features that
    computes x W^T + b) plus a low-rank update on each of its `parts`, a part being a
    range of output rows: {"q": (0, 256), "v": (384, 512)} on a fused qkv layer,
    {"o": (0, out_features)} on a plain one. Parameters: `base.*`, `lora_A.<part>` (r, in),
    `lora_B.<part>` (rows, r), and with `use_dora` `lora_magnitude_vector.<part>` (rows,)."""

    def __init__(self, base: nn.Module, parts: dict[str, tuple[int, int]], *, ranks: dict[str, int],
                 alphas: dict[str, float], dropout: float = 0.0, rslora: bool = False, use_dora: bool = False):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.parts = dict(sorted(parts.items(), key=lambda item: item[1][0]))  # in row order: _by_rows relies on it
        self.ranks, self.alphas, self.rslora, self.use_dora = dict(ranks), dict(alphas), rslora, use_dora
        self.scaling = {p: alphas[p] / (math.sqrt(ranks[p]) if rslora else ranks[p]) for p in self.parts}
        self._first = next(iter(self.parts))
        self.dropout = nn.Dropout(dropout)  # called only when it drops something: training with p > 0
        # Columns of each part's rank in the stacked A (sum of ranks, in): every part's x A^T is one matmul.
        self.rank_columns, col = {}, 0
        for p in self.parts:
            self.rank_columns[p] = (col, col + ranks[p])
            col += ranks[p]
        weight = _float_tensor_of(base)
        # A quantized base (QLoRA) names the float dtype it computes in; its float buffers may differ
        # (nf4 keeps float32 statistics under a bfloat16 model).
        kw = dict(device=weight.device, dtype=getattr(base, "dtype", weight.dtype))
        self.lora_A = nn.ParameterDict({p: nn.Parameter(torch.empty(ranks[p], self.in_features, **kw))
                                        for p in self.parts})
        self.lora_B = nn.ParameterDict({p: nn.Parameter(torch.zeros(stop - start, ranks[p], **kw))
                                        for p, (start, stop) in self.parts.items()})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's (and nn.Linear's) default
        # DoRA: m starts as the row norms of W + s B A (PEFT's init; B = 0 makes them W's own).
        self.lora_magnitude_vector = nn.ParameterDict(
            {p: nn.Parameter(norm.to(kw["dtype"])) for p, norm in self.weight_norms().items()} if use_dora else {})
        self.merged = False
        self._merged_norms: dict[str, torch.Tensor] = {}  # DoRA: the norms merge divided by, for unmerge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        shape = (*x.shape[:-1], self.out_features)
        x = x.reshape(-1, self.in_features)  # (N, in): y below is then a tensor of its own, not a view
        y = self.base(x)  # (N, out)
        d = self.dropout(x) if self.training and self.dropout.p > 0 else x
        a = torch.cat([self.lora_A[p] for p in self.parts]) if len(self.parts) > 1 else self.lora_A[self._first]
        low = F.linear(d, a)  # (N, sum of ranks): one matmul for every part's A
        if not self.use_dora:
            # y += low B^T in place, one addmm for every part: no per-part slices added and concatenated
            # again, no copy of y. Hazard: a base whose backward needed its output y would fail
            # there ("modified by an inplace operation"); a Linear's needs only x and W.
            # In-place ops are not autocast: under autocast y and low are in its dtype, B is not (.to is
            # free when the dtypes agree).
            low = low.to(y.dtype)
            if self._whole_rows():
                p = self._first
                return y.addmm_(low, self.lora_B[p].t().to(y.dtype), alpha=self.scaling[p]).view(shape)
            return y.addmm_(low, self.stacked_B().t().to(y.dtype)).view(shape)
        # DoRA, as PEFT computes it: y + (k - 1) (x W^T) + k s B A x, k = m / ||W + s B A||_row with the
        # norm detached (the paper's section 4.3); rows of no part have k = 1. With dropout in training
        # PEFT takes x W^T of the dropped x, an extra product with the base weight.
        norms = self.weight_norms()
        k = self._by_rows(lambda p: self.lora_magnitude_vector[p] / norms[p], lambda n: y.new_ones(n))
        if d is x:
            bias = getattr(self.base, "bias", None)
            base_term = y if bias is None else y - bias
        else:
            base_term = F.linear(d, self.base_weight())
        return torch.addcmul(y, k - 1, base_term).addcmul_(k, low @ self.stacked_B().t()).view(shape)

    def _whole_rows(self) -> bool:
        """One part over every output row: the adapter's B is the whole update, no zero rows."""
        return len(self.parts) == 1 and next(iter(self.parts.values())) == (0, self.out_features)

    def _by_rows(self, part_rows, gap_rows) -> torch.Tensor:
        """part_rows(p) for each part's rows and gap_rows(n) for the n rows between, stacked (out, ...)."""
        pieces, end = [], 0
        for p, (start, stop) in self.parts.items():
            if start > end:
                pieces.append(gap_rows(start - end))
            pieces.append(part_rows(p))
            end = stop
        if end < self.out_features:
            pieces.append(gap_rows(self.out_features - end))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def stacked_B(self) -> torch.Tensor:
        """(out, sum of ranks): s * B of each part in its rows and rank columns, zero elsewhere, so that
        (x A^T) stacked_B^T is every part's update at once. Small: a few extra multiply-adds per row cost
        less than a matmul and an addition per part."""
        total = sum(self.ranks.values())
        some_b = next(iter(self.lora_B.values()))

        def part(p):
            first, last = self.rank_columns[p]
            return F.pad(self.lora_B[p] * self.scaling[p], (first, total - last))
        return self._by_rows(part, lambda n: some_b.new_zeros(n, total))

    def delta_weight(self, part: str) -> torch.Tensor:
        """s * B A: what the adapter adds to the rows of `part` of the base weight."""
        return (self.lora_B[part] @ self.lora_A[part]) * self.scaling[part]

    def base_weight(self) -> torch.Tensor:
        """The base's float weight (out, in): its parameter, or a quantized base's dequantized matrix."""
        weight = getattr(self.base, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return weight
        if hasattr(self.base, "dequantize"):
            return self.base.dequantize(self.base.dtype)
        raise ValueError(f"DoRA needs the base weight, which a {type(self.base).__name__} does not expose")

    @torch.no_grad()
    def weight_norms(self) -> dict[str, torch.Tensor]:
        """DoRA's ||W + s B A|| of each row of each part (detached), as PEFT computes them."""
        weight = self.base_weight()
        return {p: torch.linalg.norm(weight[start:stop] + self.delta_weight(p).to(weight.dtype), dim=1)
                for p, (start, stop) in self.parts.items()}

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._add_to_weight(+1)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_to_weight(-1)
            self.merged = False

    def _add_to_weight(self, sign: int) -> None:
        scheme = getattr(self.base, "scheme", None)
        if scheme is not None:
            raise ValueError(f"cannot merge a LoRA adapter into a {scheme}-quantized base: s * B A is not on its "
                             f"grid. Keep the adapter apart (remove_lora(model, merge=False) gives the base back), "
                             f"or merge into a float model: load the base unquantized and load_adapter onto it")
        weight = getattr(self.base, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise ValueError(f"cannot merge a LoRA adapter into a {type(self.base).__name__}: its weight is not "
                             "a float matrix")
        norms = self.weight_norms() if self.use_dora and sign > 0 else {}
        for p, (start, stop) in self.parts.items():
            delta = self.delta_weight(p).to(weight.dtype)
            if not self.use_dora:
                weight[start:stop] += sign * delta
            elif sign > 0:  # W' = m / ||W + s B A|| * (W + s B A), row by row
                self._merged_norms[p] = norms[p]
                factor = (self.lora_magnitude_vector[p] / norms[p]).to(weight.dtype)[:, None]
                weight[start:stop] = factor * (weight[start:stop] + delta)
            else:  # W' alone does not say what ||W + s B A|| was: merge kept it
                factor = (self.lora_magnitude_vector[p] / self._merged_norms.pop(p)).to(weight.dtype)[:, None]
                weight[start:stop] = weight[start:stop] / factor - delta

    def extra_repr(self) -> str:
        parts = ", ".join(f"{p}: rows {a}:{b} r={self.ranks[p]} s={self.scaling[p]:g}"
                          for p, (a, b) in self.parts.items())
        return f"{parts}{', DoRA' if self.use_dora else ''}, merged={self.merged}"


def _float_tensor_of(module: nn.Module) -> torch.Tensor:
    """A float tensor of `module`, for the device and dtype its adapters take."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t
    return torch.empty(0)


# ---------------------------------------------------------------------------- applying


def _check_hyperparameters(rank: int, alpha: float, dropout: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def _check_targets(targets: Iterable[str] | str) -> tuple[str, ...]:
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError(f"no LoRA targets given; choose from {', '.join(TARGETS)}")
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; choose from {', '.join(TARGETS)}")
    return tuple(dict.fromkeys(targets))


def _qkv_rows(model: nn.Module, name: str, layer: nn.Module) -> dict[str, tuple[int, int]]:
    """Output rows of q, k and v in the fused layer `name`, from its Attention's head layout."""
    attn = model.get_submodule(name.rpartition(".")[0])
    head_dim, group = attn.head_dim, attn.group
    kv = layer.out_features // (head_dim * (group + 2)) * head_dim  # rows of k (and of v)
    q = kv * group
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}


def _layer_parts(model: nn.Module, *, adapted: bool = False) -> list[tuple[str, nn.Module, dict]]:
    """Every adaptable layer of `model`: (name, module, {target: output rows}); those already
    adapted too when `adapted`."""
    found = []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf not in _LAYERS or not hasattr(module, "in_features"):
            continue
        if isinstance(module, LoRALinear) and not adapted:
            continue
        if leaf == "qkv_proj":
            found.append((name, module, _qkv_rows(model, name, module)))
        else:
            found.append((name, module, {leaf[: -len("_proj")]: (0, module.out_features)}))
    return found


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _check_not_adapted(model: nn.Module) -> None:
    layers = lora_layers(model)
    if layers:
        raise ValueError(f"the model already has LoRA adapters (on {layers[0][0]} and {len(layers) - 1} more); "
                         "call remove_lora(model) first")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _install(model: nn.Module, plan: list[tuple[str, LoRALinear]]) -> None:
    """Freeze every parameter of `model`, then put the (trainable) adapted layers in place."""
    model.requires_grad_(False)
    for name, layer in plan:
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
        layer.lora_magnitude_vector.requires_grad_(True)
        layer.train(layer.base.training)  # a new module is in training mode; take the replaced one's
        _replace(model, name, layer)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets: Iterable[str] | str = ("q", "k", "v", "o"), rslora: bool = False,
               use_dora: bool = False) -> nn.Module:
    """Wrap each target layer of `model` (in place) in a `LoRALinear` and freeze every other
    parameter; returns `model`. targets: any of q, k, v, o, gate, up, down (MoE experts' gate,
    up and down included). use_dora: DoRA, a trained magnitude per output row on top of the
    adapter (PEFT's `use_dora`). The adapted model computes what the base did until B is trained."""
    _check_hyperparameters(rank, alpha, dropout)
    targets = _check_targets(targets)
    _check_not_adapted(model)
    layers = _layer_parts(model)
    present = {t for _, _, parts in layers for t in parts}
    for t in targets:
        if t not in present:
            raise ValueError(f"LoRA target {t!r} matches no layer of this model (it has: "
                             f"{', '.join(x for x in TARGETS if x in present) or 'none'})")
    plan = []
    for name, module, parts in layers:
        chosen = {t: rows for t, rows in parts.items() if t in targets}
        if chosen:
            plan.append((name, LoRALinear(module, chosen, ranks=dict.fromkeys(chosen, rank),
                                          alphas=dict.fromkeys(chosen, float(alpha)), dropout=dropout,
                                          rslora=rslora, use_dora=bool(use_dora))))
    _install(model, plan)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Add s * B A into every adapted base weight; the adapters stay (and are skipped) until
    `unmerge_lora`. Logits are those of the adapted model, at the cost of a plain matmul."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract what `merge_lora` added: the base weights again (up to rounding in low precision)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def remove_lora(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Put each adapted layer's base back in its place: merged with its adapter (merge=True, a
    model that computes what the adapted one did) or without it (merge=False, the base model).
    Parameters keep their requires_grad: the base stays frozen."""
    for name, layer in lora_layers(model):
        layer.merge() if merge else layer.unmerge()
        _replace(model, name, layer.base)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_summary(model: nn.Module) -> str:
    """PEFT's line: "trainable params: N || all params: M || trainable%: x"."""
    trainable, total = count_parameters(model)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


def print_trainable_parameters(model: nn.Module) -> None:
    print(trainable_summary(model))


# ---------------------------------------------------------------------------- PEFT format


def _hf_type(model: nn.Module) -> str:
    from llmstack.interop.hf import config_to_hf

    config = getattr(model, "config", None)
    kind = config_to_hf(config)["model_type"] if config is not None else None
    if kind not in PEFT_BASES:
        raise ValueError(f"PEFT adapters map onto {', '.join(PEFT_BASES)} bases; this model exports as {kind!r}")
    return kind


def _to_hf_module(model: nn.Module, name: str, part: str) -> str:
    """Hugging Face module name of adapter `part` of our layer `name` (its q/k/v apart)."""
    from llmstack.interop.hf import state_dict_to_hf

    if ".experts." in name:
        raise ValueError(f"cannot save the adapter of {name}: transformers >= 5 keeps MoE experts as fused "
                         "tensors, which PEFT's LoRA does not adapt")
    ours = f"{name.rpartition('.')[0]}.{part}_proj.weight" if part in _QKV else f"{name}.weight"
    (theirs,) = state_dict_to_hf({ours: torch.empty(0)}, model.config)
    return theirs[: -len(".weight")]


def _from_hf_module(model: nn.Module, module: str) -> tuple[str, str]:
    """(our layer name, part) of a Hugging Face module name; a ValueError naming it when this model
    has no such layer."""
    from llmstack.interop.hf import state_dict_from_hf

    try:
        ours = next(iter(state_dict_from_hf({f"{module}.weight": torch.empty(0)}, model.config)))
    except (ValueError, StopIteration):
        ours = None
    m = re.fullmatch(r"(?P<prefix>.*)\.(?P<leaf>[a-z]+)_proj\.weight", ours or "")
    if m is None or m["leaf"] not in TARGETS or ".experts." in ours:
        raise ValueError(f"the adapter has a LoRA on {module!r}, which is not one of the layers llmstack adapts "
                         f"({', '.join(TARGETS)} projections)")
    if m["leaf"] in _QKV:
        return f"{m['prefix']}.qkv_proj", m["leaf"]
    return ours[: -len(".weight")], m["leaf"]


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters under the names PEFT saves them with (adapter_model.safetensors):
    `base_model.model.<module>.lora_A.weight`, `.lora_B.weight` and, with DoRA, `.lora_magnitude_vector`."""
    out = {}
    for name, layer in lora_layers(model):
        for part in layer.parts:
            module = f"{PEFT_PREFIX}{_to_hf_module(model, name, part)}"
            out[f"{module}.lora_A.weight"] = layer.lora_A[part]
            out[f"{module}.lora_B.weight"] = layer.lora_B[part]
            if layer.use_dora:
                out[f"{module}.{MAGNITUDE}"] = layer.lora_magnitude_vector[part]
    return out


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy an adapter's tensors, under PEFT's names (what `save_adapter` writes), into the model's
    adapters, which must be exactly those (resuming a run: the adapters exist, their values do not):
    a ValueError naming what differs otherwise, before anything is copied."""
    expected = adapter_parameters(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError("the adapter does not match the model's adapters: "
                         + (f"missing {', '.join(missing[:4])}; " if missing else "")
                         + (f"unexpected {', '.join(unexpected[:4])}" if unexpected else ""))
    for key, t in tensors.items():
        if t.shape != expected[key].shape:
            raise ValueError(f"adapter tensor {key} has shape {tuple(t.shape)}, the model's "
                             f"{tuple(expected[key].shape)}")
    with torch.no_grad():
        for key, t in tensors.items():
            expected[key].copy_(t)


def save_adapter(model: nn.Module, directory: str | os.PathLike, *,
                 base_model_name_or_path: Optional[str] = None) -> None:
    """Write the model's adapters as PEFT does: adapter_config.json and adapter_model.safetensors,
    under the names of the model's Hugging Face export (`llmstack.save_hf`), q, k and v as three
    modules. `PeftModel.from_pretrained(hf_model, directory)` reads it. Written to a temporary
    directory and renamed into place."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save; call apply_lora or load_adapter first")
    _hf_type(model)
    tensors = {key: p.detach().cpu().contiguous() for key, p in adapter_parameters(model).items()}
    ranks, alphas, dropouts, rslora, dora = {}, {}, set(), set(), set()
    for name, layer in layers:
        dropouts.add(layer.dropout.p)
        rslora.add(layer.rslora)
        dora.add(layer.use_dora)
        for part in layer.parts:
            module = _to_hf_module(model, name, part)
            ranks[module], alphas[module] = layer.ranks[part], layer.alphas[part]
    if len(rslora) > 1:
        raise ValueError("the model mixes rsLoRA and plain LoRA scaling, which one PEFT config cannot express")
    if len(dora) > 1:
        raise ValueError("the model mixes DoRA and plain LoRA layers, which one PEFT config cannot express")
    rank = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common: the rest are patterns
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    leaves = sorted({m.rpartition(".")[2] for m in ranks})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts),
        "use_rslora": rslora.pop(),
        # Every layer's leaf name, as PEFT writes it, when the adapters cover every such layer.
        "target_modules": leaves if _covers_all(model, ranks) else sorted(ranks),
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": dora.pop(),
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
    }

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    atomic_directory(directory, write)


def _covers_all(model: nn.Module, adapted: dict[str, int]) -> bool:
    """Whether the adapted Hugging Face modules are all of the model's modules with their leaf names."""
    leaves = {m.rpartition(".")[2] for m in adapted}
    every = {_to_hf_module(model, name, part) for name, _, parts in _layer_parts(model, adapted=True)
             for part in parts if ".experts." not in name}
    return {m for m in every if m.rpartition(".")[2] in leaves} == set(adapted)


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Put the PEFT LoRA adapter in `directory` (adapter_config.json + adapter_model.safetensors,
    made for the Hugging Face Llama, Mistral or Qwen2 model this one was loaded from) on `model`,
    in place, and freeze everything else; returns `model`. Everything is checked before the model
    is touched: an adapter of another kind or for another base is a ValueError naming what differs."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a PEFT adapter directory holds {ADAPTER_CONFIG} "
                                    f"and {ADAPTER_WEIGHTS}")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory} holds a PEFT adapter of type {config.get('peft_type')!r}; "
                         "load_adapter reads LORA adapters only")
    for option, fine in (("bias", "none"), ("fan_in_fan_out", False), ("lora_bias", False)):
        if config.get(option, fine) != fine:
            raise ValueError(f"unsupported LoRA option {option}={config[option]!r} in {config_path} "
                             f"(llmstack reads {option}={fine!r})")
    if config.get("modules_to_save"):
        raise ValueError(f"unsupported LoRA option modules_to_save={config['modules_to_save']!r} in {config_path}: "
                         "llmstack loads low-rank adapters only")
    dora = config.get("use_dora", False)
    if not isinstance(dora, bool):
        raise ValueError(f"use_dora={dora!r} in {config_path} is not true or false")
    dropout = float(config.get("lora_dropout") or 0.0)
    _check_hyperparameters(int(config.get("r", 8)), float(config.get("lora_alpha", 8)), dropout)
    _check_not_adapted(model)
    _hf_type(model)

    matrices: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(weights_path)).items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None or (m["m"] and not dora):
            raise ValueError(f"unexpected tensor {key!r} in {weights_path}: not a LoRA A or B matrix of a "
                             f"causal LM ({PEFT_PREFIX}<module>.lora_A.weight)"
                             + (f", and the config has use_dora={dora!r}" if m is not None else ""))
        matrices.setdefault(m["module"], {})[m["ab"] or "m"] = t
    if not matrices:
        raise ValueError(f"{weights_path} holds no LoRA matrices")

    layers = {name: (module, parts) for name, module, parts in _layer_parts(model)}
    specs: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float, Optional[torch.Tensor]]]] = {}
    for module, ab in matrices.items():
        if not {"A", "B"} <= set(ab):
            have = " and ".join(f"lora_{k}" if k != "m" else MAGNITUDE for k in sorted(ab))
            raise ValueError(f"{weights_path} has {have} but not lora_{'B' if 'A' in ab else 'A'} for {module!r}")
        if dora and "m" not in ab:
            raise ValueError(f"{weights_path} has no {MAGNITUDE} for {module!r}, which a DoRA adapter "
                             f"(use_dora=True in {ADAPTER_CONFIG}) has for every module")
        name, part = _from_hf_module(model, module)
        if name not in layers or part not in layers[name][1]:
            raise ValueError(f"the adapter was made for another base: it adapts {module!r}, which this model "
                             f"does not have")
        base, parts = layers[name]
        a, b = ab["A"], ab["B"]
        start, stop = parts[part]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != base.in_features or b.shape != (stop - start, rank):
            raise ValueError(f"the adapter was made for another base: {module!r} has lora_A {tuple(a.shape)} and "
                             f"lora_B {tuple(b.shape)}, this model needs ({rank}, {base.in_features}) and "
                             f"({stop - start}, {rank})")
        if dora and ab["m"].shape != (stop - start,):
            raise ValueError(f"the adapter was made for another base: {module!r} has a {MAGNITUDE} of shape "
                             f"{tuple(ab['m'].shape)}, this model needs ({stop - start},)")
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
        _check_hyperparameters(rank, alpha, dropout)
        specs.setdefault(name, {})[part] = (a, b, alpha, ab.get("m"))

    plan = []
    for name, adapters in specs.items():
        base, parts = layers[name]
        layer = LoRALinear(base, {p: parts[p] for p in adapters},
                           ranks={p: a.shape[0] for p, (a, _, _, _) in adapters.items()},
                           alphas={p: alpha for p, (_, _, alpha, _) in adapters.items()}, dropout=dropout,
                           rslora=bool(config.get("use_rslora", False)), use_dora=dora)
        with torch.no_grad():
            for p, (a, b, _, magnitude) in adapters.items():
                layer.lora_A[p].copy_(a)
                layer.lora_B[p].copy_(b)
                if dora:
                    layer.lora_magnitude_vector[p].copy_(magnitude)
        plan.append((name, layer))
    _install(model, plan)
    return model
