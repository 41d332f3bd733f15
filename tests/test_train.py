"""Training: schedules, AdamW groups, accumulation, NaN skipping, checkpoints, exact resume, the job end to end."""
import dataclasses
import json
import math
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import llmstack
from llmstack.config import ConfigError, load_config
from llmstack.model import ModelConfig
from llmstack.train import PretrainConfig, TrainConfig
from llmstack.data import TokenBatches
from llmstack.model import build_model
from llmstack.train import (TrainingError, build_optimizer, latest_checkpoint, load_checkpoint, lr_multiplier,
                            next_token_loss, param_groups, pretrain, save_checkpoint, train)
from llmstack.train.trainer import read_metrics

TINY = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32,
                   dropout=0.1)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = build_model(TINY)
    model.init_weights()
    return model


def batches(seed=0):
    tokens = (np.arange(5000) * 7 % 61).astype(np.uint16)  # a learnable periodic stream
    return TokenBatches(tokens, 4, 16, seed=seed)


def run_cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path), max_steps=8, lr=1e-2, warmup_steps=2, eval_every=1000, log_every=1,
                save_every=1000, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------ schedules and optimizer


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_schedules(schedule):
    f = [lr_multiplier(s, schedule=schedule, max_steps=100, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
         for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert all(a <= b + 1e-12 for a, b in zip(f[:10], f[1:10]))
    after = f[10:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))  # never increases after warmup
    assert f[100] == pytest.approx(1.0 if schedule == "constant" else 0.1)
    if schedule == "wsd":
        assert f[79] == 1.0 and f[90] < 1.0
    if schedule == "cosine":
        assert f[55] == pytest.approx(0.55, abs=1e-9)  # halfway: the mean of peak and floor


def test_weight_decay_groups():
    model = build_model(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, qkv_bias=True))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "layers.0.attn.qkv_proj.weight", "layers.0.attn.o_proj.weight", "layers.0.mlp.gate_proj.weight",
        "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight", "lm_head.weight"}
    assert "embed.weight" in {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ------------------------------------------------------------------ the loop


def test_accumulation_matches_one_big_batch_with_padding():
    """Sum of per-micro-batch summed losses / total tokens gives the big batch's gradient."""
    torch.manual_seed(0)
    x = torch.randint(0, 64, (8, 16))
    y = torch.randint(0, 64, (8, 16))
    y[1, 5:] = -100  # unequal numbers of real targets per row
    y[6, 2:] = -100
    model = tiny_model().eval()  # no dropout: compare gradients exactly
    loss, n, _ = next_token_loss(model, (x, y))
    (loss / n).backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    micro = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]
    total = sum(int((b[1] != -100).sum()) for b in micro)
    for b in micro:
        loss, _, _ = next_token_loss(model, b)
        (loss / total).backward()
    for a, b in zip(big, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def losses_of(run_dir) -> dict:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and not r.get("bad_step")}


def ctrl_c():
    """What pressing Ctrl-C does: SIGINT, whose handler runs at the next Python instruction. (Under
    Python's default handler that raises KeyboardInterrupt right here, inside the phase.)"""
    signal.raise_signal(signal.SIGINT)


class CtrlCOnCall:
    """Ctrl-C during the n-th call (the n-th and n+1-th when `twice`)."""

    def __init__(self, n: int, twice: bool = False):
        self.n, self.twice, self.calls = n, twice, 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.n or (self.twice and self.calls == self.n + 1):
            ctrl_c()


def inject_ctrl_c(monkeypatch, model, phase: str, at: CtrlCOnCall) -> None:
    """Arrange for Ctrl-C inside one phase of the training loop."""
    import llmstack.train.trainer as trainer
    from llmstack.train.metrics import MetricsLogger

    def wrap(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            at()
            return out
        return wrapped

    if phase == "forward":  # inside the first block, while training (not evaluating)
        model.layers[0].register_forward_hook(lambda m, args, out: at() if m.training else None)
    elif phase == "backward":  # while gradients flow back through the embedding
        model.embed.weight.register_hook(lambda grad: at())
    elif phase == "optimizer step":  # right after the update, before the loop counts the step
        def build(*args, **kwargs):
            optimizer = build_optimizer(*args, **kwargs)
            optimizer.step = wrap(optimizer.step)
            return optimizer
        monkeypatch.setattr(trainer, "build_optimizer", build)
    elif phase == "scheduler":
        monkeypatch.setattr(trainer, "lr_multiplier", wrap(trainer.lr_multiplier))
    elif phase == "evaluation":
        monkeypatch.setattr(trainer, "evaluate", wrap(trainer.evaluate))
    elif phase == "logging":
        monkeypatch.setattr(MetricsLogger, "log", wrap(MetricsLogger.log))
    elif phase == "saving":  # between the weights and the trainer state of a checkpoint
        real_save = torch.save
        monkeypatch.setattr(torch, "save", lambda *a, **k: (at(), real_save(*a, **k))[1])
    else:
        raise ValueError(phase)


def run_record(run_dir: Path, model) -> dict:
    """What must not depend on an interruption: weights, the saved optimizer state and step counter,
    and every metrics row but the wall-clock speed."""
    rows = [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "mfu")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    state = torch.load(latest_checkpoint(run_dir) / "trainer_state.pt", weights_only=True)
    return {"weights": model.state_dict(), "optimizer": state["optimizer"], "step": state["step"],
            "tokens_seen": state["tokens_seen"], "rows": rows}


def assert_identical(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN rows are equal


PHASE_CFG = dict(max_steps=8, grad_accum=2, eval_every=3, eval_batches=2, save_every=4)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    model = tiny_model()
    train(model, run_cfg(run, **PHASE_CFG), batches(), val_batches=batches(seed=1), run_dir=run, progress=False)
    return run_record(run, model)


@pytest.mark.parametrize("phase, call, twice, stops_at", [
    ("forward", 9, False, 5),  # 2 micro-batches a step: the 9th forward is step 5's first
    ("backward", 10, False, 5),
    ("optimizer step", 5, False, 5),
    ("scheduler", 5, False, 5),
    ("evaluation", 2, False, 3),  # the first is before training, the second after step 3
    ("logging", 6, False, 4),  # rows: val@0, 1, 2, 3, val@3, 4: right after step 4's row
    ("saving", 1, False, 4),  # inside the checkpoint at step 4
    ("forward", 11, True, 4),  # a second Ctrl-C stops at once: the checkpoint of step 4 is what is left
])
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, monkeypatch, uninterrupted, phase, call, twice, stops_at):
    """Ctrl-C anywhere in a step (dropout on, 2 micro-batches a step, evaluation and checkpoints
    on their own schedules), then a resume in a fresh process state: the same weights, optimizer
    state (AdamW's step counters included) and metrics rows, bit for bit, as a run never stopped."""
    run = tmp_path / "run"
    model = tiny_model()
    with monkeypatch.context() as patch:
        inject_ctrl_c(patch, model, phase, CtrlCOnCall(call, twice))
        with pytest.raises(KeyboardInterrupt):
            train(model, run_cfg(run, **PHASE_CFG), batches(), val_batches=batches(seed=1), run_dir=run,
                  progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C handling restored
    saved = torch.load(latest_checkpoint(run) / "trainer_state.pt", weights_only=True)
    assert saved["step"] == stops_at
    adam_steps = {float(s["step"]) for s in saved["optimizer"]["state"].values()}
    assert adam_steps == {float(stops_at)}  # every parameter updated exactly once per step so far
    torch.manual_seed(12345)  # whatever the RNG is now, the checkpoint's is restored
    resumed = tiny_model(seed=99)
    train(resumed, run_cfg(run, **PHASE_CFG), batches(), val_batches=batches(seed=1), run_dir=run, resume=True,
          progress=False)
    assert_identical(uninterrupted, run_record(run, resumed))


def test_resume_after_a_crash_logs_each_step_once(tmp_path):
    """A crash (here an exception in step 7; SIGKILL alike) after the checkpoint of step 4 leaves rows
    for steps 5 and 6 and maybe a torn line: resuming from step 4 drops them, then writes them again."""
    cfg = run_cfg(tmp_path / "a", save_every=4)
    train(tiny_model(), cfg, batches(), run_dir=tmp_path / "a", progress=False)

    calls = []

    def crash_in_step_7(model, batch):
        calls.append(batch)
        if len(calls) == 7:
            raise RuntimeError("killed")
        return next_token_loss(model, batch)

    cfg = run_cfg(tmp_path / "b", save_every=4)
    with pytest.raises(RuntimeError):
        train(tiny_model(), cfg, batches(), run_dir=tmp_path / "b", loss_fn=crash_in_step_7, progress=False)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # torn by the crash
    train(tiny_model(seed=4), cfg, batches(), run_dir=tmp_path / "b", resume=True, progress=False)
    drop_speed = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert_identical(drop_speed(read_metrics(tmp_path / "a")), drop_speed(read_metrics(tmp_path / "b")))


class NaNAt:
    """A loss function that returns NaN at chosen calls."""

    def __init__(self, bad_calls):
        self.bad, self.calls = set(bad_calls), 0

    def __call__(self, model, batch):
        loss, n, m = next_token_loss(model, batch)
        self.calls += 1
        return (loss * float("nan") if self.calls in self.bad else loss), n, m


def test_nan_step_is_skipped_and_counted(tmp_path):
    model = tiny_model()
    snapshots = []
    fn = NaNAt({3})

    def loss_fn(m, batch):
        snapshots.append(m.embed.weight.detach().clone())
        return fn(m, batch)

    result = train(model, run_cfg(tmp_path, max_steps=5), batches(), run_dir=tmp_path, loss_fn=loss_fn,
                   progress=False)
    assert result.bad_steps == 1
    assert torch.equal(snapshots[2], snapshots[3])  # the NaN step changed nothing
    assert not torch.equal(snapshots[1], snapshots[2])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_nan_step_without_clipping_backs_off_the_scale(tmp_path):
    result = train(tiny_model(), run_cfg(tmp_path, max_steps=3, precision="fp16", grad_clip=0.0), batches(),
                   run_dir=tmp_path, loss_fn=NaNAt({2}), progress=False)
    state = torch.load(latest_checkpoint(tmp_path) / "trainer_state.pt", weights_only=True)
    assert result.bad_steps == 1 and state["scaler"]["scale"] == 2.0 ** 15  # halved from 2 ** 16 once


def test_too_many_bad_steps_stop_with_checkpoint_intact(tmp_path):
    cfg = run_cfg(tmp_path, max_steps=20, save_every=2, max_bad_steps=3)
    with pytest.raises(TrainingError) as e:
        train(tiny_model(), cfg, batches(), run_dir=tmp_path, loss_fn=NaNAt({5, 6, 7}), progress=False)
    ckpt = latest_checkpoint(tmp_path)
    assert str(e.value).startswith(f"3 steps in a row with a non-finite loss (steps 5-7): stopping; the last "
                                   f"checkpoint is {ckpt}. Lower train.lr")
    assert ckpt.name == "step_000006"  # saved on schedule during the bad steps, with step 4's weights
    model = tiny_model(seed=5)
    state = load_checkpoint(ckpt, model)
    assert state["step"] == 6 and state["bad_steps"] == 2 and all(torch.isfinite(p).all() for p in model.parameters())
    rows = read_metrics(tmp_path)
    good = [r["step"] for r in rows if not r.get("bad_step")]
    bad = [r["step"] for r in rows if r.get("bad_step")]
    assert good == [1, 2, 3, 4] and bad == [5, 6, 7]  # one numbering: row N is the N-th step, good or bad
    assert {r["nonfinite"] for r in rows if r.get("bad_step")} == {"loss"}


class InfiniteGradients:
    """A loss function with finite losses and infinite gradients (the backward pass scales them)."""

    def __call__(self, model, batch):
        loss, n, m = next_token_loss(model, batch)
        loss.register_hook(lambda g: g * float("inf"))
        return loss, n, m


def test_nonfinite_gradient_norm_stop_says_so_and_that_nothing_was_saved(tmp_path):
    cfg = run_cfg(tmp_path, max_steps=20, max_bad_steps=2)
    with pytest.raises(TrainingError) as e:
        train(tiny_model(), cfg, batches(), run_dir=tmp_path, loss_fn=InfiniteGradients(), progress=False)
    assert str(e.value).startswith("2 steps in a row with a non-finite gradient norm (steps 1-2): stopping; no "
                                   "checkpoint was saved. Lower train.lr")
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["nonfinite"], math.isfinite(r["loss"])) for r in rows] == \
        [(1, "gradient norm", True), (2, "gradient norm", True)]


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scaler=None, tokenizer=None, config=TINY)

    def boom(*a, **k):
        raise OSError("disk full")

    import llmstack.train.checkpoint as ck

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, step=2, model=model, optimizer=opt, scaler=None, tokenizer=None, config=TINY)
    assert latest_checkpoint(tmp_path).name == "step_000001"
    assert not (tmp_path / "checkpoints" / "step_000002").exists()
    assert llmstack.from_pretrained(tmp_path) is not None  # the run directory follows `latest`


def test_saves_and_resumes_clear_what_killed_saves_left(tmp_path):
    train(tiny_model(), run_cfg(tmp_path, max_steps=2), batches(), run_dir=tmp_path, progress=False)
    # What a process killed inside save_checkpoint leaves: a half-written folder, an old one being
    # swapped out, a half-written `latest`.
    leftovers = [tmp_path / "checkpoints" / name for name in (".step_000004.tmp-k1ll3d", ".step_000002.old-999")]
    for folder in leftovers:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 100)
    (tmp_path / ".latest.tmp-999").write_text("checkpoints/step_000004\n")
    names = lambda: sorted(p.name for p in [*tmp_path.iterdir(), *(tmp_path / "checkpoints").iterdir()])
    with pytest.raises(KeyboardInterrupt):  # a resume that is stopped before it saves anything
        train(tiny_model(), run_cfg(tmp_path, max_steps=4), batches(), run_dir=tmp_path, resume=True,
              loss_fn=lambda m, b: (ctrl_c(), ctrl_c(), next_token_loss(m, b))[2], progress=False)
    assert names() == ["checkpoints", "latest", "loss.png", "metrics.jsonl", "step_000002"]
    for folder in leftovers:
        folder.mkdir()
    save_checkpoint(tmp_path, step=3, model=tiny_model(), optimizer=torch.optim.AdamW(tiny_model().parameters()),
                    scaler=None, tokenizer=None, config=TINY)
    assert names() == ["checkpoints", "latest", "loss.png", "metrics.jsonl", "step_000002", "step_000003"]


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, capsys):
    cfg = run_cfg(tmp_path, max_steps=8, save_every=2, keep_last=2)
    straight = tiny_model()
    train(straight, cfg, batches(), run_dir=tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step_000006", "step_000008"]
    state = tmp_path / "checkpoints" / "step_000008" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    resumed = tiny_model(seed=3)
    train(resumed, cfg, batches(), run_dir=tmp_path, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "step_000008/trainer_state.pt is truncated or corrupt" in err and "falling back to" in err
    assert err.strip().endswith("step_000006")
    assert_identical(straight.state_dict(), resumed.state_dict())  # steps 7 and 8 redone, exactly
    assert_identical([{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows],
                     [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(tmp_path)])
    load_checkpoint(latest_checkpoint(tmp_path), tiny_model())  # the corrupt one was replaced
    # With nothing older to fall back to, the error says so.
    (tmp_path / "checkpoints" / "step_000006" / "model.safetensors").write_bytes(b"\0" * 10)
    state.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or corrupt.*no earlier checkpoint"):
        train(tiny_model(), cfg, batches(), run_dir=tmp_path, resume=True, progress=False)


def test_from_pretrained_falls_back_when_latest_names_a_missing_checkpoint(tmp_path):
    train(tiny_model(), run_cfg(tmp_path, max_steps=4, save_every=2), batches(), run_dir=tmp_path,
          job_config=PretrainConfig(model=TINY), progress=False)
    expected = llmstack.from_pretrained(tmp_path / "checkpoints" / "step_000002").state_dict()
    shutil.rmtree(tmp_path / "checkpoints" / "step_000004")  # `latest` still names it
    with pytest.warns(UserWarning, match="names step_000004, which is missing or incomplete: using .*step_000002"):
        model = llmstack.from_pretrained(tmp_path)
    assert_identical(expected, model.state_dict())
    assert latest_checkpoint(tmp_path).name == "step_000002"  # what resuming uses too
    shutil.rmtree(tmp_path / "checkpoints" / "step_000002")
    with pytest.raises(FileNotFoundError, match="names step_000004, which is missing .* no complete checkpoint"):
        llmstack.from_pretrained(tmp_path)


def test_loss_plot_without_matplotlib_is_one_warning_line(tmp_path, monkeypatch, capsys):
    from llmstack.train.metrics import plot_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png").stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when it is not installed
    assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "none.png") is None
    err = capsys.readouterr().err
    assert err.startswith("warning: matplotlib is not installed") and err.count("\n") == 1, err
    assert not (tmp_path / "none.png").exists()


def test_keep_last_prunes_old_checkpoints(tmp_path):
    train(tiny_model(), run_cfg(tmp_path, max_steps=6, save_every=1, keep_last=2), batches(), run_dir=tmp_path,
          progress=False)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] and \
        sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000005", "step_000006"]


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path, step=1, model=model, optimizer=torch.optim.AdamW(model.parameters()), scaler=None,
                    tokenizer=None, config=TINY)
    other = build_model(ModelConfig(vocab_size=64, dim=48, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=32))
    with pytest.raises(ValueError, match="has shape .* but the model expects"):
        load_checkpoint(latest_checkpoint(tmp_path), other)
    (latest_checkpoint(tmp_path) / "trainer_state.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(latest_checkpoint(tmp_path), model)


# ------------------------------------------------------------------ the job


@pytest.fixture()
def job(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"m{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 20)
    return load_config(PretrainConfig, overrides=[
        "model=tiny", "model.vocab_size=300", "tokenizer.vocab_size=300", f"data.source={corpus}/*.txt",
        "data.seq_len=32", "data.val_fraction=0.2", f"data.cache_dir={tmp_path / 'cache'}",
        f"train.out_dir={tmp_path / 'run'}", "train.max_steps=6", "train.batch_size=4", "train.eval_every=3",
        "train.eval_batches=2", "train.log_every=1", "train.save_every=3", "train.tensorboard=false"])


def test_pretrain_end_to_end(job, tmp_path):
    result = pretrain(job, progress=False)
    run = tmp_path / "run"
    assert result.step == 6 and math.isfinite(result.val["loss"])
    assert result.val["loss"] < result.first_val["loss"]
    assert (run / "metrics.jsonl").is_file() and (run / "loss.png").stat().st_size > 1000
    ckpt = latest_checkpoint(run)
    assert {p.name for p in ckpt.iterdir()} >= {"config.yaml", "model.safetensors", "tokenizer.json",
                                               "trainer_state.pt"}
    model = llmstack.from_pretrained(run)
    tok = llmstack.Tokenizer.load(ckpt / "tokenizer.json")
    for where in (run, ckpt, ckpt / "tokenizer.json"):  # the run, its checkpoint, or the file
        assert llmstack.load_tokenizer(where).encode("def f1(x): pass") == tok.encode("def f1(x): pass")
    out = llmstack.generate(model, tok.encode("def f1"), 10, temperature=0)
    assert len(out) == len(tok.encode("def f1")) + 10


def test_pretrain_with_a_hugging_face_tokenizer(job, tmp_path):
    """tokenizer.path may name a downloaded model's tokenizer: the run trains on its ids, saves it
    with its config beside the checkpoint, and resumes with it."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = [p.read_text() for p in sorted((tmp_path / "corpus").glob("*.txt"))]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    job.tokenizer.path = str(tmp_path / "tokenizer.json")
    job.train.max_steps = 3
    pretrain(job, progress=False)
    tok = llmstack.load_tokenizer(tmp_path / "run")
    assert isinstance(tok, llmstack.tokenizer.HFTokenizer)
    assert tok.encode("def f1(x): pass") == backend.encode("def f1(x): pass").ids
    assert llmstack.from_pretrained(tmp_path / "run").config.eos_token_ids == [backend.token_to_id("<|endoftext|>")]
    job.train.max_steps = 6
    assert pretrain(job, resume=True, progress=False).step == 6


def test_out_dir_guards(job):
    pretrain(job, progress=False)
    with pytest.raises(ConfigError, match="already holds this run"):
        pretrain(job, progress=False)
    job.model.n_layers = 3
    with pytest.raises(ConfigError, match="holds a different run \\(model differ"):
        pretrain(job, resume=True, progress=False)


def test_vocab_and_context_errors(job):
    job.model.vocab_size = 100
    with pytest.raises(ConfigError, match="tokenizer has 300 tokens but model.vocab_size=100"):
        pretrain(job, progress=False)
    with pytest.raises(ConfigError, match="data.seq_len=256 is above model.max_seq_len=128"):
        load_config(PretrainConfig, overrides=["model=tiny", "data.seq_len=256"])


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    from llmstack.eval import evaluate

    model = tiny_model().eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every token equally likely
    out = evaluate(model, batches().eval_batches(3), bytes_per_token=2.0)
    assert out["perplexity"] == pytest.approx(64, rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(math.log2(64) / 2.0, rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(tmp_path, precision):
    ref = train(tiny_model(), run_cfg(tmp_path / "fp32", max_steps=4), batches(), run_dir=tmp_path / "fp32",
                progress=False)
    low = train(tiny_model(), run_cfg(tmp_path / precision, max_steps=4, precision=precision), batches(),
                run_dir=tmp_path / precision, progress=False)
    first_ref, first_low = losses_of(tmp_path / "fp32")[1], losses_of(tmp_path / precision)[1]
    assert first_low == pytest.approx(first_ref, rel=2e-2)  # same weights, lower-precision matmuls
    assert math.isfinite(low.train_loss) and low.bad_steps == 0 and ref.bad_steps == 0


def losses_by_backend(model_cfg, tokens_batches, tmp_path, **train_kw) -> dict:
    """{backend: {step: loss}} for the same model, data and seed trained with SDPA and with our kernel
    (Triton's interpreter on a CPU); skips where the kernel cannot run."""
    pytest.importorskip("triton")
    from llmstack.model.attention import _triton_available

    if not _triton_available():
        pytest.skip("triton kernel unavailable")
    losses = {}
    for backend in ("sdpa", "triton"):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(model_cfg, attn_backend=backend))
        model.init_weights()
        train(model, run_cfg(tmp_path / backend, max_steps=3, **train_kw), tokens_batches(),
              run_dir=tmp_path / backend, progress=False)
        losses[backend] = losses_of(tmp_path / backend)
    return losses


def test_triton_backend_trains_like_sdpa(tmp_path):
    """The model's `triton` backend (our FlashAttention kernel; the interpreter on a CPU) gives the
    same training losses as SDPA within float tolerance."""
    losses = losses_by_backend(dataclasses.replace(TINY, dropout=0.0), batches, tmp_path)
    for step in (1, 2, 3):
        assert losses["triton"][step] == pytest.approx(losses["sdpa"][step], rel=1e-4)


@pytest.mark.slow
def test_triton_backend_trains_the_quickstart_model_like_sdpa(tmp_path):
    """The quickstart job's own model (configs/pretrain/quickstart.yaml: 4 layers, 6/2 heads of 32,
    vocab 4096) on 32-token windows, so that Triton's interpreter takes seconds: the same losses
    with our kernel as with SDPA, step by step."""
    job = load_config(PretrainConfig, Path(__file__).resolve().parent.parent / "configs/pretrain/quickstart.yaml")
    tokens = np.random.default_rng(0).integers(0, job.model.vocab_size, 20000).astype(np.uint16)
    losses = losses_by_backend(job.model, lambda: TokenBatches(tokens, 2, 32, seed=0), tmp_path, lr=job.train.lr,
                               warmup_steps=1)
    for step in (1, 2, 3):
        assert losses["triton"][step] == pytest.approx(losses["sdpa"][step], rel=1e-4)
