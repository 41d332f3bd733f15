"""The scripts refuse bad command lines with a one-line `error: ...` (no traceback, exit status not 0),
and quantize.py never replaces the source checkpoint or a directory of other files.

Each script runs as a subprocess on tiny checkpoints made here (runs/ is not needed). Starting one
costs seconds (importing torch), so only the early checks run, several subprocesses at a time."""
import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmstack.model import ModelConfig
from llmstack.inference.quantize import quantize_, save_quantized
from llmstack.interop import save_pretrained
from llmstack.model import Transformer
from llmstack.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def tiny_checkpoint(directory: Path, tokenizer: Tokenizer, *, max_seq_len: int = 64, quantized: bool = False) -> Path:
    """A run directory (`latest` -> checkpoints/step_000001) holding a random two-layer model
    with the tokenizer's vocabulary."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=max_seq_len))
    model.init_weights()
    ckpt = directory / "checkpoints" / "step_000001"
    if quantized:
        save_quantized(quantize_(model, "int8"), ckpt)
    else:
        save_pretrained(model, ckpt)
    tokenizer.save(ckpt / "tokenizer.json")
    (ckpt / "trainer_state.pt").write_bytes(b"optimizer state")  # what a training run leaves beside the weights
    (directory / "latest").write_text("checkpoints/step_000001")
    return directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tok = Tokenizer.train(["def add(a, b):\n    return a + b\n" * 30], 300)
    other = Tokenizer.train(["class Point:\n    x: int = 0\n" * 30], 300)  # the same size, other merges
    return dict(
        target=tiny_checkpoint(root / "target", tok),
        other_tokenizer=tiny_checkpoint(root / "other-tokenizer", other),
        short=tiny_checkpoint(root / "short", tok, max_seq_len=16),
        int8=tiny_checkpoint(root / "int8", tok, quantized=True),
    )


def run(*calls):
    """Run each (script, arg, ...) at once; returns their CompletedProcess-like results in order."""
    procs = [subprocess.Popen([sys.executable, f"scripts/{script}", *map(str, args)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script, *args in calls]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def assert_error(result, *fragments):
    command = " ".join(map(str, result.args[1:]))
    assert result.returncode != 0, f"{command} succeeded:\n{result.stdout}"
    assert "Traceback" not in result.stderr, f"{command}:\n{result.stderr}"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), f"{command}: {result.stderr}"
    for fragment in fragments:
        assert fragment in last, f"{command}: {last!r} lacks {fragment!r}"


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_quantize_refuses_the_source_a_foreign_directory_and_unknown_skip_names(runs, tmp_path):
    run_dir = runs["target"]
    ckpt = run_dir / "checkpoints" / "step_000001"
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    earlier = tmp_path / "earlier"  # an earlier output of quantize.py: it is replaced
    shutil.copytree(runs["int8"] / "checkpoints" / "step_000001", earlier,
                    ignore=shutil.ignore_patterns("trainer_state.pt"))
    before = snapshot(run_dir)
    same, parent, other, skip, again = run(
        ("quantize.py", "--checkpoint", ckpt, "--scheme", "int8", "--out", ckpt),
        ("quantize.py", "--checkpoint", run_dir, "--scheme", "int8", "--out", run_dir, "--force"),
        ("quantize.py", "--checkpoint", run_dir, "--scheme", "int8", "--out", foreign),
        ("quantize.py", "--checkpoint", run_dir, "--scheme", "int8", "--out", tmp_path / "q", "--skip", "nonexistent",
         "lm_head"),
        ("quantize.py", "--checkpoint", run_dir, "--scheme", "int4", "--group-size", "32", "--out", earlier))
    assert_error(same, "is the source checkpoint")
    assert_error(parent, "holds the source checkpoint")
    assert_error(other, "not part of a checkpoint", "todo.txt", "--force")
    assert_error(skip, "nonexistent", "qkv_proj", "down_proj")
    assert "lm_head" not in skip.stderr.split(":")[1]  # a valid name is not reported as unknown
    assert snapshot(run_dir) == before
    assert (foreign / "todo.txt").read_text() == "keep me"
    assert not (tmp_path / "q").exists()
    assert again.returncode == 0, again.stderr
    src = (ckpt / "model.safetensors").stat().st_size / 2**20
    assert f"int4 (group size 32), weights {src:.2f} MiB -> " in again.stdout
    assert sorted(p.name for p in earlier.iterdir()) == ["config.yaml", "model.safetensors", "tokenizer.json"]


def test_generate_help_shows_the_docstring_escapes_and_the_defaults():
    (result,) = run(("generate.py", "--help"))
    assert result.returncode == 0
    assert '--stop "\\n\\n"' in result.stdout  # a backslash and an n, not a line break
    assert "(default 0.8)" in result.stdout and "(default 0.95)" in result.stdout


def test_generate_and_bench_speculative_reject_bad_arguments(runs):
    target = runs["target"]
    (beams, lone, device, stopping, both, penalty, ngram, foreign, zero, target_ctx, tokenizer) = run(
        ("generate.py", "--checkpoint", target, "--num-beams", "2", "--temperature", "0.5", "--seed", "1"),
        ("generate.py", "--checkpoint", target, "--num-return-sequences", "2"),
        ("generate.py", "--checkpoint", target, "--device", "cuda:99"),
        ("generate.py", "--checkpoint", target, "--early-stopping", "true"),
        ("generate.py", "--checkpoint", target, "--draft", target, "--prompt-lookup"),
        ("generate.py", "--checkpoint", target, "--prompt-lookup", "--repetition-penalty", "1.2"),
        ("generate.py", "--checkpoint", target, "--draft", target, "--ngram", "2"),
        ("generate.py", "--checkpoint", target, "--draft", runs["other_tokenizer"]),
        ("bench_speculative.py", "--prompts", "0", "--quick"),  # --quick does not override a given value
        ("bench_speculative.py", "--checkpoint", target, "--draft", runs["short"], "--prompt-len", "100"),
        ("bench_speculative.py", "--checkpoint", target, "--draft", runs["other_tokenizer"], "--prompt-len", "8",
         "--max-new-tokens", "8"))
    assert_error(beams, "--num-beams", "does not sample", "--temperature", "--seed")
    assert_error(lone, "--num-return-sequences needs --num-beams")
    assert_error(device, "'cuda:99'", "not available")
    assert_error(stopping, "--early-stopping needs --num-beams")
    assert_error(both, "--draft and --prompt-lookup", "choose one")
    assert_error(penalty, "--temperature, --top-k, --top-p and --seed only", "--repetition-penalty")
    assert_error(ngram, "--ngram needs --prompt-lookup")
    assert_error(foreign, "the draft's tokenizer", "speculative decoding needs one tokenizer")
    assert_error(zero, "--prompts: must be an integer >= 1, got '0'")
    assert_error(target_ctx, "past the target's context", "max_seq_len 64")  # not the draft's (16), checked after
    assert_error(tokenizer, "the draft's tokenizer", "speculative decoding needs one tokenizer")


def test_generate_speculative_and_beam_flags_run(runs):
    """Greedy speculative decoding prints what greedy decoding prints (the target's own output),
    with its acceptance figures; --early-stopping reaches beam search."""
    target = runs["target"]
    common = ("--checkpoint", target, "--prompt", "def add(a, b):", "--max-new-tokens", "12")
    plain, lookup, draft, beams = run(
        ("generate.py", *common, "--temperature", "0"),
        ("generate.py", *common, "--temperature", "0", "--prompt-lookup", "--k", "3", "--ngram", "2"),
        ("generate.py", *common, "--temperature", "0", "--draft", runs["int8"]),  # its own int8 copy
        ("generate.py", *common, "--num-beams", "3", "--early-stopping", "never", "--num-return-sequences", "2"))
    for result in (plain, lookup, draft, beams):
        assert result.returncode == 0, result.stderr
    assert lookup.stdout == plain.stdout and draft.stdout == plain.stdout
    assert "speculative decoding (prompt lookup): 12 tokens in" in lookup.stderr
    assert "speculative decoding (draft model): 12 tokens in" in draft.stderr
    assert beams.stdout.count("--- ") == 2


def test_generate_reports_a_token_its_tokenizer_cannot_decode(runs, tmp_path):
    """A model whose vocabulary is padded past its tokenizer's may emit an id the tokenizer lacks:
    one error line naming the id, after the text streamed so far, not a traceback."""
    tok = Tokenizer.train(["def add(a, b):\n    return a + b\n" * 30], 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size + 20, dim=32, n_layers=1, n_heads=4, max_seq_len=32,
                                    norm="layernorm", bias=True))
    model.init_weights()
    bad = tok.vocab_size + 7
    with torch.no_grad():  # the final hidden state is the unit vector e0, and only `bad` reads it
        model.norm.weight.zero_()
        model.norm.bias.zero_()
        model.norm.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[bad, 0] = 10.0
    save_pretrained(model, tmp_path / "padded")
    tok.save(tmp_path / "padded" / "tokenizer.json")
    (result,) = run(("generate.py", "--checkpoint", tmp_path / "padded", "--prompt", "def", "--temperature", "0"))
    assert_error(result, f"token id {bad} is not in the tokenizer's vocabulary")


def test_benchmarks_reject_bad_values(runs):
    batches, quantized, decode = run(
        ("bench_generate.py", "--batch-size", "1", "0", "--quick"),  # --quick does not override a given value
        ("bench_generate.py", "--checkpoint", runs["int8"], "--quick"),
        ("bench_decode.py", "--quick", "--device", "foo"))
    assert_error(batches, "--batch-size: must be an integer >= 1, got '0'")
    assert_error(quantized, "quantized checkpoint", "needs a float checkpoint")
    assert_error(decode, "'foo'", "not a device name")


def test_bench_attention_runs_end_to_end(tmp_path):
    """The attention benchmark on this machine (our kernel through Triton's interpreter): every
    SDPA backend is timed or reported unavailable, each row has our ratio to the best of them,
    and the decode section its bandwidth against the copy bandwidth."""
    pytest.importorskip("triton")
    out = tmp_path / "attn.json"
    (result,) = run(("bench_attention.py", "--quick", "--seqlens", "32", "--causal", "true", "--modes", "fwd_bwd",
                     "--decode-batches", "1", "--decode-kv-lens", "64", "--cpu-reps", "1", "--json", out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["device"] and report["copy_GBs"] > 0
    assert [(row["heads"], row["mode"]) for row in report["rows"]] == [("2/2", "fwd_bwd"), ("2/1", "fwd_bwd")]
    for row in report["rows"]:
        timed = [row[name] for name in ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math")
                 if not isinstance(row[name], str)]
        assert timed and row["ours"] > 0
        assert row["ours/best_sdpa"] == pytest.approx(row["ours"] / max(timed))
    (decode,) = report["decode"]
    assert decode["of_copy_bw"] == pytest.approx(decode["ours_GB/s"] / report["copy_GBs"])


# One spelling for what recurs across scripts, and the synonyms it replaced.
SYNONYMS = {"--new-tokens": "--max-new-tokens", "--batch": "--batch-size", "--batch-sizes": "--batch-size",
            "--prompt-lengths": "--prompt-len", "--group-sizes": "--group-size", "--target": "--checkpoint",
            "--model-dir": "--checkpoint", "--ckpt": "--checkpoint", "--num-threads": "--threads"}


def script_flags() -> dict[str, dict[str, ast.Call]]:
    """{script: {flag: the add_argument call}} read from the scripts' source."""
    found = {}
    for path in sorted((ROOT / "scripts").glob("*.py")):
        calls = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args \
                    and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("--"):
                calls[node.args[0].value] = node
        found[path.name] = calls
    return found


def test_shared_flags_have_one_spelling():
    """No script spells a shared flag another way; --dtype, --device and --threads come from
    llmstack.cli (so their values and defaults agree everywhere); lists are space-separated values,
    never a comma-separated string."""
    problems = []
    for script, flags in script_flags().items():
        for flag, call in flags.items():
            if flag in SYNONYMS:
                problems.append(f"{script}: {flag} (spelled {SYNONYMS[flag]} elsewhere)")
            if flag in ("--dtype", "--device", "--threads"):
                choices = next((k.value for k in call.keywords if k.arg == "choices"), None)
                names = {elt.value for elt in getattr(choices, "elts", [])} if choices is not None else None
                if flag != "--dtype" or names is None or not names <= {"auto", "fp32", "fp16", "bf16"}:
                    problems.append(f"{script}: {flag} defined by hand; use llmstack.cli's add_*_argument")
            text = ast.unparse(call)
            if "comma" in text:
                problems.append(f"{script}: {flag} takes a comma-separated list; use nargs='+'")
    assert not problems, "\n".join(problems)


def test_scripts_that_load_a_model_share_its_flags():
    flags = script_flags()
    for script in ("generate.py", "eval.py", "bench_quantize.py", "bench_decode.py", "bench_generate.py",
                   "bench_speculative.py", "long_context.py", "quantize.py"):
        assert "--checkpoint" in flags[script], script
    for script in ("generate.py", "bench_speculative.py", "bench_decode.py", "bench_generate.py", "bench_quantize.py",
                   "bench_cpu.py"):
        names = set(flags[script])
        assert "--new-tokens" not in names and ("--max-new-tokens" in names), script
