"""Hugging Face checkpoints: config.json and weight names, both directions.

Supported: Llama (Llama-3 RoPE scaling included), Mistral, Qwen2, Mixtral and GPT-2.
Their RoPE uses the same "rotate half" channel layout as ours, so q/k weights
need no permutation. Names change, and they keep q, k and v as separate
matrices where we fuse them into one (`fuse_projections`, `split_projections`).
GPT-2 already fuses them (`c_attn`, rows q, k, v like ours) but stores its
projections as transformers' Conv1D, whose weight is nn.Linear's transposed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from llmstack.model.config import ModelConfig, MoEConfig, RopeScaling

SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "mixtral": "MixtralForCausalLM", "gpt2": "GPT2LMHeadModel"}

# GPT-2 activations that are our tanh-approximated GELU.
_GPT2_GELU = ("gelu_new", "gelu_pytorch_tanh")


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    mapping = {"linear": "linear", "llama3": "llama3", "yarn": "yarn", "dynamic": "ntk"}
    if kind not in mapping:
        raise ValueError(f"unsupported RoPE scaling type {kind!r} (supported: {', '.join(mapping)})")
    scaling = RopeScaling(type=mapping[kind], factor=float(params.get("factor", 1.0)))
    if "original_max_position_embeddings" in params:
        scaling.original_max_seq_len = int(params["original_max_position_embeddings"])
    for ours, theirs in (("low_freq_factor", "low_freq_factor"), ("high_freq_factor", "high_freq_factor"),
                         ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"),
                         ("attention_factor", "attention_factor")):
        if params.get(theirs) is not None:
            setattr(scaling, ours, float(params[theirs]))
    return theta, scaling


def config_from_hf(hf: dict) -> ModelConfig:
    """A ModelConfig from a parsed config.json; unsupported options are errors naming them."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"unsupported architecture model_type={model_type!r}; "
                         f"llmstack loads {', '.join(sorted(SUPPORTED))}")
    if model_type == "gpt2":
        return _gpt2_config_from_hf(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act={hf['hidden_act']!r} (only silu / SwiGLU)")
    if hf.get("mlp_bias"):
        raise ValueError("unsupported option mlp_bias=true")
    if hf.get("pretraining_tp", 1) != 1:
        raise ValueError("unsupported option pretraining_tp != 1")
    theta, scaling = _rope(hf)
    window = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None  # Qwen2 configs carry a window size but do not use it unless told to
    qkv_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        ffn_hidden=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        qkv_bias=qkv_bias,
        bias=bool(hf.get("attention_bias", False)) and model_type == "llama",
        sliding_window=window,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **special_token_ids(hf),
        moe=MoEConfig(n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                      aux_loss_coef=hf.get("router_aux_loss_coef", 0.01)) if model_type == "mixtral" else None,
    )
    return cfg.validate()


def _gpt2_config_from_hf(hf: dict) -> ModelConfig:
    # Defaults are GPT2Config's: the original checkpoints' config.json leaves most keys out.
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_GELU:
        raise ValueError(f"unsupported activation_function={act!r} (supported: {', '.join(_GPT2_GELU)}, "
                         "the tanh-approximated GELU)")
    if not hf.get("scale_attn_weights", True):
        raise ValueError("unsupported option scale_attn_weights=false")
    for option in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if hf.get(option, False):
            raise ValueError(f"unsupported option {option}=true")
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        ffn_hidden=hf.get("n_inner") or 4 * hf["n_embd"],
        mlp="gelu",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        pos="learned",
        max_seq_len=hf.get("n_positions", 1024),
        bias=True,
        qkv_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **special_token_ids(hf),
    )
    return cfg.validate()


def _is_gpt2(cfg: ModelConfig) -> bool:
    # Of the supported architectures, only GPT-2 has learned positions.
    return cfg.pos == "learned"


def _gpt2_problems(cfg: ModelConfig) -> list[str]:
    return [name for name, bad in (
        ("mlp=swiglu", cfg.mlp != "gelu"), ("norm=rmsnorm", cfg.norm != "layernorm"),
        (f"pos={cfg.pos}", cfg.pos != "learned"), ("bias=false", not cfg.bias), ("qkv_bias=false", not cfg.qkv_bias),
        ("n_kv_heads != n_heads", cfg.n_kv_heads != cfg.n_heads),
        ("head_dim != dim / n_heads", cfg.head_dim * cfg.n_heads != cfg.dim), ("qk_norm", cfg.qk_norm),
        ("sliding_window", cfg.sliding_window is not None), ("moe", cfg.moe is not None),
    ) if bad]


def _gpt2_config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "architectures": [SUPPORTED["gpt2"]],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.ffn_hidden,
        "n_positions": cfg.max_seq_len,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        # Explicit even when null: GPT2Config defaults to GPT-2's own 50256, outside a smaller vocabulary.
        **special_token_ids_to_hf(cfg),
        "torch_dtype": "float32",
    }


def config_to_hf(cfg: ModelConfig) -> dict:
    """config.json for the closest Hugging Face architecture; errors for what none can express."""
    gpt2_problems = _gpt2_problems(cfg)
    if not gpt2_problems:
        return _gpt2_config_to_hf(cfg)
    problems = [name for name, bad in (
        ("mlp=gelu", cfg.mlp != "swiglu"), ("norm=layernorm", cfg.norm != "rmsnorm"),
        (f"pos={cfg.pos}", cfg.pos != "rope"), ("qk_norm", cfg.qk_norm),
        ("bias on o_proj/MLP", cfg.bias), ("moe.n_shared_experts", cfg.moe is not None and cfg.moe.n_shared_experts),
        ("moe.norm_topk_prob=false", cfg.moe is not None and not cfg.moe.norm_topk_prob),
        ("moe.balancing=bias", cfg.moe is not None and cfg.moe.balancing == "bias"),
        ("rope_scaling with MoE/Mistral", cfg.rope_scaling is not None and (cfg.moe is not None or cfg.sliding_window)),
    ) if bad]
    if problems:
        # A model with any of GPT-2's traits was likely meant as one: say what keeps it from being one too.
        gpt2_like = cfg.mlp == "gelu" or cfg.norm == "layernorm" or cfg.pos == "learned"
        raise ValueError(f"cannot export to a Hugging Face architecture: unsupported {', '.join(problems)}"
                         + (f" (as GPT-2: unsupported {', '.join(gpt2_problems)})" if gpt2_like else ""))
    if cfg.moe is not None:
        model_type = "mixtral"
    elif cfg.qkv_bias:
        model_type = "qwen2"
    elif cfg.sliding_window is not None:
        model_type = "mistral"
    else:
        model_type = "llama"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": {"ntk": "dynamic"}.get(s.type, s.type), "rope_theta": cfg.rope_theta, "factor": s.factor,
                "original_max_position_embeddings": s.original_max_seq_len}
        if s.type == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
        if s.type == "yarn":
            rope.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, attention_factor=s.attention_factor)
    hf = {
        "architectures": [SUPPORTED[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_hidden,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,  # older readers
        "rope_scaling": rope if cfg.rope_scaling is not None else None,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "sliding_window": cfg.sliding_window,
        **special_token_ids_to_hf(cfg),
        "torch_dtype": "float32",
    }
    if model_type == "qwen2":
        hf["use_sliding_window"] = cfg.sliding_window is not None
        hf["max_window_layers"] = cfg.n_layers
    if model_type == "mixtral":
        hf.update(num_local_experts=cfg.moe.n_experts, num_experts_per_tok=cfg.moe.top_k,
                  router_aux_loss_coef=cfg.moe.aux_loss_coef)
    return hf


# Name patterns: ours <-> Hugging Face. `{i}` is the layer, `{e}` the expert.
_NAMES = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.attn.{p}_proj.{w}", "model.layers.{i}.self_attn.{p}_proj.{w}"),
    ("layers.{i}.mlp.router.weight", "model.layers.{i}.block_sparse_moe.gate.weight"),
    ("layers.{i}.mlp.experts.{e}.gate_proj.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight"),
    ("layers.{i}.mlp.experts.{e}.down_proj.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"),
    ("layers.{i}.mlp.experts.{e}.up_proj.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight"),
    ("layers.{i}.mlp.{p}_proj.weight", "model.layers.{i}.mlp.{p}_proj.weight"),
]


# GPT-2's names, as GPT2LMHeadModel saves them; its base model GPT2Model (and the original
# checkpoints) drop the `transformer.` prefix.
_GPT2_NAMES = [
    ("embed.weight", "transformer.wte.weight"),
    ("pos_embed.weight", "transformer.wpe.weight"),
    ("norm.{w}", "transformer.ln_f.{w}"),
    ("lm_head.weight", "lm_head.weight"),
    ("layers.{i}.attn_norm.{w}", "transformer.h.{i}.ln_1.{w}"),
    ("layers.{i}.mlp_norm.{w}", "transformer.h.{i}.ln_2.{w}"),
    ("layers.{i}.attn.qkv_proj.{w}", "transformer.h.{i}.attn.c_attn.{w}"),
    ("layers.{i}.attn.o_proj.{w}", "transformer.h.{i}.attn.c_proj.{w}"),
    ("layers.{i}.mlp.up_proj.{w}", "transformer.h.{i}.mlp.c_fc.{w}"),
    ("layers.{i}.mlp.down_proj.{w}", "transformer.h.{i}.mlp.c_proj.{w}"),
]
# Conv1D weights are (in, out): the transpose of nn.Linear's (out, in).
_GPT2_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")
# The causal mask buffers that older transformers saved with each layer; we build our own.
_GPT2_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")


def _compile(pattern: str) -> re.Pattern:
    regex = re.escape(pattern)
    for field, sub in (("i", r"\d+"), ("e", r"\d+"), ("p", r"[a-z]+"), ("w", r"weight|bias")):
        regex = regex.replace(re.escape("{" + field + "}"), f"(?P<{field}>{sub})")
    return re.compile(regex + "$")


_TO_HF = [(_compile(ours), theirs) for ours, theirs in _NAMES]
_FROM_HF = [(_compile(theirs), ours) for ours, theirs in _NAMES]
_GPT2_TO_HF = [(_compile(ours), theirs) for ours, theirs in _GPT2_NAMES]
_GPT2_FROM_HF = [(_compile(theirs), ours) for ours, theirs in _GPT2_NAMES]


def _rename(name: str, table) -> str | None:
    for regex, target in table:
        m = regex.match(name)
        if m:
            return target.format(**m.groupdict())
    return None


# q, k and v are stored apart by Hugging Face (and older llmstack runs); our one qkv_proj
# stacks their output rows in that order.
_QKV = ("q_proj", "k_proj", "v_proj")
_PROJ = re.compile(r"(?P<prefix>.*)\.(?P<proj>[a-z]+_proj)\.(?P<w>weight|bias)$")


def fuse_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack separate q/k/v projection tensors into our fused `qkv_proj` ones; anything else
    passes through."""
    out = dict(state)
    for name in state:
        m = _PROJ.match(name)
        if m is not None and m["proj"] == "q_proj":
            parts = [f"{m['prefix']}.{proj}.{m['w']}" for proj in _QKV]
            if all(p in state for p in parts):
                out[f"{m['prefix']}.qkv_proj.{m['w']}"] = torch.cat([out.pop(p) for p in parts], dim=0)
    return out


def split_projections(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `fuse_projections`: each fused `qkv_proj` tensor as q, k and v ones."""
    sizes = [n * cfg.head_dim for n in (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads)]
    out = {}
    for name, t in state.items():
        m = _PROJ.match(name)
        if m is None or m["proj"] != "qkv_proj":
            out[name] = t
            continue
        for proj, piece in zip(_QKV, t.split(sizes, dim=0)):
            out[f"{m['prefix']}.{proj}.{m['w']}"] = piece
    return out


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face state dict to ours and fuse its q/k/v projections. Fused expert
    tensors (transformers >= 5 in memory: experts.gate_up_proj (E, 2I, C), experts.down_proj
    (E, C, I)) are split. GPT-2's Conv1D weights are transposed."""
    if _is_gpt2(cfg):
        return _gpt2_state_dict_from_hf(hf_state, cfg)
    out, unknown = {}, []
    for name, t in hf_state.items():
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
        if m:
            i, kind = m.groups()
            for e in range(t.shape[0]):
                if kind == "gate_up_proj":  # rows: [gate | up]
                    gate, up = t[e].chunk(2, dim=0)
                    out[f"layers.{i}.mlp.experts.{e}.gate_proj.weight"] = gate
                    out[f"layers.{i}.mlp.experts.{e}.up_proj.weight"] = up
                else:
                    out[f"layers.{i}.mlp.experts.{e}.down_proj.weight"] = t[e]
            continue
        name = name.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")  # v5 in-memory name
        ours = _rename(name, _FROM_HF)
        if ours is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some old checkpoints saved; we recompute it
            unknown.append(name)
            continue
        out[ours] = t
    _check_known(unknown)
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return fuse_projections(out)


def _check_known(unknown: list[str]) -> None:
    if unknown:
        raise ValueError(f"unexpected tensors in the Hugging Face checkpoint: {', '.join(unknown[:8])}"
                         + (" ..." if len(unknown) > 8 else ""))


def _gpt2_state_dict_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for name, t in hf_state.items():
        if _GPT2_BUFFER.search(name):
            continue
        full = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
        ours = _rename(full, _GPT2_FROM_HF)
        if ours is None:
            unknown.append(name)
            continue
        out[ours] = t.t().contiguous() if _GPT2_CONV1D.search(name) else t
    _check_known(unknown)
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict under Hugging Face's names and layout, for the architecture
    `config_to_hf(cfg)` chose."""
    if _is_gpt2(cfg):
        out = {}
        for name, t in state.items():
            theirs = _rename(name, _GPT2_TO_HF)
            if theirs is None:
                raise ValueError(f"no Hugging Face GPT-2 name for tensor {name!r}")
            out[theirs] = t.t().contiguous() if _GPT2_CONV1D.search(theirs) else t
        return out
    out = {}
    for name, t in split_projections(state, cfg).items():
        if name.endswith("expert_bias"):
            continue  # only used by auxiliary-loss-free balancing, which export rejects
        theirs = _rename(name, _TO_HF)
        if theirs is None:
            raise ValueError(f"no Hugging Face name for tensor {name!r}")
        out[theirs] = t
    return out


def special_token_ids(hf: dict) -> dict:
    """bos_token_id and eos_token_ids for ModelConfig from a config.json (or generation_config.json,
    whose eos_token_id often lists the end-of-turn tokens too)."""
    eos = hf.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return {"bos_token_id": hf.get("bos_token_id"), "eos_token_ids": eos}


def special_token_ids_to_hf(cfg: ModelConfig) -> dict:
    eos = cfg.eos_token_ids
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (list(eos) or None)}


def read_hf_config(directory: str | Path) -> dict:
    """config.json, with the special token ids of generation_config.json when there is one (it
    is what transformers' generate stops at)."""
    directory = Path(directory)
    hf = json.loads((directory / "config.json").read_text())
    generation = directory / "generation_config.json"
    if generation.is_file():
        gen = json.loads(generation.read_text())
        hf.update({k: gen[k] for k in ("bos_token_id", "eos_token_id") if gen.get(k) is not None})
    return hf


def generation_config_to_hf(cfg: ModelConfig) -> dict:
    """generation_config.json: the ids transformers' generate starts from and stops at (every one of
    `cfg.eos_token_ids`, end-of-turn tokens included)."""
    return special_token_ids_to_hf(cfg)


def tokenizer_to_hf(tokenizer):
    """`tokenizer` as an `HFTokenizer` (a Hugging Face tokenizer.json pipeline), for a Hugging Face
    directory: an HFTokenizer as it is; llmstack's own tiktoken-backed `Tokenizer` converted.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; a Hugging Face BPE
    merges the pair listed first. So every split of each multi-byte token into two tokens is a merge,
    listed in the order of the merged token's rank (as transformers converts tiktoken files; the two
    could part only where two different pairs that make the same token are adjacent at once). Bytes
    are spelled in GPT-2's byte alphabet, the text is split by the tokenizer's regex, and the special
    tokens keep their ids. One difference is by design: the converted tokenizer reads a special
    token spelled out in the text as that token (as transformers does), where llmstack's
    `Tokenizer.encode` reads it as plain text."""
    from tokenizers import AddedToken, Regex, Tokenizer as Backend, decoders, models, pre_tokenizers

    from llmstack.tokenizer import HFTokenizer
    from llmstack.tokenizer.gguf import byte_spelling  # GPT-2's byte alphabet

    if isinstance(tokenizer, HFTokenizer):
        return tokenizer
    encoding = tokenizer.encoding
    ranks: dict[bytes, int] = encoding._mergeable_ranks
    spelling = byte_spelling()

    def spell(token: bytes) -> str:
        return "".join(spelling[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += sorted((rank, ranks[left], ranks[right], left, right) for left, right in splits)
    merges.sort(key=lambda m: m[:3])
    backend = Backend(models.BPE(vocab={spell(t): r for t, r in ranks.items()},
                                 merges=[(spell(left), spell(right)) for *_, left, right in merges],
                                 dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = pre_tokenizers.Split(Regex(encoding._pat_str), behavior="isolated")
    backend.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                     use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    for name, i in sorted(tokenizer.special_tokens.items(), key=lambda item: item[1]):
        if backend.get_vocab_size(with_added_tokens=True) != i:
            raise ValueError(f"special token {name!r} has id {i}, not the next free one: its ids cannot be kept")
        backend.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    names = {i: name for name, i in tokenizer.special_tokens.items()}
    return HFTokenizer(backend, bos_token=names.get(tokenizer.bos_id), eos_token=names.get(tokenizer.eos_id),
                       pad_token=names.get(tokenizer.pad_id), add_bos_token=tokenizer.add_bos_token,
                       chat_template=tokenizer.chat_template, extra_stop_ids=tokenizer.stop_ids)


def save_hf_extras(directory: str | Path, cfg: ModelConfig, tokenizer=None) -> None:
    """Beside a Hugging Face export (`save_hf`): generation_config.json with the model's special token
    ids and, given a tokenizer, tokenizer.json and tokenizer_config.json (its special tokens and chat
    template) in the Hugging Face format (`tokenizer_to_hf`), so that transformers' AutoTokenizer and
    generate read them and `llmstack.load_tokenizer` gives the same tokenizer back."""
    directory = Path(directory)
    (directory / "generation_config.json").write_text(json.dumps(generation_config_to_hf(cfg), indent=2))
    if tokenizer is not None:
        tokenizer_to_hf(tokenizer).save(directory / "tokenizer.json")
