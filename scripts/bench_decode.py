"""Batch-1 decode speed as achieved memory bandwidth, against the device's copy bandwidth.

A decode step of one sequence reads every weight once and the cached keys and values,
and does little arithmetic per byte: its speed limit is memory bandwidth. So, as gpt-fast
reports it, each variant's tokens/s is turned into bytes read per second:

    achieved GB/s = bytes per token (weights as stored + K/V of the tokens attended) * tokens/s

and set against a large tensor copy on the same device (bytes read + written per second)
measured in the same run. Variants: eager `generate` and the compiled static-cache step
(`CompiledDecoder`: CUDA graphs on a GPU), each in float and weight-only int8/int4, all
timed alternately. A model's weights must not fit in the caches for the figure to mean
anything: on a GPU the default model is Llama-3.2-1B's shape with random weights (bf16).

    python scripts/bench_decode.py                            # llama-3.2-1b on CUDA, quickstart on a CPU
    python scripts/bench_decode.py --model qwen2.5-0.5b --modes compiled --quantize none int8
    python scripts/bench_decode.py --checkpoint runs/quickstart
    python scripts/bench_decode.py --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf --dtype fp32
    python scripts/bench_decode.py --quick                    # tiny eager smoke run (explicit flags apply)
"""
import copy
import datetime
import json
import statistics
import sys

import torch

import llmstack
from benchlib import (copy_bandwidth_gbs, decode_bytes_per_token, device_name, first_difference,
                            quick_defaults, time_compiled_generate, time_llmstack_generate)
from llmstack.cli import (add_device_argument, add_dtype_argument, non_negative_int, positive_int,
                          script_parser)
from llmstack.config import ConfigError
from llmstack.inference import quantize_
from llmstack.inference.compiled import CompiledDecoder
from llmstack.inference.quantize import DEFAULT_GROUP_SIZE
from llmstack.interop import resolve_checkpoint
from llmstack.model import Transformer, model_preset
from llmstack.runtime import resolve_device, resolve_dtype, set_threads

SCHEMES = ("none", "int8", "int4")
EMBEDDING = "int8"  # the scheme of the quantized variants' embedding and head (quantize_'s default)


def build_model(args, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A trained checkpoint, or a preset's shape with random weights (built without a float32 copy)."""
    if args.checkpoint:
        return llmstack.from_pretrained(resolve_checkpoint(args.checkpoint), device=device, dtype=dtype)
    cfg = model_preset(args.model)
    cfg.max_seq_len = min(cfg.max_seq_len, args.prompt_len + args.max_new_tokens)  # RoPE needs nothing more
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model.to(dtype).eval()


def variants(model: Transformer, args) -> dict:
    """name -> (model, decode function (prompts) -> GenerationTiming)."""
    out = {}
    context = args.prompt_len + args.max_new_tokens
    for scheme in args.quantize:
        m = model if scheme == "none" else quantize_(copy.deepcopy(model), scheme, group_size=args.group_size,
                                                     embedding=EMBEDDING)
        label = "float" if scheme == "none" else (scheme if scheme == "int8" else f"int4 g{args.group_size}")
        for mode in args.modes:
            if mode == "eager":
                out[f"{label}, eager generate"] = (m, lambda p, m=m: time_llmstack_generate(m, p, args.max_new_tokens))
            else:
                decoder = CompiledDecoder(m, 1, context)
                out[f"{label}, compiled step"] = (m, lambda p, d=decoder: time_compiled_generate(d, p,
                                                                                                  args.max_new_tokens))
    return out


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--model", default=None,
                        help="a preset name or YAML path, random weights (default: llama-3.2-1b on CUDA, quickstart "
                             "on a CPU)")
    parser.add_argument("--checkpoint", help="a trained model instead of --model: an llmstack run or checkpoint "
                                             "directory, a Hugging Face directory or a .gguf file")
    parser.add_argument("--prompt-len", type=positive_int, default=None, help="(default 128)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None, help="(default 128)")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=None,
                        help="(default: eager compiled)")
    parser.add_argument("--quantize", nargs="+", choices=SCHEMES, default=list(SCHEMES),
                        help=f"(default: {' '.join(SCHEMES)})")
    parser.add_argument("--group-size", type=positive_int, default=DEFAULT_GROUP_SIZE,
                        help=f"int4 group size (default {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--iters", type=positive_int, default=None,
                        help="timed runs of each variant, alternated (default 5)")
    parser.add_argument("--warmup", type=non_negative_int, default=1,
                        help="untimed rounds first, the first of which compiles (default 1, at least 1 is run)")
    add_device_argument(parser)
    add_dtype_argument(parser)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, eager only, prompt 16, 8 new tokens, 2 runs (a smoke run); flags given "
                             "explicitly keep their value")
    args = parser.parse_args()
    quick_defaults(args, args.quick, dict(prompt_len=(128, 16), max_new_tokens=(128, 8), iters=(5, 2),
                                          modes=(["eager", "compiled"], ["eager"])))
    if args.quick and args.model is None and not args.checkpoint:
        args.model = "tiny"
    if args.max_new_tokens < 2:
        sys.exit(f"error: --max-new-tokens must be >= 2 (a step's time needs two tokens), got {args.max_new_tokens}")
    try:
        set_threads(args.threads)
        device = resolve_device(args.device)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    dtype = resolve_dtype(args.dtype, device)
    if args.model is None:
        args.model = "llama-3.2-1b" if device.type == "cuda" else "quickstart"

    try:
        model = build_model(args, device, dtype)
        context = args.prompt_len + args.max_new_tokens
        if context > model.config.max_seq_len:
            raise ValueError(f"--prompt-len + --max-new-tokens = {context} is past the model's context "
                             f"({model.config.max_seq_len})")
        runs = variants(model, args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

    name = device_name(device)
    when = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"device: {name}   date: {when}   torch {torch.__version__}   dtype: {str(dtype).split('.')[-1]}   "
          f"threads: {torch.get_num_threads() if device.type == 'cpu' else '-'}")
    what = args.checkpoint or f"{args.model} (random weights)"
    print(f"model: {what}, {model.num_params() / 1e6:.1f}M parameters; batch 1, prompt {args.prompt_len}, "
          f"{args.max_new_tokens} new tokens, greedy; median of {args.iters} alternated runs; quantized variants: "
          f"embedding and head {EMBEDDING}")
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"copy bandwidth (read + write): {copy_gbs:.1f} GB/s")

    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=gen)
    # The first untimed run of each variant compiles it; a variant that fails there (a compiler
    # or a kernel missing on this device) is reported and left out, and the others still run.
    failed = {}
    for n in list(runs):
        try:
            runs[n][1](prompts)
        except Exception as e:  # noqa: BLE001 - any failure of one variant must not end the benchmark
            failed[n] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            print(f"{n}: failed, left out ({failed[n]})")
    names = [n for n in runs if n not in failed]
    timings = {n: [] for n in names}
    warmup = max(args.warmup - 1, 0)
    for i in range(warmup + args.iters):
        for n in names:  # round-robin, so that drift in the machine's speed hits every variant alike
            timing = runs[n][1](prompts)
            if i >= warmup:
                timings[n].append(timing)

    mean_context = args.prompt_len + (args.max_new_tokens - 1) / 2  # keys attended, averaged over the steps
    rows = []
    print("\n| variant | weights MiB | MB read / token | tok/s | achieved GB/s | of copy bandwidth | tokens as eager |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for n in names:
        m = runs[n][0]
        per_token = decode_bytes_per_token(m, round(mean_context))
        weights = decode_bytes_per_token(m, 0)
        tps = 1.0 / statistics.median(t.itl for t in timings[n])  # batch 1: one token per inter-token gap
        gbs = per_token * tps / 1e9
        eager = n.replace("compiled step", "eager generate")
        same = None
        if eager != n and eager in timings:  # the compiled step must give the eager tokens
            diff = first_difference(timings[n][0].tokens, timings[eager][0].tokens)
            same = diff is None
        rows.append(dict(variant=n, weight_bytes=weights, bytes_per_token=per_token, tokens_per_s=tps,
                         achieved_GBs=gbs, of_copy=gbs / copy_gbs, same_tokens_as_eager=same))
        same_text = "-" if same is None else ("same" if same else f"differ from step {diff[1]}")
        print(f"| {n} | {weights / 2**20:.1f} | {per_token / 1e6:.2f} | {tps:.1f} | {gbs:.1f} | "
              f"{100 * gbs / copy_gbs:.0f}% | {same_text} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, date=when, torch=torch.__version__, dtype=str(dtype), model=what,
                           copy_GBs=copy_gbs, quantized_embedding=EMBEDDING, group_size=args.group_size, rows=rows,
                           failed=failed), f, indent=1)


if __name__ == "__main__":
    main()
