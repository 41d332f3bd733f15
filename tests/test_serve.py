"""Serving without HTTP: the paged KV cache against the contiguous one, the block pool's reference
counts and prefix cache, and the continuous-batching engine against `llmstack.generate` of each
prompt alone."""
import random

import pytest
import torch

import llmstack
from llmstack.model import KVCache, ModelConfig, Transformer
from llmstack.serve import BlockPool, Engine, NoFreeBlocks, PagedKVCache, block_hash

VOCAB = 64
ATOL = 1e-5  # float32: the same math over keys gathered from blocks


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96))
    m.init_weights()
    return m.eval()


def prompts(n, seed=0, low=1, high=40):
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def alone(model, prompt, n, **kw):
    """The reference: `llmstack.generate` of one prompt, its new tokens."""
    return llmstack.generate(model, prompt, n, **kw)[len(prompt):].tolist()


# --------------------------------------------------------------------------- the paged cache


@pytest.mark.parametrize("in_attention", [False, True], ids=["cache_gathers", "attention_gathers"])
def test_paged_cache_equals_contiguous_token_for_token(model, in_attention):
    """Rows of different lengths in scattered blocks give the logits of the contiguous cache
    holding the same rows (per-row lengths), at every prefill and decode step, whether the cache
    gathers the blocks or hands the pools and block table to attention."""
    B, bs = 3, 4
    pool = BlockPool(40, bs)
    paged = PagedKVCache.for_model(model, pool, gather_in_attention=in_attention)
    contiguous = KVCache.for_model(model, B, 64)
    order = list(range(1, 40))
    random.Random(0).shuffle(order)
    tables = [order[i * 12:(i + 1) * 12] for i in range(B)]  # 12 blocks each, nowhere near in order
    lengths = [0, 0, 0]
    contiguous.set_lengths(lengths)
    torch.manual_seed(1)
    steps = [torch.randint(0, VOCAB, (B, 7)), torch.randint(0, VOCAB, (B, 5))] + \
        [torch.randint(0, VOCAB, (B, 1)) for _ in range(6)]
    with torch.no_grad():
        for ids in steps:
            T = ids.shape[1]
            paged.set_rows(tables, lengths, T)
            assert (paged.block_table is not None) == in_attention
            positions = torch.tensor(lengths)[:, None] + torch.arange(T)
            got = model(ids, cache=paged, positions=positions)
            want = model(ids, cache=contiguous)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            lengths = [n + T for n in lengths]


def test_packed_layout_equals_contiguous(model):
    """Sequences at different points (a prompt chunk, a decode, a fresh prompt) in one packed row
    give each sequence's logits of a contiguous cache holding it alone."""
    bs = 4
    pool = BlockPool(32, bs)
    paged = PagedKVCache.for_model(model, pool)
    torch.manual_seed(2)
    history = [torch.randint(0, VOCAB, (9,)), torch.randint(0, VOCAB, (1,)), torch.randint(0, VOCAB, (0,))]
    new = [torch.randint(0, VOCAB, (5,)), torch.randint(0, VOCAB, (1,)), torch.randint(0, VOCAB, (6,))]
    tables = [[7, 3, 12, 30], [5], [22, 9]]
    with torch.no_grad():
        # fill each sequence's history into its blocks
        for r, h in enumerate(history):
            if len(h):
                paged.set_rows([tables[r]], [0], len(h))
                model(h[None], cache=paged, positions=torch.arange(len(h))[None])
        positions, mask = paged.set_packed(tables, [len(h) for h in history], [len(n) for n in new])
        got = model(torch.cat(new)[None], cache=paged, positions=positions, attn_mask=mask)[0]  # (N, V)
        start = 0
        for h, n in zip(history, new):
            want = model(torch.cat([h, n])[None])[0, len(h):]
            torch.testing.assert_close(got[start:start + len(n)], want, atol=ATOL, rtol=0)
            start += len(n)


def test_block_pool_reference_counts_and_lru_eviction():
    pool = BlockPool(4, 2)  # blocks 1, 2, 3 usable
    a, b = pool.allocate(), pool.allocate()
    assert {a, b} == {1, 2} and pool.num_used == 2
    key_a, key_b = block_hash(None, [1, 2]), block_hash(None, [3, 4])
    pool.register(a, key_a)
    pool.register(b, key_b)
    pool.share(a)
    pool.release([a])
    assert pool.refs[a] == 1  # still used by its second sequence
    pool.release([a])
    pool.release([b])
    assert pool.num_used == 0 and pool.num_free == 3  # cached blocks count as free
    assert pool.lookup(key_a) == a and pool.lookup(key_b) == b
    pool.share(a)  # a is used again, so b is now the least recently used
    pool.release([a])
    c = pool.allocate()  # the never-used block first
    assert c == 3 and pool.lookup(key_b) == b
    d = pool.allocate()  # then the least recently used cached one: b
    assert d == b and pool.lookup(key_b) is None and pool.lookup(key_a) == a
    pool.allocate()
    with pytest.raises(NoFreeBlocks):
        pool.allocate()
    with pytest.raises(RuntimeError, match="released more times"):
        pool.release([c, c])


def test_prefix_keys_cover_every_token_before():
    assert block_hash(None, [1, 2]) != block_hash(block_hash(None, [0, 0]), [1, 2])
    pool = BlockPool(8, 2)
    blocks = [pool.allocate() for _ in range(3)]
    parent = None
    for blk, toks in zip(blocks, ([1, 2], [3, 4], [5, 6])):
        parent = block_hash(parent, toks)
        pool.register(blk, parent)
    found, _ = pool.match_prefix([1, 2, 3, 4, 5, 6])  # the last token is always computed: 2 blocks
    assert found == blocks[:2]
    found, _ = pool.match_prefix([1, 2, 9, 4, 5, 6, 7])
    assert found == blocks[:1]
    assert pool.refs[blocks[0]] == 3


# --------------------------------------------------------------------------- the engine


CONFIGS = {
    "roomy": dict(),
    "chunked": dict(max_batch_tokens=16, max_running=4),  # prefill in chunks, mixed with decodes
    "tiny_blocks": dict(block_size=4, max_batch_tokens=7, max_running=3),
    "preempting": dict(n_blocks=8, block_size=16, max_batch_tokens=32, max_running=4),  # 7 blocks: recompute
    "preempting_decodes": dict(n_blocks=26, block_size=4, max_batch_tokens=8, max_running=6),
    # each way a step's chunks and decodes can go through the model
    "rows": dict(max_batch_tokens=16, max_running=4, layout="rows"),
    "packed": dict(max_batch_tokens=16, max_running=4, layout="packed"),
    "split": dict(max_batch_tokens=16, max_running=4, layout="split"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_engine_greedy_equals_generate_alone(model, name):
    ps = prompts(10)
    want = [alone(model, p, 20, temperature=0, stop_tokens=()) for p in ps]
    engine = Engine(model, **CONFIGS[name])
    got = engine.generate(ps, max_tokens=20, temperature=0, stop_tokens=())
    assert got == want
    assert engine.pool.num_used == 0 and not engine.running
    if name.startswith("preempting"):
        assert engine.stats.preemptions > 0
    if name == "chunked":
        assert engine.stats.steps > 20


def test_engine_admits_requests_as_they_arrive(model):
    """Requests join mid-run (between steps) and leave on their own: each still gets its lone output."""
    ps = prompts(8, seed=3)
    lens = [5, 17, 2, 30, 9, 1, 12, 25]
    want = [alone(model, p, n, temperature=0, stop_tokens=()) for p, n in zip(ps, lens)]
    engine = Engine(model, max_batch_tokens=24, max_running=5, block_size=8)
    reqs, pending, step = [], list(zip(ps, lens)), 0
    while pending or engine.has_work():
        if pending and step % 3 == 0:
            p, n = pending.pop(0)
            reqs.append(engine.add_request(p, max_tokens=n, temperature=0, stop_tokens=()))
        engine.step()
        step += 1
    assert [r.output for r in reqs] == want
    assert [r.finish_reason for r in reqs] == ["length"] * 8
    assert engine.pool.num_used == 0


def test_engine_sampling_with_seed_equals_generate(model):
    ps = prompts(4, seed=4)
    kw = dict(temperature=0.9, top_p=0.9, top_k=20, repetition_penalty=1.2)
    want = [alone(model, p, 15, seed=7 + i, stop_tokens=(), **kw) for i, p in enumerate(ps)]
    engine = Engine(model, max_batch_tokens=20, max_running=4)
    reqs = [engine.add_request(p, max_tokens=15, seed=7 + i, stop_tokens=(), **kw) for i, p in enumerate(ps)]
    engine.add_request(prompts(1, seed=5)[0], max_tokens=15, temperature=0)  # a greedy neighbour
    while engine.has_work():
        engine.step()
    assert [r.output for r in reqs] == want


def test_engine_stop_tokens_max_tokens_and_abort(model):
    p = prompts(1, seed=6)[0]
    free_run = alone(model, p, 30, temperature=0, stop_tokens=())
    stop = free_run[7]
    first = free_run.index(stop)
    engine = Engine(model)
    a = engine.add_request(p, max_tokens=30, temperature=0, stop_tokens=[stop])
    b = engine.add_request(p, max_tokens=3, temperature=0, stop_tokens=())
    c = engine.add_request(p, max_tokens=30, temperature=0, stop_tokens=())
    engine.step()
    engine.step()
    assert engine.pool.num_used > 0
    engine.abort(c.id)
    while engine.has_work():
        engine.step()
    assert a.output == free_run[:first + 1] and a.finish_reason == "stop"
    assert b.output == free_run[:3] and b.finish_reason == "length"
    assert c.finish_reason == "abort" and c.output == free_run[:2]
    assert engine.pool.num_used == 0
    # context limit: the model's max_seq_len caps the output, as in generate
    long = prompts(1, seed=7, low=90, high=91)[0]
    d = engine.add_request(long, max_tokens=50, temperature=0, stop_tokens=())
    while engine.has_work():
        engine.step()
    assert d.output == alone(model, long, 50, temperature=0, stop_tokens=()) and len(d.tokens) == 96


def test_request_token_slices():
    from llmstack.inference.sampling import SamplingParams
    from llmstack.serve.engine import Request

    req = Request("r", [1, 2, 3], SamplingParams(), 5, [], output=[4, 5])
    for start in range(7):
        for end in range(start, 8):
            assert req.tokens_between(start, end) == req.tokens[start:end]
    assert req.num_tokens == len(req.tokens) == 5


def test_engine_rejects_bad_requests(model):
    engine = Engine(model)
    for bad, match in [(dict(prompt=[]), "empty"), (dict(prompt=[VOCAB]), "outside the vocabulary"),
                       (dict(prompt=[1] * 96), "no room"), (dict(prompt=[1], max_tokens=0), "max_tokens"),
                       (dict(prompt=[1], temperature=-1), "temperature"),
                       (dict(prompt=[1], stop_strings=["x"]), "tokenizer")]:
        with pytest.raises(ValueError, match=match):
            engine.add_request(**bad)
    assert not engine.has_work()


def test_prefix_caching_shares_blocks_and_keeps_outputs(model):
    rng = random.Random(8)
    system = [rng.randrange(VOCAB) for _ in range(40)]
    ps = [system + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 8))] for _ in range(6)]
    want = [alone(model, p, 10, temperature=0, stop_tokens=()) for p in ps]
    cached, plain = Engine(model, block_size=8), Engine(model, block_size=8, prefix_caching=False)
    for engine in (cached, plain):
        engine.generate(ps[:1], max_tokens=10, temperature=0, stop_tokens=())  # warms the cache
        assert engine.generate(ps[1:], max_tokens=10, temperature=0, stop_tokens=()) == want[1:]
        assert engine.pool.num_used == 0
    assert cached.pool.hit_rate > 0.5 and plain.pool.hit_rate == 0
    assert cached.stats.forward_tokens < plain.stats.forward_tokens - 5 * 32
    assert all(r >= 0 for r in cached.pool.refs)


def test_engine_kv_waste_is_under_one_block_per_sequence(model):
    """No block is taken ahead of need: after every step each running sequence holds exactly the
    blocks its computed tokens fill (the last one partly), chunked prefill included."""
    engine = Engine(model, block_size=8, max_batch_tokens=12, max_running=4)
    for p in prompts(6, seed=9):
        engine.add_request(p, max_tokens=20, temperature=0, stop_tokens=())
    wastes = []
    while engine.has_work():
        engine.step()
        if engine.running:
            wastes.append(engine.kv_waste())
            assert all(len(r.blocks) == -(-r.computed // 8) for r in engine.running)
    assert max(wastes) < 1


def test_bench_serve_systems_produce_the_same_tokens(model):
    """scripts/bench_serve.py's three systems, on a tiny workload: every request gets its own number
    of tokens, one time each, and all three agree (what its `same` column counts)."""
    pytest.importorskip("transformers")
    import bench_serve
    from benchlib import hf_twin

    work = bench_serve.make_workload(6, VOCAB, 96, (2, 20), (2, 10), seed=0)
    arrivals = bench_serve.make_arrivals(6, 0, seed=0)
    engine, wastes, _ = bench_serve.run_engine(model, work, arrivals, dict(block_size=4, max_batch_tokens=16, max_running=4))
    ours = bench_serve.run_static(bench_serve.llmstack_static(model), work, arrivals, 4)
    hf = bench_serve.run_static(bench_serve.hf_static(hf_twin(model)), work, arrivals, 4)
    for traces in (engine, ours, hf):
        assert [len(t.tokens) for t in traces] == [n for _, n in work]
        assert all(len(t.times) == len(t.tokens) and t.times == sorted(t.times) for t in traces)
    assert [t.tokens for t in engine] == [alone(model, p, n, temperature=0, stop_tokens=()) for p, n in work]
    assert bench_serve.summarize("ours", ours, engine)["same"] == "6/6"
    assert bench_serve.summarize("hf", hf, engine)["same"] == "6/6"
    assert 0 <= min(wastes) and max(wastes) < 1
