"""Decoding core: cached generation equals uncached, sampling follows its definitions."""
import re

import pytest
import torch
import torch.nn.functional as F

from llmstack.model import ModelConfig
from llmstack.inference import generate, sample_next, stream_generate
from llmstack.model import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    m.init_weights()
    return m.eval()


def test_cached_greedy_equals_uncached(model, greedy_uncached):
    prompt = torch.randint(0, 50, (2, 5))
    assert torch.equal(generate(model, prompt, 20, temperature=0), greedy_uncached(model, prompt, 20))


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


# ---------------------------------------------------------------- sampling strategies

from llmstack.inference.generate import StopText, generate_text  # noqa: E402
from llmstack.inference.sampling import (SamplingParams, TokenHistory, apply_penalties,  # noqa: E402
                                         process_logits, sample)


def kept(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits)


def test_nucleus_is_the_smallest_set_reaching_p():
    g = torch.Generator().manual_seed(0)
    for top_p in (0.3, 0.6, 0.9, 0.99):
        logits = torch.randn(64, 40, generator=g) * 2
        probs = logits.softmax(-1)
        keep = kept(process_logits(logits, SamplingParams(top_p=top_p)))
        for row in range(64):
            p, k = probs[row], keep[row]
            assert p[k].min() >= p[~k].max() if (~k).any() else True  # the most likely tokens
            assert p[k].sum() >= top_p - 1e-6  # reaches p
            assert p[k].sum() - p[k].min() < top_p  # one token fewer does not


def test_min_p_keeps_exactly_tokens_above_the_scaled_maximum():
    logits = torch.randn(32, 50) * 3
    for temperature, min_p in ((1.0, 0.05), (0.7, 0.2), (1.5, 0.5)):
        probs = (logits / temperature).softmax(-1)
        expected = probs >= min_p * probs.max(-1, keepdim=True).values
        got = kept(process_logits(logits, SamplingParams(temperature=temperature, min_p=min_p)))
        assert torch.equal(got, expected)
        assert got.sum(-1).min() >= 1 and (~got).any()


def test_truncations_match_transformers_warpers():
    lp = pytest.importorskip("transformers.generation.logits_process")

    logits = torch.randn(16, 60) * 2
    params = SamplingParams(temperature=0.8, top_k=30, top_p=0.9, min_p=0.05)
    ref = logits
    for warper in (lp.TemperatureLogitsWarper(0.8), lp.TopKLogitsWarper(30), lp.TopPLogitsWarper(0.9),
                   lp.MinPLogitsWarper(0.05)):
        ref = warper(None, ref)
    assert torch.equal(kept(process_logits(logits, params)), kept(ref))


def truncated_reference(probs: list[float], temperature: float, top_k: int, top_p: float, min_p: float):
    """The distribution to sample from, computed step by step in plain Python; also how many
    tokens each step removed."""
    p = [x ** (1 / temperature) for x in probs]
    p = [x / sum(p) for x in p]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep = order[:top_k]
    removed = [len(p) - len(keep)]
    mass, nucleus = sum(p[i] for i in keep), []
    for i in keep:  # smallest prefix of the renormalised top-k whose mass reaches top_p
        nucleus.append(i)
        if sum(p[j] for j in nucleus) / mass >= top_p:
            break
    removed.append(len(keep) - len(nucleus))
    pmax = max(p[i] for i in nucleus)
    final = [i for i in nucleus if p[i] >= min_p * pmax]
    removed.append(len(nucleus) - len(final))
    out = [0.0] * len(p)
    for i in final:
        out[i] = p[i] / sum(p[j] for j in final)
    return torch.tensor(out), removed


def test_sampled_frequencies_match_the_truncated_renormalised_distribution():
    probs = [0.3, 0.2, 0.15, 0.12, 0.1, 0.07, 0.04, 0.02]
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9, min_p=0.3)
    expected, removed = truncated_reference(probs, 0.8, 6, 0.9, 0.3)
    assert all(r >= 1 for r in removed)  # every truncation matters in this case
    n = 40000
    logits = torch.tensor(probs).log()[None].expand(n, -1)
    draws = sample(logits, params, generator=torch.Generator().manual_seed(3))
    freq = torch.bincount(draws, minlength=len(probs)).float() / n
    # 5 standard errors of a binomial proportion; tokens removed must never be drawn.
    assert torch.all((freq - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt())
    assert torch.all(freq[expected == 0] == 0)


def penalties_reference(logits, prompt, generated, rep, freq, pres):
    out = logits.clone().double()
    for t in set(prompt) | set(generated):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(generated):
        out[t] -= freq * generated.count(t) + pres
    return out


def test_penalties_match_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0],
                           [-0.5, 1.5, 3.0, -2.0, 0.2, 0.1]])
    prompts, generated = [[0, 1], [5]], [[2, 2, 3], [1, 1, 1, 4]]
    history = TokenHistory(prompts, 6)
    for step in range(4):
        history.append(torch.tensor([g[step] if step < len(g) else g[-1] for g in generated]))
    generated[0].append(generated[0][-1])  # the padding step above appended row 0's last token again
    params = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.25)
    got = apply_penalties(logits, history, params)
    for row in range(2):
        ref = penalties_reference(logits[row], prompts[row], generated[row], 1.3, 0.4, 0.25)
        assert torch.allclose(got[row].double(), ref, atol=1e-6)
    # Temperature 0 takes the argmax after the penalties: row 0's favourite (token 0) loses to 4.
    greedy = SamplingParams(temperature=0, repetition_penalty=3.0)
    assert logits[0].argmax() == 0 and sample(logits, greedy, history=TokenHistory(prompts, 6))[0] == 4


def test_generation_with_penalties_equals_a_plain_loop(model):
    prompt = [5, 6, 7, 5]
    kw = dict(repetition_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2)
    out = generate(model, prompt, 12, temperature=0, **kw)
    x = prompt[:]
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([x]))[0, -1]
            ref = penalties_reference(logits, prompt, x[len(prompt):], 1.5, 0.3, 0.2)
            x.append(int(ref.argmax()))
    assert out.tolist() == x
    assert out.tolist() != generate(model, prompt, 12, temperature=0).tolist()  # the penalties acted


# ---------------------------------------------------------------- batches, stops, callbacks

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13]]


@pytest.fixture(scope="module")
def learned_model():
    """Absolute (learned) positions: with RoPE only distances matter, so a row whose positions
    were all shifted by its padding would still decode the same; here it would not."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                                pos="learned"))
    m.init_weights()
    return m.eval()


@pytest.mark.parametrize("which", ["model", "learned_model"])
def test_unequal_prompts_equal_their_single_runs_greedy(request, which):
    model = request.getfixturevalue(which)
    out = generate(model, PROMPTS, 10, temperature=0)
    assert [len(o) for o in out] == [len(p) + 10 for p in PROMPTS]
    for prompt, row in zip(PROMPTS, out):
        assert torch.equal(row, generate(model, prompt, 10, temperature=0))


@pytest.mark.parametrize("which", ["model", "learned_model"])
def test_unequal_prompts_equal_their_single_runs_seeded(request, which):
    model = request.getfixturevalue(which)
    kw = dict(temperature=0.9, top_k=20, top_p=0.95, min_p=0.02, repetition_penalty=1.2)
    seeds = [11, 12, 13, 14]
    out = generate(model, PROMPTS, 10, seed=seeds, **kw)
    streamed = torch.stack(list(stream_generate(model, PROMPTS, 10, seed=seeds, **kw)), dim=1)
    for i, (prompt, row, seed) in enumerate(zip(PROMPTS, out, seeds)):
        assert torch.equal(row, generate(model, prompt, 10, seed=seed, **kw))
        assert torch.equal(row[len(prompt):], streamed[i])
    assert len({tuple(r[-10:].tolist()) for r in out}) == len(PROMPTS)


def test_each_row_stops_at_its_own_limit_and_stop_token(learned_model):
    model = learned_model
    long = [i % 50 for i in range(58)]
    first = generate(model, PROMPTS[0], 1, temperature=0)[-1].item()
    out = generate(model, [long, PROMPTS[0], PROMPTS[1]], 20, temperature=0, stop_tokens=[first])
    assert len(out[0]) == 64  # the context, like a single run
    assert torch.equal(out[0], generate(model, long, 20, temperature=0, stop_tokens=[first]))
    assert out[1].tolist() == PROMPTS[0] + [first]
    assert torch.equal(out[2], generate(model, PROMPTS[1], 20, temperature=0, stop_tokens=[first]))


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def letters(ids) -> str:
    """A toy detokenizer: token t is two characters, so stop strings can end mid-token."""
    return "".join(LETTERS[t % 26] + LETTERS[(t * 7) % 26] for t in ids)


def test_stop_strings_cut_the_text(model):
    free = generate(model, [1, 2, 3], 20, temperature=0)[3:].tolist()
    text = letters(free)
    stop = text[9:12]  # starts inside token 4 (0-based), ends inside token 5
    start = text.find(stop)
    n_tokens = (start + len(stop) + 1) // 2  # tokens needed for the decoded text to contain it
    out = generate(model, [1, 2, 3], 20, temperature=0, stop_strings=[stop], decode=letters)
    assert out[3:].tolist() == free[:n_tokens]

    class Toy:  # a tokenizer: encode/decode, no EOS
        encode = staticmethod(lambda s: [LETTERS.index(c) for c in s])
        decode = staticmethod(letters)

    assert generate_text(model, Toy, "bcd", 20, temperature=0, stop_strings=["zzz", stop]) == text[:start]
    # In a batch, each row is cut at its own stop.
    rows = generate_text(model, Toy, ["bcd", "efghij"], 20, temperature=0, stop_strings=[stop])
    assert rows[0] == text[:start]
    alone = generate_text(model, Toy, "efghij", 20, temperature=0, stop_strings=[stop])
    assert rows[1] == alone


def test_streamed_text_never_shows_a_stop_string():
    stop = "cdc"
    watcher, shown = StopText([stop], lambda ids: "".join(LETTERS[t] for t in ids)), []
    for t in [0, 1, 2, 3, 2, 1, 2, 3, 2, 4]:  # a b c d c b c d c e: stops at the first "cdc"
        shown.append(watcher.push(t))
        assert stop not in "".join(shown)
        if watcher.stopped:
            break
    shown.append(watcher.flush())
    assert watcher.stopped and "".join(shown) == watcher.text == "ab"
    # Without a stop, everything held back comes out at the end.
    watcher = StopText(["xyz"], lambda ids: "".join(LETTERS[t] for t in ids))
    shown = [watcher.push(t) for t in [0, 23, 24]]
    assert shown == ["a", "", ""] and watcher.flush() == "xy" and not watcher.stopped


def test_on_token_sees_what_the_stream_yields(model):
    seen = []
    out = generate(model, [1, 2, 3], 8, temperature=0.8, seed=2, on_token=seen.append)
    assert seen == out[3:].tolist() == list(stream_generate(model, [1, 2, 3], 8, temperature=0.8, seed=2))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), r"temperature must be a finite number >= 0 \(0 = greedy\), got -0.5"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\], got -0.1"),
    (dict(min_p=2.0), r"min_p must be in \[0, 1\], got 2.0"),
    (dict(top_k=0), r"top_k must be an integer in \[1, 50\], got 0"),
    (dict(top_k=51), r"top_k must be an integer in \[1, 50\], got 51"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be a finite number > 0 \(1 = off\), got 0.0"),
    (dict(frequency_penalty=float("nan")), r"frequency_penalty must be a finite number"),
    (dict(presence_penalty=float("inf")), r"presence_penalty must be a finite number"),
])
def test_bad_sampling_values_are_named(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs).validate(50)
    with pytest.raises(ValueError, match=message):
        generate(model, [1, 2], 3, **kwargs)


def test_bad_generation_arguments_are_named(model):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0, got -1"):
        generate(model, [1, 2], -1)
    with pytest.raises(ValueError, match="top_p must be in"):
        stream_generate(model, [1, 2], 5, top_p=2.0)  # at the call, not at the first token
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="seed: got 2 seeds for 3 prompts"):
        generate(model, [[1], [2], [3]], 3, seed=[1, 2])
    with pytest.raises(ValueError, match="stop_strings need a decode function"):
        generate(model, [1, 2], 3, stop_strings=["x"])
    with pytest.raises(ValueError, match="stop_strings must be non-empty strings"):
        generate(model, [1, 2], 3, stop_strings=[""], decode=letters)
    with pytest.raises(ValueError, match="top_k must be an integer in"):
        sample_next(torch.zeros(1, 5), top_k=6)
    with pytest.raises(ValueError, match="input_ids must be token ids, not text"):
        generate(model, "def f():", 3)
    with pytest.raises(ValueError, match="token ids must be integers, got torch.float32"):
        generate(model, [1.5, 2.0], 3)
    # A prompt that fills the context leaves no room: an error, not a silent empty continuation.
    with pytest.raises(ValueError, match=r"prompt 1 has 64 tokens, which leaves no room .* \(max_seq_len=64\)"):
        generate(model, [[1, 2], [3] * 64], 3)
    assert len(generate(model, [3] * 64, 0)) == 64  # nothing asked for: nothing to refuse


def test_one_stop_token_may_be_given_as_an_int(model):
    full = generate(model, [1, 2, 3], 12, temperature=0)
    stop = int(full[6])
    end = 3 + full[3:].tolist().index(stop) + 1  # just after the stop token's first appearance
    assert torch.equal(generate(model, [[1, 2, 3]], 12, temperature=0, stop_tokens=stop)[0], full[:end])


# ---------------------------------------------------------------- library calls leave the model alone


def _snapshot(model):
    """What a library call must not change: module types, each parameter's identity, storage,
    strides and values, and every module's train/eval mode."""
    return ([type(m) for m in model.modules()],
            [(id(p), p.data_ptr(), p.stride(), p.detach().clone()) for p in model.parameters()],
            [m.training for m in model.modules()])


def _same(before, after):
    types_a, params_a, modes_a = before
    types_b, params_b, modes_b = after
    assert types_a == types_b
    assert modes_a == modes_b
    for (ia, pa, sa, va), (ib, pb, sb, vb) in zip(params_a, params_b, strict=True):
        assert (ia, pa, sa) == (ib, pb, sb) and torch.equal(va, vb)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_inference_calls_leave_the_callers_model_as_it_was(training, threads):
    """generate, stream_generate, beam_search, speculative_generate (with a draft model) and
    CompiledDecoder run in eval mode and give the model back with the same module types,
    parameter storage and train/eval mode (on the CPU too, where decoding has its own fast path)."""
    from llmstack.inference import CompiledDecoder, beam_search, speculative_generate

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48, dropout=0.1)
    model, draft = Transformer(cfg), Transformer(ModelConfig(**{**cfg.__dict__, "n_layers": 1}))
    model.init_weights(), draft.init_weights()
    model.train(training), draft.train(training)
    model.layers[0].eval()  # a mixed state must come back mixed
    before, draft_before = _snapshot(model), _snapshot(draft)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # 2: the CPU's split decoding path
    try:
        greedy = generate(model, [1, 2, 3], 8, temperature=0)
        list(stream_generate(model, [[1, 2], [3, 4, 5]], 4, temperature=0.7, seed=0))
        beam_search(model, [1, 2, 3], 6, num_beams=3)
        assert torch.equal(speculative_generate(model, [1, 2, 3], 8, draft=draft).ids, greedy)  # dropout off
        decoder = CompiledDecoder(model, 1, 24, backend="eager")
        assert torch.equal(decoder.generate([1, 2, 3], 8, temperature=0), greedy)
    finally:
        torch.set_num_threads(previous)
    _same(before, _snapshot(model))
    _same(draft_before, _snapshot(draft))


@pytest.mark.parametrize("bias", [False, True])
def test_split_linear_equals_linear(bias):
    """The CPU decoding products, split by output rows into one batched product, equal F.linear for
    every row count they take; more rows, an output width the split does not divide, or autograd
    go to F.linear untouched."""
    from llmstack.inference.cpu import SplitLinear

    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 40, bias=bias)
    for splits in (2, 4, 3):
        split = SplitLinear(96, 40, bias=bias)
        split.load_state_dict(layer.state_dict())
        split.splits = splits
        for shape in [(96,), (1, 1, 96), (3, 1, 96), (1, 16, 96), (2, 9, 96), (4, 5, 96)]:
            x = torch.randn(*shape)
            with torch.no_grad():
                expected, got = layer(x), split(x)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 96, requires_grad=True)
    split(x).sum().backward()  # with autograd: the plain product, gradients included
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(2, 96))


def test_decoding_view_shares_the_model_and_decodes_alike(model):
    """On a multi-core CPU generation runs a view of the model: the same tensor objects, SplitLinear
    in place of each nn.Linear, and the greedy tokens of the model itself; with one thread, the
    model itself."""
    from llmstack.inference.cpu import SplitLinear, decoding_view

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert decoding_view(model) is model
        single = generate(model, [[1, 2, 3], [4, 5]], 10, temperature=0)
        torch.set_num_threads(2)
        view = decoding_view(model)
        assert view is not model and all(a is b for a, b in zip(view.parameters(), model.parameters()))
        assert {type(m) for m in view.modules()} >= {SplitLinear} and SplitLinear not in map(type, model.modules())
        split = generate(model, [[1, 2, 3], [4, 5]], 10, temperature=0)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(single, split))


def test_decoding_view_splits_a_tied_head_over_the_embedding():
    from llmstack.inference.cpu import SplitLinear, decoding_view

    torch.manual_seed(0)
    tied = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=32,
                                   tie_embeddings=True))
    tied.init_weights()
    tied.eval()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        view = decoding_view(tied)
        assert type(view.lm_head) is SplitLinear and view.lm_head.weight is tied.embed.weight
        assert tied.lm_head is None and "lm_head.weight" not in tied.state_dict()  # the model is untouched
        x = torch.randint(0, 64, (1, 5))
        with torch.no_grad():
            torch.testing.assert_close(view(x), tied(x), rtol=1e-5, atol=1e-6)
        split = generate(tied, [1, 2, 3], 12, temperature=0)
        torch.set_num_threads(1)
        assert torch.equal(generate(tied, [1, 2, 3], 12, temperature=0), split)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- GenerationConfig: which options combine


@pytest.mark.parametrize("options, message", [
    (dict(num_beams=2, temperature=0.5, seed=1), "num_beams runs beam search, which does not sample: temperature, seed"),
    (dict(num_return_sequences=2), "num_return_sequences needs num_beams"),
    (dict(early_stopping="true"), "early_stopping needs num_beams"),
    (dict(draft="runs/x", prompt_lookup=True), "draft and prompt_lookup are two ways to draft"),
    (dict(num_beams=2, prompt_lookup=True), "cannot be combined with num_beams"),
    (dict(prompt_lookup=True, repetition_penalty=1.2), "temperature, top_k, top_p and seed only; repetition_penalty"),
    (dict(k=3), "k needs draft or prompt_lookup"),
    (dict(draft="runs/x", ngram=2), "ngram needs prompt_lookup"),
    (dict(stop=[""]), "stop takes non-empty texts"),
])
def test_generation_config_refuses_options_that_do_not_combine(options, message):
    from llmstack.inference import GenerationConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        GenerationConfig(**options).validate()


def test_generation_config_drives_each_way_of_decoding(model):
    """Each mode's keyword arguments run the function that mode names, with the defaults filled
    in; speculative greedy decoding gives plain greedy decoding's tokens."""
    from llmstack.inference import GenerationConfig, beam_search, speculative_generate

    sample = GenerationConfig(max_new_tokens=6, temperature=0).validate()
    assert sample.mode == "sample" and sample.sampling()["top_p"] == 0.95
    greedy = generate(model, [1, 2, 3], sample.max_new_tokens, **sample.sampling())
    beams = GenerationConfig(max_new_tokens=6, num_beams=3, early_stopping="never").validate()
    assert beams.mode == "beam" and beams.beam()["num_return_sequences"] == 3
    assert len(beam_search(model, [1, 2, 3], beams.max_new_tokens, **beams.beam())) == 3
    lookup = GenerationConfig(max_new_tokens=6, temperature=0, prompt_lookup=True, k=2).validate()
    assert lookup.mode == "speculative" and lookup.speculative()["ngram"] == 3
    assert torch.equal(speculative_generate(model, [1, 2, 3], lookup.max_new_tokens, **lookup.speculative()).ids,
                       greedy)
    with pytest.raises(ValueError, match="ngram applies to prompt lookup"):
        speculative_generate(model, [1, 2, 3], 4, draft=model, ngram=2)
