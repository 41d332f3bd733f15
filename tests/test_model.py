"""The Transformer and its parts against torch.nn / transformers references and the properties they must have."""
import math

import pytest
import torch

from llmstack.model import MoEConfig, ModelConfig, RopeScaling, model_preset
from llmstack.model import (KVCache, MoE, RMSNorm, Transformer, apply_rope, attention, count_params, flops_per_token,
                            rope_cos_sin, rope_frequencies)
from llmstack.interop.hf import fuse_projections, split_projections
from llmstack.model.attention import _triton_available


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def build(cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg)
    model.init_weights()
    return model.eval()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------- parts vs torch.nn


def test_rmsnorm_matches_its_formula():
    """x / sqrt(mean(x^2) + eps) * weight, against float64; in bfloat16 within one rounding of
    Llama's order (normalise in float32, round, then scale)."""
    x = torch.randn(3, 7, 32) * 5
    ours = RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        xd, wd = x.double(), ours.weight.double()
        expected = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * wd
        torch.testing.assert_close(ours(x).double(), expected, rtol=1e-5, atol=1e-6)
        ours.to(torch.bfloat16)
        xb = x.bfloat16()
        llama = ours.weight * (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
        torch.testing.assert_close(ours(xb), llama, rtol=2 ** -7, atol=1e-6)


def test_training_norm_and_swiglu_gradients_match_autograd_of_their_formulas():
    """The hand-written backward passes (llmstack.model.functional) against autograd through
    the plain formulas in float64 (gradcheck), and against the inference path's values."""
    from llmstack.model.functional import RMSNormFunction, SwiGLUFunction, rms_norm, swiglu

    x = (torch.randn(2, 5, 16, dtype=torch.float64) * 3).requires_grad_()
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-6), (x, w))
    gate, up = (torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (gate, up))
    # Frozen inputs (LoRA freezes the norm weights) get no gradient and cost none.
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float()
    rms_norm(x32, w32, 1e-6).sum().backward()
    expected = torch.autograd.grad(torch.nn.functional.rms_norm(x32, (16,), w32, 1e-6).sum(), x32)[0]
    torch.testing.assert_close(x32.grad, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the training path computes the same values as the inference path
        torch.testing.assert_close(rms_norm(x32, w32, 1e-6), RMSNormFunction.apply(x32, w32, 1e-6))
        torch.testing.assert_close(swiglu(gate.float(), up.float()), SwiGLUFunction.apply(gate.float(), up.float()))


@pytest.mark.parametrize("tied", [True, False])
def test_fused_head_and_loss_equal_logits_then_cross_entropy(tied):
    """model(x, targets=y) (the head and the loss fused chunk by chunk, gradients computed in
    the forward pass) equals the summed F.cross_entropy of model(x)'s logits, in value and in
    every parameter's gradient, ignored targets included; float64 gradcheck of the function
    across chunk boundaries; the no-grad path and bfloat16 autocast agree."""
    from llmstack.model.functional import LinearCrossEntropyFunction, linear_cross_entropy

    h = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, -100, 12, 5, 5, -100, 1, 7, 2])
    assert torch.autograd.gradcheck(lambda h, w: LinearCrossEntropyFunction.apply(h, w, t, -100, 4), (h, w))

    torch.manual_seed(0)
    model = build(tiny(tie_embeddings=tied)).train()
    x, y = torch.randint(0, 97, (3, 9)), torch.randint(0, 97, (3, 9))
    y[0, :4] = -100
    expected = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    loss = model(x, targets=y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x, targets=y), expected, rtol=1e-5, atol=1e-5)
        hidden = torch.randn(27, 64)
        torch.testing.assert_close(linear_cross_entropy(hidden, model.embed.weight, y.flatten(), chunk_size=5),
                                   torch.nn.functional.cross_entropy(hidden @ model.embed.weight.t(), y.flatten(),
                                                                     reduction="sum"), rtol=1e-5, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(x, targets=y)
        plain = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="sum")
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-2, atol=1e-2)


def test_training_norm_keeps_float32_sums_under_autocast():
    """Under bfloat16 autocast the norm's row sums stay in float32 (autocast would run
    `vecdot` in bfloat16): the result equals the float32 computation rounded once."""
    x = torch.randn(4, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (64,), w, 1e-6), rtol=1e-6, atol=1e-6)


def test_attention_module_matches_torch_multihead_attention():
    """MHA without positions equals torch.nn.MultiheadAttention with a causal mask."""
    cfg = tiny(n_kv_heads=4, pos="none", qkv_bias=True, bias=True, attn_backend="naive")
    attn = build(cfg).layers[0].attn
    ref = torch.nn.MultiheadAttention(64, 4, bias=True, batch_first=True)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.1)
        ref.in_proj_weight.copy_(attn.qkv_proj.weight)  # both stack q, k, v rows in that order
        ref.in_proj_bias.copy_(attn.qkv_proj.bias)
        ref.out_proj.weight.copy_(attn.o_proj.weight)
        ref.out_proj.bias.copy_(attn.o_proj.bias)
    x = torch.randn(2, 11, 64)
    causal = torch.triu(torch.ones(11, 11, dtype=torch.bool), 1)
    expected, _ = ref(x, x, x, attn_mask=causal, need_weights=False)
    assert rel_err(attn(x), expected) < 1e-5


# ----------------------------------------------------------------------------- attention backends

BACKENDS = ["naive", "sdpa"] + (["triton"] if _triton_available() else [])


def reference_attention(q, k, v, causal=True, key_mask=None, window=None):
    """float64 softmax(QK^T/sqrt(d) + mask)V with K/V repeated for GQA."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    tq, tk = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    i = torch.arange(tk - tq, tk)[:, None]
    j = torch.arange(tk)[None]
    allowed = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= j > i - window
    allowed = allowed.expand(q.shape[0], 1, tq, tk)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("tq, tk", [(13, 13), (1, 20), (5, 20)])
@pytest.mark.parametrize("causal", [True, False])
def test_backends_agree_with_reference(backend, hq, hkv, tq, tk, causal):
    q = torch.randn(2, hq, tq, 16)
    k, v = torch.randn(2, hkv, tk, 16), torch.randn(2, hkv, tk, 16)
    out = attention(q, k, v, backend=backend, causal=causal)
    assert rel_err(out, reference_attention(q, k, v, causal)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_padding_mask_and_window(backend):
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, :3] = False  # left padding on row 1
    out = attention(q, k, v, backend=backend, key_mask=key_mask, window=4)
    ref = reference_attention(q, k, v, key_mask=key_mask, window=4)
    valid = key_mask[:, None, :, None].expand_as(out)  # padded queries' outputs are unused
    assert rel_err(out[valid], ref[valid]) < 1e-5
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- positions


def test_rope_depends_only_on_relative_position():
    inv_freq, _ = rope_frequencies(16, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        cq, sq = rope_cos_sin(torch.tensor([m]), inv_freq)
        ck, sk = rope_cos_sin(torch.tensor([n]), inv_freq)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(3, 1), score(103, 101), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(3, 1), score(1, 3), atol=1e-3)


def test_rope_matches_complex_number_formulation():
    """RoPE as the paper writes it: channel pairs (x_i, x_{i+d/2}) as complex numbers,
    multiplied by e^{i * position * theta_i}. Values and gradients (our hand-written
    backward against autograd through the complex product), shared and per-row positions."""
    d = 16
    inv_freq, _ = rope_frequencies(d, 500.0)
    positions = torch.tensor([[0, 1, 2, 5, 11, 100, 1000], [3, 4, 5, 6, 7, 8, 9]])
    for pos in (positions[0], positions):  # (T,) and (B, T)
        x = torch.randn(2, 3, 7, d, dtype=torch.float64, requires_grad=True)
        cos, sin = rope_cos_sin(pos, inv_freq, dtype=torch.float64)
        ours = apply_rope(x, cos, sin)
        z = torch.complex(x[..., : d // 2], x[..., d // 2:])
        angles = pos[..., None].double() * inv_freq.double()  # (T, d/2) or (B, T, d/2)
        rotated = z * torch.polar(torch.ones_like(angles), angles)[..., None, :, :] if pos.dim() == 2 else \
            z * torch.polar(torch.ones_like(angles), angles)
        expected = torch.cat((rotated.real, rotated.imag), dim=-1)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        dy = torch.randn_like(ours)
        torch.testing.assert_close(torch.autograd.grad(ours, x, dy)[0], torch.autograd.grad(expected, x, dy)[0],
                                   rtol=1e-5, atol=1e-5)  # cos/sin are computed in float32
        with torch.no_grad():  # the inference path agrees with the training path
            torch.testing.assert_close(apply_rope(x, cos, sin), ours)


@pytest.mark.parametrize("scaling", [
    None,
    RopeScaling(type="linear", factor=4.0),
    RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64),
    RopeScaling(type="yarn", factor=4.0, original_max_seq_len=64),
])
def test_rope_frequencies_match_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "default", "rope_theta": 10000.0}
    if scaling is not None:
        params = {"rope_type": scaling.type, "rope_theta": 10000.0, "factor": scaling.factor}
        if scaling.type in ("llama3", "yarn"):
            params["original_max_position_embeddings"] = scaling.original_max_seq_len
        if scaling.type == "llama3":
            params.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor)
    hf_cfg = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=512, rope_parameters=params)
    if scaling is None:
        expected = 1.0 / (10000.0 ** (torch.arange(0, 32, 2).float() / 32))
        factor = 1.0
    else:
        expected, factor = ROPE_INIT_FUNCTIONS[scaling.type](hf_cfg, "cpu")
    ours, our_factor = rope_frequencies(32, 10000.0, scaling)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-5, atol=1e-7)
    assert our_factor == pytest.approx(factor)


def test_ntk_scaling_keeps_highest_frequency_and_stretches_lowest_by_factor():
    base, _ = rope_frequencies(32, 10000.0)
    ntk, _ = rope_frequencies(32, 10000.0, RopeScaling(type="ntk", factor=4.0))
    assert ntk[0] == pytest.approx(base[0])
    assert (base[-1] / ntk[-1]).item() == pytest.approx(4.0, rel=1e-4)


# ----------------------------------------------------------------------------- the whole model


@pytest.mark.parametrize("variant", [
    {},
    {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "qkv_bias": True, "tie_embeddings": True},
    {"pos": "sinusoidal"},
    {"pos": "none", "qk_norm": True},
    {"sliding_window": 5},
    {"moe": MoEConfig(n_experts=4, top_k=2, n_shared_experts=1)},
])
def test_causality_and_backend_agreement(variant):
    model = build(tiny(**variant))
    x = torch.randint(0, 97, (2, 17))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 17, 97)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)  # the past ignores the future
    for backend in BACKENDS:
        model.config.attn_backend = backend
        with torch.no_grad():
            assert rel_err(model(x), a) < 1e-5, backend


@pytest.mark.parametrize("variant", [{}, {"sliding_window": 6}, {"moe": MoEConfig(n_experts=4, top_k=2)}])
def test_cached_forward_equals_full_forward(variant):
    model = build(tiny(**variant))
    x = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        full = model(x)
        cache = KVCache.for_model(model, batch_size=2, max_seq_len=32)
        parts = [model(x[:, :9], cache=cache), model(x[:, 9:10], cache=cache), model(x[:, 10:], cache=cache)]
    assert cache.seq_len == 23
    assert rel_err(torch.cat(parts, 1), full) < 1e-5
    with torch.no_grad():  # logits for the last positions only: the same values, the cache filled alike
        cache.reset()
        last = model(x[:, :20], cache=cache, logits_to_keep=1)
        assert last.shape == (2, 1, 97) and cache.seq_len == 20
        assert rel_err(last, full[:, 19:20]) < 1e-5
        assert rel_err(model(x[:, 20:], cache=cache, logits_to_keep=2), full[:, 21:]) < 1e-5


def test_gqa_equals_mha_with_repeated_kv_heads():
    """A GQA model is an MHA model whose K/V projections repeat each KV head for its query heads."""
    gqa = build(tiny(n_kv_heads=2))
    mha = Transformer(tiny(n_kv_heads=4)).eval()
    rep, d = 2, gqa.config.head_dim
    state = {}
    for name, w in split_projections(gqa.state_dict(), gqa.config).items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (Hkv*D, C) -> (Hkv*rep*D, C)
            w = w.view(-1, 1, d, w.shape[-1]).expand(-1, rep, -1, -1).reshape(-1, w.shape[-1])
        state[name] = w
    mha.load_state_dict(fuse_projections(state))
    x = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        assert rel_err(mha(x), gqa(x)) < 1e-5


def test_padding_mask_gives_each_row_its_own_result():
    model = build(tiny())
    a, b = torch.randint(1, 97, (1, 12)), torch.randint(1, 97, (1, 7))
    batch = torch.zeros(2, 12, dtype=torch.long)
    batch[0], batch[1, :7] = a[0], b[0]  # right padding
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0], mask[1, :7] = True, True
    with torch.no_grad():
        out = model(batch, attn_mask=mask)
        assert rel_err(out[0], model(a)[0]) < 1e-5
        assert rel_err(out[1, :7], model(b)[0]) < 1e-5


def test_builds_on_meta_device_then_initialises():
    cfg = tiny(tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.lm_head is None  # tied: the output projection is embed.weight
    # Residual output projections are scaled down by 1/sqrt(2 * n_layers).
    big = build(tiny(dim=256, n_heads=4, n_kv_heads=4, ffn_hidden=512))
    std_q = big.layers[0].attn.qkv_proj.weight.std().item()
    std_o = big.layers[0].attn.o_proj.weight.std().item()
    assert std_q == pytest.approx(0.02, rel=0.05)
    assert std_o == pytest.approx(0.02 / math.sqrt(4), rel=0.05)
    assert torch.allclose(big.rope_inv_freq, rope_frequencies(64, 10000.0)[0])


# Published parameter counts of the shapes in configs/model/.
PUBLISHED = {
    "gpt2-124m": 124_439_808,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "qwen2.5-0.5b": 494_032_768,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_published(name):
    assert count_params(model_preset(name)) == pytest.approx(PUBLISHED[name], rel=0.01)


def test_mixtral_active_parameters_and_flops():
    cfg = model_preset("mixtral-8x7b")
    assert count_params(cfg, active=True) == pytest.approx(12.9e9, rel=0.01)  # "12.9B active"
    llama = tiny()
    n = count_params(llama) - llama.vocab_size * llama.dim
    assert flops_per_token(llama, 64) == 6 * n + 12 * 2 * 4 * 16 * 64


# ----------------------------------------------------------------------------- mixture of experts


def moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax over experts, top-k, renormalise, weighted sum of expert outputs."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = moe.router(x[t]).softmax(-1)
        w, idx = probs.topk(moe.top_k)
        w = w / w.sum() if moe.norm_topk_prob else w
        for weight, e in zip(w, idx):
            out[t] += weight * moe.experts[int(e)](x[t])
        if moe.shared is not None:
            out[t] += moe.shared(x[t])
    return out


@pytest.mark.parametrize("top_k, shared, norm", [(1, 0, True), (2, 0, True), (2, 1, False), (4, 0, True)])
def test_moe_grouped_dispatch_equals_per_token_reference(top_k, shared, norm):
    cfg = tiny(moe=MoEConfig(n_experts=4, top_k=top_k, n_shared_experts=shared, norm_topk_prob=norm))
    moe = build(cfg).layers[0].mlp
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        out = moe(x)
        ref = moe_reference(moe, x.reshape(-1, 64)).view_as(x)
    assert rel_err(out, ref) < 1e-5
    assert moe.expert_load.sum().item() == pytest.approx(1.0)


def test_moe_aux_losses_follow_their_definitions():
    cfg = tiny(moe=MoEConfig(n_experts=4, top_k=2, aux_loss_coef=1.0, z_loss_coef=0.0))
    model = build(cfg)
    x = torch.randint(0, 97, (2, 9))
    _, aux = model(x, return_aux=True)
    moe = model.layers[0].mlp
    assert aux["aux_loss"].requires_grad and aux["expert_load"].shape == (2, 4)
    # A uniform router gives P_i = 1/E, so E * sum_i f_i * P_i = sum_i f_i = 1 whatever the loads.
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(1, 16, 64))
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    # z-loss of zero logits is logsumexp(0)^2 = log(E)^2.
    moe.aux_loss_coef, moe.z_loss_coef = 0.0, 1.0
    moe(torch.randn(1, 16, 64))
    assert moe.aux_loss.item() == pytest.approx(math.log(4) ** 2, rel=1e-5)


def test_balancing_loss_is_minimal_for_uniform_routing():
    cfg = tiny(moe=MoEConfig(n_experts=4, top_k=1, aux_loss_coef=1.0, z_loss_coef=0.0))
    moe = build(cfg).layers[0].mlp
    x = torch.randn(1, 64, 64)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe(x)
        uniform = moe.aux_loss.item()
        for scale in (0.1, 1.0, 10.0):  # ever more confident, ever more skewed routers
            moe.router.weight.normal_(0, scale)
            moe.router.weight[0] += scale  # and one favourite expert
            moe(x.abs())
            assert moe.aux_loss.item() > uniform
    assert uniform == pytest.approx(1.0, abs=1e-6)


def test_aux_loss_free_bias_balances_a_skewed_router():
    cfg = tiny(moe=MoEConfig(n_experts=4, top_k=1, balancing="bias", bias_update_rate=0.01))
    moe = build(cfg).layers[0].mlp.train()
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.1)
        moe.router.weight[0] += 0.05  # expert 0 wins for most positive inputs
    x = torch.randn(1, 256, 64).abs()
    moe(x)
    skewed = moe.expert_load.max().item()
    assert skewed > 0.6
    for _ in range(100):
        moe(x)
    assert moe.aux_loss is None
    assert moe.expert_load.max().item() < skewed
    assert moe.expert_load.max().item() < 0.5


def test_dropout_only_in_training():
    model = build(tiny(dropout=0.2, attn_dropout=0.2))
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # eval: deterministic
        model.train()
        a, b = model(x), model(x)
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------- hooks for what is applied from outside


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 3])
def test_backends_agree_with_per_row_kv_lengths(backend, window):
    """kv_lengths: row b attends over its first kv_lengths[b] key slots only, its queries being the
    last Tq of those; equal to each row run on its own slots, against float64."""
    torch.manual_seed(0)
    tq, tk = 2, 12
    q, k, v = torch.randn(3, 4, tq, 16), torch.randn(3, 2, tk, 16), torch.randn(3, 2, tk, 16)
    lengths = torch.tensor([12, 5, 2])
    k[1, :, 5:] = v[1, :, 5:] = 1e4  # slots past a row's length hold stale values that must not leak in
    out = attention(q, k, v, backend=backend, kv_lengths=lengths, window=window)
    for b, n in enumerate(lengths.tolist()):
        ref = reference_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], window=window)
        assert rel_err(out[b:b + 1], ref) < 1e-5, (backend, b)


def _right_padded_prefill(model, prompts, cache):
    """Prefill prompts of different lengths as one right-padded batch, then give each row of the
    cache its own length; returns the logits of each prompt's last token (B, V)."""
    T = max(len(p) for p in prompts)
    batch = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    logits = model(batch, cache=cache)  # padding sits after each prompt: causal attention never sees it
    cache.set_lengths([len(p) for p in prompts])
    return logits[torch.arange(len(prompts)), torch.tensor([len(p) for p in prompts]) - 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_rows_at_their_own_lengths_decode_like_each_row_alone(backend):
    """A KVCache whose rows hold different lengths (no left padding, each row at its own
    positions): every decode step's logits equal those of the row decoded alone."""
    torch.manual_seed(0)
    model = build(tiny(attn_backend=backend))
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (9, 3, 6)]
    steps = torch.randint(0, 97, (len(prompts), 4))
    with torch.no_grad():
        cache = KVCache.for_model(model, len(prompts), 20)
        batched = [_right_padded_prefill(model, prompts, cache)]
        for i in range(steps.shape[1]):
            batched.append(model(steps[:, i:i + 1], cache=cache)[:, -1])
        assert cache.lengths.tolist() == [len(p) + steps.shape[1] for p in prompts]
        for b, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt + steps[b].tolist()]))[0]  # (T, V)
            expected = alone[len(prompt) - 1:]
            got = torch.stack([step[b] for step in batched])
            assert rel_err(got, expected) < 1e-5, (backend, b)


class PagedCache:
    """The smallest paged cache: per layer one pool of fixed-size blocks, a block table per row
    (blocks deliberately out of order), per-row lengths; `update` returns the pools."""

    def __init__(self, model, batch_size, n_blocks, block_size, blocks_per_row):
        cfg = model.config
        self.pools = [(torch.zeros(n_blocks, cfg.n_kv_heads, block_size, cfg.head_dim),
                       torch.zeros(n_blocks, cfg.n_kv_heads, block_size, cfg.head_dim)) for _ in range(cfg.n_layers)]
        self.block_size = block_size
        self.block_table = torch.randperm(n_blocks)[:batch_size * blocks_per_row].view(batch_size, blocks_per_row)
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        self.seq_len = 0

    def update(self, layer, k, v):
        T = k.shape[2]
        slots = self.lengths[:, None] + torch.arange(T)  # (B, T)
        blocks = self.block_table.gather(1, slots // self.block_size)
        k_pool, v_pool = self.pools[layer]
        k_pool[blocks, :, slots % self.block_size] = k.transpose(1, 2)  # (B, T, Hkv, D) into the pools
        v_pool[blocks, :, slots % self.block_size] = v.transpose(1, 2)
        return k_pool, v_pool

    def advance(self, n):
        self.lengths += n
        self.seq_len += n

    def set_lengths(self, lengths):
        self.lengths = torch.tensor(lengths)
        self.seq_len = max(lengths)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_paged_cache_hands_its_block_table_to_the_attention_backend(backend):
    """The cache interface admits a paged cache: its block table and per-row lengths reach the
    attention backend, and decoding through it gives the contiguous cache's logits."""
    torch.manual_seed(0)
    model = build(tiny(attn_backend=backend))
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (7, 2, 5)]
    steps = torch.randint(0, 97, (3, 5))
    out = {}
    with torch.no_grad():
        for name, cache in (("contiguous", KVCache.for_model(model, 3, 16)),
                            ("paged", PagedCache(model, 3, n_blocks=20, block_size=4, blocks_per_row=4))):
            logits = [_right_padded_prefill(model, prompts, cache)]
            logits += [model(steps[:, i:i + 1], cache=cache)[:, -1] for i in range(steps.shape[1])]
            out[name] = torch.stack(logits, 1)
    assert rel_err(out["paged"], out["contiguous"]) < 1e-5


def test_attention_runs_on_a_tensor_parallel_shard_of_its_heads():
    """Attention reads head counts from its tensors: a shard holding half of the KV groups (their
    q, k and v rows of qkv_proj and their columns of o_proj) computes its part of the output, and
    the shards' parts add up to the whole layer's (what tensor parallelism sums across ranks)."""
    torch.manual_seed(0)
    cfg = tiny(n_heads=8, n_kv_heads=4, dim=64, qkv_bias=True)
    attn = build(cfg).layers[0].attn
    H, Hkv, D, G = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    x = torch.randn(2, 9, 64)
    rope = rope_cos_sin(torch.arange(9), build(cfg).rope_inv_freq)
    with torch.no_grad():
        full = attn(x, rope)
        parts = []
        for shard in range(2):
            kv = torch.arange(shard * Hkv // 2, (shard + 1) * Hkv // 2)  # this shard's KV heads
            q_heads = (kv[:, None] * G + torch.arange(G)).flatten()  # and the query heads they serve
            heads = torch.cat([q_heads, H + kv, H + Hkv + kv])
            rows = (heads[:, None] * D + torch.arange(D)).flatten()
            part = type(attn)(cfg, 0)
            part.qkv_proj = torch.nn.Linear(64, len(rows), bias=True)
            part.o_proj = torch.nn.Linear(len(q_heads) * D, 64, bias=False)
            part.qkv_proj.weight.copy_(attn.qkv_proj.weight[rows])
            part.qkv_proj.bias.copy_(attn.qkv_proj.bias[rows])
            part.o_proj.weight.copy_(attn.o_proj.weight[:, (q_heads[:, None] * D + torch.arange(D)).flatten()])
            parts.append(part(x, rope))
    assert rel_err(parts[0] + parts[1], full) < 1e-5


def test_return_hidden_gives_what_the_head_and_the_loss_read():
    """forward(..., return_hidden=True) is the final normed hidden state: the head of it is the
    logits, and the loss from targets is the cross-entropy of those logits."""
    model = build(tiny(tie_embeddings=True))
    x, y = torch.randint(0, 97, (2, 11)), torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        hidden = model(x, return_hidden=True)
        assert hidden.shape == (2, 11, 64)
        torch.testing.assert_close(model.head(hidden), model(x))
        expected = torch.nn.functional.cross_entropy(model.head(hidden).flatten(0, 1), y.flatten(), reduction="sum")
        torch.testing.assert_close(model(x, targets=y), expected, rtol=1e-5, atol=1e-4)
        last = model(x, return_hidden=True, logits_to_keep=1)
        torch.testing.assert_close(last, hidden[:, -1:])
    with pytest.raises(ValueError, match="return_hidden and targets"):
        model(x, targets=y, return_hidden=True)


def test_each_module_initialises_itself():
    """init_weights asks every block's modules for their own rules: a module swapped in from
    outside brings its own `init_weights`, and the model's rules hold for the rest."""
    class Doubling(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.empty(()))

        def forward(self, x):
            return 2 * self.scale * x

        def init_weights(self, std, residual_std):
            self.scale.fill_(residual_std / std)

    model = Transformer(tiny(n_layers=8, bias=True, qk_norm=True))
    model.layers[3].mlp = Doubling()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.layers[3].mlp.scale.item() == pytest.approx(1 / math.sqrt(16))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif "norm" in name:
            assert torch.all(p == 1), name
