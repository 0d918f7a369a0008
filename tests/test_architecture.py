"""Checks of the shape of the code that a reviewer would otherwise have to remember."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

AGENT = REPO / "deployer" / "agent_main.py"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_agent_imports_only_the_standard_library() -> None:
    imported = _imported_modules(AGENT)
    assert imported, "the agent imports something"
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def _tool(name: str) -> str:
    """A console script installed beside this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run scripts/install.sh --test")
    return found


def test_agent_runs_on_python_3_6() -> None:
    """Jetsons on JetPack 4 ship Python 3.6: vermin finds no construct newer than that."""
    result = subprocess.run([_tool("vermin"), "-t=3.6-", "--no-tips", "--violations", "--eval-annotations",
                             str(AGENT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_layers_contract() -> None:
    """import-linter's layers contract in pyproject.toml: modules import only from lower layers."""
    result = subprocess.run([_tool("lint-imports")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_does_not_import_heavy_modules() -> None:
    """`deploy --help` stays fast: no paramiko, numpy or pyopencl at import time of the CLI."""
    code = "import sys, deployer.cli; print(sorted(m for m in ('paramiko', 'numpy', 'pyopencl') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.strip() == "[]", result.stderr
