"""KV-cache memory of the model presets: what grouped-query attention and sliding windows save.

Per token the cache holds a key and a value vector per layer and KV head:
2 * layers * kv_heads * head_dim * bytes. Multi-head attention (kv_heads = heads)
would hold heads / kv_heads times more. A sliding-window model needs only
`window` tokens (RollingKVCache), however long the context.

    python scripts/kv_memory.py
    python scripts/kv_memory.py --dtype fp32 --batch-size 8 --tokens 8192 32768 131072
"""
import sys

from llmstack.cli import DTYPE_NAMES, positive_int, script_parser
from llmstack.config import ConfigError
from llmstack.model import KVCache, list_presets, model_preset
from llmstack.runtime import DTYPES

PRESETS = ("llama-3-8b", "mistral-7b", "mixtral-8x7b", "llama-3.2-1b", "qwen2.5-0.5b", "gpt2-124m", "quickstart")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def main() -> None:
    parser = script_parser(__doc__, threads=False)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), help=f"from {', '.join(list_presets())}")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16", help="of the cache (default bf16)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="sequences (default 1)")
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[8192, 32768],
                        help="context lengths to size (default 8192 32768)")
    args = parser.parse_args()
    dtype, lengths = DTYPES[args.dtype], args.tokens
    try:
        configs = {name: model_preset(name) for name in args.presets}
    except ConfigError as e:
        sys.exit(f"error: {e}")

    print(f"KV cache, {args.dtype}, batch {args.batch_size}; sizes at the full context and at "
          f"{', '.join(f'{t:,}' for t in lengths)} tokens (a sliding window caps the tokens held)\n")
    cols = ["preset", "layers", "heads/kv", "hd", "bytes/token", "MHA bytes/token", "GQA saving", "context",
            "at context", *[f"at {t // 1024}k" if t % 1024 == 0 else f"at {t}" for t in lengths]]
    rows = []
    for name, cfg in configs.items():
        per_token = KVCache.bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, dtype)
        mha = KVCache.bytes_per_token(cfg.n_layers, cfg.n_heads, cfg.head_dim, dtype)
        held = lambda t: min(t, cfg.sliding_window or t)  # noqa: E731
        context = f"{cfg.max_seq_len:,}" + (f" (window {cfg.sliding_window:,})" if cfg.sliding_window else "")
        rows.append([name, str(cfg.n_layers), f"{cfg.n_heads}/{cfg.n_kv_heads}", str(cfg.head_dim),
                     f"{per_token:,}", f"{mha:,}", f"{mha / per_token:.0f}x", context,
                     human(args.batch_size * per_token * held(cfg.max_seq_len)),
                     *[human(args.batch_size * per_token * held(t)) + ("*" if t > cfg.max_seq_len else "")
                       for t in lengths]])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) + " |")
    print("\n* past the model's context: what running it that far would need (see scripts/long_context.py)")


if __name__ == "__main__":
    main()
