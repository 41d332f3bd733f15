"""Quantize a checkpoint's weights (int8 per channel, or int4 group-wise) into a new checkpoint directory.

    python scripts/quantize.py --checkpoint runs/quickstart --scheme int8 --out runs/quickstart-int8
    python scripts/quantize.py --checkpoint runs/quickstart --scheme int4 --group-size 64 --out runs/quickstart-int4
    python scripts/generate.py --checkpoint runs/quickstart-int4 --prompt "def fib(n):"

The output holds the job config and the tokenizer of the source, so generate.py
and eval.py work on it; the scheme is recorded in the safetensors metadata.
--out must be a new or empty directory, or an earlier output of this script (it is
replaced); anything else is replaced only with --force, and never the source itself.
"""
import argparse
import re
import shutil
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

import llmstack
from llmstack.inference.quantize import DEFAULT_SKIP, SCHEMES, QuantizedLinear, quantize_, save_quantized
from llmstack.interop import resolve_checkpoint

# What save_quantized and this script write; a quantized checkpoint holding anything else is not replaced.
OUTPUT_FILE = re.compile(r"config\.yaml|tokenizer\.json|model\.safetensors(\.index\.json)?"
                         r"|model-\d{5}-of-\d{5}\.safetensors")


def is_quantized_checkpoint(directory: Path) -> bool:
    """config.yaml and safetensors files whose metadata names a quantization scheme."""
    weights = sorted(directory.glob("*.safetensors"))
    if not (directory / "config.yaml").is_file() or not weights:
        return False
    try:
        return all("quantization" in (safe_open(str(p), "pt").metadata() or {}) for p in weights)
    except Exception:  # not a safetensors file: not ours
        return False


def check_out(out: Path, ckpt: Path, force: bool) -> None:
    """Exit with an error when writing `out` would destroy the source or files the user did not ask to replace."""
    src, dst = ckpt.resolve(), out.resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        where = "is" if dst == src else ("holds" if dst in src.parents else "is inside")
        sys.exit(f"error: --out {out} {where} the source checkpoint {ckpt}; write to another directory")
    if force or not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        sys.exit(f"error: --out {out} exists and is not a directory; pass --force to replace it")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    others = [n for n in names if not OUTPUT_FILE.fullmatch(n)]
    if is_quantized_checkpoint(out) and not others:
        return  # an earlier output of this script: replace it
    shown = ", ".join((others or names)[:5]) + (" ..." if len(others or names) > 5 else "")
    sys.exit(f"error: --out {out} is not empty and is not a quantized llmstack checkpoint (it holds {shown}); "
             f"choose a new or empty directory, or pass --force to replace everything in it")


def check_skip(model: torch.nn.Module, skip: list[str]) -> None:
    """Every --skip name must match a Linear module, by full name or last component (as quantize_ matches)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, QuantizedLinear))]
    short = sorted({name.rsplit(".", 1)[-1] for name in linears})
    unknown = [s for s in skip if s not in linears and s not in short and s not in DEFAULT_SKIP]
    if unknown:
        raise ValueError(f"--skip {' '.join(unknown)}: not a Linear module of this model; allowed: a full name "
                         f"such as {linears[0]}, or a last component: {', '.join(short)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run directory or checkpoint directory")
    parser.add_argument("--scheme", required=True, choices=SCHEMES)
    parser.add_argument("--group-size", type=int, default=64, help="inputs per scale for int4 (default 64)")
    parser.add_argument("--skip", nargs="*", default=list(DEFAULT_SKIP),
                        help=f"Linear modules left in float, by full name or last component "
                             f"(default: {' '.join(DEFAULT_SKIP)}; --skip alone quantizes every one)")
    parser.add_argument("--out", required=True, help="directory to write (new, empty, or an earlier output)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out even when it holds other files (never the source checkpoint)")
    args = parser.parse_args()
    ckpt = resolve_checkpoint(args.checkpoint)
    out = Path(args.out)
    check_out(out, ckpt, args.force)
    try:
        model = llmstack.from_pretrained(ckpt)
        check_skip(model, args.skip)
        quantize_(model, args.scheme, group_size=args.group_size, skip=tuple(args.skip))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    src = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    job = yaml.safe_load((ckpt / "config.yaml").read_text()) if (ckpt / "config.yaml").is_file() else {}
    extra = {k: v for k, v in (job or {}).items() if k != "model"} if "model" in (job or {}) else {}
    if out.exists() and not out.is_dir():  # only with --force (check_out)
        out.unlink()
    save_quantized(model, out, extra_config=extra)
    if (ckpt / "tokenizer.json").is_file():
        shutil.copy2(ckpt / "tokenizer.json", out / "tokenizer.json")
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"{ckpt} -> {out}: {args.scheme}" + (f" (group size {args.group_size})" if args.scheme == "int4" else "")
          + f", weights {src / 2**20:.2f} MiB -> {size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
