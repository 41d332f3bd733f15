"""scripts/pretrain.py on bad input: one line on stderr, exit code 2, no traceback, nothing written.

Each case runs the script's `main()` in this process (its imports take seconds, its checks
milliseconds); a few run it as a real process too, which is what a user sees.
"""
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmstack.config import ConfigError
from llmstack.runtime import THREADS_ENV, default_threads, set_threads

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "pretrain.py"

FILES = {
    "syntax.yaml": "train:\n  lr: [\n",
    "tab.yaml": "train:\n\tlr: 0.1\n",
    "empty.yaml": "",
    "list.yaml": "- model\n- train\n",
    "afile": "a file where a directory should be\n",
}

# (id, arguments ({tmp} is the test's folder), environment, the error line's start and a part of it)
CASES = [
    ("batch_size=0", ["train.batch_size=0"], {}, "config error: train.batch_size must be >= 1, got 0"),
    ("batch_size<0", ["train.batch_size=-4"], {}, "config error: train.batch_size must be >= 1, got -4"),
    ("seq_len=0", ["data.seq_len=0"], {}, "config error: data.seq_len must be >= 1, got 0"),
    ("save_every=0", ["train.save_every=0"], {}, "config error: train.save_every must be >= 1, got 0"),
    ("eval_every=0", ["train.eval_every=0"], {}, "config error: train.eval_every must be >= 1, got 0"),
    ("log_every=0", ["train.log_every=0"], {}, "config error: train.log_every must be >= 1, got 0"),
    ("grad_accum=0", ["train.grad_accum=0"], {}, "config error: train.grad_accum must be >= 1, got 0"),
    ("max_steps<0", ["train.max_steps=-5"], {}, "config error: train.max_steps must be >= 1, got -5"),
    ("lr<0", ["train.lr=-1e-3"], {}, "config error: train.lr must be a finite number > 0, got -0.001"),
    ("lr=nan", ["train.lr=.nan"], {}, "config error: train.lr must be a finite number > 0, got nan"),
    ("lr=inf", ["train.lr=inf"], {}, "config error: train.lr must be a finite number > 0, got inf"),
    ("grad_clip=inf", ["train.grad_clip=.inf"], {}, "config error: train.grad_clip must be a finite number >= 0, got inf"),
    ("val_fraction=0", ["data.val_fraction=0"], {}, "config error: data.val_fraction must be in (0, 1)"),
    ("override not YAML", ["train.lr=["], {}, "config error: override train.lr=[: the value is not valid YAML"),
    ("override no =", ["train.lr"], {}, "config error: override 'train.lr' is not of the form key.path=value"),
    ("unknown key", ["train.lr_max=1"], {}, "config error: unknown config key 'train.lr_max'"),
    ("YAML syntax", ["--config", "{tmp}/syntax.yaml"], {}, "config error: config file '{tmp}/syntax.yaml' line 3"),
    ("YAML tab", ["--config", "{tmp}/tab.yaml"], {},
     "config error: config file '{tmp}/tab.yaml' line 2, column 1: found character '\\t'"),
    ("YAML empty", ["--config", "{tmp}/empty.yaml"], {}, "config error: config file '{tmp}/empty.yaml' is empty"),
    ("YAML list", ["--config", "{tmp}/list.yaml"], {},
     "config error: config file '{tmp}/list.yaml' must hold a mapping"),
    ("YAML missing", ["--config", "{tmp}/nope.yaml"], {}, "config error: config file '{tmp}/nope.yaml' not found"),
    ("out_dir a file", ["train.out_dir={tmp}/afile"], {},
     "config error: train.out_dir='{tmp}/afile': '{tmp}/afile' is a file, not a directory"),
    ("out_dir under a file", ["train.out_dir={tmp}/afile/run"], {},
     "config error: train.out_dir='{tmp}/afile/run': '{tmp}/afile' is a file, not a directory"),
    ("cache_dir a file", ["data.cache_dir={tmp}/afile"], {},
     "config error: data.cache_dir='{tmp}/afile': '{tmp}/afile' is a file"),
    ("no such device", ["train.device=cuda:9"], {}, "config error: device 'cuda:9' is not available"),
    ("device name", ["train.device=gpu"], {}, "config error: device 'gpu' is not a device name"),
    ("--threads 0", ["--threads", "0"], {}, "error: argument --threads: must be an integer >= 1, got '0'"),
    ("--threads x", ["--threads", "x"], {}, "error: argument --threads: must be an integer >= 1, got 'x'"),
    ("unknown flag", ["--bogus"], {}, "error: unrecognized arguments: --bogus"),
    ("LLMSTACK_THREADS", [], {THREADS_ENV: "two"}, f"config error: {THREADS_ENV}='two': the thread count must be"),
]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """The test's folder: the case's files, the working directory, the token and tokenizer cache."""
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMSTACK_CACHE", str(tmp_path / "cache"))
    return tmp_path


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def arguments(args: list[str], folder: Path) -> list[str]:
    """The case's arguments after a run folder in the test's folder (a case's own out_dir comes
    after it, and wins) and a corpus that does not exist: a case that passed every check would
    stop there, with another message, rather than train on the standard library."""
    return [f"train.out_dir={folder}/run", f"data.source={folder}/no-corpus/*.txt",
            *(a.replace("{tmp}", str(folder)) for a in args)]


@pytest.mark.parametrize("args, env, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(folder, monkeypatch, capsys, args, env, expected):
    before = listing(folder)
    monkeypatch.setenv(THREADS_ENV, str(torch.get_num_threads()))  # keep this process's thread count
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *arguments(args, folder)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(expected.replace("{tmp}", str(folder))), err
    assert listing(folder) == before


# In a real process: the three places a bad input is caught (the command line, the threads, the run folder).
@pytest.mark.parametrize("case", ["YAML tab", "LLMSTACK_THREADS", "out_dir a file"])
def test_bad_input_in_a_real_process(folder, case):
    _, args, env, expected = next(c for c in CASES if c[0] == case)
    before = listing(folder)
    proc = subprocess.run([sys.executable, str(SCRIPT), *arguments(args, folder)], cwd=folder, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(expected.replace("{tmp}", str(folder))), \
        proc.stderr
    assert "Traceback" not in proc.stderr
    assert listing(folder) == before


def test_ctrl_c_in_a_real_process_saves_at_a_step_boundary(tmp_path):
    """SIGINT to the script mid-training: exit code 130, and a checkpoint at the step the last
    metrics row names, with AdamW's step counters at that step (no update applied twice)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"m{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 20)
    run = tmp_path / "run"
    args = ["model=tiny", "model.vocab_size=300", "model.dropout=0.1", "tokenizer.vocab_size=300",
            f"data.source={corpus}/*.txt", "data.seq_len=32", "data.val_fraction=0.2", f"train.out_dir={run}",
            "train.max_steps=100000", "train.batch_size=4", "train.log_every=1", "train.eval_every=7",
            "train.eval_batches=2", "train.save_every=100000", "train.tensorboard=false"]
    env = {**os.environ, "LLMSTACK_CACHE": str(tmp_path / "cache"), THREADS_ENV: "1"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 12):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "Ctrl-C: stopping after this step" in err and "interrupted: saved" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    state = torch.load(run / (run / "latest").read_text().strip() / "trainer_state.pt", weights_only=True)
    assert state["step"] == rows[-1]["step"] >= 10
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {float(state["step"])}


def test_set_threads_flag_then_environment_then_default(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv(THREADS_ENV, "3")
        assert set_threads(2) == 2 and torch.get_num_threads() == 2  # the flag first
        assert set_threads() == 3 and torch.get_num_threads() == 3  # then the environment
        monkeypatch.delenv(THREADS_ENV)
        assert set_threads() == default_threads() == max(1, len(os.sched_getaffinity(0)) - 1)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert set_threads() == 2  # what torch took from OMP_NUM_THREADS is left alone
        for bad in ("0", "-1", "x", "1.5"):
            monkeypatch.setenv(THREADS_ENV, bad)
            with pytest.raises(ConfigError, match=THREADS_ENV):
                set_threads()
        with pytest.raises(ConfigError, match="--threads must be an integer >= 1, got 0"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)
