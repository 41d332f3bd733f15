"""The Triton FlashAttention kernel against an explicit float64 reference.

On a machine without CUDA the kernels run through Triton's interpreter on the
CPU (float32 and float16; bfloat16 is wrong under the interpreter), on small
ragged shapes that cross block boundaries (16x16 tiles there). Tests marked
`gpu` check bf16/fp16 at real sizes against torch's SDPA.
"""
import os

import torch

if not torch.cuda.is_available():  # must precede the first `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

fa = pytest.importorskip("llmstack.kernels.flash_attention")
from llmstack.kernels import attention_utils, flash_decode as fd  # noqa: E402
from llmstack.kernels.flash_attention import flash_attention  # noqa: E402
from llmstack.kernels.flash_decode import flash_decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-3  # relative error: ||ours - ref|| / ||ref||


def reference(q, k, v, *, causal=False, scale=None, window=None, kv_len=None, key_mask=None):
    """softmax(QK^T * scale + mask) V in float64, GQA by repeat_interleave.

    kv_len: optional (B,) valid key lengths (queries are the last Tq of them).
    key_mask: optional (B, Tk) bool, False for keys nobody sees.
    Rows that see no key give 0 (the kernel's convention; softmax would give NaN).
    """
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    group = Hq // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    lengths = torch.full((B,), Tk) if kv_len is None else kv_len.cpu()
    pos = (torch.arange(Tq)[None, :] + lengths[:, None] - Tq)[:, None, :, None]  # (B, 1, Tq, 1) absolute positions
    j = torch.arange(Tk)[None, None, None, :]
    mask = j < lengths[:, None, None, None]
    if causal:
        mask = mask & (j <= pos)
    if window is not None:
        mask = mask & (j > pos - window)
    if key_mask is not None:
        mask = mask & key_mask.cpu()[:, None, None, :]
    mask = mask.to(q.device)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, 0.0)
    return probs @ v


def rel_err(a, b):
    """||a - b|| / ||b||; the floor keeps a gradient that is exactly 0 in theory
    (one key: softmax is constant) from dividing rounding noise by ~0."""
    floor = 1e-3 * math.sqrt(b.numel())
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(floor)).item()


def make_qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, device=DEVICE, requires_grad=True):
    q = torch.randn(B, Hq, Tq, D, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, Tk, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, Tk, D, dtype=dtype, device=device)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def check_fwd_bwd(q, k, v, tol, **kw):
    out = flash_attention(q, k, v, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = reference(q, k, v, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    assert out.shape == q.shape and out.dtype == q.dtype
    errs = {"out": rel_err(out, ref)}
    errs.update({name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    assert all(e <= tol for e in errs.values()), errs


# (B, Hq, Hkv, Tq, Tk, D): ragged lengths, q_len < kv_len, MHA / GQA / MQA, head dims 16..128
SHAPES = [
    (1, 2, 2, 37, 37, 32),     # MHA, ragged
    (2, 4, 2, 37, 100, 64),    # GQA, q_len < kv_len
    (1, 4, 1, 100, 100, 32),   # MQA
    (1, 2, 1, 20, 37, 80),     # head dim padded to 128
    (1, 3, 3, 17, 17, 16),     # odd head count, tiny head dim
    (1, 1, 1, 33, 50, 128),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_reference_fp32(shape, causal):
    q, k, v = make_qkv(*shape)
    check_fwd_bwd(q, k, v, FP32_TOL, causal=causal)


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 3), (5, 5), (16, 32), (48, 48)], ids=str)
def test_small_and_block_aligned_lengths(Tq, Tk):
    q, k, v = make_qkv(1, 2, 1, Tq, Tk, 32)
    check_fwd_bwd(q, k, v, FP32_TOL, causal=True)


def test_custom_scale_and_noncontiguous_inputs():
    # (B, T, H, D) projections viewed as (B, H, T, D): strides, not copies, reach the kernel.
    B, T, Hq, Hkv, D = 2, 37, 4, 2, 32
    q = torch.randn(B, T, Hq, D, device=DEVICE).transpose(1, 2).requires_grad_()
    kv = torch.randn(B, T, 2 * Hkv, D, device=DEVICE)
    k, v = kv[:, :, :Hkv].transpose(1, 2), kv[:, :, Hkv:].transpose(1, 2)
    k.requires_grad_()
    v.requires_grad_()
    assert not q.is_contiguous() and not k.is_contiguous()
    check_fwd_bwd(q, k, v, FP32_TOL, causal=True, scale=0.3)


def test_query_longer_than_keys_gives_zero_rows():
    # Causal with q_len > kv_len: the first rows see no key at all; output and grads stay finite.
    q, k, v = make_qkv(1, 2, 1, 40, 24, 32)
    check_fwd_bwd(q, k, v, FP32_TOL, causal=True)
    out = flash_attention(q, k, v, causal=True)
    assert torch.all(out[:, :, :16] == 0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("Tq,Tk,window", [(50, 50, 7), (37, 100, 20), (64, 64, 16), (20, 20, 64)], ids=str)
def test_sliding_window(Tq, Tk, window, causal):
    q, k, v = make_qkv(1, 2, 1, Tq, Tk, 32)
    check_fwd_bwd(q, k, v, FP32_TOL, causal=causal, window=window)


@pytest.mark.parametrize("split_kv", [True, False], ids=["split_kv", "tiled"])
@pytest.mark.parametrize("Tq", [1, 3])
def test_both_forward_paths_for_few_queries(monkeypatch, Tq, split_kv):
    # flash_attention routes a few queries over many keys to the split-KV kernels;
    # both paths must agree with the reference, and the backward serves either.
    monkeypatch.setattr(fd, "_use_split_kv", lambda *a: split_kv)
    q, k, v = make_qkv(2, 4, 2, Tq, 100, 32)
    check_fwd_bwd(q, k, v, FP32_TOL, causal=True)


def test_routing_heuristic():
    assert fd._use_split_kv(1, 4096, 8)
    assert fd._use_split_kv(4, 1024, 4)
    assert not fd._use_split_kv(512, 512, 1)
    assert not fd._use_split_kv(16, 4096, 8)  # 128 rows: too many for one decode program


@pytest.mark.parametrize("Tq,group,window", [(1, 1, None), (1, 4, None), (4, 2, None), (2, 2, 9)], ids=str)
def test_flash_decode_with_cache_seqlens(Tq, group, window):
    # A preallocated cache of 96 slots; each row holds a different number of valid keys.
    B, Hkv, D, capacity = 4, 2, 32, 96
    q, k, v = make_qkv(B, Hkv * group, Hkv, Tq, capacity, D, requires_grad=False)
    lengths = torch.tensor([96, 37, Tq, 70], dtype=torch.int32, device=DEVICE)
    k[1, :, 37:] = float("nan")  # slots past a row's length are garbage and must not leak in
    v[1, :, 37:] = float("nan")
    for num_splits in (None, 1, 5):
        out = flash_decode(q, k, v, kv_len=lengths, window=window, num_splits=num_splits)
        ref = reference(q, k.nan_to_num(), v.nan_to_num(), causal=True, window=window, kv_len=lengths)
        assert rel_err(out, ref) <= FP32_TOL, num_splits


@pytest.mark.parametrize("Tq,group,window", [(1, 1, None), (1, 4, None), (3, 2, None), (2, 2, 9)], ids=str)
def test_flash_decode_with_key_mask(Tq, group, window):
    # Left-padded rows (generate's batches of unequal prompts) and an arbitrary pattern, with and
    # without per-row lengths; a row whose mask hides every key gives zeros.
    B, Hkv, D, capacity = 4, 2, 32, 80
    q, k, v = make_qkv(B, Hkv * group, Hkv, Tq, capacity, D, requires_grad=False)
    slots = torch.arange(capacity, device=DEVICE)
    key_mask = slots[None, :] >= torch.tensor([0, 13, 41, 0], device=DEVICE)[:, None]
    key_mask[3] = torch.rand(capacity, device=DEVICE) < 0.5
    key_mask[3, -Tq:] = True
    key_mask[2, :] = False
    lengths = torch.tensor([80, 60, 70, 80], dtype=torch.int32, device=DEVICE)
    for kv_len in (None, lengths):
        for num_splits in (None, 1, 5):
            out = flash_decode(q, k, v, kv_len=kv_len, window=window, key_mask=key_mask, num_splits=num_splits)
            ref = reference(q, k, v, causal=True, window=window, kv_len=kv_len, key_mask=key_mask)
            assert rel_err(out, ref) <= FP32_TOL, (kv_len, num_splits)
            assert torch.all(out[2] == 0)
    out = flash_decode(q, k, v, kv_len=50, key_mask=key_mask)  # an int length cuts the mask too
    assert rel_err(out, reference(q, k[:, :, :50], v[:, :, :50], causal=True, key_mask=key_mask[:, :50])) <= FP32_TOL


def test_left_padded_generation_decodes_through_split_kv(monkeypatch):
    """The model's `triton` backend serves the decode steps of a batch of unequal prompts with the
    split-KV kernel and its key mask (prefill, with many queries, falls back to SDPA), and
    generates the tokens SDPA generates."""
    from llmstack.inference import generate
    from llmstack.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    model.init_weights()
    prompts = [torch.randint(0, 96, (n,)).tolist() for n in (9, 3, 6)]
    masked_calls = []
    decode_forward = fd._decode_forward

    def spy(*args, key_mask=None, **kwargs):
        masked_calls.append(key_mask is not None)
        return decode_forward(*args, key_mask=key_mask, **kwargs)

    monkeypatch.setattr(fd, "_decode_forward", spy)
    out = {}
    for backend in ("sdpa", "triton"):
        model.config.attn_backend = backend
        out[backend] = generate(model, prompts, 8, temperature=0)
    assert masked_calls and all(masked_calls)
    assert len(masked_calls) == 7 * model.config.n_layers  # every decode step after the prefill, every layer
    assert len(out["triton"]) == len(prompts)
    assert all(torch.equal(a, b) for a, b in zip(out["triton"], out["sdpa"]))


def test_flash_decode_int_length_and_empty_rows():
    q, k, v = make_qkv(2, 2, 1, 1, 64, 32, requires_grad=False)
    out = flash_decode(q, k, v, kv_len=50)
    assert rel_err(out, reference(q, k[:, :, :50], v[:, :, :50])) <= FP32_TOL
    # A row with an empty cache attends to nothing: zeros, not NaN.
    out = flash_decode(q, k, v, kv_len=torch.tensor([0, 64], device=DEVICE))
    assert torch.all(out[0] == 0)
    assert rel_err(out[1], reference(q[1:], k[1:], v[1:])[0]) <= FP32_TOL


def test_flash_decode_is_inference_only():
    q, k, v = make_qkv(1, 2, 1, 1, 32, 32)
    with pytest.raises(RuntimeError, match="inference-only"):
        flash_decode(q, k, v)
    with torch.no_grad():
        assert flash_decode(q, k, v).shape == q.shape


def test_backward_is_deterministic():
    # GQA, causal: dK/dV sum the group's query heads inside one program, never by atomics.
    q, k, v = make_qkv(2, 4, 1, 50, 50, 32)
    out = flash_attention(q, k, v, causal=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.fixture
def deterministic_algorithms():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_deterministic_mode_launches_without_the_autotuner(monkeypatch, deterministic_algorithms):
    # Under torch.use_deterministic_algorithms(True) every autotuned kernel (forward, both
    # backward kernels, split-KV decode) runs a pinned config: the autotuner is never asked,
    # and the result is what the autotuned launch gives with that config.
    q, k, v = make_qkv(2, 4, 2, 37, 50, 32)
    dout = torch.randn(q.shape)
    monkeypatch.setattr(fa.triton.runtime.Autotuner, "run", lambda *a, **kw: pytest.fail("autotuner was asked"))
    out = flash_attention(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    with torch.no_grad():
        decoded = flash_decode(q[:, :, -1:], k, v)
    monkeypatch.undo()
    torch.use_deterministic_algorithms(False)
    expected = flash_attention(q, k, v, causal=True)
    assert torch.equal(out, expected)  # one config under the interpreter: the same bits
    for a, b in zip(grads, torch.autograd.grad(expected, (q, k, v), dout)):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(decoded, flash_decode(q[:, :, -1:], k, v))


def test_pinned_config_is_the_first_of_the_call_tier_that_the_device_can_run(deterministic_algorithms):
    import triton
    import triton.language as tl
    from llmstack.kernels.launch import autotuned

    configs = [triton.Config({"BLOCK": b}, num_warps=1, num_stages=1) for b in (1, 2, 3, 4)]
    tiers = {0: configs[:2], 1: configs[2:]}

    @autotuned(configs, key=["TIER"], prune=lambda kwargs: tiers[kwargs["TIER"]])
    @triton.jit
    def write_block(out, BLOCK: tl.constexpr, TIER: tl.constexpr):
        tl.store(out + tl.arange(0, 16), tl.full((16,), BLOCK, tl.int32))

    out = torch.zeros(16, dtype=torch.int32)
    for tier, first in ((0, 1), (1, 3)):
        write_block[(1,)](out, TIER=tier)
        assert out[0].item() == first

    jit_fn = write_block.fn

    class OutOfSharedMemory:  # a GPU too small for the first config of tier 1
        def __getitem__(self, grid):
            def run(*args, BLOCK, **kwargs):
                if BLOCK == 3:
                    raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
                return jit_fn[grid](*args, BLOCK=BLOCK, **kwargs)
            return run

    write_block.fn = OutOfSharedMemory()
    write_block[(1,)](out, TIER=1)
    assert out[0].item() == 4


def test_float16():
    q, k, v = make_qkv(1, 4, 2, 37, 50, 32, dtype=torch.float16)
    check_fwd_bwd(q, k, v, 1e-2, causal=True)


def test_matches_model_attention_backends():
    from llmstack.model.attention import attention

    q, k, v = make_qkv(2, 4, 2, 20, 30, 32, requires_grad=False)
    ours = attention(q, k, v, backend="triton", causal=True)
    naive = attention(q, k, v, backend="naive", causal=True)
    assert rel_err(ours, naive) <= FP32_TOL


def test_rejects_bad_inputs():
    q, k, v = make_qkv(1, 3, 2, 8, 8, 32, requires_grad=False)
    with pytest.raises(ValueError, match="multiple"):
        flash_attention(q, k, v)
    q, k, v = make_qkv(1, 2, 1, 8, 8, 32, requires_grad=False)
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="float16, bfloat16, float32; got torch.float64"):
        flash_attention(q.double(), k.double(), v.double())  # the kernels' float64 gradients would be garbage
    with pytest.raises(ValueError, match=r"kv_heads \(0\), kv_heads >= 1"):
        flash_attention(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 2.5"):
        flash_attention(q, k, v, window=2.5)
    with pytest.raises(ValueError, match="num_splits must be an integer >= 1"):
        flash_decode(q[:, :, :1], k, v, num_splits=0)
    with pytest.raises(ValueError, match="kv_len tensor must hold integers"):
        flash_decode(q[:, :, :1], k, v, kv_len=torch.tensor([3.0]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="bfloat16 is computed wrongly"):
            flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())


def test_batch_beyond_the_grid_limit_runs_in_slices(monkeypatch):
    """batch * heads rides on the grid's second axis (at most 65535 on CUDA); past that the
    launchers run slices of the batch. Lower the limit to see slices give the same numbers."""
    q, k, v = make_qkv(3, 4, 2, 10, 24, 16)
    kv_len = torch.tensor([24, 3, 0])
    out = flash_attention(q, k, v, causal=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    decoded = flash_decode(q[:, :, -2:].detach(), k.detach(), v.detach(), kv_len=kv_len)
    monkeypatch.setattr(attention_utils, "_MAX_GRID_Y", 9)  # 9 // 4 heads: two rows of the batch a launch
    sliced = flash_attention(q, k, v, causal=True)
    assert torch.equal(sliced, out)
    for got, expected in zip(torch.autograd.grad(sliced.square().sum(), (q, k, v)), grads):
        assert torch.equal(got, expected)
    assert torch.equal(flash_decode(q[:, :, -2:].detach(), k.detach(), v.detach(), kv_len=kv_len), decoded)


def test_no_queries_still_differentiable():
    q, k, v = make_qkv(1, 2, 1, 0, 8, 16)
    out = flash_attention(q, k, v, causal=True)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape and torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


def test_double_backward_is_refused():
    """The kernels' gradients are not differentiable again; a second derivative must fail
    loudly, not come back silently missing its terms."""
    q, k, v = make_qkv(1, 2, 1, 8, 8, 16)
    dq, = torch.autograd.grad(flash_attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|trying to differentiate twice"):
        dq.sum().backward()


def test_is_available():
    assert fa.is_available()


# --------------------------------------------------------------------------- GPU
# Low precision at real sizes, against SDPA in float32. Our error must be within
# the dtype's tolerance or within 2x SDPA's own error in the same dtype.
GPU_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _sdpa(q, k, v, causal):
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.gpu
@pytest.mark.slow
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("S,D,Hq,Hkv,causal", [
    (1024, 64, 8, 8, False), (1024, 128, 8, 2, True), (2048, 128, 16, 4, True),
    (4096, 64, 8, 1, True), (4096, 128, 8, 8, False), (1000, 96, 4, 2, True),
], ids=str)
def test_gpu_low_precision_vs_sdpa(dtype, S, D, Hq, Hkv, causal):
    q, k, v = make_qkv(2, Hq, Hkv, S, S, D, dtype=dtype, device="cuda")
    out = flash_attention(q, k, v, causal=causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = _sdpa(q32, k32, v32, causal)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), dout.float())
    low = _sdpa(q, k, v, causal)  # SDPA's own error in this dtype, for scale
    low_grads = torch.autograd.grad(low, (q, k, v), dout)
    results = zip(("out", "dq", "dk", "dv"), (out, *grads), (low, *low_grads), (ref, *ref_grads))
    for name, ours, theirs, exact in results:
        bound = max(GPU_TOL[dtype], 2 * rel_err(theirs, exact))
        assert rel_err(ours, exact) <= bound, (name, rel_err(ours, exact), bound)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_decode_vs_reference(dtype):
    q, k, v = make_qkv(4, 32, 8, 1, 8192, 128, dtype=dtype, device="cuda", requires_grad=False)
    lengths = torch.tensor([8192, 3000, 1, 5000], device="cuda")
    out = flash_decode(q, k, v, kv_len=lengths)
    ref = reference(q, k, v, causal=True, kv_len=lengths)
    assert rel_err(out, ref) <= GPU_TOL[dtype]
    # A left-padded batch, as generate decodes unequal prompts.
    pad = torch.tensor([0, 100, 4000, 8191], device="cuda")
    key_mask = torch.arange(8192, device="cuda")[None, :] >= pad[:, None]
    out = flash_decode(q, k, v, key_mask=key_mask)
    assert rel_err(out, reference(q, k, v, causal=True, key_mask=key_mask)) <= GPU_TOL[dtype]


@pytest.mark.gpu
@gpu
def test_gpu_backward_is_deterministic():
    q, k, v = make_qkv(2, 16, 4, 2048, 2048, 128, dtype=torch.bfloat16, device="cuda")
    out = flash_attention(q, k, v, causal=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


_PINNED_RUN = """
import torch, hashlib
from llmstack.kernels.flash_attention import flash_attention
torch.use_deterministic_algorithms(True)
torch.manual_seed(0)
q, k, v = (torch.randn(2, h, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (16, 4, 4))
out = flash_attention(q, k, v, causal=True)
grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
print(hashlib.sha256(b"".join(t.float().cpu().numpy().tobytes() for t in (out, *grads))).hexdigest())
"""


@pytest.mark.gpu
@gpu
def test_gpu_deterministic_mode_gives_the_same_bits_in_another_process():
    # Autotuning may choose different tiles in two processes; the pinned config may not.
    import subprocess
    import sys

    runs = [subprocess.run([sys.executable, "-c", _PINNED_RUN], capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout


@pytest.mark.gpu
@gpu
def test_gpu_flash_attention_compiles_into_one_graph():
    # Training with `train.compile: true` and the triton backend: torch.compile must trace the
    # autograd.Function and its autotuned launches without a graph break, and agree with eager.
    q, k, v = make_qkv(2, 8, 2, 1024, 1024, 128, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn_like(q)

    def attend(q, k, v):
        return flash_attention(q, k, v, causal=True)

    eager = attend(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v), dout)
    compiled = torch.compile(attend, fullgraph=True)(q, k, v)
    compiled_grads = torch.autograd.grad(compiled, (q, k, v), dout)
    for ours, theirs in zip((compiled, *compiled_grads), (eager, *eager_grads)):
        assert rel_err(ours, theirs) <= GPU_TOL[torch.bfloat16]
