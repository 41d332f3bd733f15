"""The docs stay true: the Stage map names code and tests that exist, the config reference is
what the schemas say, links resolve, imports point down the layers architecture.md describes."""
import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an unpacked sdist): every file under the root
        return [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts]
    return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def defines(path: Path, dotted: str) -> bool:
    """Whether a Python file defines `Name` or `Class.method` (or a module-level assignment of it)."""
    scope = ast.parse(path.read_text(encoding="utf-8")).body
    for part in dotted.split("."):
        found = None
        for node in scope:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == part:
                found = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == part for t in targets):
                    found = node
        if found is None:
            return False
        scope = getattr(found, "body", [])
    return True


def stage_map_rows() -> list[list[str]]:
    text = (ROOT / "docs" / "stage-map.md").read_text(encoding="utf-8")
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if re.match(r"\| \d \|", line)]
    assert len(rows) >= 72, "the Stage map lost rows"
    return rows


def test_stage_map_names_code_and_tests_that_exist():
    missing = []
    for stage, topic, where, tested_by in stage_map_rows():
        for cell, must_be_test in ((where, False), (tested_by, True)):
            for ref in re.findall(r"`([^`]+)`", cell):
                path, _, name = ref.partition("::")
                if not re.match(r"(llmstack|kernels|scripts|configs|tests)/", path):
                    continue  # a flag or a value in the prose, not a path
                file = ROOT / path
                if must_be_test and not path.startswith("tests/"):
                    missing.append(f"{topic}: {ref} is not under tests/")
                elif not file.exists():
                    missing.append(f"{topic}: {path} does not exist")
                elif name and not defines(file, name):
                    missing.append(f"{topic}: {path} does not define {name}")
    assert not missing, "\n".join(missing)


def test_config_reference_is_generated_from_the_schemas():
    from config_reference import PAGE, render

    assert PAGE.read_text(encoding="utf-8") == render(), "run python scripts/config_reference.py"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_between_docs_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def test_nothing_refers_to_files_outside_the_repository():
    outside = re.compile(r"\.\./shared|/work/|\.\./\.\./")
    offenders = [str(p.relative_to(ROOT)) for p in tracked_files()
                 if p.suffix in (".md", ".py", ".yaml", ".toml", ".txt", "") and p.resolve() != Path(__file__).resolve()
                 and outside.search(p.read_text(encoding="utf-8", errors="replace"))]
    assert not offenders, offenders


# Which of our packages each layer may import (architecture.md's table). A module may always
# import its own package.
LAYERS = {
    "llmstack.config": set(),
    "llmstack.io": set(),
    "llmstack.cli": {"llmstack.config"},
    "llmstack.runtime": {"llmstack.config"},
    "llmstack.kernels": set(),
    "llmstack.tokenizer": {"llmstack.config", "llmstack.io"},
    "llmstack.data": {"llmstack.config", "llmstack.io"},
    "llmstack.model": {"llmstack.config", "llmstack.kernels"},
    "llmstack.interop": {"llmstack.config", "llmstack.io", "llmstack.model", "llmstack.tokenizer", "llmstack.classic"},
    "llmstack.eval": {"llmstack.config", "llmstack.model", "llmstack.data"},
    "llmstack.classic": {"llmstack.config", "llmstack.model", "llmstack.data"},
    "llmstack.inference": {"llmstack.config", "llmstack.io", "llmstack.runtime", "llmstack.kernels",
                           "llmstack.model", "llmstack.tokenizer", "llmstack.interop", "llmstack.data"},
    "llmstack.train": {"llmstack.config", "llmstack.io", "llmstack.runtime", "llmstack.model", "llmstack.tokenizer",
                       "llmstack.data", "llmstack.interop", "llmstack.eval", "llmstack.distributed"},
    "llmstack.finetune": {"llmstack.config", "llmstack.io", "llmstack.runtime", "llmstack.kernels", "llmstack.model",
                          "llmstack.tokenizer", "llmstack.data", "llmstack.interop", "llmstack.eval", "llmstack.train",
                          "llmstack.inference", "llmstack.distributed"},
    "llmstack.distributed": {"llmstack.config", "llmstack.runtime", "llmstack.model"},
    "llmstack.serve": {"llmstack.config", "llmstack.io", "llmstack.runtime", "llmstack.model", "llmstack.tokenizer",
                       "llmstack.interop", "llmstack.inference", "llmstack.finetune"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def our_modules() -> dict[str, Path]:
    modules = {}
    for path in (ROOT / "llmstack").rglob("*.py"):
        rel = path.relative_to(ROOT / "llmstack").with_suffix("")
        modules[".".join(("llmstack", *rel.parts)).removesuffix(".__init__")] = path
    for path in (ROOT / "kernels").glob("*.py"):
        modules[f"llmstack.kernels.{path.stem}".removesuffix(".__init__")] = path
    return modules


MODULES = set(our_modules())


def imports_of(module: str, path: Path) -> set[str]:
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name == "llmstack":  # `from llmstack import kernels` imports a subpackage, `import generate` the root
                found |= {f"llmstack.{a.name}" if f"llmstack.{a.name}" in MODULES else "llmstack" for a in node.names}
            else:
                found.add(name)
    return {name for name in found if name.startswith("llmstack.") or name == "llmstack"}


def test_imports_point_down():
    wrong = []
    for module, path in our_modules().items():
        layer = layer_of(module)
        if layer == "llmstack":
            continue  # the package root offers every name, lazily
        assert layer in LAYERS, f"{module}: add its package to LAYERS (and to architecture.md's table)"
        for name in imports_of(module, path):
            target = layer_of(name)
            if name == "llmstack":
                wrong.append(f"{module} imports a name from the package root")
            elif target != layer and target not in LAYERS[layer]:
                wrong.append(f"{module} imports {name}")
    assert not wrong, "\n".join(sorted(wrong))
