"""Learning from preferences: a reward model (Bradley-Terry) and Direct Preference Optimization.

    logps = answer_logps(model, x, targets)                       # (2B,) summed over answer tokens
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.1)

**DPO** (Rafailov et al. 2023) trains the policy directly on pairs: with the log-ratios of the
policy to a frozen reference on the chosen and rejected answers,
h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)),

    sigmoid (DPO):  -log sigmoid(beta h)                                  label_smoothing eps:
    cDPO:           -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (noisy labels)
    robust (rDPO):  cDPO's terms with the second one subtracted, / (1 - 2 eps)
    ipo (IPO):      (h' - 1 / (2 beta))^2, h' from log-probs averaged over each answer's tokens

and reports the implicit rewards beta * (log pi - log ref): their accuracy (chosen above rejected)
and margin on held-out pairs. The reference log-probs are computed once, before training, by the
starting policy (which is the reference: LoRA starts at the base): no second model in memory.

**Reward model**: the Transformer's final hidden state at each answer's last token, through a
scalar head (`RewardModel`), trained with the Bradley-Terry loss -log sigmoid(r_w - r_l - margin).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "ipo")


def answer_logps(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, chunk: int = 4) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """(sum of log p(target) over each row's targets != -100, the count of those targets), (R,) each.
    The head runs a few rows at a time, so (R, T, vocab) log-probs never exist at once."""
    h = model(x, return_hidden=True)  # (R, T, C)
    sums = []
    for i in range(0, x.shape[0], chunk):
        logits = model.head(h[i:i + chunk]).float()
        t = targets[i:i + chunk]
        nll = F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=-100, reduction="none").view(t.shape)
        sums.append(-nll.sum(dim=1))
    return torch.cat(sums), (targets != -100).sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: Optional[torch.Tensor] = None, rejected_tokens: Optional[torch.Tensor] = None):
    """Per-pair losses (B,), chosen and rejected implicit rewards (B,) from summed log-probs (B,) each.
    `ipo` needs the answers' token counts."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (
            1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss averages over each answer's tokens: pass chosen_tokens and rejected_tokens")
        h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class DPO:
    """The trainer's loss function for DPO on `PairBatches`, and its held-out evaluation. `reference`
    (N, 2): each pair's reference log-probs (chosen, rejected), from `reference_logps`."""

    unit = "pairs"  # what the loss is summed over (the trainer's metrics name it)

    def __init__(self, reference: dict[str, torch.Tensor], *, beta: float, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0):
        self.reference, self.beta, self.loss_type, self.label_smoothing = reference, beta, loss_type, label_smoothing

    def _pairs(self, model, batch, split: str):
        x, units, extra = batch
        B = units.shape[0]
        logps, counts = answer_logps(model, x, extra["targets"])
        ref = self.reference[split][extra["index"]].to(logps.device)  # (B, 2)
        return dpo_loss(logps[:B], logps[B:], ref[:, 0], ref[:, 1], beta=self.beta, loss_type=self.loss_type,
                        label_smoothing=self.label_smoothing, chosen_tokens=counts[:B], rejected_tokens=counts[B:])

    def __call__(self, model, batch):
        losses, chosen, rejected = self._pairs(model, batch, "train")
        return losses.sum(), losses.shape[0], {"reward_accuracy": preferred(chosen, rejected).mean().item(),
                                               "reward_margin": (chosen - rejected).mean().item()}

    @torch.no_grad()
    def evaluate(self, model, batches) -> dict:
        was = model.training
        model.eval()
        losses, acc, margin = [], [], []
        for batch in batches:
            l, c, r = self._pairs(model, batch, "val")
            losses.append(l)
            acc.append(preferred(c, r))
            margin.append(c - r)
        model.train(was)
        losses, acc, margin = torch.cat(losses), torch.cat(acc), torch.cat(margin)
        return {"loss": losses.mean().item(), "reward_accuracy": acc.mean().item(),
                "reward_margin": margin.mean().item(), "pairs": len(acc)}


def preferred(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1 where the chosen answer scores higher, 0 where lower, 1/2 on a tie (so that a model that
    cannot tell them apart, DPO's policy at its start, scores 50%)."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


@torch.no_grad()
def reference_logps(model: nn.Module, batches) -> torch.Tensor:
    """(N, 2) summed answer log-probs (chosen, rejected) of every pair of `batches` (`PairBatches`),
    by `model` in eval mode: the reference DPO measures the policy against."""
    was = model.training
    model.eval()
    out = torch.zeros(len(batches), 2)
    for batch in batches.eval_batches():
        x, units, extra = batch
        B = units.shape[0]
        logps, _ = answer_logps(model, x, extra["targets"])
        out[extra["index"], 0], out[extra["index"], 1] = logps[:B].float().cpu(), logps[B:].float().cpu()
    model.train(was)
    return out


# ---------------------------------------------------------------------- reward model


class RewardModel(nn.Module):
    """A Transformer with a scalar head on its final hidden state: `reward(x, lengths)` reads each row
    at its last real token (lengths - 1). The backbone's output head is unused (and not trained)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        p = next(backbone.parameters())
        self.score = nn.Linear(backbone.config.dim, 1, bias=False, device=p.device, dtype=p.dtype)
        nn.init.normal_(self.score.weight, std=1 / (backbone.config.dim + 1) ** 0.5)  # as TRL's value heads

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x, return_hidden=True)  # (R, T, C)
        last = h[torch.arange(x.shape[0], device=x.device), lengths.to(x.device) - 1]  # (R, C)
        return self.score(last).squeeze(-1).float()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """-log sigmoid(r_w - r_l - margin), per pair."""
    return -F.logsigmoid(chosen - rejected - margin)


class RewardLoss:
    """The trainer's loss function for a reward model on `PairBatches` (rows: chosen, then rejected)."""

    unit = "pairs"  # what the loss is summed over (the trainer's metrics name it)

    def __init__(self, margin: float = 0.0):
        self.margin = margin

    def _pairs(self, model, batch):
        x, units, extra = batch
        B = units.shape[0]
        r = model(x, extra["lengths"])
        return bradley_terry_loss(r[:B], r[B:], self.margin), r[:B], r[B:]

    def __call__(self, model, batch):
        losses, chosen, rejected = self._pairs(model, batch)
        return losses.sum(), losses.shape[0], {"accuracy": preferred(chosen, rejected).mean().item()}

    @torch.no_grad()
    def evaluate(self, model, batches) -> dict:
        was = model.training
        model.eval()
        losses, acc = [], []
        for batch in batches:
            l, c, r = self._pairs(model, batch)
            losses.append(l)
            acc.append(preferred(c, r))
        model.train(was)
        losses, acc = torch.cat(losses), torch.cat(acc)
        return {"loss": losses.mean().item(), "accuracy": acc.mean().item(), "pairs": len(acc)}


class HeadWeights:
    """Checkpoints of a model wrapped with a small head (a reward model's score, PPO's value head): the
    wrapped model as `inner` keeps it (all weights, or the adapter) and the head in its own file."""

    def __init__(self, inner, *, body: str, head: str, filename: str):
        from llmstack.train.checkpoint import FullWeights

        self.inner, self.body, self.head, self.filename = inner or FullWeights(), body, head, filename

    def write(self, model: nn.Module, directory, step: int) -> None:
        from safetensors.torch import save_file

        self.inner.write(getattr(model, self.body), directory, step)
        save_file({k: v.detach().cpu().contiguous() for k, v in getattr(model, self.head).state_dict().items()},
                  str(directory / self.filename))

    def read(self, directory):
        from safetensors.torch import load_file

        try:
            head = load_file(str(directory / self.filename))
        except Exception as e:
            raise ValueError(f"{directory / self.filename} is missing, truncated or corrupt ({e})") from None
        return self.inner.read(directory), head

    def restore(self, model: nn.Module, state) -> None:
        body, head = state
        self.inner.restore(getattr(model, self.body), body)
        getattr(model, self.head).load_state_dict(head)


REWARD_HEAD = "reward_head.safetensors"


def reward_weights(inner=None) -> HeadWeights:
    """A reward model's checkpoints: the backbone as its method keeps it, the score in reward_head.safetensors."""
    return HeadWeights(inner, body="backbone", head="score", filename=REWARD_HEAD)


def load_reward_model(path, *, device=None, dtype=None) -> RewardModel:
    """A reward model trained by a fine-tuning job (objective: reward), in eval mode: its backbone
    (the adapter merged in when it has one) and its head."""
    from safetensors.torch import load_file

    from llmstack.finetune.loading import from_pretrained
    from llmstack.interop import resolve_checkpoint

    path = resolve_checkpoint(path)
    if not (path / REWARD_HEAD).is_file():
        raise ValueError(f"{path} is not a reward model: it has no {REWARD_HEAD} (train one with objective: reward)")
    model = RewardModel(from_pretrained(path, device=device, dtype=dtype))
    model.score.load_state_dict(load_file(str(path / REWARD_HEAD)))
    return model.to(next(model.backbone.parameters()).dtype).eval()
