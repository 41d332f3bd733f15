"""Weight-only quantization of a checkpoint: size, perplexity and decode speed against float, one run.

For float, int8 (per channel) and int4 (group-wise, several group sizes), each
model is saved and loaded back through llmstack.from_pretrained, then measured:
file size on disk, validation perplexity on the same windows for every model
(the change against float in %), and greedy decode tokens/s (batch 1) timed
alternately with the float model, medians.

    python scripts/bench_quantize.py --checkpoint runs/quickstart --group-size 32 64
    python scripts/bench_quantize.py --checkpoint runs/quickstart --quick    # a fast smoke run (explicit flags apply)
"""
import sys
import tempfile
from pathlib import Path

import torch

import llmstack
from benchlib import device_name, quick_defaults, time_pair
from llmstack.cli import add_device_argument, positive_int, script_parser
from llmstack.config import ConfigError
from llmstack.data import DataError, TokenBatches, prepare_tokens
from llmstack.eval import evaluate
from llmstack.inference.quantize import check_group_size, quantization_of, quantize_, save_quantized
from llmstack.interop import load_tokenizer, resolve_checkpoint, save_pretrained
from llmstack.runtime import resolve_device, set_threads
from llmstack.train import load_run_config


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a float run or checkpoint directory")
    parser.add_argument("--group-size", type=positive_int, nargs="+", default=[32, 64, 128],
                        help="int4 group sizes, even (default 32 64 128)")
    parser.add_argument("--batches", type=positive_int, default=None,
                        help="validation batches of 8 windows (default 16)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None, help="greedy tokens decoded (default 128)")
    parser.add_argument("--iters", type=positive_int, default=None, help="timed decodes of each model (default 7)")
    add_device_argument(parser)
    parser.add_argument("--quick", action="store_true",
                        help="2 batches, 16 tokens, 2 iterations (a smoke run); flags given explicitly keep "
                             "their value")
    args = parser.parse_args()
    quick_defaults(args, args.quick, dict(batches=(16, 2), max_new_tokens=(128, 16), iters=(7, 2)))
    if any(g % 2 for g in args.group_size):
        sys.exit(f"error: --group-size must be even numbers, got {' '.join(map(str, args.group_size))}")
    n_batches, new_tokens, iters = args.batches, args.max_new_tokens, args.iters

    try:
        set_threads(args.threads)
        device = resolve_device(args.device)
        ckpt = resolve_checkpoint(args.checkpoint)
        cfg = load_run_config(ckpt)
        float_model = llmstack.from_pretrained(ckpt)
        tok = load_tokenizer(ckpt)
        tokens = prepare_tokens(cfg.data.source, tok, cache_dir=cfg.data.cache_dir,
                                val_fraction=cfg.data.val_fraction, text_field=cfg.data.text_field)["val"]
        batches = TokenBatches(tokens, 8, cfg.data.seq_len, name="val", device=device)
    except (ConfigError, ValueError, FileNotFoundError, DataError) as e:
        sys.exit(f"error: {e}")
    if quantization_of(float_model) is not None:
        sys.exit(f"error: {args.checkpoint} is already quantized ({quantization_of(float_model)['scheme']}); "
                 f"the comparison needs the float checkpoint it was made from")

    in_features = sorted({m.in_features for m in float_model.modules() if isinstance(m, torch.nn.Linear)})
    variants = [("float32", None, None), ("int8", "int8", None)]
    for g in args.group_size:
        try:
            for k in in_features:
                check_group_size(g, k)
            variants.append((f"int4 g={g}", "int4", g))
        except ValueError:
            print(f"skipping int4 g={g}: it does not divide every layer's in_features {in_features}")

    prompt = torch.as_tensor(tokens[:16].astype("int64"))  # the start of the validation split
    print(f"device: {device_name(device)} ({device.type}) | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads | activations float32")
    print(f"checkpoint: {ckpt} ({float_model.num_params() / 1e6:.2f}M parameters) | perplexity over "
          f"{n_batches} x 8 windows of {cfg.data.seq_len} tokens | greedy decode: batch 1, 16-token prompt, "
          f"{new_tokens} new tokens, median of {iters}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for label, scheme, group_size in variants:
            model = llmstack.from_pretrained(ckpt)
            out = Path(tmp) / label.replace(" ", "_").replace("=", "")
            if scheme is None:
                save_pretrained(model, out)
            else:
                save_quantized(quantize_(model, scheme, group_size=group_size or 64), out)
            size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            model = llmstack.from_pretrained(out, device=device)  # measure what a user would load
            ppl = evaluate(model, batches.eval_batches(n_batches))["perplexity"]
            if base is None:
                base = model
                base_ppl = ppl
            got = {}
            t_base, t_model = time_pair(
                lambda: got.__setitem__("base", llmstack.generate(base, prompt, new_tokens, temperature=0)),
                lambda: got.__setitem__("model", llmstack.generate(model, prompt, new_tokens, temperature=0)),
                1, iters, device=device)
            differ = (got["base"][16:] != got["model"][16:]).nonzero()
            same = int(differ[0]) if len(differ) else new_tokens  # greedy tokens before the first difference
            rows.append((label, size, ppl, 100 * (ppl / base_ppl - 1), new_tokens / t_model, new_tokens / t_base,
                         t_base / t_model, same))

    print(f"\n| {'weights':<10} | {'file MiB':>8} | {'val ppl':>8} | {'ppl change':>10} | {'decode tok/s':>12} | "
          f"{'float tok/s':>11} | {'speed vs float':>14} | {'same greedy':>11} |")
    print(f"|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 12}|{'-' * 14}|{'-' * 13}|{'-' * 16}|{'-' * 13}|")
    for label, size, ppl, change, tps, base_tps, ratio, same in rows:
        print(f"| {label:<10} | {size / 2**20:>8.2f} | {ppl:>8.3f} | {change:>+9.2f}% | {tps:>12.1f} | "
              f"{base_tps:>11.1f} | {ratio:>13.2f}x | {same:>4} / {new_tokens:<4} |")
    print("\nsame greedy: new tokens the model decodes exactly as the float model does before the first difference.")


if __name__ == "__main__":
    main()
