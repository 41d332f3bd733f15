"""Decoding core: cached generation equals uncached, sampling follows its definitions."""
import pytest
import torch

from llmstack.config import ModelConfig
from llmstack.inference import generate, sample_next, stream_generate
from llmstack.model import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    m.init_weights()
    return m.eval()


def test_cached_greedy_equals_uncached(model):
    prompt = torch.randint(0, 50, (2, 5))
    out = generate(model, prompt, 20, temperature=0)
    x = prompt
    with torch.no_grad():
        for _ in range(20):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, x)


def test_seeded_sampling_is_reproducible_and_streams(model):
    a = generate(model, [1, 2, 3], 15, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, [1, 2, 3], 15, temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(a, b)
    streamed = list(stream_generate(model, [1, 2, 3], 15, temperature=1.0, top_p=0.9, seed=7))
    assert streamed == a[3:].tolist()


def test_max_new_tokens_bounded_by_context(model):
    out = generate(model, [i % 50 for i in range(60)], 50, temperature=0)
    assert len(out) == 64
    with pytest.raises(ValueError, match="token id 50 is outside the vocabulary"):
        generate(model, [1, 50], 5)


def test_stop_tokens_end_generation(model):
    first = generate(model, [1, 2, 3], 1, temperature=0)[-1].item()
    out = generate(model, [1, 2, 3], 10, temperature=0, stop_tokens=[first])
    assert out.tolist() == [1, 2, 3, first]


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 30)
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))


def test_top_k_and_top_p_keep_only_their_sets():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, top_k=2, generator=g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}
    # Nucleus p=0.8: the smallest set reaching 0.8 is {0, 1, 2} (0.85); {0, 1} has only 0.7.
    draws = torch.stack([sample_next(logits, top_p=0.8, generator=g) for _ in range(600)])
    assert set(draws.flatten().tolist()) == {0, 1, 2}


def test_sampled_frequencies_match_truncated_distribution():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log()[None].expand(20000, 4)
    g = torch.Generator().manual_seed(1)
    draws = sample_next(logits, temperature=1.0, top_k=3, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    expected = torch.tensor([0.4, 0.3, 0.2, 0.0]) / 0.9
    # 5 standard errors of a binomial proportion with n = 20000.
    assert torch.all((freq - expected).abs() <= 5 * (expected * (1 - expected) / 20000).sqrt() + 1e-9)
    # Temperature 0.5 squares the probabilities before renormalising.
    draws = sample_next(logits, temperature=0.5, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    sq = probs**2 / (probs**2).sum()
    assert torch.all((freq - sq).abs() <= 5 * (sq * (1 - sq) / 20000).sqrt())
