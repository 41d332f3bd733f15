"""Stage 1 building blocks written here, against torch's own."""
import numpy as np
import pytest
import torch

from llmstack.classic.autodiff import Value
from llmstack.classic.optim import SGD, Adam, AdamW


def run_steps(opt_cls, kwargs, steps=25, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = opt_cls(model.parameters(), **kwargs)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    losses = []
    for i in range(steps):
        batch = slice((i * 8) % 32, (i * 8) % 32 + 8)  # mini-batches of 8
        loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.cat([p.detach().flatten() for p in model.parameters()]), losses


@pytest.mark.parametrize("ours, ref, kwargs", [
    (SGD, torch.optim.SGD, dict(lr=0.05)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    (AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))),
])
def test_optimizers_match_torch(ours, ref, kwargs):
    a, losses = run_steps(ours, kwargs)
    b, _ = run_steps(ref, kwargs)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]


def test_adam_and_adamw_differ_only_through_weight_decay():
    a, _ = run_steps(Adam, dict(lr=1e-2, weight_decay=0.0))
    b, _ = run_steps(AdamW, dict(lr=1e-2, weight_decay=0.0))
    torch.testing.assert_close(a, b)
    c, _ = run_steps(AdamW, dict(lr=1e-2, weight_decay=0.5))
    assert c.norm() < b.norm()  # decoupled decay shrinks the weights


def test_autodiff_matches_torch_autograd():
    rng = np.random.default_rng(0)
    x_np, w_np, b_np = rng.normal(size=(5, 4)), rng.normal(size=(4, 3)), rng.normal(size=(3,))
    targets = np.array([0, 2, 1, 1, 0])

    x, w, b = Value(x_np), Value(w_np), Value(b_np)
    h = ((x @ w) + b).tanh()
    loss = h.cross_entropy(targets) + (w * w).mean() * 0.1 + (h.relu() ** 2.0).sum() / 7.0 - h.exp().log().mean()
    loss.backward()

    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x_np, w_np, b_np))
    th = torch.tanh(tx @ tw + tb)
    tloss = (torch.nn.functional.cross_entropy(th, torch.tensor(targets)) + (tw * tw).mean() * 0.1
             + (th.relu() ** 2).sum() / 7.0 - th.exp().log().mean())
    tloss.backward()
    assert loss.data == pytest.approx(tloss.item(), rel=1e-10)
    for ours, ref in ((x, tx), (w, tw), (b, tb)):
        np.testing.assert_allclose(ours.grad, ref.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_softmax_is_shift_invariant_stable_and_normalised():
    logits = Value(np.array([[1000.0, 1001.0, 1002.0], [-5.0, 0.0, 5.0]]))
    p = logits.softmax().data
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(-1), 1.0)
    np.testing.assert_allclose(p[0], Value(np.array([0.0, 1.0, 2.0])).softmax().data)
    np.testing.assert_allclose(p, torch.softmax(torch.tensor(logits.data), -1).numpy())


def test_gradient_accumulates_when_a_value_is_reused():
    x = Value(np.array(3.0))
    y = x * x + x  # dy/dx = 2x + 1
    y.backward()
    assert x.grad == pytest.approx(7.0)


# ---------------------------------------------------------------- autodiff: reflected operators, 1-D matmul, training

def test_reflected_operators_and_1d_matmul_match_torch():
    rng = np.random.default_rng(1)
    a_np, m_np, v_np = rng.uniform(0.5, 2.0, 4), rng.normal(size=(4, 3)), rng.normal(size=3)
    a, m, v = Value(a_np), Value(m_np), Value(v_np)
    out = ((1 - a) * (2 / a) + 2 ** a) @ m @ v + (a @ a) * 0.5  # vec @ mat, vec @ vec, and a scalar result
    out.backward()
    ta, tm, tv = (torch.tensor(x, requires_grad=True) for x in (a_np, m_np, v_np))
    tout = ((1 - ta) * (2 / ta) + 2 ** ta) @ tm @ tv + (ta @ ta) * 0.5
    tout.backward()
    assert out.data == pytest.approx(tout.item(), rel=1e-12)
    for ours, ref in ((a, ta), (m, tm), (v, tv)):
        np.testing.assert_allclose(ours.grad, ref.grad.numpy(), rtol=1e-10, atol=1e-12)
    w = Value(m_np)
    (w @ Value(v_np)).sum().backward()  # mat @ vec
    np.testing.assert_allclose(w.grad, np.outer(np.ones(4), v_np))


def test_zero_grad_clears_what_backward_accumulates():
    x = Value(np.array([1.0, 2.0]))
    (x * 3.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad, [6.0, 6.0])  # accumulated, as torch does
    x.zero_grad()
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad, [3.0, 3.0])


def test_an_mlp_trained_with_autodiff_matches_torch_step_for_step():
    from llmstack.classic.autodiff import MLP

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0)  # three classes by quadrant: learnable
    mlp = MLP([2, 16, 16, 3], rng)
    layers = []
    for i, (w, b) in enumerate(mlp.layers):
        linear = torch.nn.Linear(*w.shape).double()
        with torch.no_grad():
            linear.weight.copy_(torch.tensor(w.data.T))  # ours stores (in, out)
            linear.bias.copy_(torch.tensor(b.data))
        layers += [linear] + ([torch.nn.Tanh()] if i < len(mlp.layers) - 1 else [])
    ref = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    ours_losses, ref_losses = [], []
    for step in range(40):
        batch = slice((step * 16) % 64, (step * 16) % 64 + 16)
        mlp.zero_grad()
        loss = mlp(Value(x[batch])).cross_entropy(y[batch])
        loss.backward()
        for p in mlp.parameters():
            p.data -= 0.3 * p.grad
        opt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(ref(torch.tensor(x[batch])), torch.tensor(y[batch]))
        tloss.backward()
        opt.step()
        ours_losses.append(float(loss.data))
        ref_losses.append(tloss.item())
    np.testing.assert_allclose(ours_losses, ref_losses, rtol=1e-10)
    np.testing.assert_allclose(mlp.layers[0][0].data.T, ref[0].weight.detach().numpy(), rtol=1e-9, atol=1e-12)
    assert np.mean(ours_losses[-4:]) < 0.7 * np.mean(ours_losses[:4])  # it trained


# ---------------------------------------------------------------- normalisation

def test_batchnorm_matches_torch_in_training_and_eval():
    from llmstack.classic.norms import BatchNorm

    for shape in ((16, 6), (8, 6, 5)):
        ours, ref = BatchNorm(6, momentum=0.2).double(), torch.nn.BatchNorm1d(6, momentum=0.2).double()
        with torch.no_grad():
            for m in (ours, ref):
                m.weight.copy_(torch.linspace(0.5, 2.0, 6))
                m.bias.copy_(torch.linspace(-1.0, 1.0, 6))
        for step in range(4):  # the running statistics follow several batches
            x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
            a, b = ours(x), ref(x)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
            ga = torch.autograd.grad((a * a.detach().cos()).sum(), [x, ours.weight, ours.bias])
            gb = torch.autograd.grad((b * b.detach().cos()).sum(), [x, ref.weight, ref.bias])
            for u, w in zip(ga, gb):
                torch.testing.assert_close(u, w, rtol=0, atol=1e-10)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=0, atol=1e-12)
        ours.eval(), ref.eval()
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(ours(x[:1]), ours(x)[:1])  # eval: an example's output ignores its batch


def test_layernorm_matches_torch():
    from llmstack.classic.norms import LayerNorm

    for shape, bias in (((4, 7, 12), True), ((3, 5, 4, 6), False)):
        normalized = shape[-1:] if bias else shape[-2:]
        ours, ref = LayerNorm(normalized, bias=bias).double(), torch.nn.LayerNorm(normalized, bias=bias).double()
        with torch.no_grad():
            ours.weight.normal_()
            ref.weight.copy_(ours.weight)
            if bias:
                ours.bias.normal_()
                ref.bias.copy_(ours.bias)
        x = (torch.randn(shape, dtype=torch.float64) * 5 + 2).requires_grad_()
        a, b = ours(x), ref(x)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        gx, gw = torch.autograd.grad((a ** 3).sum(), [x, ours.weight])
        rx, rw = torch.autograd.grad((b ** 3).sum(), [x, ref.weight])
        torch.testing.assert_close(gx, rx, rtol=0, atol=1e-9)
        torch.testing.assert_close(gw, rw, rtol=0, atol=1e-9)


# ---------------------------------------------------------------- recurrent networks

RECURRENT = [("rnn", torch.nn.RNN), ("lstm", torch.nn.LSTM), ("gru", torch.nn.GRU)]


def classic_recurrent(name):
    from llmstack.classic.rnn import GRU, LSTM, RNN

    return {"rnn": RNN, "lstm": LSTM, "gru": GRU}[name]


@pytest.mark.parametrize("name, ref_cls", RECURRENT, ids=[n for n, _ in RECURRENT])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_recurrent_layers_match_torch_with_the_same_weights(name, ref_cls, dtype, tol):
    """Outputs, final states and every gradient, two layers, batch-first and not, from a given state."""
    for batch_first in (False, True):
        ref = ref_cls(5, 7, num_layers=2, batch_first=batch_first).to(dtype)
        ours = classic_recurrent(name)(5, 7, num_layers=2, batch_first=batch_first).to(dtype)
        ours.load_state_dict(ref.state_dict())  # torch's names and layout
        x = torch.randn(3, 11, 5, dtype=dtype) if batch_first else torch.randn(11, 3, 5, dtype=dtype)
        h0 = torch.randn(2, 3, 7, dtype=dtype)
        state = (h0, torch.randn_like(h0)) if name == "lstm" else h0
        a, sa = ours(x, state)
        b, sb = ref(x, state)
        torch.testing.assert_close(a, b, rtol=0, atol=tol)
        for u, v in zip(sa if name == "lstm" else [sa], sb if name == "lstm" else [sb]):
            torch.testing.assert_close(u, v, rtol=0, atol=tol)
        ga = torch.autograd.grad((a.sin()).sum(), list(ours.parameters()))
        gb = torch.autograd.grad((b.sin()).sum(), list(ref.parameters()))
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v, rtol=0, atol=10 * tol)


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
def test_masked_steps_leave_the_recurrent_state_unchanged(name):
    """A left-padded row computes what it computes alone: the state skips its padded steps."""
    model = classic_recurrent(name)(4, 6, num_layers=2, batch_first=True).double()
    x = torch.randn(2, 8, 4, dtype=torch.float64)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :3] = False  # row 1: three steps of padding in front
    out, state = model(x, mask=mask)
    alone, alone_state = model(x[1:, 3:])
    torch.testing.assert_close(out[1:, 3:], alone, rtol=0, atol=1e-12)
    for u, v in zip(state if name == "lstm" else [state], alone_state if name == "lstm" else [alone_state]):
        torch.testing.assert_close(u[:, 1:], v, rtol=0, atol=1e-12)


def test_backpropagation_through_time_by_hand_equals_autograd():
    from llmstack.classic.rnn import RNN, rnn_bptt, rnn_forward

    torch.manual_seed(0)
    rnn = RNN(3, 5).double()
    w_ih, w_hh, b_ih, b_hh = rnn.layer_weights(0)
    x = torch.randn(9, 4, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    hs = rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh)
    torch.testing.assert_close(hs, rnn(x, h0[None])[0], rtol=0, atol=1e-12)  # the module's forward
    readout = torch.randn(9, 4, 5, dtype=torch.float64)
    readout[:-2] = 0  # the loss reads only the last two steps: earlier ones get gradient through time
    loss = (hs * readout).sum()
    auto = torch.autograd.grad(loss, [w_ih, w_hh, b_ih, b_hh, x, h0])
    by_hand = rnn_bptt(x.detach(), h0.detach(), hs.detach(), readout, w_ih.detach(), w_hh.detach())
    for name, ref in zip(["weight_ih", "weight_hh", "bias_ih", "bias_hh", "x", "h0"], auto):
        torch.testing.assert_close(by_hand[name], ref, rtol=0, atol=1e-12, msg=name)
    # The total gradient at each h_t: only what flows back from the end, shrinking with distance.
    norms = by_hand["h"].norm(dim=(1, 2))
    assert torch.all(norms[:-2] > 0) and norms[0] < norms[-3]


def test_the_long_range_problem_rnn_gradient_shrinks_geometrically_and_the_lstm_cell_path_keeps_it():
    """An RNN's gradient from a loss at the last step reaches h_t through T-1-t factors
    diag(1 - h^2) W_hh, so with ||W_hh||_2 = 0.9 it is at most 0.9^(T-1-t) of the last step's.
    An LSTM's cell adds the old c to the new one: along that path dc_T/dc_0 is the product of the
    forget gates, which a bias can hold near 1 over any distance."""
    from llmstack.classic.rnn import LSTM, RNN, rnn_bptt, rnn_forward

    torch.manual_seed(0)
    T, H = 40, 8
    rnn = RNN(4, H).double()
    w_ih, w_hh, b_ih, b_hh = (w.detach() for w in rnn.layer_weights(0))
    w_hh = 0.9 * w_hh / torch.linalg.matrix_norm(w_hh, ord=2)
    x, h0 = torch.randn(T, 2, 4, dtype=torch.float64), torch.zeros(2, H, dtype=torch.float64)
    hs = rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh)
    grad_hs = torch.zeros_like(hs)
    grad_hs[-1] = torch.randn(2, H, dtype=torch.float64)  # the loss reads only the last state
    norms = rnn_bptt(x, h0, hs, grad_hs, w_ih, w_hh)["h"].norm(dim=(1, 2))
    bound = 0.9 ** torch.arange(T - 1, -1, -1, dtype=torch.float64) * norms[-1]
    assert torch.all(norms <= bound * (1 + 1e-12))
    assert norms[0] / norms[-1] < 0.9 ** (T - 1)  # < 0.017: forty steps back, almost nothing arrives

    lstm = LSTM(4, H).double()
    with torch.no_grad():
        lstm.weight_ih_l0.mul_(0.1)
        lstm.weight_hh_l0.zero_()  # only the cell path carries the past
        lstm.bias_ih_l0[H:2 * H].fill_(8.0)  # forget gate bias: sigmoid(8) = 0.9997
    c0 = torch.randn(1, 2, H, dtype=torch.float64, requires_grad=True)
    _, (_, c) = lstm(x, (torch.zeros_like(c0), c0))
    (grad_c0,) = torch.autograd.grad(c.sum(), c0)
    xw = torch.nn.functional.linear(x, lstm.weight_ih_l0, lstm.bias_ih_l0) + lstm.bias_hh_l0
    forget = torch.sigmoid(xw[..., H:2 * H]).prod(dim=0)  # (B, H): the product of the forget gates
    torch.testing.assert_close(grad_c0[0], forget, rtol=1e-12, atol=0)
    assert forget.min() > 0.95


def test_muon_matches_torch():
    from llmstack.classic.optim import Muon

    def run(cls):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8, bias=False), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 3, bias=False))
        opt = cls(model.parameters(), lr=0.02, weight_decay=0.1)
        x, y = torch.randn(32, 6), torch.randn(32, 3)
        losses = []
        for _ in range(20):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.cat([p.detach().flatten() for p in model.parameters()]), losses

    (a, losses), (b, _) = run(Muon), run(torch.optim.Muon)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_newton_schulz_nearly_orthogonalises():
    from llmstack.classic.optim import newton_schulz

    g = torch.randn(32, 64, dtype=torch.float64)
    x = newton_schulz(g, dtype=torch.float64)
    s = torch.linalg.svdvals(x)
    assert s.min() > 0.6 and s.max() < 1.3  # every direction at about the same scale
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(x.flatten(), (u @ vh).flatten(), dim=0) > 0.95


# ---------------------------------------------------------------- sequence to sequence

def test_additive_attention_matches_its_formula_and_ignores_padding():
    from llmstack.classic.seq2seq import AdditiveAttention

    att = AdditiveAttention(4, 6, 5).double()
    query, keys = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 7, 6, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    context, weights = att(query, keys, att.project_keys(keys), mask)
    W_q, W_k, b_k, v = att.query_proj.weight, att.key_proj.weight, att.key_proj.bias, att.score.weight[0]
    for b in range(3):  # e_j = v . tanh(W_q s + W_k h_j + b_k), softmax over the real positions, sum_j a_j h_j
        n = int(mask[b].sum())
        e = torch.stack([v @ torch.tanh(W_q @ query[b] + W_k @ keys[b, j] + b_k) for j in range(n)])
        a = torch.exp(e - e.max()) / torch.exp(e - e.max()).sum()
        torch.testing.assert_close(weights[b, :n], a, rtol=0, atol=1e-12)
        torch.testing.assert_close(context[b], (a[:, None] * keys[b, :n]).sum(0), rtol=0, atol=1e-12)
    assert torch.all(weights[1, 4:] == 0)


@pytest.mark.parametrize("attention", [True, False], ids=["attention", "bottleneck"])
def test_seq2seq_greedy_decoding_equals_teacher_forcing_on_its_own_output(attention):
    from llmstack.classic.seq2seq import Seq2Seq

    model = Seq2Seq(20, 8, 16, attention=attention).double().eval()
    src = torch.randint(3, 20, (4, 9))
    lengths = torch.tensor([9, 5, 7, 3])
    tokens, weights = model.generate(src, lengths, 6, bos_id=1)
    tgt_in = torch.cat([torch.ones(4, 1, dtype=torch.long), tokens[:, :-1]], dim=1)
    logits, tf_weights = model(src, lengths, tgt_in, return_attention=True)
    assert torch.equal(logits.argmax(-1), tokens)
    # Whatever sits past a row's length changes nothing.
    noisy = src.clone()
    noisy[1, 5:] = torch.randint(3, 20, (4,))
    torch.testing.assert_close(model(noisy, lengths, tgt_in), logits, rtol=0, atol=1e-12)
    if attention:
        torch.testing.assert_close(weights, tf_weights)
        torch.testing.assert_close(weights.sum(-1), torch.ones(4, 6, dtype=torch.float64))
        assert torch.all(weights[3, :, 3:] == 0)
    else:
        assert weights is None and tf_weights is None


# ---------------------------------------------------------------- the full Transformer, encoder vs decoder

def torch_transformer_like(model, n_encoder_layers):
    """torch.nn.Transformer (pre-norm, GELU, biases) holding `model`'s weights."""
    cfg = model.config
    ref = torch.nn.Transformer(d_model=cfg.dim, nhead=cfg.n_heads, num_encoder_layers=n_encoder_layers,
                               num_decoder_layers=cfg.n_layers, dim_feedforward=cfg.ffn_hidden, dropout=0.0,
                               activation=lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
                               batch_first=True, norm_first=True)
    state = {}

    def block(prefix, layer, norms):
        state[prefix + "self_attn.in_proj_weight"] = layer.attn.qkv_proj.weight  # q, k, v rows in order
        state[prefix + "self_attn.in_proj_bias"] = layer.attn.qkv_proj.bias
        state[prefix + "self_attn.out_proj.weight"] = layer.attn.o_proj.weight
        state[prefix + "self_attn.out_proj.bias"] = layer.attn.o_proj.bias
        for name, linear in (("linear1", layer.mlp.up_proj), ("linear2", layer.mlp.down_proj)):
            state[prefix + name + ".weight"], state[prefix + name + ".bias"] = linear.weight, linear.bias
        for name, norm in zip(("norm1", "norm2", "norm3"), norms):
            state[prefix + name + ".weight"], state[prefix + name + ".bias"] = norm.weight, norm.bias

    for i, layer in enumerate(model.encoder.layers):
        block(f"encoder.layers.{i}.", layer, (layer.attn_norm, layer.mlp_norm))
    for i, layer in enumerate(model.decoder):
        prefix = f"decoder.layers.{i}."
        block(prefix, layer, (layer.attn_norm, layer.cross_norm, layer.mlp_norm))
        cross = layer.cross_attn
        state[prefix + "multihead_attn.in_proj_weight"] = torch.cat([cross.q_proj.weight, cross.kv_proj.weight])
        state[prefix + "multihead_attn.in_proj_bias"] = torch.cat([cross.q_proj.bias, cross.kv_proj.bias])
        state[prefix + "multihead_attn.out_proj.weight"] = cross.o_proj.weight
        state[prefix + "multihead_attn.out_proj.bias"] = cross.o_proj.bias
    for ours, theirs in ((model.encoder.norm, "encoder.norm"), (model.norm, "decoder.norm")):
        state[theirs + ".weight"], state[theirs + ".bias"] = ours.weight, ours.bias
    ref.load_state_dict(state)
    return ref.to(next(model.parameters()).dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_encoder_decoder_matches_torch_transformer(dtype, tol):
    import warnings

    from llmstack.classic.encoder_decoder import EncoderDecoder
    from llmstack.model import ModelConfig

    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, norm="layernorm", mlp="gelu", bias=True,
                      qkv_bias=True, pos="none", ffn_hidden=64, max_seq_len=64)
    model = EncoderDecoder(cfg, n_encoder_layers=3).to(dtype)
    model.init_weights()
    with torch.no_grad():  # norms and biases away from their 1 and 0, so that each is really compared
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that norm_first disables its nested-tensor path
        ref = torch_transformer_like(model, 3)
    src, tgt = torch.randint(0, 50, (3, 9)), torch.randint(0, 50, (3, 6))
    src_mask = torch.ones(3, 9, dtype=torch.bool)
    src_mask[1, 6:] = False  # a padded source
    with torch.no_grad():
        ours = model.decode(tgt, model.encode(src, src_mask), src_mask)
        theirs = ref(model.embed(src), model.embed(tgt), tgt_mask=ref.generate_square_subsequent_mask(6, dtype=dtype),
                     tgt_is_causal=True, src_key_padding_mask=~src_mask, memory_key_padding_mask=~src_mask)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tol)


def test_encoder_decoder_generates_with_a_cache_as_without():
    from llmstack.classic.encoder_decoder import EncoderDecoder
    from llmstack.model import ModelConfig

    model = EncoderDecoder(ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                       max_seq_len=64)).eval()
    model.init_weights()
    src = torch.randint(3, 40, (2, 7))
    cached = model.generate(src, 8, bos_id=1)
    seq = torch.ones(2, 1, dtype=torch.long)
    with torch.no_grad():
        memory = model.encode(src)
        for _ in range(8):
            seq = torch.cat([seq, model.head(model.decode(seq, memory))[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, seq[:, 1:])


def test_encoder_sees_both_sides_and_decoder_only_the_past():
    """Changing the last token changes every encoder output, and only the last decoder output;
    changing the source changes every decoder output (cross-attention)."""
    from llmstack.classic.encoder_decoder import EncoderDecoder
    from llmstack.model import ModelConfig

    model = EncoderDecoder(ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, max_seq_len=64)).double()
    model.init_weights()
    src, tgt = torch.randint(0, 40, (1, 8)), torch.randint(0, 40, (1, 6))
    src2, tgt2 = src.clone(), tgt.clone()
    src2[0, -1] = (src[0, -1] + 1) % 40
    tgt2[0, -1] = (tgt[0, -1] + 1) % 40
    with torch.no_grad():
        memory, memory2 = model.encode(src), model.encode(src2)
        assert ((memory - memory2).abs().amax(-1) > 1e-9).all()
        out, out_tgt2, out_src2 = model.decode(tgt, memory), model.decode(tgt2, memory), model.decode(tgt, memory2)
    torch.testing.assert_close(out[:, :-1], out_tgt2[:, :-1], rtol=0, atol=1e-12)
    assert (out[:, -1] - out_tgt2[:, -1]).abs().max() > 1e-9
    assert ((out - out_src2).abs().amax(-1) > 1e-9).all()


def test_bert_masking_is_80_10_10_of_15_percent():
    from llmstack.classic.masked_lm import mask_tokens

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (200, 500), generator=g)
    can_mask = torch.ones_like(ids, dtype=torch.bool)
    can_mask[:, :10] = False  # e.g. padding
    inputs, targets = mask_tokens(ids, mask_id=100, vocab_size=100, can_mask=can_mask, generator=g)
    chosen = targets != -100
    n = int(can_mask.sum())
    assert not chosen[:, :10].any() and torch.equal(targets[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # only chosen positions change
    assert abs(chosen.sum().item() / n - 0.15) < 0.005  # 98,000 positions: 5 standard deviations is 0.0057
    masked = (inputs == 100) & chosen
    unchanged = (inputs == ids) & chosen
    k = chosen.sum().item()
    assert abs(masked.sum().item() / k - 0.8) < 0.01
    # random replacements (10%) land on the original token 1% of the time: unchanged ~ 10% + 0.1%
    assert abs(unchanged.sum().item() / k - 0.101) < 0.01
    assert abs((chosen & ~masked & ~unchanged).sum().item() / k - 0.099) < 0.01


def test_masked_lm_loss_is_over_the_chosen_positions_and_sees_both_sides():
    from llmstack.classic.masked_lm import MaskedLM, mask_tokens
    from llmstack.model import ModelConfig

    model = MaskedLM(ModelConfig(vocab_size=41, dim=32, n_layers=2, n_heads=4, tie_embeddings=True,
                                 max_seq_len=64)).double()
    model.init_weights()
    ids = torch.randint(0, 40, (3, 12))
    inputs, targets = mask_tokens(ids, mask_id=model.mask_id, vocab_size=40, mask_prob=0.3,
                                  generator=torch.Generator().manual_seed(1))
    logits = model(inputs)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(model(inputs, targets=targets), expected, rtol=0, atol=1e-9)
    later = inputs.clone()
    later[:, -1] = model.mask_id
    assert (model(later)[:, 0] - logits[:, 0]).abs().max() > 1e-9  # position 0 reads the last token


# ---------------------------------------------------------------- residual connections, word embeddings

def test_residual_connections_carry_the_gradient_through_depth():
    """24 pre-norm blocks at init: through x + branch(x) the gradient reaches the input intact;
    through the same branches without the additions it all but vanishes."""
    from llmstack.model import Block, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=10, dim=32, n_layers=24, n_heads=4, max_seq_len=16)
    blocks = [Block(cfg, i) for i in range(cfg.n_layers)]
    for b in blocks:
        b.init_weights(cfg.init_std, cfg.init_std / (2 * cfg.n_layers) ** 0.5)
    x = torch.randn(2, 8, 32)

    def grad_ratio(residual: bool) -> float:
        h0 = x.clone().requires_grad_()
        h = h0
        for b in blocks:
            if residual:
                h = b(h)
            else:  # the same branches, one after the other
                h = b.mlp(b.mlp_norm(b.attn(b.attn_norm(h))))
        g_out = torch.randn_like(h)
        (g_in,) = torch.autograd.grad(h, h0, g_out)
        return (g_in.norm() / g_out.norm()).item()

    h = x
    b = blocks[0]
    mid = h + b.attn(b.attn_norm(h))
    torch.testing.assert_close(b(h), mid + b.mlp(b.mlp_norm(mid)))  # what a block is
    assert 0.5 < grad_ratio(residual=True) < 2.0
    assert grad_ratio(residual=False) < 1e-3


def test_embeddings_are_rows_looked_up_and_the_tied_head_reads_the_same_matrix():
    from llmstack.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=20, dim=16, n_layers=1, n_heads=2, max_seq_len=16, tie_embeddings=True)
    tied = Transformer(cfg).double()
    tied.init_weights()
    ids = torch.randint(0, 20, (2, 5))
    W = tied.embed.weight
    torch.testing.assert_close(tied.embed(ids), torch.nn.functional.one_hot(ids, 20).double() @ W)  # a lookup
    h = tied(ids, return_hidden=True)
    torch.testing.assert_close(tied.head(h), h @ W.t())  # logits: similarity to every token's row
    # Tied, the matrix's gradient is the sum of what it gets as the input table and as the output head.
    untied = Transformer(ModelConfig(**{**vars(cfg), "tie_embeddings": False})).double()
    untied.load_state_dict({**tied.state_dict(), "lm_head.weight": W.detach().clone()})
    y = torch.randint(0, 20, (2, 5))
    (g_tied,) = torch.autograd.grad(tied(ids, targets=y), [W])
    g_embed, g_head = torch.autograd.grad(untied(ids, targets=y), [untied.embed.weight, untied.lm_head.weight])
    torch.testing.assert_close(g_tied, g_embed + g_head, rtol=1e-7, atol=1e-9)
    assert g_embed[~torch.isin(torch.arange(20), ids)].abs().max() == 0  # only rows of tokens read get a gradient
