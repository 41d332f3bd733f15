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
