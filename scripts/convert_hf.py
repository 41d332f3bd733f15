"""Convert between Hugging Face directories, GGUF files and llmstack checkpoints.

    python scripts/convert_hf.py --from-hf path/to/Llama-3.2-1B --out checkpoints/llama-3.2-1b
    python scripts/convert_hf.py --from-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out checkpoints/smollm2
    python scripts/convert_hf.py --to-hf runs/quickstart --out exported/quickstart-hf
    python scripts/convert_hf.py --to-hf SmolLM2-135M-Instruct.Q4_1.gguf --out exported/smollm2-hf

The tokenizer and the special tokens travel with the weights. To llmstack: the model config keeps
bos_token_id and eos_token_ids (end-of-turn tokens included), and the tokenizer is saved as
`llmstack.load_tokenizer` reads it (a Hugging Face tokenizer.json with its tokenizer_config.json:
special tokens, chat template). To Hugging Face: config.json and generation_config.json carry
bos_token_id and eos_token_id, and tokenizer.json + tokenizer_config.json are written in the
Hugging Face format (llmstack's own BPE converted to the same ids), so transformers' AutoTokenizer,
apply_chat_template and generate work on the output. GGUF weights are dequantized (float32 unless
--dtype says otherwise).
"""
import sys

import llmstack
from llmstack.cli import add_dtype_argument, script_parser
from llmstack.config import ConfigError
from llmstack.interop import load_tokenizer, save_hf
from llmstack.runtime import DTYPES, set_threads


def main() -> None:
    parser = script_parser(__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="a Hugging Face directory (config.json + safetensors), "
                                                         "to an llmstack checkpoint")
    source.add_argument("--from-gguf", metavar="FILE", help="a .gguf file, to an llmstack checkpoint")
    source.add_argument("--to-hf", metavar="PATH", help="an llmstack checkpoint or run directory, or a .gguf file, "
                                                        "to a Hugging Face directory")
    parser.add_argument("--out", required=True, help="output directory")
    add_dtype_argument(parser, auto="the dtype the weights are stored in; float32 for GGUF")
    args = parser.parse_args()
    src = args.from_hf or args.from_gguf or args.to_hf
    if args.from_gguf and not args.from_gguf.endswith(".gguf"):
        parser.error(f"--from-gguf {args.from_gguf}: not a .gguf file")
    try:
        set_threads(args.threads)
        model = llmstack.from_pretrained(src, dtype=DTYPES.get(args.dtype))
        try:
            tokenizer = load_tokenizer(src)
        except FileNotFoundError as e:  # weights alone are a valid checkpoint too
            tokenizer = None
            print(f"note: no tokenizer to carry over ({e})", file=sys.stderr)
        if args.to_hf:
            save_hf(model, args.out, tokenizer)
        else:
            llmstack.save_pretrained(model, args.out)
            if tokenizer is not None:
                tokenizer.save(f"{args.out}/tokenizer.json")
    except (ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    cfg = model.config
    print(f"wrote {args.out} ({model.num_params() / 1e6:.1f}M parameters; bos {cfg.bos_token_id}, eos "
          f"{cfg.eos_token_ids}; tokenizer: "
          + ("none" if tokenizer is None else f"{tokenizer.vocab_size} ids, "
             + ("chat template" if tokenizer.chat_template else "no chat template")) + ")")


if __name__ == "__main__":
    main()
