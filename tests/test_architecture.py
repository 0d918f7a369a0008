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


def _imported_by(argv: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """The modules named by `prefixes` that `deploy ARGV` imported, in a fresh interpreter."""
    code = ("import contextlib, io, sys; from deployer.cli.main import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()): main({argv!r})\n"
            f"print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert result.returncode == 0, result.stderr
    return list(ast.literal_eval(result.stdout.strip()))


def test_help_does_not_import_heavy_modules() -> None:
    """`deploy --help` stays fast: it lists every command, and imports no paramiko, numpy or pyopencl."""
    assert _imported_by(["--help"], ("paramiko", "numpy", "pyopencl")) == []
    assert "deployer.cli.history" in _imported_by(["--help"], ("deployer.cli.",))


def test_a_command_imports_only_its_own_module() -> None:
    """Every start pays for the command modules it imports: `deploy push` imports push's, not the nightly
    run's, the history's or the sim's (cli/app.py COMMANDS)."""
    assert _imported_by(["push", "--help"], ("deployer.cli.",)) == \
        ["deployer.cli.app", "deployer.cli.main", "deployer.cli.push", "deployer.cli.render"]
    assert "deployer.cli.push" not in _imported_by(["history", "--help"], ("deployer.cli.",))


ERROR_CLASSES = {"AgentFailure", "AgentError", "CompileError", "AgentMissing"}


def _raised_kinds(path: Path) -> set[str]:
    """Every literal kind given to an error class in one module: `AgentFailure("k", ...)`, `kind="k"`."""
    kinds = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if name not in ERROR_CLASSES:
            continue
        literals = [k.value for k in node.keywords if k.arg == "kind"]
        if name == "AgentFailure" and node.args:
            literals.append(node.args[0])
        kinds |= {c.value for c in literals if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return kinds


def test_one_vocabulary_of_error_kinds() -> None:
    """The board and the controller raise only kinds of `remote/kinds.py` (the board only the agent's), and
    docs/design.md's table lists exactly those, each on its side."""
    from deployer.remote.kinds import AGENT, CONTROLLER, KINDS

    assert not set(AGENT) & set(CONTROLLER)
    package = REPO / "deployer"
    board = set().union(*(_raised_kinds(p) for p in (package / "remote").rglob("*.py")))
    controller = set().union(*(_raised_kinds(p) for p in package.rglob("*.py") if "remote" not in p.parts))
    assert {"bad_request", "locked", "io"} <= board and {"bad_reply", "no_python"} <= controller  # the scan works
    assert board <= set(AGENT), board - set(AGENT)
    assert controller <= set(KINDS), controller - set(KINDS)
    table = (REPO / "docs" / "design.md").read_text().split("### Error kinds", 1)[1].split("\n\n")[1]
    rows = [line.split("|")[1:3] for line in table.splitlines()[2:]]
    documented = {cell.strip().strip("`"): side.strip() for cell, side in rows}
    assert documented == {**{k: "agent" for k in AGENT}, **{k: "controller" for k in CONTROLLER}}


def test_an_unknown_kind_from_a_board_is_a_bad_reply() -> None:
    """A kind is shown on screens and stored: one outside the agent's vocabulary (here an escape sequence)
    is itself a broken reply, shown escaped."""
    from deployer.protocol.reply import Reply
    from deployer.protocol.session import agent_failure

    error = agent_failure(Reply({"ok": False, "error": {"kind": "\x1b]0;owned\x07", "message": "x"}}, b""))
    assert error is not None and error.kind == "bad_reply"
    assert "\x1b" not in error.reason and "\\x1b]0;owned\\x07" in error.reason, error.reason
    known = agent_failure(Reply({"ok": False, "error": {"kind": "locked", "message": "held"}}, b""))
    assert known is not None and known.kind == "locked"
