"""Generate text from a checkpoint, streaming it to the terminal as it is produced.

    python scripts/generate.py --checkpoint runs/quickstart --prompt "def fib(n):"
    python scripts/generate.py --checkpoint runs/quickstart --prompt "import os" --temperature 0 --max-new-tokens 80
    python scripts/generate.py --checkpoint runs/quickstart --prompt "def f(x):" --stop "\n\n" --repetition-penalty 1.2
    python scripts/generate.py --checkpoint runs/quickstart --prompt "class Foo:" --num-beams 4 --max-new-tokens 30
"""
import argparse
import re
import sys
import warnings

import torch

import llmstack
from llmstack.inference.beam import beam_search
from llmstack.inference.generate import StopText, cut_at_stop, stream_generate
from llmstack.inference.sampling import SamplingParams
from llmstack.interop import load_tokenizer, resolve_checkpoint
from llmstack.tokenizer import StreamDecoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run directory or checkpoint directory")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--min-p", type=float, default=None, help="keep tokens with p >= min_p * p_max")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="minus this per earlier occurrence")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="minus this once a token occurred")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop before this text (repeatable; escapes like \\n are understood)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--num-beams", type=int, default=None, help="beam search with this width (no sampling)")
    parser.add_argument("--num-return-sequences", type=int, default=None,
                        help="with --num-beams: how many of the best hypotheses to print (default: all)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="with --num-beams: score = log-prob / new_tokens ** this")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
            ("cpu" if args.device == "auto" else args.device)
        model = llmstack.from_pretrained(ckpt, device=device)
        tok = load_tokenizer(ckpt)
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
    stops = [unescape(stop) for stop in args.stop]
    if any(not stop for stop in stops):
        sys.exit("error: --stop needs a non-empty text")
    try:
        if args.num_beams is not None:
            print_beams(model, tok, args, ids, stops)
        else:
            stream_text(model, tok, args, ids, stops)
    except ValueError as e:
        sys.exit(f"error: {e}")


def unescape(text: str) -> str:
    """A shell passes "\\n" as a backslash and an n: read \\n, \\t, \\r and \\\\ as the characters."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


def stream_text(model, tok, args, ids, stops) -> None:
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                            presence_penalty=args.presence_penalty, seed=args.seed)
    tokens = stream_generate(model, ids, args.max_new_tokens, **vars(params), stop_tokens=[tok.eos_id])  # checks args
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    # StopText holds back text that may be the start of a stop string; StreamDecoder only
    # holds back incomplete characters and does not re-decode, so it is the default.
    text = StopText(stops, tok.decode) if stops else StreamDecoder(tok)
    for token in tokens:
        if token == tok.eos_id:
            break
        sys.stdout.write(text.push(token))
        sys.stdout.flush()
        if stops and text.stopped:
            break
    sys.stdout.write(text.flush() + "\n")


def print_beams(model, tok, args, ids, stops) -> None:
    hyps = beam_search(model, ids, args.max_new_tokens, num_beams=args.num_beams, length_penalty=args.length_penalty,
                       eos_token_id=tok.eos_id, num_return_sequences=args.num_return_sequences or args.num_beams)
    for rank, hyp in enumerate(hyps, 1):
        continuation = hyp.tokens[len(ids):].tolist()
        n_new = len(continuation)
        if continuation and continuation[-1] == tok.eos_id:
            continuation = continuation[:-1]
        print(f"--- {rank}: score {hyp.score:.4f} (log-prob {hyp.log_prob:.3f} over {n_new} tokens)")
        print(args.prompt + cut_at_stop(tok.decode(continuation), stops))


if __name__ == "__main__":
    main()
