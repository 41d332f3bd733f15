"""Alignment (llmstack.finetune.preference, rl, rewards; llmstack.data.preference): DPO's losses equal
TRL's, the reward model, GRPO and PPO through the fine-tuning job, rewards judged in a child process."""
import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import llmstack
from llmstack.config import ConfigError, from_dict
from llmstack.data import DataError
from llmstack.data.preference import CORRUPTIONS, pair_of, stdlib_pairs
from llmstack.finetune.config import FinetuneConfig
from llmstack.finetune.job import finetune
from llmstack.finetune.preference import bradley_terry_loss, dpo_loss, load_reward_model, preferred
from llmstack.finetune.arithmetic import arithmetic_conversations, arithmetic_problems, max_operand_of, problems
from llmstack.finetune.rewards import RewardRunner, arithmetic, python_function
from llmstack.finetune.rl import gae, group_advantages, token_logps
from llmstack.interop import save_pretrained
from llmstack.model import ModelConfig, Transformer
from llmstack.tokenizer import Tokenizer
from llmstack.train.trainer import read_metrics


# ---------------------------------------------------------------------- DPO against TRL


def trl_dpo_loss(loss_type, beta, label_smoothing, per_token_logps, completion_mask, ref_chosen, ref_rejected):
    """TRL's DPOTrainer._compute_loss on given per-token log-probs: its own code, with a model that
    returns them (trl is a dev extra)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    R, T = completion_mask.shape
    out = SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(R, T - 1),
                          mean_logits=torch.zeros(R, T - 1), is_top1=torch.zeros(R, T - 1, dtype=torch.bool))
    accel = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accel, aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                           use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
                           _tp_size=1)
    inputs = {"input_ids": torch.zeros(R, T, dtype=torch.long), "attention_mask": torch.ones(R, T, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(fake, lambda **kw: out, inputs, False)


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_dpo_loss_and_gradients_equal_trl(loss_type, smoothing):
    pytest.importorskip("trl")
    torch.manual_seed(0)
    B, T = 4, 9
    completion = torch.zeros(2 * B, T)
    for r in range(2 * B):  # answers of different lengths after a prompt
        completion[r, 3:3 + 2 + r % 5] = 1
    shift = completion[:, 1:]
    token_logps = (-torch.rand(2 * B, T - 1) * 3 * shift).requires_grad_(True)
    ref = -torch.rand(2 * B) * 10
    ours_in = token_logps.clone().detach().requires_grad_(True)
    theirs = trl_dpo_loss(loss_type, 0.3, smoothing, token_logps, completion, ref[:B], ref[B:])
    theirs.backward()
    logps = ours_in.sum(1)
    counts = shift.sum(1)
    losses, _, _ = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=0.3, loss_type=loss_type,
                            label_smoothing=smoothing, chosen_tokens=counts[:B], rejected_tokens=counts[B:])
    losses.mean().backward()
    torch.testing.assert_close(losses.mean(), theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_in.grad, token_logps.grad, rtol=1e-6, atol=1e-7)


def test_cdpo_is_the_published_formula_and_rewards_are_beta_log_ratios():
    # TRL 1.16 has no label smoothing on its sigmoid loss: cDPO checked against Mitchell's formula.
    pc, pr, rc, rr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -4.0]), \
        torch.tensor([-3.0, -3.0])
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    h = (pc - rc) - (pr - rr)
    expected = -0.9 * torch.nn.functional.logsigmoid(0.5 * h) - 0.1 * torch.nn.functional.logsigmoid(-0.5 * h)
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(cr, 0.5 * (pc - rc))
    torch.testing.assert_close(rj, 0.5 * (pr - rr))
    assert preferred(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])).tolist() == [1.0, 0.5, 0.0]
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=1.0).item() == pytest.approx(
        torch.log(torch.tensor(2.0)).item())


# ---------------------------------------------------------------------- preference data


def test_preference_rows_and_bad_pairs():
    p = pair_of({"prompt": "q", "chosen": "a", "rejected": "b"}, "x")
    assert p.prompt == [{"role": "user", "content": "q"}] and (p.chosen, p.rejected) == ("a", "b")
    conv = [{"role": "user", "content": "q"}]
    p = pair_of({"chosen": conv + [{"role": "assistant", "content": "a"}],
                 "rejected": conv + [{"role": "assistant", "content": "b"}]}, "x")
    assert p.prompt == conv and p.rejected == "b"
    with pytest.raises(DataError, match="x:3: 'chosen' and 'rejected' are identical"):
        pair_of({"prompt": "q", "chosen": "a", "rejected": "a"}, "x:3")
    with pytest.raises(DataError, match="no 'rejected'"):
        pair_of({"prompt": "q", "chosen": "a"}, "x")
    with pytest.raises(DataError, match="must end with an assistant message"):
        pair_of({"chosen": conv, "rejected": conv}, "x")


def test_stdlib_pairs_prefer_the_real_code():
    val = stdlib_pairs("val")
    assert len(val) > 100
    assert all(p.chosen != p.rejected for p in val)
    kinds = {"truncated": 0, "shuffled": 0, "other": 0}
    for p in val:
        if p.rejected.split("\n")[0] != p.chosen.split("\n")[0]:
            kinds["other"] += 1
        elif len(p.rejected) < len(p.chosen):
            kinds["truncated"] += 1
        else:
            kinds["shuffled"] += 1
    assert all(n > 10 for n in kinds.values()), kinds
    assert set(CORRUPTIONS) == set(kinds)
    train_prompts = {p.prompt[0]["content"] for p in stdlib_pairs("train")}
    assert not train_prompts & {p.prompt[0]["content"] for p in val}


# ---------------------------------------------------------------------- rewards and advantages


def test_rewards_run_in_a_child_that_counts_errors_and_timeouts(tmp_path):
    assert python_function("Write the Python function `f(x)`.", "def f(x):\n    return x") == 1.0
    assert python_function("Write the Python method `A.g(self)`.", "```python\ndef g(self): pass\n```") == 1.0
    assert python_function("Write the Python function `f(x)`.", "x = 1") == 0.25
    assert python_function("Write the Python function `f(x)`.", "def (") == 0.0
    bad = tmp_path / "bad_reward.py"
    bad.write_text("import os, time\n"
                   "def score(prompt, answer):\n"
                   "    if answer == 'hang': time.sleep(60)\n"
                   "    if answer == 'raise': raise ValueError('nope')\n"
                   "    if answer == 'pid': return os.getpid()\n"
                   "    return len(answer)\n")
    runner = RewardRunner(f"{bad}:score", timeout=1.0)
    scores = runner.score(["p"] * 5, ["ab", "raise", "hang", "abcd", "pid"])
    assert scores[:4] == [2.0, 0.0, 0.0, 4.0] and scores[4] != float(__import__("os").getpid())
    assert runner.errors == 1 and runner.timeouts == 1 and "ValueError: nope" not in runner.last_error
    with pytest.raises(ValueError, match="neither a built-in task"):
        RewardRunner("nonsense")


def test_group_advantages_and_gae():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, 4)
    assert a[:4].sum().abs() < 1e-6 and torch.all(a[4:] == 0)  # an all-equal group teaches nothing
    assert a[0] > 0 > a[1]
    # GAE against the recursion written plainly, in float64.
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 1:5] = mask[1, 0:6] = mask[2, 2:4] = True
    adv, ret = gae(rewards, values * mask, mask, 0.9, 0.8)
    for i in range(3):
        idx = mask[i].nonzero().flatten().tolist()
        last = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            nxt = values[i, idx[k + 1]].item() if k + 1 < len(idx) else 0.0
            last = rewards[i, t].item() + 0.9 * nxt - values[i, t].item() + 0.9 * 0.8 * last
            assert adv[i, t].item() == pytest.approx(last)
            assert ret[i, t].item() == pytest.approx(last + values[i, t].item())
    assert torch.all(adv[~mask] == 0)


# ---------------------------------------------------------------------- the jobs, end to end


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model and tokenizer; pairs where the chosen answer is always 'yes ...', the rejected 'no ...'."""
    root = tmp_path_factory.mktemp("align")
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    rows = []
    for i in range(80):
        q = " ".join(words[j] for j in torch.randint(8, (4,), generator=g).tolist())
        rows.append({"prompt": f"{i} {q}", "chosen": f"yes {q}", "rejected": f"no {q} no"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                                                for r in rows))
    (root / "reward.py").write_text("def score(prompt, answer):\n    return 1.0 if 'yes' in answer else 0.0\n")
    tok = Tokenizer.train([json.dumps(rows)] * 2, 360)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=360, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                                    max_seq_len=96))
    model.init_weights()
    save_pretrained(model, root / "base")
    tok.save(root / "base" / "tokenizer.json")
    return root


def job(root: Path, out: Path, objective: str, **over) -> FinetuneConfig:
    data = {"base": str(root / "base"), "objective": objective, "method": "lora",
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q", "v", "o", "down"]},
            "data": {"source": str(root / ("pairs.jsonl" if objective in ("dpo", "reward") else "prompts.jsonl")),
                     "val_fraction": 0.25, "seq_len": 64},
            "rl": {"task": f"{root / 'reward.py'}:score", "group_size": 4, "prompts_per_step": 2, "max_new_tokens": 8,
                   "eval_prompts": 8, "ppo_epochs": 2},
            "train": {"out_dir": str(out), "max_steps": 12, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1,
                      "eval_every": 100, "eval_batches": 10, "log_every": 1, "save_every": 100, "weight_decay": 0.0,
                      "tensorboard": False}}
    for key, value in over.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    return from_dict(FinetuneConfig, data).validate()


def test_dpo_job_raises_held_out_reward_accuracy(base, tmp_path):
    result = finetune(job(base, tmp_path / "dpo", "dpo"), progress=False)
    assert result.first_val["reward_accuracy"] == 0.5  # the policy is its reference: every pair a tie
    assert result.val["reward_accuracy"] > 0.8 and result.val["reward_margin"] > 0
    rows = [r for r in read_metrics(tmp_path / "dpo") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2 at the start
    assert {"reward_accuracy", "reward_margin", "pairs", "pairs_per_s"} <= set(rows[0])
    assert (result.checkpoint / "adapter_model.safetensors").is_file()


def test_reward_model_job(base, tmp_path):
    result = finetune(job(base, tmp_path / "rm", "reward", method="full", train__lr=3e-3), progress=False)
    assert result.val["accuracy"] > 0.8
    rm = load_reward_model(tmp_path / "rm")
    tok = llmstack.load_tokenizer(tmp_path / "rm")
    ids = [tok.apply_chat_template([{"role": "user", "content": "1 alpha beta"},
                                    {"role": "assistant", "content": a}], add_generation_prompt=False)
           for a in ("yes alpha beta", "no alpha beta no")]
    n = max(map(len, ids))
    x = torch.tensor([i + [0] * (n - len(i)) for i in ids])
    with torch.no_grad():
        scores = rm(x, torch.tensor([len(i) for i in ids]))
        longer = rm(torch.cat([x, torch.zeros(2, 5, dtype=torch.long)], 1), torch.tensor([len(i) for i in ids]))
    assert scores[0] > scores[1]
    torch.testing.assert_close(scores, longer)  # read at the last real token: padding after it changes nothing


def test_grpo_job_logs_and_survives_bad_rewards(base, tmp_path):
    flaky = base / "flaky.py"
    flaky.write_text("import time\n"
                     "def score(prompt, answer):\n"
                     "    if len(answer) % 3 == 0: raise RuntimeError('bad')\n"
                     "    return float('yes' in answer)\n")
    result = finetune(job(base, tmp_path / "grpo", "grpo", rl={"task": f"{flaky}:score", "group_size": 4,
                                                                "prompts_per_step": 2, "max_new_tokens": 8,
                                                                "eval_prompts": 4, "timeout": 5},
                          train__max_steps=3), progress=False)
    rows = [r for r in read_metrics(tmp_path / "grpo") if "loss" in r]
    assert len(rows) == 3
    assert {"reward", "success", "kl", "entropy", "clip_fraction", "generate_share", "reward_errors"} <= set(rows[0])
    assert 0 < rows[0]["generate_share"] < 1
    assert rows[-1]["reward_errors"] > 0  # counted, and training went on
    assert set(result.val) >= {"reward", "success"}


def test_ppo_resume_between_epochs_equals_uninterrupted(base, tmp_path, monkeypatch):
    from llmstack.finetune import job as job_module

    finetune(job(base, tmp_path / "a", "ppo", train__max_steps=4), progress=False)
    real_train = job_module.train
    calls = []

    def crash_in_step_4(*a, loss_fn, **k):
        def wrapped(model, batch):
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("killed")
            return loss_fn(model, batch)
        wrapped.unit = loss_fn.unit
        return real_train(*a, loss_fn=wrapped, **k)

    with monkeypatch.context() as m:  # killed in step 4 (the second epoch of the second rollout), after step 3's save
        m.setattr(job_module, "train", crash_in_step_4)
        with pytest.raises(RuntimeError, match="killed"):
            finetune(job(base, tmp_path / "b", "ppo", train__max_steps=4, train__save_every=1), progress=False)
    finetune(job(base, tmp_path / "b", "ppo", train__max_steps=4, train__save_every=1), resume=True, progress=False)
    drop = lambda rows: [{k: v for k, v in r.items() if k not in ("answers_per_s", "generate_share")}  # noqa: E731
                         for r in rows if "loss" in r]
    a, b = drop(read_metrics(tmp_path / "a")), drop(read_metrics(tmp_path / "b"))
    assert len(a) == 4 and a == b
    assert {"value_loss", "kl", "reward", "clip_fraction", "entropy", "answers"} <= set(a[0])


def test_bad_alignment_configs(base, tmp_path):
    with pytest.raises(ConfigError, match="dpo.beta must be a finite number > 0, got 0"):
        job(base, tmp_path / "x", "dpo", dpo={"beta": 0})
    with pytest.raises(ConfigError, match="rl.group_size must be >= 2"):
        job(base, tmp_path / "x", "grpo", rl={"group_size": 1})
    # A reward model whose tokenizer is not the policy's.
    other = tmp_path / "other"
    save_pretrained(llmstack.from_pretrained(base / "base"), other)
    Tokenizer.train(["something else entirely " * 10], 300).save(other / "tokenizer.json")
    (other / "reward_head.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="another tokenizer than the policy"):
        finetune(job(base, tmp_path / "x", "ppo", rl={"reward_model": str(other), "max_new_tokens": 8}),
                 progress=False)
    with pytest.raises(DataError, match="no prompt leaves room for rl.max_new_tokens=96 within data.seq_len=64"):
        finetune(job(base, tmp_path / "x", "grpo", rl={"max_new_tokens": 96}), progress=False)
    assert not (tmp_path / "x").exists()


def test_built_in_tasks_through_the_child_process():
    runner = RewardRunner("python_parses", timeout=5)
    assert runner.score(["p", "p", "p"], ["x = 1", "def (", "```python\nreturn_ = 2\n```"]) == [1.0, 0.0, 1.0]
    sig = RewardRunner("python_signature", timeout=5)
    prompt = "Write the Python function `load_file(path)`."
    scores = sig.score([prompt] * 3, ["def load_file(path):\n    pass", "def load(path):", "load_file = 1"])
    assert scores[0] == 1.0 and 0.25 < scores[1] < 1.0 and scores[2] == 0.0


# ---------------------------------------------------------------------- integer arithmetic


def test_arithmetic_reward_checks_the_last_integer():
    q = "What is 17 - 9? Answer with the number only."
    assert arithmetic(q, "8") == arithmetic(q, " 17 - 9 = 8\n") == arithmetic(q, "The answer is 8.") == 1.0
    assert arithmetic(q, "9") == arithmetic(q, "8 or 9") == arithmetic(q, "-8") == arithmetic(q, "26") == 0.0
    assert arithmetic(q, "") == arithmetic(q, "eight") == arithmetic(q, "8.5") == 0.0  # malformed: no integer, or another
    assert arithmetic("What is 12 + 1000?", "1,012") == 1.0 and arithmetic("What is 6 * 7?", "42") == 1.0
    assert arithmetic("What is 3 - 10?", "3 - 10 = -7") == 1.0
    with pytest.raises(ValueError, match="asks for no"):
        arithmetic("Write a poem.", "7")
    runner = RewardRunner("arithmetic", timeout=5)  # the same interface, in the child process
    assert runner.score([q, q, q, "no question"], ["8", "9", "", "1"]) == [1.0, 0.0, 0.0, 0.0]
    assert runner.errors == 1


def test_arithmetic_prompts_split_disjoint_and_deterministic():
    train = arithmetic_problems("train", val_fraction=0.1)
    val = arithmetic_problems("val", val_fraction=0.1)
    assert not set(train) & set(val) and sorted(train + val) == sorted(problems(20)) == sorted(set(problems(20)))
    assert 0.05 < len(val) / len(problems(20)) < 0.15
    assert val == arithmetic_problems("val", val_fraction=0.1)  # a pure function of the question
    commuted = {(b, "+", a) for a, op, b in val if op == "+"}
    assert commuted <= set(val)  # a held-out sum is not trained on in the other order
    assert all(op == "+" or a >= b for a, op, b in problems(20)) and len(problems(20)) == 400 + 210
    chats = arithmetic_conversations("val", val_fraction=0.1)
    assert all(arithmetic(c[0]["content"], c[1]["content"]) == 1.0 for c in chats)
    assert max_operand_of("arithmetic") == 20 and max_operand_of("arithmetic:50") == 50
    with pytest.raises(ValueError, match="arithmetic:N"):
        max_operand_of("arithmetic:x")


def test_token_logps_equal_the_full_softmax_at_answer_positions():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                    max_seq_len=32))
    model.init_weights()
    x = torch.randint(0, 64, (3, 10))
    y = torch.full((3, 10), -100)
    y[0, 4:9], y[1, 2:3], y[2, 5:10] = x[0, 5:10], x[1, 3:4], torch.randint(0, 64, (5,))
    logp, entropy = token_logps(model, x, y, chunk=3, with_entropy=True)
    full = torch.log_softmax(model(x).float(), dim=-1)
    mask = y != -100
    want = full.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * mask
    torch.testing.assert_close(logp, want)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1) * mask)
    logp.sum().backward()  # gradients flow through the answer positions
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.layers[0].parameters())


def test_grpo_job_on_arithmetic_prompts(base, tmp_path):
    cfg = job(base, tmp_path / "arith", "grpo", data={"source": "arithmetic:9", "val_fraction": 0.2, "seq_len": 64},
              rl={"task": "arithmetic", "group_size": 2, "prompts_per_step": 2, "max_new_tokens": 4,
                  "eval_prompts": 6}, train__max_steps=2)
    result = finetune(cfg, progress=False)
    assert result.val["prompts"] == 6 and {"reward", "success"} <= set(result.val)
    rows = [r for r in read_metrics(tmp_path / "arith") if "loss" in r]
    assert len(rows) == 2 and rows[-1]["reward_errors"] == 0  # every prompt is a question the reward reads
    with pytest.raises(ValueError, match="arithmetic:N"):
        finetune(job(base, tmp_path / "bad", "grpo", data={"source": "arithmetic:0", "seq_len": 64}), progress=False)


@pytest.mark.slow
def test_smollm2_grpo_config_runs_and_the_base_has_signal(smollm2, tmp_path):
    """configs/finetune/smollm2-grpo.yaml for two steps on the real model: the base already answers some
    held-out questions (so groups of answers differ and GRPO has a signal), and the run logs and plots."""
    from llmstack.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(FinetuneConfig, root / "configs/finetune/smollm2-grpo.yaml",
                      [f"base={smollm2}", f"train.out_dir={tmp_path / 'run'}", "train.max_steps=2",
                       "train.eval_every=100", "train.log_every=1", "rl.eval_prompts=16"])
    result = finetune(cfg, progress=False)
    assert result.first_val["prompts"] == 16 and 0 < result.first_val["success"] < 1
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 2 and all(r["reward_errors"] == 0 and r["kl"] > -1e-3 for r in rows)
    assert (tmp_path / "run" / "rl.png").is_file()
