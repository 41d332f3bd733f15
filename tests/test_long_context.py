"""Long context: RoPE scaling applied to a built model, and loss by position."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmstack.model import ModelConfig
from llmstack.eval.perplexity import evaluate
from llmstack.inference import generate
from llmstack.inference.long_context import SCALINGS, extend_context, loss_by_position, trained_context
from llmstack.model import Transformer, rope_cos_sin

TRAINED = 32


def tiny(**kw):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=TRAINED, **kw))
    m.init_weights()
    return m.eval()


@pytest.mark.parametrize("scaling", [None, *SCALINGS])
def test_factor_one_or_no_scaling_leaves_logits_unchanged(scaling):
    model = tiny()
    x = torch.randint(0, 50, (2, TRAINED))
    with torch.no_grad():
        before = model(x)
        # No scaling may still raise the context; a scaling with factor 1 must be the identity.
        extend_context(model, 4 * TRAINED if scaling is None else TRAINED, scaling, None if scaling is None else 1.0)
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_extended_model_runs_past_the_trained_context(scaling):
    model = extend_context(tiny(), 4 * TRAINED, scaling)
    assert model.config.max_seq_len == 4 * TRAINED and trained_context(model) == TRAINED
    assert model.config.rope_scaling.factor == 4.0 and model.config.rope_scaling.type == scaling
    x = torch.randint(0, 50, (1, 4 * TRAINED - 8))
    out = generate(model, x, 8, temperature=0)  # cached decode up to the new context
    assert len(out[0]) == 4 * TRAINED
    with torch.no_grad():
        ref = torch.cat([x, model(out[:, :-1])[:, x.shape[1] - 1:].argmax(-1)], 1)
    assert torch.equal(out, ref)
    assert torch.isfinite(model(out)).all()


@settings(max_examples=40, deadline=None)
@given(position=st.integers(0, 4 * TRAINED), factor=st.sampled_from([2.0, 3.0, 4.0, 8.0]))
def test_linear_scaling_at_s_times_p_rotates_like_the_original_at_p(position, factor):
    model = tiny()
    cos_p, sin_p = rope_cos_sin(torch.tensor([position]), model.rope_inv_freq)
    extend_context(model, int(factor * TRAINED), "linear", factor)
    cos_sp, sin_sp = rope_cos_sin(torch.tensor([factor * position]), model.rope_inv_freq)
    tol = 1e-6 * max(1.0, factor * position)  # float32 angles: error grows with the angle
    torch.testing.assert_close(cos_sp, cos_p, atol=tol, rtol=0)
    torch.testing.assert_close(sin_sp, sin_p, atol=tol, rtol=0)


def test_ntk_stretches_the_slowest_channel_by_the_factor_and_keeps_the_fastest():
    model = tiny()
    old = model.rope_inv_freq.clone()
    extend_context(model, 4 * TRAINED, "ntk")
    torch.testing.assert_close(model.rope_inv_freq[0], old[0])
    torch.testing.assert_close(model.rope_inv_freq[-1], old[-1] / 4, rtol=1e-5, atol=0)


def test_yarn_sets_the_attention_factor_and_a_new_config_object():
    shared = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=TRAINED)
    model, other = Transformer(shared), Transformer(shared)  # two models built from one config object
    extend_context(model, 4 * TRAINED, "yarn")
    assert model.rope_attention_factor == pytest.approx(0.1 * math.log(4) + 1)
    assert other.config is shared and shared.max_seq_len == TRAINED and shared.rope_scaling is None
    assert all(m.config is model.config for m in model.modules() if hasattr(m, "config"))


def test_sliding_window_at_inference_keeps_the_trained_range_exact():
    model = tiny()
    x = torch.randint(0, 50, (1, 3 * TRAINED))
    with torch.no_grad():
        before = model(x[:, :TRAINED])
        extend_context(model, 4 * TRAINED, None, sliding_window=TRAINED)
        after = model(x)
    assert model.config.sliding_window == TRAINED
    # Within the trained length the window never binds; past it every query sees TRAINED keys.
    torch.testing.assert_close(after[:, :TRAINED], before, atol=1e-6, rtol=0)


def test_loss_by_position_averages_to_the_evaluated_loss():
    model = tiny()
    windows = torch.randint(0, 50, (10, TRAINED + 1))
    per_position = loss_by_position(model, windows, batch_size=4)
    assert per_position.shape == (TRAINED,)
    ref = evaluate(model, [(windows[:, :-1], windows[:, 1:])])["loss"]
    assert per_position.mean().item() == pytest.approx(ref, rel=1e-5)


def test_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match="scaling must be one of"):
        extend_context(tiny(), 64, "cubic")
    with pytest.raises(ValueError, match=r"new_max_seq_len must be an integer >= the trained context \(32\)"):
        extend_context(tiny(), 16, "linear")
    with pytest.raises(ValueError, match=r"new_max_seq_len .*, got 64.5"):
        extend_context(tiny(), 64.5, "linear")
    with pytest.raises(ValueError, match="factor must be >= 1"):
        extend_context(tiny(), 64, "linear", 0.5)
    with pytest.raises(ValueError, match="needs a scaling"):
        extend_context(tiny(), 64, None, 2.0)
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        extend_context(tiny(), 64, None, sliding_window=0)
    with pytest.raises(ValueError, match="needs model.pos='rope'"):
        extend_context(tiny(pos="learned"), 64, "linear")
    with pytest.raises(ValueError, match="learned position table"):
        extend_context(tiny(pos="learned"), 64, None)
