"""The pretraining job in one call: tokenizer, data, model, training loop.

    from llmstack.config import load_config
    from llmstack.train import PretrainConfig, pretrain
    result = pretrain(load_config(PretrainConfig, "configs/pretrain/quickstart.yaml"))
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
import yaml

from llmstack.config import ConfigError, from_dict, to_dict
from llmstack.data import TokenBatches, corpus_fingerprint, default_cache_dir, load_corpus, prepare_tokens, token_stats
from llmstack.distributed import Parallelism, RankSlice
from llmstack.distributed import setup as setup_parallel
from llmstack.interop import build, resolve_checkpoint
from llmstack.model import flops_per_token
from llmstack.runtime import resolve_device
from llmstack.tokenizer import Tokenizer
from llmstack.tokenizer import load as load_tokenizer_file
from llmstack.tokenizer.tokenizer import SPECIAL_TOKENS
from llmstack.train.config import PretrainConfig
from llmstack.train.checkpoint import latest_checkpoint
from llmstack.train.trainer import TrainResult, train

# Sections that must match for a run directory to be continued.
RUN_IDENTITY = ("model", "tokenizer", "data")


def check_directory(key: str, path: str | os.PathLike) -> None:
    """ConfigError unless `path` is a directory or can become one: its nearest existing part is a
    writable directory."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={str(path)!r}: {str(existing)!r} is a file, not a directory; choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={str(path)!r}: {str(existing)!r} is not writable; choose another {key}")


def check_run_dir(cfg, resume: bool, identity: tuple[str, ...] = RUN_IDENTITY) -> bool:
    """Whether to resume. Errors, before any work, when out_dir cannot hold a run, holds another
    run (one of the `identity` sections of the job differs), or holds this run without --resume."""
    run_dir = Path(cfg.train.out_dir)
    check_directory("train.out_dir", run_dir)
    if getattr(cfg.data, "cache_dir", None):
        check_directory("data.cache_dir", cfg.data.cache_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return False
    old = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
    new = to_dict(cfg)
    for job in (old, new):  # the stop tokens are the tokenizer's (compared in its own section), filled in later
        if isinstance(job.get("model"), dict):
            job["model"] = {k: v for k, v in job["model"].items() if k != "eos_token_ids"}
    differs = [s for s in identity if old.get(s) != new.get(s)]
    if differs:
        raise ConfigError(f"train.out_dir={str(run_dir)!r} holds a different run ({', '.join(differs)} differ); "
                          "choose another train.out_dir")
    if not resume:
        raise ConfigError(f"train.out_dir={str(run_dir)!r} already holds this run (at {ckpt.name}); pass --resume "
                          "(train.resume=auto) to continue it, or choose another train.out_dir")
    return True


def build_tokenizer(cfg: PretrainConfig, progress: bool = True) -> Tokenizer:
    tc = cfg.tokenizer
    if tc.path:  # any kind: llmstack's, a Hugging Face tokenizer.json or folder, a GGUF file
        return load_tokenizer_file(tc.path)
    if tc.tiktoken:
        return Tokenizer.from_tiktoken(tc.tiktoken)
    # Train on the corpus; cache by corpus, settings and special tokens (a tokenizer cached before the
    # list changed lacks the new ones), so that reruns skip it.
    key = hashlib.sha256(f"{corpus_fingerprint(cfg.data.source, val_fraction=cfg.data.val_fraction)}|"
                         f"{tc.vocab_size}|{tc.train_docs_fraction}|{','.join(SPECIAL_TOKENS)}".encode()
                         ).hexdigest()[:20]
    cache = (Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()).parent / "tokenizers"
    path = cache / f"{key}.json"
    if path.is_file():
        return Tokenizer.load(path)
    docs = load_corpus(cfg.data.source, "train", val_fraction=cfg.data.val_fraction, text_field=cfg.data.text_field)
    n = max(1, int(len(docs) * tc.train_docs_fraction))
    t0 = time.perf_counter()
    tok = Tokenizer.train((row["text"] for row in docs.select(range(n))), tc.vocab_size, verbose=progress)
    if progress:
        print(f"tokenizer: {tok.vocab_size} tokens trained on {n} documents in {time.perf_counter() - t0:.1f}s")
    cache.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok


def pretrain(cfg: PretrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    cfg.validate()  # every check that needs no work comes first: nothing is written before they pass
    resume = check_run_dir(cfg, resume or cfg.train.resume == "auto")
    device = setup_parallel(cfg.parallel, resolve_device(cfg.train.device))  # torchrun: join the process group
    plan = Parallelism(cfg.parallel, device)  # this rank's place in the mesh (llmstack.distributed)
    run_dir = Path(cfg.train.out_dir)
    if resume:  # the checkpoint's own tokenizer, whatever the cache holds now
        tok = load_tokenizer_file(latest_checkpoint(run_dir) / "tokenizer.json")
    else:
        tok = build_tokenizer(cfg, progress)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
                          f"set model.vocab_size >= {tok.vocab_size}")
    if not cfg.model.eos_token_ids:  # saved with the run: generation then stops where the model learned texts end
        cfg.model.eos_token_ids = list(getattr(tok, "stop_ids", [tok.eos_id]))
    tokens = prepare_tokens(cfg.data.source, tok, cache_dir=cfg.data.cache_dir, val_fraction=cfg.data.val_fraction,
                            text_field=cfg.data.text_field, progress=progress)
    batches = TokenBatches(tokens["train"], cfg.train.batch_size, cfg.data.seq_len, seed=cfg.train.seed,
                           device=device, name="train")
    if plan.dp_size > 1:  # each data-parallel rank its slice of every global batch
        batches = RankSlice(batches, plan.dp_rank, plan.dp_size)
    val = TokenBatches(tokens["val"], cfg.train.batch_size, cfg.data.seq_len, seed=cfg.train.seed, device=device,
                       name="val")
    stats = token_stats(tokens["val"])
    bytes_per_token = stats["bytes"] / stats["tokens"] if stats.get("tokens") else None
    torch.manual_seed(cfg.train.seed)
    model = build(cfg.model, device=device)  # a Transformer, or an LSTM / GRU LM (model.arch)
    model.init_weights()
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = progress and plan.rank == 0
    # FLOPs per token feed the TFLOP/s and MFU in the log; the formula is the Transformer's.
    flops = flops_per_token(cfg.model, cfg.data.seq_len) if cfg.model.arch == "transformer" else None
    if progress:
        print(f"model: {model.num_params() / 1e6:.2f}M parameters on {device}"
              + (f" x {plan.world} processes" if plan.world > 1 else "")
              + (f", {flops / 1e6:,.1f} MFLOPs per token" if flops else "")
              + f" | train {len(tokens['train']):,} tokens, val {len(tokens['val']):,} tokens | out_dir {run_dir}")
    return train(model, cfg.train, batches, val_batches=val, run_dir=run_dir, tokenizer=tok, job_config=cfg,
                 resume=resume, bytes_per_token=bytes_per_token, flops_per_token=flops, progress=progress,
                 parallel=plan)


def load_run_config(path: str | os.PathLike) -> PretrainConfig:
    """The job config saved with a checkpoint (or with a run directory's latest one)."""
    ckpt = resolve_checkpoint(path)
    return from_dict(PretrainConfig, yaml.safe_load((ckpt / "config.yaml").read_text()))
