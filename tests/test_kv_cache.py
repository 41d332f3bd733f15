"""KV-cache variants: the rolling cache for sliding windows and the static, compiled decode step.

Every cache is checked against the uncached full forward, which needs no cache at all."""
import pytest
import torch

from llmstack.model import ModelConfig
from llmstack.model import KVCache, Transformer
from llmstack.model.kv_cache import RollingKVCache

WINDOW = 8
ATOL = 1e-5  # float32: the same math over differently laid-out keys


def tiny(sliding_window=None, max_seq_len=64):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=max_seq_len,
                                sliding_window=sliding_window))
    m.init_weights()
    return m.eval()


@pytest.fixture(scope="module")
def windowed():
    return tiny(WINDOW, max_seq_len=96)


def decode(model, cache, prompt, n):
    """Greedy decode with a cache; the logits of every step (B, n, V) and the tokens (B, T + n)."""
    ids, steps = prompt, []
    with torch.no_grad():
        logits = model(prompt, cache=cache)[:, -1]
        for _ in range(n):
            steps.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            logits = model(nxt, cache=cache)[:, -1]
    return torch.stack(steps, 1), ids


@pytest.mark.parametrize("prompt_len", [3, WINDOW, 21])  # shorter than, equal to and longer than the window
def test_rolling_decode_equals_full_cache_and_uncached(windowed, prompt_len):
    prompt = torch.randint(0, 50, (2, prompt_len))
    n = 48 - prompt_len  # far past the window (6x)
    rolling = RollingKVCache.for_model(windowed, 2)
    got_logits, got_ids = decode(windowed, rolling, prompt, n)
    ref_logits, ref_ids = decode(windowed, KVCache.for_model(windowed, 2, 48), prompt, n)
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_logits, ref_logits, atol=ATOL, rtol=0)
    with torch.no_grad():
        full = windowed(got_ids[:, :-1])[:, prompt_len - 1:]  # (B, n, V): uncached, one forward
    torch.testing.assert_close(got_logits, full, atol=ATOL, rtol=0)
    assert rolling.seq_len == prompt_len + n


def test_rolling_memory_is_bounded_by_the_window(windowed):
    cache = RollingKVCache.for_model(windowed, 1)
    cfg = windowed.config
    expected = KVCache.bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, torch.float32) * WINDOW
    assert cache.k.nbytes + cache.v.nbytes == expected
    decode(windowed, cache, torch.randint(0, 50, (1, 40)), 50)
    assert cache.k.shape[3] == WINDOW and cache.k.nbytes + cache.v.nbytes == expected


def test_rolling_chunked_prefill_matches_uncached(windowed):
    ids = torch.randint(0, 50, (1, 90))
    with torch.no_grad():
        full = windowed(ids)
    g = torch.Generator().manual_seed(3)
    for extra in (0, 4):
        cache, outs, start = RollingKVCache.for_model(windowed, 1, extra_slots=extra), [], 0
        while start < len(ids[0]):
            # chunks of 1 to 2.5 windows: some fit in the ring, some are longer than it
            t = int(torch.randint(1, 2 * WINDOW + 5, (1,), generator=g))
            with torch.no_grad():
                outs.append(windowed(ids[:, start:start + t], cache=cache))
            start += t
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=ATOL, rtol=0)


def test_rolling_truncate_rolls_back_within_extra_slots(windowed):
    cache = RollingKVCache.for_model(windowed, 1, extra_slots=3)
    ids = torch.randint(0, 50, (1, 30))
    with torch.no_grad():
        windowed(ids, cache=cache)
        cache.truncate(27)  # reject 3 tokens, then take 3 others
        other = torch.randint(0, 50, (1, 3))
        got = windowed(other, cache=cache)
        ref = windowed(torch.cat([ids[:, :27], other], 1))[:, 27:]
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"must be in \[26, 30\]"):
        cache.truncate(25)  # token 25 - 7 = 18 is needed, but the ring (11 slots) now starts at 19
    with pytest.raises(ValueError, match="must be in"):
        cache.truncate(31)
    with pytest.raises(ValueError, match="to 27.5"):
        cache.truncate(27.5)


def test_rolling_cache_rejects_bad_setups():
    with pytest.raises(ValueError, match="sliding-window model"):
        RollingKVCache.for_model(tiny(None), 1)
    with pytest.raises(ValueError, match="window must be >= 1"):
        RollingKVCache(2, 1, 0, 2, 8)
    with pytest.raises(ValueError, match="extra_slots must be >= 0"):
        RollingKVCache(2, 1, 4, 2, 8, extra_slots=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_per_token_matches_allocated_bytes(dtype):
    cache = KVCache(3, 2, 20, 4, 16, dtype=dtype)
    assert cache.k.nbytes + cache.v.nbytes == KVCache.bytes_per_token(3, 4, 16, dtype) * 2 * 20


# ---------------------------------------------------------------------- compiled decode


@pytest.mark.slow
@pytest.mark.parametrize("sliding_window", [None, WINDOW])
def test_compiled_decode_equals_eager_and_compiles_once(sliding_window):
    from torch._dynamo.utils import counters

    from llmstack.inference import generate
    from llmstack.inference.compiled import CompiledDecoder

    torch._dynamo.reset()
    counters.clear()
    model = tiny(sliding_window)
    prompt = torch.randint(0, 50, (2, 5))
    ref = generate(model, prompt, 20, temperature=0)  # the window's ring of 8 slots wraps 3 times
    decoder = CompiledDecoder(model, batch_size=2)
    assert torch.equal(decoder.generate(prompt, 20, temperature=0), ref)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every position, no graph breaks
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new prompt length: still no recompile
        prompt = torch.randint(0, 50, (2, 11))
        assert torch.equal(decoder.generate(prompt, 12, temperature=0), generate(model, prompt, 12, temperature=0))


@pytest.mark.parametrize("sliding_window", [None, 24])
def test_compiled_decoder_sizes_its_cache_to_the_request_and_grows(sliding_window):
    from llmstack.inference import generate
    from llmstack.inference.compiled import CompiledDecoder

    model = tiny(sliding_window)
    decoder = CompiledDecoder(model, 1, backend="eager")
    decoder.SLOTS_STEP = 16
    assert decoder.cache is None and decoder.max_seq_len == 64
    prompt = torch.randint(0, 50, (1, 5))
    assert torch.equal(decoder.generate(prompt, 6, temperature=0), generate(model, prompt, 6, temperature=0))
    assert decoder.slots == 16  # 11 tokens, rounded up to a multiple of SLOTS_STEP
    # Past the slots mid-sequence (prefill and step by hand): the cache grows and keeps what it held;
    # a sliding window of 24 turns it into a ring of 24 slots.
    logits, tokens = decoder.prefill(prompt), []
    for _ in range(40):
        tokens.append(logits.argmax(-1))
        logits = decoder.step(tokens[-1])
    assert torch.equal(torch.cat([prompt[0], *tokens]), generate(model, prompt[0], 40, temperature=0))
    assert decoder.slots == (48 if sliding_window is None else 24)


def test_compiled_decoder_rejects_bad_input():
    from llmstack.inference.compiled import CompiledDecoder

    model = tiny()
    with pytest.raises(ValueError, match=r"max_seq_len must be in \[1, 64\]"):
        CompiledDecoder(model, 1, 65, backend="eager")
    decoder = CompiledDecoder(model, 1, 16, backend="eager")
    with pytest.raises(ValueError, match="built for batch_size=1"):
        decoder.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="call prefill"):
        decoder.step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="between 1 and max_seq_len=16"):
        decoder.prefill(torch.zeros(1, 17, dtype=torch.long))
    # generate checks its arguments as llmstack.generate does.
    with pytest.raises(ValueError, match=r"prompts of one length, got lengths \[2, 1\]"):
        CompiledDecoder(model, 2, 16, backend="eager").generate([[1, 2], [3]], 4)
    with pytest.raises(ValueError, match="token id 50 is outside the vocabulary"):
        decoder.generate([50], 3)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0, got -3"):
        decoder.generate([1], -3)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        decoder.generate([1], 3, seed=-1)
    with pytest.raises(ValueError, match=r"prompt 0 has 16 tokens, which leaves no room .* \(max_seq_len=16\)"):
        decoder.generate([1] * 16, 3)


def test_generate_uses_the_rolling_cache_for_sliding_windows(windowed, monkeypatch, greedy_uncached):
    """`generate` on a sliding-window model decodes past the window with a ring of `window`
    slots and gives the tokens of a plain uncached greedy loop."""
    from llmstack.inference import generate

    made = []
    original = RollingKVCache.for_model.__func__
    monkeypatch.setattr(RollingKVCache, "for_model",
                        classmethod(lambda cls, *a, **kw: made.append(original(cls, *a, **kw)) or made[-1]))
    prompt = torch.randint(0, 50, (2, 5))
    assert torch.equal(generate(windowed, prompt, 30, temperature=0), greedy_uncached(windowed, prompt, 30))
    assert len(made) == 1 and made[0].k.shape[3] == WINDOW


@pytest.mark.parametrize("lengths", [(3, 11, 21), (2, 9)])  # shorter than and past the window, ragged
def test_generate_rolling_cache_with_prompts_of_unequal_lengths(windowed, monkeypatch, greedy_uncached, lengths):
    """A left-padded batch decodes in a ring of `window` slots, the padding mask sliced to the
    keys the ring returns, and each row equals its own uncached greedy run."""
    from llmstack.inference import generate

    made = []
    original = RollingKVCache.for_model.__func__
    monkeypatch.setattr(RollingKVCache, "for_model",
                        classmethod(lambda cls, *a, **kw: made.append(original(cls, *a, **kw)) or made[-1]))
    torch.manual_seed(1)
    prompts = [torch.randint(0, 50, (n,)) for n in lengths]
    out = generate(windowed, prompts, 25, temperature=0)
    assert len(made) == 1 and made[0].k.shape[3] == WINDOW
    for prompt, row in zip(prompts, out):
        assert torch.equal(row, greedy_uncached(windowed, prompt[None], 25)[0])
