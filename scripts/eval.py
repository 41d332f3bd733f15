"""Perplexity and bits per byte of a checkpoint on a corpus split.

    python scripts/eval.py --checkpoint runs/quickstart
    python scripts/eval.py --checkpoint runs/quickstart --split train --batches 20 --source "docs/*.txt"
"""
import sys

import llmstack
from llmstack.cli import add_device_argument, positive_int, script_parser
from llmstack.config import ConfigError
from llmstack.data import DataError, TokenBatches, prepare_tokens, token_stats
from llmstack.eval import evaluate
from llmstack.interop import load_tokenizer, resolve_checkpoint
from llmstack.runtime import resolve_device, set_threads
from llmstack.train import load_run_config


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a run directory or checkpoint directory")
    parser.add_argument("--split", choices=["train", "val"], default="val", help="(default val)")
    parser.add_argument("--source", help="corpus (default: the one the checkpoint was trained on)")
    parser.add_argument("--batches", type=positive_int, default=None, help="at most this many batches (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per batch (default 8)")
    add_device_argument(parser)
    args = parser.parse_args()
    try:
        set_threads(args.threads)
        device = resolve_device(args.device)
        ckpt = resolve_checkpoint(args.checkpoint)
        cfg = load_run_config(ckpt)
        model = llmstack.from_pretrained(ckpt, device=device)
        tok = load_tokenizer(ckpt)
        source = args.source or cfg.data.source
        tokens = prepare_tokens(source, tok, cache_dir=cfg.data.cache_dir, val_fraction=cfg.data.val_fraction,
                                text_field=cfg.data.text_field)[args.split]
        batches = TokenBatches(tokens, args.batch_size, cfg.data.seq_len, device=device, name=args.split)
    except (ConfigError, ValueError, FileNotFoundError, DataError) as e:
        sys.exit(f"error: {e}")
    stats = token_stats(tokens)
    bpt = stats["bytes"] / stats["tokens"] if stats.get("tokens") else None
    out = evaluate(model, batches.eval_batches(args.batches), bytes_per_token=bpt)
    print(f"{source} [{args.split}] {out['tokens']:,} tokens: loss {out['loss']:.4f} nats/token, "
          f"perplexity {out['perplexity']:.2f}" + (f", {out['bits_per_byte']:.4f} bits/byte" if bpt else ""))


if __name__ == "__main__":
    main()
