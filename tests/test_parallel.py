"""Data parallelism (llmstack.train.parallel): two gloo processes under torchrun train as one process
does on the same global batch, step for step; a checkpoint written by two ranks resumes on one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmstack.config import ConfigError
from llmstack.train.parallel import ParallelConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    corpus = root / "corpus"
    corpus.mkdir()
    g = torch.Generator().manual_seed(0)
    words = ["def", "return", "self", "value", "if", "else", "for", "in", "range", "print", "(", ")", ":", "x", "y"]
    for i in range(40):
        text = " ".join(words[j] for j in torch.randint(len(words), (150,), generator=g).tolist())
        (corpus / f"doc{i}.txt").write_text(text)
    cfg = root / "tiny.yaml"
    # AdamW's eps at 1e-3: with the default 1e-8, a weight whose gradient is ~0 moves by about lr times the
    # gradient's sign, so float-order differences between the ranks' all-reduce and one process's sum
    # (~1e-9) could move it by 1e-5 and more; the DDP equivalence under test is not about that.
    cfg.write_text(f"""
model: {{vocab_size: 320, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, max_seq_len: 64}}
tokenizer: {{vocab_size: 300}}
data: {{source: "{corpus}/*.txt", seq_len: 32, val_fraction: 0.25, cache_dir: "{root / 'cache'}", num_proc: 1}}
train: {{max_steps: 10, batch_size: 4, lr: 1.0e-2, warmup_steps: 2, eval_every: 5, eval_batches: 2, log_every: 1,
        save_every: 5, keep_last: 5, tensorboard: false, seed: 3, eps: 1.0e-3}}
""")
    return root, cfg


def run(cfg: Path, out: Path, procs: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMSTACK_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
                if procs > 1 else [sys.executable])
    cmd = [*launcher, str(ROOT / "scripts" / "pretrain.py"), "--config", str(cfg), f"train.out_dir={out}",
           f"parallel.dp_replicate={procs}", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line and "val_loss" not in line]


def weights(out: Path) -> dict:
    from llmstack.interop import load_weights
    from llmstack.interop import resolve_checkpoint

    return load_weights(resolve_checkpoint(out))[0]


def test_two_ranks_train_as_one_process(job, tmp_path):
    root, cfg = job
    run(cfg, tmp_path / "one", 1)
    run(cfg, tmp_path / "two", 2)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == 10 == len(b)
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=1e-5)  # the same global batch, the gradient averaged over ranks
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-5)
    assert not any(p.name.startswith("metrics") for p in (tmp_path / "two").iterdir() if p.name.endswith(".tmp"))


def test_two_ranks_save_one_rank_resumes(job, tmp_path):
    root, cfg = job
    run(cfg, tmp_path / "ref", 1)
    out = tmp_path / "run"
    run(cfg, out, 2)
    # As if the two-rank run had died after its checkpoint of step 5: continue it in one process.
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_000010")
    (out / "latest").write_text("checkpoints/step_000005\n")
    run(cfg, out, 1, "--resume")
    for x, y in zip(losses(tmp_path / "ref"), losses(out)):
        assert y == pytest.approx(x, rel=1e-5)
    assert len(losses(out)) == 10


def test_bad_parallel_configs(job, tmp_path):
    with pytest.raises(ConfigError, match="only data parallelism"):
        ParallelConfig(tp=2).validate()
    root, cfg = job
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--config", str(cfg),
                        f"train.out_dir={tmp_path / 'x'}", "parallel.dp_replicate=2"], capture_output=True, text=True,
                       timeout=120, env=env, cwd=ROOT)
    assert p.returncode == 2 and "launch with torchrun --nproc_per_node 2" in p.stderr
    assert not (tmp_path / "x").exists()
