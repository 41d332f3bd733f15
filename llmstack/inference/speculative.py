"""Speculative decoding: a cheap drafter proposes k tokens, the target checks them in one pass.

Each round the drafter (a small model trained with the same tokenizer, or a
lookup of the last n-gram in the text so far) proposes up to k tokens. The
target runs once over the last token plus the k proposals, which gives its
distribution at every proposed position and one past it. The longest prefix
the target accepts is kept, followed by one token of the target's own (a
correction at the first rejection, or a bonus token when all k pass), so every
target pass yields between 1 and k + 1 tokens. Both KV caches are then rolled
back past the rejected tokens with `KVCache.truncate`.

Greedy decoding accepts a proposal when it equals the target's argmax, so the
output is the target's own greedy output. Sampling uses the modified rejection
rule (Leviathan et al. 2023; Chen et al. 2023): accept x ~ q with probability
min(1, p(x) / q(x)), on rejection draw from norm(max(0, p - q)). The output is
then distributed exactly as sampling from the target alone, whatever the
drafter proposes; a good drafter only makes it faster. A prompt-lookup draft
is a point mass (q(x) = 1), for which the rule reads: accept with probability
p(x), on rejection draw from p with x removed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from llmstack.config import is_int
from llmstack.inference.cpu import decoding_view
from llmstack.inference.generate import (check_max_new_tokens, check_prompts, evaluating, prompt_rows,
                                         resolve_stop_tokens)
from llmstack.inference.loading import from_pretrained
from llmstack.inference.sampling import SamplingParams, process_logits
from llmstack.interop import load_tokenizer, resolve_checkpoint
from llmstack.model import KVCache


def sampling_probs(logits: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                   top_p: Optional[float] = None) -> torch.Tensor:
    """The distribution `sample_next` draws from, as probabilities (..., V) for logits (..., V).

    Temperature 0 is a point mass on the argmax. Rejection sampling needs the
    processed distributions of target and draft themselves, not just a draw.
    """
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    return process_logits(logits, params).softmax(dim=-1)


def accept_draft(target_probs: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: Optional[torch.Tensor] = None,
                 *, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One verification step of modified rejection sampling, for N independent rows.

    target_probs: (N, k+1, V) the target's distribution at each proposed position and one past.
    draft_tokens: (N, k) the proposals.
    draft_probs:  (N, k, V) the distributions they were drawn from; None for deterministic
                  (point-mass) proposals such as prompt lookup.
    Returns (accepted (N,), next_token (N,)): how many leading proposals are kept, and the
    token that follows them (drawn from the residual at the first rejection, from the
    target's last distribution when all k are kept).
    """
    N, k = draft_tokens.shape
    if k == 0:  # nothing proposed: a plain step
        return (torch.zeros(N, dtype=torch.long, device=target_probs.device),
                torch.multinomial(target_probs[:, 0], 1, generator=generator).squeeze(-1))
    p_x = target_probs[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)  # (N, k)
    q_x = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1) if draft_probs is not None else 1.0
    u = torch.rand((N, k), generator=generator, device=target_probs.device)
    keep = u * q_x < p_x  # u < p/q without dividing by zero; when p >= q this always holds
    accepted = keep.long().cumprod(dim=-1).sum(dim=-1)  # (N,) length of the kept prefix

    at = accepted[:, None, None].expand(N, 1, target_probs.shape[-1])
    p_next = target_probs.gather(1, at).squeeze(1)  # (N, V): p at the first rejection, or the bonus position
    rejected = (accepted < k)[:, None]
    if draft_probs is not None:
        q_pad = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)  # nothing to subtract at k
        residual = (p_next - q_pad.gather(1, at).squeeze(1)).clamp_min(0.0)
    else:
        x = torch.cat([draft_tokens, draft_tokens[:, :1]], dim=1).gather(1, accepted[:, None])  # (N, 1)
        residual = p_next.scatter(-1, x, 0.0)
        residual = torch.where(rejected, residual, p_next)
    # A rejection implies residual mass > 0 in exact arithmetic; guard against rounding all of it away.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    next_token = torch.multinomial(residual, 1, generator=generator).squeeze(-1)  # normalises the weights
    return accepted, next_token


@dataclass
class SpeculativeStats:
    """Counts over one `speculative_generate` call."""

    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, kept by the target
    new_tokens: int = 0  # tokens generated (accepted drafts plus one target token per pass)
    target_passes: int = 0  # target forward passes (the first one also reads the prompt)
    draft_passes: int = 0  # draft model forward passes (0 for prompt lookup)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Mean tokens gained per target pass: 1 for plain decoding, at most k + 1."""
        return self.new_tokens / self.target_passes if self.target_passes else 0.0


@dataclass
class SpeculativeOutput:
    ids: torch.Tensor  # prompt + continuation, shaped like the prompt
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)


class _ModelDrafter:
    """Proposes by decoding a small model; keeps its own KV cache in step with the text."""

    def __init__(self, model: torch.nn.Module, max_len: int):
        self.model = model
        self.cache = KVCache.for_model(model, 1, max_len)

    def propose(self, tokens: list[int], k: int, sample) -> tuple[list[int], Optional[torch.Tensor], int]:
        if k == 0:
            return [], None, 0
        device = self.cache.k.device
        feed = tokens[self.cache.seq_len:]  # the tokens it has not seen yet: one or two, the whole prompt at first
        proposal, dists = [], []
        for i in range(k):
            logits = self.model(torch.tensor([feed], device=device), cache=self.cache, logits_to_keep=1)[0, -1]  # (V,)
            token, dist = sample(logits)
            proposal.append(token)
            dists.append(dist)
            feed = [token]
        # The last proposal is not fed: if it is kept, it is fed with the next round's tokens.
        q = torch.stack(dists) if dists[0] is not None else None  # (k, V) when sampling
        return proposal, q, k

    def rollback(self, n_kept: int) -> None:
        self.cache.truncate(min(self.cache.seq_len, n_kept))


class _LookupDrafter:
    """Prompt lookup: propose what followed the most recent earlier occurrence of the last n-gram."""

    def __init__(self, ngram: int):
        self.ngram = ngram

    def propose(self, tokens: list[int], k: int, sample) -> tuple[list[int], None, int]:
        return (lookup_continuation(tokens, k, self.ngram) if k else []), None, 0

    def rollback(self, n_kept: int) -> None:
        pass


def lookup_continuation(tokens: Sequence[int], k: int, ngram: int = 3) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last `ngram`
    tokens, trying shorter n-grams down to 1 when the longer ones never occurred before;
    empty when even the last token is new. Code repeats names and whole lines, so the
    continuation of an earlier match is often exactly what comes next."""
    L = len(tokens)
    for n in range(min(ngram, L - 1), 0, -1):
        tail = list(tokens[L - n:])
        first = tail[0]
        for start in range(L - n - 1, -1, -1):  # most recent first; the tail itself is excluded
            if tokens[start] == first and list(tokens[start:start + n]) == tail:
                return list(tokens[start + n:start + n + k])
    return []


def load_draft(target_checkpoint, draft_checkpoint, *, device=None, dtype=None) -> torch.nn.Module:
    """The draft model of `draft_checkpoint` (a run or checkpoint directory), after checking that it
    was saved with `target_checkpoint`'s tokenizer: the same merges, not only the same vocabulary
    size, which is all `speculative_generate` can see. A draft with other token ids would still give
    the target's output, but with almost every proposal rejected."""
    target_dir, draft_dir = resolve_checkpoint(target_checkpoint), resolve_checkpoint(draft_checkpoint)
    draft = from_pretrained(draft_dir, device=device, dtype=dtype)  # first: its errors name a missing directory
    if load_tokenizer(target_dir).fingerprint() != load_tokenizer(draft_dir).fingerprint():
        raise ValueError(f"the draft's tokenizer ({draft_dir / 'tokenizer.json'}) differs from the target's "
                         f"({target_dir / 'tokenizer.json'}); speculative decoding needs one tokenizer")
    return draft


def speculative_generate(target: torch.nn.Module, input_ids, max_new_tokens: int, *,
                         draft: Optional[torch.nn.Module] = None, k: int = 4, ngram: Optional[int] = None,
                         temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                         seed: Optional[int] = None, stop_tokens: Optional[Sequence[int]] = None,
                         cache: Optional[KVCache] = None) -> SpeculativeOutput:
    """Generate like `generate(target, ...)` for one prompt, several tokens per target pass.

    draft: a smaller model with the target's tokenizer (`load_draft` checks that); None drafts
           by prompt lookup (`ngram`-gram matches in the prompt and the text generated so far).
    k:     tokens proposed per round (fewer near the end of `max_new_tokens`).
    Greedy output (temperature 0) is the target's own greedy output; with sampling the
    output follows the target's distribution exactly (same temperature, top_k, top_p).
    cache: optionally an empty KVCache for the target with room for the prompt and the new
           tokens; on return it holds every token but the last, as after plain decoding.
    Returns the ids (1-D for a 1-D prompt, (1, T') for a (1, T) one) and SpeculativeStats.
    """
    device = next(target.parameters()).device
    rows, kind = prompt_rows(input_ids, device)
    if len(rows) != 1:
        raise ValueError(f"input_ids must be one prompt, (T,) or (1, T); got {len(rows)}")
    prompt = rows[0].tolist()
    V = target.config.vocab_size
    check_max_new_tokens(max_new_tokens)
    check_prompts(rows, V, target.config.max_seq_len, max_new_tokens)
    if draft is not None and ngram is not None:
        raise ValueError("ngram applies to prompt lookup (draft=None); a draft model proposes its own tokens")
    ngram = 3 if ngram is None else ngram
    for name, value in (("k", k), ("ngram", ngram)):
        if not is_int(value) or value < 1:
            what = " (tokens proposed per round)" if name == "k" else ""
            raise ValueError(f"{name} must be an integer >= 1{what}, got {value!r}")
    # The same rules as generate.
    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed).validate(V)

    T = len(prompt)
    total = T + max(0, min(max_new_tokens, target.config.max_seq_len - T))
    if draft is not None:
        if draft.config.vocab_size != V:
            raise ValueError(f"the draft model's vocab_size={draft.config.vocab_size} differs from the target's "
                             f"vocab_size={V}; speculative decoding needs both to share one tokenizer")
        if draft.config.max_seq_len < total:
            raise ValueError(f"the draft model's max_seq_len={draft.config.max_seq_len} is shorter than the "
                             f"{total} tokens of prompt + max_new_tokens")
    if cache is None:
        cache = KVCache.for_model(target, 1, total)
    elif cache.seq_len != 0 or cache.max_seq_len < total:
        raise ValueError(f"cache must be empty with room for {total} tokens; it holds {cache.seq_len} "
                         f"of max_seq_len={cache.max_seq_len}")

    greedy = temperature == 0.0
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    def sample(logits: torch.Tensor) -> tuple[int, Optional[torch.Tensor]]:
        """Draw the draft's next token; with sampling also return the distribution q it came from."""
        if greedy:
            return int(logits.argmax()), None
        q = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        return int(torch.multinomial(q, 1, generator=generator)), q

    target = decoding_view(target)  # on a multi-core CPU, the products split across threads
    draft = decoding_view(draft) if draft is not None else None
    drafter = _ModelDrafter(draft, total) if draft is not None else _LookupDrafter(ngram)
    stats = SpeculativeStats()
    stop = set(resolve_stop_tokens(target, stop_tokens))
    tokens = list(prompt)
    with evaluating(target, draft), torch.inference_mode():
        while len(tokens) < total:
            # Never propose past the budget: the target adds one token of its own to every round.
            k_round = min(k, total - len(tokens) - 1)
            proposal, q, passes = drafter.propose(tokens, k_round, sample)
            stats.draft_passes += passes
            n = len(proposal)
            # The target reads what its cache lacks (the prompt at first, then the last
            # token) plus the proposals: logits for each proposal's position and one past.
            feed = tokens[cache.seq_len:] + proposal
            logits = target(torch.tensor([feed], device=device), cache=cache)[0, -(n + 1):]  # (n+1, V)
            stats.target_passes += 1
            if greedy:
                best = logits.argmax(-1).tolist()  # (n+1,)
                accepted = next((i for i in range(n) if proposal[i] != best[i]), n)
                next_token = best[accepted]
            else:
                p = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
                drafts = torch.tensor([proposal], dtype=torch.long, device=device).reshape(1, n)
                acc, nxt = accept_draft(p[None], drafts, q[None] if q is not None else None, generator=generator)
                accepted, next_token = int(acc[0]), int(nxt[0])
            # Keep the text so far and the accepted proposals; the new last token is not yet cached.
            cache.truncate(len(tokens) + accepted)
            drafter.rollback(len(tokens) + accepted)
            new = proposal[:accepted] + [next_token]
            stats.proposed += n
            stats.accepted += accepted
            hit = next((i for i, t in enumerate(new) if t in stop), None)
            if hit is not None:
                new = new[:hit + 1]
            tokens += new
            stats.new_tokens += len(new)
            if hit is not None:
                cache.truncate(min(cache.seq_len, len(tokens) - 1))
                break
    out = torch.tensor(tokens, dtype=torch.long, device=device)
    return SpeculativeOutput(ids=out if kind == "single" else out[None], stats=stats)
