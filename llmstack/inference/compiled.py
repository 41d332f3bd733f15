"""Decoding with a compiled step: every step has the same shapes, so it compiles once.

`KVCache.update` returns `k[:, :, :end]`, a slice one slot longer at every step:
under `torch.compile` each new length is a guard failure and a recompile (or a
slower dynamic-shape graph), and CUDA graphs need fixed shapes and addresses.
The decode step here follows gpt-fast instead:

  - the new key/value is written at a position given as a *tensor* (`index_copy_`),
  - attention reads the whole preallocated buffer, with a mask of the slots filled
    so far (`arange(slots) <= pos`) in place of the slice,
  - no Python number the model reads changes between steps (each would be a guard).

The prompt is prefilled eagerly into the same buffers, since its length varies by
request. A sliding-window model decodes into a ring of `window` slots (the
`RollingKVCache` layout: position p in slot p % window); one query may read its
keys in any order, so the ring needs no reordering and the mask is the same.

On a multi-core CPU the step is compiled from `decoding_view(model)`, whose
matrix-vector products are split across threads (`llmstack.inference.cpu`):
inductor's own code for such a product runs on one core. The view shares the
model's tensors; the model itself is not touched.

    decoder = CompiledDecoder(model, batch_size=1)
    ids = decoder.generate(prompt_ids, 100, temperature=0)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from llmstack.inference.cpu import decoding_view
from llmstack.inference.generate import check_max_new_tokens, check_prompts, evaluating, prompt_rows
from llmstack.inference.sampling import SamplingParams, sample_next
from llmstack.model.kv_cache import KVCache, RollingKVCache


class _SlotWriter:
    """The cache as one compiled step sees it: full buffers and a write slot as a tensor.
    `seq_len` is 0 and `advance` does nothing, so nothing the model reads changes between
    steps; the decoder moves the real cache's `seq_len` outside the compiled code."""

    seq_len = 0
    lengths = None
    block_table = None

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], slot: torch.Tensor):
        self.layers, self.slot = layers, slot

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_all, v_all = self.layers[layer]  # (B, Hkv, slots, D)
        k_all.index_copy_(2, self.slot, k)
        v_all.index_copy_(2, self.slot, v)
        return k_all, v_all

    def advance(self, n: int) -> None:
        pass


class CompiledDecoder:
    """Prefill eagerly, then decode one token per call with a `torch.compile`d step of fixed shapes.

    max_seq_len: the longest sequence (prompt + new tokens) the decoder takes. Left out, the
    cache is sized to each request instead, rounded up to a multiple of `SLOTS_STEP` (every
    step attends over all the slots, so a cache of the model's full context would make a
    short request pay for 8k slots); a longer request grows it, and a new size compiles the
    step once more. Given, the cache is allocated at that size now and never changes.
    mode: `torch.compile` mode; default "reduce-overhead" (CUDA graphs) on a GPU, the
    default mode on the CPU. backend: "inductor", or e.g. "eager"/"aot_eager" to check
    tracing without code generation. The model runs in eval mode and is left as it was;
    the compiled step reads its weights, so it must keep their shapes and devices.
    """

    SLOTS_STEP = 256

    def __init__(self, model: nn.Module, batch_size: int = 1, max_seq_len: Optional[int] = None, *,
                 mode: Optional[str] = None, backend: str = "inductor", dtype: Optional[torch.dtype] = None):
        cfg = model.config
        if max_seq_len is not None and not 1 <= max_seq_len <= cfg.max_seq_len:
            raise ValueError(f"max_seq_len must be in [1, {cfg.max_seq_len}] (model.max_seq_len), got {max_seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # Shares the model's tensors: in-place updates reach the step; a model moved to another device
        # or dtype needs a new decoder (the compiled graph is specialised to its tensors anyway).
        self.model = decoding_view(model)
        self.device = next(model.parameters()).device
        self.batch_size, self.dtype = batch_size, dtype
        self.max_seq_len = cfg.max_seq_len if max_seq_len is None else max_seq_len
        self.sized_to_request = max_seq_len is None
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self.mode, self.backend = mode, backend
        self.cache, self.capacity, self.slots = None, 0, 0
        if not self.sized_to_request:
            self._allocate(self.max_seq_len)

    def reserve(self, length: int) -> None:
        """Make room for a sequence of `length` tokens (prompt + new ones). `generate` calls it; call it
        before `prefill` to size the cache of a decoder built without max_seq_len yourself."""
        if length > self.max_seq_len:
            raise ValueError(f"a sequence of {length} tokens does not fit in max_seq_len={self.max_seq_len}")
        if length > self.capacity:
            self._allocate(min(-(-length // self.SLOTS_STEP) * self.SLOTS_STEP, self.max_seq_len))

    def _allocate(self, length: int) -> None:
        """A cache for sequences of `length` tokens (keeping what the current one holds) and its step."""
        old = self.cache
        window = self.model.config.sliding_window
        if window is not None and window < length:
            cache = RollingKVCache.for_model(self.model, self.batch_size, dtype=self.dtype)
        else:
            cache = KVCache.for_model(self.model, self.batch_size, length, dtype=self.dtype)
        if old is not None and old.seq_len:  # growing mid-sequence: carry the cached tokens over
            # The old cache is contiguous (a ring never needs to grow) and shorter than the window when
            # the new one is a ring: either way position p < seq_len sits in slot p of both.
            cache.k[..., :old.seq_len, :] = old.k[..., :old.seq_len, :]
            cache.v[..., :old.seq_len, :] = old.v[..., :old.seq_len, :]
            cache.seq_len = old.seq_len
        # A ring holds a sequence of any length.
        self.capacity = self.max_seq_len if isinstance(cache, RollingKVCache) else length
        self.cache, self.slots = cache, cache.k.shape[3]
        # The buffers never move: CUDA graphs may bake their addresses in.
        torch._dynamo.mark_static_address(cache.k)
        torch._dynamo.mark_static_address(cache.v)
        self._layers = cache._layers
        self._slot_ids = torch.arange(self.slots, device=self.device)
        options = {"mode": self.mode} if self.backend == "inductor" else {}
        self._step = torch.compile(self._decode, backend=self.backend, dynamic=False, **options)

    def _decode(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1) at position pos (1,) -> next-token logits (B, vocab)."""
        B = tokens.shape[0]
        filled = (self._slot_ids <= pos).expand(B, self.slots)  # (B, slots); all True once the ring is full
        cache = _SlotWriter(self._layers, pos % self.slots)
        return self.model(tokens, positions=pos, cache=cache, attn_mask=filled)[:, -1]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start a new sequence: run the prompt (B, T) eagerly into the cache; logits (B, vocab) of its last token."""
        B, T = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"input_ids has batch size {B}, the decoder was built for batch_size={self.batch_size}")
        if not 1 <= T <= self.max_seq_len:
            raise ValueError(f"the prompt has {T} tokens; it must have between 1 and max_seq_len={self.max_seq_len}")
        self.reserve(T)
        self.cache.reset()
        with evaluating(self.model):
            return self.model(input_ids, cache=self.cache, logits_to_keep=1)[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,) and return the next-token logits (B, vocab)."""
        pos = self.cache.seq_len if self.cache is not None else 0
        if pos == 0:
            raise ValueError("call prefill(prompt) before step()")
        if pos >= self.max_seq_len:
            raise ValueError(f"the sequence is full: max_seq_len={self.max_seq_len} tokens")
        if pos >= self.capacity:  # sized to an earlier request: grow (once per SLOTS_STEP tokens)
            self.reserve(pos + 1)
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with evaluating(self.model):
            logits = self._step(tokens.reshape(self.batch_size, 1), torch.tensor([pos], device=self.device))
        self.cache.advance(1)
        return logits.clone()  # a CUDA graph overwrites its output on the next replay

    def generate(self, input_ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, seed: Optional[int] = None) -> torch.Tensor:
        """Prompt + continuation, like `llmstack.generate` (a (T,) prompt or a (B, T) batch of equal lengths);
        max_new_tokens is capped by max_seq_len."""
        rows, kind = prompt_rows(input_ids, self.device)
        check_max_new_tokens(max_new_tokens)
        check_prompts(rows, self.model.config.vocab_size, self.max_seq_len, max_new_tokens)
        if any(len(row) != len(rows[0]) for row in rows):
            raise ValueError(f"CompiledDecoder takes prompts of one length, got lengths {[len(r) for r in rows]}; "
                             f"llmstack.generate batches prompts of different lengths")
        generator = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed).validate(
            self.model.config.vocab_size).make_generator(self.device)
        batch = torch.stack(rows)  # (B, T)
        max_new_tokens = min(max_new_tokens, self.max_seq_len - batch.shape[1])
        self.reserve(batch.shape[1] + max_new_tokens)
        new = []
        logits = self.prefill(batch)
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            new.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                logits = self.step(nxt)
        out = torch.cat([batch, *new], dim=1)
        return out[0] if kind == "single" else out

