"""llmstack vs transformers on the CPU, float32, same weights, one run.

Builds one random Llama checkpoint (~12M parameters, GQA, vocab 4096), loads it
into both, and measures training-step throughput (forward + backward + AdamW,
batch 8 x 256) and greedy decode throughput (batch 1, 128 new tokens), checking
that the greedy tokens are identical. The training step is timed twice: with the
same loss computed outside both models from their logits, and with each library
computing its own loss (`model(x, targets=y)`, which fuses the output head and the
loss chunk by chunk, against transformers' `model(x, labels=y)`).

    python scripts/bench_cpu.py            # full
    python scripts/bench_cpu.py --quick    # a fast smoke run
    python scripts/bench_cpu.py --compile  # also the torch.compile'd static-cache decode step
    python scripts/bench_cpu.py --threads 2  # both libraries with 2 threads (default: one fewer than the cores)
"""
import sys

import torch
import torch.nn.functional as F

import llmstack
from benchlib import cpu_name, hf_twin, quick_defaults, random_llama, time_pair
from llmstack.cli import positive_int, script_parser
from llmstack.config import ConfigError
from llmstack.runtime import set_threads


def logits_loss(forward):
    """The loss computed outside the model, from its logits, the same way for both."""
    def loss(model, x, y):
        logits = forward(model, x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    return loss


def train_step_fn(model, batch, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
    x, y = batch[:, :-1], batch[:, 1:].contiguous()

    def step():
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="train 2 x 64, 16 new tokens, 2 runs (a smoke run); flags given explicitly keep their value")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None, help="(default 128)")
    parser.add_argument("--iters", type=positive_int, default=None, help="(default 9)")
    parser.add_argument("--compile", action="store_true",
                        help="also time decoding with the torch.compile'd static-cache step (CompiledDecoder)")
    args = parser.parse_args()
    quick_defaults(args, args.quick, dict(max_new_tokens=(128, 16), iters=(9, 2)))
    try:
        set_threads(args.threads)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    batch_size, seq = (2, 64) if args.quick else (8, 256)
    new_tokens, iters = args.max_new_tokens, args.iters
    ours = random_llama()
    hf = hf_twin(ours)
    hf.generation_config.pad_token_id = 0
    n_params = ours.num_params()
    print(f"device: {cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | float32")
    print(f"model: random Llama, {n_params / 1e6:.1f}M parameters, GQA 6/2, vocab 4096")

    # -- training step
    batch = torch.randint(0, 4096, (batch_size, seq + 1))
    rows = []
    ours.train(), hf.train()
    tokens = batch_size * seq
    t_ours, t_hf = time_pair(train_step_fn(ours, batch, logits_loss(lambda m, x: m(x))),
                             train_step_fn(hf, batch, logits_loss(lambda m, x: m(x).logits)), 1, iters)
    rows.append((f"train step (fwd+bwd+AdamW, {batch_size}x{seq}) tokens/s", tokens / t_ours, tokens / t_hf))
    t_ours, t_hf = time_pair(train_step_fn(ours, batch, lambda m, x, y: m(x, targets=y) / y.numel()),
                             train_step_fn(hf, batch, lambda m, x, y: m(input_ids=x, labels=y, shift_labels=y).loss),
                             1, iters)
    rows.append(("train step, each library's own loss, tokens/s", tokens / t_ours, tokens / t_hf))

    # -- greedy decode, batch 1
    ours.eval(), hf.eval()
    prompt = torch.randint(0, 4096, (1, 16))
    got = {}

    def run_ours():
        got["ours"] = llmstack.generate(ours, prompt, new_tokens, temperature=0)

    def run_hf():
        with torch.inference_mode():
            got["hf"] = hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    eos_token_id=None)

    t_ours, t_hf = time_pair(run_ours, run_hf, 1, iters)
    rows.append((f"greedy decode (batch 1, {new_tokens} new) tokens/s", new_tokens / t_ours, new_tokens / t_hf))
    same = torch.equal(got["ours"], got["hf"])
    if args.compile:
        from llmstack.inference import CompiledDecoder

        decoder = CompiledDecoder(ours, 1, prompt.shape[1] + new_tokens)

        def run_compiled():
            got["compiled"] = decoder.generate(prompt, new_tokens, temperature=0)

        run_compiled()  # compiles once, outside the timing
        t_ours, t_hf = time_pair(run_compiled, run_hf, 1, iters)
        rows.append(("greedy decode, compiled step (batch 1) tokens/s", new_tokens / t_ours, new_tokens / t_hf))
        same = same and torch.equal(got["compiled"], got["hf"])

    print(f"\n| {'measure':<48} | {'llmstack':>9} | {'transformers':>12} | {'ratio':>6} |")
    print(f"|{'-' * 50}|{'-' * 11}|{'-' * 14}|{'-' * 8}|")
    for name, a, b in rows:
        print(f"| {name:<48} | {a:>9.0f} | {b:>12.0f} | {a / b:>5.2f}x |")
    print(f"\ngreedy tokens identical: {same}")
    if not same:
        raise SystemExit("greedy tokens differ between llmstack and transformers")


if __name__ == "__main__":
    main()
