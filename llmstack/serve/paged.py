"""The paged KV cache: fixed-size blocks in one pool per layer, and the blocks' bookkeeping.

vLLM's idea (PagedAttention): instead of one contiguous (max_seq_len) buffer per sequence,
keys and values live in blocks of `block_size` tokens, and each sequence owns a list of
blocks (its block table) that grows as it does. A sequence wastes at most one partly
filled block, any free block serves any sequence, and identical prefixes can share blocks.

    pool = BlockPool(n_blocks=256, block_size=16)         # which block is free, shared, cached
    cache = PagedKVCache.for_model(model, pool)            # the k/v pools: (n_blocks, Hkv, 16, D) per layer
    cache.set_rows(block_tables, lengths, T)              # this step's layout, then model(ids, cache=cache)

Block 0 is never handed out: it is the null block that pads block tables, and where padding
tokens write. `kv_lengths` hides the slots past each row's length. By default the cache gathers
each row's blocks into contiguous keys itself, with one indexing op per layer whose index is
computed once per step; `gather_in_attention=True` (the engine's choice for its rows) instead
hands the pools and the block table to attention (`attention(..., block_table=)`), which reads
the blocks in place with the Triton paged-decode kernel (`llmstack.kernels.paged_decode`, the
`triton` backend) or gathers rows of like lengths together (`gather_blocks`).

Prefix caching: a full block is keyed by a hash of its tokens and of every token before it
(the hash of the block before it), so two requests whose prompts start alike find the same
blocks. A block nobody uses any more keeps its contents and its key until a new block is
needed and no never-used one is left; then the least recently used such block is evicted.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from typing import Optional, Sequence

import torch
from torch import nn

NULL_BLOCK = 0


def block_hash(parent: Optional[bytes], tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block: sha256 of the previous block's key and its tokens."""
    h = hashlib.sha256(parent or b"")
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()


class NoFreeBlocks(RuntimeError):
    """The pool has no free block left (the scheduler preempts a sequence and retries)."""


class BlockPool:
    """Which blocks are free, how many sequences use each one (reference counts), and the prefix
    cache: full blocks by key, and the unused ones among them in least-recently-used order."""

    def __init__(self, n_blocks: int, block_size: int = 16, *, prefix_caching: bool = True):
        if n_blocks < 2:
            raise ValueError(f"n_blocks must be >= 2 (block 0 is the null block), got {n_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.n_blocks, self.block_size, self.prefix_caching = n_blocks, block_size, prefix_caching
        self.refs = [0] * n_blocks
        self._free: deque[int] = deque(range(1, n_blocks))  # never used, or whose key was dropped
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; oldest first
        self.queries = self.hits = 0  # prompt tokens looked up in the prefix cache, and found
        self.evictions = 0

    @property
    def usable(self) -> int:
        """Blocks a sequence can ever use (all but the null block)."""
        return self.n_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out now (free ones and unused cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.usable - self.num_free

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def allocate(self) -> int:
        """A block for one sequence (reference count 1). Raises NoFreeBlocks when none is left."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)  # the least recently used cached block
            del self._by_key[self._key_of.pop(block)]
            self.evictions += 1
        else:
            raise NoFreeBlocks("no free KV block")
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more sequence uses `block` (a prefix-cache hit)."""
        if self.refs[block] == 0:
            self._evictable.pop(block)
        self.refs[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """These blocks' sequence is done with them (freed in reverse order, so that a sequence's
        first blocks, the most shareable, are evicted last)."""
        for block in reversed(blocks):
            if self.refs[block] <= 0:
                raise RuntimeError(f"block {block} released more times than it was allocated")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None  # most recently used end
                else:
                    self._free.append(block)

    def lookup(self, key: bytes) -> Optional[int]:
        return self._by_key.get(key) if self.prefix_caching else None

    def register(self, block: int, key: bytes) -> None:
        """`block` is full and holds the tokens `key` names: later prompts may share it."""
        if self.prefix_caching and key not in self._by_key and block not in self._key_of:
            self._by_key[key] = block
            self._key_of[block] = key

    def match_prefix(self, tokens: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """The cached blocks that hold a prefix of `tokens` (whole blocks, and never the last token:
        its logits are needed, so it is always computed), shared now, and their keys."""
        blocks, keys, parent = [], [], None
        if self.prefix_caching:
            for i in range((len(tokens) - 1) // self.block_size):
                key = block_hash(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
                block = self._by_key.get(key)
                if block is None:
                    break
                self.share(block)
                blocks.append(block)
                keys.append(key)
                parent = key
            self.queries += len(tokens)
            self.hits += len(blocks) * self.block_size
        return blocks, keys


class PagedKVCache(nn.Module):
    """k and v pools of shape (n_blocks, Hkv, block_size, D) per layer, with the cache interface of
    `llmstack.model.kv_cache`: `update` stores this step's keys at the slots `set_rows` (or
    `set_packed`) laid out and returns each row's keys (or the pools, with `block_table`, when
    `gather_in_attention`), and `lengths` reach attention.

    Two layouts of one step:
    - rows (`set_rows`): one sequence per row, every row T new tokens (decode: T = 1); row b's
      tokens sit after its lengths[b] cached ones. No mask is needed: kv_lengths does it.
    - packed (`set_packed`): all sequences' new tokens in one row (prefill chunks and decodes of
      different lengths, in one forward), with a (1, N, S) mask saying which gathered slots
      each token sees (its own sequence's, up to itself).
    """

    def __init__(self, n_layers: int, pool: BlockPool, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 gather_in_attention: bool = False):
        super().__init__()
        self.pool, self.gather_in_attention = pool, gather_in_attention
        shape = (n_layers, pool.n_blocks, n_kv_heads, pool.block_size, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.block_table: Optional[torch.Tensor] = None
        self.lengths: Optional[torch.Tensor] = None
        self.seq_len = 0
        self._blocks = self._offsets = None  # (B * T,) where each new token is written
        self._gather: Optional[torch.Tensor] = None  # (B, Hkv, S): rows of a layer's pool.view(-1, D) to read
        self.table: Optional[torch.Tensor] = None  # (B, blocks): this step's block table

    @classmethod
    def for_model(cls, model: nn.Module, pool: BlockPool, *, dtype: Optional[torch.dtype] = None,
                  gather_in_attention: bool = False) -> "PagedKVCache":
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.n_layers, pool, cfg.n_kv_heads, cfg.head_dim, dtype=dtype or param.dtype, device=param.device,
                   gather_in_attention=gather_in_attention)

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def bytes_per_block(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def _write_at(self, tables: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]) -> None:
        """Token i of row b goes to block tables[b][positions[b][i] // block_size] (the null block for
        a position of -1: padding), at offset position % block_size."""
        bs = self.block_size
        blocks = [table[p // bs] if p >= 0 else NULL_BLOCK for table, pos in zip(tables, positions) for p in pos]
        offsets = [p % bs if p >= 0 else 0 for pos in positions for p in pos]
        self._blocks = torch.tensor(blocks, dtype=torch.long, device=self.k.device)
        self._offsets = torch.tensor(offsets, dtype=torch.long, device=self.k.device)

    def set_rows(self, tables: Sequence[Sequence[int]], lengths: Sequence[int], T: int,
                 counts: Optional[Sequence[int]] = None) -> None:
        """Row b holds lengths[b] tokens in the blocks tables[b] (enough for lengths[b] + counts[b]),
        and this step brings T tokens to every row, of which counts[b] (default T) are real: the
        rest is right padding, written to the null block and seen by no real token (they come
        after it, and attention is causal)."""
        counts = counts if counts is not None else [T] * len(tables)
        width = max(len(t) for t in tables)
        padded = [list(t) + [NULL_BLOCK] * (width - len(t)) for t in tables]
        self._set_table(torch.tensor(padded, dtype=torch.long, device=self.k.device))  # (B, blocks)
        self.lengths = torch.tensor(list(lengths), dtype=torch.long, device=self.k.device)  # (B,)
        self.seq_len = max(lengths)
        self._write_at(tables, [[n + i if i < c else -1 for i in range(T)] for n, c in zip(lengths, counts)])

    def set_packed(self, tables: Sequence[Sequence[int]], starts: Sequence[int], counts: Sequence[int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """One row holding counts[r] new tokens of each sequence r, which already has starts[r]
        tokens in blocks tables[r]. Returns the positions (1, N) and the attention mask (1, N, S)
        to pass to the model: token i of sequence r sees its sequence's slots 0..starts[r] + i."""
        bs, device = self.block_size, self.k.device
        flat = [b for t in tables for b in t]
        S, N = len(flat) * bs, sum(counts)
        # Always gathered here: the model cuts a mask wider than the keys it is handed (a rolling
        # cache's), which a pool would trip.
        self._set_table(torch.tensor([flat], dtype=torch.long, device=device), in_attention=False)  # (1, blocks)
        # kv_lengths = lengths + N = S: every gathered slot is a key; the queries are the last N
        # slots for the causal mask, which then hides nothing the mask below allows (each
        # sequence's slots come no later than its queries' places in that alignment).
        self.lengths = torch.tensor([S - N], dtype=torch.long, device=device)
        self.seq_len = S - N
        positions = [range(s, s + c) for s, c in zip(starts, counts)]
        self._write_at(tables, positions)
        pos = torch.tensor([p for r in positions for p in r], dtype=torch.long, device=device)  # (N,)
        base = torch.tensor([0, *torch.tensor([len(t) * bs for t in tables]).cumsum(0).tolist()[:-1]],
                            dtype=torch.long, device=device)  # first gathered slot of each sequence
        seq = torch.repeat_interleave(torch.arange(len(tables), device=device),
                                      torch.tensor(list(counts), device=device))  # (N,) sequence of each token
        slot = torch.arange(S, device=device)
        mask = (slot >= base[seq, None]) & (slot <= base[seq, None] + pos[:, None])  # (N, S)
        return pos[None], mask[None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, Hkv, T, D = k.shape
        k_pool, v_pool = self.k[layer], self.v[layer]
        # pool[block, :, offset] for each new token: (B * T, Hkv, D)
        k_pool[self._blocks, :, self._offsets] = k.transpose(1, 2).reshape(B * T, Hkv, D)
        v_pool[self._blocks, :, self._offsets] = v.transpose(1, 2).reshape(B * T, Hkv, D)
        if self._gather is None:
            return k_pool, v_pool  # with self.block_table: attention gathers
        # index_select of D-wide rows: 2-3x faster than advanced indexing with the same index
        shape = (*self._gather.shape, D)  # (B, Hkv, S, D)
        return (k_pool.view(-1, D).index_select(0, self._gather_flat).view(shape),
                v_pool.view(-1, D).index_select(0, self._gather_flat).view(shape))

    def _set_table(self, table: torch.Tensor, in_attention: Optional[bool] = None) -> None:
        """Read row b's keys from blocks table[b] (B, blocks): here, through one index into the pool
        seen as (n_blocks * Hkv * block_size, D) rows, or by attention (`block_table`)."""
        in_attention = self.gather_in_attention if in_attention is None else in_attention
        self.table = table
        if in_attention:
            self.block_table, self._gather = table, None
            return
        _, _, Hkv, bs, _ = self.k.shape
        B, n = table.shape
        heads = torch.arange(Hkv, device=table.device)[None, :, None, None]
        slots = torch.arange(bs, device=table.device)
        self._gather = ((table[:, None, :, None] * Hkv + heads) * bs + slots).reshape(B, Hkv, n * bs)
        self._gather_flat = self._gather.reshape(-1)
        self.block_table = None

    def advance(self, n: int) -> None:
        """The scheduler keeps each sequence's length; the layout is set anew before every step."""
        self.seq_len += n

    def truncate(self, n: int) -> None:
        raise NotImplementedError("a paged cache is truncated by giving a sequence fewer blocks (set_rows)")

    def reset(self) -> None:
        self.block_table = self.lengths = self._gather = None
        self.seq_len = 0
