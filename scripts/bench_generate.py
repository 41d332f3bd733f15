"""Generation throughput vs latency: llmstack's streaming generate beside transformers' generate.

Both load the same weights (a random ~12M-parameter Llama, or --checkpoint) and, for every
batch size and prompt length, generate the same number of greedy tokens (KV cache) from the
same random prompts, alternately. Reported per configuration, as medians over the runs:

    TTFT    time to first token: prefill + the first token reaching the host
    ITL     inter-token latency: median time between one sequence's consecutive tokens
    tok/s   total throughput: new tokens of the whole batch per second of the whole call

with the ratio llmstack / transformers, and a check that the greedy tokens are identical.
The throughput-latency curve (one point per batch size) is saved as a PNG. Float32 on the
CPU; bfloat16 on CUDA.

    python scripts/bench_generate.py                          # batch 1-16, prompts 32/128/512
    python scripts/bench_generate.py --quick                  # a fast smoke run (explicit flags still apply)
    python scripts/bench_generate.py --checkpoint runs/quickstart
    python scripts/bench_generate.py --batch-size 1 4 16 --prompt-len 128 --max-new-tokens 32

Threads: `--threads` (default one fewer than the cores, see llmstack.runtime.set_threads);
both libraries run with the same count.
"""
import statistics
import sys
from pathlib import Path

import torch

import llmstack
from benchlib import (alternate, device_name, first_difference, hf_twin, quick_defaults, random_llama,
                            time_hf_generate, time_llmstack_generate)
from llmstack.cli import add_device_argument, add_dtype_argument, non_negative_int, positive_int, script_parser
from llmstack.config import ConfigError
from llmstack.inference.quantize import quantization_of
from llmstack.interop import resolve_checkpoint
from llmstack.runtime import resolve_device, resolve_dtype, set_threads


def measure(ours, hf, batch: int, prompt_len: int, new_tokens: int, warmup: int, iters: int) -> dict:
    """One configuration: medians of both implementations and whether their tokens agree."""
    gen = torch.Generator().manual_seed(batch * 100_003 + prompt_len)
    prompts = torch.randint(0, ours.config.vocab_size, (batch, prompt_len), generator=gen)
    runs_ours, runs_hf = alternate(lambda: time_llmstack_generate(ours, prompts, new_tokens),
                                   lambda: time_hf_generate(hf, prompts, new_tokens), warmup, iters)
    row = dict(batch=batch, prompt=prompt_len, diff=None)
    for name, runs in (("ours", runs_ours), ("hf", runs_hf)):
        row[f"ttft_{name}"] = statistics.median(r.ttft for r in runs)
        row[f"itl_{name}"] = statistics.median(r.itl for r in runs)
        row[f"tps_{name}"] = statistics.median(r.tokens_per_s for r in runs)
    for a, b in zip(runs_ours, runs_hf):
        row["diff"] = row["diff"] or first_difference(a.tokens, b.tokens)
    return row


def print_table(rows: list[dict]) -> None:
    head = (f"| {'batch':>5} | {'prompt':>6} | {'TTFT ms ours':>12} | {'hf':>8} | {'ratio':>5} "
            f"| {'ITL ms ours':>11} | {'hf':>7} | {'ratio':>5} | {'tok/s ours':>10} | {'hf':>8} | {'ratio':>5} "
            f"| {'same tokens':>11} |")
    print(head)
    print("|" + "|".join("-" * len(cell) for cell in head.split("|")[1:-1]) + "|")
    for r in rows:
        same = "yes" if r["diff"] is None else f"no @{r['diff'][1]}"
        print(f"| {r['batch']:>5} | {r['prompt']:>6} "
              f"| {1e3 * r['ttft_ours']:>12.1f} | {1e3 * r['ttft_hf']:>8.1f} | {r['ttft_ours'] / r['ttft_hf']:>5.2f} "
              f"| {1e3 * r['itl_ours']:>11.2f} | {1e3 * r['itl_hf']:>7.2f} | {r['itl_ours'] / r['itl_hf']:>5.2f} "
              f"| {r['tps_ours']:>10.4g} | {r['tps_hf']:>8.4g} | {r['tps_ours'] / r['tps_hf']:>5.2f} "
              f"| {same:>11} |")


def plot_curve(rows: list[dict], path: Path, title: str) -> None:
    """Throughput against per-sequence latency: each line walks up the batch sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, prompt_len in enumerate(sorted({r["prompt"] for r in rows})):
        line = sorted((r for r in rows if r["prompt"] == prompt_len), key=lambda r: r["batch"])
        for impl, style, label in (("ours", "-o", "llmstack"), ("hf", "--s", "transformers")):
            x = [1e3 * r[f"itl_{impl}"] for r in line]
            y = [r[f"tps_{impl}"] for r in line]
            ax.plot(x, y, style, color=colors[i % len(colors)], label=f"{label}, prompt {prompt_len}")
            for r, xi, yi in zip(line, x, y):
                ax.annotate(f"B={r['batch']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("inter-token latency per sequence (ms, median)")
    ax.set_ylabel("total throughput (new tokens/s)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="batch 1-2, prompts 16/32, 8 new tokens, 2 runs (a smoke run); flags given explicitly "
                             "keep their value")
    parser.add_argument("--checkpoint", help="a trained llmstack run or checkpoint directory (default: random Llama)")
    parser.add_argument("--batch-size", type=positive_int, nargs="+", default=None, help="(default 1 2 4 8 16)")
    parser.add_argument("--prompt-len", type=positive_int, nargs="+", default=None,
                        help="lengths that do not fit the context with --max-new-tokens are skipped "
                             "(default 32 128 512)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None, help="(default 64)")
    parser.add_argument("--iters", type=positive_int, default=None,
                        help="timed runs of each implementation per configuration (default 5)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs first (default 1)")
    add_device_argument(parser)
    add_dtype_argument(parser)
    parser.add_argument("--out", default="runs/bench_generate.png", help="where to save the throughput-latency PNG")
    args = parser.parse_args()
    quick_defaults(args, args.quick, dict(batch_size=([1, 2, 4, 8, 16], [1, 2]), prompt_len=([32, 128, 512], [16, 32]),
                                          max_new_tokens=(64, 8), iters=(5, 2)))
    if args.max_new_tokens < 2:
        sys.exit(f"error: --max-new-tokens must be >= 2 (ITL needs two tokens), got {args.max_new_tokens}")
    try:
        set_threads(args.threads)
        device = resolve_device(args.device)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    dtype = resolve_dtype(args.dtype, device)

    # Both models are built on the CPU in float32 first: the export must not round the weights.
    if args.checkpoint:
        try:
            ours = llmstack.from_pretrained(resolve_checkpoint(args.checkpoint))
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        if quantization_of(ours) is not None:
            sys.exit(f"error: {args.checkpoint} is a quantized checkpoint ({quantization_of(ours)['scheme']}); the "
                     f"comparison with transformers needs a float checkpoint (the one it was quantized from)")
        model_desc = f"{args.checkpoint}"
    else:
        ours = random_llama(max_seq_len=1024)  # room for prompt 512 + the new tokens
        model_desc = "random Llama"
    try:
        hf = hf_twin(ours, dtype=dtype, device=device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    ours = ours.to(device=device, dtype=dtype).eval()
    cfg = ours.config
    model_desc += (f", {ours.num_params() / 1e6:.1f}M parameters, GQA {cfg.n_heads}/{cfg.n_kv_heads}, "
                   f"vocab {cfg.vocab_size}, context {cfg.max_seq_len}")

    import transformers

    dtype_name = str(dtype).removeprefix("torch.")
    threads = f" | {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"device: {device_name(device)} | torch {torch.__version__} | transformers {transformers.__version__}"
          f"{threads} | {dtype_name}")
    print(f"model: {model_desc}")
    print(f"greedy, KV cache, {args.max_new_tokens} new tokens, median of {args.iters} alternating runs "
          f"after {args.warmup} warm-up; ratio = llmstack / transformers (times: below 1 is faster; "
          f"tok/s: above 1 is faster)\n")

    lengths = [t for t in args.prompt_len if t + args.max_new_tokens <= cfg.max_seq_len]
    for t in sorted(set(args.prompt_len) - set(lengths)):
        print(f"skipped prompt length {t}: {t} + {args.max_new_tokens} new tokens exceed the context "
              f"({cfg.max_seq_len})")
    if not lengths:
        sys.exit("error: no prompt length fits the context; lower --prompt-len or --max-new-tokens")
    rows = []
    for prompt_len in lengths:
        for batch in args.batch_size:
            rows.append(measure(ours, hf, batch, prompt_len, args.max_new_tokens, args.warmup, args.iters))
            print(f"  measured batch {batch:>3}, prompt {prompt_len:>4}", file=sys.stderr, flush=True)
    print_table(rows)

    out = Path(args.out)
    plot_curve(rows, out, f"generation throughput vs latency, {device_name(device)}, {dtype_name}\n{model_desc}")
    print(f"\nplot: {out}")
    differ = [r for r in rows if r["diff"] is not None]
    print(f"greedy tokens identical: {not differ}")
    if differ:
        where = ", ".join(f"batch {r['batch']} prompt {r['prompt']} (row {r['diff'][0]}, step {r['diff'][1]})"
                          for r in differ)
        if dtype == torch.float32:
            raise SystemExit(f"greedy tokens differ between llmstack and transformers: {where}")
        # In bfloat16 the two implementations round differently, so a near-tie can flip the argmax.
        print(f"note: in {dtype_name} greedy tokens differ at {where}")


if __name__ == "__main__":
    main()
