"""Timed generation for the benchmarks: both implementations produce the tokens greedy decoding
defines, one timestamp per step, and the derived metrics follow their definitions; the bytes a
decode step reads are counted from the configuration."""
import pytest
import torch

from benchlib import GenerationTiming, alternate, decode_bytes_per_token, first_difference, hf_twin, \
    time_compiled_generate, time_hf_generate, time_llmstack_generate
from llmstack.model import MoEConfig, ModelConfig
from llmstack.inference.compiled import CompiledDecoder
from llmstack.inference.quantize import quantize_
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


def test_compiled_timer_returns_the_greedy_tokens(models):
    ours, _ = models
    prompts = torch.randint(0, 50, (2, 5))
    timing = time_compiled_generate(CompiledDecoder(ours, 2, 20, backend="eager"), prompts, 9)
    assert torch.equal(timing.tokens, generate(ours, prompts, 9, temperature=0)[:, 5:])
    assert len(timing.times) == 9


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


# --------------------------------------------------------------------------- bytes per decode step

V, C, L, H, HKV, D, F = 50, 32, 2, 4, 2, 8, 96


def _model(**overrides) -> Transformer:
    cfg = dict(vocab_size=V, dim=C, n_layers=L, n_heads=H, n_kv_heads=HKV, ffn_hidden=F, max_seq_len=64)
    model = Transformer(ModelConfig(**{**cfg, **overrides}))
    model.init_weights()
    return model.eval()


def _layer_weights(mlp_weights: int) -> int:
    """Elements of one block's weights: q/k/v, o, the MLP's and the two norms."""
    return C * (H + 2 * HKV) * D + H * D * C + mlp_weights + 2 * C


ROPE = D // 2  # the inverse frequencies, read to compute each step's rotation


def test_decode_bytes_count_every_weight_once_and_the_cached_keys():
    kv_per_token = 2 * L * HKV * D * 4
    mlp = 3 * C * F  # gate, up, down
    tied = _model(tie_embeddings=True)
    # Tied: the head reads the whole embedding matrix, counted once.
    assert decode_bytes_per_token(tied, 0) == 4 * (L * _layer_weights(mlp) + C + V * C + ROPE)
    assert decode_bytes_per_token(tied, 10) == decode_bytes_per_token(tied, 0) + 10 * kv_per_token
    # Untied: the embedding lookup reads one row (not counted), the separate head all of it.
    untied = _model(tie_embeddings=False)
    assert decode_bytes_per_token(untied, 0) == 4 * (L * _layer_weights(mlp) + C + V * C + ROPE)
    # A sliding window attends to at most `window` cached tokens.
    assert decode_bytes_per_token(_model(sliding_window=6), 40) == decode_bytes_per_token(tied, 6)
    # Learned positions are a lookup too.
    assert decode_bytes_per_token(_model(pos="learned"), 0) == decode_bytes_per_token(tied, 0)


def test_decode_bytes_count_quantized_codes_and_only_the_experts_used():
    tied = _model(tie_embeddings=True)
    base = decode_bytes_per_token(tied, 0)
    linear = L * (C * (H + 2 * HKV) * D + H * D * C + 3 * C * F)  # quantized weights (elements)
    rows = L * ((H + 2 * HKV) * D + C + 2 * F + C)  # their output channels: one float32 scale each
    int8 = quantize_(_model(tie_embeddings=True), "int8", embedding=None)
    assert decode_bytes_per_token(int8, 0) == base - 4 * linear + linear + 4 * rows
    # The tied embedding quantized too: its codes and one scale per row, read whole by the head.
    both = quantize_(_model(tie_embeddings=True), "int8")
    assert decode_bytes_per_token(both, 0) == base - 4 * (linear + V * C) + (linear + V * C) + 4 * (rows + V)
    # Four experts, each the size of the dense MLP, one used per token: the dense model's bytes
    # plus each layer's router and its per-expert bias.
    moe = _model(moe=MoEConfig(n_experts=4, top_k=1, expert_hidden=F))
    assert decode_bytes_per_token(moe, 0) == base + 4 * L * (C * 4 + 4)
