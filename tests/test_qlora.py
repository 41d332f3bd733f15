"""QLoRA: the NF4 code book is bitsandbytes' (the paper's), quantize/dequantize agrees with a plain
float64 implementation of the same scheme (block 64, double-quantized absmaxes in blocks of 256),
the Triton dequantize kernel equals the PyTorch path (float32, bit for bit), the base weights take
about 4.13 bits per parameter, LoRA over an nf4 base trains like LoRA over the float one while the
base stays bit-identical, and an nf4 checkpoint reloads as it was saved."""
import pytest
import torch

from llmstack import kernels
from llmstack.finetune import apply_lora, merge_lora, remove_lora
from llmstack.inference import quantize as Q
from llmstack.inference.quantize import (NF4_CODE, QuantizedLinear, dequantize_nf4, dynamic_map, load_quantized,
                                         quantization_of, quantize_, quantize_nf4, save_quantized)
from llmstack.model import ModelConfig, build_model

# The published list: QLoRA paper (Dettmers et al. 2023), appendix E; bitsandbytes get_4bit_type("nf4").
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def tiny(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                                max_seq_len=32), **overrides})
    model = build_model(cfg)
    model.init_weights()
    return model.to(dtype).eval()


def ids(vocab=64, batch=4, length=24, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ code books


def test_nf4_code_book_is_the_published_one():
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    assert code.tolist() == torch.tensor(PUBLISHED_NF4, dtype=torch.float32).tolist()
    assert len(NF4_CODE) == 16 and list(NF4_CODE) == sorted(NF4_CODE) and len(set(NF4_CODE)) == 16
    assert {-1.0, 0.0, 1.0} <= set(NF4_CODE)
    assert sum(v < 0 for v in NF4_CODE) == 7 and sum(v > 0 for v in NF4_CODE) == 8  # asymmetric: 0 exact


def test_dynamic_map_is_256_sorted_values_in_the_unit_interval():
    dyn = dynamic_map()
    assert dyn.shape == (256,) and dyn.dtype == torch.float32
    assert torch.equal(dyn, dyn.sort().values) and dyn.unique().numel() == 256
    assert dyn.max() == 1.0 and 0.0 in dyn.tolist() and dyn.min() > -1.0


# ------------------------------------------------------------------------------ the scheme


def reference_nf4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheme written plainly in float64: (4-bit codes, dequantized weights), flat."""
    w = w.double().flatten()
    nf4, dyn = torch.tensor(PUBLISHED_NF4, dtype=torch.float64), dynamic_map().double()

    def blockwise(x, block, code):  # nearest code to x / absmax, per block (the last may be shorter)
        blocks = torch.split(x, block)
        absmax = torch.stack([b.abs().max() for b in blocks])
        codes = torch.cat([(b[:, None] / (m if m > 0 else 1) - code).abs().argmin(1) for b, m in zip(blocks, absmax)])
        return codes, absmax

    codes, absmax = blockwise(w, 64, nf4)
    offset = absmax.mean()
    acodes, absmax2 = blockwise(absmax - offset, 256, dyn)
    absmax_hat = dyn[acodes] * absmax2.repeat_interleave(256)[: absmax.numel()] + offset
    return codes, nf4[codes] * absmax_hat.repeat_interleave(64)[: w.numel()]


@pytest.mark.parametrize("shape", [(160, 256), (7, 13), (3, 64)])
def test_round_trip_matches_a_float64_reference(shape):
    # (160, 256): 640 blocks, so three absmax groups, the last one half full. (7, 13): 91 weights,
    # a short last block and an odd count (a zero nibble pads the last byte).
    w = torch.randn(shape) * torch.linspace(0.2, 3, shape[1])  # blocks with different ranges
    qweight, absmax, absmax_scale, offset = quantize_nf4(w)
    ours = dequantize_nf4(qweight, absmax, absmax_scale, offset, shape)
    assert ours.shape == shape and ours.dtype == torch.float32
    codes, ref = reference_nf4(w)
    ours_codes = Q.unpack_nf4(qweight, w.numel()).long()
    # float32 against float64: an element within rounding of a midpoint may pick the other code.
    assert (ours_codes == codes).float().mean() >= 0.999
    same = ours_codes == codes
    assert torch.allclose(ours.flatten()[same].double(), ref[same], rtol=1e-6, atol=1e-7)
    err_ours = (ours.double().flatten() - w.double().flatten()).norm() / w.double().norm()
    err_ref = (ref - w.double().flatten()).norm() / w.double().norm()
    assert abs(err_ours - err_ref) <= 0.01 * err_ref
    assert err_ours < 0.11  # measured 0.092 on normal weights


def test_a_zero_block_dequantizes_to_zero():
    w = torch.zeros(4, 64)
    w[2:] = torch.randn(2, 64)
    out = dequantize_nf4(*quantize_nf4(w), w.shape)
    assert torch.equal(out[:2], w[:2]) and out.isfinite().all()


def test_base_weights_take_about_4_13_bits_per_parameter():
    model = tiny(dim=256, ffn_hidden=512, n_heads=4, n_kv_heads=2).to(torch.bfloat16)
    bf16_bytes = sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not
                     model.lm_head)
    quantize_(model, "nf4", skip=("router", "lm_head"))
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    params = sum(m.weight_shape[0] * m.weight_shape[1] for m in layers)
    nf4_bytes = sum(b.nbytes for m in layers for b in m.buffers())
    assert 2 * params == bf16_bytes
    bits = 8 * nf4_bytes / params
    assert 4.125 <= bits <= 4.14, bits  # 4 + 8/64 + 32/(64*256), plus one float32 offset per layer
    assert nf4_bytes <= 0.3 * bf16_bytes


# ------------------------------------------------------------------------------ the kernel


@pytest.mark.skipif(not kernels.available("nf4"), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(160, 256), (7, 13), (1, 2)])
def test_triton_dequantize_equals_pytorch(shape, dtype):
    from llmstack.kernels import nf4

    w = torch.randn(shape)
    q = quantize_nf4(w)
    out = nf4.dequantize(*q, Q._table("nf4", "cpu"), Q._table("dynamic", "cpu"), shape, dtype)
    assert out.dtype == dtype and torch.equal(out, dequantize_nf4(*q, shape, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_dequantize_on_cuda(dtype):
    w = torch.randn(1000, 1003)  # 1,003,000 weights: partial blocks and absmax groups, many programs
    layer = QuantizedLinear.from_linear(torch.nn.Linear(1003, 1000, bias=False), "nf4")
    layer.quantize_from(w)
    expected = layer.dequantize(torch.float32)  # the CPU PyTorch path
    out = layer.cuda().dequantize(dtype)  # on CUDA: the Triton kernel
    # The GPU may fuse the absmax's product and sum (one rounding): 1e-6 relative before rounding to dtype.
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.cpu().float(), expected, rtol=tol, atol=1e-6)
    x = torch.randn(5, 1003, dtype=dtype, device="cuda", requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.dtype == dtype and x.grad.isfinite().all()


# ------------------------------------------------------------------------------ QLoRA


def test_nf4_layer_gives_gradients_to_x_and_none_to_its_buffers():
    linear = torch.nn.Linear(64, 48, bias=True)
    layer = QuantizedLinear.from_linear(linear, "nf4")
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    w = layer.dequantize(torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, x @ w.T + linear.bias.double(), rtol=1e-12, atol=1e-12)
    torch.autograd.gradcheck(lambda x: layer(x), (x,))
    assert all(not b.requires_grad for b in layer.buffers())


def train(model, steps=40, lr=1e-2):
    x = ids()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(x[:, :-1], targets=x[:, 1:]) / x[:, 1:].numel()  # the model returns the sum
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_qlora_lowers_the_loss_like_lora_on_the_float_base():
    lora = apply_lora(tiny(), rank=8, alpha=16, targets=("q", "k", "v", "o", "gate", "up", "down"))
    qlora_model = quantize_(tiny(), "nf4")
    assert quantization_of(qlora_model) == {"scheme": "nf4", "group_size": None, "embedding": None}
    qlora = apply_lora(qlora_model, rank=8, alpha=16, targets=("q", "k", "v", "o", "gate", "up", "down"))
    assert isinstance(qlora.layers[0].attn.qkv_proj.base, QuantizedLinear)
    frozen = {n: b.clone() for n, b in qlora.named_buffers() if ".base." in n}
    torch.manual_seed(3)
    lora_losses = train(lora)
    torch.manual_seed(3)
    qlora_losses = train(qlora)
    # Same start (the nf4 base is close to the float one), same descent: measured 4.163 -> 3.629 (LoRA)
    # and 4.163 -> 3.631 (QLoRA) in 40 steps.
    assert abs(qlora_losses[0] - lora_losses[0]) < 0.01 * lora_losses[0]
    assert lora_losses[-1] < 0.9 * lora_losses[0] and qlora_losses[-1] < 0.9 * qlora_losses[0]
    assert abs(qlora_losses[-1] - lora_losses[-1]) < 0.03 * lora_losses[-1]
    assert all(torch.equal(b, frozen[n]) for n, b in qlora.named_buffers() if n in frozen)
    assert all(p.grad is not None for n, p in qlora.named_parameters() if ".lora_" in n)


def test_bfloat16_model_keeps_float32_statistics_and_bfloat16_adapters():
    model = quantize_(tiny(), "nf4")
    before = model.layers[0].mlp.up_proj.dequantize(torch.float32)
    model.to(torch.bfloat16)
    layer = model.layers[0].mlp.up_proj
    assert layer.absmax_scale.dtype == torch.float32 and layer.absmax_offset.dtype == torch.float32
    assert layer.dtype == torch.bfloat16 and torch.equal(layer.dequantize(torch.float32), before)
    apply_lora(model, rank=2, targets=("up",))
    assert model.layers[0].mlp.up_proj.lora_A["up"].dtype == torch.bfloat16
    x = ids(batch=1, length=8)
    model(x[:, :-1], targets=x[:, 1:]).backward()


def test_merging_into_an_nf4_base_is_refused():
    model = apply_lora(quantize_(tiny(), "nf4"), rank=2, targets=("o",))
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter into a nf4-quantized base"):
        merge_lora(model)
    with pytest.raises(ValueError, match="nf4-quantized base"):
        remove_lora(model, merge=True)
    remove_lora(model, merge=False)
    assert isinstance(model.layers[0].attn.o_proj, QuantizedLinear)


# ------------------------------------------------------------------------------ checkpoints and bad input


@pytest.mark.parametrize("embedding", [None, "int8"])
def test_save_load_round_trip(tmp_path, embedding):
    from safetensors import safe_open

    model = quantize_(tiny(), "nf4", embedding=embedding)
    x = ids(batch=2, length=10)
    with torch.no_grad():
        logits = model(x)
    save_quantized(model, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.metadata()["quantization"] == "nf4"
    loaded = load_quantized(tmp_path / "q")
    assert quantization_of(loaded) == {"scheme": "nf4", "group_size": None, "embedding": embedding}
    assert isinstance(loaded.layers[1].mlp.down_proj, QuantizedLinear)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) and state[k].dtype == loaded_state[k].dtype for k in state)
    with torch.no_grad():
        assert torch.equal(loaded(x), logits)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="nf4 is for linear layers"):
        quantize_(tiny(), "nf4", embedding="nf4")
    with pytest.raises(ValueError, match="unknown quantization scheme 'nf5'"):
        quantize_(tiny(), "nf5")
    w = torch.randn(8, 64)
    q = quantize_nf4(w)
    with pytest.raises(ValueError, match=r"do not hold a \(8, 96\) matrix"):
        dequantize_nf4(*q, (8, 96))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0, 4))
