"""Weight-only quantization: error bounds, packing, QuantizedLinear, whole models, checkpoints, the Triton kernel."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llmstack
from llmstack.model import ModelConfig
from llmstack.inference.quantize import (QuantizedEmbedding, QuantizedLinear, TiedQuantizedHead, dequantize_int4,
                                         dequantize_int8, int8_matmul_cpu, load_quantized, pack_int4,
                                         quantization_of, quantize_, quantize_int4, quantize_int8, save_quantized,
                                         unpack_int4)
from llmstack.model import Transformer

TINY = dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)


def tiny_model(**overrides) -> Transformer:
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    model.init_weights()
    return model.eval()


def skewed_weight(out_features=24, in_features=64):
    """Rows of different magnitudes and offsets, with an outlier and an all-zero row."""
    w = torch.randn(out_features, in_features) * torch.logspace(-2, 1, out_features)[:, None]
    w[1] += 3.0  # a group that does not straddle 0
    w[2, 5] = 40.0  # an outlier
    w[3] = 0.0
    return w


# ---------------------------------------------------------------- quantize / dequantize


def test_int8_error_within_half_a_step():
    w = skewed_weight()
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (w.shape[0],)
    err = (w - dequantize_int8(q, scale)).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert int(q.abs().max()) == 127  # the largest |w| of each nonzero row uses the full range


@pytest.mark.parametrize("group_size", [8, 16, 32])
def test_int4_error_within_half_a_step_per_group(group_size):
    w = skewed_weight()
    packed, scale, offset = quantize_int4(w, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (w.shape[0], w.shape[1] // 2)
    assert scale.shape == offset.shape == (w.shape[0], w.shape[1] // group_size)
    assert scale.dtype == offset.dtype == torch.float16  # stored as GGUF's Q4_1 stores them
    err = (w - dequantize_int4(packed, scale, offset, group_size)).abs()
    step = scale.float().repeat_interleave(group_size, dim=1)
    # Half a step, plus float32 rounding of q * scale + offset (the values reach 40).
    assert (err <= step / 2 * (1 + 1e-5) + 1e-5).all()
    assert (dequantize_int4(packed, scale, offset, group_size)[3] == 0).all()  # an all-zero row stays zero


def test_int4_reproduces_weights_already_on_the_q4_1_grid_exactly():
    # What a GGUF Q4_1 file holds: per group of 32, a float16 scale and offset and 4-bit codes.
    # Quantizing its dequantized weights again must give the same grid, hence the same weights.
    torch.manual_seed(0)
    rows, groups = 64, 6
    scale = (torch.rand(rows, groups) * 0.01 + 1e-4).half()
    offset = (-torch.rand(rows, groups) * 0.1).half()
    codes = torch.randint(0, 16, (rows, groups, 32))
    codes[:, :, 0], codes[:, :, 1] = 0, 15  # every group spans its whole grid, as Q4_1's do
    w = (codes.float() * scale.float()[..., None] + offset.float()[..., None]).reshape(rows, -1)
    packed, s, o = quantize_int4(w, 32)
    assert torch.equal(dequantize_int4(packed, s, o, 32), w)


def test_int4_asymmetric_beats_the_symmetric_step_on_a_skewed_group():
    # A group on one side of zero: min/max over [0, max] gives the step a symmetric
    # grid over [-max, max] would have at best; the error bound halves accordingly.
    w = torch.rand(4, 16) + 1.0
    _, scale, _ = quantize_int4(w, 16)
    symmetric_step = w.abs().amax(dim=1, keepdim=True) / 7
    assert (scale <= symmetric_step / 2 + 1e-7).all()


def test_pack_unpack_round_trip_is_exact():
    q = torch.randint(0, 16, (5, 3, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 3, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(pack_int4(unpack_int4(packed)), packed)
    assert int(pack_int4(torch.tensor([3, 12]))[0]) == 3 | (12 << 4)  # low nibble first


# ---------------------------------------------------------------- QuantizedLinear


@pytest.mark.parametrize("scheme,group_size", [("int8", None), ("int4", 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_linear_equals_linear_with_dequantized_weight(scheme, group_size, bias):
    linear = nn.Linear(64, 24, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(skewed_weight())
    qlinear = QuantizedLinear.from_linear(linear, scheme, group_size)
    x = torch.randn(3, 5, 64)
    weight = qlinear.dequantize(torch.float64)
    expected = F.linear(x.double(), weight, None if linear.bias is None else linear.bias.double())
    # int8 on the CPU represents x to within max|x_row| / 64516 (int8_matmul_cpu); int4 is float.
    bound = (x.abs().amax(-1, keepdim=True).double() / 64516) * weight.abs().sum(1) if scheme == "int8" else 0
    assert ((qlinear(x).double() - expected).abs() <= bound + 1e-5 * expected.abs() + 1e-4).all()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_linear_follows_the_activation_dtype(scheme):
    qlinear = QuantizedLinear.from_linear(nn.Linear(32, 8), scheme, 16).to(torch.bfloat16)
    assert qlinear.qweight.dtype in (torch.int8, torch.uint8)
    assert qlinear.scale.dtype == (torch.bfloat16 if scheme == "int8" else torch.float16)  # int4: the Q4_1 grid
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    y = qlinear(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 8)
    expected = F.linear(x.double(), qlinear.dequantize(torch.float64), qlinear.bias.double())
    torch.testing.assert_close(y.double(), expected, rtol=1.6e-2, atol=1e-2)  # bf16 output rounding


# ---------------------------------------------------------------- whole models


@pytest.mark.parametrize("scheme,tol", [("int8", 0.01), ("int4", 0.08)])
def test_quantized_model_logits_close_to_float(scheme, tol):
    model = tiny_model(tie_embeddings=True)
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ref = model(ids)
        quantize_(model, scheme, group_size=16)
        got = model(ids)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 2 * 5 and {m.scheme for m in layers} == {scheme}  # qkv, o, gate, up, down per layer
    # The embedding and the head tied to it: int8 whatever the layers' scheme.
    assert isinstance(model.embed, QuantizedEmbedding) and model.embed.scheme == "int8"
    assert isinstance(model.lm_head, TiedQuantizedHead) and model.lm_head.embedding is model.embed
    assert quantization_of(model) == {"scheme": scheme, "group_size": 16 if scheme == "int4" else None,
                                      "embedding": "int8"}
    # Relative error of the logits: measured ~0.3% (int8) and ~3% (int4, g=16) over seeds.
    assert ((got - ref).norm() / ref.norm()).item() < tol
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > (0.95 if scheme == "int8" else 0.85)


def test_quantized_embedding_and_tied_head_use_one_stored_matrix():
    model = quantize_(tiny_model(tie_embeddings=True), "int4", group_size=16, embedding="int4")
    weight = model.embed.dequantize(torch.float64)
    ids = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(model.embed(ids).double(), weight[ids], rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(model.lm_head(x).double(), x.double() @ weight.T, rtol=1e-5, atol=1e-5)
    assert not any(k.startswith("lm_head") for k in model.state_dict())  # the matrix is stored once


def test_head_follows_the_embedding_scheme():
    model = quantize_(tiny_model(tie_embeddings=False), "int4", group_size=16)
    assert model.lm_head.scheme == model.embed.scheme == "int8"
    assert model.layers[0].mlp.down_proj.scheme == "int4"
    x, y = torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 9))
    with torch.no_grad():  # model(x, targets=y) goes through the quantized head's own logits
        expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
        torch.testing.assert_close(model(x, targets=y), expected)
    model = quantize_(tiny_model(tie_embeddings=False), "int8", embedding=None)
    assert type(model.lm_head) is nn.Linear and type(model.embed) is nn.Embedding
    assert quantization_of(model)["embedding"] is None
    model = quantize_(tiny_model(), "int8", skip=("lm_head", "embed", "layers.0.mlp.down_proj"))
    assert type(model.layers[0].mlp.down_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    assert isinstance(model.layers[1].mlp.down_proj, QuantizedLinear) and type(model.embed) is nn.Embedding


@pytest.mark.parametrize("shape,rows,integer", [((1024, 512), 1, True), ((1024, 512), 64, True),
                                                 ((2048, 192), 8, True), ((2048, 192), 64, False),
                                                 ((256, 192), 1, False)])
def test_cpu_int8_layer_takes_the_integer_product_where_it_pays(shape, rows, integer):
    from llmstack.inference.quantize import integer_product_pays

    linear = nn.Linear(shape[1], shape[0], bias=False)
    qlinear = QuantizedLinear.from_linear(linear, "int8")
    x = torch.randn(rows, shape[1])
    assert integer_product_pays(rows, *shape) == integer
    expected = (int8_matmul_cpu(x, qlinear.qweight, qlinear.scale) if integer
                else F.linear(x, qlinear.dequantize(torch.float32)))
    assert torch.equal(qlinear(x), expected)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_cpu_int8_product_equals_the_weight_only_product(rows):
    # x in two int8 parts times int8 codes: the float64 product with the dequantized weight, up to
    # the representation of x (|error| <= max|x_row| / 64516 per element) and float32 rounding.
    torch.manual_seed(0)
    w = skewed_weight(40, 96)
    q, scale = quantize_int8(w)
    x = torch.randn(rows, 96) * torch.logspace(-3, 2, rows)[:, None]  # rows of very different sizes
    x[0, :3] = torch.tensor([50.0, -0.001, 0.0])  # an outlier beside tiny values
    if rows > 1:
        x[1] = 0.0  # a zero row
    expected = x.double() @ dequantize_int8(q, scale, torch.float64).T
    got = int8_matmul_cpu(x.reshape(1, rows, 96), q, scale).reshape(rows, 40)
    assert got.dtype == torch.float32
    bound = (x.abs().amax(1, keepdim=True).double() / 64516) @ dequantize_int8(q, scale, torch.float64).abs().sum(1)[None]
    assert ((got.double() - expected).abs() <= bound + 1e-5 * expected.abs() + 1e-6).all()
    if rows > 1:
        assert (got[1] == 0).all()


def test_generate_runs_on_a_quantized_model():
    model = quantize_(tiny_model(), "int4", group_size=16)
    out = llmstack.generate(model, [1, 2, 3], 10, temperature=0)
    assert out.shape == (13,)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantizing_a_model_after_generating_with_it(scheme):
    """`generate` stores CPU weights transposed in memory (decode layout); quantizing afterwards
    must still give row-major codes, the same ones as quantizing a fresh copy."""
    used, fresh = tiny_model(), tiny_model()
    fresh.load_state_dict(used.state_dict())
    llmstack.generate(used, [1, 2, 3], 4, temperature=0)
    quantize_(used, scheme, group_size=16)
    quantize_(fresh, scheme, group_size=16)
    for (name, a), b in zip(used.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
        assert a.is_contiguous() or not name.endswith(("qweight", "scale", "offset")), name
    assert torch.equal(llmstack.generate(used, [1, 2, 3], 10, temperature=0),
                       llmstack.generate(fresh, [1, 2, 3], 10, temperature=0))


# ---------------------------------------------------------------- errors


def test_bad_scheme_and_group_size_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown quantization scheme 'int3'; allowed: 'int8', 'int4'"):
        quantize_(tiny_model(), "int3")
    model = tiny_model()  # in_features are 32 and 128 (down_proj's hidden width)
    with pytest.raises(ValueError, match=r"group_size=24 must be an even number that divides in_features=32"):
        quantize_(model, "int4", group_size=24)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # left untouched
    with pytest.raises(ValueError, match="group_size=7"):
        quantize_(model, "int4", group_size=7)
    quantize_(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, "int4")


# ---------------------------------------------------------------- checkpoints


def _metadata(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))["__metadata__"]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, scheme):
    model = quantize_(tiny_model(tie_embeddings=False), scheme, group_size=16, skip=())
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        before = model(ids)
    save_quantized(model, tmp_path / "q")
    meta = _metadata(tmp_path / "q" / "model.safetensors")
    assert meta["quantization"] == scheme
    assert meta.get("quantization_group_size") == ("16" if scheme == "int4" else None)
    assert not any(scheme in p.name for p in (tmp_path / "q").iterdir())  # recorded in metadata, not names

    loaded = llmstack.from_pretrained(tmp_path / "q")
    assert isinstance(loaded.lm_head, QuantizedLinear) and loaded.lm_head.scheme == "int8"  # the embedding's scheme
    assert loaded.layers[0].attn.o_proj.scheme == scheme and quantization_of(loaded) == quantization_of(model)
    assert meta["quantization_embedding"] == "int8"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(loaded(ids), before)


def test_loading_keeps_the_saved_structure(tmp_path):
    model = quantize_(tiny_model(), "int4", group_size=16, skip=("lm_head", "o_proj"))
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]


def test_load_in_another_dtype_converts_scales_not_codes(tmp_path):
    save_quantized(quantize_(tiny_model(), "int4", group_size=16), tmp_path / "q")
    model = llmstack.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    layer = model.layers[0].attn.qkv_proj  # int4: codes and the float16 scales and offsets of the Q4_1 grid
    assert layer.qweight.dtype == torch.uint8 and layer.scale.dtype == layer.offset.dtype == torch.float16
    assert model.embed.qweight.dtype == torch.int8 and model.embed.scale.dtype == torch.bfloat16  # int8
    assert model(torch.randint(0, 50, (1, 8))).dtype == torch.bfloat16


def test_unknown_scheme_in_metadata_is_a_clear_error(tmp_path):
    from llmstack.interop import save_pretrained

    save_pretrained(tiny_model(), tmp_path / "bad", metadata={"quantization": "fp3"})
    with pytest.raises(ValueError, match=r"quantization scheme 'fp3'.*'int8', 'int4'"):
        llmstack.from_pretrained(tmp_path / "bad")


def test_save_pretrained_of_a_quantized_model_points_to_save_quantized(tmp_path):
    with pytest.raises(ValueError, match="the model is quantized: save it with llmstack.inference.save_quantized"):
        llmstack.save_pretrained(quantize_(tiny_model(), "int8"), tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_saving_a_float_model_as_quantized_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(tiny_model(), tmp_path / "f")


# ---------------------------------------------------------------- Triton kernel (interpreter on the CPU)


def _kernels():
    quant_matmul = pytest.importorskip("llmstack.kernels.quant_matmul")
    if not quant_matmul.is_available():
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    return quant_matmul


# Ragged M, N and K against the kernels' 16 x 16 x 32 interpreter tiles.
SHAPES = [(1, 40, 96), (3, 16, 64), (17, 24, 48)]


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_kernel_matches_reference(M, N, K):
    qm = _kernels()
    q, scale = quantize_int8(torch.randn(N, K))
    x = torch.randn(M, K)
    expected = x.double() @ dequantize_int8(q, scale, torch.float64).T
    # fp32 with exact (ieee) dots: only the summation order differs.
    torch.testing.assert_close(qm.int8_matmul(x, q, scale).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,N,K,group_size", [(1, 40, 96, 16), (3, 16, 64, 16), (17, 24, 48, 16),
                                                (1, 40, 96, 48), (17, 24, 48, 48)])
def test_int4_kernel_matches_reference(M, N, K, group_size):
    # group_size 48: groups that straddle the 32-wide K tiles.
    qm = _kernels()
    packed, scale, offset = quantize_int4(torch.randn(N, K), group_size)
    x = torch.randn(2, M, K)  # leading batch dims are flattened
    expected = x.double() @ dequantize_int4(packed, scale, offset, group_size, torch.float64).T
    torch.testing.assert_close(qm.int4_matmul(x, packed, scale, offset, group_size).double(), expected,
                               rtol=1e-5, atol=1e-5)


def test_kernel_rejects_bad_arguments():
    qm = _kernels()
    packed, scale, offset = quantize_int4(torch.randn(8, 32), 16)
    with pytest.raises(ValueError, match="group_size=12"):
        qm.int4_matmul(torch.randn(1, 32), packed, scale, offset, 12)
    with pytest.raises(ValueError, match="x has 16 features"):
        qm.int4_matmul(torch.randn(1, 16), packed, scale, offset, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("M", [1, 4, 16])
def test_kernel_on_gpu_matches_dequantize_then_matmul(dtype, scheme, M):
    from llmstack.kernels import quant_matmul as qm

    torch.manual_seed(0)
    N, K, group_size = 1000, 1024, 64
    w = torch.randn(N, K, device="cuda") * 0.02
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    if scheme == "int8":
        q, scale = quantize_int8(w.to(dtype))
        got = qm.int8_matmul(x, q, scale)
        weight = dequantize_int8(q, scale, torch.float32)
    else:
        packed, scale, offset = quantize_int4(w.to(dtype), group_size)
        got = qm.int4_matmul(x, packed, scale, offset, group_size)
        weight = dequantize_int4(packed, scale, offset, group_size, torch.float32)
    expected = x.float() @ weight.T
    # Per-dtype tolerances of the output rounding (fp16 ~1e-3, bf16 ~1e-2 relative) on sums of 1024 terms.
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    # The module takes the kernel for few rows; the result matches its own CPU path.
    linear = nn.Linear(K, N, bias=True).to("cuda", dtype)
    qlinear = QuantizedLinear.from_linear(linear, scheme, group_size)
    ref = F.linear(x.float(), qlinear.dequantize(torch.float32), qlinear.bias.float())
    torch.testing.assert_close(qlinear(x).float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
