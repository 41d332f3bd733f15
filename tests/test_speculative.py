"""Speculative decoding: greedy output is the target's, sampled output follows the target's
distribution exactly, caches end as after plain decoding."""
import copy

import pytest
import torch

from llmstack.model import ModelConfig
from llmstack.inference.generate import generate
from llmstack.inference.sampling import sample_next
from llmstack.inference.speculative import accept_draft, lookup_continuation, sampling_probs, speculative_generate
from llmstack.model import KVCache, Transformer


def tiny(seed: int, **overrides) -> Transformer:
    cfg = dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    cfg.update(overrides)
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**cfg))
    m.init_weights()
    return m.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine waiting for them dominates."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target():
    return tiny(0)


@pytest.fixture(scope="module")
def drafts(target):
    """A draft that never agrees by design (random), one that mostly agrees (the target with
    noise on its weights), and the target itself."""
    noisy = copy.deepcopy(target)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.std().clamp_min(1e-3))
    return {"random": tiny(1, dim=16, n_layers=1, n_heads=2, n_kv_heads=1), "noisy": noisy, "self": target}


PROMPTS = [[3, 14, 15, 9, 2, 6], [7, 7, 1, 2, 3, 7, 1, 2, 3, 7, 1, 2], [42]]


@pytest.mark.parametrize("kind", ["random", "noisy", "self", "lookup"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_output_is_target_greedy(target, drafts, kind, k):
    for prompt in PROMPTS:
        draft = drafts.get(kind)
        out = speculative_generate(target, prompt, 30, draft=draft, k=k, temperature=0)
        assert torch.equal(out.ids, generate(target, prompt, 30, temperature=0))
        s = out.stats
        assert s.new_tokens == 30 and s.accepted <= s.proposed
        assert s.new_tokens == s.accepted + s.target_passes  # each pass: accepted drafts + one token of its own
        if kind == "self":
            assert s.acceptance_rate == 1.0 and s.target_passes == -(-30 // (k + 1))
        if kind == "noisy" and k == 4 and prompt is PROMPTS[0]:
            assert 0.0 < s.acceptance_rate < 1.0  # both the accept and the reject paths ran


def test_prompt_lookup_proposes_on_repetitive_text(target):
    prompt = [5, 6, 7, 8, 9] * 4
    out = speculative_generate(target, prompt, 20, k=4, temperature=0)
    assert torch.equal(out.ids, generate(target, prompt, 20, temperature=0))
    assert out.stats.proposed > 0 and out.stats.draft_passes == 0
    assert out.stats.target_passes < 20


def test_stop_tokens_and_context_limit_match_generate(target, drafts):
    prompt = PROMPTS[0]
    plain = generate(target, prompt, 20, temperature=0)
    stop = int(plain[len(prompt) + 6])
    for draft in (drafts["noisy"], drafts["self"], None):
        expect = generate(target, prompt, 20, temperature=0, stop_tokens=[stop])
        got = speculative_generate(target, prompt, 20, draft=draft, temperature=0, stop_tokens=[stop])
        assert torch.equal(got.ids, expect)
        long_prompt = [i % 50 for i in range(60)]
        got = speculative_generate(target, torch.tensor([long_prompt]), 50, draft=draft, temperature=0)
        assert got.ids.shape == (1, 64)
        assert torch.equal(got.ids, generate(target, torch.tensor([long_prompt]), 50, temperature=0))


@pytest.mark.parametrize("kind", ["noisy", "random", "lookup"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_ends_as_after_plain_decoding(target, drafts, kind, temperature):
    """Rejected proposals leave no trace: the cache holds exactly the keys/values of the
    output minus its last token, so decoding can continue from it."""
    prompt = PROMPTS[1]
    cache = KVCache.for_model(target, 1, 64)
    out = speculative_generate(target, prompt, 25, draft=drafts.get(kind), k=3, temperature=temperature, seed=0,
                               cache=cache).ids
    assert cache.seq_len == len(out) - 1
    ref = KVCache.for_model(target, 1, 64)
    with torch.no_grad():
        target(out[None, :-1], cache=ref)
    n = len(out) - 1
    torch.testing.assert_close(cache.k[..., :n, :], ref.k[..., :n, :], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v[..., :n, :], ref.v[..., :n, :], atol=1e-5, rtol=1e-5)
    if temperature == 0.0:
        # Continue plain greedy decoding from the returned cache.
        x, more = out[-1:], []
        with torch.no_grad():
            for _ in range(5):
                x = target(x[None], cache=cache)[0, -1:].argmax(-1)
                more.append(int(x))
        assert more == generate(target, prompt, 30, temperature=0)[len(out):].tolist()


def test_sampling_probs_is_what_sample_next_draws_from():
    logits = torch.randn(2000, 30) * 2
    for kw in ({"temperature": 1.0}, {"temperature": 0.7, "top_k": 5}, {"temperature": 1.3, "top_p": 0.8},
               {"temperature": 1.0, "top_k": 10, "top_p": 0.5}):
        probs = sampling_probs(logits, **kw)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2000))
        # Identical probabilities and generator state give identical draws.
        a = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5)).squeeze(-1)
        b = sample_next(logits, generator=torch.Generator().manual_seed(5), **kw)
        assert torch.equal(a, b)
    assert torch.equal(sampling_probs(logits, temperature=0.0).argmax(-1), logits.argmax(-1))


def test_lookup_continuation():
    assert lookup_continuation([1, 2, 9, 1, 2, 8, 5, 1, 2], k=3, ngram=2) == [8, 5, 1]  # most recent match
    assert lookup_continuation([4, 1, 2, 3, 7, 2, 3], k=4, ngram=3) == [7, 2, 3]  # falls back to the 2-gram
    assert lookup_continuation([4, 1, 2, 3, 7, 2, 3], k=1, ngram=1) == [7]
    assert lookup_continuation([1, 2, 3, 4], k=4, ngram=3) == []  # the last token never occurred before
    assert lookup_continuation([5], k=4) == []


# ---------------------------------------------------------------- exactness of sampling

V = 5


def random_dist(g: torch.Generator, *shape: int, zeros: bool = True) -> torch.Tensor:
    """Peaked random distributions over V tokens, some with zero entries (as after top-k)."""
    logits = torch.randn(*shape, V, generator=g) * 1.5
    if zeros:
        logits = logits.masked_fill(torch.rand(*shape, V, generator=g) < 0.2, float("-inf"))
        logits[..., 0] = logits[..., 0].clamp_min(0.0)  # every row keeps some mass
    return logits.softmax(-1)


def assert_matches(counts: torch.Tensor, expected: torch.Tensor) -> None:
    """Every cell within 5 binomial standard errors of its exact probability."""
    n = counts.sum()
    freq = counts.double() / n
    se = (expected * (1 - expected) / n).sqrt()
    assert torch.all((freq - expected).abs() <= 5 * se + 1e-12), (freq, expected)


@pytest.mark.parametrize("point_mass", [False, True])
def test_accept_draft_reproduces_target_distribution(point_mass):
    """Two proposals, the second depending on the first: the joint law of the first two output
    tokens must be p1(y1) * p2(y2 | y1) whatever the draft distribution is."""
    g = torch.Generator().manual_seed(0)
    N = 200_000
    p1, p2, p3 = random_dist(g), random_dist(g, V), random_dist(g, V, V)  # target: (V,), (V, V), (V, V, V)
    if point_mass:  # deterministic proposals: d2 depends on d1
        d1 = torch.full((N,), 3)
        d2 = (d1 * 2 + 1) % V
        q = None
    else:
        q1, q2 = random_dist(g, zeros=False), random_dist(g, V)
        d1 = torch.multinomial(q1.expand(N, V), 1, generator=g).squeeze(-1)
        d2 = torch.multinomial(q2[d1], 1, generator=g).squeeze(-1)
        q = torch.stack([q1.expand(N, V), q2[d1]], dim=1)  # (N, 2, V)
    p = torch.stack([p1.expand(N, V), p2[d1], p3[d1, d2]], dim=1)  # (N, 3, V)
    accepted, nxt = accept_draft(p, torch.stack([d1, d2], 1), q, generator=g)
    y1 = torch.where(accepted >= 1, d1, nxt)
    # After a rejection at position 1 the next round samples y2 from the target afresh.
    fresh = torch.multinomial(p2[y1], 1, generator=g).squeeze(-1)
    y2 = torch.where(accepted == 2, d2, torch.where(accepted == 1, nxt, fresh))
    counts = torch.bincount(y1 * V + y2, minlength=V * V)
    assert_matches(counts, (p1[:, None] * p2).flatten().double())
    assert 0 < int((accepted == 0).sum()) and 0 < int((accepted == 2).sum())


@pytest.mark.parametrize("kind", ["model", "lookup"])
def test_sampled_generation_follows_target_distribution(kind):
    """End to end with real models on a 5-token vocabulary: the first two generated tokens of
    many seeded runs against the target's exact joint distribution (by enumeration)."""
    cfg = dict(vocab_size=V, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16, init_std=0.5)
    target, draft = tiny(10, **cfg), tiny(11, **cfg) if kind == "model" else None
    prompt = [0, 1, 2, 0, 1]  # lookup proposes 2, 0, 1, ...
    temperature, top_k = 0.8, 4

    def exact(logits):  # the target's processed distribution, written out independently
        logits = logits / temperature
        return logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf")).softmax(-1).double()

    with torch.no_grad():
        p1 = exact(target(torch.tensor([prompt]))[0, -1])
        p2 = torch.stack([exact(target(torch.tensor([prompt + [y]]))[0, -1]) for y in range(V)])
    runs = 1000
    counts = torch.zeros(V * V, dtype=torch.long)
    proposed = accepted = 0
    for seed in range(runs):
        out = speculative_generate(target, prompt, 3, draft=draft, k=2, temperature=temperature, top_k=top_k, seed=seed)
        y1, y2 = out.ids[len(prompt):len(prompt) + 2].tolist()
        counts[y1 * V + y2] += 1
        proposed, accepted = proposed + out.stats.proposed, accepted + out.stats.accepted
    assert_matches(counts, (p1[:, None] * p2).flatten())
    assert 0 < accepted < proposed  # the draft was sometimes right and sometimes wrong


def test_bad_arguments_are_clear_errors(target):
    with pytest.raises(ValueError, match="vocab_size=40 differs from the target's vocab_size=50"):
        speculative_generate(target, [1, 2], 5, draft=tiny(2, vocab_size=40))
    with pytest.raises(ValueError, match="max_seq_len=16 is shorter"):
        speculative_generate(target, [1, 2], 30, draft=tiny(2, max_seq_len=16))
    with pytest.raises(ValueError, match=r"k must be an integer >= 1 \(tokens proposed per round\), got 0"):
        speculative_generate(target, [1, 2], 5, k=0)
    with pytest.raises(ValueError, match="k must be an integer >= 1 .*, got 2.5"):
        speculative_generate(target, [1, 2], 5, k=2.5)
    with pytest.raises(ValueError, match="ngram must be an integer >= 1, got 0"):
        speculative_generate(target, [1, 2], 5, ngram=0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        speculative_generate(target, [1, 2], 5, seed=-1)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        speculative_generate(target, [], 5)
    with pytest.raises(ValueError, match=r"prompt 0 has 64 tokens, which leaves no room .* \(max_seq_len=64\)"):
        speculative_generate(target, [1] * 64, 5)
    with pytest.raises(ValueError, match="one prompt"):
        speculative_generate(target, torch.zeros(2, 3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="token id 50 is outside"):
        speculative_generate(target, [1, 50], 5)
    with pytest.raises(ValueError, match="top_p must be in"):
        speculative_generate(target, [1, 2], 5, temperature=1.0, top_p=0.0)
