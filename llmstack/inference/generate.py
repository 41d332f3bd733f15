"""Autoregressive generation: prefill the prompt into a KV cache, then one token per step."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from llmstack.model import KVCache


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick the next token (B,) from logits (B, V). Temperature 0 is greedy (argmax)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token already reaches p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def use_decode_layout(model: torch.nn.Module) -> None:
    """On the CPU, store wide Linear weights transposed in memory (same values, same shape).

    Decoding multiplies one token's vector by every weight matrix. For matrices
    with more outputs than inputs (the MLP's up/gate projections, the output
    head) the CPU kernels read an (in, out)-contiguous matrix about twice as fast
    as the (out, in) layout nn.Linear allocates; for the others it is no faster
    or slower (measured on the benchmark machine with scripts/bench_cpu.py).
    Values, shapes and training results are unchanged. Idempotent.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features > module.in_features:
                w = module.weight
                if w.device.type == "cpu" and w.is_contiguous() and type(w.data) is torch.Tensor:
                    w.data = w.data.t().contiguous().t()


@torch.inference_mode()
def generate(model: torch.nn.Module, input_ids, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
             stop_tokens: Sequence[int] = ()) -> torch.Tensor:
    """Return prompt + continuation token ids.

    input_ids: a list of ints, a (T,) tensor or a (B, T) tensor of equal-length prompts.
    Generation stops after `max_new_tokens` (capped by the model's context) or when
    every row has produced one of `stop_tokens`.
    """
    device = next(model.parameters()).device
    if device.type == "cpu":
        use_decode_layout(model)
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    squeeze = ids.dim() == 1
    if squeeze:
        ids = ids[None]
    B, T = ids.shape
    max_len = model.config.max_seq_len
    max_new_tokens = max(0, min(max_new_tokens, max_len - T))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache.for_model(model, B, T + max_new_tokens)
    was_training = model.training
    model.eval()
    out = [ids]
    logits = model(ids, cache=cache)[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        out.append(nxt[:, None])
        if len(stop):
            finished |= torch.isin(nxt, stop)
            if bool(finished.all()):
                break
        if i + 1 < max_new_tokens:
            logits = model(nxt[:, None], cache=cache)[:, -1]
    model.train(was_training)
    result = torch.cat(out, dim=1)
    return result[0] if squeeze else result
