"""Serving throughput and latency: llmstack's continuous-batching engine beside static batching
(transformers' generate, and llmstack's own generate) on the same weights, in the same run.

A fixed-seed workload of requests with mixed prompt and output lengths arrives all at once, or at
a Poisson rate. Its lengths are drawn uniformly (--lengths uniform, the default: prompts 16-256
tokens, outputs 16-128) or from heavy-tailed log-normals modeled on ShareGPT's (--lengths sharegpt:
many short answers, a few long ones, as chat traffic has; see SHAREGPT below). Static batching
takes up to --static-batch requests that have arrived, runs them to the longest one's end, then
takes the next ones; the engine admits requests at every step.
Reported per system, for each arrival pattern:

    tok/s       generated tokens (each request's own) per second, from the first arrival to the last token
    TTFT        time to first token, from the request's arrival: p50 and p99
    ITL         inter-token latency between one request's consecutive tokens: p50 and p99
    same        requests whose greedy tokens equal the engine's

then the engine's KV waste (allocated but unfilled slots of the running sequences, the mean
and the worst over its steps) and the prefix cache's gain: the time to first token of requests
sharing a --system-len-token system prompt, with prefix caching and without (one request at a time).

    python scripts/bench_serve.py --quick                        # 64 requests, a fast smoke run
    python scripts/bench_serve.py                                # 256 requests
    python scripts/bench_serve.py --checkpoint runs/quickstart --quick
    python scripts/bench_serve.py --quick --repeats 3             # medians of 3 rounds (a shared machine)
    python scripts/bench_serve.py --lengths sharegpt              # ShareGPT-like heavy-tailed lengths

Model: a random ~12M-parameter Llama (benchlib's), or --checkpoint. Greedy, no stop token, so
every system produces exactly the requested lengths. Float32 on the CPU.
"""
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

import llmstack
from benchlib import device_name, hf_twin, quick_defaults, random_llama
from llmstack.cli import add_device_argument, positive_int, script_parser
from llmstack.inference.generate import stream_generate
from llmstack.runtime import resolve_device, set_threads
from llmstack.serve import Engine


@dataclass
class Trace:
    """One request's timeline, in seconds since the run began."""

    arrival: float
    times: list = field(default_factory=list)
    tokens: list = field(default_factory=list)


def make_workload(n: int, vocab: int, context: int, prompt_range, output_range, seed: int):
    rng = random.Random(seed)
    work = []
    for _ in range(n):
        p = rng.randint(*prompt_range)
        o = min(rng.randint(*output_range), context - p)
        work.append(([rng.randrange(vocab) for _ in range(p)], o))
    return work


# ShareGPT's lengths as vLLM's paper measured them (Kwon et al., "Efficient Memory Management for
# Large Language Model Serving with PagedAttention", SOSP 2023, section 6.1 and Figure 11): prompts of
# 161.31 tokens and outputs of 337.99 tokens on average (LLaMA's tokenizer), for models of a
# 2,048-token context. The paper gives the means and histograms, both skewed right with long tails,
# but no spread: sigma 1.0 (the log of each length has a standard deviation of 1) is our reading of
# those histograms, fixed before any measurement, which puts each median at 0.61x its mean and
# about 1 length in 20 above 2.3x the mean. Lengths scale with the model's context (context / 2048;
# --quick halves them again, as it halves the uniform ranges); prompts are clipped to half the
# context (vLLM's benchmark_serving drops ShareGPT prompts over 1,024 of 2,048 tokens), outputs to
# what the context leaves, and both to at least 4 tokens (that benchmark drops shorter ones).
SHAREGPT = dict(prompt_mean=161.31, output_mean=337.99, sigma=1.0, context=2048, min_len=4)


def lognormal_length(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    """A log-normal draw of the given mean (mu = ln(mean) - sigma^2 / 2), rounded and clipped to [lo, hi]."""
    mu = math.log(mean) - sigma * sigma / 2
    return max(lo, min(hi, round(rng.lognormvariate(mu, sigma))))


def make_sharegpt_workload(n: int, vocab: int, context: int, seed: int, scale: float = 1.0):
    """`n` requests whose prompt and output lengths follow SHAREGPT at `context / 2048 * scale`."""
    rng = random.Random(seed)
    k = context / SHAREGPT["context"] * scale
    sigma, lo = SHAREGPT["sigma"], SHAREGPT["min_len"]
    work = []
    for _ in range(n):
        p = lognormal_length(rng, SHAREGPT["prompt_mean"] * k, sigma, lo, context // 2)
        o = lognormal_length(rng, SHAREGPT["output_mean"] * k, sigma, lo, context - p)
        work.append(([rng.randrange(vocab) for _ in range(p)], o))
    return work


def describe_lengths(values: list[int]) -> str:
    values = sorted(values)
    return (f"mean {statistics.mean(values):.0f}, p50 {percentile(values, 50):.0f}, p90 {percentile(values, 90):.0f}, "
            f"max {values[-1]}")


def make_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """All at time 0 (rate 0), or a Poisson process of `rate` requests per second."""
    if rate <= 0:
        return [0.0] * n
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def wait_until(t0: float, t: float) -> None:
    delay = t0 + t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def run_engine(model, work, arrivals, engine_kwargs) -> tuple[list[Trace], list[float], Engine]:
    engine = Engine(model, **engine_kwargs)
    traces = [Trace(a) for a in arrivals]
    by_id, wastes, nxt = {}, [], 0
    t0 = time.perf_counter()
    while nxt < len(work) or engine.has_work():
        now = time.perf_counter() - t0
        while nxt < len(work) and arrivals[nxt] <= now:
            prompt, n = work[nxt]
            req = engine.add_request(prompt, max_tokens=n, temperature=0, stop_tokens=())
            by_id[req.id] = traces[nxt]
            nxt += 1
        if not engine.has_work():
            wait_until(t0, arrivals[nxt])
            continue
        outputs = engine.step()
        wastes.append(engine.kv_waste())
        now = time.perf_counter() - t0
        for out in outputs:
            trace = by_id[out.request.id]
            trace.times.append(now)
            trace.tokens.append(out.token)
    return traces, wastes, engine


def run_static(generate_batch, work, arrivals, batch_size: int) -> list[Trace]:
    """Static batching: whatever has arrived (up to batch_size) runs to its longest request's end."""
    traces = [Trace(a) for a in arrivals]
    i = 0
    t0 = time.perf_counter()
    while i < len(work):
        wait_until(t0, arrivals[i])
        now = time.perf_counter() - t0
        j = i + 1
        while j < len(work) and j - i < batch_size and arrivals[j] <= now:
            j += 1
        batch = work[i:j]
        start = time.perf_counter()
        tokens, times = generate_batch([p for p, _ in batch], max(n for _, n in batch))  # (B, N), N seconds
        offset = start - t0
        for k, (_, n) in enumerate(batch):
            traces[i + k].tokens = tokens[k][:n]
            traces[i + k].times = [offset + t for t in times[:n]]
        i = j
    return traces


def llmstack_static(model):
    def run(prompts, n):
        rows, times = [], []
        t0 = time.perf_counter()
        for step in stream_generate(model, prompts, n, temperature=0, stop_tokens=()):
            rows.append(step.tolist())
            times.append(time.perf_counter() - t0)
        return [list(r) for r in zip(*rows)], times
    return run


def hf_static(hf):
    from transformers.generation.streamers import BaseStreamer

    class StepTimes(BaseStreamer):
        def __init__(self):
            self.t0, self.times, self.seen_prompt = time.perf_counter(), [], False

        def put(self, value):
            if self.seen_prompt:
                self.times.append(time.perf_counter() - self.t0)
            self.seen_prompt = True

        def end(self):
            pass

    def run(prompts, n):
        T = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])  # left-padded
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        streamer = StepTimes()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0, streamer=streamer)
        return out[:, T:].tolist(), streamer.times
    return run


def percentile(values, q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summarize(name: str, traces: list[Trace], reference: list[Trace]) -> dict:
    tokens = sum(len(t.tokens) for t in traces)
    end = max(t.times[-1] for t in traces if t.times)
    ttft = [t.times[0] - t.arrival for t in traces if t.times]
    itl = [b - a for t in traces for a, b in zip(t.times, t.times[1:])]
    same = sum(list(t.tokens) == list(r.tokens) for t, r in zip(traces, reference))
    return dict(name=name, tps=tokens / (end - min(t.arrival for t in traces)), ttft50=percentile(ttft, 50),
                ttft99=percentile(ttft, 99), itl50=percentile(itl, 50), itl99=percentile(itl, 99),
                same=f"{same}/{len(traces)}")


def median_row(rows: list[dict]) -> dict:
    """Each figure's median over rounds; `same` from the first round's line, and the worst of them."""
    out = dict(rows[0])
    for key in ("tps", "ttft50", "ttft99", "itl50", "itl99"):
        out[key] = statistics.median(r[key] for r in rows)
    out["same"] = min((r["same"] for r in rows), key=lambda s: int(s.split("/")[0]))
    return out


def print_table(title: str, rows: list[dict]) -> None:
    base = rows[-1]["tps"]
    print(f"\n{title}")
    head = (f"| {'system':<28} | {'tok/s':>8} | {'vs hf':>6} | {'TTFT p50 ms':>11} | {'p99':>8} "
            f"| {'ITL p50 ms':>10} | {'p99':>7} | {'same':>7} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['name']:<28} | {r['tps']:>8.1f} | {r['tps'] / base:>5.2f}x | {r['ttft50'] * 1e3:>11.1f} "
              f"| {r['ttft99'] * 1e3:>8.1f} | {r['itl50'] * 1e3:>10.2f} | {r['itl99'] * 1e3:>7.2f} | {r['same']:>7} |")


def prefix_cache_gain(model, system_len: int, requests: int, block_size: int, seed: int) -> tuple[float, float, float]:
    """Median TTFT of requests sharing a system prompt, one at a time: with prefix caching, without."""
    rng = random.Random(seed + 2)
    vocab = model.config.vocab_size
    system = [rng.randrange(vocab) for _ in range(system_len)]
    prompts = [system + [rng.randrange(vocab) for _ in range(rng.randint(8, 32))] for _ in range(requests + 1)]
    medians = []
    hit = 0.0
    for caching in (True, False):
        engine = Engine(model, block_size=block_size, prefix_caching=caching, max_batch_tokens=max(1024, system_len + 64))
        ttfts = []
        for i, p in enumerate(prompts):
            t = time.perf_counter()
            engine.generate([p], max_tokens=1, temperature=0, stop_tokens=())
            if i:  # the first request only fills the cache
                ttfts.append(time.perf_counter() - t)
        medians.append(statistics.median(ttfts))
        if caching:
            hit = engine.pool.hit_rate
    return medians[0], medians[1], hit


def parse_args(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", default=None, help="a model to load (default: benchlib's random Llama)")
    parser.add_argument("--quick", action="store_true", help="64 requests, shorter lengths")
    parser.add_argument("--requests", type=positive_int, default=None)
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: a rate "
                        "near the engine's own throughput; 0 skips the Poisson run)")
    parser.add_argument("--static-batch", type=positive_int, default=32, help="static batching's batch size")
    parser.add_argument("--block-size", type=positive_int, default=16)
    parser.add_argument("--max-running", type=positive_int, default=64)
    parser.add_argument("--max-batch-tokens", type=positive_int, default=512)
    parser.add_argument("--system-len", type=positive_int, default=512, help="the shared system prompt's tokens")
    parser.add_argument("--lengths", choices=("uniform", "sharegpt"), default="uniform",
                        help="prompt and output lengths: uniform ranges, or ShareGPT-like log-normals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="rounds of the three systems per arrival pattern; medians are reported")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    quick_defaults(args, args.quick, {"requests": (256, 64)})
    return args


def main() -> None:
    args = parse_args()
    threads = set_threads(args.threads)
    device = resolve_device(args.device)
    if args.checkpoint:
        model = llmstack.from_pretrained(args.checkpoint, device=device, dtype=torch.float32)
        desc = args.checkpoint
    else:
        model = random_llama(max_seq_len=1024).to(device)
        desc = "random Llama (benchlib.BENCH_LLAMA)"
    model.eval()
    hf = hf_twin(model, device=device)
    cfg = model.config
    context = cfg.max_seq_len
    prompt_range = (8, min(128, context // 2)) if args.quick else (16, min(256, context // 2))
    output_range = (8, min(64, context // 4)) if args.quick else (16, min(128, context // 4))
    if args.lengths == "sharegpt":
        scale = 0.5 if args.quick else 1.0
        work = make_sharegpt_workload(args.requests, cfg.vocab_size, context, args.seed, scale)
        k = context / SHAREGPT["context"] * scale
        lengths = (f"ShareGPT-like log-normal lengths (means {SHAREGPT['prompt_mean'] * k:.0f} and "
                   f"{SHAREGPT['output_mean'] * k:.0f} before clipping, sigma {SHAREGPT['sigma']}): prompts "
                   f"{describe_lengths([len(p) for p, _ in work])}; outputs {describe_lengths([o for _, o in work])}")
    else:
        work = make_workload(args.requests, cfg.vocab_size, context, prompt_range, output_range, args.seed)
        lengths = (f"prompts {prompt_range[0]}-{prompt_range[1]} tokens, outputs {output_range[0]}-{output_range[1]} "
                   "tokens")
    engine_kwargs = dict(block_size=args.block_size, max_running=args.max_running,
                         max_batch_tokens=args.max_batch_tokens)
    import transformers
    print(f"device: {device_name(device)} | threads: {threads} | torch {torch.__version__} | "
          f"transformers {transformers.__version__}")
    print(f"model: {desc}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, context {context}")
    print(f"workload: {len(work)} requests, {lengths} (seed {args.seed}), greedy; engine: block {args.block_size}, "
          f"max running {args.max_running}, {args.max_batch_tokens} tokens per step; static batch {args.static_batch}")
    run_engine(model, work[:4], [0.0] * 4, engine_kwargs)  # warm up every path once
    llmstack_static(model)([p for p, _ in work[:2]], 2)
    hf_static(hf)([p for p, _ in work[:2]], 2)

    patterns = [("all at once", 0.0)]
    ours, wastes, engine = run_engine(model, work, make_arrivals(len(work), 0, args.seed), engine_kwargs)
    rate = args.rate
    if rate is None:  # about 80% of what the engine sustains: a loaded but stable server
        rate = 0.8 * len(work) / max(t.times[-1] for t in ours)
    if rate > 0:
        patterns.append((f"Poisson, {rate:.1f} requests/s", rate))
    all_wastes = []
    for label, r in patterns:
        arrivals = make_arrivals(len(work), r, args.seed)
        rounds = []
        for i in range(args.repeats):  # the three systems one after another, each round: drift hits all
            if r == 0 and i == 0:
                engine_traces = ours
            else:
                engine_traces, wastes, engine = run_engine(model, work, arrivals, engine_kwargs)
            all_wastes += wastes
            print(f"  round {i + 1}, {label}: engine {engine.stats.steps} steps, {engine.stats.preemptions} "
                  "preemptions", file=sys.stderr, flush=True)
            static_ours = run_static(llmstack_static(model), work, arrivals, args.static_batch)
            static_hf = run_static(hf_static(hf), work, arrivals, args.static_batch)
            rounds.append([summarize("llmstack engine (continuous)", engine_traces, engine_traces),
                           summarize(f"llmstack generate (static {args.static_batch})", static_ours, engine_traces),
                           summarize(f"transformers (static {args.static_batch})", static_hf, engine_traces)])
        print_table(f"arrivals: {label}" + (f" (medians of {args.repeats} rounds)" if args.repeats > 1 else ""),
                    [median_row([rnd[k] for rnd in rounds]) for k in range(3)])

    print(f"\nKV waste (allocated, unfilled slots of running sequences, block {args.block_size}): "
          f"mean {statistics.mean(all_wastes) * 100:.1f}%, worst step {max(all_wastes) * 100:.1f}%")
    if args.system_len + 40 < context:
        with_cache, without, hit = prefix_cache_gain(model, args.system_len, 4 if args.quick else 16,
                                                     args.block_size, args.seed)
        print(f"prefix cache: {args.system_len}-token shared system prompt, TTFT median {with_cache * 1e3:.1f} ms "
              f"with vs {without * 1e3:.1f} ms without: {without / with_cache:.1f}x faster (hit rate {hit:.2f})")
    else:
        print(f"prefix cache: skipped (a {args.system_len}-token system prompt does not fit the context {context}; "
              f"set --system-len)")


if __name__ == "__main__":
    main()
