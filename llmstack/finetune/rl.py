"""Reinforcement learning from a reward: GRPO and PPO, one optimizer step per trainer step.

Both sample answers from the policy with `llmstack.generate` (batched, KV cache), score them,
and raise the log-probability of the better ones while a per-token KL term keeps the policy near
a frozen reference (the starting model). With per-token log-ratio d_t = log pi(a_t) - log ref(a_t):

**GRPO** (Shao et al. 2024): `rl.group_size` answers per prompt; each answer's advantage is its
reward normalised within its group, A = (r - mean) / (std + 1e-4), the same for all its tokens;

    loss = mean over answers of mean over tokens of  -min(rho A, clip(rho, 1 - c, 1 + c) A) + kl_coef k3
    rho = pi / pi_old (1 at the single step taken per rollout, its gradient that of log pi),
    k3 = exp(-d) + d - 1  (an unbiased, non-negative estimate of KL(pi || ref))

**PPO** (Ouyang et al. 2022, as TRL's PPOTrainer): a value head on the policy's hidden states; the
reward of an answer is the reward model's score (or the task's) at its last token, minus
kl_coef * d_t at every token; advantages by GAE(gamma, lambda) from the values, whitened; then
`rl.ppo_epochs` optimizer steps on that rollout batch, each with the clipped policy loss and the
clipped value loss. A rollout batch is saved in the run directory when it is made, so a run
resumed between its epochs continues with the same batch, as the uninterrupted run did.

Logged per step: reward, success (answers with the full reward), KL to the reference, entropy,
clip fraction, value loss (PPO), reward errors and timeouts, and the share of the step's time
spent generating.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from llmstack.data.chat import load_conversations, sample_indices
from llmstack.data.corpus import DataError
from llmstack.finetune.arithmetic import arithmetic_conversations, is_arithmetic_source, max_operand_of
from llmstack.finetune.rewards import RewardRunner
from llmstack.inference.generate import generate
from llmstack.interop import load_tokenizer


class Prompts:
    """Prompts (token ids, and the text the reward reads) drawn as a pure function of (seed, step):
    a batch is (prompt indices, units, {"step"}) with one unit per sampled answer."""

    def __init__(self, ids: list[list[int]], texts: list[str], per_step: int, samples: int, *, seed: int = 0,
                 name: str = "train"):
        if not ids:
            raise ValueError(f"the {name} split has no prompt")
        self.ids, self.texts, self.per_step, self.samples, self.seed = ids, texts, per_step, samples, seed

    def __len__(self) -> int:
        return len(self.ids)

    def get_batch(self, step: int, micro_step: int = 0):
        picked = sample_indices(len(self.ids), self.seed, step * self.per_step, self.per_step)
        return torch.tensor(picked), torch.zeros(len(picked) * self.samples), {"step": step, "micro": micro_step}

    def epoch(self, step: int) -> float:
        return step * self.per_step / len(self.ids)

    def eval_batches(self, n_batches: Optional[int] = None):
        yield torch.arange(len(self.ids)), torch.zeros(len(self.ids)), {"step": -1, "micro": 0}


def prompt_sets(cfg, tok, device, progress: bool = True) -> tuple[Prompts, Prompts]:
    """Train and held-out prompts: the first user turn(s) of the data's conversations, rendered
    with the generation prompt (`data.source: arithmetic[:N]`: integer-arithmetic questions,
    `llmstack.finetune.arithmetic`)."""
    dc, rc = cfg.data, cfg.rl
    out = []
    for split in ("train", "val"):
        if is_arithmetic_source(dc.source):
            chats = arithmetic_conversations(split, val_fraction=dc.val_fraction,
                                             max_operand=max_operand_of(dc.source))
        else:
            chats = load_conversations(dc.source, split, val_fraction=dc.val_fraction, max_chars=dc.max_chars)
        if split == "train" and dc.max_examples:
            chats = chats[:dc.max_examples]
        if split == "val":
            chats = chats[:rc.eval_prompts]
        ids, texts = [], []
        for chat in chats:
            prompt = chat[:max(i for i, m in enumerate(chat) if m["role"] == "assistant")]
            p = tok.apply_chat_template(prompt, add_generation_prompt=True)
            if len(p) + rc.max_new_tokens <= dc.seq_len:
                ids.append(p)
                texts.append(prompt[-1]["content"])
        if not ids:
            raise DataError(f"the {split} split: no prompt leaves room for rl.max_new_tokens={rc.max_new_tokens} "
                            f"within data.seq_len={dc.seq_len}: raise data.seq_len or lower rl.max_new_tokens")
        if progress:
            print(f"{split}: {len(chats)} prompts, {len(ids)} leave room for rl.max_new_tokens={rc.max_new_tokens} "
                  f"within data.seq_len={dc.seq_len}")
        per_step = rc.prompts_per_step if split == "train" else len(ids)
        out.append(Prompts(ids, texts, per_step, rc.group_size if cfg.objective == "grpo" else 1, seed=cfg.train.seed,
                           name=split))
    return out[0], out[1]


# ---------------------------------------------------------------------- rollouts


def token_logps(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, *, chunk: int = 256,
                with_entropy: bool = False, values: Optional[nn.Module] = None):
    """Per-token log p(target) (R, T) (0 where the target is -100), and optionally the policy's entropy
    (R, T) (0 there too) and a value head's output (R, T). The output head runs only at the answer's
    positions (where the target is set), `chunk` of them at a time: a prompt's positions need no
    distribution over the vocabulary."""
    h = model(x, return_hidden=True)
    mask = targets != -100
    hs, ts = h[mask], targets[mask]  # (N, D), (N,)
    logps, entropy = [], []
    for i in range(0, ts.shape[0], chunk):
        lp = torch.log_softmax(model.head(hs[i:i + chunk]).float(), dim=-1)
        logps.append(lp.gather(-1, ts[i:i + chunk, None]).squeeze(-1))
        if with_entropy:
            entropy.append(-(lp.exp() * lp).sum(-1).detach())
    zeros = torch.zeros(targets.shape, dtype=torch.float32, device=x.device)
    cat = (lambda parts: torch.cat(parts) if parts else zeros.new_zeros(0))
    out = [zeros.masked_scatter(mask, cat(logps))]
    if with_entropy:
        out.append(zeros.masked_scatter(mask, cat(entropy)))
    if values is not None:
        out.append(values(h).squeeze(-1).float())
    return out if len(out) > 1 else out[0]


def rollout(model: nn.Module, prompts: Sequence[list[int]], samples: int, rc, *, seed: int, stop_tokens, pad_id: int,
            greedy: bool = False):
    """Sample `samples` answers to each prompt. Returns (x (R, T) prompt + answer rows, padded at the
    end; targets (R, T): the answer tokens, -100 elsewhere; answers: the answer ids of each row;
    lengths (R,): each row's tokens before the padding)."""
    device = next(model.parameters()).device
    rows = [torch.tensor(p, device=device) for p in prompts for _ in range(samples)]
    was = model.training
    model.eval()
    with torch.no_grad():
        outs = generate(model, rows, rc.max_new_tokens, temperature=0.0 if greedy else rc.temperature,
                        top_p=None if greedy else rc.top_p, seed=[seed * 100_003 + i for i in range(len(rows))],
                        stop_tokens=stop_tokens)
    model.train(was)
    answers = [o[len(r):] for o, r in zip(outs, rows)]
    T = max(len(o) for o in outs)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long, device=device)
    y = torch.full((len(rows), T), -100, dtype=torch.long, device=device)
    for i, (o, r) in enumerate(zip(outs, rows)):
        x[i, :len(o)] = o
        y[i, len(r) - 1:len(o) - 1] = o[len(r):]  # position t predicts token t + 1: the answer's tokens
    return x, y, answers, torch.tensor([len(o) for o in outs], device=device)


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """GRPO's advantages: rewards (R,) normalised within each consecutive group of `group` answers."""
    r = rewards.view(-1, group)
    return ((r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-4)).view(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Advantages and returns (R, T) by generalised advantage estimation over the masked positions of
    each row (the answer's tokens, consecutive): per-token rewards and values (R, T)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        nxt = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = torch.where(m, delta + gamma * lam * last, torch.zeros_like(last))
        adv[:, t] = last
    return adv, adv + values


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1)


class RLObjective:
    """GRPO or PPO as the trainer's loss function (one optimizer step per call) and evaluation."""

    unit = "answers"  # what the loss is summed over (the trainer's metrics name it)

    def __init__(self, cfg, reference: nn.Module, tok, prompts: Prompts, val: Prompts, run_dir: Path,
                 reward_model: Optional[nn.Module] = None):
        self.cfg, self.rc, self.kind = cfg, cfg.rl, cfg.objective
        self.reference, self.tok, self.prompts, self.val, self.run_dir = reference, tok, prompts, val, Path(run_dir)
        self.reward_model = reward_model
        self.runner = RewardRunner(self.rc.task, timeout=self.rc.timeout)
        self.stop = [i for i in (getattr(tok, "stop_ids", None) or [tok.eos_id]) if i is not None]
        self.pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
        self._rollout_cache: Optional[dict] = None
        self._generating = self._stepping = 0.0  # seconds, since the run (or its resumption) started

    # -------------------------------------------------------------- scoring

    def scores(self, prompt_texts: list[str], x: torch.Tensor, answers: list[torch.Tensor],
               lengths: torch.Tensor) -> torch.Tensor:
        """Each answer's reward: the reward model's score of the whole row, or the task's (in a child
        process, errors and timeouts scoring 0)."""
        if self.reward_model is not None:
            with torch.no_grad():
                return self.reward_model(x, lengths).float().cpu()
        texts = [self.tok.decode([int(t) for t in a if int(t) not in self.stop]) for a in answers]
        return torch.tensor(self.runner.score(prompt_texts, texts), dtype=torch.float32)

    # -------------------------------------------------------------- the loss

    def __call__(self, model: nn.Module, batch):
        indices, units, extra = batch
        return self.grpo_step(model, indices, extra) if self.kind == "grpo" else self.ppo_step(model, indices, extra)

    def _rollout(self, policy_lm: nn.Module, indices: torch.Tensor, step: int, micro: int):
        t0 = time.perf_counter()
        prompts = [self.prompts.ids[int(i)] for i in indices]
        samples = self.prompts.samples
        x, y, answers, lengths = rollout(policy_lm, prompts, samples, self.rc,
                                         seed=self.cfg.train.seed * 1_000_003 + step * 31 + micro,
                                         stop_tokens=self.stop, pad_id=self.pad)
        texts = [self.prompts.texts[int(i)] for i in indices for _ in range(samples)]
        rewards = self.scores(texts, x, answers, lengths)
        return x, y, rewards, time.perf_counter() - t0

    def _summary(self, rewards: torch.Tensor) -> dict:
        """Mean reward, and with a task's reward (whose best is 1.0) the share of answers that reach it."""
        out = {"reward": rewards.mean().item()}
        if self.reward_model is None:
            out["success"] = (rewards >= 1.0).float().mean().item()
        return out

    def _stats(self, rewards, kl, entropy, clip, gen_s, total_s) -> dict:
        self._generating, self._stepping = self._generating + gen_s, self._stepping + total_s
        return {**self._summary(rewards), "kl": kl, "entropy": entropy, "clip_fraction": clip,
                # over all steps so far: PPO generates at the first of its epochs only
                "generate_share": self._generating / max(self._stepping, 1e-9), "reward_errors": self.runner.errors,
                "reward_timeouts": self.runner.timeouts}

    def grpo_step(self, model, indices, extra):
        t0 = time.perf_counter()
        x, y, rewards, gen_s = self._rollout(model, indices, extra["step"], extra["micro"])
        adv = group_advantages(rewards, self.prompts.samples).to(x.device)  # (R,)
        mask = y != -100
        logp, entropy = token_logps(model, x, y, with_entropy=True)
        with torch.no_grad():
            ref = token_logps(self.reference, x, y)
        old = logp.detach()  # one step per rollout: pi_old is the policy that sampled
        ratio = torch.exp(logp - old)
        c = self.rc.clip
        surrogate = torch.min(ratio * adv[:, None], ratio.clamp(1 - c, 1 + c) * adv[:, None])
        d = logp - ref
        k3 = torch.exp(-d) + d - 1
        per_answer = masked_mean(-surrogate + self.rc.kl_coef * k3, mask, dim=1)  # (R,)
        loss = per_answer.sum()
        stats = self._stats(rewards, masked_mean(d.detach(), mask).item(), masked_mean(entropy, mask).item(),
                            masked_mean(((ratio - 1).abs() > c).float(), mask).item(), gen_s,
                            time.perf_counter() - t0)
        return loss, per_answer.shape[0], stats

    # -------------------------------------------------------------- PPO

    def _rollout_path(self) -> Path:
        return self.run_dir / "rollout"

    def _ppo_batch(self, model, indices, step: int, micro: int):
        """The rollout batch of this step's cycle: made at the cycle's first step (and saved), else the
        saved one."""
        cycle = step // self.rc.ppo_epochs
        key = (cycle, micro)
        if self._rollout_cache is not None and self._rollout_cache["key"] == key:
            return self._rollout_cache, 0.0
        path = self._rollout_path() / f"cycle_{cycle:06d}_{micro}.pt"
        if step % self.rc.ppo_epochs != 0 and path.is_file():
            data = torch.load(path, weights_only=True)
            data["key"] = key
            self._rollout_cache = data
            return data, 0.0
        x, y, scores, gen_s = self._rollout(model.policy, indices, cycle * self.rc.ppo_epochs, micro)
        mask = y != -100
        with torch.no_grad():
            was = model.training
            model.eval()
            old, values = token_logps(model.policy, x, y, values=model.value_head)
            model.train(was)
            ref = token_logps(self.reference, x, y)
        kl = (old - ref) * mask
        rewards = -self.rc.kl_coef * kl
        last = mask.long().cumsum(1).argmax(1)  # each row's last answer position
        rewards[torch.arange(len(last)), last] += scores.to(rewards.device)
        adv, returns = gae(rewards, values * mask, mask, self.rc.gamma, self.rc.lam)
        mean, std = adv[mask].mean(), adv[mask].std() + 1e-8
        adv = (adv - mean) / std * mask
        data = {"x": x.cpu(), "y": y.cpu(), "old": old.cpu(), "values": values.cpu(), "adv": adv.cpu(),
                "returns": returns.cpu(), "scores": scores.cpu(), "kl": kl.sum(1).cpu()}
        folder = self._rollout_path()
        folder.mkdir(parents=True, exist_ok=True)
        if micro == 0:  # only this cycle's batches are kept: a resume needs nothing older
            for stale in folder.glob("cycle_*.pt"):
                stale.unlink()
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(data, tmp)
        tmp.replace(path)  # whole or not at all
        data["key"] = key
        self._rollout_cache = data
        return data, gen_s

    def ppo_step(self, model, indices, extra):
        t0 = time.perf_counter()
        data, gen_s = self._ppo_batch(model, indices, extra["step"], extra["micro"])
        device = next(model.parameters()).device
        x, y = data["x"].to(device), data["y"].to(device)
        old, old_values = data["old"].to(device), data["values"].to(device)
        adv, returns = data["adv"].to(device), data["returns"].to(device)
        mask = y != -100
        logp, entropy, values = token_logps(model.policy, x, y, with_entropy=True, values=model.value_head)
        ratio = torch.exp(logp - old)
        c = self.rc.clip
        policy_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - c, 1 + c))
        v_clipped = old_values + (values - old_values).clamp(-c, c)
        value_loss = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
        per_answer = masked_mean(policy_loss + self.rc.value_coef * value_loss, mask, dim=1)
        stats = self._stats(data["scores"], (data["kl"].sum() / mask.sum().cpu().clamp(min=1)).item(),
                            masked_mean(entropy, mask).item(),
                            masked_mean(((ratio - 1).abs() > c).float(), mask).item(), gen_s,
                            time.perf_counter() - t0)
        stats["value_loss"] = masked_mean(value_loss.detach(), mask).item()
        return per_answer.sum(), per_answer.shape[0], stats

    # -------------------------------------------------------------- held-out success

    @torch.no_grad()
    def evaluate(self, model, batches) -> dict:
        """Greedy answers to the held-out prompts: their mean reward and the share with the full reward."""
        policy = model.policy if self.kind == "ppo" else model
        rewards = []
        for indices, _, _ in batches:
            for start in range(0, len(indices), 16):
                idx = [int(i) for i in indices[start:start + 16]]
                x, _, answers, lengths = rollout(policy, [self.val.ids[i] for i in idx], 1, self.rc, seed=0,
                                                 stop_tokens=self.stop, pad_id=self.pad, greedy=True)
                rewards.append(self.scores([self.val.texts[i] for i in idx], x, answers, lengths))
        r = torch.cat(rewards)
        return {**self._summary(r), "prompts": len(r)}


class PolicyWithValue(nn.Module):
    """PPO's model: the policy and a scalar value head on its final hidden states."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.config = policy.config
        p = next(policy.parameters())
        self.value_head = nn.Linear(policy.config.dim, 1, device=p.device, dtype=p.dtype)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)


def rl_objective(cfg, model: nn.Module, tok, prompts: Prompts, val: Prompts, weights, run_dir):
    """(model to train, loss function, evaluation, checkpoint weights) for objective grpo or ppo."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)  # the starting policy, frozen
    reward_model = None
    if cfg.rl.reward_model:
        from llmstack.finetune.preference import load_reward_model

        if load_tokenizer(cfg.rl.reward_model).fingerprint() != tok.fingerprint():
            raise ValueError(f"rl.reward_model {cfg.rl.reward_model!r} has another tokenizer than the policy "
                             f"{cfg.base!r}: its scores would read other tokens")
        reward_model = load_reward_model(cfg.rl.reward_model, device=next(model.parameters()).device)
    objective = RLObjective(cfg, reference, tok, prompts, val, run_dir, reward_model)
    if cfg.objective == "ppo":
        from llmstack.finetune.preference import HeadWeights

        model = PolicyWithValue(model)
        weights = HeadWeights(weights, body="policy", head="value_head", filename="value_head.safetensors")
    return model, objective, objective.evaluate, weights


def plot_rl(runs: Sequence[str | Path], png: str | Path, labels: Optional[Sequence[str]] = None) -> Optional[Path]:
    """Reward, KL to the reference and held-out success against step, from each run's metrics.jsonl
    (several runs: one line each, e.g. seeds). Needs matplotlib (else a warning and no plot)."""
    import json
    import sys

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"warning: matplotlib is not installed, so {png} was not drawn", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=110)
    for i, run in enumerate(runs):
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]
        label = labels[i] if labels else Path(run).name
        for ax, key in zip(axes, ("reward", "kl", "val_success")):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-" if key.startswith("val_") else "-", ms=3, lw=1.2, label=label)
    for ax, title in zip(axes, ("mean reward of the sampled answers", "KL to the reference (nats/token)",
                                "held-out success (greedy)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)
