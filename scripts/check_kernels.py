"""Compile every Triton kernel config for a GPU architecture, no GPU needed, and report its cost.

    python scripts/check_kernels.py                     # Hopper (sm_90), bf16, head dims 64 and 128
    python scripts/check_kernels.py --arch 80 --head-dims 128 --problems-only

For each launch the library makes (FlashAttention forward and backward at 4k
tokens, split-KV decode of 1 and 4 queries over an 8k cache, the int8/int4
decode matmuls) and each of its autotuning configs: registers per thread, bytes
spilled to local memory, shared memory against the architecture's limit, and
which tensor-core instructions its dots became (wgmma, mma.sync or none). A
config that spills runs slowly; one over the shared-memory limit cannot launch.
Exits with 1 when some launch has no config that fits, a training kernel has no
config that fits and uses wgmma on sm_90, or a config fails to compile (with
--strict: also when any config does not fit). Run it with
TRITON_INTERPRET unset.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from llmstack.cli import script_parser

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _compile_case(name: str, *, head_dims: list[int], dtype: str, masks: list[str], arch: int):
    """Worker: compile every config of every launch of one case (runs in its own process)."""
    import warnings

    import torch

    # Triton 3.9 asks for an explicit float-fusion default; the check compiles with the same
    # default the runtime uses, so the question is noise here.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    import kernel_aot as aot

    cases = dict(aot.standard_cases(head_dims, getattr(torch, _DTYPES[dtype]), masks))
    return [r for launch in cases[name]() for r in aot.compile_launch(launch, name, arch=arch)]


def main() -> int:
    parser = script_parser(__doc__.split("\n")[0], threads=False)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200, 80: A100)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--masks", nargs="+", choices=["causal", "full", "window"], default=["causal"],
                        help="training masks to compile (window: causal with a 1024-token sliding window)")
    parser.add_argument("--cases", nargs="+", help="only cases whose name starts with one of these (train, decode, "
                        "matmul)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--problems-only", action="store_true", help="print only configs that do not fit")
    parser.add_argument("--strict", action="store_true", help="exit with 1 when any config does not fit")
    args = parser.parse_args()

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("error: unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    import torch
    import triton
    import kernel_aot as aot

    if not aot.toolchain_available():
        raise SystemExit(f"error: this Triton build ({triton.__version__}) has no NVIDIA backend (ptxas, cuobjdump) "
                         "to compile with")
    names = [n for n, _ in aot.standard_cases(args.head_dims, getattr(torch, _DTYPES[args.dtype]), args.masks)
             if not args.cases or any(n.startswith(c) for c in args.cases)]
    if not names:
        raise SystemExit(f"error: no case starts with {args.cases}")
    limit = aot.SHARED_MEMORY_LIMIT.get(args.arch)
    print(f"target: sm_{args.arch}, {args.dtype}, shared memory limit "
          f"{f'{limit // 1024} KiB' if limit else 'unknown'}; triton {triton.__version__}")
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(names)))) as pool:
        compile_case = functools.partial(_compile_case, head_dims=args.head_dims, dtype=args.dtype, masks=args.masks,
                                         arch=args.arch)
        futures = {pool.submit(compile_case, name): name for name in names}
        results = {}
        for done, future in enumerate(as_completed(futures), 1):  # progress: compiling takes minutes cold
            name = futures[future]
            results[name] = future.result()
            print(f"[{done}/{len(names)}] {name}: {len(results[name])} configs compiled, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    reports = [r for name in names for r in results[name]]

    groups: dict[tuple[str, str], list] = {}
    for r in reports:
        groups.setdefault((r.case, r.kernel), []).append(r)
    # Under torch.use_deterministic_algorithms(True) a launch takes its first config (kernels/launch.py).
    pinned = {id(rs[0]) for rs in groups.values() if len(rs) > 1}

    header = f"{'case':<18} {'kernel':<22} {'config':<40} {'regs':>5} {'spill B':>8} {'smem KiB':>9} {'mma':>6}  status"
    print(header + "\n" + "-" * len(header))
    for r in reports:
        if args.problems_only and r.fits:
            continue
        config = r.config + (" *" if id(r) in pinned else "")
        if r.error:
            print(f"{r.case:<18} {r.kernel:<22} {config:<40} {'':>5} {'':>8} {'':>9} {'':>6}  {r.error}")
            continue
        status = "ok" if r.fits else ("spills" if r.stack_bytes else "over shared limit")
        print(f"{r.case:<18} {r.kernel:<22} {config:<40} {r.registers:>5} {r.stack_bytes:>8} "
              f"{r.shared_bytes / 1024:>9.1f} {r.mma:>6}  {status}")
    if not args.problems_only:
        print("* the config torch.use_deterministic_algorithms(True) pins instead of autotuning")
    hopeless = [key for key, rs in groups.items() if not any(r.fits for r in rs)]
    # Training kernels are bound by tensor-core throughput, which on Hopper only warpgroup MMA reaches:
    # at least one config that fits must compile to it. (Decode and one-row matmuls are bound by memory
    # bandwidth, and their 16-row tiles are below wgmma's 64-row minimum anyway.)
    no_wgmma = [key for key, rs in groups.items() if args.arch == 90 and key[0].startswith("train")
                and key not in hopeless and any(r.mma != "none" for r in rs if r.mma)
                and not any(r.fits and r.mma == "wgmma" for r in rs)]
    failed = [r for r in reports if r.error]
    print(f"\n{sum(r.fits for r in reports)}/{len(reports)} configs fit (compile, no spills, shared memory within "
          f"the limit), in {time.perf_counter() - start:.0f} s")
    for case, kernel in hopeless:
        print(f"no config of {kernel} fits for {case}")
    for case, kernel in no_wgmma:
        print(f"no config of {kernel} that fits for {case} uses wgmma (Hopper's tensor-core instruction)")
    return 1 if hopeless or no_wgmma or failed or (args.strict and not all(r.fits for r in reports)) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
