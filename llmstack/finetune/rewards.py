"""Verifiable rewards, computed in a separate process with a time limit.

    scores = RewardRunner("python_function", timeout=5).score(prompts, answers)   # floats, one per answer
    runner.errors, runner.timeouts                                                 # counted, never raised

A reward is a function `reward(prompt: str, answer: str) -> float`, named "module:function"
(importable in a fresh interpreter) or one of the built-in tasks (`TASKS`). Generated answers
are untrusted: they are judged only in a child process started with `python -I` (no user site,
no environment), in an empty temporary directory, with limits on CPU time and memory, and
without network where the system allows it (a new network namespace through `unshare -n`).
The parent gives each answer `timeout` seconds: a reward that raises counts as an error and
scores 0, one that hangs is killed, counted as a timeout, scores 0, and the remaining answers
go to a fresh process. Training never stops for them.

Built-in tasks (the code is compiled, never run):

- `python_function`: the answer (the code in a ```python fence, or the whole answer) must compile
  and define the function or method the prompt asks for ("Write the Python function `name(...)`"):
  1.0; compiling without defining it: 0.25; not compiling: 0.
- `python_parses`: the answer compiles: 1.0; else 0. Easy to game (the shortest valid answer earns it).
- `python_signature`: the answer's first line must be the `def` of that function (it compiles with a
  `pass` body): 1.0; the `def` of another name: 0.25 plus up to 0.5 for how close the name is; else 0.
  Judges a short answer: a small model rarely finishes a whole function within a rollout's budget.
- `arithmetic`: the prompt asks for `a + b`, `a - b` or `a * b` (integers; `data.source: arithmetic`
  makes such prompts) and the answer's last integer is its exact value: 1.0; else 0.
"""
from __future__ import annotations

import json
import os
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Sequence

# The child process: reads {"prompt", "answer"} lines, writes {"reward"} or {"error"} lines as it goes.
_CHILD = r"""
import importlib, json, sys
module, _, name = sys.argv[1].rpartition(":")
if module.endswith(".py"):  # a file: loaded alone, without importing the package around it
    import importlib.util
    spec = importlib.util.spec_from_file_location("reward_module", module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
else:
    mod = importlib.import_module(module)
fn = getattr(mod, name)
for line in sys.stdin:
    item = json.loads(line)
    try:
        out = {"reward": float(fn(item["prompt"], item["answer"]))}
    except BaseException as e:
        out = {"error": f"{type(e).__name__}: {e}"[:300]}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""

# Built-in tasks: this file, loaded alone in the child (it imports only the standard library).
TASKS = {name: f"{os.path.abspath(__file__)}:{name}" for name in ("python_function", "python_parses",
                                                                    "python_signature", "arithmetic")}


def code_of(answer: str) -> str:
    """The code in an answer: the first ```python fenced block when there is one, else the whole answer."""
    import re

    m = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", answer, re.S)
    return m.group(1) if m else answer


def python_function(prompt: str, answer: str) -> float:
    """1.0 when the answer compiles and defines the function the prompt names; 0.25 when it only
    compiles; 0.0 otherwise. Compiled, never executed."""
    import ast
    import re

    try:
        tree = ast.parse(code_of(answer))
        compile(tree, "<answer>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return 0.0
    wanted = re.search(r"`(?:[\w.]*\.)?(\w+)\(", prompt)
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return 1.0 if wanted and wanted.group(1) in names else 0.25


def python_parses(prompt: str, answer: str) -> float:
    """1.0 when the answer (the code in a ```python fence, or the whole answer) compiles, else 0.0."""
    import ast

    try:
        compile(ast.parse(code_of(answer)), "<answer>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return 0.0
    return 1.0


def python_signature(prompt: str, answer: str) -> float:
    """The answer's first line, given a body, must compile as the `def` of the function the prompt
    names: 1.0; the `def` of another name: 0.25 + 0.5 * the names' similarity (difflib's ratio), so
    that a name nearly copied earns more than a made-up one; anything else: 0.0."""
    import ast
    import difflib
    import re

    first = answer.lstrip("`").removeprefix("python").lstrip("\n").split("\n", 1)[0].strip()
    if not first.startswith(("def ", "async def ")):
        return 0.0
    try:
        tree = ast.parse(first + "\n    pass")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return 0.0
    wanted = re.search(r"`(?:[\w.]*\.)?(\w+)\(", prompt)
    if wanted is None:
        return 0.25
    name = tree.body[0].name
    return 1.0 if name == wanted.group(1) else 0.25 + 0.5 * difflib.SequenceMatcher(None, name, wanted.group(1)).ratio()


def arithmetic(prompt: str, answer: str) -> float:
    """1.0 when the last integer in the answer equals the exact value of the first `a op b` in the
    prompt (op one of + - *), else 0.0 (no integer, or another). Thousands separators are ignored;
    a prompt without such an expression is an error."""
    import re

    asked = re.search(r"(-?\d+)\s*([-+*])\s*(-?\d+)", prompt)
    if asked is None:
        raise ValueError("the prompt asks for no a + b, a - b or a * b")
    a, op, b = int(asked.group(1)), asked.group(2), int(asked.group(3))
    exact = a + b if op == "+" else a - b if op == "-" else a * b
    numbers = re.findall(r"-?\d+", re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer))
    return 1.0 if numbers and int(numbers[-1]) == exact else 0.0


def _limits(cpu_seconds: int, memory_bytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        os.setsid()  # its own process group: killed whole on a timeout
    return apply


_UNSHARE: list[str] | None = None


def _isolation() -> list[str]:
    """["unshare", "-n", "--"] when a new network namespace can be made here, else []."""
    global _UNSHARE
    if _UNSHARE is None:
        _UNSHARE = []
        if shutil.which("unshare"):
            try:
                ok = subprocess.run(["unshare", "-n", "--", sys.executable, "-c", "pass"], capture_output=True,
                                    timeout=10).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                _UNSHARE = ["unshare", "-n", "--"]
    return _UNSHARE


class RewardRunner:
    """Scores answers with a reward function in a child process (see the module docstring)."""

    def __init__(self, task: str, *, timeout: float = 5.0, memory_mb: int = 1024):
        spec = TASKS.get(task, task)
        module, _, name = spec.rpartition(":")
        if not module or not name:
            raise ValueError(f"reward {task!r} is neither a built-in task ({', '.join(TASKS)}) nor 'module:function'")
        self.spec, self.timeout, self.memory = spec, timeout, memory_mb * 2**20
        self.errors = self.timeouts = 0
        self.last_error = ""

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        items = [json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers)]
        scores: list[float] = []
        while len(scores) < len(items):
            scores += self._run(items[len(scores):])
        return scores

    def _run(self, items: list[str]) -> list[float]:
        """Scores for a prefix of `items` (at least one: a hung or crashed answer scores 0)."""
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with tempfile.TemporaryDirectory(prefix="llmstack-reward-") as cwd:
            env = {"PYTHONPATH": root, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
            proc = subprocess.Popen([*_isolation(), sys.executable, "-I", "-c",
                                     f"import sys; sys.path.insert(0, {root!r})\n" + _CHILD, self.spec],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=cwd, env=env, preexec_fn=_limits(int(self.timeout * len(items)) + 5,
                                                                         self.memory))
            out: list[float] = []
            try:
                proc.stdin.write("".join(items).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            deadline = time.monotonic() + self.timeout + 10  # the first answer also pays the import
            fd, pending = proc.stdout.fileno(), b""
            while len(out) < len(items):
                if b"\n" not in pending:  # read the pipe directly: a buffered reader would hide lines from select
                    left = deadline - time.monotonic()
                    if left <= 0 or not select.select([fd], [], [], left)[0]:
                        self.timeouts += 1
                        self.last_error = f"the reward took more than {self.timeout:g} s"
                        break
                    chunk = os.read(fd, 65536)
                    if not chunk:  # the child died (a crash, a resource limit)
                        self.errors += 1
                        self.last_error = (proc.stderr.read() or b"the reward process exited").decode(
                            errors="replace").strip()[-300:]
                        break
                    pending += chunk
                    continue
                line, _, pending = pending.partition(b"\n")
                result = json.loads(line)
                if "error" in result:
                    self.errors += 1
                    self.last_error = result["error"]
                out.append(result.get("reward", 0.0))
                deadline = time.monotonic() + self.timeout
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, 9)
                except OSError:
                    pass
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            if len(out) < len(items):
                out.append(0.0)  # the answer it was on: hung or crashed
            return out
