"""The fine-tuning job (llmstack.finetune.job, scripts/finetune.py): full, LoRA and QLoRA through the
pretraining loop; adapter-only checkpoints in PEFT's files; exact resume; loading a fine-tuned run;
bad input refused before anything is written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmstack
from llmstack.config import ConfigError, from_dict
from llmstack.finetune.config import FinetuneConfig
from llmstack.finetune import job as job_module
from llmstack.finetune.job import finetune, load_job_config
from llmstack.finetune.lora import load_adapter
from llmstack.interop import save_pretrained
from llmstack.model import ModelConfig, Transformer
from llmstack.tokenizer import Tokenizer
from llmstack.tokenizer.bpe import GPT4_PATTERN
from llmstack.train.trainer import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small random Llama-style model with a ChatML tokenizer, saved as an llmstack checkpoint,
    and a JSONL file of conversations."""
    root = tmp_path_factory.mktemp("ft")
    words = ["def", "return", "x", "y", "add", "one", "two", "the", "value", "of", "print", "(", ")", ":"]
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(60):
        q = " ".join(words[j] for j in torch.randint(len(words), (6,), generator=g).tolist())
        lines.append({"messages": [{"role": "user", "content": f"{i}: {q}"},
                                   {"role": "assistant", "content": q.upper()[:20]}]})
    (root / "chats.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    tok = Tokenizer.train([json.dumps(lines)] * 3, 400)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=400, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                                    max_seq_len=128))
    model.init_weights()
    save_pretrained(model, root / "base")
    tok.save(root / "base" / "tokenizer.json")
    return root


def job(root: Path, out: Path, **over) -> FinetuneConfig:
    data = {"base": str(root / "base"), "method": "lora",
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q", "v", "down"]},
            "data": {"source": str(root / "chats.jsonl"), "val_fraction": 0.2, "seq_len": 64},
            "train": {"out_dir": str(out), "max_steps": 6, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1,
                      "eval_every": 3, "eval_batches": 2, "log_every": 1, "save_every": 3, "weight_decay": 0.0,
                      "tensorboard": False}}
    for key, value in over.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    return from_dict(FinetuneConfig, data).validate()


def test_lora_run_checkpoints_the_adapter_alone_and_loads(base, tmp_path):
    result = finetune(job(base, tmp_path / "run"), progress=False)
    assert result.val["loss"] < result.first_val["loss"]  # it learned the answers
    ckpt = result.checkpoint
    assert {p.name for p in ckpt.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "config.yaml",
                                                 "tokenizer.json", "trainer_state.pt"}
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == ["down_proj", "q_proj",
                                                                                            "v_proj"]
    # from_pretrained on the run: the base with the adapter merged, equal to the adapter put on the base.
    merged = llmstack.from_pretrained(tmp_path / "run")
    adapted = load_adapter(llmstack.from_pretrained(base / "base"), ckpt).eval()
    x = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(x), llmstack.from_pretrained(base / "base")(x), atol=1e-4)
    assert load_job_config(tmp_path / "run").lora.rank == 4


@pytest.mark.parametrize("dora", [False, True])
def test_resume_equals_uninterrupted(base, tmp_path, monkeypatch, dora):
    lora = {"rank": 4, "dropout": 0.1, "use_dora": dora}
    straight = finetune(job(base, tmp_path / "a", lora=lora), progress=False)
    calls = []

    def crash_in_step_5(*a, loss_fn, **k):
        def wrapped(model, batch):
            calls.append(1)
            if len(calls) == 5:
                raise RuntimeError("killed")
            return loss_fn(model, batch)
        return real_train(*a, loss_fn=wrapped, **k)

    real_train = job_module.train
    with monkeypatch.context() as m:  # killed in step 5, after the checkpoint of step 3
        m.setattr(job_module, "train", crash_in_step_5)
        with pytest.raises(RuntimeError, match="killed"):
            finetune(job(base, tmp_path / "b", lora=lora), progress=False)
    resumed = finetune(job(base, tmp_path / "b", lora=lora), resume=True, progress=False)
    losses = lambda run: [r["loss"] for r in read_metrics(run) if "loss" in r]  # noqa: E731
    assert len(losses(tmp_path / "a")) == 6
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # bit for bit, step by step (dropout's RNG too)
    from safetensors.torch import load_file

    a = load_file(str(straight.checkpoint / "adapter_model.safetensors"))
    b = load_file(str(resumed.checkpoint / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_and_qlora_runs(base, tmp_path):
    full = finetune(job(base, tmp_path / "full", method="full", train__lr=3e-3), progress=False)
    assert (full.checkpoint / "model.safetensors").is_file()
    assert full.val["loss"] < full.first_val["loss"]
    model = llmstack.from_pretrained(tmp_path / "full")
    assert model.config.dim == 64
    qlora = finetune(job(base, tmp_path / "q", method="qlora"), progress=False)
    assert (qlora.checkpoint / "adapter_model.safetensors").is_file()
    assert qlora.val["loss"] < qlora.first_val["loss"]
    # Its adapter goes on the float base (QLoRA's merge): a working model.
    assert torch.isfinite(llmstack.from_pretrained(tmp_path / "q")(torch.randint(0, 400, (1, 8)))).all()


def test_bad_input_is_refused_before_anything_is_written(base, tmp_path):
    out = tmp_path / "never"
    cases = [
        (dict(base=str(tmp_path / "nope")), "base=.* does not exist"),
        (dict(data__source=str(tmp_path / "none.jsonl")), "does not exist"),
    ]
    for over, message in cases:
        with pytest.raises((ConfigError, ValueError), match=message):
            finetune(job(base, out, **over), progress=False)
        assert not out.exists()
    with pytest.raises(ConfigError, match="lora.rank must be >= 1, got 0"):
        job(base, out, lora={"rank": 0})
    with pytest.raises(ConfigError, match="lora.targets: 'qkv' is not a layer LoRA adapts"):
        job(base, out, lora={"targets": ["qkv"]})
    # A base whose tokenizer has no chat template, and none in the config.
    plain = tmp_path / "plain"
    save_pretrained(llmstack.from_pretrained(base / "base"), plain)
    # Byte-level BPE without the ChatML tokens (as tokenizers saved before them are)
    Tokenizer._from_merges([], GPT4_PATTERN, ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]).save(
        plain / "tokenizer.json")
    with pytest.raises(ConfigError, match="has no chat template and data.chat_template is not set"):
        finetune(job(base, out, base=str(plain)), progress=False)
    with pytest.raises(ConfigError, match="chatml needs the tokens <|im_start|>, <|im_end|>"):
        finetune(job(base, out, base=str(plain), data__chat_template="chatml"), progress=False)
    assert not out.exists()
    # A conversation longer than seq_len, with truncation: refuse.
    with pytest.raises(ValueError, match=r"more than data.seq_len=8"):
        finetune(job(base, out, data__seq_len=8, data__truncation="refuse"), progress=False)
    assert not out.exists()


def test_script_errors_are_one_line(base, tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "finetune.py"), f"base={base / 'base'}", "lora.rank=0"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "lora.rank must be >= 1" in p.stderr


def test_adapter_checkpoint_loads_in_peft(base, tmp_path):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    result = finetune(job(base, tmp_path / "run", train__max_steps=3), progress=False)
    ours = llmstack.from_pretrained(tmp_path / "run")
    llmstack.save_hf(llmstack.from_pretrained(base / "base"), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, result.checkpoint).eval()  # the checkpoint directory as it is
    x = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, ours(x), rtol=1e-4, atol=1e-4)
    # The merged model exported for transformers (what convert_hf.py --to-hf writes from the run).
    llmstack.save_hf(ours, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, peft_model(x).logits, rtol=1e-4, atol=1e-4)


def test_instruction_metrics():
    from llmstack.finetune.evaluate import code_of, parses, rouge_l

    assert rouge_l("a b c d", "a b c d") == 1.0 and rouge_l("a b", "c d") == 0.0
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)  # LCS a c d: precision = recall = 3/4
    assert rouge_l("x = f(1)", "x = f(2)") == pytest.approx(2 * (5 / 6) * (5 / 6) / (5 / 6 + 5 / 6))
    assert code_of("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert parses("def f():\n    return 1") and not parses("def f(:\n") and not parses("x = '\0'")


def test_evaluate_instructions_on_a_tiny_model(base):
    from llmstack.finetune.evaluate import evaluate_instructions
    from llmstack.data.chat import load_conversations

    chats = load_conversations(str(base / "chats.jsonl"), "val", val_fraction=0.2)[:4]
    model = llmstack.from_pretrained(base / "base")
    tok = llmstack.load_tokenizer(base / "base")
    report = evaluate_instructions(model, tok, chats, max_new_tokens=8, batch_size=3)
    assert report["n"] == 4 and 0 <= report["parse_rate"] <= 1 and 0 <= report["rouge_l"] <= 1
    assert report["answer_loss"] > 0 and len(report["samples"]) == 3
    # The loss is over the reference answers' tokens only: the same as the trainer's validation.
    from llmstack.data.chat import ChatBatches, encode_conversation, pack
    from llmstack.eval import evaluate

    rows = pack([encode_conversation(tok, c) for c in chats], 128, packing=True)
    packed = evaluate(model, ChatBatches(rows, 2).eval_batches())
    assert packed["loss"] == pytest.approx(report["answer_loss"], rel=1e-5)
