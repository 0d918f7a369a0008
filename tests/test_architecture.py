"""Checks of the shape of the code that a reviewer would otherwise have to remember."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deployer.remote.boot import BOOTSTRAP, LAUNCH
from tests.conftest import REPO

REMOTE = REPO / "deployer" / "remote"


def _imported_modules(path: Path) -> set[str]:
    """Top-level names of the absolute imports in a file (relative ones stay inside its package)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_board_program_imports_only_the_standard_library() -> None:
    modules = sorted(REMOTE.glob("*.py"))
    assert len(modules) > 10, modules
    for module in modules:
        imported = _imported_modules(module)
        assert imported <= set(sys.stdlib_module_names), (module.name, imported - set(sys.stdlib_module_names))


def _tool(name: str) -> str:
    """A console script installed beside this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run scripts/install.sh --test")
    return found


def test_the_board_program_runs_on_python_3_6(tmp_path: Path) -> None:
    """Jetsons on JetPack 4 ship Python 3.6: vermin finds no construct newer than that in the package, nor in
    the two strings the remote command runs (LAUNCH, BOOTSTRAP)."""
    for name, text in (("launch.py", LAUNCH), ("bootstrap.py", BOOTSTRAP)):
        (tmp_path / name).write_text(text)
    result = subprocess.run([_tool("vermin"), "-t=3.6-", "--no-tips", "--violations", "--eval-annotations",
                             str(REMOTE), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_layers_contract() -> None:
    """import-linter's contracts in pyproject.toml: packages import only from lower layers, and the board
    program imports nothing else of deployer and no third-party package."""
    result = subprocess.run([_tool("lint-imports")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout, result.stdout


def test_help_does_not_import_heavy_modules() -> None:
    """`deploy --help` stays fast: no paramiko, numpy or pyopencl at import time of the CLI."""
    code = ("import sys, deployer.cli.main; "
            "print(sorted(m for m in ('paramiko', 'numpy', 'pyopencl') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.strip() == "[]", result.stderr
