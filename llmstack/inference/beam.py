"""Beam search: keep the `num_beams` most likely partial continuations at every step.

Scores follow transformers' definition, so results can be compared one to one:
a finished hypothesis scores  sum of its tokens' log-probs / (new tokens) ** length_penalty,
its EOS token counted. Each step ranks the num_beams * vocab candidate extensions by
summed log-prob; among the best num_beams of them, those ending in EOS (or reaching the
length limit) join a pool of the num_beams best finished hypotheses, and the best
num_beams candidates that did not finish continue. The KV cache holds one row per
beam; after each step its rows are reordered to follow the beams they continue.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from llmstack.config import is_int
from llmstack.inference.cpu import decoding_view
from llmstack.inference.generate import (check_max_new_tokens, check_prompts, evaluating, prompt_rows,
                                         resolve_stop_tokens)
from llmstack.model import KVCache


@dataclass
class Hypothesis:
    tokens: torch.Tensor  # (T + n,) prompt + continuation (its EOS token included)
    score: float  # log_prob / n ** length_penalty
    log_prob: float  # sum of the n continuation tokens' log-probabilities


def _check(model, prompt: torch.Tensor, max_new_tokens, num_beams, length_penalty, early_stopping,
           stop_tokens: list[int], num_return_sequences) -> int:
    """Validate the arguments; return the number of steps (max_new_tokens capped by the context)."""
    V = model.config.vocab_size
    check_max_new_tokens(max_new_tokens)
    check_prompts([prompt], V, model.config.max_seq_len, max_new_tokens)
    steps = max(0, min(max_new_tokens, model.config.max_seq_len - len(prompt)))
    # A width past the vocabulary is a mistake in practice, and each beam costs a KV-cache row.
    if not is_int(num_beams) or not 1 <= num_beams <= V:
        raise ValueError(f"num_beams must be an integer in [1, {V}] (the vocabulary size), got {num_beams}")
    if not is_int(num_return_sequences) or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be an integer in [1, num_beams={num_beams}], "
                         f"got {num_return_sequences}")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    for token in stop_tokens:
        if not 0 <= token < V:
            raise ValueError(f"stop token {token} is outside the vocabulary [0, {V - 1}]")
    return steps


def beam_search(model: torch.nn.Module, input_ids, max_new_tokens: int, *, num_beams: int,
                length_penalty: float = 1.0, early_stopping: bool | str = False,
                stop_tokens: Optional[Sequence[int]] = None, num_return_sequences: int = 1) -> list[Hypothesis]:
    """The `num_return_sequences` best hypotheses for one prompt, best first.

    stop_tokens:    a hypothesis that produces one of these has finished; default: the model's
                    end-of-text and end-of-turn tokens (`model.config.eos_token_ids`), `()` for none.
    length_penalty: > 0 favours longer hypotheses, < 0 shorter ones (only matters with EOS).
    early_stopping: True: stop once num_beams hypotheses have finished. False: stop once the
                    best running beam, scored at its current length, cannot beat the worst
                    finished one (transformers' default heuristic). "never": the same test
                    with the best length still possible, which makes the search exhaustive
                    for its width.
    Fewer hypotheses come back only when fewer distinct ones exist.
    """
    device = next(model.parameters()).device
    rows, _ = prompt_rows(input_ids, device)
    if len(rows) != 1:
        raise ValueError(f"beam_search takes one prompt (T,) or (1, T), got {len(rows)}")
    prompt = rows[0]
    stop_tokens = resolve_stop_tokens(model, stop_tokens)
    steps = _check(model, prompt, max_new_tokens, num_beams, length_penalty, early_stopping, stop_tokens,
                   num_return_sequences)
    if steps == 0:
        return [Hypothesis(prompt.clone(), 0.0, 0.0)]
    W, V, T = num_beams, model.config.vocab_size, len(prompt)
    # Each beam can finish through every stop token: with W * (1 + stops) candidates, W that did not
    # just finish always remain.
    K = min(W * (1 + len(stop_tokens)), W * V)
    stop = torch.tensor(stop_tokens, dtype=torch.long, device=device)
    neg_inf = float("-inf")
    finished: list[tuple[float, float, torch.Tensor]] = []  # (score, log_prob, continuation), best first
    running = torch.zeros(W, 0, dtype=torch.long, device=device)  # (W, n) continuations so far
    running_scores = torch.full((W,), neg_inf, device=device)
    running_scores[0] = 0.0  # only one real beam at the start: the others would repeat it
    model = decoding_view(model)  # on a multi-core CPU, the products split across threads
    with evaluating(model), torch.inference_mode():
        # Prefill once, then copy the prompt's keys/values into every beam's row.
        prompt_cache = KVCache.for_model(model, 1, T)
        logits = model(prompt[None], cache=prompt_cache, logits_to_keep=1)[:, -1]  # (1, V)
        cache = KVCache.for_model(model, W, T + steps)
        cache.k[:, :, :, :T] = prompt_cache.k
        cache.v[:, :, :, :T] = prompt_cache.v
        cache.advance(T)
        for step in range(steps):
            n = step + 1  # new tokens in each candidate, its own included
            candidates = running_scores[:, None] + torch.log_softmax(logits.float(), dim=-1)  # (W, V)
            top_scores, top_index = candidates.flatten().topk(K)  # (K,) best first
            origin, token = top_index // V, top_index % V
            last = step + 1 == steps
            finishing = torch.ones_like(token, dtype=torch.bool) if last else torch.isin(token, stop)
            # Only the best W candidates may finish; the rest are there to keep W beams running.
            for r in finishing[:W].nonzero().flatten().tolist():
                if top_scores[r] > neg_inf:
                    continuation = torch.cat([running[origin[r]], token[r:r + 1]])
                    finished.append((float(top_scores[r]) / n**length_penalty, float(top_scores[r]),
                                     continuation))
            finished = sorted(finished, key=lambda h: h[0], reverse=True)[:W]
            if last:
                break
            keep = top_scores.masked_fill(finishing, neg_inf).topk(W).indices  # (W,) best first
            running_scores, beam_origin = top_scores[keep], origin[keep]
            running = torch.cat([running[beam_origin], token[keep][:, None]], dim=1)
            if running_scores[0] == neg_inf:
                break  # every possible continuation has finished
            if len(finished) == W:
                if early_stopping is True:
                    break
                best_len = steps if early_stopping == "never" and length_penalty > 0 else n
                if float(running_scores[0]) / best_len**length_penalty <= finished[-1][0]:
                    break  # the best running beam cannot beat the worst finished hypothesis
            _reorder_rows(cache, beam_origin)
            logits = model(token[keep][:, None], cache=cache)[:, -1]  # (W, V)
    return [Hypothesis(torch.cat([prompt, cont]), score, log_prob)
            for score, log_prob, cont in finished[:num_return_sequences] if math.isfinite(score)]


def _reorder_rows(cache: KVCache, beam_origin: torch.Tensor) -> None:
    """Make row i of the filled cache slots a copy of row beam_origin[i]."""
    S = cache.seq_len
    cache.k[:, :, :, :S] = cache.k[:, :, :, :S].index_select(1, beam_origin)
    cache.v[:, :, :, :S] = cache.v[:, :, :, :S].index_select(1, beam_origin)
