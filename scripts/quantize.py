"""Quantize a model's weights (int8 per channel, or int4 group-wise) into a new checkpoint directory.

    python scripts/quantize.py --checkpoint runs/quickstart --scheme int8 --out runs/quickstart-int8
    python scripts/quantize.py --checkpoint runs/quickstart --scheme int4 --out runs/quickstart-int4
    python scripts/quantize.py --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf --scheme int4 --out smollm2-int4
    python scripts/quantize.py --checkpoint path/to/Llama-3.2-1B --scheme int4 --embedding none --out llama-int4
    python scripts/generate.py --checkpoint smollm2-int4 --chat --prompt "What is 2+2?"

--checkpoint is an llmstack run or checkpoint directory, a Hugging Face directory or a GGUF file.
The linear layers take --scheme; the embedding and the output head take --embedding (int8 by
default, `none` keeps them float). int4 uses groups of --group-size inputs (default 32, GGUF
Q4_1's grid). The output holds the model config (with its special token ids), the job config of
an llmstack source and the source's tokenizer in full (for a Hugging Face or GGUF source, its
tokenizer.json and tokenizer_config.json with the chat template), so generate.py and eval.py work
on it; the scheme is recorded in the safetensors metadata.
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
from llmstack.inference.quantize import (DEFAULT_GROUP_SIZE, DEFAULT_SKIP, SCHEMES, QuantizedLinear,
                                         quantization_of, quantize_, save_quantized)
from llmstack.interop import load_tokenizer, resolve_checkpoint
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
    parser.add_argument("--checkpoint", required=True, help="a float run or checkpoint directory, a Hugging Face "
                                                            "directory or a .gguf file")
    parser.add_argument("--scheme", required=True, choices=SCHEMES)
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                        help=f"inputs per scale and offset for int4 (default {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--embedding", choices=["int8", "int4", "none"], default=None,
                        help="scheme of the embedding and the output head, none to keep them float (default int8; "
                             "float with --scheme nf4)")
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
        try:
            tokenizer = load_tokenizer(ckpt)
        except FileNotFoundError:
            tokenizer = None  # weights alone are a valid checkpoint too
        check_skip(model, args.skip)
        embedding = {None: "default", "none": None}.get(args.embedding, args.embedding)
        quantize_(model, args.scheme, group_size=args.group_size, skip=tuple(args.skip), embedding=embedding)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    src = ckpt.stat().st_size if ckpt.is_file() else sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    job = yaml.safe_load((ckpt / "config.yaml").read_text()) if (ckpt / "config.yaml").is_file() else {}
    extra = {k: v for k, v in (job or {}).items() if k != "model"} if "model" in (job or {}) else {}
    if args.force:
        remove(out)  # saving would refuse a directory holding other files
    try:
        save_quantized(model, out, extra_config=extra)
    except FileExistsError as e:
        sys.exit(f"error: {e} (or pass --force)")
    if tokenizer is not None:
        tokenizer.save(out / "tokenizer.json")  # with an HF tokenizer, tokenizer_config.json beside it
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    info = quantization_of(model)
    group = f" (group size {args.group_size})" if "int4" in (info["scheme"], info["embedding"]) else ""
    print(f"{ckpt} -> {out}: {args.scheme}{group}, weights {src / 2**20:.2f} MiB -> {size / 2**20:.2f} MiB "
          f"({size:,} bytes); embedding and head: {info['embedding'] or 'none'}"
          + ("" if tokenizer is not None else "; no tokenizer to copy"))


if __name__ == "__main__":
    main()
