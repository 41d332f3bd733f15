"""The continuous-batching engine: requests join and leave the running batch at every step.

    engine = Engine(model, tokenizer)
    engine.add_request([1, 2, 3], max_tokens=20, temperature=0)
    while engine.has_work():
        for out in engine.step():               # one step: every running request advances
            print(out.request.id, out.token, out.text, out.finished)

One step (Orca's iteration-level scheduling, vLLM's scheduler, simplified):
1. Running requests first, decodes before prompt chunks, oldest first: a decoding one needs 1
   token, one still reading its prompt (chunked prefill) the rest of it, up to the step's token
   budget. When the pool has no block for them, the newest running request is preempted: its
   blocks are freed and it goes back to the front of the queue, to be recomputed (prompt +
   what it has generated).
2. Waiting requests are admitted while the budget, `max_running` and free blocks allow; a
   prompt starting with cached blocks (prefix caching) skips them.
3. The forward pass: prompt chunks and decodes together in one forward, in `PagedKVCache`'s
   rows or packed layout, or as two forwards (decodes, chunks) when that costs fewer
   multiply-adds (`_plan`: on a CPU, with attention through a mask, it often does); each request
   whose tokens are now all read samples its next token with its own sampling parameters,
   generator and penalties, and finishes on its own (stop token, stop string, max_tokens, the
   model's context), freeing its blocks.

Greedy outputs equal `llmstack.generate` of each prompt alone, whatever the mix (up to float
rounding: a different batch shape sums in a different order).
"""
from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from llmstack.inference.generate import StopText, check_token_ids, evaluating, resolve_stop_tokens, text_stop_tokens
from llmstack.inference.sampling import SamplingParams, TokenHistory, sample
from llmstack.serve.paged import BlockPool, NoFreeBlocks, PagedKVCache, block_hash

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)  # compared and hashed by identity
class Request:
    """One sequence being generated. `tokens` is prompt + output; the first `computed` of them
    have their keys and values in `blocks`."""

    id: str
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop_tokens: list[int]
    stop_strings: tuple[str, ...] = ()
    logprobs: Optional[int] = None  # how many top alternatives to report per token (0: the chosen one only)
    output: list[int] = field(default_factory=list)
    output_logprobs: list[dict] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the full blocks
    computed: int = 0
    status: str = WAITING
    finish_reason: Optional[str] = None  # "stop" (stop token or string), "length", "abort"
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    last_token_at: Optional[float] = None
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    generator: Optional[torch.Generator] = None
    history: Optional[TokenHistory] = None
    watcher: Optional[StopText] = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def tokens_between(self, start: int, end: int) -> list[int]:
        """tokens[start:end], without building prompt + output."""
        P = len(self.prompt)
        return self.prompt[start:min(end, P)] + self.output[max(start - P, 0):max(end - P, 0)]

    @property
    def text(self) -> str:
        """The output text so far (cut before a stop string); needs a tokenizer's stop watcher."""
        return self.watcher.text if self.watcher is not None else ""


@dataclass
class StepOutput:
    """What one step did for one request: a new token (None when the request only ended) and the
    text that became final with it."""

    request: Request
    token: Optional[int]
    text: str
    finished: bool
    logprob: Optional[dict] = None


@dataclass
class EngineStats:
    steps: int = 0
    forward_tokens: int = 0  # tokens through the model (prompt + decode)
    generated_tokens: int = 0
    preemptions: int = 0
    finished: int = 0


class Engine:
    """Continuous batching over a paged KV cache. Not thread-safe: one thread calls `add_request`,
    `abort` and `step` (the server runs it in its own thread).

    block_size:       tokens per KV block.
    n_blocks:         blocks in the pool (block 0 is the null block); default: enough for
                      `max_running` sequences of the whole context, or `kv_bytes` of memory if less.
    max_batch_tokens: the step's token budget (prompt chunks + decodes).
    max_running:      sequences in the running batch at most.
    prefix_caching:   share full blocks of identical prefixes between requests.
    layout:           how a step's sequences go through the model (see `_plan`): "auto" picks
                      the fewest multiply-adds; "rows", "packed" or "split" force one (tests).
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, *, block_size: int = 16,
                 n_blocks: Optional[int] = None, kv_bytes: int = 2 << 30, max_batch_tokens: int = 512,
                 max_running: int = 64, prefix_caching: bool = True, layout: str = "auto"):
        if max_batch_tokens < max_running:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be >= max_running ({max_running}), so "
                             "that every running sequence can decode at each step")
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.max_seq_len = cfg.max_seq_len
        if n_blocks is None:
            param = next(model.parameters())
            per_block = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * block_size * param.element_size()
            n_blocks = 1 + min(max_running * math.ceil(cfg.max_seq_len / block_size), kv_bytes // per_block)
        self.pool = BlockPool(n_blocks, block_size, prefix_caching=prefix_caching)
        if self.pool.usable * block_size < cfg.max_seq_len:
            raise ValueError(f"{n_blocks} blocks of {block_size} tokens cannot hold one sequence of the model's "
                             f"context ({cfg.max_seq_len} tokens)")
        # Rows hand the pools and block tables to attention, which reads the blocks in place (the
        # Triton kernel on a GPU) or gathers rows of like lengths together (a CPU); packed steps
        # are gathered by the cache.
        self.cache = PagedKVCache.for_model(model, self.pool, gather_in_attention=True)
        if layout not in ("auto", "rows", "packed", "split"):
            raise ValueError(f"layout must be auto, rows, packed or split, got {layout!r}")
        self.max_batch_tokens, self.max_running, self.layout = max_batch_tokens, max_running, layout
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self.device = next(model.parameters()).device
        # multiply-adds per token in the weights, and per (query, key) pair in attention, for _plan
        self._token_cost = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
        self._pair_cost = 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim
        self.default_stop_tokens = (text_stop_tokens(model, tokenizer) if tokenizer is not None
                                    else resolve_stop_tokens(model, None))

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt: Sequence[int], *, max_tokens: int = 16, temperature: float = 1.0,
                    top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                    repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                    seed: Optional[int] = None, stop_tokens: Optional[Sequence[int]] = None,
                    stop_strings: Sequence[str] = (), logprobs: Optional[int] = None,
                    request_id: Optional[str] = None) -> Request:
        """Queue a prompt (token ids). Raises ValueError for a bad argument, before anything is queued."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                                presence_penalty=presence_penalty, seed=seed).validate(self.model.config.vocab_size)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        check_token_ids(torch.tensor(prompt), self.model.config.vocab_size)
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens, which leaves no room for new ones in the "
                             f"model's context ({self.max_seq_len})")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens}")
        stop_strings = tuple(stop_strings)
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(request_id, prompt, params, max_tokens,
                      list(stop_tokens) if stop_tokens is not None else list(self.default_stop_tokens),
                      stop_strings, logprobs)
        req.generator = params.make_generator(self.device)
        if params.has_penalties:
            req.history = TokenHistory([prompt], self.model.config.vocab_size, self.device)
        if self.tokenizer is not None:
            req.watcher = StopText(stop_strings, self.tokenizer.decode)
        self.requests[request_id] = req
        self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> Optional[Request]:
        """Stop a request now (a client went away) and free its blocks; None if it is not here."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status == WAITING:
            self.waiting.remove(req)
        self._finish(req, "abort")
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ scheduling

    def _ensure_blocks(self, req: Request, n_tokens: int) -> None:
        """Give `req` blocks for its first n_tokens tokens (raises NoFreeBlocks, keeping those it got)."""
        while len(req.blocks) * self.pool.block_size < n_tokens:
            req.blocks.append(self.pool.allocate())

    def _free(self, req: Request) -> None:
        self.pool.release(req.blocks)
        req.blocks, req.keys, req.computed = [], [], 0

    def _preempt(self, req: Request) -> None:
        """Recompute later: free the blocks, and queue `req` first, with its output so far kept."""
        self.running.remove(req)
        self._free(req)
        req.status = WAITING
        req.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(req)

    def _schedule(self) -> list[tuple[Request, int]]:
        """This step's (request, tokens to compute) pairs: decodes first, so that a long prompt
        chunk never delays a token already being streamed, then chunks, then admissions."""
        budget = self.max_batch_tokens
        scheduled: dict[Request, int] = {}
        for req in sorted(self.running, key=lambda r: r.num_tokens - r.computed > 1):  # stable: oldest first
            if req.status != RUNNING:  # preempted below, for an older request
                continue
            n = min(req.num_tokens - req.computed, budget)
            if n <= 0:
                continue
            while True:
                try:
                    self._ensure_blocks(req, req.computed + n)
                    break
                except NoFreeBlocks:
                    victim = self.running[-1]  # the newest
                    budget += scheduled.pop(victim, 0)
                    self._preempt(victim)
                    if victim is req:
                        break
            if req.status == RUNNING:
                scheduled[req] = n
                budget -= n
        batch = list(scheduled.items())
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            tokens = req.tokens
            if not req.blocks:  # a new or preempted request: start from its cached prefix
                req.blocks, req.keys = self.pool.match_prefix(tokens)
                req.computed = len(req.blocks) * self.pool.block_size
                if not req.output:
                    req.cached_tokens = req.computed
            n = min(len(tokens) - req.computed, budget)
            try:
                self._ensure_blocks(req, req.computed + n)
            except NoFreeBlocks:
                self._free(req)  # wait for running requests to finish
                break
            self.waiting.popleft()
            req.status = RUNNING
            self.running.append(req)
            batch.append((req, n))
            budget -= n
        return batch

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Schedule, run the forward pass, sample; return what each request produced."""
        outputs: list[StepOutput] = []
        batch = self._schedule()
        if not batch:
            return outputs
        self.stats.steps += 1
        tables = [req.blocks for req, _ in batch]
        starts = [req.computed for req, _ in batch]
        counts = [n for _, n in batch]
        ids = [req.tokens_between(s, s + n) for (req, n), s in zip(batch, starts)]
        hidden = [None] * len(batch)
        with evaluating(self.model):
            for layout, items in self._plan(tables, counts):
                h = self._forward(layout, [tables[i] for i in items], [starts[i] for i in items],
                                  [counts[i] for i in items], [ids[i] for i in items])
                for row, i in enumerate(items):
                    hidden[i] = h[row]
        self.stats.forward_tokens += sum(counts)
        ready = []
        for i, (req, n) in enumerate(batch):
            req.computed += n
            self._register_full_blocks(req)
            if req.computed == req.num_tokens:
                ready.append(i)
        if ready:
            logits = self.model.head(torch.stack([hidden[i] for i in ready])).float()  # (R, V)
            # Greedy rows without penalties: one argmax for all of them (what `sample` does per row).
            plain = [row for row, i in enumerate(ready) if batch[i][0].params.greedy and batch[i][0].history is None]
            chosen = dict(zip(plain, logits[plain].argmax(dim=-1).tolist())) if plain else {}
            for row, i in enumerate(ready):
                outputs.append(self._sample(batch[i][0], logits[row:row + 1], chosen.get(row)))
        return outputs

    def _forward(self, layout: str, tables, starts, counts, ids) -> torch.Tensor:
        """One forward pass over these sequences' new tokens; the hidden state of each one's last
        token (B, C)."""
        device = self.device
        if layout == "rows":  # one sequence per row, right-padded to the longest chunk
            T = max(counts)
            self.cache.set_rows(tables, starts, T, counts)
            x = torch.tensor([row + [0] * (T - len(row)) for row in ids], dtype=torch.long, device=device)  # (B, T)
            positions = (torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)
                         ).clamp(max=self.max_seq_len - 1)  # padding's positions are never used
            h = self.model(x, cache=self.cache, positions=positions, return_hidden=True)  # (B, T, C)
            return h[torch.arange(len(ids), device=device), torch.tensor(counts, device=device) - 1]
        positions, mask = self.cache.set_packed(tables, starts, counts)  # every sequence in one row
        x = torch.tensor([t for row in ids for t in row], dtype=torch.long, device=device)[None]  # (1, N)
        h = self.model(x, cache=self.cache, positions=positions, attn_mask=mask, return_hidden=True)[0]  # (N, C)
        return h[torch.tensor(counts, device=device).cumsum(0) - 1]

    def _plan(self, tables: list[list[int]], counts: list[int]) -> list[tuple[str, list[int]]]:
        """The step's forward passes: (layout, which sequences). Prompt chunks and decodes go
        through one forward, as rows (each sequence padded to the longest chunk, attending over its
        own blocks) or packed (no padding, but every token scores the keys of every sequence in
        the row before the mask hides them), or, when that costs fewer multiply-adds, as two: the
        decodes as rows, the chunks as the cheaper of the two. `self.layout` forces one."""
        everything = list(range(len(counts)))
        decodes = [i for i in everything if counts[i] == 1]
        chunks = [i for i in everything if counts[i] > 1]
        if self.layout in ("rows", "packed"):
            return [(self.layout, everything)]
        if len(set(counts)) == 1:
            return [("rows", everything)]
        if self.layout == "split":
            return [("rows", decodes), ("packed", chunks)] if decodes else [("packed", everything)]
        bs = self.pool.block_size

        def cost(layout: str, items: list[int]) -> float:
            if layout == "rows":
                queries, keys = len(items) * max(counts[i] for i in items), max(len(tables[i]) for i in items) * bs
            else:
                queries, keys = sum(counts[i] for i in items), sum(len(tables[i]) for i in items) * bs
            return queries * (self._token_cost + self._pair_cost * keys)

        def best(items: list[int]) -> tuple[str, list[int]]:
            return min(("rows", items), ("packed", items), key=lambda plan: cost(*plan))

        plans = [[best(everything)]]
        if decodes and chunks:
            plans.append([("rows", decodes), best(chunks)])
        return min(plans, key=lambda plan: sum(cost(*p) for p in plan))

    def _register_full_blocks(self, req: Request) -> None:
        bs = self.pool.block_size
        full = min(req.computed, req.num_tokens) // bs
        while len(req.keys) < full:
            i = len(req.keys)
            key = block_hash(req.keys[-1] if req.keys else None, req.tokens_between(i * bs, (i + 1) * bs))
            self.pool.register(req.blocks[i], key)
            req.keys.append(key)

    def _sample(self, req: Request, logits: torch.Tensor, token: Optional[int] = None) -> StepOutput:
        if token is None:
            token = int(sample(logits, req.params, history=req.history, generator=req.generator)[0])
        now = time.perf_counter()
        if req.first_token_at is None:
            req.first_token_at = now
        req.last_token_at = now
        logprob = None
        if req.logprobs is not None:
            lp = torch.log_softmax(logits[0], dim=-1)
            top = lp.topk(min(req.logprobs, lp.numel())) if req.logprobs else None
            logprob = {"token": token, "logprob": float(lp[token]),
                       "top": [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))}
            req.output_logprobs.append(logprob)
        req.output.append(token)
        self.stats.generated_tokens += 1
        if req.history is not None:
            req.history.append(torch.tensor([token], device=self.device))
        text, reason = "", None
        if token in req.stop_tokens:
            reason = "stop"
        else:
            if req.watcher is not None:
                text = req.watcher.push(token)
                if req.watcher.stopped:
                    reason = "stop"
            if reason is None and (len(req.output) >= req.max_tokens or req.num_tokens >= self.max_seq_len):
                reason = "length"
        if reason is not None:
            if req.watcher is not None:
                text += req.watcher.flush()
            self._finish(req, reason)
        return StepOutput(req, token, text, reason is not None, logprob)

    def _finish(self, req: Request, reason: str) -> None:
        if req.status == RUNNING:
            self.running.remove(req)
        self._free(req)
        req.status, req.finish_reason = FINISHED, reason
        self.requests.pop(req.id, None)
        self.stats.finished += 1

    # ------------------------------------------------------------------ measures

    def kv_waste(self) -> float:
        """Allocated but unused slots of the running sequences, as a fraction of their allocation."""
        allocated = sum(len(r.blocks) for r in self.running) * self.pool.block_size
        used = sum(min(r.computed, len(r.blocks) * self.pool.block_size) for r in self.running)
        return (allocated - used) / allocated if allocated else 0.0

    def generate(self, prompts: Sequence[Sequence[int]], on_output: Optional[Callable[[StepOutput], None]] = None,
                 **kwargs) -> list[list[int]]:
        """Run prompts (token ids) to completion; each one's output tokens, in the prompts' order.
        `kwargs`: `add_request`'s, the same for every prompt."""
        reqs = [self.add_request(p, **kwargs) for p in prompts]
        while self.has_work():
            for out in self.step():
                if on_output is not None:
                    on_output(out)
        return [r.output for r in reqs]
