"""Recurrent language models through the Transformer's pipeline: the forward contract that training and
generation use, a state that skips padding, build and load by model.arch, pretraining and generation."""
import math

import pytest
import torch
import torch.nn.functional as F

import llmstack
from llmstack.classic.recurrent import RecurrentLM, RecurrentState
from llmstack.config import load_config
from llmstack.inference import beam_search, generate, speculative_generate, stream_generate
from llmstack.interop import build, save_pretrained
from llmstack.model import ModelConfig, build_model, count_params
from llmstack.train import PretrainConfig, pretrain

ARCHS = ["lstm", "gru"]


def recurrent_lm(arch: str, **overrides) -> RecurrentLM:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"arch": arch, "vocab_size": 50, "dim": 24, "n_layers": 2, "max_seq_len": 64,
                         "tie_embeddings": True, **overrides})
    model = build(cfg)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_contract(arch):
    model = recurrent_lm(arch, tie_embeddings=False)
    x = torch.randint(0, 50, (3, 10))
    logits = model(x)
    assert logits.shape == (3, 10, 50)
    y = x.roll(-1, dims=1)
    y[0, -4:] = -100
    loss, aux = model(x, targets=y, return_aux=True)
    assert loss.dtype == torch.float32 and aux == {"aux_loss": None, "expert_load": None}
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model(x, logits_to_keep=2), logits[:, -2:])
    torch.testing.assert_close(model.head(model(x, return_hidden=True)), logits)
    with pytest.raises(ValueError, match="two different outputs"):
        model(x, targets=y, return_hidden=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_state_carries_the_sequence_across_calls(arch):
    """Prefill then one token at a time through the cache equals one pass over the whole sequence."""
    model = recurrent_lm(arch)
    x = torch.randint(0, 50, (2, 12))
    full = model(x)
    cache = model.make_cache(2, 12)
    parts = [model(x[:, :5], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert cache.seq_len == 12 and cache.lengths is None and cache.block_table is None
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    cache.truncate(12)  # a no-op; anything else cannot be done without per-token history
    with pytest.raises(ValueError, match="cannot truncate a recurrent state"):
        cache.truncate(11)
    cache.reset()
    assert cache.seq_len == 0
    torch.testing.assert_close(model(x, cache=cache), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_steps_leave_the_state_unchanged(arch):
    model = recurrent_lm(arch)
    x = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :4] = False
    cache = model.make_cache(2)
    out = model(x, cache=cache, attn_mask=mask)
    alone_cache = model.make_cache(1)
    alone = model(x[1:, 4:], cache=alone_cache)
    torch.testing.assert_close(out[1:, 4:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.h[:, 1:], alone_cache.h, rtol=1e-5, atol=1e-5)


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13]]


@pytest.mark.parametrize("arch", ARCHS)
def test_unequal_prompts_equal_their_single_runs(arch):
    """As tests/test_decoding.py checks for Transformers: greedy and seeded sampling."""
    model = recurrent_lm(arch)
    out = generate(model, PROMPTS, 10, temperature=0)
    for prompt, row in zip(PROMPTS, out):
        assert torch.equal(row, generate(model, prompt, 10, temperature=0))
    seeds = [11, 12, 13, 14]
    kw = dict(temperature=0.9, top_k=20, repetition_penalty=1.2)
    out = generate(model, PROMPTS, 10, seed=seeds, **kw)
    streamed = torch.stack(list(stream_generate(model, PROMPTS, 10, seed=seeds, **kw)), dim=1)
    for i, (prompt, row, seed) in enumerate(zip(PROMPTS, out, seeds)):
        assert torch.equal(row, generate(model, prompt, 10, seed=seed, **kw))
        assert torch.equal(row[len(prompt):], streamed[i])


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_greedy_equals_uncached(arch, greedy_uncached):
    model = recurrent_lm(arch)
    prompt = torch.randint(0, 50, (2, 5))
    assert torch.equal(generate(model, prompt, 15, temperature=0), greedy_uncached(model, prompt, 15))


@pytest.mark.parametrize("arch", ARCHS)
def test_our_recurrent_layers_load_the_fused_ones_weights_and_compute_the_same(arch):
    """The LM runs torch's fused nn.LSTM / nn.GRU; llmstack.classic.rnn's written-out layers, given
    the same state dict, give the same logits (float64)."""
    from llmstack.classic.rnn import GRU, LSTM

    model = recurrent_lm(arch).double()
    x = torch.randint(0, 50, (2, 7))
    fused = model(x)
    ours = (LSTM if arch == "lstm" else GRU)(24, 24, 2, batch_first=True).double()
    ours.load_state_dict(model.rnn.state_dict())
    model.rnn = ours
    torch.testing.assert_close(model(x), fused, rtol=0, atol=1e-10)


def test_build_dispatches_on_arch_and_the_transformer_refuses_other_archs():
    assert isinstance(build(ModelConfig(arch="gru", vocab_size=50, dim=24, n_layers=1)), RecurrentLM)
    assert type(build(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4))).__name__ == "Transformer"
    lstm = ModelConfig(arch="lstm", vocab_size=50, dim=30, n_layers=1)  # 30 heads nowhere: no head rule applies
    with pytest.raises(ValueError, match="llmstack.interop.build"):
        build_model(lstm)
    with pytest.raises(ValueError, match="llmstack.interop.build"):
        count_params(lstm)
    with pytest.raises(llmstack.ConfigError, match="model.moe"):
        ModelConfig(arch="lstm", moe={"n_experts": 2}).validate()


def test_parameter_count_follows_the_lstm_and_gru_formulas():
    for arch, gates in (("lstm", 4), ("gru", 3)):
        model = recurrent_lm(arch)
        # per layer: gates * H * (inputs + H) weights and two bias vectors; the tied embedding once
        assert model.num_params() == 50 * 24 + 2 * (gates * 24 * (24 + 24) + 2 * gates * 24)
        assert model.num_params(exclude_embeddings=True) == model.num_params() - 50 * 24


def test_beam_search_and_speculative_decoding_refuse_a_recurrent_model_clearly():
    model = recurrent_lm("lstm")
    with pytest.raises(ValueError, match="need a Transformer"):
        beam_search(model, [1, 2, 3], 4, num_beams=2)
    with pytest.raises(ValueError, match="need a Transformer"):
        speculative_generate(model, [1, 2, 3], 4, ngram=2, temperature=0)


def test_pretrain_save_load_and_generate_a_recurrent_lm(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"m{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 20)
    job = load_config(PretrainConfig, overrides=[
        "model.arch=gru", "model.dim=32", "model.n_layers=2", "model.vocab_size=300", "model.max_seq_len=64",
        "model.tie_embeddings=true", "tokenizer.vocab_size=300", f"data.source={corpus}/*.txt", "data.seq_len=32",
        "data.val_fraction=0.2", f"data.cache_dir={tmp_path / 'cache'}", f"train.out_dir={tmp_path / 'run'}",
        "train.max_steps=8", "train.batch_size=4", "train.lr=1e-2", "train.warmup_steps=2", "train.eval_every=4",
        "train.eval_batches=2", "train.log_every=4", "train.save_every=4", "train.tensorboard=false"])
    result = pretrain(job, progress=False)
    assert math.isfinite(result.val["loss"]) and result.val["loss"] < result.first_val["loss"]
    model = llmstack.from_pretrained(tmp_path / "run")
    assert isinstance(model, RecurrentLM) and model.config.arch == "gru"
    tok = llmstack.load_tokenizer(tmp_path / "run")
    prompt = tok.encode("def f1")
    assert len(generate(model, prompt, 6, temperature=0)) == len(prompt) + 6
    save_pretrained(model, tmp_path / "copy")  # and back
    again = llmstack.from_pretrained(tmp_path / "copy")
    x = torch.tensor([prompt])
    torch.testing.assert_close(again(x), model(x))
    assert isinstance(model.make_cache(2), RecurrentState)


def test_the_lstm_and_gru_jobs_are_the_quickstart_job_with_another_model_of_its_size():
    """What the README's comparison rests on: the same corpus, tokenizer, batches, optimizer and
    schedule, and parameter counts within 0.5% of the quickstart Transformer's."""
    from llmstack.config import to_dict

    jobs = {name: load_config(PretrainConfig, f"configs/pretrain/{name}.yaml") for name in ("quickstart", "lstm", "gru")}
    base = {k: v for k, v in to_dict(jobs["quickstart"]).items() if k != "model"}
    params = {name: build(job.model).num_params() for name, job in jobs.items()}
    for name in ("lstm", "gru"):
        job = to_dict(jobs[name])
        assert job["model"]["arch"] == name and job["train"]["out_dir"] == f"runs/{name}"
        assert {k: v for k, v in job.items() if k != "model"} == {
            **base, "train": {**base["train"], "out_dir": f"runs/{name}"}}
        assert abs(params[name] / params["quickstart"] - 1) < 0.005
