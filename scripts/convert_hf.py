"""Convert between Hugging Face directories and llmstack checkpoints.

    python scripts/convert_hf.py --from-hf path/to/Llama-3.2-1B --out checkpoints/llama-3.2-1b
    python scripts/convert_hf.py --to-hf runs/quickstart --out exported/quickstart-hf
"""
import sys

import llmstack
from llmstack.cli import add_dtype_argument, script_parser
from llmstack.config import ConfigError
from llmstack.interop import save_hf
from llmstack.runtime import DTYPES, set_threads


def main() -> None:
    parser = script_parser(__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="a Hugging Face directory (config.json + safetensors)")
    source.add_argument("--to-hf", metavar="DIR", help="an llmstack checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory")
    add_dtype_argument(parser, auto="the dtype the weights are stored in")
    args = parser.parse_args()
    try:
        set_threads(args.threads)
        model = llmstack.from_pretrained(args.from_hf or args.to_hf, dtype=DTYPES.get(args.dtype))
        if args.from_hf:
            llmstack.save_pretrained(model, args.out)
        else:
            save_hf(model, args.out)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out} ({model.num_params() / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
