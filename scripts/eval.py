"""Perplexity and bits per byte of a model on a corpus split, or on any local text.

    python scripts/eval.py --checkpoint runs/quickstart
    python scripts/eval.py --checkpoint runs/quickstart --split train --batches 20 --source "docs/*.txt"
    python scripts/eval.py --checkpoint path/to/SmolLM2-135M-Instruct --text notes.txt
    python scripts/eval.py --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf --text "docs/*.md" README.md --seq-len 512

--checkpoint is an llmstack run or checkpoint directory (float or quantized), a Hugging Face
directory or a GGUF file; the tokenizer is the one saved with it.

--text evaluates the whole of the files given (paths or globs; .txt/.md/.py/.rst one document per
file, .jsonl/.parquet one per row), with no train/validation split: documents joined as for
training, each followed by EOS (BOS in front when the model expects one), cut into consecutive
windows of --seq-len tokens (default: the run's data.seq_len, else the model's context up to
1024); the tail shorter than a window is not scored. Without --text the corpus is the run's own
(data.source, its validation split by default) or --source, cut into data.seq_len windows.
"""
import sys

import llmstack
from llmstack.cli import add_device_argument, positive_int, script_parser
from llmstack.config import ConfigError
from llmstack.data import (DataConfig, DataError, TokenBatches, prepare_tokens, saved_data_config, text_tokens,
                           token_stats)
from llmstack.eval import evaluate
from llmstack.interop import load_tokenizer, resolve_checkpoint
from llmstack.runtime import resolve_device, set_threads

MAX_DEFAULT_SEQ_LEN = 1024


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="a run or checkpoint directory, a Hugging Face directory or a .gguf file")
    parser.add_argument("--text", nargs="+", metavar="PATH",
                        help="evaluate these files whole (paths or globs) instead of a corpus split")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help=f"tokens per window (default: the run's data.seq_len, else the model's max_seq_len "
                             f"up to {MAX_DEFAULT_SEQ_LEN})")
    parser.add_argument("--split", choices=["train", "val"], default=None, help="corpus split (default val)")
    parser.add_argument("--source", help="corpus (default: the one the checkpoint was trained on)")
    parser.add_argument("--batches", type=positive_int, default=None,
                        help="this many batches of windows spread over the text (default: every window)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per batch (default 8)")
    add_device_argument(parser)
    args = parser.parse_args()
    if args.text and (args.source or args.split):
        parser.error("--text evaluates the given files whole; --source and --split are for a corpus")
    try:
        set_threads(args.threads)
        device = resolve_device(args.device)
        ckpt = resolve_checkpoint(args.checkpoint)
        data = saved_data_config(ckpt)
        if data is None and not (args.text or args.source):
            raise ConfigError(f"{args.checkpoint} has no llmstack run config naming a corpus; give --text PATH "
                              "(or --source)")
        model = llmstack.from_pretrained(ckpt, device=device)
        tok = load_tokenizer(ckpt)
        if args.text:
            tokens, stats = text_tokens(args.text, tok)
            name, split = " ".join(args.text), "all"
            seq_len = args.seq_len or (data.seq_len if data else min(model.config.max_seq_len, MAX_DEFAULT_SEQ_LEN))
        else:
            data = data or DataConfig()
            name, split = args.source or data.source, args.split or "val"
            tokens = prepare_tokens(name, tok, cache_dir=data.cache_dir, val_fraction=data.val_fraction,
                                    text_field=data.text_field)[split]
            stats = token_stats(tokens)
            seq_len = args.seq_len or data.seq_len
        if seq_len > model.config.max_seq_len:
            raise ConfigError(f"--seq-len {seq_len} is longer than the model's context (max_seq_len "
                              f"{model.config.max_seq_len})")
        if len(tokens) < seq_len + 1:
            raise DataError(f"{name} [{split}] is {len(tokens)} tokens, shorter than one window of {seq_len} (a "
                            f"window needs {seq_len + 1}); give more text or a smaller --seq-len")
        batches = TokenBatches(tokens, args.batch_size, seq_len, device=device, name=split)
    except (ConfigError, ValueError, FileNotFoundError, DataError) as e:
        sys.exit(f"error: {e}")
    bpt = stats["bytes"] / stats["tokens"] if stats.get("tokens") else None
    windows = batches.eval_batches(args.batches) if args.batches else batches.all_windows()
    out = evaluate(model, windows, bytes_per_token=bpt)
    print(f"{name} [{split}] {out['tokens']:,} of {len(tokens):,} tokens in windows of {seq_len}: "
          f"loss {out['loss']:.4f} nats/token, perplexity {out['perplexity']:.2f}"
          + (f", {out['bits_per_byte']:.4f} bits/byte" if bpt else ""))


if __name__ == "__main__":
    main()
