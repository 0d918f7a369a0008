"""Shared fixtures: real sshd devices started by `deployer.sim` (the code behind `deploy sim`).

- `fleet`: one shared fleet (two PoCL fingerprints) for tests that only read it.
- `pushed`: one `deploy push` onto that fleet, its JSON and cache, shared by the tests that inspect them.
- `make_fleet`: devices of a test's own, for tests that break things; stopped by PID afterwards.
Every fleet uses one PoCL kernel cache, so repeated builds of the same source are cache hits (tests only;
benchmarks never share it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from deployer.cli.main import main
from deployer.sim.fleet import DeviceSpec, Fleet, fleet_specs, start_fleet
from deployer.tasks.progress import Progress

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels"

settings.register_profile("ci", max_examples=200, deadline=None)
settings.load_profile("ci")


@contextmanager
def private_home(folder: Path, **extra: str) -> Iterator[Path]:
    """HOME (and USER, LOGNAME) of a test's own for the block: no developer's ~/.ssh/config leaks in, and `~`
    expands predictably; `extra`: more variables to set."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"HOME": str(folder), "USER": "tester", "LOGNAME": "tester", **extra}.items():
            patch.setenv(name, value)
        yield folder


def start_ssh_agent(sock: Path) -> subprocess.Popen[bytes]:
    """A real ssh-agent listening on `sock`, returned once the socket is there; the caller stops it by PID
    (`terminate`, `wait`). If the socket never comes, the agent is stopped here and the test fails."""
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    end = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < end:
        time.sleep(0.02)
    if not sock.exists():
        agent.terminate()
        agent.wait(timeout=10)
        pytest.fail("ssh-agent did not start")
    return agent


class StageHook(Progress):
    """A progress display that calls `hook(device, stage)` as each stage starts: a test's way in."""

    def __init__(self, hook: Callable[[str, str], None]) -> None:
        self.hook = hook

    def stage(self, device: str, stage: str) -> None:
        self.hook(device, stage)


@dataclass
class CliRun:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Cli = Callable[..., CliRun]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run `deploy ARGS` in-process; returns exit code, stdout and stderr."""

    def run(*args: str | os.PathLike[str]) -> CliRun:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliRun(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def pocl_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pocl-cache")


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, pocl_cache: Path) -> Iterator[Fleet]:
    started = start_fleet(tmp_path_factory.mktemp("fleet"), fleet_specs(3, mix=True), pocl_cache=pocl_cache)
    yield started
    started.stop()


@dataclass
class Pushed:
    fleet: Fleet
    cache: Path
    run: CliRun

    @property
    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(self.run.out)
        return report


@pytest.fixture(scope="session")
def pushed(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    """One push of the kernel library and a model to the shared fleet, every kernel smoke-tested (other
    tests may have pushed the same kernels there first: an incremental push would call them unchanged)."""
    import contextlib
    import io

    cache = tmp_path_factory.mktemp("cache")
    model = tmp_path_factory.mktemp("model") / "tiny.bin"
    model.write_bytes(os.urandom(4096))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["push", "--fleet", str(fleet.inventory), "--kernels", str(KERNELS), "--cache", str(cache),
                     "--model", str(model), "--json", "--smoke", "always"])  # whatever ran before
    return Pushed(fleet, cache, CliRun(code, out.getvalue(), err.getvalue()))


@pytest.fixture
def make_fleet(tmp_path: Path, pocl_cache: Path) -> Iterator[Callable[..., Fleet]]:
    """Start devices of the test's own (keywords go to `start_fleet`: rtt_ms, rate_kbit); all are stopped
    when the test ends, even if it failed."""
    started: list[Fleet] = []

    def make(specs: Sequence[DeviceSpec], **options: Any) -> Fleet:
        folder = tmp_path / f"fleet{len(started)}"
        started.append(Fleet(folder))  # stopped by what its state.json records, even if start_fleet raised
        fleet = start_fleet(folder, specs, pocl_cache=pocl_cache, **options)
        started[-1] = fleet
        return fleet

    yield make
    for fleet in started:
        fleet.stop()


@pytest.fixture
def kernels_copy(tmp_path: Path) -> Path:
    """A copy of the kernel library that a test may edit."""
    target = tmp_path / "kernels"
    shutil.copytree(KERNELS, target)
    return target
