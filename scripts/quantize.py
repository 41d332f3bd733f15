"""Quantize a checkpoint's weights (int8 per channel, or int4 group-wise) into a new checkpoint directory.

    python scripts/quantize.py --checkpoint runs/quickstart --scheme int8 --out runs/quickstart-int8
    python scripts/quantize.py --checkpoint runs/quickstart --scheme int4 --group-size 64 --out runs/quickstart-int4
    python scripts/generate.py --checkpoint runs/quickstart-int4 --prompt "def fib(n):"

The output holds the job config and the tokenizer of the source, so generate.py
and eval.py work on it; the scheme is recorded in the safetensors metadata.
--out must be a new or empty directory, or a checkpoint (it is replaced); a directory
holding other files is replaced only with --force, and the source never.
"""
import shutil
import sys
from pathlib import Path

import torch
import yaml

import llmstack
from llmstack.cli import script_parser
from llmstack.config import ConfigError
from llmstack.inference.quantize import DEFAULT_SKIP, SCHEMES, QuantizedLinear, quantize_, save_quantized
from llmstack.interop import resolve_checkpoint
from llmstack.runtime import set_threads


def check_out(out: Path, ckpt: Path) -> None:
    """Refuse an --out that is, holds or lies inside the source checkpoint."""
    src, dst = ckpt.resolve(), out.resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        where = "is" if dst == src else ("holds" if dst in src.parents else "is inside")
        sys.exit(f"error: --out {out} {where} the source checkpoint {ckpt}; write to another directory")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_skip(model: torch.nn.Module, skip: list[str]) -> None:
    """Every --skip name must match a Linear module, by full name or last component (as quantize_ matches)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, QuantizedLinear))]
    short = sorted({name.rsplit(".", 1)[-1] for name in linears})
    unknown = [s for s in skip if s not in linears and s not in short and s not in DEFAULT_SKIP]
    if unknown:
        raise ValueError(f"--skip {' '.join(unknown)}: not a Linear module of this model; allowed: a full name "
                         f"such as {linears[0]}, or a last component: {', '.join(short)}")


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a run directory or checkpoint directory")
    parser.add_argument("--scheme", required=True, choices=SCHEMES)
    parser.add_argument("--group-size", type=int, default=64, help="inputs per scale for int4 (default 64)")
    parser.add_argument("--skip", nargs="*", default=list(DEFAULT_SKIP),
                        help=f"Linear modules left in float, by full name or last component "
                             f"(default: {' '.join(DEFAULT_SKIP)}; --skip alone quantizes every one)")
    parser.add_argument("--out", required=True, help="directory to write (new, empty, or a checkpoint to replace)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out even when it holds other files (never the source checkpoint)")
    args = parser.parse_args()
    try:
        set_threads(args.threads)
        ckpt = resolve_checkpoint(args.checkpoint)
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    out = Path(args.out)
    check_out(out, ckpt)
    try:
        model = llmstack.from_pretrained(ckpt)
        check_skip(model, args.skip)
        quantize_(model, args.scheme, group_size=args.group_size, skip=tuple(args.skip))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    src = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    job = yaml.safe_load((ckpt / "config.yaml").read_text()) if (ckpt / "config.yaml").is_file() else {}
    extra = {k: v for k, v in (job or {}).items() if k != "model"} if "model" in (job or {}) else {}
    if args.force:
        remove(out)  # saving would refuse a directory holding other files
    try:
        save_quantized(model, out, extra_config=extra)
    except FileExistsError as e:
        sys.exit(f"error: {e} (or pass --force)")
    if (ckpt / "tokenizer.json").is_file():
        shutil.copy2(ckpt / "tokenizer.json", out / "tokenizer.json")
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"{ckpt} -> {out}: {args.scheme}" + (f" (group size {args.group_size})" if args.scheme == "int4" else "")
          + f", weights {src / 2**20:.2f} MiB -> {size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
