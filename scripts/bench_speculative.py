"""Speculative decoding vs plain greedy decoding on the CPU, float32, one run.

Target: the quickstart checkpoint. Drafters: a small model trained on the same
data and tokenizer (runs/quickstart-draft), and prompt lookup (no second model).
Prompts are windows of the validation split (Python standard library code) at
evenly spaced offsets, not chosen by hand. Prints tokens/s, the speed-up over
plain decoding, the acceptance rate and tokens per target pass, and checks that
every output equals plain greedy decoding.

At this size a decode step on the CPU costs mostly fixed per-call and per-layer
work (and the 4096-wide output head), not parameters: the one-layer draft has
about 5x fewer parameters than the target but a forward only about 4x cheaper,
so it pays off only with a high acceptance rate; prompt lookup costs nothing.

    python scripts/pretrain.py --config configs/pretrain/quickstart.yaml          # the target
    python scripts/pretrain.py --config configs/pretrain/quickstart-draft.yaml    # the draft
    python scripts/bench_speculative.py            # full
    python scripts/bench_speculative.py --quick    # a fast smoke run (explicit flags still apply)
"""
import statistics
import sys
import time
from pathlib import Path

import torch

import llmstack
from benchlib import cpu_name, quick_defaults
from llmstack.cli import positive_int, script_parser
from llmstack.config import ConfigError
from llmstack.data import DataError, prepare_tokens
from llmstack.inference.generate import generate
from llmstack.inference.speculative import SpeculativeStats, load_draft, speculative_generate
from llmstack.interop import load_tokenizer, resolve_checkpoint
from llmstack.runtime import set_threads
from llmstack.train import load_run_config


def validation_prompts(ckpt: Path, n: int, length: int) -> list[list[int]]:
    """n windows of `length` tokens at evenly spaced offsets of the validation split."""
    cfg = load_run_config(ckpt)
    tok = load_tokenizer(ckpt)
    val = prepare_tokens(cfg.data.source, tok, cache_dir=cfg.data.cache_dir, val_fraction=cfg.data.val_fraction,
                         text_field=cfg.data.text_field, progress=False)["val"]
    step = (len(val) - length) // n
    if step < 1:
        raise ValueError(f"the validation split has {len(val)} tokens, too few for {n} prompts of {length} tokens; "
                         f"lower --prompts or --prompt-len")
    return [[int(t) for t in val[i * step:i * step + length]] for i in range(n)]


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="2 prompts, 32 new tokens, one iteration (flags given explicitly keep their value)")
    parser.add_argument("--checkpoint", default="runs/quickstart", help="the target (default runs/quickstart)")
    parser.add_argument("--draft", default="runs/quickstart-draft", help="(default runs/quickstart-draft)")
    parser.add_argument("--prompts", type=positive_int, default=None, help="validation prompts (default 8)")
    parser.add_argument("--prompt-len", type=positive_int, default=128, help="tokens per prompt (default 128)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="tokens generated per prompt (default 96)")
    parser.add_argument("--k", type=positive_int, default=4, help="tokens proposed per round (default 4)")
    parser.add_argument("--ngram", type=positive_int, default=3, help="prompt lookup: longest n-gram matched "
                                                                      "(default 3)")
    parser.add_argument("--iters", type=positive_int, default=None, help="timed runs of each method (default 3)")
    args = parser.parse_args()
    quick_defaults(args, args.quick, dict(prompts=(8, 2), max_new_tokens=(96, 32), iters=(3, 1)))
    n_prompts, new_tokens, iters = args.prompts, args.max_new_tokens, args.iters
    try:
        set_threads(args.threads)
        ckpt = resolve_checkpoint(args.checkpoint)
        target = llmstack.from_pretrained(ckpt).float().eval()
        draft = load_draft(ckpt, args.draft).float().eval()
        context = args.prompt_len + new_tokens
        for name, path, model in (("target", args.checkpoint, target), ("draft", args.draft, draft)):
            if context > model.config.max_seq_len:
                raise ValueError(f"--prompt-len + --max-new-tokens = {args.prompt_len} + {new_tokens} = {context} "
                                 f"is past the {name}'s context ({path}: max_seq_len {model.config.max_seq_len}); "
                                 f"lower them")
        prompts = validation_prompts(Path(ckpt), n_prompts, args.prompt_len)
    except (ConfigError, ValueError, FileNotFoundError, DataError) as e:
        sys.exit(f"error: {e}")
    n_t, n_d = target.num_params(), draft.num_params()
    print(f"device: {cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | float32")
    print(f"target: {args.checkpoint} {n_t / 1e6:.2f}M parameters, {target.config.n_layers} layers, dim "
          f"{target.config.dim} | draft: {args.draft} {n_d / 1e6:.2f}M parameters ({n_t / n_d:.1f}x fewer), "
          f"{draft.config.n_layers} layer(s), dim {draft.config.dim}")
    print(f"{len(prompts)} validation prompts of {args.prompt_len} tokens, {new_tokens} new tokens each, greedy, "
          f"k={args.k}, ngram={args.ngram}")

    methods = {
        "plain greedy": lambda p: (generate(target, p, new_tokens, temperature=0), None),
        "draft model": lambda p: astuple(speculative_generate(target, p, new_tokens, draft=draft, k=args.k)),
        "prompt lookup": lambda p: astuple(speculative_generate(target, p, new_tokens, k=args.k, ngram=args.ngram)),
    }
    outputs, stats = {}, {}

    def run_all(name):
        outputs[name], stats[name] = [], None
        for p in prompts:
            ids, s = methods[name](p)
            outputs[name].append(ids)
            if s is not None:
                stats[name] = stats[name] or SpeculativeStats()
                for field in ("proposed", "accepted", "new_tokens", "target_passes", "draft_passes"):
                    setattr(stats[name], field, getattr(stats[name], field) + getattr(s, field))

    try:
        for name in methods:  # warm-up; the library checks its arguments here
            run_all(name)
    except ValueError as e:
        sys.exit(f"error: {e}")
    # Alternate the methods each iteration so that drift in the machine's speed hits all alike.
    times = {name: [] for name in methods}
    for _ in range(iters):
        for name in methods:
            t0 = time.perf_counter()
            run_all(name)
            times[name].append(time.perf_counter() - t0)

    total = sum(len(o) - len(p) for o, p in zip(outputs["plain greedy"], prompts))
    base = total / statistics.median(times["plain greedy"])
    print(f"\n| {'method':<14} | {'tokens/s':>8} | {'speed-up':>8} | {'accepted':>8} | {'tokens/target pass':>18} "
          f"| {'same as greedy':>14} |")
    print(f"|{'-' * 16}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 20}|{'-' * 16}|")
    all_same = True
    for name in methods:
        rate = total / statistics.median(times[name])
        s = stats[name]
        same = all(torch.equal(a, b) for a, b in zip(outputs[name], outputs["plain greedy"]))
        all_same &= same
        acc = f"{s.acceptance_rate:.0%}" if s is not None else "-"
        tpp = f"{s.tokens_per_pass:.2f}" if s is not None else "1.00"
        print(f"| {name:<14} | {rate:>8.0f} | {rate / base:>7.2f}x | {acc:>8} | {tpp:>18} | {str(same):>14} |")
    if not all_same:
        raise SystemExit("speculative output differs from plain greedy decoding")


def astuple(out):
    return out.ids, out.stats


if __name__ == "__main__":
    main()
