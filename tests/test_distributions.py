"""The two distributions stay apart: the lab (``rdrop_lab``) uses only the library's
public API, and the library's wheel holds no lab code."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import rdrop

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "lab" / "src" / "rdrop_lab"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every ``import`` / ``from ... import`` in a file."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def _public(module: str) -> set[str]:
    return set(getattr(importlib.import_module(module), "__all__", ()))


def test_the_lab_imports_only_public_library_api() -> None:
    problems = []
    for path in sorted(LAB.rglob("*.py")):
        for module, names in _imports(path):
            if module != "rdrop" and not module.startswith("rdrop."):
                continue
            where = f"{path.relative_to(ROOT)}: {module}"
            if any(part.startswith("_") for part in module.split(".")):
                problems.append(f"{where} is private")
                continue
            if module == "rdrop" or module.startswith("rdrop.integrations."):
                public = _public(module)
                problems += [f"{where}.{n} is not in __all__" for n in names if n not in public]
            else:
                problems.append(f"{where}: import from rdrop or an integration, not {module}")
    assert not problems, "\n".join(problems)


def test_attribute_access_on_rdrop_in_the_lab_is_public() -> None:
    public = set(rdrop.__all__)
    problems = []
    for path in sorted(LAB.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "rdrop"
                and node.attr not in public
            ):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: rdrop.{node.attr}")
    assert not problems, "\n".join(problems)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_library_wheel_holds_no_lab_code(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    [wheel] = tmp_path.glob("torch_rdrop-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("rdrop/") for n in names)
    assert not [n for n in names if "rdrop_lab" in n or n.startswith("rdrop/experiments")]
