"""Weight-only quantization of a checkpoint: size, perplexity, decode and prefill speed against float, one run.

For float, int8 (per channel) and int4 (group-wise, one or more group sizes), each
model is saved and loaded back through llmstack.from_pretrained, then measured:
file size on disk, perplexity on the same windows for every model (the change
against float in %), greedy decode tokens/s (batch 1) and the time of a prefill of
one window, each timed alternately with the float model, medians. The embedding and
output head take --embedding (int8 by default, as quantize.py does), whatever the
layers' scheme.

    python scripts/bench_quantize.py --checkpoint runs/quickstart --group-size 32 64
    python scripts/bench_quantize.py --checkpoint runs/quickstart --quick    # a fast smoke run (explicit flags apply)
    python scripts/bench_quantize.py --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf --text notes.txt --seq-len 512

The perplexity windows come from the run's validation split (data.seq_len tokens each), or with
--text from the files given (as scripts/eval.py --text reads them), which a Hugging Face directory
or a GGUF file, having no run config, needs.
"""
import sys
import tempfile
from pathlib import Path

import torch

import llmstack
from benchlib import device_name, quick_defaults, time_pair
from llmstack.cli import add_device_argument, positive_int, script_parser
from llmstack.config import ConfigError
from llmstack.data import DataError, TokenBatches, prepare_tokens, saved_data_config, text_tokens
from llmstack.eval import evaluate
from llmstack.inference.quantize import (DEFAULT_GROUP_SIZE, SCHEMES, check_group_size, quantization_of, quantize_,
                                         save_quantized)
from llmstack.interop import load_tokenizer, resolve_checkpoint, save_pretrained
from llmstack.runtime import resolve_device, set_threads

MAX_DEFAULT_SEQ_LEN = 1024


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="a float run or checkpoint directory, a Hugging Face directory or a .gguf file")
    parser.add_argument("--group-size", type=positive_int, nargs="+", default=[DEFAULT_GROUP_SIZE],
                        help=f"int4 group sizes, even (default {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--embedding", choices=[*SCHEMES, "none"], default="int8",
                        help="scheme of the embedding and output head of the quantized models, none to keep them "
                             "float (default int8)")
    parser.add_argument("--text", nargs="+", metavar="PATH",
                        help="perplexity on these files (paths or globs) instead of the run's validation split")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help=f"tokens per perplexity window (default: the run's data.seq_len, else the model's "
                             f"max_seq_len up to {MAX_DEFAULT_SEQ_LEN})")
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
        data = saved_data_config(ckpt)
        if data is None and not args.text:
            raise ConfigError(f"{args.checkpoint} has no llmstack run config naming a validation split; give --text "
                              "PATH for the perplexity windows")
        float_model = llmstack.from_pretrained(ckpt)
        tok = load_tokenizer(ckpt)
        if args.text:
            tokens, _ = text_tokens(args.text, tok)
            seq_len = args.seq_len or (data.seq_len if data else min(float_model.config.max_seq_len,
                                                                      MAX_DEFAULT_SEQ_LEN))
            windows_of = " ".join(args.text)
        else:
            tokens = prepare_tokens(data.source, tok, cache_dir=data.cache_dir, val_fraction=data.val_fraction,
                                    text_field=data.text_field)["val"]
            seq_len, windows_of = args.seq_len or data.seq_len, f"{data.source} [val]"
        if len(tokens) < max(seq_len + 1, 16):
            raise DataError(f"{windows_of} is {len(tokens)} tokens, shorter than one window of {seq_len} (a window "
                            f"needs {seq_len + 1}); give more text or a smaller --seq-len")
        batches = TokenBatches(tokens, 8, seq_len, name="val", device=device)
    except (ConfigError, ValueError, FileNotFoundError, DataError) as e:
        sys.exit(f"error: {e}")
    if quantization_of(float_model) is not None:
        sys.exit(f"error: {args.checkpoint} is already quantized ({quantization_of(float_model)['scheme']}); "
                 f"the comparison needs the float checkpoint it was made from")

    embedding = None if args.embedding == "none" else args.embedding
    layer_inputs = sorted({m.in_features for m in float_model.modules() if isinstance(m, torch.nn.Linear)})
    variants = [("float32", None, None)]  # (label, scheme of the linear layers, int4 group size)
    for scheme, groups in (("int8", [DEFAULT_GROUP_SIZE]), ("int4", args.group_size)):
        for g in groups:
            # int4 matrices need group sizes that divide their inputs: the layers', the embedding's (dim)
            inputs = ((layer_inputs if scheme == "int4" else [])
                      + ([float_model.config.dim] if embedding == "int4" else []))
            try:
                for k in inputs:
                    check_group_size(g, k)
            except ValueError:
                print(f"skipping {scheme} g={g}: it does not divide every int4 matrix's in_features {sorted(inputs)}")
                continue
            variants.append((scheme if scheme == "int8" else f"int4 g={g}", scheme, g))

    prompt = torch.as_tensor(tokens[:16].astype("int64"))  # the start of the perplexity text
    window = torch.as_tensor(tokens[:seq_len].astype("int64"))[None].to(device)  # prefill: the first window
    print(f"device: {device_name(device)} ({device.type}) | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads | activations float32")
    print(f"checkpoint: {ckpt} ({float_model.num_params() / 1e6:.2f}M parameters) | perplexity over "
          f"{n_batches} x 8 windows of {seq_len} tokens of {windows_of} | greedy decode: batch 1, 16-token prompt, "
          f"{new_tokens} new tokens, median of {iters}; prefill: one window of {seq_len} tokens")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for label, scheme, group_size in variants:
            model = llmstack.from_pretrained(ckpt)
            out = Path(tmp) / label.replace(" ", "_").replace("=", "")
            if scheme is None:
                save_pretrained(model, out)
            else:
                save_quantized(quantize_(model, scheme, group_size=group_size, embedding=embedding), out)
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
            with torch.no_grad():  # prefill: one forward over a whole window, alternated with float
                p_base, p_model = time_pair(lambda: base(window, logits_to_keep=1),
                                            lambda: model(window, logits_to_keep=1), 1, iters, device=device)
            rows.append((label, size, ppl, 100 * (ppl / base_ppl - 1), new_tokens / t_model, new_tokens / t_base,
                         t_base / t_model, same, p_base / p_model))

    print(f"\n| {'weights':<10} | {'embed/head':<10} | {'file MiB':>8} | {'ppl':>8} | {'ppl change':>10} | "
          f"{'decode tok/s':>12} | {'float tok/s':>11} | {'decode vs float':>15} | {'prefill vs float':>16} | "
          f"{'same greedy':>11} |")
    print(f"|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 12}|{'-' * 14}|{'-' * 13}|{'-' * 17}|{'-' * 18}|"
          f"{'-' * 13}|")
    for label, size, ppl, change, tps, base_tps, ratio, same, prefill in rows:
        head = "float32" if label == "float32" else args.embedding
        print(f"| {label:<10} | {head:<10} | {size / 2**20:>8.2f} | {ppl:>8.3f} | {change:>+9.2f}% | {tps:>12.1f} | "
              f"{base_tps:>11.1f} | {ratio:>14.2f}x | {prefill:>15.2f}x | {same:>4} / {new_tokens:<4} |")
    print("\nsame greedy: new tokens the model decodes exactly as the float model does before the first difference.")


if __name__ == "__main__":
    main()
