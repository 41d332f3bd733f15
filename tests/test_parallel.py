"""Training on several processes (llmstack.distributed): each strategy, launched by torchrun with gloo
on the CPU, trains as one process does on the same global batch (per-step losses and final weights
within 1e-5, float32), and a checkpoint written by one layout resumes in another."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmstack.config import ConfigError, load_config
from llmstack.distributed import ParallelConfig, qkv_order
from llmstack.model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]

# name -> overrides; every job runs 10 steps with a checkpoint at 5 and 10
TWO_RANKS = {
    "ddp": "parallel.dp_replicate=2",
    "zero1": "parallel.dp_replicate=2 parallel.shard_optimizer=true",
    "fsdp": "parallel.dp_shard=2",
    "zero2": "parallel.dp_shard=2 parallel.reshard_after_forward=false",
    "tp": "parallel.tp=2",
    "tp_no_sp": "parallel.tp=2 parallel.sequence_parallel=false",
    "pp_gpipe": "parallel.pp=2 parallel.pp_schedule=gpipe",
    "pp_1f1b": "parallel.pp=2 parallel.pp_schedule=1f1b",
    "pp_interleaved": "parallel.pp=2 parallel.pp_schedule=interleaved_1f1b",
}
FOUR_RANKS = {"fsdp_tp": "parallel.dp_shard=2 parallel.tp=2", "ddp_tp": "parallel.dp_replicate=2 parallel.tp=2"}
# a single process's checkpoint of step 5, resumed by two ranks in these layouts
FROM_ONE = {"one_to_fsdp": "parallel.dp_shard=2", "one_to_tp": "parallel.tp=2", "one_to_pp": "parallel.pp=2"}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    corpus = root / "corpus"
    corpus.mkdir()
    g = torch.Generator().manual_seed(0)
    words = ["def", "return", "self", "value", "if", "else", "for", "in", "range", "print", "(", ")", ":", "x", "y"]
    for i in range(40):
        text = " ".join(words[j] for j in torch.randint(len(words), (150,), generator=g).tolist())
        (corpus / f"doc{i}.txt").write_text(text)
    cfg = root / "tiny.yaml"
    # AdamW's eps at 1e-3: with the default 1e-8, a weight whose gradient is ~0 moves by about lr times the
    # gradient's sign, so float-order differences between the ranks' reductions and one process's sum
    # (~1e-9) could move it by 1e-5 and more; the equivalence under test is not about that.
    cfg.write_text(f"""
model: {{vocab_size: 320, dim: 32, n_layers: 4, n_heads: 4, n_kv_heads: 2, max_seq_len: 64}}
tokenizer: {{vocab_size: 300}}
data: {{source: "{corpus}/*.txt", seq_len: 32, val_fraction: 0.25, cache_dir: "{root / 'cache'}", num_proc: 1}}
train: {{max_steps: 10, batch_size: 4, lr: 1.0e-2, warmup_steps: 2, eval_every: 5, eval_batches: 2, log_every: 1,
        save_every: 5, keep_last: 5, tensorboard: false, seed: 3, eps: 1.0e-3}}
""")
    one_process(cfg, root / "one")
    # LoRA fine-tuning of that run on a few conversations (data-parallel fine-tuning)
    say = lambda start, n: " ".join(words[(start + j) % len(words)] for j in range(n))  # noqa: E731
    lines = [{"messages": [{"role": "user", "content": say(i, 5)}, {"role": "assistant", "content": say(2 * i, 4)}]}
             for i in range(48)]
    (root / "chats.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "lora.yaml").write_text(f"""
base: {root / 'one'}
method: lora
lora: {{rank: 4, alpha: 8, dropout: 0.0}}
data: {{source: "{root / 'chats.jsonl'}", val_fraction: 0.2, seq_len: 32}}
train: {{max_steps: 10, batch_size: 4, lr: 1.0e-2, warmup_steps: 1, eval_every: 5, eval_batches: 2, log_every: 1,
        save_every: 5, keep_last: 5, weight_decay: 0.0, tensorboard: false, eps: 1.0e-3}}
""")
    from llmstack.finetune import FinetuneConfig, finetune

    finetune(load_config(FinetuneConfig, root / "lora.yaml", [f"train.out_dir={root / 'lora_one'}"]), progress=False)
    return root, cfg


def one_process(cfg: Path, out: Path, *overrides: str, resume: bool = False) -> None:
    from llmstack.train import PretrainConfig, pretrain

    pretrain(load_config(PretrainConfig, cfg, [f"train.out_dir={out}", *overrides]), resume=resume, progress=False)


def launch(procs: int, cfg: Path, jobs: dict, root: Path, resume: bool = False) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMSTACK_THREADS": "1"}
    args = [f"{root / name} {overrides}" + (" --resume" if resume else "") for name, overrides in jobs.items()]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                        str(ROOT / "tests" / "parallel_jobs.py"), str(cfg), *args],
                       capture_output=True, text=True, timeout=420, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]


def stopped_at_step_5(src: Path, dst: Path) -> Path:
    """A copy of a finished run as if it had died after its checkpoint of step 5."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step_000010")
    (dst / "latest").write_text("checkpoints/step_000005\n")
    return dst


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line and "val_loss" not in line]


def weights(out: Path) -> dict:
    from llmstack.interop import load_weights, resolve_checkpoint

    return load_weights(resolve_checkpoint(out))[0]


def assert_same_run(ref: Path, out: Path) -> None:
    a, b = losses(ref), losses(out)
    assert len(a) == 10 == len(b)
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=1e-5)
    wa, wb = weights(ref), weights(out)
    assert wa.keys() == wb.keys()  # the consolidated model.safetensors: every weight, whole, in the model's order
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def two_ranks(job):
    root, cfg = job
    for name in FROM_ONE:
        stopped_at_step_5(root / "one", root / name)
    launch(2, cfg, {**TWO_RANKS, "lora_ddp": f"parallel.dp_replicate=2 --finetune={root / 'lora.yaml'}",
                    "fsdp_bf16": "parallel.dp_shard=2 parallel.param_dtype=bfloat16"}, root)
    launch(2, cfg, FROM_ONE, root, resume=True)
    return root


@pytest.mark.parametrize("name", TWO_RANKS)
def test_two_ranks_train_as_one_process(two_ranks, name):
    assert_same_run(two_ranks / "one", two_ranks / name)
    ckpt = two_ranks / name / "checkpoints" / "step_000010"
    assert (ckpt / "dcp").is_dir() == ParallelConfig(**parse(TWO_RANKS[name])).sharded
    assert not list((two_ranks / name / "checkpoints").glob(".*"))  # no temporaries left


def test_fine_tuning_on_two_ranks_trains_as_one_process(two_ranks):
    """LoRA on packed conversations (per-document masks), two data-parallel ranks: the same steps, and
    a checkpoint that is the adapter alone."""
    a, b = losses(two_ranks / "lora_one"), losses(two_ranks / "lora_ddp")
    assert len(a) == 10 == len(b)
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=1e-5)
    ckpt = two_ranks / "lora_ddp" / "checkpoints" / "step_000010"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()


def test_fsdp_mixed_precision_stays_close(two_ranks):
    """FSDP2 computing in bfloat16 with float32 shards and reductions: the float32 run's losses within 1e-2
    (bfloat16 keeps 8 bits of mantissa, a relative step of 4e-3; the rounding differs run to run with the
    order of the CPU's bfloat16 reductions). Without the mixed-precision policy applied the losses equal
    the float32 run's to 1e-5; with it broken (wrong dtype reduction, unscaled gradients) they drift by far more."""
    a, b = losses(two_ranks / "one"), losses(two_ranks / "fsdp_bf16")
    assert len(a) == 10 == len(b)
    assert any(abs(y - x) > 1e-5 * x for x, y in zip(a, b))  # it did compute in bfloat16
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_with_nccl_train_as_one_process(job):
    """The same jobs on two GPUs (NCCL): FSDP2, TP and the pipeline against the CPU run, TF32 off."""
    root, cfg = job
    jobs = {f"cuda_{k}": f"{TWO_RANKS[k]} train.device=cuda" for k in ("fsdp", "tp", "pp_1f1b")}
    launch(2, cfg, jobs, root)
    for name in jobs:
        a, b = losses(root / "one"), losses(root / name)
        for x, y in zip(a, b):
            assert y == pytest.approx(x, rel=1e-4)


@pytest.mark.parametrize("name", ["fsdp", "tp", "pp_interleaved", "zero1"])
def test_two_ranks_save_one_process_resumes(two_ranks, tmp_path, name):
    out = stopped_at_step_5(two_ranks / name, tmp_path / name)
    one_process(two_ranks.parent / two_ranks.name / "tiny.yaml", out, resume=True)
    assert_same_run(two_ranks / "one", out)


@pytest.mark.parametrize("name", FROM_ONE)
def test_one_process_saves_two_ranks_resume(two_ranks, name):
    assert_same_run(two_ranks / "one", two_ranks / name)


def test_data_and_tensor_parallel_together(job):
    root, cfg = job
    launch(4, cfg, FOUR_RANKS, root)
    for name in FOUR_RANKS:
        assert_same_run(root / "one", root / name)


def parse(overrides: str) -> dict:
    out = {}
    for item in overrides.split():
        key, value = item.removeprefix("parallel.").split("=")
        out[key] = int(value) if value.isdigit() else value == "true" if value in ("true", "false") else value
    return out


def test_qkv_order_gives_each_rank_its_heads():
    H, Hkv, D, tp = 8, 4, 3, 2
    order = qkv_order(H, Hkv, D, tp)
    assert sorted(order.tolist()) == list(range((H + 2 * Hkv) * D))  # a permutation
    rows = order.view(tp, -1)  # rank r's contiguous share after reordering
    q, kv = H * D, Hkv * D
    for r in range(tp):
        want = [*range(r * q // tp, (r + 1) * q // tp), *range(q + r * kv // tp, q + (r + 1) * kv // tp),
                *range(q + kv + r * kv // tp, q + kv + (r + 1) * kv // tp)]
        assert rows[r].tolist() == want


def test_bad_parallel_configs(job, tmp_path):
    model = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    with pytest.raises(ConfigError, match="does not divide model.n_kv_heads=2"):
        ParallelConfig(tp=4).validate().check_model(model, 8)
    with pytest.raises(ConfigError, match="more than model.n_layers=2"):
        ParallelConfig(pp=4).validate().check_model(model, 8)
    with pytest.raises(ConfigError, match="more than model.n_layers=2"):
        ParallelConfig(pp=2, pp_schedule="interleaved_1f1b").validate().check_model(model, 8)
    with pytest.raises(ConfigError, match="does not split over 2 data-parallel ranks"):
        ParallelConfig(dp_shard=2).validate().check_model(model, 3)
    with pytest.raises(ConfigError, match="pp_schedule"):
        ParallelConfig(pp=2, pp_schedule="zigzag").validate()
    from llmstack.finetune import FinetuneConfig

    for over in (["parallel.dp_shard=2"], ["parallel.dp_replicate=2", "objective=dpo"]):
        with pytest.raises(ConfigError, match="data-parallel replicas of an sft job"):
            load_config(FinetuneConfig, None, over)
    root, cfg = job
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--config", str(cfg),
                        f"train.out_dir={tmp_path / 'x'}", "parallel.dp_replicate=2"], capture_output=True, text=True,
                       timeout=120, env=env, cwd=ROOT)
    assert p.returncode == 2 and "launch with torchrun --nproc_per_node 2" in p.stderr
    assert not (tmp_path / "x").exists()


def test_two_ranks_refuse_a_bad_config_and_both_exit(job, tmp_path):
    """tp not dividing the KV heads: one error line (from rank 0), every rank gone, nothing written."""
    root, cfg = job
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "scripts" / "pretrain.py"), "--config", str(cfg), f"train.out_dir={tmp_path / 'x'}",
                        "parallel.tp=2", "model.n_kv_heads=1"], capture_output=True, text=True, timeout=120, env=env,
                       cwd=ROOT)
    assert p.returncode != 0
    assert p.stderr.count("parallel.tp=2 does not divide model.n_kv_heads=1") == 1, p.stderr[-2000:]
    assert not (tmp_path / "x").exists()


def test_checkpoint_of_another_model_is_refused(two_ranks, tmp_path):
    """A DCP checkpoint whose tensors differ from the model's: a one-line error before anything loads."""
    from llmstack.distributed import Parallelism
    from llmstack.distributed.checkpoint import load_state
    from llmstack.model import build_model
    from llmstack.train import build_optimizer

    other = build_model(ModelConfig(vocab_size=320, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64))
    other.init_weights()
    opt = build_optimizer(other, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ConfigError, match="holds another model: .* is shape"):
        load_state(Parallelism(), other, opt, two_ranks / "fsdp" / "checkpoints" / "step_000010" / "dcp")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_memory_estimate_matches_the_ranks_tensors():
    """What llmstack.distributed.memory computes from the config is what a rank's tensors hold after a
    step (parameters, gradients, AdamW state): exactly, except ZeRO-1, whose optimizer splits whole
    tensors and so only roughly in half."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_distributed.py"), "--preset", "tiny",
                        "--batch-size", "4", "--seq-len", "32", "--steps", "1", "--threads", "1", "--json"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["strategy"]: r for r in map(json.loads, p.stdout.splitlines())}
    assert set(rows) == {"single", "ddp", "zero1", "zero2", "fsdp", "tp", "pp"}
    for name, r in rows.items():
        for part in ("params", "grads", "optim"):
            if name == "zero1" and part == "optim":
                assert r["estimate"][part] < r[part] < rows["single"][part]
            else:
                assert r[part] == r["estimate"][part], (name, part)
    assert rows["fsdp"]["params"] * 2 == rows["single"]["params"]
