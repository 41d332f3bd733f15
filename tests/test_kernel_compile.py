"""The Triton kernels compiled for a Hopper GPU on any machine (no GPU needed), and the
dispatch rules that follow from what the compiler reports."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_config_compiles_for_hopper_without_spills_at_head_dim_128():
    # Every config the autotuner would time for training at 4k tokens, decode over an 8k
    # cache and the int8/int4 decode matmuls: it compiles for sm_90, uses no local memory
    # and fits in the 227 KiB of shared memory; and each training kernel keeps a config that
    # fits and whose dots became wgmma (Hopper's tensor-core instruction). A kernel change
    # that makes any config spill, or a training kernel fall back to mma.sync (or a config
    # added without checking), fails here, long before a GPU sees it.
    aot = pytest.importorskip("kernel_aot")
    if not aot.toolchain_available():
        pytest.skip("needs Triton's NVIDIA backend (ptxas, cuobjdump)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_kernels.py"), "--head-dims", "128",
                          "--strict", "--problems-only"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "configs fit" in out.stdout


def test_recorded_launches_specialise_like_the_runtime():
    # The launchers, run on meta tensors with the kernels swapped for recorders, give the
    # arguments a real launch would, and they are specialised as Triton's runtime does:
    # a stride of 1 becomes a constant, multiples of 16 get a divisibility hint.
    import kernel_aot as aot
    from llmstack.kernels import flash_attention as fa

    original = fa._attn_fwd
    launches = aot.attention_launches(batch=1, q_heads=4, kv_heads=2, seqlen=100, head_dim=80,
                                      dtype=torch.float16)
    assert [launch.name for launch in launches] == ["_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv",
                                                    "_attn_bwd_dq"]
    fwd = launches[0]
    q = fwd.args[0]
    assert q.device.type == "meta" and q.dtype == torch.float16
    assert fwd.args[5:9] == q.stride() and q.stride()[-1] == 1  # s_qb, s_qh, s_qm, s_qd
    assert fwd.kwargs["HEAD_DIM"] == 80 and fwd.kwargs["BLOCK_D"] == 128
    assert fwd.kwargs["GROUP"] == 2 and fwd.kwargs["CAUSAL"] is True
    src, options = aot._source(fwd, fwd.kernel.configs[0])
    sig, names = src.signature, list(src.signature)
    assert sig["Q"] == "*fp16" and sig["LSE"] == "*fp32" and sig["qk_scale"] == "fp32"
    assert sig["s_qd"] == "constexpr" and src.constants[(names.index("s_qd"),)] == 1
    assert sig["s_qm"] == "i32" and q.stride(2) == 80  # 80 = 16 * 5: hinted divisible by 16
    assert [["tt.divisibility", 16]] == src.attrs[(names.index("s_qm"),)]
    assert sig["Q_LEN"] == "i32" and (names.index("Q_LEN"),) not in src.attrs  # 100: no hint
    assert sig["HEAD_DIM"] == "constexpr" and src.constants[(names.index("HEAD_DIM"),)] == 80
    assert options == dict(num_warps=fwd.kernel.configs[0].num_warps, num_stages=fwd.kernel.configs[0].num_stages)
    decode = aot.decode_launches(q_heads=8, kv_heads=2, q_len=3, kv_len=64, head_dim=64, num_splits=4)
    assert [launch.name for launch in decode] == ["_attn_decode_split", "_attn_decode_combine"]
    assert decode[0].kwargs["NUM_SPLITS"] == 4 and decode[0].kwargs["BLOCK_R"] == 16  # 4 heads x 3 tokens
    assert fa._attn_fwd is original  # recording puts the real kernels back


def test_compiling_needs_a_process_without_the_interpreter():
    import kernel_aot as aot
    from llmstack.kernels import flash_attention as fa

    if not fa._INTERPRET:
        pytest.skip("this process builds compiled kernels")
    launch = aot.matmul_launches()[0]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_launch(launch)


@pytest.mark.parametrize("kernel_runs", [True, False])
def test_auto_backend_sends_the_kernel_only_half_precision_cuda_work(monkeypatch, kernel_runs):
    """`auto`: our kernel for float16/bfloat16 on CUDA when it can run there; SDPA for float32 (every
    fp32 config spills on Hopper, see check_kernels.py --dtype fp32), for the CPU, and whenever
    the kernel cannot run. A named backend is kept as named."""
    from llmstack import kernels
    from llmstack.model import resolve_backend

    monkeypatch.setattr(kernels, "_AVAILABLE", {"flash_attention": kernel_runs})
    kernel = "triton" if kernel_runs else "sdpa"
    assert resolve_backend("auto", "cuda", torch.bfloat16) == kernel
    assert resolve_backend("auto", "cuda", torch.float16) == kernel
    assert resolve_backend("auto", "cuda", torch.float32) == "sdpa"
    assert resolve_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    assert resolve_backend("auto", "cpu", torch.float32) == "sdpa"
    assert resolve_backend("sdpa", "cuda", torch.bfloat16) == "sdpa"
    assert resolve_backend("naive", "cpu", torch.float32) == "naive"


def test_kernel_availability():
    from llmstack import kernels
    from llmstack.kernels import flash_attention as fa

    assert kernels.available("flash_attention") is fa.is_available()
    assert kernels.available("no_such_kernel") is False  # an import error is an answer, not a crash


_TRACE = """
import json, torch
import torch.utils._triton
# torch.compile treats Triton kernels as kernels only where it finds a GPU; nothing runs here,
# so tell it there is one and trace on meta tensors.
torch.utils._triton.has_triton = lambda: True
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from llmstack.kernels.flash_attention import flash_attention
from llmstack.kernels.flash_decode import flash_decode
from llmstack.kernels.quant_matmul import int8_matmul

class Traced(Exception):
    pass

def capture(gm, example_inputs):  # reached only when the whole function became one graph
    raise Traced

def attend(q, k, v):  # inputs that need gradients: dynamo traces the backward kernels too
    return flash_attention(q, k, v, causal=True)

def meta(*shape, dtype=torch.bfloat16, grad=False):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)

cases = {
    "attention": (attend, (meta(2, 8, 300, 128, grad=True), meta(2, 2, 300, 128, grad=True),
                           meta(2, 2, 300, 128, grad=True))),
    "decode": (lambda q, k, v: flash_decode(q, k, v), (meta(1, 8, 1, 128), meta(1, 2, 4096, 128),
                                                       meta(1, 2, 4096, 128))),
    "int8 matmul": (int8_matmul, (meta(1, 512), meta(256, 512, dtype=torch.int8), meta(256, dtype=torch.float32))),
}
# The whole training forward (norms, RoPE, SwiGLU, the fused loss, our attention) on CPU tensors:
# the model's autocast regions need a real device type. The launchers' guard refuses CPU tensors
# outside the interpreter; nothing is launched here, so it is bypassed.
from llmstack.model import Transformer, model_preset
from llmstack.kernels import flash_attention as fa, flash_decode as fd
fa._check = fd._check = lambda *args: None
cfg = model_preset("tiny")
cfg.attn_backend = "triton"
model = Transformer(cfg).to(torch.bfloat16)
ids = torch.zeros(2, 64, dtype=torch.long)
cases["model"] = (lambda ids: model(ids, targets=ids), (ids,))
for deterministic in (False, True):
    torch.use_deterministic_algorithms(deterministic)
    for name, (fn, args) in cases.items():
        torch._dynamo.reset()
        kernel_side_table.reset_table()
        try:
            torch.compile(fn, fullgraph=True, backend=capture)(*args)
            error = "not traced"
        except Exception as e:
            error = None if "Traced" in repr(e) else repr(e)[:2000]
        configs = [len(getattr(k, "configs", [None])) for k in kernel_side_table.id_to_kernel.values()]
        print(json.dumps(dict(case=name, deterministic=deterministic, error=error, configs=configs)))
"""


@pytest.mark.slow
def test_kernels_trace_into_one_torch_compile_graph():
    # `train.compile: true` with the triton backend: torch.compile must take the autograd.Function
    # and every launch into its graph with no break, for the kernels alone and inside the model's
    # training forward, and under deterministic algorithms launch single configs (so inductor has
    # nothing to tune). Traced only: the capturing backend stops before anything is compiled.
    import json

    pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")
    if not hasattr(pytest.importorskip("torch.utils._triton"), "has_triton"):
        pytest.skip("this torch decides Triton support elsewhere")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _TRACE], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 8, out.stdout + out.stderr[-3000:]
    for r in results:
        assert r["error"] is None, r
        assert r["configs"], r  # the launches were recorded as Triton kernels
        if r["deterministic"]:
            assert set(r["configs"]) == {1}, r
    tuned = {r["case"]: max(r["configs"]) for r in results if not r["deterministic"]}
    assert tuned["attention"] > 1 and tuned["int8 matmul"] > 1  # the autotuned path keeps its choice
