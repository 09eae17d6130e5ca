"""Module boundaries, checked on the source: imports go one way only, training <- inference <- applications.

training/ is the base (data, models, losses, distributed helpers), inference/ builds on it, applications/
may use both. A lower layer importing a higher one would tie the training steps to chat or pipeline code,
so every import of every file is read with `ast` (imports inside functions included). No file edits
sys.path either: the packages are importable because the project is installed (`pip install -e .`).
"""
import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("training", "inference", "applications")
# What each package must not import.
FORBIDDEN = {"training": ("inference", "applications"), "inference": ("applications",), "applications": ()}


def python_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py"))


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; relative imports resolved from its package
    (`root` is the directory the package names start from)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = list(path.relative_to(root).parent.parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, module))
    return sorted(found)


def sys_path_edits(path: Path) -> list[int]:
    """Lines that touch `sys.path` (sys.path.insert/append, assignments) or import `path` from sys."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
            lines.append(node.lineno)
    return sorted(lines)


def layer_of(path: Path) -> str:
    return path.relative_to(REPO).parts[0]


def test_the_walk_finds_every_package():
    files = python_files()
    assert {layer_of(path) for path in files} == set(PACKAGES)
    assert REPO / "training" / "utils" / "distributed.py" in files


def test_imports_go_from_applications_to_inference_to_training_only():
    violations = []
    for path in python_files():
        forbidden = FORBIDDEN[layer_of(path)]
        for line, module in imported_modules(path):
            if module.split(".")[0] in forbidden:
                violations.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not violations, "imports against the layering (training <- inference <- applications):\n" + "\n".join(
        violations)


def test_no_file_edits_sys_path():
    edits = [f"{path.relative_to(REPO)}:{line}" for path in python_files() for line in sys_path_edits(path)]
    assert not edits, "sys.path manipulation (install the project with `pip install -e .` instead):\n" + "\n".join(
        edits)


@pytest.mark.parametrize("source, module", [
    ("import inference.chat", "inference.chat"),
    ("from inference.generation import add_sampling_args", "inference.generation"),
    ("def f():\n    from applications import e2e_rlhf", "applications"),
])
def test_the_import_reader_sees_plain_and_lazy_imports(tmp_path, source, module):
    path = tmp_path / "training" / "utils" / "example.py"
    path.parent.mkdir(parents=True)
    path.write_text(source + "\n")
    assert [name for _, name in imported_modules(path, tmp_path)] == [module]


def test_relative_imports_are_resolved_from_the_package(tmp_path):
    path = tmp_path / "training" / "utils" / "example.py"
    path.parent.mkdir(parents=True)
    path.write_text("from . import masks\nfrom ..x import y\n")
    assert [name for _, name in imported_modules(path, tmp_path)] == ["training.utils", "training.x"]


def test_sys_path_edits_are_found(tmp_path):
    path = tmp_path / "example.py"
    path.write_text("import sys\nsys.path.insert(0, '..')\nfrom sys import path\n")
    assert sys_path_edits(path) == [2, 3]
