"""Hugging Face interop: logits and greedy tokens equal transformers' on random small configs."""
import json

import pytest
import torch

import llmstack
from llmstack.model import MoEConfig, ModelConfig
from llmstack.interop import load_weights, save_hf, save_weights
from llmstack.interop.hf import fuse_projections, split_projections
from llmstack.model import Transformer

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)


def hf_model(family: str):
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
    with torch.no_grad():  # random norms and biases so that every tensor's mapping matters
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight") or name.endswith("bias"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return model.eval()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "mixtral"])
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
