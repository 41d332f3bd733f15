"""Generate text from a checkpoint, streaming it to the terminal as it is produced.

    python scripts/generate.py --checkpoint runs/quickstart --prompt "def fib(n):"
    python scripts/generate.py --checkpoint runs/quickstart --prompt "import os" --temperature 0 --max-new-tokens 80
"""
import argparse
import sys
import warnings
from pathlib import Path

import torch

import llmstack
from llmstack.inference import stream_generate
from llmstack.interop import resolve_checkpoint
from llmstack.tokenizer import StreamDecoder, Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run directory or checkpoint directory")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
            ("cpu" if args.device == "auto" else args.device)
        model = llmstack.from_pretrained(ckpt, device=device)
        tok_path = Path(ckpt) / "tokenizer.json"
        tok = Tokenizer.load(tok_path)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    ids = tok.encode(args.prompt, bos=False)
    if not ids:
        ids = [tok.eos_id]  # an empty prompt starts a new document
    limit = model.config.max_seq_len - 1
    if len(ids) > limit:
        warnings.warn(f"prompt of {len(ids)} tokens is longer than the context ({model.config.max_seq_len}); "
                      f"keeping its last {limit} tokens", stacklevel=1)
        ids = ids[-limit:]
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    decoder = StreamDecoder(tok)
    for token in stream_generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed, stop_tokens=[tok.eos_id]):
        if token == tok.eos_id:
            break
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")


if __name__ == "__main__":
    main()
