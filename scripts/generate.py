r"""Generate text from a checkpoint, streaming it to the terminal as it is produced.

    python scripts/generate.py --checkpoint runs/quickstart --prompt "def fib(n):"
    python scripts/generate.py --checkpoint runs/quickstart --prompt "import os" --temperature 0 --max-new-tokens 80
    python scripts/generate.py --checkpoint runs/quickstart --prompt "def f(x):" --stop "\n\n" --repetition-penalty 1.2
    python scripts/generate.py --checkpoint runs/quickstart --prompt "class Foo:" --num-beams 4 --max-new-tokens 30
    python scripts/generate.py --checkpoint runs/quickstart --prompt "import os" --temperature 0 --prompt-lookup
    python scripts/generate.py --checkpoint runs/quickstart --prompt "import os" --draft runs/quickstart-draft
"""
import argparse
import re
import sys
import warnings

import llmstack
from llmstack.runtime import resolve_device
from llmstack.inference.beam import beam_search
from llmstack.inference.generate import StopText, cut_at_stop, stream_generate
from llmstack.inference.sampling import SamplingParams
from llmstack.inference.speculative import load_draft, speculative_generate
from llmstack.interop import load_tokenizer, resolve_checkpoint
from llmstack.tokenizer import StreamDecoder

# Sampling flags (None on the command line = not given) and the values they take when not given.
SAMPLING_DEFAULTS = dict(temperature=0.8, top_k=None, top_p=0.95, min_p=None, repetition_penalty=1.0,
                         frequency_penalty=0.0, presence_penalty=0.0, seed=None)
# What speculative decoding keeps exact (it samples the target's own distribution); the rest
# (min-p and the penalties) would change that distribution as tokens are accepted in bulk.
SPECULATIVE_SAMPLING = ("temperature", "top_k", "top_p", "seed")
EARLY_STOPPING = {"true": True, "false": False, "never": "never"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run directory or checkpoint directory")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default 200)")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: off)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 0.95)")
    parser.add_argument("--min-p", type=float, default=None, help="keep tokens with p >= min_p * p_max (default: off)")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="> 1 discourages repeats (default 1 = off)")
    parser.add_argument("--frequency-penalty", type=float, default=None,
                        help="minus this per earlier occurrence (default 0)")
    parser.add_argument("--presence-penalty", type=float, default=None,
                        help="minus this once a token occurred (default 0)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop before this text (repeatable; escapes like \\n are understood)")
    parser.add_argument("--seed", type=int, default=None, help="for reproducible sampling (default: random)")
    parser.add_argument("--num-beams", type=int, default=None,
                        help="beam search with this width (no sampling; default: sample)")
    parser.add_argument("--num-return-sequences", type=int, default=None,
                        help="with --num-beams: how many of the best hypotheses to print (default: all)")
    parser.add_argument("--length-penalty", type=float, default=None,
                        help="with --num-beams: score = log-prob / new_tokens ** this (default 1)")
    parser.add_argument("--early-stopping", choices=EARLY_STOPPING, default=None,
                        help="with --num-beams: true = stop once num_beams hypotheses finished; false = once no "
                             "running beam can win (default); never = search the whole width")
    parser.add_argument("--draft", default=None, metavar="CHECKPOINT",
                        help="speculative decoding with this smaller model (same tokenizer); the output follows "
                             "the target's distribution exactly")
    parser.add_argument("--prompt-lookup", action="store_true",
                        help="speculative decoding that drafts by matching n-grams of the text so far (no second "
                             "model; suits code)")
    parser.add_argument("--k", type=int, default=None, help="with --draft or --prompt-lookup: tokens proposed per "
                                                            "target pass (default 4)")
    parser.add_argument("--ngram", type=int, default=None,
                        help="with --prompt-lookup: longest n-gram matched (default 3)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    args = parser.parse_args()
    given = [f"--{name.replace('_', '-')}" for name in SAMPLING_DEFAULTS if getattr(args, name) is not None]
    if args.num_beams is not None and given:
        sys.exit(f"error: --num-beams runs beam search, which does not sample: {', '.join(given)} "
                 f"cannot be used with it")
    for name in ("num_return_sequences", "length_penalty", "early_stopping"):
        if args.num_beams is None and getattr(args, name) is not None:
            sys.exit(f"error: --{name.replace('_', '-')} needs --num-beams (it applies only to beam search)")
    speculative = args.draft is not None or args.prompt_lookup
    if args.draft is not None and args.prompt_lookup:
        sys.exit("error: --draft and --prompt-lookup are two ways to draft; choose one")
    if speculative and args.num_beams is not None:
        sys.exit("error: speculative decoding (--draft, --prompt-lookup) cannot be combined with --num-beams")
    if speculative:
        unsupported = [f"--{name.replace('_', '-')}" for name in SAMPLING_DEFAULTS
                       if name not in SPECULATIVE_SAMPLING and getattr(args, name) is not None]
        if unsupported:
            sys.exit(f"error: speculative decoding samples with --temperature, --top-k, --top-p and --seed only; "
                     f"{', '.join(unsupported)} cannot be used with it")
    if args.k is not None and not speculative:
        sys.exit("error: --k needs --draft or --prompt-lookup")
    if args.ngram is not None and not args.prompt_lookup:
        sys.exit("error: --ngram needs --prompt-lookup")
    for name, default in SAMPLING_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.length_penalty is None:
        args.length_penalty = 1.0

    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        device = resolve_device(args.device)
        model = llmstack.from_pretrained(ckpt, device=device)
        tok = load_tokenizer(ckpt)
        draft = load_draft(ckpt, args.draft, device=device) if args.draft is not None else None
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
        elif speculative:
            print_speculative(model, draft, tok, args, ids, stops)
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
                       early_stopping=EARLY_STOPPING[args.early_stopping or "false"], eos_token_id=tok.eos_id,
                       num_return_sequences=args.num_return_sequences or args.num_beams)
    for rank, hyp in enumerate(hyps, 1):
        print(f"--- {rank}: score {hyp.score:.4f} (log-prob {hyp.log_prob:.3f} over {len(hyp.tokens) - len(ids)} "
              f"tokens)")
        print(args.prompt + continuation_text(tok, hyp.tokens[len(ids):].tolist(), stops))


def continuation_text(tok, continuation: list[int], stops) -> str:
    """The text of new tokens that end at EOS or the token limit, cut before the first stop string."""
    if continuation and continuation[-1] == tok.eos_id:
        continuation = continuation[:-1]
    return cut_at_stop(tok.decode(continuation), stops)


def print_speculative(model, draft, tok, args, ids, stops) -> None:
    """The whole continuation at once (tokens arrive in bursts of up to k + 1), then how the drafts fared."""
    out = speculative_generate(model, ids, args.max_new_tokens, draft=draft, k=4 if args.k is None else args.k,
                               ngram=3 if args.ngram is None else args.ngram, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=[tok.eos_id])
    print(args.prompt + continuation_text(tok, out.ids[len(ids):].tolist(), stops))
    s = out.stats
    print(f"speculative decoding ({'draft model' if draft is not None else 'prompt lookup'}): {s.new_tokens} "
          f"tokens in {s.target_passes} target passes ({s.tokens_per_pass:.2f} per pass), "
          f"{s.accepted}/{s.proposed} proposals accepted ({s.acceptance_rate:.0%})", file=sys.stderr)


if __name__ == "__main__":
    main()
