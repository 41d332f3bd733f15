"""The Triton paged-decode kernel (`llmstack.kernels.paged_decode`) against the gather path and the
contiguous cache.

On a machine without CUDA it runs through Triton's interpreter (float32 and float16, small
shapes); the test marked `gpu` checks bfloat16 at serving sizes against SDPA over the gathered keys.
"""
import os

import torch

if not torch.cuda.is_available():  # must precede the first `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402

pd = pytest.importorskip("llmstack.kernels.paged_decode")
from llmstack.kernels.paged_decode import paged_decode  # noqa: E402
from llmstack.model import KVCache, ModelConfig, Transformer  # noqa: E402
from llmstack.model.attention import attention, gather_blocks, naive_attention  # noqa: E402
from llmstack.serve import BlockPool, Engine, PagedKVCache  # noqa: E402
import llmstack  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def scattered(B, n_blocks, blocks_per_row, seed=0):
    """A (B, blocks_per_row) block table of distinct blocks in shuffled order (block 0 unused)."""
    order = list(range(1, n_blocks))
    random.Random(seed).shuffle(order)
    return torch.tensor([order[i * blocks_per_row:(i + 1) * blocks_per_row] for i in range(B)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("page,q_len,group", [(16, 1, 2), (4, 1, 4), (2, 3, 1), (16, 2, 2)])
def test_paged_decode_equals_gather_path(dtype, page, q_len, group):
    """Ragged rows (an empty one, one ending inside a block, one filling its table) read in place
    equal the naive attention over the gathered blocks with the same per-row lengths."""
    torch.manual_seed(0)
    B, Hkv, D, blocks = 3, 2, 16, 5
    k_pool = torch.randn(24, Hkv, page, D, dtype=dtype, device=DEVICE)
    v_pool = torch.randn_like(k_pool)
    q = torch.randn(B, Hkv * group, q_len, D, dtype=dtype, device=DEVICE)
    table = scattered(B, 24, blocks).to(DEVICE)
    lengths = torch.tensor([q_len, blocks * page - page // 2 - 1 + (page == 2), blocks * page], device=DEVICE)
    got = paged_decode(q, k_pool, v_pool, table, lengths, num_splits=2)
    k, v = gather_blocks(k_pool, table), gather_blocks(v_pool, table)
    want = naive_attention(q.float(), k.float(), v.float(), kv_lengths=lengths)
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_gather_blocks_lays_blocks_end_to_end():
    pool = torch.arange(6 * 2 * 4 * 3, dtype=torch.float32).view(6, 2, 4, 3)  # (n_blocks, Hkv, page, D)
    table = torch.tensor([[5, 1], [2, 0]])
    want = torch.stack([torch.cat([pool[b] for b in row.tolist()], dim=1) for row in table])
    assert torch.equal(gather_blocks(pool, table), want)


def test_cpu_gather_by_length_groups_equals_one_gather():
    """On a CPU the gather path cuts rows of spread lengths into groups gathered to their own
    longest row: the same output as gathering every row to the longest."""
    from llmstack.model.attention import _length_groups

    torch.manual_seed(2)
    B, page = 24, 16
    k_pool = torch.randn(B * 20 + 1, 2, page, 16)
    v_pool = torch.randn_like(k_pool)
    q = torch.randn(B, 4, 1, 16)
    table = scattered(B, B * 20 + 1, 20)
    lengths = torch.tensor([1 + (i * 97) % (20 * page) for i in range(B)])
    assert len(_length_groups(tuple(sorted(lengths.tolist(), reverse=True)), page)) > 1
    got = attention(q, k_pool, v_pool, backend="sdpa", kv_lengths=lengths, block_table=table)
    want = naive_attention(q, gather_blocks(k_pool, table), gather_blocks(v_pool, table), kv_lengths=lengths)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_triton_backend_reads_blocks_in_place(monkeypatch):
    """`attention(..., backend="triton", block_table=)` calls the kernel, which equals the sdpa
    backend's gather path."""
    torch.manual_seed(1)
    k_pool = torch.randn(16, 2, 4, 16)
    v_pool = torch.randn_like(k_pool)
    q = torch.randn(2, 4, 1, 16)
    table, lengths = scattered(2, 16, 3), torch.tensor([5, 12])
    calls = []
    real = pd.paged_decode
    monkeypatch.setattr(pd, "paged_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = attention(q, k_pool, v_pool, backend="triton", kv_lengths=lengths, block_table=table)
    want = attention(q, k_pool, v_pool, backend="sdpa", kv_lengths=lengths, block_table=table)
    assert calls == [1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_model_with_paged_kernel_equals_contiguous_cache(dtype, monkeypatch):
    """A model on the triton backend over a paged cache that hands attention its pools: the logits
    of the contiguous cache (sdpa) at every prefill and decode step, rows of different lengths in
    scattered blocks, and the same greedy tokens."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    model = Transformer(cfg)
    model.init_weights()
    model = model.to(dtype).eval()
    B, bs = 3, 4
    paged = PagedKVCache.for_model(model, BlockPool(40, bs), gather_in_attention=True)
    contiguous = KVCache.for_model(model, B, 48)
    tables = scattered(B, 40, 12, seed=3).tolist()
    lengths = [0, 3, 0]
    contiguous.set_lengths(lengths)
    steps = [torch.randint(0, 64, (B, 5))] + [torch.randint(0, 64, (B, 1)) for _ in range(4)]
    calls = []
    real = pd.paged_decode
    monkeypatch.setattr(pd, "paged_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        # row 1 starts 3 tokens ahead: prefill them alone, through both caches
        first = torch.randint(0, 64, (1, 3))
        paged.set_rows([tables[1]], [0], 3)
        model(first, cache=paged, positions=torch.arange(3)[None])
        one = KVCache.for_model(model, 1, 48)
        model(first, cache=one)
        contiguous.k[:, 1:2, :, :3], contiguous.v[:, 1:2, :, :3] = one.k[:, :, :, :3], one.v[:, :, :, :3]
        for ids in steps:
            T = ids.shape[1]
            paged.set_rows(tables, lengths, T)
            positions = torch.tensor(lengths)[:, None] + torch.arange(T)
            cfg.attn_backend = "triton"
            got = model(ids, cache=paged, positions=positions).float()
            cfg.attn_backend = "sdpa"
            want = model(ids, cache=contiguous).float()
            torch.testing.assert_close(got, want, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)
            if dtype == torch.float32:
                assert torch.equal(got.argmax(-1), want.argmax(-1))
            lengths = [n + T for n in lengths]
    assert len(calls) == len(steps) * cfg.n_layers  # every step's attention read the pools in place


def test_engine_on_paged_kernel_equals_generate_alone(monkeypatch):
    """The engine on the triton backend, every step as rows (prompts too), reads its pools only
    through the kernel, with 4-slot blocks, and its greedy tokens equal `generate` (sdpa) alone."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    model = Transformer(cfg)
    model.init_weights()
    model.eval()
    rng = random.Random(0)
    ps = [[rng.randrange(64) for _ in range(rng.randrange(1, 20))] for _ in range(5)]
    want = [llmstack.generate(model, p, 8, temperature=0, stop_tokens=())[len(p):].tolist() for p in ps]
    calls = []
    real = pd.paged_decode
    monkeypatch.setattr(pd, "paged_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg.attn_backend = "triton"
    engine = Engine(model, block_size=4, max_batch_tokens=16, max_running=3, layout="rows")
    got = engine.generate(ps, max_tokens=8, temperature=0, stop_tokens=())
    assert got == want
    assert len(calls) == engine.stats.steps * cfg.n_layers


@pytest.mark.gpu
def test_paged_decode_bf16_cuda_equals_sdpa_over_gathered_blocks():
    """Serving sizes on a GPU: 64 rows of up to 1,000 keys in 16-slot blocks, GQA 4, head_dim 128."""
    torch.manual_seed(0)
    B, Hkv, group, D, page, blocks = 64, 8, 4, 128, 16, 64
    k_pool = torch.randn(B * blocks + 1, Hkv, page, D, dtype=torch.bfloat16, device="cuda")
    v_pool = torch.randn_like(k_pool)
    q = torch.randn(B, Hkv * group, 1, D, dtype=torch.bfloat16, device="cuda")
    table = scattered(B, B * blocks + 1, blocks).cuda()
    lengths = torch.randint(1, blocks * page + 1, (B,), device="cuda")
    got = paged_decode(q, k_pool, v_pool, table, lengths)
    k, v = gather_blocks(k_pool, table), gather_blocks(v_pool, table)
    want = attention(q, k, v, backend="sdpa", kv_lengths=lengths)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])
