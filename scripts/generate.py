r"""Generate text from a checkpoint, streaming it to the terminal as it is produced.

    python scripts/generate.py --checkpoint runs/quickstart --prompt "def fib(n):"
    python scripts/generate.py --checkpoint runs/quickstart --prompt "import os" --temperature 0 --max-new-tokens 80
    python scripts/generate.py --checkpoint runs/quickstart --prompt "def f(x):" --stop "\n\n" --repetition-penalty 1.2
    python scripts/generate.py --checkpoint runs/quickstart --prompt "class Foo:" --num-beams 4 --max-new-tokens 30
    python scripts/generate.py --checkpoint runs/quickstart --prompt "import os" --temperature 0 --prompt-lookup
    python scripts/generate.py --checkpoint runs/quickstart --prompt "import os" --draft runs/quickstart-draft
    python scripts/generate.py --checkpoint path/to/model.gguf --chat --prompt "What is a KV cache?" --temperature 0
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
from llmstack.inference.generate import StopText, cut_at_stop, text_stop_tokens
from llmstack.interop import load_tokenizer, resolve_checkpoint
from llmstack.runtime import resolve_device, resolve_dtype, set_threads
from llmstack.tokenizer import StreamDecoder


def flag(name: str) -> str:
    """A GenerationConfig field as its command-line flag (num_beams -> --num-beams)."""
    return "--" + name.replace("_", "-")


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a run directory, checkpoint directory, Hugging Face "
                                                           "directory or GGUF file")
    parser.add_argument("--prompt", default="", help="text to continue (with --chat: the user's message)")
    parser.add_argument("--chat", action="store_true",
                        help="an instruct model: send --prompt as a user message through the model's chat template "
                             "and print the reply")
    parser.add_argument("--system", default=None, help="with --chat: a system message before the user's")
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
        if args.system is not None and not args.chat:
            raise ValueError("--system needs --chat (it is the system message of a conversation)")
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
    prompt = args.prompt
    try:
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
                [{"role": "user", "content": args.prompt}]
            ids, prompt = tok.apply_chat_template(messages, add_generation_prompt=True), ""  # print the reply only
        else:
            ids = tok.encode(args.prompt, bos=getattr(tok, "add_bos_token", False))  # as the model was trained
    except ValueError as e:  # no chat template, a message it refuses
        sys.exit(f"error: {e}")
    if not ids:  # an empty prompt starts a new document
        ids = [tok.bos_id if tok.bos_id is not None else tok.eos_id]
    limit = model.config.max_seq_len - 1
    if len(ids) > limit:
        warnings.warn(f"prompt of {len(ids)} tokens is longer than the context ({model.config.max_seq_len}); "
                      f"keeping its last {limit} tokens", stacklevel=1)
        ids = ids[-limit:]
    try:
        if cfg.mode == "beam":
            print_beams(model, tok, cfg, prompt, ids)
        elif cfg.mode == "speculative":
            print_speculative(model, draft, tok, cfg, prompt, ids)
        else:
            stream_text(model, tok, cfg, prompt, ids)
    except ValueError as e:  # a bad value for the model (top_k past its vocabulary, an id its tokenizer lacks)
        sys.exit(f"error: {e}")


def unescape(text: str) -> str:
    """A shell passes "\\n" as a backslash and an n: read \\n, \\t, \\r and \\\\ as the characters."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


def stream_text(model, tok, cfg: GenerationConfig, prompt: str, ids: list[int]) -> None:
    stops = text_stop_tokens(model, tok)  # end of text and end of turn
    tokens = stream_generate(model, ids, cfg.max_new_tokens, **cfg.sampling(), stop_tokens=stops)  # checks args
    sys.stdout.write(prompt)
    sys.stdout.flush()
    # StopText holds back text that may be the start of a stop string; StreamDecoder only
    # holds back incomplete characters and does not re-decode, so it is the default.
    text = StopText(cfg.stop, tok.decode) if cfg.stop else StreamDecoder(tok)
    try:
        for token in tokens:
            if token in stops:
                break
            sys.stdout.write(text.push(token))
            sys.stdout.flush()
            if cfg.stop and text.stopped:
                break
    finally:  # also when a token cannot be decoded: the error then starts a line of its own
        sys.stdout.write(text.flush() + "\n")


def print_beams(model, tok, cfg: GenerationConfig, prompt: str, ids: list[int]) -> None:
    stops = text_stop_tokens(model, tok)
    hyps = beam_search(model, ids, cfg.max_new_tokens, **cfg.beam(), stop_tokens=stops)
    for rank, hyp in enumerate(hyps, 1):
        print(f"--- {rank}: score {hyp.score:.4f} (log-prob {hyp.log_prob:.3f} over {len(hyp.tokens) - len(ids)} "
              f"tokens)")
        print(prompt + continuation_text(tok, hyp.tokens[len(ids):].tolist(), stops, cfg.stop))


def continuation_text(tok, continuation: list[int], stop_tokens: list[int], stop_strings: list[str]) -> str:
    """The text of new tokens that end at a stop token or the token limit, cut before the first stop string."""
    if continuation and continuation[-1] in stop_tokens:
        continuation = continuation[:-1]
    return cut_at_stop(tok.decode(continuation), stop_strings)


def print_speculative(model, draft, tok, cfg: GenerationConfig, prompt: str, ids: list[int]) -> None:
    """The whole continuation at once (tokens arrive in bursts of up to k + 1), then how the drafts fared."""
    stops = text_stop_tokens(model, tok)
    out = speculative_generate(model, ids, cfg.max_new_tokens, draft=draft, **cfg.speculative(), stop_tokens=stops)
    print(prompt + continuation_text(tok, out.ids[len(ids):].tolist(), stops, cfg.stop))
    s = out.stats
    print(f"speculative decoding ({'draft model' if draft is not None else 'prompt lookup'}): {s.new_tokens} "
          f"tokens in {s.target_passes} target passes ({s.tokens_per_pass:.2f} per pass), "
          f"{s.accepted}/{s.proposed} proposals accepted ({s.acceptance_rate:.0%})", file=sys.stderr)


if __name__ == "__main__":
    main()
