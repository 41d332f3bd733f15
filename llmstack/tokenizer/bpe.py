"""Byte-level BPE: the trainer, and a plain-Python reference encoder.

Training (Sennrich et al. 2016, on bytes as in GPT-2):
1. split text into chunks with a regex (words, numbers, punctuation runs,
   whitespace; GPT-4's pattern), so merges never cross chunk boundaries;
2. count each unique chunk once, as a tuple of byte ids with a frequency;
3. repeatedly merge the most frequent adjacent pair into a new token.

Step 3 is made fast by keeping the pair counts and, for each pair, the set of
chunks containing it: a merge touches only those chunks and adjusts the counts
of the pairs around each occurrence, instead of recounting everything. The
best pair comes from a heap whose stale entries are skipped when popped.
Ties are broken deterministically: highest count first, then the smallest
(left id, right id).
"""
from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from typing import Iterable, Optional

import regex

# GPT-4's (cl100k) pre-tokenization pattern.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


def count_chunks(texts: Iterable[str], pattern: str = GPT4_PATTERN) -> Counter:
    """Frequency of every unique pre-tokenized chunk, as UTF-8 bytes."""
    compiled = regex.compile(pattern)
    counts: Counter = Counter()
    for text in texts:
        counts.update(compiled.findall(text))
    return Counter({chunk.encode("utf-8"): n for chunk, n in counts.items()})


def train_bpe(chunk_counts: Counter, n_merges: int, *, progress: bool = False) -> list[bytes]:
    """Learn up to `n_merges` merges; returns the merged tokens' bytes in rank order
    (token id 256 + i is `result[i]`; ids 0..255 are the raw bytes)."""
    vocab: list[bytes] = [bytes([i]) for i in range(256)]
    token_of: dict[bytes, int] = {b: i for i, b in enumerate(vocab)}
    words = [list(chunk) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())

    pair_counts: defaultdict = defaultdict(int)
    where: defaultdict = defaultdict(set)  # pair -> indices of words containing it
    for wi, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += f
            where[pair].add(wi)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_merges, desc="BPE merges", unit="merge")
    merges: list[bytes] = []
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or -neg <= 0:
            continue  # stale heap entry
        merged = vocab[pair[0]] + vocab[pair[1]]
        new_id = token_of.get(merged)
        if new_id is None:  # two different merges can spell the same bytes: reuse the token
            new_id = len(vocab)
            vocab.append(merged)
            token_of[merged] = new_id
            merges.append(merged)
            if bar is not None:
                bar.update(1)
        changed: dict = {}
        for wi in where.pop(pair):
            word, f = words[wi], freqs[wi]
            i, out = 0, []
            while i < len(word):
                if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            # Remove the old word's pairs, add the new word's: only this word's pairs change.
            for p in zip(word, word[1:]):
                pair_counts[p] -= f
                changed[p] = True
            for p in zip(out, out[1:]):
                pair_counts[p] += f
                where[p].add(wi)
                changed[p] = True
            words[wi] = out
        pair_counts.pop(pair, None)
        for p in changed:
            c = pair_counts.get(p, 0)
            if c > 0 and p != pair:
                heapq.heappush(heap, (-c, p))
            elif c <= 0:
                pair_counts.pop(p, None)
    if bar is not None:
        bar.close()
    return merges


def encode_chunk_reference(chunk: bytes, ranks: dict[bytes, int]) -> list[int]:
    """The definition tiktoken implements fast: start from bytes and repeatedly merge the
    adjacent pair whose concatenation has the lowest rank, until no pair is a token."""
    parts = [bytes([b]) for b in chunk]
    while len(parts) > 1:
        best: Optional[int] = None
        best_rank = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return [ranks[p] for p in parts]


def encode_reference(text: str, ranks: dict[bytes, int], pattern: str = GPT4_PATTERN) -> list[int]:
    ids: list[int] = []
    for chunk in regex.findall(pattern, text):
        ids.extend(encode_chunk_reference(chunk.encode("utf-8"), ranks))
    return ids
