"""Activation checkpointing: activations kept for backward, and step time, for each mode, one run.

    python scripts/bench_recompute.py --threads 2                    # the quickstart model, 8 x 256 tokens
    python scripts/bench_recompute.py --preset gpt2-124m --batch-size 4 --seq-len 512

For none, full, selective every 2nd block and selective op-level (llmstack.train.recompute): the
bytes of the tensors autograd keeps for backward during a forward pass (counted by
`torch.autograd.graph.saved_tensors_hooks`; op-level's kept matmul and attention outputs sit in the
checkpoint's own cache, which these hooks do not see, so its column counts only the rest), and the
median time of forward + backward, the modes timed in turn.
"""
import time

import torch

import llmstack
from benchlib import device_name
from llmstack.cli import add_device_argument, positive_int, script_parser
from llmstack.runtime import resolve_device, set_threads
from llmstack.train.recompute import apply_activation_checkpointing

MODES = {"none": {"mode": "none"}, "full": {"mode": "full"}, "selective, every 2nd block": {"mode": "selective",
                                                                                           "every": 2},
         "selective, op level": {"mode": "selective", "policy": "op"}}


def saved_bytes(model, x, y) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, targets=y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--preset", default="quickstart", help="model preset (default quickstart)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument("--iters", type=positive_int, default=5)
    add_device_argument(parser)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    device = resolve_device(args.device)
    cfg = llmstack.model_preset(args.preset)
    models = {}
    for name, kw in MODES.items():
        torch.manual_seed(0)
        model = llmstack.build_model(cfg, device=device)
        model.init_weights()
        models[name] = apply_activation_checkpointing(model, kw["mode"], every=kw.get("every", 1),
                                                      policy=kw.get("policy", "layer"))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    kept = {name: saved_bytes(m, x, y) for name, m in models.items()}
    times = {name: [] for name in models}
    for _ in range(args.iters):  # the modes in turn, so that drift hits them alike
        for name, m in models.items():
            t0 = time.perf_counter()
            m(x, targets=y).backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
            m.zero_grad(set_to_none=True)
    print(f"device: {device_name(device)} | torch {torch.__version__} | {threads} threads | {args.preset} | "
          f"batch {args.batch_size} x {args.seq_len} | median of {args.iters}")
    base_t = sorted(times["none"])[len(times["none"]) // 2]
    print("\n| mode | activations kept (MiB) | forward + backward (ms) | time vs none |")
    print("| --- | ---: | ---: | ---: |")
    for name in models:
        t = sorted(times[name])[len(times[name]) // 2]
        print(f"| {name} | {kept[name] / 2**20:.1f} | {t * 1000:.0f} | {t / base_t:.2f}x |")


if __name__ == "__main__":
    main()
