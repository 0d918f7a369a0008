"""What a push shows while it runs: a live table on a terminal, plain lines in a log, nothing with --quiet."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from deployer.sim.fleet import DeviceSpec, Fleet
from deployer.tasks.progress import LiveProgress, PlainProgress, Progress, make_progress
from tests.conftest import REPO, Cli
from tests.test_faults import MakeFleet, _saxpy_only


@pytest.fixture
def one(make_fleet: MakeFleet, tmp_path: Path) -> tuple[Fleet, Path]:
    """A device of the test's own and a one-program library: pushes here are quick and disturb no one."""
    return make_fleet([DeviceSpec("sim-01")]), _saxpy_only(tmp_path, "progress")


def test_the_display_follows_where_stderr_goes() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True)
    log = Console(file=io.StringIO(), force_terminal=False)
    assert isinstance(make_progress(terminal, ["a"], title="t", quiet=False), LiveProgress)
    assert isinstance(make_progress(log, ["a"], title="t", quiet=False), PlainProgress)
    quiet = make_progress(terminal, ["a"], title="t", quiet=True)
    assert type(quiet) is Progress


def test_live_table_rows_show_stage_bytes_and_elapsed() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    live = LiveProgress(console, ["pi-01", "pi-02"], "deploy push")
    sent = [0]
    live.stage("pi-01", "upload")
    live.traffic("pi-01", lambda: (sent[0], 512))
    sent[0] = 3 << 20
    live.finished("pi-02", False, "connect: refused")
    console.print(live._render())
    text = out.getvalue()
    assert "deploy push: 1/2 done" in text
    row = next(line for line in text.splitlines() if "pi-01" in line)
    assert "upload" in row and "3.0 MiB" in row and "512 B" in row and re.search(r"\d+\.\d s", row)
    assert "not started" in next(line for line in text.splitlines() if "pi-02" in line)


def test_plain_lines_when_stderr_is_not_a_terminal(one: tuple[Fleet, Path], cli: Cli, tmp_path: Path) -> None:
    fleet, library = one
    run = cli("push", "--fleet", fleet.inventory, "--kernels", library, "--cache", tmp_path / "c")
    assert run.code == 0, run.err
    lines = run.err.splitlines()
    assert any(re.fullmatch(r"\[\s*\d+\.\ds\] sim-01 connect", line) for line in lines), lines
    assert any(re.fullmatch(r"\[\s*\d+\.\ds\] sim-01 passed", line) for line in lines), lines


def test_quiet_prints_no_progress(one: tuple[Fleet, Path], cli: Cli, tmp_path: Path) -> None:
    fleet, library = one
    run = cli("push", "--fleet", fleet.inventory, "--kernels", library, "--cache", tmp_path / "c", "--quiet")
    assert run.code == 0 and run.err == "" and "1/1 device(s) passed" in run.out


def test_a_terminal_gets_the_live_table(one: tuple[Fleet, Path], tmp_path: Path) -> None:
    """A real `deploy push` with stderr on a pseudo-terminal draws the table; stdout keeps the summary."""
    controller, terminal = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="120", TERM="xterm")
    process = subprocess.Popen(
        [sys.executable, "-m", "deployer", "push", "--fleet", str(one[0].inventory), "--kernels", str(one[1]),
         "--cache", str(tmp_path / "c")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal, env=env, cwd=REPO)
    os.close(terminal)
    drawn = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # the pty closes when the process exits
                    break
                if not chunk:
                    break
                drawn += chunk
            elif process.poll() is not None:
                break
        stdout, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    screen = drawn.decode("utf-8", "replace")
    assert process.returncode == 0, screen[-2000:]
    assert "deploy push" in screen and "stage" in screen and "received" in screen and "sim-01" in screen
    assert "\x1b[" in screen  # drawn with cursor movement, not as lines
    assert b"1/1 device(s) passed" in stdout and b"\x1b[2K" not in stdout
