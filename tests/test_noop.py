"""The shell's no-op on the board's side: the agent arms it only when the shell will agree, and the remote
command's test, run by a real `sh`, answers exactly when nothing it covers changed (docs/design.md 11).

The board here is this machine: a remote dir in a temp home, a real ICD file and library, real `sh`,
`stat` and `cksum`. The end-to-end path over sshd is tests/test_incremental.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from deployer.config.inventory import parse_inventory
from deployer.protocol.bundle import run_command
from deployer.remote import environ
from deployer.remote import noop as board_noop

TOKEN = "ab" * 32


@pytest.fixture
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home with a remote dir whose `current` is a release, and an ICD folder naming a library."""
    home = tmp_path / "home"
    release = home / ".deployer" / "releases" / "r1"
    (release / "build").mkdir(parents=True)
    for name in ("release.json", "build/manifest.json", "build/mace_cl_compiled_program.bin"):
        (release / name).write_text(name)
    (home / ".deployer" / "current").symlink_to("releases/r1")
    vendors = tmp_path / "vendors"
    vendors.mkdir()
    library = tmp_path / "libdriver.so"
    library.write_bytes(b"\x7fELF driver")
    (vendors / "driver.icd").write_text(f"{library}\n")
    login = {"PATH": os.environ["PATH"], "HOME": str(home), "OCL_ICD_VENDORS": str(vendors)}
    monkeypatch.setattr(environ, "LOGIN_ENV", login)
    for name, value in login.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DEPLOYER_OPENCL_LIBRARY", str(library))
    return home


def _arm(home: Path) -> str | None:
    return board_noop.remember(str(home / ".deployer"), {"token": TOKEN, "current": "r1"}, "r1")


def _shell_answers(home: Path, token: str = TOKEN) -> bool:
    """Run the remote command a push would send, with the token, in a real `sh` as the board's login."""
    device = parse_inventory("devices:\n  b1: {host: 127.0.0.1, python: /nonexistent/python3}\n").devices[0]
    command = run_command(device, noop_token=token)
    env = {k: v for k, v in environ.LOGIN_ENV.items()}
    done = subprocess.run(["sh", "-c", command], cwd=home, env=env, capture_output=True, timeout=30)
    if done.returncode == 0 and done.stdout:
        assert json.loads(done.stdout) == {"op": "noop", "current": "r1"}
        return True
    return False


def test_an_armed_board_answers_from_its_shell_and_only_for_its_token(board: Path) -> None:
    assert _arm(board) is None
    assert (board / ".deployer" / "noop").stat().st_mode & 0o077 == 0  # the user's own
    assert _shell_answers(board)
    assert not _shell_answers(board, "cd" * 32)


@pytest.mark.parametrize("change", ["library", "icd", "variable", "current", "manifest"])
def test_what_the_probe_covers_changing_sends_the_push_to_the_agent(board: Path, change: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert _arm(board) is None and _shell_answers(board)
    root = board / ".deployer"
    if change == "library":  # a driver upgrade: a new file under the same name
        library = Path(os.environ["DEPLOYER_OPENCL_LIBRARY"])
        library.unlink()
        library.write_bytes(b"\x7fELF driver 2")
    elif change == "icd":
        icd = next(Path(os.environ["OCL_ICD_VENDORS"]).iterdir())
        os.utime(icd, (icd.stat().st_atime, icd.stat().st_mtime + 2))
    elif change == "variable":  # a driver variable of the login environment
        monkeypatch.setitem(environ.LOGIN_ENV, "POCL_DEVICES", "pthread")
    elif change == "current":
        (root / "releases" / "r2").mkdir()
        (root / "c.tmp").symlink_to("releases/r2")
        os.rename(root / "c.tmp", root / "current")
    else:
        manifest = root / "current" / "build" / "manifest.json"
        manifest.unlink()
        manifest.write_text("{}")
    assert not _shell_answers(board)


def test_a_board_without_cksum_is_not_armed(board: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tools = tmp_path / "bin"  # every tool the probe uses but cksum
    tools.mkdir()
    for tool in ("sh", "uname", "stat", "env", "grep", "sort", "readlink", "cat"):
        found = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        (tools / tool).symlink_to(found)
    monkeypatch.setitem(environ.LOGIN_ENV, "PATH", str(tools))
    assert _arm(board) == "no cksum on this board"
    assert not (board / ".deployer" / "noop").exists()


def test_a_probe_that_fails_arms_nothing(board: Path) -> None:
    assert _arm(board) is None
    os.unlink(os.environ["DEPLOYER_OPENCL_LIBRARY"])  # stat fails: the probe exits 1
    assert _arm(board) == "the probe failed on this board (exit 1)"
    assert not (board / ".deployer" / "noop").exists()  # the old line went first


def test_arming_for_another_release_than_current_is_refused(board: Path) -> None:
    assert board_noop.remember(str(board / ".deployer"), {"token": TOKEN, "current": "r0"}, "r1") == \
        "current is r1, not r0"
    assert not (board / ".deployer" / "noop").exists()


def test_a_forgotten_line_answers_nothing(board: Path) -> None:
    assert _arm(board) is None
    board_noop.forget(str(board / ".deployer"))
    assert not _shell_answers(board)
    board_noop.forget(str(board / ".deployer"))  # forgetting twice is fine
