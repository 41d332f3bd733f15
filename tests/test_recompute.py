"""Activation checkpointing (llmstack.train.recompute): the same gradients and losses as the plain
model, fewer activations kept, names unchanged, refused where there are no blocks."""
import pytest
import torch

from bench_recompute import saved_bytes  # scripts/ is on the path (conftest): the benchmark's own count
from llmstack.config import ConfigError
from llmstack.model import ModelConfig, Transformer
from llmstack.train.recompute import apply_activation_checkpointing, checkpointed_blocks

CASES = [("full", 2, "layer", [0, 1, 2, 3]), ("selective", 2, "layer", [0, 2]), ("selective", 3, "layer", [0, 3]),
         ("selective", 1, "op", [0, 1, 2, 3])]


def tiny(dtype=torch.float64) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=32))
    model.init_weights()
    return model.to(dtype)


def loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = model(x, targets=y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode,every,policy,blocks", CASES)
def test_same_gradients_as_the_plain_model(mode, every, policy, blocks):
    x = torch.randint(0, 64, (2, 24))
    y = torch.randint(0, 64, (2, 24))
    plain = tiny()
    ref_loss, ref_grads = loss_and_grads(plain, x, y)
    model = apply_activation_checkpointing(tiny(), mode, every=every, policy=policy)
    assert checkpointed_blocks(model) == blocks
    loss, grads = loss_and_grads(model, x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-12)
    assert list(model.state_dict()) == list(plain.state_dict())  # names unchanged: checkpoints, adapters, PEFT


def test_fewer_activations_are_kept():
    x = torch.randint(0, 64, (2, 32))
    y = torch.randint(0, 64, (2, 32))
    plain = saved_bytes(tiny(torch.float32), x, y)
    full = saved_bytes(apply_activation_checkpointing(tiny(torch.float32), "full"), x, y)
    half = saved_bytes(apply_activation_checkpointing(tiny(torch.float32), "selective", every=2), x, y)
    assert full < half < plain
    assert full < 0.5 * plain


def test_no_grad_runs_plainly_and_bad_uses_are_refused():
    model = apply_activation_checkpointing(tiny(), "full")
    with torch.no_grad():
        torch.testing.assert_close(model(torch.arange(8)[None]), tiny()(torch.arange(8)[None]))
    with pytest.raises(ValueError, match="checkpointed already"):
        apply_activation_checkpointing(model, "full")
    with pytest.raises(ValueError, match="choose one of none, full, selective"):
        apply_activation_checkpointing(tiny(), "some")
    assert apply_activation_checkpointing(tiny(), "none") is not None


def test_through_the_trainer_losses_equal_and_recurrent_models_are_refused(tmp_path):
    from llmstack.interop import build
    from llmstack.train import TrainConfig, train
    from llmstack.train.trainer import read_metrics

    class Batches:
        def get_batch(self, step, micro=0):
            g = torch.Generator().manual_seed(step)
            return torch.randint(0, 64, (4, 16), generator=g), torch.randint(0, 64, (4, 16), generator=g)

    def run(out, ac):
        cfg = TrainConfig(out_dir=str(out), max_steps=4, batch_size=4, lr=1e-2, warmup_steps=0, log_every=1,
                          save_every=100, eval_every=100, tensorboard=False, activation_checkpointing=ac)
        train(tiny(torch.float32), cfg, Batches(), run_dir=out, progress=False)
        return [r["loss"] for r in read_metrics(out) if "loss" in r]

    assert run(tmp_path / "a", "none") == run(tmp_path / "b", "full")  # bit for bit
    lstm = build(ModelConfig(arch="lstm", vocab_size=64, dim=32, n_layers=1, max_seq_len=32))
    cfg = TrainConfig(out_dir=str(tmp_path / "c"), max_steps=1, activation_checkpointing="full", tensorboard=False)
    with pytest.raises(ConfigError, match="train.activation_checkpointing=full: .*has none"):
        train(lstm, cfg, Batches(), run_dir=tmp_path / "c", progress=False)
