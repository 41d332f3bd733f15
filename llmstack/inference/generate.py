"""Autoregressive generation: prefill the prompt into a KV cache, then one token per step.

Prompts of different lengths run as one batch: they are left-padded, a key mask
hides the padding from attention, and each row gets its own positions (starting
at 0), so a row produces exactly what it would produce alone.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch

from llmstack.config import is_int
from llmstack.inference.cpu import decoding_view
from llmstack.inference.sampling import SamplingParams, TokenHistory, sample
from llmstack.model import KVCache
from llmstack.model.kv_cache import RollingKVCache

Decode = Callable[[list[int]], str]


class StopText:
    """One row's decoded continuation, watched for stop strings.

    `push` returns only text that is final: text that cannot yet turn out to be
    the start of a stop string, nor an incomplete UTF-8 character (which decodes
    as U+FFFD until its last byte arrives), so it can be streamed to a user.
    The continuation is decoded whole each time, so a tokenizer's merges across
    token boundaries come out right.
    """

    def __init__(self, stop_strings: Sequence[str], decode: Decode):
        self.stop_strings = tuple(stop_strings)
        self.decode = decode
        self.tokens: list[int] = []
        self.text = ""  # the continuation so far; once stopped, cut before the stop string
        self.stopped = False
        self._shown = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        if any(s in text for s in self.stop_strings):
            self.stopped, self.text = True, cut_at_stop(text, self.stop_strings)
            return self._show(len(self.text))
        self.text = text
        held = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop_strings:
            held = max(held, next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), 0))
        return self._show(len(text) - held)

    def flush(self) -> str:
        """The text held back so far (call once generation has ended)."""
        return self._show(len(self.text))

    def _show(self, end: int) -> str:
        new = self.text[self._shown:end] if end > self._shown else ""
        self._shown = max(self._shown, end)
        return new


@contextlib.contextmanager
def evaluating(*models: torch.nn.Module) -> Iterator[None]:
    """Run the block with `models` in eval mode (no dropout), then put every module back in the
    mode it was in. Models already wholly in eval mode are not touched."""
    training = [m for model in models if model is not None for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` cut before the earliest occurrence of any stop string (whole if none occurs)."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return text[:min(hits)] if hits else text


def prompt_rows(input_ids, device) -> tuple[list[torch.Tensor], str]:
    """Prompts as 1-D tensors, and the input's kind: 'single' (one prompt), 'batch' (a (B, T)
    tensor) or 'list' (a list of prompts, of any lengths)."""
    if isinstance(input_ids, (str, bytes)):
        raise ValueError("input_ids must be token ids, not text: encode it with the tokenizer "
                         "(or call generate_text(model, tokenizer, text, ...))")
    if isinstance(input_ids, torch.Tensor):
        ids = _token_tensor(input_ids, device)
        if ids.dim() not in (1, 2):
            raise ValueError(f"input_ids must be (T,) or (B, T), got shape {tuple(ids.shape)}")
        return ([ids] if ids.dim() == 1 else list(ids.unbind(0))), ("single" if ids.dim() == 1 else "batch")
    items = list(input_ids)
    if not items or torch.as_tensor(items[0]).dim() == 0:
        return [_token_tensor(items, device)], "single"
    rows = [_token_tensor(row, device) for row in items]
    if any(row.dim() != 1 for row in rows):
        raise ValueError("input_ids must be a list of ints, a list of token lists, a (T,) or a (B, T) tensor")
    return rows, "list"


def _token_tensor(ids, device) -> torch.Tensor:
    """ids as a long tensor; floats (which would silently truncate) are an error."""
    t = torch.as_tensor(ids, device=device)
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):  # [] is float
        raise ValueError(f"token ids must be integers, got {t.dtype}")
    return t.long()


def _token_list(tokens: int | Sequence[int]) -> list[int]:
    """One token id or a sequence of them, as a list."""
    return [int(tokens)] if isinstance(tokens, int) else [int(t) for t in tokens]


def resolve_stop_tokens(model: torch.nn.Module, stop_tokens: Optional[int | Sequence[int]]) -> list[int]:
    """The tokens that end a row: `stop_tokens` as given (`()` for none), or by default (None) the
    model's own end-of-text and end-of-turn tokens (`model.config.eos_token_ids`)."""
    if stop_tokens is None:
        return list(getattr(model.config, "eos_token_ids", ()))
    return _token_list(stop_tokens)


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Raise naming the first token id outside [0, vocab_size)."""
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if len(bad):
        raise ValueError(f"token id {int(bad[0])} is outside the vocabulary (model.vocab_size={vocab_size})")


def check_max_new_tokens(max_new_tokens) -> None:
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")


def check_prompts(rows: Sequence[torch.Tensor], vocab_size: int, max_seq_len: int, max_new_tokens: int) -> None:
    """Raise unless every prompt (T,) can be continued: not empty, every id in the vocabulary,
    and, when new tokens are asked for, room for at least one in the context (longer outputs
    are capped)."""
    for i, ids in enumerate(rows):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. the tokenizer's EOS id)")
        check_token_ids(ids, vocab_size)
        if max_new_tokens > 0 and len(ids) >= max_seq_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, which leaves no room for new ones in the model's "
                             f"context (max_seq_len={max_seq_len}); keep its last {max_seq_len - 1} or fewer, or "
                             f"extend the context (llmstack.inference.extend_context)")


def _generators(seed, n_rows: int, device) -> Optional[torch.Generator | list[torch.Generator]]:
    """An int seeds one generator shared by the batch; a sequence gives each row its own."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return SamplingParams(seed=seed).validate().make_generator(device)
    seeds = list(seed)
    if len(seeds) != n_rows:
        raise ValueError(f"seed: got {len(seeds)} seeds for {n_rows} prompts (give one int, or one per prompt)")
    return [SamplingParams(seed=s).validate().make_generator(device) for s in seeds]


def _decode_steps(model: torch.nn.Module, rows: list[torch.Tensor], max_new_tokens: int, params: SamplingParams,
                  generator, stop_tokens: Sequence[int], watchers: Optional[list[StopText]]
                  ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Yield (tokens (B,), live (B,) bool or None): each step's tokens and which rows they belong
    to, i.e. rows that had not finished before it (None: all rows). A row finishes at a stop
    token, at a stop string, or at its own context limit; the loop ends once all have."""
    device = rows[0].device
    cfg = model.config
    B = len(rows)
    stop_tokens = resolve_stop_tokens(model, stop_tokens)
    lengths = torch.tensor([len(r) for r in rows], device=device)  # (B,)
    T = int(lengths.max())
    # Each row stops where its own single-prompt run would: at the model's context.
    limits = (cfg.max_seq_len - lengths).clamp(min=0).clamp(max=max_new_tokens)  # (B,)
    steps = int(limits.max())
    if steps == 0:
        return
    ragged = bool((lengths != T).any())
    track = ragged or bool((limits != steps).any()) or len(stop_tokens) > 0 or watchers is not None
    if ragged:
        pad = T - lengths  # (B,) left padding of each row
        ids = torch.stack([torch.cat([r.new_zeros(T - len(r)), r]) for r in rows])  # (B, T)
        slots = torch.arange(T + steps, device=device)
        key_mask = slots[None, :] >= pad[:, None]  # (B, T + steps): padded slots are False
        positions = (torch.arange(T, device=device)[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
    else:
        ids, key_mask, positions = torch.stack(rows), None, None
    history = TokenHistory(rows, cfg.vocab_size, device) if params.has_penalties else None
    stop = torch.tensor(stop_tokens, dtype=torch.long, device=device)
    live = limits > 0
    if hasattr(model, "make_cache"):  # a model with its own kind of cache (a recurrent LM's state)
        cache = model.make_cache(B, T + steps)
    elif cfg.sliding_window is not None and cfg.sliding_window < T + steps:
        cache = RollingKVCache.for_model(model, B)  # memory of one window, however long the text
    else:
        cache = KVCache.for_model(model, B, T + steps)
    model = decoding_view(model)  # on a multi-core CPU, the products split across threads
    with evaluating(model), torch.inference_mode():
        mask = key_mask[:, :T] if ragged else None
        logits = model(ids, cache=cache, positions=positions, attn_mask=mask, logits_to_keep=1)[:, -1]  # (B, V)
        for i in range(steps):
            nxt = sample(logits, params, history=history, generator=generator)  # (B,)
            if not track:
                yield nxt, None
            else:
                yield nxt, live.clone()
                ended = i + 1 >= limits
                if len(stop):
                    ended |= torch.isin(nxt, stop)
                if watchers is not None:
                    for row in live.nonzero().flatten().tolist():
                        watchers[row].push(int(nxt[row]))
                    ended |= torch.tensor([w.stopped for w in watchers], device=device)
                live &= ~ended
                if not bool(live.any()):
                    break
            if i + 1 == steps:
                break
            if history is not None:
                history.append(nxt)
            if ragged:
                # Finished rows may run past the context; clamp so a learned position table is not overrun.
                pos = (lengths + i).clamp(max=cfg.max_seq_len - 1)[:, None]  # (B, 1)
                logits = model(nxt[:, None], cache=cache, positions=pos,
                               attn_mask=key_mask[:, :cache.seq_len + 1])[:, -1]
            else:
                logits = model(nxt[:, None], cache=cache)[:, -1]


def _start(model, input_ids, max_new_tokens, params: SamplingParams, seed, stop_strings, decode):
    device = next(model.parameters()).device
    check_max_new_tokens(max_new_tokens)
    params.validate(model.config.vocab_size)
    rows, kind = prompt_rows(input_ids, device)
    check_prompts(rows, model.config.vocab_size, model.config.max_seq_len, max_new_tokens)
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(f"stop_strings must be non-empty strings, got {list(stop_strings)!r}")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function (e.g. decode=tokenizer.decode)")
    watchers = [StopText(stop_strings, decode) for _ in rows] if stop_strings else None
    return rows, kind, _generators(seed, len(rows), device), watchers


def stream_generate(model: torch.nn.Module, input_ids, max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                    repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                    seed: Optional[int | Sequence[int]] = None, stop_tokens: Optional[Sequence[int]] = None,
                    stop_strings: Sequence[str] = (), decode: Optional[Decode] = None) -> Iterator:
    """An iterator over the new tokens as they are produced: ints for one prompt, (B,) tensors
    for a batch (a (B, T) tensor or a list of prompts of any lengths). Arguments as in
    `generate`; bad ones raise here, before any token is computed.

    In a batch, a row that has finished keeps producing tokens until every row has;
    `generate` drops them for a list of prompts.
    """
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                            presence_penalty=presence_penalty)
    rows, kind, generator, watchers = _start(model, input_ids, max_new_tokens, params, seed, stop_strings, decode)
    steps = _decode_steps(model, rows, max_new_tokens, params, generator, stop_tokens, watchers)
    # Arguments are checked above, when stream_generate is called, not at the first token.
    return (int(nxt[0]) if kind == "single" else nxt for nxt, _ in steps)


def generate(model: torch.nn.Module, input_ids, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
             repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
             seed: Optional[int | Sequence[int]] = None, stop_tokens: Optional[Sequence[int]] = None,
             stop_strings: Sequence[str] = (), decode: Optional[Decode] = None,
             on_token: Optional[Callable] = None):
    """Return prompt + continuation token ids, using the KV cache; temperature 0 is greedy.

    input_ids: a list of ints or a (T,) tensor          -> a (T + N,) tensor;
               a (B, T) tensor of equal-length prompts  -> a (B, T + N) tensor (rows are not cut
                                                           at their stop, only the batch ends);
               a list of prompts, of any lengths        -> a list of 1-D tensors, each cut after
                                                           its own stop token / stop string.
    Sampling arguments: see `SamplingParams` (`**asdict(params)` passes one; `seed` may also
    be one seed per prompt, so each row samples exactly what it would alone with that seed).
    max_new_tokens: capped per prompt by the model's context.
    stop_tokens:  a row ends after producing one of these; default: the model's end-of-text and
                  end-of-turn tokens (`model.config.eos_token_ids`); `()` for none.
    stop_strings: a row ends once `decode(continuation)` contains one (the token that
                  completed it is kept; `generate_text` returns the text cut before it).
    on_token:     called with each step's tokens, as `stream_generate` yields them.
    """
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                            presence_penalty=presence_penalty)
    rows, kind, generator, watchers = _start(model, input_ids, max_new_tokens, params, seed, stop_strings, decode)
    new, lives = [], []
    for nxt, live in _decode_steps(model, rows, max_new_tokens, params, generator, stop_tokens, watchers):
        if on_token is not None:
            on_token(int(nxt[0]) if kind == "single" else nxt)
        new.append(nxt)
        lives.append(live)
    if kind != "list":
        out = torch.cat([torch.stack(rows), *(t[:, None] for t in new)], dim=1)  # (B, T + N)
        return out[0] if kind == "single" else out
    if not new:
        return [row.clone() for row in rows]
    tokens = torch.stack(new, dim=1)  # (B, N)
    keep = torch.stack([torch.ones_like(new[0], dtype=torch.bool) if lv is None else lv for lv in lives], dim=1)
    return [torch.cat([row, tokens[i][keep[i]]]) for i, row in enumerate(rows)]


def text_stop_tokens(model: torch.nn.Module, tokenizer, stop_tokens: Optional[Sequence[int]] = None) -> list[int]:
    """What ends a text generation: `stop_tokens` when given, else the model's end-of-text and
    end-of-turn tokens together with the tokenizer's (`stop_ids`, or its `eos_id`)."""
    if stop_tokens is not None:
        return _token_list(stop_tokens)
    ids = getattr(tokenizer, "stop_ids", None)
    if ids is None:
        ids = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", None) is not None else []
    return list(dict.fromkeys([*resolve_stop_tokens(model, None), *ids]))


def generate_text(model: torch.nn.Module, tokenizer, prompt: str | Sequence[str], max_new_tokens: int, *,
                  stop_strings: Sequence[str] = (), stop_tokens: Optional[Sequence[int]] = None,
                  **sampling) -> str | list[str]:
    """The continuation text of one prompt (or of each prompt of a list, batched), cut before the
    first stop string and without the token that ended it (`text_stop_tokens`); `sampling`: the
    keyword arguments of `generate`."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return _continuations(model, tokenizer, [tokenizer.encode(p) for p in prompts], max_new_tokens, stop_strings,
                          stop_tokens, sampling, single=isinstance(prompt, str))


def chat(model: torch.nn.Module, tokenizer, messages: Sequence[dict], max_new_tokens: int = 256, *,
         stop_strings: Sequence[str] = (), stop_tokens: Optional[Sequence[int]] = None, **sampling) -> str:
    """The assistant's reply to a conversation ([{"role": "user", "content": ...}, ...]), rendered with
    the tokenizer's chat template and a generation prompt, as the model was trained to read it; it ends
    at the model's end-of-turn token. `sampling`: the keyword arguments of `generate`."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    return _continuations(model, tokenizer, [ids], max_new_tokens, stop_strings, stop_tokens, sampling, single=True)


def _continuations(model, tokenizer, ids: list[list[int]], max_new_tokens: int, stop_strings, stop_tokens,
                   sampling: dict, single: bool) -> str | list[str]:
    stop_tokens = text_stop_tokens(model, tokenizer, stop_tokens)
    out = generate(model, ids, max_new_tokens, stop_tokens=stop_tokens, stop_strings=stop_strings,
                   decode=tokenizer.decode, **sampling)
    texts = []
    for row, prompt_ids in zip(out, ids):
        continuation = row[len(prompt_ids):].tolist()
        if continuation and continuation[-1] in stop_tokens:
            continuation = continuation[:-1]
        texts.append(cut_at_stop(tokenizer.decode(continuation), stop_strings))
    return texts[0] if single else texts
