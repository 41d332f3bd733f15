r"""Generate text from a checkpoint, streaming it to the terminal as it is produced.

    python scripts/generate.py --checkpoint runs/quickstart --prompt "def fib(n):"
    python scripts/generate.py --checkpoint runs/quickstart --prompt "import os" --temperature 0 --max-new-tokens 80
    python scripts/generate.py --checkpoint runs/quickstart --prompt "def f(x):" --stop "\n\n" --repetition-penalty 1.2
    python scripts/generate.py --checkpoint runs/quickstart --prompt "class Foo:" --num-beams 4 --max-new-tokens 30
    python scripts/generate.py --checkpoint runs/quickstart --prompt "import os" --temperature 0 --prompt-lookup
    python scripts/generate.py --checkpoint runs/quickstart --prompt "import os" --draft runs/quickstart-draft
"""
import dataclasses
import re
import sys
import warnings

import llmstack
from llmstack.cli import add_device_argument, add_dtype_argument, script_parser
from llmstack.config import ConfigError
from llmstack.inference import GenerationConfig, beam_search, load_draft, speculative_generate, stream_generate
from llmstack.inference.config import EARLY_STOPPING
from llmstack.inference.generate import StopText, cut_at_stop
from llmstack.interop import load_tokenizer, resolve_checkpoint
from llmstack.runtime import resolve_device, resolve_dtype, set_threads
from llmstack.tokenizer import StreamDecoder


def flag(name: str) -> str:
    """A GenerationConfig field as its command-line flag (num_beams -> --num-beams)."""
    return "--" + name.replace("_", "-")


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a run directory, checkpoint directory or Hugging Face "
                                                           "directory")
    parser.add_argument("--prompt", default="", help="text to continue")
    doc = {f.name: f.metadata["doc"] for f in dataclasses.fields(GenerationConfig)}
    parser.add_argument("--max-new-tokens", type=int, default=200, help=doc["max_new_tokens"] + " (default 200)")
    for name, kind in (("temperature", float), ("top_k", int), ("top_p", float), ("min_p", float),
                       ("repetition_penalty", float), ("frequency_penalty", float), ("presence_penalty", float),
                       ("seed", int), ("num_beams", int), ("num_return_sequences", int), ("length_penalty", float)):
        parser.add_argument(flag(name), type=kind, default=None, help=doc[name])
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop before this text (repeatable; escapes like \\n are understood)")
    parser.add_argument("--early-stopping", choices=EARLY_STOPPING, default=None, help=doc["early_stopping"])
    parser.add_argument("--draft", default=None, metavar="CHECKPOINT",
                        help=doc["draft"] + "; the output follows the target's distribution exactly")
    parser.add_argument("--prompt-lookup", action="store_true", help=doc["prompt_lookup"] + " (no second model; "
                                                                                             "suits code)")
    parser.add_argument("--k", type=int, default=None, help=doc["k"])
    parser.add_argument("--ngram", type=int, default=None, help=doc["ngram"])
    add_device_argument(parser)
    add_dtype_argument(parser, auto="as the checkpoint stores it")
    args = parser.parse_args()
    stops = [unescape(stop) for stop in args.stop]
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationConfig) if f.name != "stop"}
    try:
        cfg = GenerationConfig(**options, stop=stops).validate(name=flag)
    except ValueError as e:
        sys.exit(f"error: {e}")

    try:
        set_threads(args.threads)
        ckpt = resolve_checkpoint(args.checkpoint)
        device = resolve_device(args.device)
        dtype = None if args.dtype == "auto" else resolve_dtype(args.dtype, device)
        model = llmstack.from_pretrained(ckpt, device=device, dtype=dtype)
        tok = load_tokenizer(ckpt)
        draft = load_draft(ckpt, cfg.draft, device=device, dtype=dtype) if cfg.draft is not None else None
    except (ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    ids = tok.encode(args.prompt, bos=False)
    if not ids:
        ids = [tok.eos_id]  # an empty prompt starts a new document
    limit = model.config.max_seq_len - 1
    if len(ids) > limit:
        warnings.warn(f"prompt of {len(ids)} tokens is longer than the context ({model.config.max_seq_len}); "
                      f"keeping its last {limit} tokens", stacklevel=1)
        ids = ids[-limit:]
    try:
        if cfg.mode == "beam":
            print_beams(model, tok, cfg, args.prompt, ids)
        elif cfg.mode == "speculative":
            print_speculative(model, draft, tok, cfg, args.prompt, ids)
        else:
            stream_text(model, tok, cfg, args.prompt, ids)
    except ValueError as e:  # a bad value for the model (top_k past its vocabulary, an id its tokenizer lacks)
        sys.exit(f"error: {e}")


def unescape(text: str) -> str:
    """A shell passes "\\n" as a backslash and an n: read \\n, \\t, \\r and \\\\ as the characters."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


def stream_text(model, tok, cfg: GenerationConfig, prompt: str, ids: list[int]) -> None:
    tokens = stream_generate(model, ids, cfg.max_new_tokens, **cfg.sampling(), stop_tokens=[tok.eos_id])  # checks args
    sys.stdout.write(prompt)
    sys.stdout.flush()
    # StopText holds back text that may be the start of a stop string; StreamDecoder only
    # holds back incomplete characters and does not re-decode, so it is the default.
    text = StopText(cfg.stop, tok.decode) if cfg.stop else StreamDecoder(tok)
    try:
        for token in tokens:
            if token == tok.eos_id:
                break
            sys.stdout.write(text.push(token))
            sys.stdout.flush()
            if cfg.stop and text.stopped:
                break
    finally:  # also when a token cannot be decoded: the error then starts a line of its own
        sys.stdout.write(text.flush() + "\n")


def print_beams(model, tok, cfg: GenerationConfig, prompt: str, ids: list[int]) -> None:
    hyps = beam_search(model, ids, cfg.max_new_tokens, **cfg.beam(), eos_token_id=tok.eos_id)
    for rank, hyp in enumerate(hyps, 1):
        print(f"--- {rank}: score {hyp.score:.4f} (log-prob {hyp.log_prob:.3f} over {len(hyp.tokens) - len(ids)} "
              f"tokens)")
        print(prompt + continuation_text(tok, hyp.tokens[len(ids):].tolist(), cfg.stop))


def continuation_text(tok, continuation: list[int], stops) -> str:
    """The text of new tokens that end at EOS or the token limit, cut before the first stop string."""
    if continuation and continuation[-1] == tok.eos_id:
        continuation = continuation[:-1]
    return cut_at_stop(tok.decode(continuation), stops)


def print_speculative(model, draft, tok, cfg: GenerationConfig, prompt: str, ids: list[int]) -> None:
    """The whole continuation at once (tokens arrive in bursts of up to k + 1), then how the drafts fared."""
    out = speculative_generate(model, ids, cfg.max_new_tokens, draft=draft, **cfg.speculative(),
                               stop_tokens=[tok.eos_id])
    print(prompt + continuation_text(tok, out.ids[len(ids):].tolist(), cfg.stop))
    s = out.stats
    print(f"speculative decoding ({'draft model' if draft is not None else 'prompt lookup'}): {s.new_tokens} "
          f"tokens in {s.target_passes} target passes ({s.tokens_per_pass:.2f} per pass), "
          f"{s.accepted}/{s.proposed} proposals accepted ({s.acceptance_rate:.0%})", file=sys.stderr)


if __name__ == "__main__":
    main()
