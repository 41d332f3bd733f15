"""The fine-tuning job in one call: base model, method, conversations, the shared training loop.

    from llmstack.config import load_config
    from llmstack.finetune import FinetuneConfig, finetune
    result = finetune(load_config(FinetuneConfig, "configs/finetune/quickstart-lora.yaml"))

`method: full` trains every weight and checkpoints them all, as pretraining does. `lora` and
`qlora` freeze the base (`qlora` first quantizes its linear layers to nf4) and put adapters on
it; their checkpoints hold the adapter alone, in PEFT's files (adapter_config.json +
adapter_model.safetensors), beside the job config that names the base. `llmstack.from_pretrained`
on such a run loads the base and merges the adapter; `peft.PeftModel.from_pretrained` reads the
checkpoint directory on the base's Hugging Face export.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import yaml

from llmstack.config import ConfigError, from_dict, to_dict
from llmstack.data import DataError
from llmstack.data.chat import ChatBatches, encode_conversation, fit_length, load_conversations, pack
from llmstack.distributed import Parallelism, RankSlice
from llmstack.distributed import setup as setup_parallel
from llmstack.finetune.config import FinetuneConfig
from llmstack.finetune.loading import from_pretrained
from llmstack.finetune.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_lora, load_adapter_tensors,
                                    print_trainable_parameters, save_adapter)
from llmstack.interop import load_tokenizer, resolve_checkpoint
from llmstack.runtime import resolve_device
from llmstack.tokenizer.chat import CHATML
from llmstack.train.pretrain import check_run_dir
from llmstack.train.trainer import TrainResult, next_token_loss, train

# Sections that must match for a run directory to be continued.
RUN_IDENTITY = ("base", "method", "objective", "lora", "data", "dpo", "reward", "rl")


class AdapterWeights:
    """Checkpoints of a run that trains adapters on a frozen base: the adapter alone, in PEFT's
    two files, which `load_adapter` and `peft.PeftModel.from_pretrained` read."""

    def write(self, model: torch.nn.Module, directory: Path, step: int) -> None:
        staging = directory / ".adapter"
        save_adapter(model, staging)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            os.replace(staging / name, directory / name)
        shutil.rmtree(staging)

    def read(self, directory: Path) -> dict:
        from safetensors.torch import load_file

        try:
            return load_file(str(directory / ADAPTER_WEIGHTS))
        except Exception as e:  # a truncated file: safetensors' own error types
            raise ValueError(f"{directory / ADAPTER_WEIGHTS} is truncated or corrupt ({e})") from None

    def restore(self, model: torch.nn.Module, tensors: dict) -> None:
        load_adapter_tensors(model, tensors)


def prepare_model(model: torch.nn.Module, cfg: FinetuneConfig, progress: bool = True) -> torch.nn.Module:
    """`model` ready for `cfg.method`, in place: every weight trainable (full), or frozen with
    LoRA adapters (lora), on nf4 weights (qlora)."""
    if cfg.method == "full":
        model.requires_grad_(True)
    else:
        if cfg.method == "qlora":
            from llmstack.inference.quantize import quantize_

            quantize_(model, "nf4")
        lc = cfg.lora
        apply_lora(model, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, targets=tuple(lc.targets),
                   rslora=lc.rslora, use_dora=lc.use_dora)
    if progress:
        print_trainable_parameters(model)
    return model


def chat_tokenizer(base: str, chat_template: str | None):
    """The base's tokenizer, with `chat_template` ("chatml" or a Jinja template) when given."""
    tok = load_tokenizer(base)
    if chat_template == "chatml":
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tok.special_tokens]
        if missing:
            raise ConfigError(f"data.chat_template=chatml needs the tokens {', '.join(missing)}, which the base's "
                              "tokenizer lacks; give a template written for its own tokens")
        tok.chat_template = CHATML
    elif chat_template:
        tok.chat_template = chat_template
    if tok.chat_template is None:
        raise ConfigError(f"the base {base!r} has no chat template and data.chat_template is not set; set it to "
                          "chatml or to a Jinja chat template")
    return tok


def chat_rows(cfg: FinetuneConfig, tokenizer, split: str, progress: bool = True) -> list:
    """The split's conversations, encoded, fitted to data.seq_len by data.truncation, packed."""
    dc = cfg.data
    chats = load_conversations(dc.source, split, val_fraction=dc.val_fraction, max_chars=dc.max_chars)
    if split == "train" and dc.max_examples:
        chats = chats[:dc.max_examples]
    examples, cut = [], 0
    for i, chat in enumerate(chats):
        try:
            example = encode_conversation(tokenizer, chat)
        except ValueError as e:
            raise DataError(f"data.source {dc.source!r}, {split} conversation {i}: {e}") from None
        fitted = fit_length(example, dc.seq_len, dc.truncation, f"{split} conversation {i}")
        cut += fitted is not example
        if fitted is not None:
            examples.append(fitted)
    rows = pack(examples, dc.seq_len, packing=dc.packing)
    if progress:
        learned = sum(int((r.targets != -100).sum()) for r in rows)
        what = {"truncate": "truncated or dropped", "drop": "dropped", "refuse": ""}[dc.truncation]
        print(f"{split}: {len(chats)} conversations -> {len(rows)} rows of <= {dc.seq_len} tokens, {learned:,} "
              f"assistant tokens" + (f" ({cut} longer than data.seq_len {what})" if cut else ""))
    return rows


def finetune(cfg: FinetuneConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run the job `cfg` (its objective: sft, reward, dpo, grpo, ppo) and return the training result."""
    cfg.validate()  # every check that needs no work comes first: nothing is written before they pass
    if not Path(cfg.base).exists():
        raise ConfigError(f"base={cfg.base!r} does not exist; name an llmstack run or checkpoint, a Hugging Face "
                          "directory or a GGUF file")
    resume = check_run_dir(cfg, resume or cfg.train.resume == "auto", identity=RUN_IDENTITY)
    device = setup_parallel(cfg.parallel, resolve_device(cfg.train.device))  # torchrun: join the process group
    plan = Parallelism(cfg.parallel, device)
    progress = progress and plan.rank == 0
    run_dir = Path(cfg.train.out_dir)
    tok = chat_tokenizer(cfg.base, cfg.data.chat_template)
    batches, val = job_data(cfg, tok, device, progress)
    model = from_pretrained(cfg.base, device=device)  # float32: the master weights; train.precision autocasts
    if cfg.data.seq_len > model.config.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is above the base's max_seq_len="
                          f"{model.config.max_seq_len}; lower data.seq_len")
    if not model.config.eos_token_ids:
        model.config.eos_token_ids = list(getattr(tok, "stop_ids", [tok.eos_id]))
    torch.manual_seed(cfg.train.seed)  # the adapters' (and a reward head's) initialisation
    prepare_model(model, cfg, progress)
    model.train()
    # The saved config is the job and the base's model section: what from_pretrained rebuilds from.
    job = {**to_dict(cfg), "model": to_dict(model.config)}
    weights = None if cfg.method == "full" else AdapterWeights()
    loss_fn, evaluate_fn = next_token_loss, None
    if cfg.objective == "dpo":
        from llmstack.finetune.preference import DPO, reference_logps

        # The policy starts as the reference (adapters start at zero): its log-probs, once, are the reference's.
        reference = {"train": reference_logps(model, batches), "val": reference_logps(model, val)}
        loss_fn = DPO(reference, beta=cfg.dpo.beta, loss_type=cfg.dpo.loss, label_smoothing=cfg.dpo.label_smoothing)
        evaluate_fn = loss_fn.evaluate
    elif cfg.objective == "reward":
        from llmstack.finetune.preference import RewardLoss, RewardModel, reward_weights

        model = RewardModel(model)
        weights = reward_weights(weights)
        loss_fn = RewardLoss(cfg.reward.margin)
        evaluate_fn = loss_fn.evaluate
    elif cfg.objective in ("grpo", "ppo"):
        from llmstack.finetune.rl import rl_objective

        model, loss_fn, evaluate_fn, weights = rl_objective(cfg, model, tok, batches, val, weights, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"fine-tuning {cfg.base} ({cfg.objective}, {cfg.method}) on {device}: {len(batches)} train and "
              f"{len(val)} val examples, {batches.epoch(cfg.train.max_steps):.2f} epochs | out_dir {run_dir}")
    if plan.dp_size > 1:  # each data-parallel rank its slice of every global batch
        batches = RankSlice(batches, plan.dp_rank, plan.dp_size)
    result = train(model, cfg.train, batches, val_batches=val, run_dir=run_dir, tokenizer=tok, job_config=job,
                   resume=resume, progress=progress, weights=weights, loss_fn=loss_fn, evaluate_fn=evaluate_fn,
                   parallel=plan)
    if cfg.objective in ("grpo", "ppo"):
        from llmstack.finetune.rl import plot_rl

        plot_rl([run_dir], run_dir / "rl.png")  # reward, KL and held-out success over the steps
    return result


def job_data(cfg: FinetuneConfig, tok, device, progress: bool = True):
    """(train batches, validation batches) for the job's objective."""
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    dc, tc = cfg.data, cfg.train
    if cfg.objective in ("reward", "dpo"):
        from llmstack.data.preference import PairBatches, encode_pairs, load_pairs

        out = []
        for split in ("train", "val"):
            pairs = load_pairs(dc.source, split, val_fraction=dc.val_fraction, max_chars=dc.max_chars)
            if split == "train" and dc.max_examples:
                pairs = pairs[:dc.max_examples]
            encoded = encode_pairs(tok, pairs, dc.seq_len, truncation=dc.truncation)
            if progress:
                print(f"{split}: {len(pairs)} preference pairs, {len(encoded)} within data.seq_len={dc.seq_len}")
            out.append(PairBatches(encoded, tc.batch_size, pad_id=pad, seed=tc.seed,
                                   grad_accum=tc.grad_accum if split == "train" else 1, device=device, name=split))
        return tuple(out)
    if cfg.objective in ("grpo", "ppo"):
        from llmstack.finetune.rl import prompt_sets

        return prompt_sets(cfg, tok, device, progress)
    return (ChatBatches(chat_rows(cfg, tok, "train", progress), tc.batch_size, pad_id=pad, seed=tc.seed,
                        grad_accum=tc.grad_accum, device=device, name="train"),
            ChatBatches(chat_rows(cfg, tok, "val", progress), tc.batch_size, pad_id=pad, device=device, name="val"))


def load_job_config(path: str | os.PathLike) -> FinetuneConfig:
    """The fine-tuning job saved with a checkpoint (or with a run directory's latest one)."""
    ckpt = resolve_checkpoint(path)
    job = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
    job.pop("model", None)
    return from_dict(FinetuneConfig, job)
