"""Each parallel strategy on N processes against one process, in one run: tokens/s, the bytes of
parameters + gradients + optimizer state the fullest rank keeps (measured from its tensors, and
as `llmstack.distributed.memory` estimates them), and the share of step time spent in communication.

    python scripts/bench_distributed.py                       # 2 CPU processes (gloo), the quickstart model
    python scripts/bench_distributed.py --processes 8 --preset gpt2-124m --batch-size 16   # on 8 GPUs (NCCL)

The model is the preset with untied embeddings (a pipeline splits the embedding from the head).
Every strategy runs the same global batch per step (each data-parallel rank its slice) for
`--steps` timed steps after two warm-up steps, each process on `--threads` threads. The
communication share is the time the profiler records in the backend's collectives and send/recv
(`gloo:*`, `nccl:*`) on rank 0 during one more step, over that step's time: they run beside the
computation, so the share says how busy the links were, not how much of the step waited on
them (a pipeline's recv also counts the wait for the other stage).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

STRATEGIES = {
    "ddp": {"dp_replicate": 2},
    "zero1": {"dp_replicate": 2, "shard_optimizer": True},
    "zero2": {"dp_shard": 2, "reshard_after_forward": False},
    "fsdp": {"dp_shard": 2},
    "tp": {"tp": 2},
    "pp": {"pp": 2},
}


def bench_model(preset: str):
    """The preset with untied embeddings, so that pipeline stages can split it too."""
    from llmstack.model import model_preset

    cfg = model_preset(preset)
    cfg.tie_embeddings = False
    return cfg


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        if t.device.type != "meta":
            total += t.numel() * t.element_size()
    return total


def optimizer_tensors(opt):
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer keeps its share in a local optimizer
    return [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]


def worker(args) -> None:
    """Every strategy in turn, in this launch's processes (one process: the baseline)."""
    import torch.distributed as dist

    from llmstack.runtime import set_threads

    set_threads(args.threads)
    for strategy in args.strategies if args.processes > 1 else ["single"]:
        measure(args, strategy)
    if dist.is_initialized():
        dist.destroy_process_group()


def measure(args, strategy: str) -> None:
    from llmstack.distributed import Parallelism, ParallelConfig, setup
    from llmstack.model import build_model, flops_per_token
    from llmstack.runtime import resolve_device
    from llmstack.train import build_optimizer, param_groups

    sizes = {k: (args.processes if v == 2 else v) for k, v in STRATEGIES.get(strategy, {}).items()}
    pcfg = ParallelConfig(**sizes).validate()
    cfg = bench_model(args.preset)
    pcfg.check_model(cfg, args.batch_size)
    device = setup(pcfg, resolve_device(args.device))
    plan = Parallelism(pcfg, device)
    torch.manual_seed(0)
    model = build_model(cfg, device=device)
    model.init_weights()
    names = {id(p): n for n, p in model.named_parameters()}
    model, forward = plan.parallelize(model, [names[id(p)] for g in param_groups(model, 0.0) for p in g["params"]])
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), shard=plan.zero1)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(device)
    rows = args.batch_size // plan.dp_size
    x = data[plan.dp_rank * rows:(plan.dp_rank + 1) * rows, :-1]
    y = data[plan.dp_rank * rows:(plan.dp_rank + 1) * rows, 1:]
    scale = plan.dp_size / (args.batch_size * args.seq_len)
    grad_bytes = 0

    def step():
        nonlocal grad_bytes
        if plan.pipeline is not None:
            plan.pipeline.step((x, y), scale)
        else:
            (forward(x, targets=y) * scale).backward()
        plan.clip_grad_norm(model.parameters(), 1.0)
        grad_bytes = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if plan.world > 1:
            torch.distributed.barrier()

    for _ in range(2):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / args.steps
    comm = 0.0
    if plan.world > 1:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t1 = time.perf_counter()
            step()
            sync()
            profiled = time.perf_counter() - t1
        # The backend's own records of each collective and send/recv (gloo's and NCCL's work, which runs beside
        # the computation; a pipeline's recv includes waiting for the other stage), the timing barrier aside.
        comm = sum(e.cpu_time_total for e in prof.events() if e.name.startswith(("gloo:", "nccl:"))
                   and "barrier" not in e.name) / 1e6 / profiled
    held = torch.tensor([local_bytes(model.parameters()), grad_bytes, local_bytes(optimizer_tensors(opt))],
                        dtype=torch.float64, device=device)
    if plan.world > 1:  # the rank that holds the most (a pipeline's stages differ)
        torch.distributed.all_reduce(held, op=torch.distributed.ReduceOp.MAX)
    if plan.rank == 0:
        print("RESULT " + json.dumps({
            "strategy": strategy, "world": plan.world, "tokens_per_s": args.batch_size * args.seq_len / seconds,
            "step_ms": seconds * 1e3, **dict(zip(("params", "grads", "optim"), map(int, held.tolist()))),
            "comm_share": comm,
            "flops_per_token": flops_per_token(cfg, args.seq_len)}), flush=True)


def main() -> None:
    from benchlib import device_name
    from llmstack.cli import add_device_argument, positive_int, script_parser

    parser = script_parser(__doc__)
    parser.add_argument("--preset", default="quickstart", help="model preset (configs/model/)")
    parser.add_argument("--processes", type=positive_int, default=2, help="processes per strategy")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="global batch (sequences)")
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument("--steps", type=positive_int, default=5, help="timed steps")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--json", action="store_true", help="print one JSON line per row instead of the table")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 1
    if args.worker:
        return worker(args)

    from llmstack.distributed.memory import model_state_bytes

    common = [f"--preset={args.preset}", f"--batch-size={args.batch_size}", f"--seq-len={args.seq_len}",
              f"--steps={args.steps}", f"--threads={args.threads}", f"--device={args.device}", "--worker",
              "--strategies", *args.strategies]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    here = str(Path(__file__).resolve())

    def run(nproc: int) -> list[dict]:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                    if nproc > 1 else [sys.executable])
        p = subprocess.run([*launcher, here, *common, f"--processes={nproc}"], capture_output=True, text=True, env=env)
        rows = [json.loads(ln.removeprefix("RESULT ")) for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not rows:
            sys.exit(f"{nproc} process(es): failed\n{p.stderr[-3000:]}")
        return rows

    cfg = bench_model(args.preset)
    device = "cuda" if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available() else "cpu"
    base, rows = run(1)[0], run(args.processes)
    for r in [base, *rows]:  # what llmstack.distributed.memory expects this rank to hold
        r["estimate"] = model_state_bytes(cfg, "ddp" if r["strategy"] == "single" else r["strategy"], r["world"])
    if args.json:
        for r in [base, *rows]:
            print(json.dumps(r))
        return
    print(f"# {device_name(device)}, torch {torch.__version__}, {args.threads} thread(s) per process; "
          f"{args.preset}, global batch {args.batch_size} x {args.seq_len} tokens")
    mib = 2 ** 20
    state = lambda r: r["params"] + r["grads"] + r["optim"]  # noqa: E731
    print("| strategy | processes | tokens/s | vs 1 process | params + grads + optimizer per rank (MiB) "
          "| vs 1 process | estimate (MiB) | communication share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in [base, *rows]:
        name = "one process" if r is base else r["strategy"]
        comm = "-" if r is base else f"{r['comm_share']:.0%}"
        print(f"| {name} | {r['world']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
              f"{state(r) / mib:.1f} | {state(r) / state(base):.2f}x | {sum(r['estimate'].values()) / mib:.1f} | "
              f"{comm} |")


if __name__ == "__main__":
    main()
