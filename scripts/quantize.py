"""Quantize a checkpoint's weights (int8 per channel, or int4 group-wise) into a new checkpoint directory.

    python scripts/quantize.py --checkpoint runs/quickstart --scheme int8 --out runs/quickstart-int8
    python scripts/quantize.py --checkpoint runs/quickstart --scheme int4 --group-size 64 --out runs/quickstart-int4
    python scripts/generate.py --checkpoint runs/quickstart-int4 --prompt "def fib(n):"

The output holds the job config and the tokenizer of the source, so generate.py
and eval.py work on it; the scheme is recorded in the safetensors metadata.
"""
import argparse
import shutil
import sys
from pathlib import Path

import yaml

import llmstack
from llmstack.inference.quantize import DEFAULT_SKIP, SCHEMES, quantize_, save_quantized
from llmstack.interop import resolve_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run directory or checkpoint directory")
    parser.add_argument("--scheme", required=True, choices=SCHEMES)
    parser.add_argument("--group-size", type=int, default=64, help="inputs per scale for int4 (default 64)")
    parser.add_argument("--skip", nargs="*", default=list(DEFAULT_SKIP),
                        help=f"Linear modules left in float (default: {' '.join(DEFAULT_SKIP)})")
    parser.add_argument("--out", required=True, help="directory to write")
    args = parser.parse_args()
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        model = llmstack.from_pretrained(ckpt)
        quantize_(model, args.scheme, group_size=args.group_size, skip=tuple(args.skip))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    job = yaml.safe_load((ckpt / "config.yaml").read_text()) if (ckpt / "config.yaml").is_file() else {}
    extra = {k: v for k, v in (job or {}).items() if k != "model"} if "model" in (job or {}) else {}
    save_quantized(model, args.out, extra_config=extra)
    if (ckpt / "tokenizer.json").is_file():
        shutil.copy2(ckpt / "tokenizer.json", Path(args.out) / "tokenizer.json")
    size = sum(p.stat().st_size for p in Path(args.out).glob("*.safetensors"))
    src = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    print(f"{ckpt} -> {args.out}: {args.scheme}" + (f" (group size {args.group_size})" if args.scheme == "int4" else "")
          + f", weights {src / 2**20:.2f} MiB -> {size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
