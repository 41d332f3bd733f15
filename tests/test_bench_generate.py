"""Timed generation for the benchmarks: both implementations produce the tokens greedy decoding
defines, one timestamp per step, and the derived metrics follow their definitions."""
import pytest
import torch

from llmstack.bench import GenerationTiming, alternate, first_difference, hf_twin, time_hf_generate, \
    time_llmstack_generate
from llmstack.config import ModelConfig
from llmstack.inference.generate import generate
from llmstack.model import Transformer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    ours.init_weights()
    return ours.eval(), hf_twin(ours)


def test_both_timers_return_the_greedy_tokens_one_time_per_step(models):
    ours, hf = models
    prompts = torch.randint(0, 50, (3, 7))
    expected = generate(ours, prompts, 12, temperature=0)[:, 7:]
    for timing in (time_llmstack_generate(ours, prompts, 12), time_hf_generate(hf, prompts, 12)):
        assert torch.equal(timing.tokens, expected)
        assert len(timing.times) == 12
        assert all(0 < a <= b for a, b in zip(timing.times, timing.times[1:]))


def test_timers_reject_requests_past_the_context(models):
    ours, hf = models
    prompts = torch.zeros(2, 60, dtype=torch.long)
    with pytest.raises(ValueError, match="new_tokens must be between 1 and"):
        time_llmstack_generate(ours, prompts, 5)
    with pytest.raises(ValueError, match="new_tokens must be between 1 and"):
        time_hf_generate(hf, prompts, 5)
    with pytest.raises(ValueError, match=r"prompts must be a \(B, T\) tensor"):
        time_llmstack_generate(ours, torch.zeros(4, dtype=torch.long), 5)


def test_metrics_follow_their_definitions():
    t = GenerationTiming(torch.zeros(4, 5, dtype=torch.long), [0.5, 0.6, 0.8, 0.9, 1.0])
    assert t.ttft == 0.5
    assert t.itl == pytest.approx(0.1)  # gaps 0.1, 0.2, 0.1, 0.1
    assert t.tokens_per_s == pytest.approx(20 / 1.0)


def test_first_difference_is_the_earliest_step():
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert first_difference(a, a.clone()) is None
    b = a.clone()
    b[0, 3], b[1, 1] = 0, 0
    assert first_difference(a, b) == (1, 1)


def test_alternate_interleaves_after_warmup():
    calls = []
    got_a, got_b = alternate(lambda: calls.append("a") or len(calls), lambda: calls.append("b") or len(calls), 1, 3)
    assert calls == ["a", "b"] * 4
    assert got_a == [3, 5, 7] and got_b == [4, 6, 8]
