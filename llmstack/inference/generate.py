"""Autoregressive generation: prefill the prompt into a KV cache, then one token per step."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

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


def stream_generate(model: torch.nn.Module, input_ids, max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                    stop_tokens: Sequence[int] = ()) -> Iterator:
    """Yield new tokens as they are produced: ints for a 1-D prompt, (B,) tensors for a
    (B, T) batch of equal-length prompts. Stops after `max_new_tokens` (capped by the
    model's context) or once every row has produced one of `stop_tokens`."""
    device = next(model.parameters()).device
    if device.type == "cpu":
        use_decode_layout(model)
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    single = ids.dim() == 1
    if single:
        ids = ids[None]
    B, T = ids.shape
    if T and (int(ids.max()) >= model.config.vocab_size or int(ids.min()) < 0):
        bad = int(ids.max()) if int(ids.max()) >= model.config.vocab_size else int(ids.min())
        raise ValueError(f"token id {bad} is outside the vocabulary (model.vocab_size={model.config.vocab_size})")
    max_new_tokens = max(0, min(max_new_tokens, model.config.max_seq_len - T))
    if max_new_tokens == 0:
        return
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = KVCache.for_model(model, B, T + max_new_tokens)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits = model(ids, cache=cache)[:, -1]
            for i in range(max_new_tokens):
                nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                yield int(nxt[0]) if single else nxt
                if len(stop):
                    finished |= torch.isin(nxt, stop)
                    if bool(finished.all()):
                        break
                if i + 1 < max_new_tokens:
                    logits = model(nxt[:, None], cache=cache)[:, -1]
    finally:
        model.train(was_training)


def generate(model: torch.nn.Module, input_ids, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
             stop_tokens: Sequence[int] = ()) -> torch.Tensor:
    """Return prompt + continuation token ids, using the KV cache; temperature 0 is greedy.

    input_ids: a list of ints, a (T,) tensor or a (B, T) tensor of equal-length prompts.
    """
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    batch = ids if ids.dim() == 2 else ids[None]
    new = [torch.as_tensor(t, device=device).reshape(-1, 1).expand(batch.shape[0], 1)
           for t in stream_generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=seed, stop_tokens=stop_tokens)]
    out = torch.cat([batch, *new], dim=1)
    return out[0] if ids.dim() == 1 else out
