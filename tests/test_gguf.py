"""GGUF import: files written here the way llama.cpp's converter writes them, from a transformers model
with random weights; llmstack's logits must equal that model's with the weights the file holds."""
import numpy as np
import pytest
import torch

import llmstack

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0)


def hf_model(arch: str, tie: bool = False):
    torch.manual_seed(0)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**SHAPE, tie_word_embeddings=tie)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=tie)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # biases too (Qwen2's q/k/v), so that a lost one shows
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() == 1 else 0.05)
        for layer in model.model.layers:
            layer.input_layernorm.weight.add_(1)
            layer.post_attention_layernorm.weight.add_(1)
        model.model.norm.weight.add_(1)
    return model.eval()


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: RoPE halves of each q/k head interleaved (convert_hf_to_gguf.py)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    _, _, i, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{LAYER_NAMES[module]}.{kind}"


# K-quant blocks of 256 weights: (bytes per block, byte offsets of its float16 scale fields)
K_QUANTS = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,))}


def random_k_blocks(shape, qtype, seed=0):
    """Random codes and sub-block scales in K-quant blocks, with small float16 block scales."""
    size, fields = K_QUANTS[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // 256, size), dtype=np.uint8)
    for offset in fields:
        blocks[:, offset:offset + 2] = np.full((len(blocks), 1), 2e-4, np.float16).view(np.uint8)
    return blocks.reshape(shape[0], shape[1] // 256 * size)


def write_gguf(model, path, *, arch="llama", qtype="F32", declared_arch=None):
    """Write `model` as llama.cpp does; matrices in `qtype` (norms and biases F32). Returns the model
    with the weights the file holds (quantized and dequantized), for comparison."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), declared_arch or arch)
    for key, value in [("context_length", cfg.max_position_embeddings), ("embedding_length", cfg.hidden_size),
                       ("block_count", cfg.num_hidden_layers), ("feed_forward_length", cfg.intermediate_size),
                       ("attention.head_count", cfg.num_attention_heads),
                       ("attention.head_count_kv", cfg.num_key_value_heads), ("vocab_size", cfg.vocab_size)]:
        writer.add_uint32(f"{declared_arch or arch}.{key}", value)
    writer.add_float32(f"{declared_arch or arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    writer.add_float32(f"{declared_arch or arch}.rope.freq_base", SHAPE["rope_theta"])
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    stored = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.numpy().astype(np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = permute(w, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
        if w.ndim == 2 and qtype in K_QUANTS:  # no quantizer in the gguf package: random blocks, valid scales
            q = random_k_blocks(w.shape, qtype)
            writer.add_tensor(gguf_name(name), q, raw_dtype=kind)
            back = np.asarray(gguf.quants.dequantize(q, kind), dtype=np.float32).reshape(w.shape)
        elif w.ndim == 2 and qtype != "F32":
            q = gguf.quants.quantize(w, kind)
            writer.add_tensor(gguf_name(name), q, raw_dtype=kind)
            back = np.asarray(gguf.quants.dequantize(q, kind), dtype=np.float32).reshape(w.shape)
        else:
            writer.add_tensor(gguf_name(name), w)
            back = w
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):  # the model's own order
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            back = back.reshape(heads, back.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(back.shape)
        stored[name] = torch.from_numpy(np.ascontiguousarray(back))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.load_state_dict(stored, strict=False)
    return model


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", False)])
@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_model_equals_the_model_it_holds(tmp_path, arch, tie, qtype):
    ref = write_gguf(hf_model(arch, tie), tmp_path / "m.gguf", arch=arch, qtype=qtype)
    ours = llmstack.from_pretrained(tmp_path / "m.gguf")
    assert ours.config.tie_embeddings == tie and ours.config.qkv_bias == (arch == "qwen2")
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5  # float32, the same weights


@pytest.mark.parametrize("qtype", list(K_QUANTS))
def test_gguf_k_quants_load_as_the_gguf_package_dequantizes_them(tmp_path, qtype):
    # K-quants work on rows of 256 weights: a model 256 wide.
    wide = dict(SHAPE, hidden_size=256, intermediate_size=512)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**wide, tie_word_embeddings=False)).eval()
    ref = write_gguf(ref, tmp_path / "k.gguf", qtype=qtype)
    ours = llmstack.from_pretrained(tmp_path / "k.gguf")
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_gguf_of_another_architecture_or_tensor_type_is_a_clear_error(tmp_path):
    write_gguf(hf_model("llama"), tmp_path / "neox.gguf", declared_arch="gptneox")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gptneox'; llmstack loads llama, mistral"):
        llmstack.from_pretrained(tmp_path / "neox.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    for key, value in [("context_length", 128), ("embedding_length", 64), ("block_count", 1),
                       ("feed_forward_length", 128), ("attention.head_count", 4), ("vocab_size", 64)]:
        writer.add_uint32(f"llama.{key}", value)
    kind = gguf.GGMLQuantizationType.IQ4_NL  # 32 weights in 18 bytes
    writer.add_tensor("token_embd.weight", np.zeros((64, 64 // 32 * 18), dtype=np.uint8), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"unsupported GGUF tensor type IQ4_NL \(token_embd.weight\)"):
        llmstack.from_pretrained(tmp_path / "iq.gguf")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "iq.gguf").read_bytes()[:40])
    with pytest.raises(ValueError, match="cut.gguf"):
        llmstack.from_pretrained(tmp_path / "cut.gguf")
