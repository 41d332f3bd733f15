"""Benchmark our Triton FlashAttention against torch's SDPA backends and a naive reference.

    python scripts/bench_attention.py                    # full sweep on a GPU (bf16)
    python scripts/bench_attention.py --seqlens 4096 --head-dims 128 --no-gqa
    python scripts/bench_attention.py --quick            # tiny fp32 run; on a CPU via Triton's interpreter
    python scripts/bench_attention.py --json out.json --csv out.csv

Throughput is counted as FlashAttention's own benchmark counts it: forward
FLOPs = 4 * batch * seqlen^2 * q_heads * head_dim (halved when causal), backward
= 2.5x forward, forward+backward = 3.5x. Each row ends with ours / best SDPA
backend. The decode section reports achieved memory bandwidth (bytes of K and V
read per second) against this device's copy bandwidth.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import csv  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from benchlib import copy_bandwidth_gbs, device_name, quick_defaults  # noqa: E402
from llmstack.cli import add_dtype_argument, script_parser  # noqa: E402
from llmstack.runtime import DTYPES  # noqa: E402

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = sdpa_kernel = None

try:
    from llmstack.kernels.flash_attention import flash_attention, is_available
    from llmstack.kernels.flash_decode import flash_decode
except Exception as exc:  # triton missing: still benchmark the SDPA backends
    flash_attention = flash_decode = None
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _TRITON_ERROR = None if is_available() else "no CUDA device and TRITON_INTERPRET is not 1"

CUDA = torch.cuda.is_available()
SDPA_BACKENDS = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
NAIVE_MAX_SCORE_BYTES = 8 << 30  # naive and MATH materialise (B, H, S, S) scores; skip beyond this


# ---------------------------------------------------------------------------
# Providers: each returns fn(q, k, v, causal) -> out, or raises when unsupported
# ---------------------------------------------------------------------------


def naive(q, k, v, causal):
    """softmax(Q K^T / sqrt(d)) V spelled out, scores in fp32."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    if causal:
        S = q.shape[2]
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(scores, -1).to(q.dtype) @ v


def sdpa_with(backend_name):
    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])

    return run


def providers():
    out = {}
    if flash_attention is not None and _TRITON_ERROR is None:
        out["ours"] = lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)
    if sdpa_kernel is not None:
        for name in SDPA_BACKENDS:
            if hasattr(SDPBackend, name):
                out["sdpa_" + name.split("_")[0].lower()] = sdpa_with(name)
    out["naive"] = naive
    return out


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def bench_ms(fn, args) -> float:
    """Median milliseconds per call: CUDA events via triton.testing.do_bench on a GPU."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
    fn()  # warm-up (compiles / traces)
    times = []
    for _ in range(args.cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def attention_flops(batch, heads, seqlen, head_dim, causal, mode):
    fwd = 4 * batch * seqlen**2 * heads * head_dim / (2 if causal else 1)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def time_provider(fn, q, k, v, causal, mode, args):
    """Milliseconds for one mode, or an error string when the backend refuses these inputs."""
    try:
        if mode == "fwd":
            with torch.no_grad():
                fn(q, k, v, causal)  # fails fast when unsupported
                return bench_ms(lambda: fn(q, k, v, causal), args)
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        out = fn(qg, kg, vg, causal)
        dout = torch.randn_like(out)
        if mode == "bwd":
            def step():
                qg.grad = kg.grad = vg.grad = None
                out.backward(dout, retain_graph=True)
        else:
            def step():
                qg.grad = kg.grad = vg.grad = None
                fn(qg, kg, vg, causal).backward(dout)
        return bench_ms(step, args)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        return f"n/a ({str(exc).splitlines()[0][:60]})"
    finally:
        if CUDA:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------


def training_sweep(args, device, dtype):
    provs = providers()
    rows = []
    for head_dim in args.head_dims:
        heads = max(1, args.model_dim // head_dim)  # FlashAttention's benchmark: dim 2048 split into heads
        for gqa in ([False, True] if args.gqa else [False]):
            kv_heads = max(1, heads // args.gqa_ratio) if gqa else heads
            for seqlen in args.seqlens:
                batch = max(1, args.tokens // seqlen)
                for causal in args.causal:
                    q = torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=dtype)
                    k = torch.randn(batch, kv_heads, seqlen, head_dim, device=device, dtype=dtype)
                    v = torch.randn_like(k)
                    score_bytes = batch * heads * seqlen * seqlen * 4
                    for mode in args.modes:
                        row = dict(seqlen=seqlen, head_dim=head_dim, batch=batch, heads=f"{heads}/{kv_heads}",
                                   causal=causal, mode=mode)
                        flops = attention_flops(batch, heads, seqlen, head_dim, causal, mode)
                        for name, fn in provs.items():
                            if name in ("naive", "sdpa_math") and score_bytes > NAIVE_MAX_SCORE_BYTES:
                                row[name] = "skip (memory)"
                                continue
                            ms = time_provider(fn, q, k, v, causal, mode, args)
                            row[name] = ms if isinstance(ms, str) else flops / (ms * 1e-3) / 1e12
                        fused = [row[n] for n in row if n.startswith("sdpa_") and isinstance(row[n], float)]
                        ours = row.get("ours")
                        row["ours/best_sdpa"] = ours / max(fused) if isinstance(ours, float) and fused else None
                        rows.append(row)
                        print_row(row, provs)
    return rows


def decode_sweep(args, device, dtype, copy_gbs):
    rows = []
    if flash_decode is None or _TRITON_ERROR is not None:
        return rows
    heads, kv_heads, head_dim = args.decode_heads, args.decode_kv_heads, args.decode_head_dim
    esize = torch.empty((), dtype=dtype).element_size()
    for batch in args.decode_batches:
        for kv_len in args.decode_kv_lens:
            q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
            k = torch.randn(batch, kv_heads, kv_len, head_dim, device=device, dtype=dtype)
            v = torch.randn_like(k)
            kv_bytes = 2 * batch * kv_heads * kv_len * head_dim * esize
            row = dict(batch=batch, kv_len=kv_len, heads=f"{heads}/{kv_heads}", head_dim=head_dim)
            with torch.no_grad():
                ms = bench_ms(lambda: flash_decode(q, k, v), args)
                row["ours_us"] = 1e3 * ms
                row["ours_GB/s"] = kv_bytes / (ms * 1e-3) / 1e9
                row["of_copy_bw"] = row["ours_GB/s"] / copy_gbs
                best = None
                for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
                    if sdpa_kernel is None or not hasattr(SDPBackend, name):
                        continue
                    res = time_provider(sdpa_with(name), q, k, v, False, "fwd", args)
                    if isinstance(res, float):
                        best = res if best is None else min(best, res)
                row["best_sdpa_GB/s"] = kv_bytes / (best * 1e-3) / 1e9 if best else None
            rows.append(row)
            print("  " + "  ".join(f"{key}={fmt(val)}" for key, val in row.items()))
    return rows


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def fmt(x):
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return "-" if x is None else str(x)


_HEADER_PRINTED = []


def print_row(row, provs):
    cols = ["seqlen", "head_dim", "batch", "heads", "causal", "mode", *provs, "ours/best_sdpa"]
    if not _HEADER_PRINTED:
        print("TFLOP/s (higher is better); heads = q_heads/kv_heads")
        print(" | ".join(f"{c:>14}" for c in cols))
        _HEADER_PRINTED.append(True)
    cells = []
    for c in cols:
        val = row.get(c)
        text = "n/a" if isinstance(val, str) and val.startswith("n/a") else fmt(val)
        cells.append(f"{text:>14}")
    print(" | ".join(cells))


def main():
    p = script_parser(__doc__.splitlines()[0], threads=False)
    p.add_argument("--quick", action="store_true",
                   help="tiny fp32 sizes, the mode used on a CPU; flags given explicitly keep their value")
    add_dtype_argument(p, auto="bf16 on a GPU, fp32 with --quick")
    p.add_argument("--seqlens", type=int, nargs="+", default=None, help="(default 512 1024 2048 4096 8192 16384)")
    p.add_argument("--head-dims", type=int, nargs="+", default=None, help="(default 64 128)")
    p.add_argument("--causal", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="+", default=[False, True])
    p.add_argument("--modes", nargs="+", choices=["fwd", "bwd", "fwd_bwd"], default=["fwd", "bwd", "fwd_bwd"])
    p.add_argument("--model-dim", type=int, default=None, help="q_heads = model_dim // head_dim (default 2048)")
    p.add_argument("--tokens", type=int, default=None, help="batch = tokens // seqlen (default 16384)")
    p.add_argument("--gqa-ratio", type=int, default=4, help="q_heads per kv_head in the GQA rows")
    p.add_argument("--no-gqa", dest="gqa", action="store_false", help="MHA rows only")
    p.add_argument("--no-decode", dest="decode", action="store_false")
    p.add_argument("--decode-batches", type=int, nargs="+", default=None, help="(default 1 8 32)")
    p.add_argument("--decode-kv-lens", type=int, nargs="+", default=None, help="(default 4096 16384 65536)")
    p.add_argument("--decode-heads", type=int, default=None, help="(default 32)")
    p.add_argument("--decode-kv-heads", type=int, default=None, help="(default 8)")
    p.add_argument("--decode-head-dim", type=int, default=None, help="(default 128)")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--cpu-reps", type=int, default=None, help="(default 3; 1 without CUDA)")
    p.add_argument("--csv", help="write the training sweep rows to this CSV file")
    p.add_argument("--json", help="write everything (device, date, rows) to this JSON file")
    args = p.parse_args()

    if not CUDA and not args.quick:
        print("note: no CUDA device; running the --quick sizes (timings mean nothing here)")
    quick_defaults(args, args.quick or not CUDA, dict(
        seqlens=([512, 1024, 2048, 4096, 8192, 16384], [64, 128]), head_dims=([64, 128], [32]),
        model_dim=(2048, 64), tokens=(16384, 128), decode_batches=([1, 8, 32], [1, 2]),
        decode_kv_lens=([4096, 16384, 65536], [256]), decode_heads=(32, 4), decode_kv_heads=(8, 2),
        decode_head_dim=(128, 32), cpu_reps=(3, 3 if CUDA else 1)))
    dtype = DTYPES[args.dtype if args.dtype != "auto" else ("bf16" if CUDA and not args.quick else "fp32")]
    if not CUDA and dtype == torch.bfloat16:
        raise SystemExit("bf16 is wrong under the Triton interpreter; use --dtype fp32 on a CPU")
    device = "cuda" if CUDA else "cpu"

    name = device_name(device)
    when = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"device: {name}   date: {when}   torch {torch.__version__}   dtype: {str(dtype).split('.')[-1]}")
    if _TRITON_ERROR:
        print(f"note: our Triton kernel is skipped: {_TRITON_ERROR}")
    elif not CUDA:
        print("note: ours runs under TRITON_INTERPRET=1 (numpy, one program at a time): "
              "this checks that the script works, not performance")

    rows = training_sweep(args, device, dtype)
    decode_rows, copy_gbs = [], None
    if args.decode:
        copy_gbs = copy_bandwidth_gbs(device)
        print(f"\ndecode (q_len 1, split-KV): K+V bytes read per second; device copy bandwidth {copy_gbs:.1f} GB/s")
        decode_rows = decode_sweep(args, device, dtype, copy_gbs)

    if args.csv:
        keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, date=when, torch=torch.__version__, dtype=str(dtype), unit="TFLOP/s",
                           rows=rows, decode=decode_rows, copy_GBs=copy_gbs), f, indent=1)


if __name__ == "__main__":
    main()
