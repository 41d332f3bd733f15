"""LoRA from outside: starts equal to the base, trains only adapters, q alone touches only q's rows
of the fused qkv matmul, merges exactly (float64), and PEFT reads our adapters and we read PEFT's
(logits within 1e-4 relative, float32). DoRA the same way, and its gradients equal PEFT's."""
import json
import math
import re

import pytest
import torch
import torch.nn as nn

import llmstack
from llmstack.finetune import (TARGETS, LoRALinear, apply_lora, count_parameters, load_adapter, lora_layers,
                               merge_lora, remove_lora, save_adapter, trainable_summary, unmerge_lora)
from llmstack.model import ModelConfig, MoEConfig, build_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj"}


def tiny(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                                max_seq_len=32), **overrides})
    model = build_model(cfg)
    model.init_weights()
    return model.to(dtype).eval()


def ids(vocab=64, batch=2, length=12, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def perturb(model, std=0.05, seed=2):
    """Random nonzero A and B, so that every adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------ apply


def test_adapted_model_starts_equal_and_a_step_trains_only_adapters():
    model = tiny()
    x = ids()
    with torch.no_grad():  # SDPA's CPU kernel choice depends on whether gradients are needed
        base_logits = model(x)
        apply_lora(model, rank=4, alpha=8, targets=TARGETS)
        assert torch.equal(model(x), base_logits)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(".lora_" not in n for n, p in model.named_parameters() if not p.requires_grad)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for step in range(2):
        opt.zero_grad()
        model(x[:, :-1], targets=x[:, 1:]).backward()
        opt.step()
        if step == 0:  # B was zero, so A's gradient was too: only B moves on the first step
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if ".lora_A." in n)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n


def test_trainable_count_is_rank_times_in_plus_out_per_adapter():
    model = tiny()
    total_base = sum(p.numel() for p in model.parameters())
    cfg = model.config
    apply_lora(model, rank=4, alpha=8, targets=("q", "v", "down"))
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = 4 * (cfg.dim + q_rows) + 4 * (cfg.dim + kv_rows) + 4 * (cfg.ffn_hidden + cfg.dim)
    trainable, total = count_parameters(model)
    assert trainable == cfg.n_layers * per_layer
    assert total == total_base + trainable
    m = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)",
                     trainable_summary(model))
    assert m and int(m[1].replace(",", "")) == trainable and int(m[2].replace(",", "")) == total
    assert float(m[3]) == pytest.approx(100 * trainable / total, abs=1e-4)


def test_init_is_peft_kaiming_uniform_a_and_zero_b():
    model = apply_lora(tiny(), rank=8, targets=TARGETS)
    for _, layer in lora_layers(model):
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform with a=sqrt(5) on fan_in = in
        for p in layer.parts:
            a = layer.lora_A[p]
            assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
            assert torch.count_nonzero(layer.lora_B[p]) == 0


def test_q_alone_updates_only_q_rows_of_the_fused_matmul():
    model = tiny()
    cfg = model.config
    apply_lora(model, rank=4, alpha=8, targets=("q",))
    perturb(model)
    q_rows = cfg.n_heads * cfg.head_dim
    x = torch.randn(2, 5, cfg.dim)
    for block in model.layers:
        layer = block.attn.qkv_proj
        assert isinstance(layer, LoRALinear) and list(layer.parts) == ["q"]
        adapted, base = layer(x), layer.base(x)
        assert torch.equal(adapted[..., q_rows:], base[..., q_rows:])  # k and v exactly as before
        expected = base[..., :q_rows] + (8 / 4) * x @ layer.lora_A["q"].T @ layer.lora_B["q"].T
        torch.testing.assert_close(adapted[..., :q_rows], expected)
        assert not torch.allclose(adapted[..., :q_rows], base[..., :q_rows])


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_is_alpha_over_rank_or_its_root(rslora):
    model = apply_lora(tiny(torch.float64), rank=9, alpha=6, targets=("k", "v", "o"), rslora=rslora)
    perturb(model)
    layer = model.layers[0].attn.qkv_proj
    s = 6 / (math.sqrt(9) if rslora else 9)
    x = torch.randn(3, model.config.dim, dtype=torch.float64)
    q_rows = model.config.n_heads * model.config.head_dim
    kv = model.config.n_kv_heads * model.config.head_dim
    delta = layer(x) - layer.base(x)
    assert torch.equal(delta[:, :q_rows], torch.zeros_like(delta[:, :q_rows]))
    for part, rows in (("k", slice(q_rows, q_rows + kv)), ("v", slice(q_rows + kv, None))):
        torch.testing.assert_close(delta[:, rows], s * x @ (layer.lora_B[part] @ layer.lora_A[part]).T)


@torch.no_grad()  # the same SDPA kernel for every forward
def test_merge_unmerge_and_remove_float64():
    model = tiny(torch.float64)
    x = ids()
    base_logits = model(x)
    base_weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8, targets=TARGETS)
    perturb(model)
    adapted = model(x)
    assert rel_err(adapted, base_logits) > 1e-3  # the adapters do something

    merge_lora(model)
    assert rel_err(model(x), adapted) < 1e-12
    assert not torch.equal(model.layers[0].attn.qkv_proj.base.weight, base_weights["layers.0.attn.qkv_proj.weight"])
    unmerge_lora(model)
    assert rel_err(model(x), adapted) < 1e-12
    for name, layer in lora_layers(model):
        torch.testing.assert_close(layer.base.weight, base_weights[f"{name}.weight"], rtol=0, atol=1e-14)

    remove_lora(model, merge=True)
    assert not lora_layers(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert set(model.state_dict()) == set(base_weights)
    assert rel_err(model(x), adapted) < 1e-12

    other = apply_lora(tiny(torch.float64), rank=4, targets=TARGETS)
    perturb(other)
    remove_lora(other, merge=False)
    assert torch.equal(other(x), base_logits)



@pytest.mark.parametrize("use_dora", [False, True])
def test_adapters_train_under_bfloat16_autocast(use_dora):
    """train.precision=bf16 autocasts a float32 model: the adapters' products run in bfloat16 and
    their float32 parameters get float32 gradients close to those of a float32 step."""
    x = ids()
    grads = []
    for autocast in (False, True):
        model = apply_lora(tiny(), rank=4, alpha=8, targets=TARGETS, use_dora=use_dora)
        perturb(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(x[:, :-1], targets=x[:, 1:]).backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad]))
    assert grads[1].dtype == torch.float32
    assert rel_err(grads[1], grads[0]) < 0.02  # measured 0.006 (LoRA and DoRA)

def test_adapters_on_moe_experts_and_dropout_only_in_training():
    model = tiny(moe=MoEConfig(n_experts=4, top_k=2))
    apply_lora(model, rank=2, targets=("gate", "up", "down"), dropout=0.5)
    names = [n for n, _ in lora_layers(model)]
    assert "layers.0.mlp.experts.3.down_proj" in names and len(names) == 2 * 4 * 3
    perturb(model)
    x = ids()
    assert torch.equal(model(x), model(x))  # eval: no dropout
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(x), model(x))


def test_the_training_loop_trains_the_adapters_and_nothing_else(tmp_path):
    import numpy as np

    from llmstack.data.loader import TokenBatches
    from llmstack.train import TrainConfig, train

    model = apply_lora(tiny(), rank=4, alpha=8, targets=TARGETS)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tokens = (np.arange(4000) * 7 % 61).astype(np.uint16)  # a learnable periodic stream
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=30, lr=1e-2, warmup_steps=2, eval_every=1000, log_every=1,
                      save_every=1000, tensorboard=False)
    train(model, cfg, TokenBatches(tokens, 4, 16, seed=0), run_dir=tmp_path, progress=False)
    losses = [row["loss"] for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if "loss" in row]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1  # nats
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# ------------------------------------------------------------------------------ PEFT both ways


def hf_model(family):
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    else:  # Qwen2: q/k/v biases and a tied head
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, tie_word_embeddings=True))
    with torch.no_grad():  # random norms and biases so that every tensor's mapping matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model(request.param).save_pretrained(path)
    return path


def hf_logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("targets,rslora", [(TARGETS, False), (("q", "v"), True)])
def test_our_adapter_loads_in_peft_with_the_same_logits(base_dir, tmp_path, targets, rslora):
    ours = apply_lora(llmstack.from_pretrained(base_dir), rank=4, alpha=8, targets=targets, rslora=rslora)
    perturb(ours)
    save_adapter(ours, tmp_path / "adapter")

    # The file holds exactly the names PEFT itself writes for the same targets.
    reference = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=[HF_NAMES[t] for t in targets]))
    reference.save_pretrained(tmp_path / "reference")
    from safetensors.torch import load_file
    assert set(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "reference" / "adapter_model.safetensors"))

    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                            tmp_path / "adapter").eval()
    x = ids(vocab=SMALL["vocab_size"])
    with torch.no_grad():
        ours_logits = ours(x)
    base = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(base_dir), x)
    assert rel_err(ours_logits, base) > 1e-2  # the adapter matters
    assert rel_err(ours_logits, hf_logits(theirs, x)) <= 1e-4


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_into_llmstack_with_the_same_logits(base_dir, tmp_path, rslora):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(HF_NAMES.values()), use_rslora=rslora,
                             rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}, lora_dropout=0.1,
                             init_lora_weights=False)  # random nonzero B
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(llmstack.from_pretrained(base_dir), tmp_path / "peft")
    assert len(lora_layers(ours)) == 2 * 5  # per layer: qkv, o, gate, up, down
    assert ours.layers[1].attn.qkv_proj.ranks == {"q": 4, "k": 4, "v": 2}
    trainable, _ = count_parameters(ours)
    assert trainable == sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n)
    x = ids(vocab=SMALL["vocab_size"])
    with torch.no_grad():
        assert rel_err(ours(x), hf_logits(transformers.AutoModelForCausalLM.from_pretrained(base_dir), x)) > 1e-2
        assert rel_err(ours(x), hf_logits(theirs, x)) <= 1e-4

    # And back: what we save from it loads into PEFT with the same logits, patterns included.
    save_adapter(ours, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                           tmp_path / "again").eval()
    with torch.no_grad():
        assert rel_err(ours(x), hf_logits(again, x)) <= 1e-4


def test_adapter_on_some_layers_only_round_trips_through_peft(base_dir, tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"], layers_to_transform=[1],
                             init_lora_weights=False)
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(llmstack.from_pretrained(base_dir), tmp_path / "peft")
    assert [name for name, _ in lora_layers(ours)] == ["layers.1.attn.qkv_proj", "layers.1.mlp.up_proj"]
    save_adapter(ours, tmp_path / "again")  # names every module: "k_proj" alone would adapt layer 0 too
    again = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                           tmp_path / "again").eval()
    assert sum("lora_A" in n for n, _ in again.named_parameters()) == 2
    x = ids(vocab=SMALL["vocab_size"])
    with torch.no_grad():
        assert rel_err(ours(x), hf_logits(theirs, x)) <= 1e-4
        assert rel_err(ours(x), hf_logits(again, x)) <= 1e-4


# ------------------------------------------------------------------------------ DoRA


def hf_module(name, part):
    """PEFT's name of the module holding adapter `part` of our layer `name` (a Llama's or Qwen2's)."""
    block = "self_attn" if part in ("q", "k", "v", "o") else "mlp"
    return f"base_model.model.model.layers.{name.split('.')[1]}.{block}.{HF_NAMES[part]}"


def perturb_magnitudes(model, seed=3):
    """Magnitudes away from the norms they start at (where DoRA computes what LoRA does)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_dora_starts_equal_trains_magnitudes_and_q_alone_touches_only_q_rows():
    model = tiny()
    x = ids()
    with torch.no_grad():
        base_logits = model(x)
        apply_lora(model, rank=4, alpha=8, targets=TARGETS, use_dora=True)
        assert torch.equal(model(x), base_logits)  # B = 0 and m = ||W||: k = 1 exactly
    layer = model.layers[0].attn.qkv_proj
    assert set(layer.lora_magnitude_vector) == {"q", "k", "v"}
    torch.testing.assert_close(layer.lora_magnitude_vector["k"], layer.base.weight[32:48].norm(dim=1))
    cfg = model.config
    lora_only, _ = count_parameters(apply_lora(tiny(), rank=4, alpha=8, targets=TARGETS))
    trainable, _ = count_parameters(model)
    assert trainable == lora_only + cfg.n_layers * (cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim
                                                    + 2 * cfg.dim + 2 * cfg.ffn_hidden)  # one per output row

    model = apply_lora(tiny(), rank=4, alpha=8, targets=("q",), use_dora=True)
    perturb(model)
    perturb_magnitudes(model)
    q_rows = cfg.n_heads * cfg.head_dim
    h = torch.randn(2, 5, cfg.dim)
    for block in model.layers:
        layer = block.attn.qkv_proj
        adapted, base = layer(h), layer.base(h)
        assert torch.equal(adapted[..., q_rows:], base[..., q_rows:])  # k and v exactly as before
        w = layer.base.weight[:q_rows] + layer.delta_weight("q")  # the paper's formula, plainly
        expected = h @ (layer.lora_magnitude_vector["q"][:, None] * w / w.norm(dim=1, keepdim=True)).T
        torch.testing.assert_close(adapted[..., :q_rows], expected)


@torch.no_grad()
def test_dora_merge_unmerge_and_remove_float64():
    model = apply_lora(tiny(torch.float64), rank=4, alpha=8, targets=TARGETS, use_dora=True)
    perturb(model)
    perturb_magnitudes(model)
    base_weights = {n: p.detach().clone() for n, p in model.state_dict().items() if ".base." in n}
    x = ids()
    adapted = model(x)
    merge_lora(model)
    assert rel_err(model(x), adapted) < 1e-12
    unmerge_lora(model)
    assert rel_err(model(x), adapted) < 1e-12
    for name, w in base_weights.items():
        torch.testing.assert_close(model.state_dict()[name], w, rtol=0, atol=1e-14)
    remove_lora(model, merge=True)
    assert not lora_layers(model) and rel_err(model(x), adapted) < 1e-12


def test_dora_on_an_nf4_base_equals_dora_on_its_dequantized_weights():
    from llmstack.inference.quantize import QuantizedLinear, quantize_

    quantized = quantize_(tiny(), "nf4")
    dequantized = tiny()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantizedLinear):
                dequantized.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    for model in (quantized, dequantized):
        apply_lora(model, rank=4, alpha=8, targets=TARGETS, use_dora=True)
        perturb(model)
        perturb_magnitudes(model)
    x = ids()
    with torch.no_grad():
        assert rel_err(quantized(x), dequantized(x)) < 1e-5
    one_line_error(r"cannot merge.*nf4", merge_lora, quantized)


@pytest.mark.parametrize("targets", [TARGETS, ("q", "v")])
def test_our_dora_adapter_loads_in_peft_with_the_same_logits_and_gradients(base_dir, tmp_path, targets):
    ours = apply_lora(llmstack.from_pretrained(base_dir), rank=4, alpha=8, targets=targets, use_dora=True)
    perturb(ours)
    perturb_magnitudes(ours)
    save_adapter(ours, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_dora"] is True

    reference = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                    peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                    target_modules=[HF_NAMES[t] for t in targets]))
    reference.save_pretrained(tmp_path / "reference")
    from safetensors.torch import load_file
    names = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert names == set(load_file(tmp_path / "reference" / "adapter_model.safetensors"))
    assert any(n.endswith(".lora_magnitude_vector") for n in names)

    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                            tmp_path / "adapter", is_trainable=True).eval()
    x = ids(vocab=SMALL["vocab_size"])
    with torch.no_grad():
        base = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(base_dir), x)
        assert rel_err(ours(x), base) > 1e-2
        assert rel_err(ours(x), hf_logits(theirs, x)) <= 1e-4

    # The norm is detached as in PEFT (and the paper): the gradients of m, A and B are PEFT's.
    target = torch.randn(ours(x).shape, generator=torch.Generator().manual_seed(4))
    (ours(x) * target).sum().backward()
    (theirs(input_ids=x).logits * target).sum().backward()
    theirs_grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, layer in lora_layers(ours):
        for part in layer.parts:
            module = hf_module(name, part)
            for ours_p, key in ((layer.lora_magnitude_vector[part], "lora_magnitude_vector.weight"),
                                (layer.lora_A[part], "lora_A.weight"), (layer.lora_B[part], "lora_B.weight")):
                assert rel_err(ours_p.grad, theirs_grads[f"{module}.{key}"]) <= 1e-4, (name, part, key)


def test_peft_dora_adapter_loads_into_llmstack_with_the_same_logits(base_dir, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(HF_NAMES.values()), use_dora=True,
                             rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}, init_lora_weights=False)
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir), config).eval()
    perturb_magnitudes(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(llmstack.from_pretrained(base_dir), tmp_path / "peft")
    assert all(layer.use_dora for _, layer in lora_layers(ours))
    trainable, _ = count_parameters(ours)
    assert trainable == sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n)
    x = ids(vocab=SMALL["vocab_size"])
    with torch.no_grad():
        assert rel_err(ours(x), hf_logits(theirs, x)) <= 1e-4
        merged = merge_lora(ours)(x)
        unmerge_lora(ours)
        assert rel_err(merged, ours(x)) <= 1e-5  # float32

    save_adapter(ours, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                           tmp_path / "again").eval()
    with torch.no_grad():
        assert rel_err(ours(x), hf_logits(again, x)) <= 1e-4


# ------------------------------------------------------------------------------ bad input


def one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(targets=("q", "query")), r"'query'.*q, k, v, o, gate, up, down"),
    (dict(rank=0), r"rank.*0"),
    (dict(rank=-2), r"rank.*-2"),
    (dict(rank=2.5), r"rank.*2.5"),
    (dict(alpha=0), r"alpha.*0"),
    (dict(alpha=-1.0), r"alpha.*-1.0"),
    (dict(dropout=1.0), r"dropout.*1.0"),
    (dict(dropout=-0.1), r"dropout.*-0.1"),
])
def test_bad_arguments_are_one_line_errors_and_leave_the_model_alone(kwargs, match):
    model = tiny()
    one_line_error(match, apply_lora, model, **kwargs)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_target_missing_from_the_model_and_applying_twice_are_errors():
    one_line_error(r"'gate' matches no layer.*q, k, v, o, up, down", apply_lora, tiny(mlp="gelu"), targets=("gate",))
    model = apply_lora(tiny(), targets=("q",))
    one_line_error(r"already has LoRA adapters.*remove_lora", apply_lora, model, targets=("v",))


def test_adapter_for_another_base_or_of_another_type_is_refused(tmp_path):
    bigger = apply_lora(tiny(dim=48, n_heads=4, n_kv_heads=2), rank=2, targets=("q",))
    save_adapter(bigger, tmp_path / "wide")
    model = tiny()
    one_line_error(r"another base.*self_attn\.q_proj.*\(2, 48\).*\(2, 32\)", load_adapter, model, tmp_path / "wide")

    deeper = apply_lora(tiny(n_layers=3), rank=2, targets=("o",))
    save_adapter(deeper, tmp_path / "deep")
    one_line_error(r"another base.*model\.layers\.2\.self_attn\.o_proj", load_adapter, model, tmp_path / "deep")
    assert not lora_layers(model)  # nothing was put on before the error

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    peft.get_peft_model(hf, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                           feedforward_modules=["down_proj"])).save_pretrained(tmp_path / "ia3")
    one_line_error(r"type 'IA3'.*LORA", load_adapter, model, tmp_path / "ia3")

    config = json.loads((tmp_path / "deep" / "adapter_config.json").read_text())
    (tmp_path / "deep" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    one_line_error(r"no lora_magnitude_vector for 'model\.layers\.0\.self_attn\.o_proj'.*use_dora=True",
                   load_adapter, tiny(n_layers=3), tmp_path / "deep")

    from safetensors.torch import load_file, save_file
    save_adapter(apply_lora(tiny(), rank=2, targets=("o",), use_dora=True), tmp_path / "dora")
    weights = tmp_path / "dora" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.o_proj.lora_magnitude_vector"
    save_file({**tensors, key: tensors[key][:-1]}, weights)
    one_line_error(r"another base.*o_proj.*lora_magnitude_vector of shape \(31,\).*\(32,\)", load_adapter, tiny(),
                   tmp_path / "dora")
    save_file(tensors, weights)
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    one_line_error(r"unexpected tensor .*lora_magnitude_vector.*use_dora=False", load_adapter, tiny(),
                   tmp_path / "dora")


def test_nothing_half_written_on_disk(tmp_path, monkeypatch):
    one_line_error(r"no LoRA adapters to save", save_adapter, tiny(), tmp_path / "none")
    model = apply_lora(tiny(), rank=2)
    import safetensors.torch

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []  # neither the directory nor a temporary one


def test_saving_again_replaces_the_adapter_and_refuses_other_directories(tmp_path):
    model = apply_lora(tiny(), rank=2)
    save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    save_adapter(model, tmp_path / "adapter")  # an adapter directory is replaced whole
    again = load_adapter(tiny(), tmp_path / "adapter")
    x = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-6)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save_adapter(model, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
