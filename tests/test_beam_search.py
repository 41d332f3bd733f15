"""Beam search: exact on enumerable problems, transformers' results and scores, correct log-probs."""
import itertools
import math

import pytest
import torch

from llmstack.model import ModelConfig
from llmstack.inference.beam import beam_search
from llmstack.inference.generate import generate
from llmstack.model import Transformer


def tiny_model(vocab_size: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    # A large init_std makes the next-token distributions peaked and unlike each other,
    # so the best sequence is not also the greedy one by accident.
    m = Transformer(ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                                init_std=0.5))
    m.init_weights()
    return m.eval()


@pytest.fixture(scope="module")
def model5():
    return tiny_model(5)


@pytest.fixture(scope="module")
def model50():
    return tiny_model(50, seed=1)


def continuation_log_prob(model, prompt: list[int], continuation: list[int]) -> float:
    """Sum of the continuation's token log-probs, from one plain forward without a cache."""
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0].double(), dim=-1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(continuation))


def exhaustive(model, prompt: list[int], steps: int, eos: int | None, length_penalty: float):
    """Every hypothesis beam search could return (ends at its first EOS or at `steps` tokens),
    scored by a plain forward: [(score, continuation)], best first."""
    V = model.config.vocab_size
    hyps = []
    for n in range(1, steps + 1):
        for cont in itertools.product(range(V), repeat=n):
            if eos is not None and eos in cont[:-1]:
                continue  # it would have finished earlier
            if n < steps and cont[-1] != eos:
                continue  # only EOS ends a hypothesis before the length limit
            cont = list(cont)
            hyps.append((continuation_log_prob(model, prompt, cont) / n**length_penalty, cont))
    return sorted(hyps, key=lambda h: h[0], reverse=True)


def test_width_one_is_greedy(model50):
    prompt = [3, 14, 15]
    hyp, = beam_search(model50, prompt, 12, num_beams=1)
    assert torch.equal(hyp.tokens, generate(model50, prompt, 12, temperature=0))
    # With an EOS, width 1 stops where greedy decoding with that stop token does.
    eos = int(hyp.tokens[len(prompt) + 4])
    hyp, = beam_search(model50, prompt, 12, num_beams=1, stop_tokens=[eos])
    assert torch.equal(hyp.tokens, generate(model50, prompt, 12, temperature=0, stop_tokens=[eos]))


def test_wide_enough_beam_finds_the_exhaustive_n_best(model5):
    # vocab 5, 2 new tokens: a width of 5 keeps every one-token prefix, so beam search must be exact.
    prompt, steps, width = [2, 4], 2, 5
    best = exhaustive(model5, prompt, steps, None, 1.0)
    hyps = beam_search(model5, prompt, steps, num_beams=width, num_return_sequences=width)
    assert [h.tokens[len(prompt):].tolist() for h in hyps] == [cont for _, cont in best[:width]]
    # float32 sums against a float64 reference
    assert [h.score for h in hyps] == pytest.approx([s for s, _ in best[:width]], rel=1e-5, abs=1e-5)
    assert best[0][1] != generate(model5, prompt, steps, temperature=0)[len(prompt):].tolist()  # not trivially greedy


@pytest.mark.parametrize("length_penalty", [1.0, -1.0, 2.0])
def test_wide_enough_beam_is_exact_with_eos(model5, length_penalty):
    prompt, steps, width = [4], 2, 5
    eos = int(generate(model5, prompt, 1, temperature=0)[-1])  # the likeliest first token ends a hypothesis
    best = exhaustive(model5, prompt, steps, eos, length_penalty)
    hyps = beam_search(model5, prompt, steps, num_beams=width, num_return_sequences=width, stop_tokens=[eos],
                       length_penalty=length_penalty, early_stopping="never")
    assert [h.tokens[len(prompt):].tolist() for h in hyps] == [cont for _, cont in best[:width]]
    assert [h.score for h in hyps] == pytest.approx([s for s, _ in best[:width]], rel=1e-5, abs=1e-5)
    if length_penalty <= 1.0:  # (a penalty of 2 favours the longest hypotheses)
        assert any(len(h.tokens) < len(prompt) + steps for h in hyps)  # finished hypotheses are kept


def test_n_best_is_sorted_and_scores_are_log_probs(model50):
    prompt, eos = [7, 8, 9], 11
    for length_penalty, early_stopping in [(1.0, False), (0.5, True), (-0.5, "never")]:
        hyps = beam_search(model50, prompt, 10, num_beams=6, num_return_sequences=6, stop_tokens=[eos],
                           length_penalty=length_penalty, early_stopping=early_stopping)
        assert len(hyps) == 6
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            cont = h.tokens[len(prompt):].tolist()
            assert eos not in cont[:-1]  # nothing follows an EOS
            assert h.log_prob == pytest.approx(continuation_log_prob(model50, prompt, cont), abs=1e-4)
            assert h.score == pytest.approx(h.log_prob / len(cont)**length_penalty, rel=1e-6)


def test_exhaustive_stopping_is_never_worse(model50):
    prompt, eos = [2, 4, 6, 8], 11
    best = {es: beam_search(model50, prompt, 10, num_beams=3, stop_tokens=[eos], length_penalty=2.0,
                            early_stopping=es)[0].score for es in (True, False, "never")}
    assert best["never"] >= best[False] - 1e-6 and best["never"] >= best[True] - 1e-6


def test_matches_transformers_beam_search(tmp_path):
    transformers = pytest.importorskip("transformers")
    import llmstack

    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=12, max_position_embeddings=64, initializer_range=0.5)).eval()
    ref.save_pretrained(tmp_path)
    ours = llmstack.from_pretrained(tmp_path)
    prompt, pad = torch.tensor([[1, 5, 3]]), 11
    cases = [(4, -1.0, True, 5), (7, 2.0, "never", 3), (2, 1.0, False, 4)]
    n_eos_endings = 0
    for eos, length_penalty, early_stopping, width in cases:
        out = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                           num_beams=width, num_return_sequences=width, length_penalty=length_penalty,
                           early_stopping=early_stopping, eos_token_id=eos, pad_token_id=pad,
                           return_dict_in_generate=True, output_scores=True)
        hyps = beam_search(ours, prompt, 6, num_beams=width, num_return_sequences=width, stop_tokens=[eos],
                           length_penalty=length_penalty, early_stopping=early_stopping)
        assert len(hyps) == width
        for h, seq, score in zip(hyps, out.sequences.tolist(), out.sequences_scores.tolist()):
            assert h.tokens.tolist() == seq[:len(h.tokens)] and set(seq[len(h.tokens):]) <= {pad}
            assert h.score == pytest.approx(score, abs=1e-4)
            n_eos_endings += h.tokens[-1].item() == eos
    assert n_eos_endings > 0  # the cases exercise EOS, not just the length limit


def test_bad_arguments_are_named(model5):
    with pytest.raises(ValueError, match=r"num_beams must be an integer in \[1, 5\] \(the vocabulary size\), got 0"):
        beam_search(model5, [1], 2, num_beams=0)
    with pytest.raises(ValueError, match=r"num_beams .*, got 6"):
        beam_search(model5, [1], 2, num_beams=6)
    with pytest.raises(ValueError, match=r"num_return_sequences must be an integer in \[1, num_beams=3\], got 4"):
        beam_search(model5, [1], 2, num_beams=3, num_return_sequences=4)
    with pytest.raises(ValueError, match=r"stop token 5 is outside the vocabulary \[0, 4\]"):
        beam_search(model5, [1], 2, num_beams=2, stop_tokens=[5])
    with pytest.raises(ValueError, match="early_stopping must be True, False or 'never'"):
        beam_search(model5, [1], 2, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="length_penalty must be a finite number"):
        beam_search(model5, [1], 2, num_beams=2, length_penalty=math.inf)
    with pytest.raises(ValueError, match="one prompt"):
        beam_search(model5, [[1, 2], [3, 4]], 2, num_beams=2)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        beam_search(model5, [], 2, num_beams=2)
    with pytest.raises(ValueError, match="token id 9 is outside the vocabulary"):
        beam_search(model5, [1, 9], 2, num_beams=2)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        beam_search(model5, [1], -1, num_beams=2)
